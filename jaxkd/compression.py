"""Compression pipelines: prune -> cluster -> quantize, each stage keeping the earlier ones.

Deep Compression (Han, Mao & Dally, "Deep Compression: Compressing Deep Neural Networks
with Pruning, Trained Quantization and Huffman Coding", ICLR 2016) chains pruning, weight
sharing and entropy coding, retraining after each. ``config.compression.stages`` lists the
stages of one run, in order::

    config.compression.stages = ('prune', 'cluster', 'quantize')
    config.compression.num_steps = (3000, 1000, 1000)      # optional, per stage
    config.compression.learning_rates = (1e-3, 1e-4, 1e-4)  # optional, per stage

Each stage is a run of its own in ``workdir/<stage>`` (resumable, with its own summary and
artifact) that starts from the previous stage's weights (``config.init.method='copy'``;
the first stage starts from ``config.init``, e.g. a trained dense model) with the methods
of every stage so far switched on, configured by the usual blocks:

- ``prune``: ``config.pruning``. Later stages keep its zeros: their masks start from
  ``params != 0`` (``pruning.from_zeros``) and are never recomputed to something else.
- ``cluster``: ``config.clustering`` (its pinned zero centroid keeps pruned weights at 0).
  Later stages re-cluster a clustered kernel to exactly its own values (the codebook of a
  kernel with at most ``k`` distinct values is those values), so the clusters stay.
- ``quantize``: ``config.quantization`` (QAT; the last stage: the integer export follows).

``config.distill`` stays on throughout (the teacher is the uncompressed model).

After every stage the run reads the stage's saved weights and its exported artifact and
checks the structure of every earlier stage: pruned positions still exactly 0, at most
``num_clusters`` distinct nonzero values per clustered layer, integer kernels inside their
bit range (and, once clustered, at most ``num_clusters + 1`` distinct integers per layer or
output channel). It logs the figures and stops with :class:`StructureError`, naming the
stage, the layer and the count, when a stage broke an earlier one: each method checks its
own structure (:meth:`jaxkd.methods.Method.check_structure`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jaxkd import checkpoint, export, methods, metrics, multihost, stages, train
from jaxkd import workdir as workdirs
from jaxkd.config import Compression, Run, parse_run
from jaxkd.methods import StructureError
from jaxkd.schema import ConfigError, parse

# The config block each stage switches on.
BLOCKS = {"prune": "pruning", "cluster": "clustering", "quantize": "quantization"}

__all__ = ["BLOCKS", "StructureError", "check", "describe", "is_pipeline", "measure",
           "run_pipeline", "stage_configs", "stages_of"]


def stages_of(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.compression.stages`` (``()`` when the config has none), checked."""
    block = config.get("compression")
    return parse(Compression, block, "config.compression").stages if block is not None else ()


def is_pipeline(config: ml_collections.ConfigDict) -> bool:
    return bool(stages_of(config))


def stage_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """``{stage: run config}`` in order: stage ``i`` switches on the methods of stages
    ``0..i`` and starts from stage ``i - 1`` (``init.method='copy'``, ``'stage:NAME'``)."""
    names = stages_of(config)
    block = parse(Compression, config.compression, "config.compression")
    if "cluster" in names and "quantize" in names and config.quantization.per_channel:
        raise ConfigError(
            "config.quantization.per_channel=True after a 'cluster' stage would give every "
            "output channel its own scale, so a layer's k shared values would not stay k "
            "integers: set config.quantization.per_channel=False")
    out: dict[str, ml_collections.ConfigDict] = {}
    for i, name in enumerate(names):
        run = ml_collections.ConfigDict(config.to_dict())
        run.compression = ml_collections.ConfigDict(Compression().to_dict())
        for j, earlier in enumerate(names):
            run[BLOCKS[earlier]].enabled = j <= i
        if "prune" in names[:i]:  # an earlier stage pruned: keep exactly its zeros
            run.pruning.from_zeros = True
            run.pruning.schedule = "one_shot"
            run.pruning.begin_step = 0
        if i:
            run.init.method = "copy"
            run.init.teacher_workdir = f"{stages.PREFIX}{names[i - 1]}"
        if block.num_steps:
            run.num_steps = int(block.num_steps[i])
        if block.learning_rates:
            run.optimizer.learning_rate = float(block.learning_rates[i])
        out[name] = run
    return out


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, *,
                 allow_config_change: bool = False) -> dict[str, Any]:
    """Runs (or resumes) every stage in ``workdir/<stage>``, checking the structure after
    each; writes and returns the summary of the last stage with a ``stages`` table."""
    workdirs.check_kind(workdir, stages=True)
    runs = stage_configs(config)
    done: list[str] = []
    rows, structures = {}, {}
    previous: dict[str, Any] | None = None
    summary: dict[str, Any] = {}
    for name, run in runs.items():
        run = stages.resolve(run, workdir, done, name, where="config.compression.stages")
        stage_dir = os.path.join(workdir, name)
        summary = multihost.broadcast_json(
            metrics.read_summary(stage_dir) if multihost.is_leader() else None)
        if summary is None:
            print(f"=== compression stage {name} -> {stage_dir}", flush=True)
            summary = train.train_and_evaluate(run, stage_dir,
                                               allow_config_change=allow_config_change)
        else:
            workdirs.check_finished(stage_dir, run, stage=name,
                                    allow_config_change=allow_config_change)
            print(f"=== compression stage {name}: finished earlier ({stage_dir})", flush=True)
        # The leader reads the stage's files and checks them; the others learn the verdict.
        problem = None
        if multihost.is_leader():
            structure = measure(stage_dir, run)
            try:
                check(structure, previous, run, stage=name)
            except StructureError as e:
                problem = str(e)
            else:
                print(f"structure after stage {name!r}: {describe(structure)}", flush=True)
                structures[name] = {**structure, "layers": {
                    p: {k: v for k, v in layer.items() if k != "zeros"}
                    for p, layer in structure["layers"].items()}}
                previous = structure
        problem = multihost.broadcast_json(problem)
        if problem:
            raise StructureError(problem)
        rows[name] = {k: summary.get(k) for k in ("method", "accuracy", "num_params",
                                                   "artifact_bytes")}
        done.append(name)
    result = {**summary, "compression_stages": rows, "structure": structures,
              "stage_order": list(runs)}
    metrics.write_summary(workdir, result)
    return result


# ----------------------------------------------------------------------------- checks


def _kernels(workdir: str) -> dict[str, np.ndarray]:
    """``{layer: kernel}`` from a finished run's ``weights.npz`` (LSQ steps left out)."""
    with np.load(os.path.join(workdir, checkpoint.WEIGHTS_FILE), allow_pickle=False) as f:
        return {k[len("params/"):-len("/kernel")]: f[k] for k in f.files
                if k.startswith("params/") and k.endswith("/kernel")}


def _distinct_nonzero(w: np.ndarray, per_channel: bool) -> int:
    if not per_channel:
        return int(np.unique(w[w != 0]).size)
    columns = w.reshape(-1, w.shape[-1])
    return max(int(np.unique(c[c != 0]).size) for c in columns.T)


def measure(workdir: str, run: ml_collections.ConfigDict | Run) -> dict[str, Any]:
    """The structure of a finished run: per layer, its kernel's zero positions (as the
    count and a fingerprint), sparsity and distinct nonzero values; and, for a quantized
    artifact, each integer kernel's range and distinct values (per layer and per channel)."""
    kernel = _kernels(workdir)
    out: dict[str, Any] = {"layers": {}}
    for p, w in kernel.items():
        out["layers"][p] = {"shape": list(w.shape), "sparsity": float(np.mean(w == 0)),
                            "distinct_nonzero": _distinct_nonzero(w, False),
                            "distinct_nonzero_per_channel": _distinct_nonzero(w, True),
                            "zeros": np.flatnonzero(w.reshape(-1) == 0)}
    if parse_run(run).quantization.enabled:
        out["integers"] = {}
        for p, layer in export.integer_kernels(os.path.join(workdir, "artifact")).items():
            q, bits = layer["values"], layer["bits"]
            out["integers"][p] = {"bits": bits, "min": int(q.min()), "max": int(q.max()),
                                  "distinct": int(np.unique(q).size),
                                  "distinct_per_channel": max(
                                      int(np.unique(c).size)
                                      for c in q.reshape(-1, q.shape[-1]).T)}
    return out


def check(structure: Mapping[str, Any], previous: Mapping[str, Any] | None,
          run: ml_collections.ConfigDict | Run, *, stage: str) -> None:
    """Raises :class:`StructureError` when ``stage`` broke an earlier stage's structure:
    every method checks its own (:meth:`jaxkd.methods.Method.check_structure`)."""
    run = parse_run(run)
    for method in methods.METHODS:
        method.check_structure(run, structure, previous, stage=stage)


def describe(structure: Mapping[str, Any]) -> str:
    """One line: per layer its sparsity and distinct values, and integer ranges."""
    parts = []
    for p, v in structure["layers"].items():
        text = f"{p} {100 * v['sparsity']:.1f}% zeros, {v['distinct_nonzero']} values"
        q = structure.get("integers", {}).get(p)
        if q:
            text += f", int{q['bits']} in [{q['min']}, {q['max']}] ({q['distinct']} distinct)"
        parts.append(text)
    return "; ".join(parts)
