r"""Precomputed teacher logits: run a teacher over the training stream once, stream them back.

Offline distillation (as MaxText's, and the "top-k logits" of Tunix): the teacher's
forward pass is paid once, not at every student step, and only the ``k`` largest logits
of each example need be stored. :func:`write` runs a finished run's teacher in inference
mode over **the training stream's index space** (``config.data.train_split`` then
``transfer_split``, in index order, see :class:`jaxkd.data.pipeline.TrainInputs`),
**without augmentation** (the training normalisation only), and writes::

    OUT/manifest.json
    OUT/logits-00000-of-00003.array_record   # examples [0, chunk_size)
    OUT/logits-00001-of-00003.array_record   # examples [chunk_size, 2 chunk_size) ...

Record ``j`` of chunk ``c`` belongs to example ``c * chunk_size + j``. A record is one
packed little-endian struct, read with ``np.frombuffer`` (no pickle, no header)::

    fingerprint  uint64        blake2b-64 of the example's raw bytes, as the source reads
                               them (before normalisation and augmentation)
    values       dtype[k]      the teacher's logits: all C of them (top_k = 0), else the
                               k largest, in decreasing order (ties: lower class first)
    indices      int32[k]      their classes (top-k only; full logits are classes 0..C-1)
    residual     float32       top-k only: the teacher's probability mass outside its top
                               k at the manifest's ``temperature``, ``1 - sum softmax(z /
                               T)[top-k]`` (the residual bucket of ``topk_soft_target_kl``)

so a record takes ``8 + k * itemsize(dtype)`` bytes for full logits (``k = C``) and
``12 + k * (itemsize(dtype) + 4)`` for top-k; with ``C = 10`` and float16 that is 28 bytes
full and 30 bytes for ``k = 3`` (``C = 1000``, ``k = 10``: 2008 against 72). The files
are uncompressed array_record with groups of about :data:`GROUP_BYTES`, so a random read
decodes one small group; every file also carries up to 128 KiB of riegeli block padding
and index, which :func:`bytes_per_example` includes.

``manifest.json`` says what the logits are of: ``format_version``; ``inputs``, the spec
of the training inputs (dataset ``name``, resolved ``builder_config``, tfds ``version``,
``train_split`` / ``transfer_split`` with their example counts, ``input_shape``,
``image_size``, the normalisation ``mean`` / ``std``); ``count``; ``teacher`` (workdir,
checkpoint step, ``checkpoint_sha256`` of the checkpoint's files, model); ``top_k`` (0 =
full), ``k``, ``dtype``, ``temperature`` (of the residual; None for full logits),
``num_classes``; ``record`` (bytes and fields); ``chunk_size``
and ``chunks`` (file, first example, count, bytes, sha256); ``complete``.

**Resumable**: the manifest is written first; each chunk is written to ``NAME.tmp``,
synced, then atomically renamed, so a file with a final name is always whole. A relaunch
after a kill (same teacher, data and options, else it refuses naming the field) removes
stale ``.tmp`` files, skips the finished chunks and writes the rest; batches are formed
from each chunk's start, so the result is byte-identical to an uninterrupted write.

**Reading**: :func:`check` compares a manifest with ``config.data`` and fails in one line
naming the field and both values; it refuses ``config.data.augment != 'none'`` unless
allowed, since the stored logits saw un-augmented inputs. :class:`StoredLogits` serves
``jaxkd.data.pipeline.train_batches(..., teacher_logits=OUT)``.

Command line::

    python -m jaxkd.teacher_logits --teacher_workdir=runs/mnist1d_teacher \
        --out=runs/mnist1d_teacher/logits_top3 --top_k=3 --transfer_split=unlabelled

takes ``config.data`` from the teacher's ``config.json`` (or from ``--config=configs/x.py``,
with ``--config.data.<field>=`` overrides; ``--transfer_split``, ``--train_split`` and
``--data_dir`` override either) and prints the bytes per example on disk. MNIST-1D's
24,000 examples take about 3 s (plus 4 s of imports) on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
from array_record.python import array_record_module

from jaxkd import checkpoint, files, multihost, partitioning, schema, teachers
from jaxkd.config import MESH_AXES, Mesh
from jaxkd.data import pipeline, sources
from jaxkd.schema import ConfigError, MissingError

FORMAT_VERSION = 2
MANIFEST_FILE = "manifest.json"
CHUNK_SIZE = 65536  # examples per array_record file, the unit of resumption
GROUP_BYTES = 4096  # records per array_record group: about this many bytes
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
}
_READ_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # random access
# The manifest fields a relaunch of write() must agree on (the rest is filled as it goes).
_IDENTITY = ("format_version", "inputs", "count", "teacher.step", "teacher.checkpoint_sha256",
             "top_k", "k", "dtype", "temperature", "num_classes", "record", "chunk_size")
# Names of the `inputs` spec fields, in the user's vocabulary.
_INPUT_FIELDS = {
    "name": "config.data.name",
    "builder_config": "config.data.builder_config",
    "version": "the tfds dataset version",
    "train_split": "config.data.train_split",
    "train_examples": "the number of examples in config.data.train_split",
    "transfer_split": "config.data.transfer_split",
    "transfer_examples": "the number of examples in config.data.transfer_split",
    "input_shape": "the input shape",
    "image_size": "config.data.image_size",
    "mean": "the normalisation mean",
    "std": "the normalisation std",
    "drop_labels": "config.data.drop_labels",
}


def record_dtype(k: int, dtype: str, *, with_indices: bool) -> np.dtype:
    """The packed struct of one record: fingerprint, ``k`` values, and for top-k ``k`` int32
    indices and the float32 residual mass."""
    fields = [("fingerprint", "<u8"), ("values", DTYPES[dtype], (k,))]
    if with_indices:
        fields += [("indices", "<i4", (k,)), ("residual", "<f4")]
    return np.dtype(fields)


def fingerprints(images: np.ndarray) -> np.ndarray:
    """blake2b-64 of each example's bytes, as uint64 ``[n]`` (``images``: ``[n, ...]``)."""
    rows = np.ascontiguousarray(images).reshape(len(images), -1)
    digests = b"".join(hashlib.blake2b(row.data, digest_size=8).digest() for row in rows)
    return np.frombuffer(digests, "<u8")


def checkpoint_sha256(directory: str) -> str:
    """sha256 of every file of a checkpoint step, as ``sha256sum`` would list them.

    The digest of the lines ``"<sha256 of file>  <relative path>\\n"`` sorted by path, i.e.
    ``(cd DIR && find . -type f ! -name jaxkd_sha256.json -printf '%P\\n' | LC_ALL=C sort |
    xargs sha256sum) | sha256sum``; the trainer's seal file (:data:`checkpoint.SEAL_FILE`,
    itself a list of these hashes, added once the step is finished) is left out.
    """
    hashes = checkpoint.file_hashes(directory)
    listing = hashlib.sha256()
    for path in sorted(hashes, key=os.fsencode):
        listing.update(f"{hashes[path]}  {path}\n".encode())
    return listing.hexdigest()


def write(teacher_workdir: str, data: ml_collections.ConfigDict, out_dir: str, *,
          top_k: int = 0, dtype: str = "float16", temperature: float = 1.0,
          batch_size: int = 500, chunk_size: int = CHUNK_SIZE,
          mesh: ml_collections.ConfigDict | dict | None = None) -> dict[str, Any]:
    """Writes (or finishes writing) the teacher's logits on ``data``'s training stream.

    With several processes (``jax.distributed``) every process writes its share of the
    chunks (chunk ``c`` is process ``c mod P``'s), each on its own devices (a mesh over
    them laid out by ``mesh``, ``config.mesh``'s fields: ``{'fsdp': -1}`` splits the
    teacher over them), and the leader writes the one manifest; ``out_dir`` must be on a
    file system that every process sees.

    Args:
      teacher_workdir: a finished run; its newest checkpoint is the teacher.
      data: the ``config.data`` of the runs that will read the logits.
      out_dir: where the chunks and ``manifest.json`` go; created, or resumed when it
        holds an unfinished write of the same teacher, data and options.
      top_k: how many of the largest logits to keep; 0 keeps all ``num_classes``.
      dtype: ``'float32'``, ``'float16'`` or ``'bfloat16'``, the stored values' type.
      batch_size: examples per teacher forward pass (a multiple of the device count).
      chunk_size: examples per array_record file.
      mesh: ``config.mesh`` fields of each process's mesh (None: data parallel).

    Returns:
      The manifest (module docstring).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not supported; allowed: {', '.join(DTYPES)}")
    if not temperature > 0:
        raise ConfigError(f"temperature={temperature} must be > 0")
    if top_k < 0 or batch_size <= 0 or chunk_size <= 0:
        raise ConfigError(f"top_k={top_k} must be >= 0, batch_size={batch_size} and "
                         f"chunk_size={chunk_size} > 0")
    settings = schema.build(Mesh, dict(mesh or {}), where="mesh")
    local, shape = jax.local_devices(), None
    try:
        shape = partitioning.mesh_shape(settings, len(local))
    except schema.FieldError as e:
        raise ConfigError(f"{e} (the {len(local)} devices of each process)") from None
    if batch_size % (shape[0] * shape[1]):
        raise ConfigError(f"batch_size={batch_size} must be a multiple of data x fsdp = "
                          f"{shape[0] * shape[1]} (each process's devices)")
    step = checkpoint.latest_step(teacher_workdir)
    if step is None:
        raise MissingError(f"teacher_workdir={teacher_workdir!r} has no checkpoint: "
                                "train the teacher first")
    model = files.read_json(os.path.join(teacher_workdir, checkpoint.MODEL_FILE))
    teacher = _local_teacher(teacher_workdir, model["name"], settings, shape, local)
    layout = partitioning.layout(teacher.mesh, settings, model["name"])
    sharded = layout.batch
    inputs = pipeline.train_inputs(data)
    info = pipeline.get_info(data)
    if (model["num_classes"], tuple(model["input_shape"])) != (info.num_classes,
                                                               info.input_shape):
        raise ConfigError(
            f"the teacher at {teacher_workdir!r} takes inputs {tuple(model['input_shape'])} "
            f"to {model['num_classes']} classes but config.data.name={data.name!r} has "
            f"inputs {info.input_shape} and {info.num_classes} classes")
    num_classes = info.num_classes
    if top_k > num_classes:
        raise ConfigError(f"top_k={top_k} exceeds the {num_classes} classes of {data.name}")
    k = top_k or num_classes
    records = record_dtype(k, dtype, with_indices=bool(top_k))
    count = len(inputs.source)
    num_chunks = -(-count // chunk_size)
    manifest = {
        "format_version": FORMAT_VERSION,
        "inputs": inputs.spec,
        "count": count,
        "teacher": {
            "workdir": os.path.abspath(teacher_workdir),
            "step": step,
            "checkpoint_sha256": checkpoint_sha256(
                os.path.join(teacher_workdir, checkpoint.CHECKPOINT_DIR, str(step))),
            "model": model,
        },
        "top_k": top_k,
        "k": k,
        "dtype": dtype,
        "temperature": float(temperature) if top_k else None,
        "num_classes": num_classes,
        "record": {"bytes": records.itemsize, "byte_order": "little",
                   "fields": [["fingerprint", "uint64", 1], ["values", dtype, k]]
                   + ([["indices", "int32", k], ["residual", "float32", 1]] if top_k else []),
                   "fingerprint": "blake2b-64 of the raw example bytes"},
        "chunk_size": chunk_size,
        "chunks": [{"file": f"logits-{c:05d}-of-{num_chunks:05d}.array_record",
                    "start": c * chunk_size, "count": min(chunk_size, count - c * chunk_size)}
                   for c in range(num_chunks)],
        "complete": False,
    }
    if multihost.is_leader():
        _start_or_resume(out_dir, manifest)
    multihost.sync("jaxkd teacher_logits start")

    forward = jax.jit(_forward_fn(teacher.model, top_k, temperature, layout.gather))
    group_size = max(1, GROUP_BYTES // records.itemsize)
    for c, chunk in enumerate(manifest["chunks"]):
        path = os.path.join(out_dir, chunk["file"])
        if c % jax.process_count() != jax.process_index() or os.path.exists(path):
            continue  # another process's chunk, or written before a kill
        start_time = time.perf_counter()
        values = _chunk_records(forward, teacher.variables, inputs, chunk, records,
                                batch_size=batch_size, sharding=sharded)
        write_chunk(path, values, group_size)
        print(f"{chunk['file']}: {chunk['count']} examples, "
              f"{chunk['count'] / (time.perf_counter() - start_time):.0f} examples/s"
              + (f" (process {jax.process_index()})" if jax.process_count() > 1 else ""),
              flush=True)
    multihost.sync("jaxkd teacher_logits chunks")
    if multihost.is_leader():
        for chunk in manifest["chunks"]:
            path = os.path.join(out_dir, chunk["file"])
            chunk.update(bytes=os.path.getsize(path), sha256=files.sha256(path))
        manifest["complete"] = True
        files.write_json(os.path.join(out_dir, MANIFEST_FILE), manifest)
    return multihost.broadcast_json(manifest)


@dataclasses.dataclass(frozen=True)
class _Local:
    model: Any
    variables: Any
    mesh: jax.sharding.Mesh


def _local_teacher(workdir: str, name: str, settings: Mesh, shape: tuple[int, ...],
                   local: list) -> _Local:
    """The teacher on this process's devices: read by every process as the trainer reads
    teachers (laid out on the mesh of all devices), gathered whole into host memory, then
    laid out on a mesh of the local devices."""
    mesh = jax.make_mesh(shape, MESH_AXES, devices=local,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    if jax.process_count() == 1:
        teacher = teachers.load(workdir, layout_of=lambda n: partitioning.layout(
            mesh, settings, n), field="teacher_workdir")
        return _Local(teacher.model, teacher.variables, mesh)
    everywhere = jax.make_mesh((jax.device_count(), 1, 1), MESH_AXES,
                               axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
    teacher = teachers.load(workdir, layout_of=lambda n: partitioning.layout(
        everywhere, Mesh(), n), field="teacher_workdir")
    host = jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), teacher.variables)
    layout = partitioning.layout(mesh, settings, name)
    return _Local(teacher.model, jax.device_put(host, layout.params(host)), mesh)


def check(out_dir: str, data: ml_collections.ConfigDict, *, allow_augment: bool = False,
          verify_checksums: bool = True) -> dict[str, Any]:
    """The manifest of ``out_dir`` if its logits fit ``data``; else a one-line error.

    Fails naming the field and both values when the dataset, builder config, version,
    splits, their sizes or the preprocessing differ; on ``data.augment != 'none'`` unless
    ``allow_augment``; and naming the file when the manifest or a chunk is missing,
    unfinished, truncated or (``verify_checksums``: sha256) corrupt.
    """
    manifest = _read_manifest(out_dir)
    path = os.path.join(out_dir, MANIFEST_FILE)
    if data.augment != "none" and not allow_augment:
        raise ConfigError(
            f"config.data.augment={data.augment!r}: the stored logits in {out_dir} saw "
            "un-augmented inputs; set config.distill.allow_augment_with_precomputed=True to "
            "use them anyway")
    spec = pipeline.train_inputs(data).spec
    for key in list(manifest["inputs"]) + [k for k in spec if k not in manifest["inputs"]]:
        stored, current = manifest["inputs"].get(key), spec.get(key)
        if stored != current:
            raise ConfigError(
                f"{_INPUT_FIELDS.get(key, key)}: the teacher logits in {path} were written "
                f"for {stored!r}, config.data gives {current!r}")
    if not manifest["complete"]:
        missing = [c["file"] for c in manifest["chunks"]
                   if not os.path.exists(os.path.join(out_dir, c["file"]))]
        raise ConfigError(
            f"{path}: an unfinished write ({len(missing)} of {len(manifest['chunks'])} "
            f"chunks missing, the first {os.path.join(out_dir, (missing or ['none'])[0])}): "
            "rerun python -m jaxkd.teacher_logits with the same arguments to finish it")
    for chunk in manifest["chunks"]:
        chunk_path = os.path.join(out_dir, chunk["file"])
        if not os.path.exists(chunk_path):
            raise MissingError(f"{chunk_path} is missing: rewrite the teacher logits")
        if os.path.getsize(chunk_path) != chunk["bytes"]:
            raise ConfigError(f"{chunk_path} has {os.path.getsize(chunk_path)} bytes, "
                             f"{path} says {chunk['bytes']}: truncated or corrupt")
        if verify_checksums and files.sha256(chunk_path) != chunk["sha256"]:
            raise ConfigError(f"{chunk_path}: its sha256 differs from {path}'s: corrupt")
    return manifest


def check_terms(manifest: dict[str, Any], terms: Sequence[Any], *, num_classes: int,
                where: str) -> None:
    """The objective's terms must be able to use the stored logits: no feature terms, and
    with top-k < C only top-k terms."""
    k = int(manifest["k"]) or num_classes
    for term in terms:
        if term.kind == "topk" and manifest["top_k"] and term.kwargs.get("residual", True):
            temperature = float(term.kwargs.get("temperature", 1.0))
            if temperature != manifest["temperature"] or term.temperature_end is not None:
                raise ConfigError(
                    f"config.distill.losses.{term.label}: the residual mass in {where} was "
                    f"stored at temperature {manifest['temperature']}, the term distils at "
                    f"{temperature}{' with a schedule' if term.temperature_end else ''}; write "
                    f"the logits with --temperature={temperature} or set kwargs.residual=False")
        if term.kind in ("features", "batch"):
            raise ConfigError(f"config.distill.losses.{term.label} ({term.name}) needs teacher "
                              "features, which precomputed logits do not have")
        if k < num_classes and term.kind in ("logits", "logits_labels"):
            raise ConfigError(
                f"config.distill.losses.{term.label} ({term.name}) needs all {num_classes} "
                f"teacher logits but {where} stores the top {k}; use topk_soft_target_kl")


def stream(out_dir: str, data: Any) -> Callable[[sources.Source],
                                                Callable[[np.ndarray, np.ndarray], dict]]:
    """The ``extra_fields`` of :func:`jaxkd.data.pipeline.train_batches` that stream the
    logits of ``out_dir`` next to each batch: given the training source, a function of the
    examples' stream indices and raw images. With ``data.in_memory`` every fingerprint is
    checked once, up front; otherwise each batch's are checked as it is read."""

    def fields_for(source: sources.Source) -> Callable[[np.ndarray, np.ndarray], dict]:
        stored = StoredLogits.open(out_dir, data, in_memory=data.in_memory)
        if data.in_memory:
            stored.verify(np.arange(len(source)), source.images)
            return lambda indices, images: stored.batch_fields(indices)
        return stored.batch_fields

    return fields_for


def bytes_per_example(out_dir: str) -> float:
    """Bytes on disk of ``out_dir``'s logits (chunks and manifest) per stored example."""
    manifest = _read_manifest(out_dir)
    files = [MANIFEST_FILE] + [c["file"] for c in manifest["chunks"]]
    return sum(os.path.getsize(os.path.join(out_dir, f)) for f in files) / manifest["count"]


class StoredLogits:
    """The records of a written ``out_dir``, read by example index.

    Held in memory (one array of records) or read from the array_record files, one
    batched read per chunk touched; safe to call from several threads.
    """

    def __init__(self, out_dir: str, manifest: dict[str, Any], *, in_memory: bool):
        self.out_dir = out_dir
        self.manifest = manifest
        self.top_k, self.k = manifest["top_k"], manifest["k"]
        self.chunk_size = manifest["chunk_size"]
        self.dtype = record_dtype(self.k, manifest["dtype"], with_indices=bool(self.top_k))
        self._classes = np.arange(self.k, dtype=np.int32)
        self._readers = [array_record_module.ArrayRecordReader(
            os.path.join(out_dir, c["file"]), _READ_OPTIONS) for c in manifest["chunks"]]
        self._records = None
        if in_memory:
            self._records = np.concatenate([
                np.frombuffer(b"".join(reader.read_all()), self.dtype)
                for reader in self._readers])
            for reader in self._readers:
                reader.close()
            self._readers = []

    @classmethod
    def open(cls, out_dir: str, data: ml_collections.ConfigDict, *, in_memory: bool
             ) -> StoredLogits:
        """Checks ``out_dir`` against ``data`` (sizes, not checksums; any augmentation)."""
        manifest = check(out_dir, data, allow_augment=True, verify_checksums=False)
        return cls(out_dir, manifest, in_memory=in_memory)

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The records (:func:`record_dtype`) of examples ``indices``, ``[n]``."""
        indices = np.asarray(indices)
        if self._records is not None:
            return self._records[indices]
        return read_records(self._readers, indices, self.chunk_size, self.dtype)

    def verify(self, indices: np.ndarray, images: np.ndarray,
               records: np.ndarray | None = None) -> None:
        """Fails if the raw ``images`` of ``indices`` are not those the logits were of."""
        stored = (self.read(indices) if records is None else records)["fingerprint"]
        bad = np.flatnonzero(fingerprints(images) != stored)
        if len(bad):
            raise ConfigError(
                f"the teacher logits in {self.out_dir} of example {int(indices[bad[0]])} (and "
                f"{len(bad) - 1} more) were computed for another input: the dataset changed "
                "since they were written; write them again")

    def batch_fields(self, indices: np.ndarray, images: np.ndarray | None = None
                     ) -> dict[str, np.ndarray]:
        """``teacher_topk_logits`` float32 and ``teacher_topk_indices`` int32 ``[n, k]``, and
        for top-k ``teacher_topk_residual`` float32 ``[n]`` (the mass outside the top k).

        ``images``: the raw examples of ``indices``, to check their fingerprints.
        """
        records = self.read(indices)
        if images is not None:
            self.verify(indices, images, records)
        fields = {"teacher_topk_logits": records["values"].astype(np.float32)}
        if self.top_k:
            fields["teacher_topk_indices"] = records["indices"].astype(np.int32)
            fields["teacher_topk_residual"] = records["residual"].astype(np.float32)
        else:
            fields["teacher_topk_indices"] = np.broadcast_to(
                self._classes, (len(indices), self.k)).copy()
        return fields


def read_records(readers: Sequence[Any], indices: np.ndarray, chunk_size: int,
                 dtype: np.dtype) -> np.ndarray:
    """Records ``indices`` of chunked array_record files (record ``j`` of file ``c`` is
    ``c * chunk_size + j``) as ``dtype`` structs ``[n]``: one batched read per file."""
    out = np.empty(len(indices), dtype)
    chunk_of = indices // chunk_size
    for chunk in np.unique(chunk_of):
        rows = np.flatnonzero(chunk_of == chunk)
        positions = (indices[rows] - chunk * chunk_size).tolist()
        out[rows] = np.frombuffer(b"".join(readers[chunk].read(positions)), dtype)
    return out


def _forward_fn(model: Any, top_k: int, temperature: float,
                gather: Callable[[Any], Any] = lambda tree: tree
                ) -> Callable[[Any, jax.Array], tuple[jax.Array, ...]]:
    def forward(variables, images):
        logits = model.apply(gather(variables), images, train=False).astype(np.float32)
        if not top_k:
            return (logits,)
        values, indices = jax.lax.top_k(logits, top_k)
        # The teacher's mass outside its top-k at `temperature`: 1 - sum softmax(z / T)[top].
        residual = -jnp.expm1(jax.nn.logsumexp(values / temperature, -1)
                              - jax.nn.logsumexp(logits / temperature, -1))
        return values, indices, residual

    return forward


def _chunk_records(forward: Callable, variables: Any, inputs: pipeline.TrainInputs,
                   chunk: dict[str, int], records: np.dtype, *, batch_size: int,
                   sharding: jax.sharding.NamedSharding) -> np.ndarray:
    """The records of one chunk: batches from the chunk's start, read ahead by grain."""
    start, count = chunk["start"], chunk["count"]

    def read(batch: int) -> tuple[np.ndarray, np.ndarray]:
        index = np.arange(start + batch * batch_size, min(start + (batch + 1) * batch_size,
                                                          start + count))
        raw, _ = inputs.source.read(index)
        images = np.zeros((batch_size,) + raw.shape[1:], np.float32)
        images[:len(index)] = inputs.normalise(raw)
        return fingerprints(raw), images

    batches = grain.MapDataset.range(-(-count // batch_size)).map(read).to_iter_dataset(
        grain.ReadOptions(num_threads=pipeline.NUM_THREADS,
                          prefetch_buffer_size=pipeline.PREFETCH_BATCHES))
    out = np.empty(count, records)
    pending = []  # dispatched forward passes: the device runs while the host reads
    for batch, (digests, images) in enumerate(batches):
        rows = slice(batch * batch_size, batch * batch_size + len(digests))
        out["fingerprint"][rows] = digests
        pending.append((rows, forward(variables, jax.device_put(images, sharding))))
    for rows, result in pending:
        result = jax.device_get(result)
        n = rows.stop - rows.start
        out["values"][rows] = result[0][:n].astype(records["values"].base)
        if len(result) > 1:
            out["indices"][rows] = result[1][:n]
            out["residual"][rows] = result[2][:n]
    return out


def write_chunk(path: str, records: np.ndarray, group_size: int) -> None:
    """Writes ``records`` as ``path`` so that no half-written file ever has that name."""
    tmp = path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, f"group_size:{group_size},uncompressed")
    data, size = records.tobytes(), records.dtype.itemsize
    for offset in range(0, len(data), size):
        writer.write(data[offset:offset + size])
    writer.close()
    fsync(tmp)
    os.replace(tmp, path)
    fsync(os.path.dirname(path) or ".")


def _start_or_resume(out_dir: str, manifest: dict[str, Any]) -> None:
    """Creates ``out_dir`` with ``manifest``, or checks that it continues the same write."""
    path = os.path.join(out_dir, MANIFEST_FILE)
    if os.path.exists(path):
        existing = _read_manifest(out_dir)
        for field in _IDENTITY:
            ours, theirs = _get(manifest, field), _get(existing, field)
            if ours != theirs:
                difference = first_difference(field, theirs, ours)
                raise ConfigError(f"{path} belongs to other teacher logits: {difference}; "
                                 "choose another output directory")
        for stale in glob.glob(os.path.join(out_dir, "*.tmp")):
            os.remove(stale)
        return
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"{out_dir} is not empty and holds no {MANIFEST_FILE}: choose an "
                         "empty or new output directory")
    os.makedirs(out_dir, exist_ok=True)
    files.write_json(path, manifest)


def first_difference(field: str, theirs: Any, ours: Any) -> str:
    """``'field.sub: a there, b here'`` for the first nested key where two values differ."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for key in list(theirs) + [k for k in ours if k not in theirs]:
            if theirs.get(key) != ours.get(key):
                return first_difference(f"{field}.{key}", theirs.get(key), ours.get(key))
    return f"{field} is {theirs!r} there, {ours!r} here"


def _get(manifest: dict[str, Any], field: str) -> Any:
    for key in field.split("."):
        manifest = manifest.get(key) if isinstance(manifest, dict) else None
    return manifest


def _read_manifest(out_dir: str) -> dict[str, Any]:
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        raise MissingError(f"{path} does not exist: write the teacher logits with "
                                "python -m jaxkd.teacher_logits first")
    try:
        with open(path) as f:
            manifest = json.load(f)
        required = ("format_version", "inputs", "count", "top_k", "k", "dtype", "chunk_size",
                    "chunks", "complete")
        missing = [key for key in required if key not in manifest]
        if missing:
            raise ConfigError(f"no {missing[0]!r} field")
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{path} is corrupt ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}): write the logits again") from e
    if manifest["format_version"] != FORMAT_VERSION:
        raise ConfigError(f"{path} has format_version {manifest['format_version']}; this "
                         f"jaxkd reads {FORMAT_VERSION}")
    return manifest


def fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def parser() -> argparse.ArgumentParser:
    """The command line's flags (``python -m jaxkd.teacher_logits --help``)."""
    p = argparse.ArgumentParser(
        prog="python -m jaxkd.teacher_logits", allow_abbrev=False, add_help=False,
        description="Runs a finished run's model over the training stream once and writes "
                    "its logits (all, or the top k) for precomputed distillation.",
        epilog="config.data comes from the teacher's config.json, or from --config (with "
               "--config.data.<field>=<value> overrides). Train on the result with "
               "--config.distill.teacher_logits=OUT.")
    p.add_argument("-h", "--help", "--helpshort", "--helpfull", action="help",
                   help="print this help and exit")
    p.add_argument("--teacher_workdir", required=True,
                   help="a finished run whose model is the teacher")
    p.add_argument("--out", required=True,
                   help="output directory (resumed if it holds a partial write)")
    p.add_argument("--top_k", type=int, default=0,
                   help="keep the k largest logits; 0 keeps all of them")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="the temperature of the stored residual mass (top-k only): the "
                        "distillation's")
    p.add_argument("--dtype", default="float16", choices=list(DTYPES),
                   help="type of the stored values")
    p.add_argument("--batch_size", type=int, default=500, help="examples per forward pass")
    p.add_argument("--chunk_size", type=int, default=CHUNK_SIZE,
                   help="examples per array_record file")
    p.add_argument("--config", default=None, metavar="PATH[:ARG]",
                   help="a run config whose data block to use instead of the teacher's")
    for field in ("transfer_split", "train_split", "data_dir"):
        p.add_argument(f"--{field}", default=None, help=f"overrides config.data.{field}")
    multihost.add_arguments(p)  # every process writes its share of the chunks
    p.error = lambda message: _usage_error(message)  # type: ignore[method-assign]
    return p


def _usage_error(message: str) -> None:
    print(f"jaxkd: error: {message} (see python -m jaxkd.teacher_logits --help)",
          file=sys.stderr)
    sys.exit(2)


def main(argv: Sequence[str]) -> int:
    """The command line (module docstring); one-line errors on stderr, exit status 2."""
    from jaxkd import configfile

    try:
        overrides, rest = configfile.split_overrides(argv)
    except ConfigError as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 2
    args = parser().parse_args(rest)
    multihost.initialize(args)
    try:
        mesh = None  # each process's devices: --config's config.mesh, else data parallel
        if not os.path.isdir(args.teacher_workdir):
            raise MissingError(f"--teacher_workdir={args.teacher_workdir!r} does not exist")
        if args.config:
            config = configfile.load(args.config)
            configfile.apply(config, overrides)
            data, mesh = config.data, config.get("mesh")
        else:
            if overrides:
                raise ConfigError(f"{overrides[0][0]}: --config.<field> overrides need "
                                  "--config=PATH")
            data = checkpoint.read_config(args.teacher_workdir).data
        data = ml_collections.ConfigDict(data.to_dict())
        for field in ("transfer_split", "train_split", "data_dir"):
            if getattr(args, field) is not None:
                data[field] = getattr(args, field)
        manifest = write(args.teacher_workdir, data, args.out, top_k=args.top_k,
                         dtype=args.dtype, temperature=args.temperature,
                         batch_size=args.batch_size, chunk_size=args.chunk_size,
                         mesh=mesh.to_dict() if mesh is not None else None)
    except ConfigError as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 2
    kind = f"top-{manifest['top_k']}" if manifest["top_k"] else "full"
    if not multihost.is_leader():
        return 0
    print(f"wrote {kind} {manifest['dtype']} logits of {manifest['count']} examples to "
          f"{args.out}: {bytes_per_example(args.out):.2f} bytes per example on disk "
          f"({manifest['record']['bytes']} bytes per record)", flush=True)
    return 0


if __name__ == "__main__":
    from absl import flags, logging

    flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.WARNING)
    sys.exit(main(sys.argv[1:]))
