"""Cross-layer sharing in the trainer: the zoo's ``tie_hidden`` / ``tie_convs`` kwargs."""

from __future__ import annotations

from jaxkd.config import Run
from jaxkd.methods.base import Method


class Tying(Method):
    """ALBERT-style tied layers live in the model (``config.model.kwargs``); the method
    only names the run."""

    @classmethod
    def enabled(cls, run: Run) -> bool:
        return bool(run.model.kwargs.get("tie_hidden") or run.model.kwargs.get("tie_convs"))

    def label(self) -> str:
        return "tied"
