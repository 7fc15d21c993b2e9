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
stage, the layer and the count, when a stage broke an earlier one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np

from jaxkd import checkpoint, export, metrics, pruning, quant, sharing

STAGES = ("prune", "cluster", "quantize")
_BLOCK = {"prune": "pruning", "cluster": "clustering", "quantize": "quantization"}


class StructureError(ValueError):
    """A compression stage undid the structure an earlier stage made."""


def default_compression_config() -> ml_collections.ConfigDict:
    """The ``config.compression`` block: no stages (a plain run) by default.

    Fields:
      stages: ordered stage names from 'prune', 'cluster', 'quantize' (each at most once;
        'quantize' last).
      num_steps: steps of each stage (same length as ``stages``); () = ``config.num_steps``.
      learning_rates: peak learning rate of each stage; () = ``config.optimizer``'s.
    """
    return ml_collections.ConfigDict({"stages": (), "num_steps": (), "learning_rates": ()})


def stages(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.compression.stages`` (``()`` when the config has none), checked."""
    block = config.get("compression")
    names = tuple(block.stages) if block is not None else ()
    for i, name in enumerate(names):
        if name not in STAGES:
            raise ValueError(f"config.compression.stages[{i}]={name!r} is not a stage; "
                             f"allowed: {', '.join(STAGES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"config.compression.stages={list(names)} names a stage twice")
    if "quantize" in names and names[-1] != "quantize":
        raise ValueError(f"config.compression.stages={list(names)}: 'quantize' must be the "
                         "last stage (the integer export follows it)")
    for field in ("num_steps", "learning_rates"):
        values = tuple(block.get(field, ())) if block is not None else ()
        if values and len(values) != len(names):
            raise ValueError(f"config.compression.{field} has {len(values)} entries; it needs "
                             f"one per stage ({len(names)}) or none")
    return names


def stage_configs(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """``{stage: run config}`` in order: stage ``i`` switches on the methods of stages
    ``0..i`` and starts from stage ``i - 1`` (``init.method='copy'``, ``'stage:NAME'``)."""
    names = stages(config)
    out: dict[str, ml_collections.ConfigDict] = {}
    for i, name in enumerate(names):
        run = ml_collections.ConfigDict(config.to_dict())
        run.compression = default_compression_config()
        for j, earlier in enumerate(names):
            run[_BLOCK[earlier]].enabled = j <= i
        if "prune" in names[:i]:  # an earlier stage pruned: keep exactly its zeros
            run.pruning.from_zeros = True
            run.pruning.schedule = "one_shot"
            run.pruning.begin_step = 0
        if i:
            run.init.method = "copy"
            run.init.teacher_workdir = f"stage:{names[i - 1]}"
        if config.compression.num_steps:
            run.num_steps = int(config.compression.num_steps[i])
        if config.compression.learning_rates:
            run.optimizer.learning_rate = float(config.compression.learning_rates[i])
        out[name] = run
    return out


def run_pipeline(config: ml_collections.ConfigDict, workdir: str, *,
                 allow_config_change: bool = False) -> dict[str, Any]:
    """Runs (or resumes) every stage in ``workdir/<stage>``, checking the structure after
    each; writes and returns the summary of the last stage with a ``stages`` table."""
    from jaxkd import chain, train

    runs = stage_configs(config)
    done: list[str] = []
    rows, structures = {}, {}
    previous: dict[str, Any] | None = None
    summary: dict[str, Any] = {}
    for name, run in runs.items():
        run = chain.resolve_teacher(run, workdir, done, name)
        stage_dir = os.path.join(workdir, name)
        summary = metrics.read_summary(stage_dir)
        if summary is None:
            print(f"=== compression stage {name} -> {stage_dir}", flush=True)
            summary = train.train_and_evaluate(run, stage_dir,
                                               allow_config_change=allow_config_change)
        structure = measure(stage_dir, run)
        check(structure, previous, run, stage=name, earlier=done)
        print(f"structure after stage {name!r}: {describe(structure)}", flush=True)
        structures[name] = {**structure, "layers": {
            p: {k: v for k, v in layer.items() if k != "zeros"}
            for p, layer in structure["layers"].items()}}
        rows[name] = {k: summary.get(k) for k in ("method", "accuracy", "num_params",
                                                   "artifact_bytes")}
        previous = structure
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


def measure(workdir: str, run: ml_collections.ConfigDict) -> dict[str, Any]:
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
    if run.quantization.enabled:
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
          run: ml_collections.ConfigDict, *, stage: str, earlier: list[str]) -> None:
    """Raises :class:`StructureError` when ``stage`` broke an earlier stage's structure."""
    layers = structure["layers"]
    if previous is not None and "prune" in earlier:
        for p, before in previous["layers"].items():
            now = layers.get(p)
            if now is None:
                continue
            revived = np.setdiff1d(before["zeros"], now["zeros"]).size
            if revived:
                raise StructureError(
                    f"compression stage {stage!r} broke stage 'prune': layer {p!r} has "
                    f"{revived} nonzero weight(s) where the pruned model had zeros")
    if "cluster" in earlier or stage == "cluster":
        k = int(run.clustering.num_clusters)
        per_channel = run.clustering.granularity == "channel"
        selected = sharing.select_layers({p: {"kernel": w} for p, w in
                                          _kernels_of(layers).items()}, run.clustering)
        for p in selected:
            count = layers[p].get("distinct_nonzero_per_channel" if per_channel else
                                  "distinct_nonzero")
            if count is not None and count > k:
                raise StructureError(
                    f"compression stage {stage!r} broke stage 'cluster': layer {p!r} has "
                    f"{count} distinct nonzero values > config.clustering.num_clusters={k}")
        for p in selected if "integers" in structure else ():
            q = structure["integers"].get(p)
            if q is not None and q["distinct_per_channel"] > k + 1:
                raise StructureError(
                    f"compression stage {stage!r} broke stage 'cluster': the integer kernel "
                    f"of layer {p!r} has {q['distinct_per_channel']} distinct values in one "
                    f"output channel > num_clusters + 1 = {k + 1}")
    for p, q in structure.get("integers", {}).items():
        lo, hi = quant.int_range(q["bits"], symmetric=False)
        if q["min"] < lo or q["max"] > hi:
            raise StructureError(f"compression stage {stage!r}: the integer kernel of layer "
                                 f"{p!r} spans [{q['min']}, {q['max']}], outside the "
                                 f"{q['bits']}-bit range [{lo}, {hi}]")
    if stage == "prune" or "prune" in earlier:
        expected = pruning.validate(run.pruning, {p: {"kernel": np.zeros(s)} for p, s in
                                                  _shapes_of(layers).items()}).sparsity
        for p, want in expected.items():
            got = layers[p]["sparsity"]
            if got < want - 0.5 / layers[p]["shape"][-1] - 1e-6:  # rounding to whole units
                raise StructureError(f"compression stage {stage!r}: layer {p!r} has sparsity "
                                     f"{got:.4f} < config.pruning target {want:.4f}")


def _kernels_of(layers: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {p: np.zeros(v["shape"]) for p, v in layers.items()}


def _shapes_of(layers: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {p: tuple(v["shape"]) for p, v in layers.items()}


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
