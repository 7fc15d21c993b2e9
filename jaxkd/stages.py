"""Runs made of stages: ``'stage:NAME'`` names an earlier stage's run directory.

A chain (:mod:`jaxkd.chain`) and a compression pipeline (:mod:`jaxkd.compression`) both
run stages one after the other in ``workdir/<stage>``; a later stage points at an earlier
one with ``'stage:NAME'`` in ``distill.teacher.workdir``, ``distill.teachers[i].workdir``
or ``init.teacher_workdir``. :func:`resolve` turns those into directories.
"""

from __future__ import annotations

import os

import ml_collections

from jaxkd.schema import ConfigError

PREFIX = "stage:"


def resolve(run: ml_collections.ConfigDict, workdir: str, done: list[str], name: str,
            where: str = "config.stages") -> ml_collections.ConfigDict:
    """A copy of ``run`` with every ``stage:NAME`` replaced by that stage's workdir; it
    must be an earlier stage (one of ``done``). Errors name ``where.name.field``."""
    run = ml_collections.ConfigDict(run.to_dict())

    def resolved(value: str, field: str) -> str:
        if not value.startswith(PREFIX):
            return value
        ref = value[len(PREFIX):]
        if ref not in done:
            raise ConfigError(f"{where}.{name}.{field}={value!r} must name an earlier stage; "
                              f"earlier stages: {', '.join(done) or 'none'}")
        return os.path.join(workdir, ref)

    run.distill.teacher.workdir = resolved(run.distill.teacher.workdir,
                                           "distill.teacher.workdir")
    run.distill.teachers = tuple(
        {**t, "workdir": resolved(t["workdir"], f"distill.teachers[{i}].workdir")}
        for i, t in enumerate(run.distill.get("teachers", ())))
    if "init" in run:
        run.init.teacher_workdir = resolved(run.init.teacher_workdir, "init.teacher_workdir")
    return run
