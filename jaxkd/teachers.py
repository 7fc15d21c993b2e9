"""Teachers: frozen models read from finished runs, checked against the student's data.

A teacher is a finished run's workdir: its ``model.json`` (registry name, kwargs, classes,
input shape) rebuilds the model and its newest Orbax checkpoint gives the variables (a
partial restore of ``params`` and ``batch_stats``; the teacher's checkpoint is never
written to). ``config.distill.teachers`` lists several, each with a weight; with
``ensemble='probabilities'`` they are mixed in probability space
(:func:`jaxkd.objective.ensemble_logits`), else their losses add up. Teachers run inside
the student's jitted step under ``stop_gradient`` (:mod:`jaxkd.train`). Precomputed logits
instead of a teacher model are :mod:`jaxkd.teacher_logits`.

A teacher may also be a ``.gguf`` file (llama.cpp's format; Gemma 3, e.g. the file of
``python -m jaxkd.models.fetch gemma-3-270m``): its weights dequantized to float32
(:func:`jaxkd.models.gguf_io.from_gguf`), its vocabulary the classes, any input length. Or
a Hugging Face BERT directory (``config.json`` + ``model.safetensors``, e.g. the
all-MiniLM-L6-v2 of ``python -m jaxkd.models.fetch``), a pretrained sentence encoder whose
features teach (the ``sentence_embedding`` task) and whose new head teaches nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from jaxkd import checkpoint, files, metrics, models
from jaxkd.config import Distill
from jaxkd.schema import ConfigError, MissingError


@dataclasses.dataclass(frozen=True)
class Teacher:
    """A frozen teacher: its model and variables, read from a finished run's checkpoint."""

    workdir: str
    model: nn.Module
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    spec: dict[str, Any]  # model.json: name, kwargs, num_classes, input_shape
    weight: float = 1.0
    field: str = "config.distill.teacher.workdir"  # the field that named it

    @property
    def num_classes(self) -> int:
        return int(self.spec["num_classes"])


def load(workdir: str, *, sharding: NamedSharding | None = None,
         layout_of: Callable[[str], Any] | None = None, compute: dict[str, str] | None = None,
         weight: float = 1.0, field: str = "config.distill.teacher.workdir") -> Teacher:
    """Reads a finished run's model variables from its newest Orbax checkpoint; errors name
    ``field``.

    The variables are restored onto ``layout_of(model name).params`` (the run's mesh and
    rule table: :func:`jaxkd.partitioning.layout`), or all onto ``sharding``; ``compute``
    (``dtype``, ``param_dtype``) is the precision the teacher runs in.
    """
    if workdir.endswith(".gguf"):
        return _load_gguf(workdir, layout_of=layout_of, sharding=sharding, compute=compute,
                          weight=weight, field=field)
    if is_pretrained(workdir):
        return _load_pretrained(workdir, layout_of=layout_of, sharding=sharding,
                                compute=compute, weight=weight, field=field)
    if not os.path.isdir(workdir):
        raise MissingError(f"{field}={workdir!r} does not exist")
    summary = metrics.read_summary(workdir)
    if summary and "stage_order" in summary and not os.path.exists(
            os.path.join(workdir, checkpoint.CONFIG_FILE)):
        stages = summary["stage_order"]
        raise ConfigError(f"{field}={workdir!r} holds a run of several stages "
                          f"({', '.join(stages)}): name one stage's directory, e.g. "
                          f"{os.path.join(workdir, stages[-1])!r}")
    config = checkpoint.read_config(workdir)
    step = checkpoint.latest_step(workdir)
    if step is None:
        raise MissingError(f"{field}={workdir!r} has no checkpoint: train the teacher first")
    if summary is None:
        raise ConfigError(f"{field}={workdir!r} has not finished (newest checkpoint at step "
                          f"{step} of {config.get('num_steps')}, no summary.json): relaunch "
                          "its command to finish it, or name a finished run")
    spec = files.read_json(os.path.join(workdir, checkpoint.MODEL_FILE))
    if compute and not models.takes_precision(spec["name"]):
        raise ConfigError(f"{field}={workdir!r}: its model {spec['name']!r} takes no dtype; "
                          "use config.dtype='float32'")
    model = models.get_model(spec["name"], num_classes=spec["num_classes"], **spec["kwargs"],
                             **(compute or {}))
    abstract = jax.eval_shape(lambda: dict(model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, *spec["input_shape"]), models.input_dtype(model)),
        train=False)))
    if layout_of is not None:
        shardings = layout_of(spec["name"]).params(abstract)
    else:
        if sharding is None:
            raise TypeError("teachers.load needs sharding or layout_of")
        shardings = jax.tree.map(lambda _: sharding, abstract)
    abstract = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                            abstract, shardings)
    variables = checkpoint.restore_variables(workdir, step, abstract, field=field)
    return Teacher(workdir=workdir, model=model, config=config, variables=variables,
                   spec=spec, weight=weight, field=field)


def _load_gguf(path: str, *, layout_of: Callable[[str], Any] | None,
               sharding: NamedSharding | None, compute: dict[str, str] | None, weight: float,
               field: str) -> Teacher:
    """A teacher read from a GGUF file (module docstring), placed as :func:`load` places
    a checkpoint's variables."""
    from jaxkd.models import gemma, gguf_io

    if not os.path.isfile(path):
        raise MissingError(f"{field}={path!r} does not exist (python -m jaxkd.models.fetch "
                           "gemma-3-270m fetches Gemma 3 270M)")
    model, variables, _ = gguf_io.from_gguf(path)
    kwargs = gemma.config_of(model)
    vocab = kwargs.pop("vocab_size")
    kwargs.pop("param_dtype"), kwargs.pop("dtype")
    model = models.get_model("gemma3", num_classes=vocab, **kwargs, **(compute or {}))
    spec = {"name": "gemma3", "kwargs": kwargs, "num_classes": vocab, "input_shape": None}
    return Teacher(workdir=path, model=model, variables=_place(variables, "gemma3", layout_of,
                                                               sharding),
                   config=ml_collections.ConfigDict(), spec=spec, weight=weight, field=field)


def _place(variables: Any, name: str, layout_of: Callable[[str], Any] | None,
           sharding: NamedSharding | None) -> Any:
    """``variables`` on model ``name``'s layout (``layout_of``), or all on ``sharding``."""
    if layout_of is not None:
        shardings = layout_of(name).params(variables)
    else:
        if sharding is None:
            raise TypeError("teachers.load needs sharding or layout_of")
        shardings = jax.tree.map(lambda _: sharding, variables)
    return jax.device_put(variables, shardings)


def is_pretrained(path: str) -> bool:
    """Whether ``path`` is a Hugging Face BERT directory (``config.json`` and
    ``model.safetensors``), not a run."""
    return (os.path.isfile(os.path.join(path, "model.safetensors"))
            and not os.path.exists(os.path.join(path, checkpoint.MODEL_FILE)))


def _load_pretrained(directory: str, *, layout_of: Callable[[str], Any] | None,
                     sharding: NamedSharding | None, compute: dict[str, str] | None,
                     weight: float, field: str) -> Teacher:
    """A pretrained encoder read from a Hugging Face directory
    (:func:`jaxkd.models.pretrained.from_pretrained`): its features are the teacher's, its
    head is new and untrained (``spec['pretrained']``: no logit term may read it)."""
    from jaxkd.models import pretrained

    model, variables = pretrained.from_pretrained(directory)
    kwargs = {**pretrained.model_kwargs(pretrained.read_config(directory),
                                        os.path.join(directory, "config.json")),
              "pooling": model.pooling}
    model = models.get_model("bert", num_classes=1, **kwargs, **(compute or {}))
    spec = {"name": "bert", "kwargs": kwargs, "num_classes": 1, "input_shape": None,
            "pretrained": True}
    return Teacher(workdir=directory, model=model,
                   variables=_place(variables, "bert", layout_of, sharding),
                   config=ml_collections.ConfigDict(), spec=spec, weight=weight, field=field)


def load_all(distill: Distill, *, sharding: NamedSharding | None = None,
             layout_of: Callable[[str], Any] | None = None,
             compute: dict[str, str] | None = None) -> list[Teacher]:
    """The teachers of ``config.distill``: ``teachers`` (a list) or ``teacher.workdir``
    (placed as :func:`load` places them)."""
    where = {"sharding": sharding, "layout_of": layout_of, "compute": compute}
    if distill.teachers:
        return [load(t.workdir, **where, weight=t.weight,
                     field=f"config.distill.teachers[{i}].workdir")
                for i, t in enumerate(distill.teachers)]
    if distill.teacher.workdir:
        return [load(distill.teacher.workdir, **where)]
    return []


def _same_vocabulary(tokenizer: str, gguf_path: str) -> bool:
    """Whether ``config.data.tokenizer`` is the GGUF teacher's own vocabulary."""
    if os.path.abspath(tokenizer) == os.path.abspath(gguf_path):
        return True
    if not tokenizer.endswith(".gguf"):
        return False
    from jaxkd.models import spm

    return spm.from_gguf(tokenizer).tokens == spm.from_gguf(gguf_path).tokens


def check_fit(teachers: list[Teacher], *, num_classes: int, dataset: str,
              input_shape: tuple[int, ...], tokenizer: str = "") -> None:
    """Every teacher must take the student's inputs and predict its classes; a teacher
    trained on another dataset of the same shapes is used with a warning. A GGUF teacher
    reads token ids of its own vocabulary: ``tokenizer`` (``config.data.tokenizer``) must
    be it."""
    for t in teachers:
        trained_on = t.config.get("data", {}).get("name", "?")
        if t.spec.get("pretrained"):  # a Hugging Face encoder: its own tokenizer, if it has one
            own = os.path.join(t.workdir, "tokenizer.json")
            if os.path.isfile(own) and not (os.path.isfile(tokenizer)
                                            and files.sha256(tokenizer) == files.sha256(own)):
                raise ConfigError(f"{t.field}={t.workdir!r} reads the token ids of its own "
                                  f"tokenizer, but config.data.tokenizer={tokenizer!r} is "
                                  f"another: set config.data.tokenizer to {own!r}")
            continue
        if t.spec["input_shape"] is None:  # a pretrained LM: any length, its vocabulary
            if not _same_vocabulary(tokenizer, t.workdir):
                raise ConfigError(f"{t.field}={t.workdir!r} reads the token ids of its own "
                                  f"vocabulary, but config.data.tokenizer={tokenizer!r} is "
                                  "another: set config.data.tokenizer to the .gguf file")
            continue
        shape = tuple(t.spec["input_shape"])
        if t.num_classes != num_classes or shape != tuple(input_shape):
            raise ConfigError(
                f"{t.field}={t.workdir!r}: that model was trained on {trained_on!r} (inputs "
                f"{shape}, {t.num_classes} classes) but config.data.name={dataset!r} has "
                f"inputs {tuple(input_shape)} and {num_classes} classes")
        if trained_on != dataset:
            print(f"jaxkd: warning: {t.field}={t.workdir!r} was trained on {trained_on!r}, "
                  f"this run's data is {dataset!r}", file=sys.stderr, flush=True)
