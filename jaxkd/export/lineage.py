"""Where an exported model came from: its lineage, recorded beside the artifact's tensors.

Every artifact holds ``lineage.json`` (its size and sha256 in ``manifest.json``)::

    config_sha256     sha256 of the resolved run config (canonical JSON, sorted keys)
    dataset           the training inputs' spec (jaxkd.data.pipeline.TrainInputs.spec:
                      dataset, builder config, tfds version, splits and their sizes,
                      normalisation) and its sha256
    teachers          per teacher: its workdir, the sha256 of its artifact's manifest (which
                      pins every file of that artifact) and that artifact's own lineage
    init              the run whose weights this one started from (a copied init, i.e. the
                      previous compression stage, or a student initialised from a
                      teacher), as a teacher entry
    precomputed_logits the stored logits' manifest sha256 and the checkpoint they came from
    pretrained        the Hugging Face directory the weights started from
                      (``config.init.pretrained``) and the sha256 of its config.json and
                      model.safetensors
    jaxkd_version, packages   the versions of jaxkd, jax, jaxlib, flax, optax, orbax, numpy

The manifest is what ``python -m jaxkd.export sign`` signs (:mod:`jaxkd.export.signing`),
so a signature covers the lineage too. The lineage is provenance, not model: it is not
counted in the artifact's bytes (:func:`jaxkd.export.artifact.artifact_bytes`), where a
chain's nested lineage would otherwise outweigh a small compressed model.
``python -m jaxkd.export lineage DIR`` prints the chain back to the first teacher
(:func:`chain`).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jaxkd
from jaxkd import files
from jaxkd.export.artifact import MANIFEST, read_lineage, read_manifest

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def sha256_of_json(value: Any) -> str:
    """sha256 of ``value`` as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_sha256(artifact_dir: str) -> str:
    """sha256 of an artifact's ``manifest.json`` bytes: since the manifest lists the sha256
    of every file, this pins the whole artifact."""
    with open(os.path.join(artifact_dir, MANIFEST), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def packages() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def run_entry(workdir: str, artifact: str = "artifact") -> dict[str, Any]:
    """A finished run as a lineage entry: its workdir and, when it exported an artifact,
    the sha256 of that artifact's manifest and the artifact's own lineage. A teacher
    that is a file (a GGUF model) is its path and sha256."""
    if os.path.isfile(workdir):
        return {"file": os.path.abspath(workdir), "sha256": files.sha256(workdir)}
    entry: dict[str, Any] = {"workdir": os.path.abspath(workdir)}
    directory = os.path.join(workdir, artifact)
    if os.path.exists(os.path.join(directory, MANIFEST)):
        entry["artifact_sha256"] = manifest_sha256(directory)
        entry["lineage"] = read_lineage(directory)
    return entry


def of_run(config: Mapping[str, Any], dataset_spec: Mapping[str, Any], *,
           teachers: Sequence[str] = (), init: str | None = None,
           precomputed: Mapping[str, Any] | None = None, pretrained: str | None = None
           ) -> dict[str, Any]:
    """The lineage of a run about to export: its resolved ``config`` (a dict),
    ``dataset_spec`` (the training inputs' spec), the workdirs of its ``teachers`` and of
    the run its weights started from (``init``), and the manifest of its precomputed
    logits."""
    lineage: dict[str, Any] = {
        "config_sha256": sha256_of_json(config),
        "dataset": {"spec": dict(dataset_spec), "sha256": sha256_of_json(dataset_spec)},
        "teachers": [run_entry(t) for t in teachers],
        "init": run_entry(init) if init else None,
        "precomputed_logits": None,
        "jaxkd_version": jaxkd.__version__,
        "packages": packages(),
    }
    if pretrained is not None:
        lineage["pretrained"] = {"directory": os.path.abspath(pretrained), **{
            name: files.sha256(os.path.join(pretrained, name))
            for name in ("config.json", "model.safetensors")}}
    if precomputed is not None:
        lineage["precomputed_logits"] = {
            "manifest_sha256": sha256_of_json(precomputed),
            "teacher": {k: precomputed["teacher"].get(k)
                        for k in ("workdir", "step", "checkpoint_sha256", "file", "sha256")
                if k in precomputed["teacher"]}}
    return lineage


def chain(artifact_dir: str) -> list[str]:
    """Lines describing the artifact and, indented, every run it descends from: its
    teachers and the run it started from, recursively, back to runs that had neither."""
    manifest = read_manifest(artifact_dir)
    model = manifest["model"]
    lines = [f"{os.path.abspath(artifact_dir)}: {model['name']} "
             f"(manifest sha256 {manifest_sha256(artifact_dir)[:16]}...)"]

    def walk(lineage: Mapping[str, Any] | None, depth: int) -> None:
        if not lineage:
            lines.append("  " * depth + "(no lineage recorded)")
            return
        pad = "  " * depth
        spec = lineage.get("dataset", {}).get("spec", {})
        lines.append(f"{pad}trained on {spec.get('name')} {spec.get('train_split')} "
                     f"(dataset sha256 {lineage['dataset']['sha256'][:16]}...), config sha256 "
                     f"{lineage['config_sha256'][:16]}..., jaxkd {lineage['jaxkd_version']}")
        for role, entries in (("teacher", lineage.get("teachers") or []),
                              ("started from", [lineage["init"]] if lineage.get("init")
                               else [])):
            for entry in entries:
                sha = entry.get("artifact_sha256")
                lines.append(f"{pad}{role}: {entry['workdir']}"
                             + (f" (artifact sha256 {sha[:16]}...)" if sha else
                                " (no artifact)"))
                if sha:
                    walk(entry.get("lineage"), depth + 1)
        if lineage.get("pretrained"):
            hf = lineage["pretrained"]
            lines.append(f"{pad}started from pretrained {hf['directory']} (model.safetensors "
                         f"sha256 {hf['model.safetensors'][:16]}...)")
        logits = lineage.get("precomputed_logits")
        if logits:
            teacher = logits["teacher"]
            lines.append(f"{pad}precomputed logits of {teacher['workdir']} (checkpoint "
                         f"sha256 {str(teacher['checkpoint_sha256'])[:16]}...)")

    walk(read_lineage(artifact_dir), 1)
    return lines
