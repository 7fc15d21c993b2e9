r"""Precomputed top-k teacher logits for language-model windows: offline LM distillation.

A causal LM's teacher is the costly half of every distillation step (Gemma 3 270M's head
alone is 640 x 262,144 multiply-adds per token). :func:`write` runs it once over the
training stream's windows (``config.data.task='causal_lm'``: the train split then the
transfer split, in index order, :func:`jaxkd.data.pipeline.train_inputs`) and keeps, per
token, its ``k`` largest logits, their token ids and the probability mass outside them at
``temperature`` (the residual bucket of :func:`jaxkd.losses.topk_soft_target_kl`)::

    OUT/manifest.json
    OUT/logits-00000-of-00002.array_record    # windows [0, chunk_size) ...

Record ``j`` of chunk ``c`` is window ``c * chunk_size + j``, one packed little-endian
struct (``np.frombuffer``, no pickle), ``L = config.data.max_length``::

    fingerprint  uint64          blake2b-64 of the window's token ids (int32, real tokens)
    values       dtype[L, k]     the teacher's k largest logits at each position, in
                                 decreasing order (0 past the window's end)
    indices      int32[L, k]     their token ids
    residual     float32[L]      1 - sum softmax(z / T)[top k]

``k = 64``, float16: ``8 + L (64 * 6 + 4)`` bytes, 388 per token against the 1 MiB of a
float32 row of 262,144 logits. The teacher's logits are formed ``chunk_tokens`` tokens at a
time (:func:`topk_of_hidden`), never ``[B, L, V]``.

``manifest.json``: ``format`` (``'jaxkd.sequence_logits'``) and ``format_version``;
``inputs`` (the training stream's spec: dataset, splits and their counts, tokenizer
sha256, ``max_length``, task); ``token_ids_sha256``, the sha256 of every window's token
ids in order (the data they are of, fingerprinted whole); ``count``; ``teacher`` (a GGUF
file's path and sha256, or a run's workdir, step and ``checkpoint_sha256``); ``top_k``,
``dtype``, ``temperature``, ``length``, ``vocab_size``; ``chunk_size`` and ``chunks``
(file, first window, count, bytes, sha256); ``complete``. Resumable like
:mod:`jaxkd.teacher_logits`: finished chunks are whole files, a relaunch writes the rest.

**Reading** (``config.distill.teacher_logits=OUT`` in a causal LM run): :func:`check`
refuses, in one line, logits of other data (``inputs`` or ``token_ids_sha256`` differ:
another tokenizer, length or split), and every batch's windows are checked against their
records' fingerprints; the term ``token_topk_kd`` (:mod:`jaxkd.objective`) compares the
student with them through :func:`jaxkd.token_kd.topk_token_losses`.

Command line::

    python -m jaxkd.sequence_logits --config=configs/bbc_lm_gemma.py --out=runs/gemma_top64 \
        --top_k=64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from array_record.python import array_record_module

from jaxkd import files, teacher_logits, teachers, token_kd
from jaxkd.data import pipeline, text
from jaxkd.schema import ConfigError, MissingError

FORMAT = "jaxkd.sequence_logits"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
CHUNK_SIZE = 4096  # windows per array_record file, the unit of resumption
_READ_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"
_IDENTITY = ("format", "format_version", "inputs", "token_ids_sha256", "count", "teacher",
             "top_k", "dtype", "temperature", "length", "vocab_size", "chunk_size")


def record_dtype(length: int, k: int, dtype: str) -> np.dtype:
    """The packed struct of one window's record (module docstring)."""
    return np.dtype([("fingerprint", "<u8"), ("values", teacher_logits.DTYPES[dtype],
                                                (length, k)),
                     ("indices", "<i4", (length, k)), ("residual", "<f4", (length,))])


def window_fingerprints(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """blake2b-64 of each window's real token ids as int32, uint64 ``[n]``."""
    digests = b"".join(hashlib.blake2b(np.ascontiguousarray(row[m != 0], "<i4").data,
                                       digest_size=8).digest()
                       for row, m in zip(ids, mask, strict=True))
    return np.frombuffer(digests, "<u8")


def token_ids_sha256(windows: text.TokenizedText) -> str:
    """sha256 of every window's token ids (int32, in order) and of their lengths."""
    digest = hashlib.sha256(np.ascontiguousarray(windows.ids, "<i4").data)
    digest.update(np.ascontiguousarray(windows.offsets, "<i8").data)
    return digest.hexdigest()


def topk_of_hidden(hidden: jax.Array, head: Callable[[jax.Array], jax.Array], k: int,
                   temperature: float, chunk_tokens: int = 256
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(values [B, L, k], ids [B, L, k], residual [B, L])`` of the logits ``head(hidden)``,
    computed ``chunk_tokens`` tokens at a time (``lax.map``)."""
    b, length, d = hidden.shape
    n = b * length
    chunk = min(chunk_tokens, n)
    pad = -n % chunk
    flat = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)

    def one(h):
        z = head(h).astype(jnp.float32)
        values, ids = jax.lax.top_k(z, k)
        residual = -jnp.expm1(jax.nn.logsumexp(values / temperature, -1)
                              - jax.nn.logsumexp(z / temperature, -1))
        return values, ids, jnp.maximum(residual, 0.0)

    values, ids, residual = jax.lax.map(one, flat)
    return (values.reshape(-1, k)[:n].reshape(b, length, k),
            ids.reshape(-1, k)[:n].reshape(b, length, k), residual.reshape(-1)[:n].reshape(
                b, length))


def _teacher_entry(teacher: teachers.Teacher) -> dict[str, Any]:
    if os.path.isfile(teacher.workdir):
        return {"file": os.path.abspath(teacher.workdir), "sha256": files.sha256(
            teacher.workdir)}
    from jaxkd import checkpoint

    step = checkpoint.latest_step(teacher.workdir)
    return {"workdir": os.path.abspath(teacher.workdir), "step": step,
            "checkpoint_sha256": teacher_logits.checkpoint_sha256(
                os.path.join(teacher.workdir, "checkpoints", str(step)))}


def write(teacher_path: str, data: ml_collections.ConfigDict | dict, out_dir: str, *,
          top_k: int = 64, temperature: float = 1.0, dtype: str = "float16",
          batch_size: int = 8, chunk_size: int = CHUNK_SIZE, chunk_tokens: int = 256,
          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes the top-k logits of the teacher (a finished run's workdir or a ``.gguf``
    file) over ``data``'s training windows into ``out_dir`` (module docstring); returns
    the manifest."""
    data = pipeline._settings(data)
    from jaxkd.data import datasets

    if datasets.task_of(data) != "causal_lm":
        raise ConfigError("sequence logits are of language-model windows: set "
                          "config.data.task='causal_lm'")
    if dtype not in teacher_logits.DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(teacher_logits.DTYPES)}")
    inputs = pipeline.train_inputs(data)
    windows = inputs.source
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    teacher = teachers.load(teacher_path, sharding=sharding, field="--teacher")
    vocab = int(teacher.num_classes)
    if not 1 <= top_k <= vocab:
        raise ConfigError(f"top_k={top_k} must be in 1..{vocab} (the teacher's vocabulary)")
    length = data.max_length
    count = len(windows)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "inputs": inputs.spec,
        "token_ids_sha256": token_ids_sha256(windows), "count": count,
        "teacher": _teacher_entry(teacher), "top_k": top_k, "dtype": dtype,
        "temperature": float(temperature), "length": length, "vocab_size": vocab,
        "record": {"bytes": record_dtype(length, top_k, dtype).itemsize},
        "chunk_size": chunk_size, "chunks": [], "complete": False}
    _start_or_resume(out_dir, manifest)
    manifest = _read_manifest(out_dir)
    done = {c["file"] for c in manifest["chunks"]}
    model = teacher.model

    @jax.jit
    def forward(variables, ids, mask):
        features = model.apply(variables, ids, mask, return_logits=False)
        return topk_of_hidden(features["final_hidden"], token_kd.tied_head(features["lm_head"]),
                              top_k, temperature, chunk_tokens)

    n_chunks = -(-count // chunk_size)
    rtype = record_dtype(length, top_k, dtype)
    started = time.perf_counter()
    for c in range(n_chunks):
        name = f"logits-{c:05d}-of-{n_chunks:05d}.array_record"
        if name in done:
            continue
        first, last = c * chunk_size, min((c + 1) * chunk_size, count)
        records = np.zeros(last - first, rtype)
        for start in range(first, last, batch_size):
            rows = np.arange(start, min(start + batch_size, last))
            ids, mask = windows.padded(rows, length)
            padded_ids = np.zeros((batch_size, length), np.int32)
            padded_mask = np.zeros((batch_size, length), np.int32)
            padded_ids[:len(rows)], padded_mask[:len(rows)] = ids, mask
            values, top, residual = jax.device_get(forward(teacher.variables, padded_ids,
                                                           padded_mask))
            keep = mask[..., None] != 0
            out = records[rows - first]
            out["fingerprint"] = window_fingerprints(ids, mask)
            out["values"] = np.where(keep, values[:len(rows)], 0).astype(rtype["values"].base)
            out["indices"] = np.where(keep, top[:len(rows)], 0)
            out["residual"] = np.where(mask != 0, residual[:len(rows)], 0)
            records[rows - first] = out
        path = os.path.join(out_dir, name)
        teacher_logits.write_chunk(path, records, max(1, 65536 // rtype.itemsize))
        manifest["chunks"].append({"file": name, "first": first, "count": last - first,
                                   "bytes": os.path.getsize(path),
                                   "sha256": files.sha256(path)})
        manifest["chunks"].sort(key=lambda e: e["first"])
        files.write_json(os.path.join(out_dir, MANIFEST_FILE), manifest)
        log(f"chunk {c + 1}/{n_chunks}: windows {first}..{last - 1} "
            f"({time.perf_counter() - started:.0f} s)")
    manifest["complete"] = True
    files.write_json(os.path.join(out_dir, MANIFEST_FILE), manifest)
    return manifest


def check(out_dir: str, data: Any) -> dict[str, Any]:
    """The manifest of ``out_dir`` if it holds the logits of ``data``'s training windows;
    else one line naming what differs."""
    manifest = _read_manifest(out_dir)
    where = os.path.join(out_dir, MANIFEST_FILE)
    if not manifest["complete"]:
        raise ConfigError(f"{where} is incomplete ({len(manifest['chunks'])} chunks written): "
                          "run python -m jaxkd.sequence_logits again to finish it")
    inputs = pipeline.train_inputs(data)
    if manifest["inputs"] != inputs.spec:
        difference = teacher_logits.first_difference("inputs", manifest["inputs"],
                                                     inputs.spec)
        raise ConfigError(f"config.distill.teacher_logits={out_dir!r} holds logits of other "
                          f"data: {difference}")
    if manifest["token_ids_sha256"] != token_ids_sha256(inputs.source):
        raise ConfigError(f"config.distill.teacher_logits={out_dir!r} holds logits of other "
                          "token ids (token_ids_sha256 differs): the text or the tokenizer "
                          "changed since they were written; write them again")
    return manifest


class StoredSequenceLogits:
    """The records of a written ``out_dir``, read by window index (thread-safe reads)."""

    def __init__(self, out_dir: str, manifest: dict[str, Any]):
        self.out_dir, self.manifest = out_dir, manifest
        self.chunk_size = manifest["chunk_size"]
        self.dtype = record_dtype(manifest["length"], manifest["top_k"], manifest["dtype"])
        self._readers = [array_record_module.ArrayRecordReader(
            os.path.join(out_dir, c["file"]), _READ_OPTIONS) for c in manifest["chunks"]]

    def read(self, indices: np.ndarray) -> np.ndarray:
        return teacher_logits.read_records(self._readers, np.asarray(indices),
                                           self.chunk_size, self.dtype)

    def batch_fields(self, indices: np.ndarray, ids: np.ndarray, mask: np.ndarray
                     ) -> dict[str, np.ndarray]:
        """``teacher_topk_logits`` float32 and ``teacher_topk_indices`` int32 ``[n, L', k]``
        and ``teacher_topk_residual`` float32 ``[n, L']`` of windows ``indices``, whose
        token ids ``ids`` / ``mask`` ``[n, L']`` must be those the logits were of."""
        records = self.read(indices)
        bad = np.flatnonzero(window_fingerprints(ids, mask) != records["fingerprint"])
        if len(bad):
            raise ConfigError(
                f"the teacher logits in {self.out_dir} of window {int(indices[bad[0]])} (and "
                f"{len(bad) - 1} more) were computed for other tokens: write them again")
        length = ids.shape[1]
        return {"teacher_topk_logits": records["values"][:, :length].astype(np.float32),
                "teacher_topk_indices": records["indices"][:, :length].astype(np.int32),
                "teacher_topk_residual": records["residual"][:, :length].astype(np.float32)}


def check_terms(manifest: dict[str, Any], terms: Sequence[Any], *, where: str) -> None:
    """The objective may read these logits only through ``token_topk_kd`` (and label
    terms), at the temperature their residual mass was computed at."""
    for term in terms:
        label = f"config.distill.losses.{term.label}"
        if term.kind == "token_topk":
            t = float(term.kwargs.get("temperature", 1.0))
            if t != manifest["temperature"] and term.kwargs.get("residual", True):
                raise ConfigError(f"{label}.kwargs.temperature={t} but the residual mass in "
                                  f"{where} is at temperature {manifest['temperature']}: use "
                                  "it, or residual=False")
        elif term.kind not in ("labels", "token_labels"):
            raise ConfigError(f"{label} ({term.name}) needs a teacher model; {where} holds "
                              "stored top-k logits, which token_topk_kd reads")


def stream(out_dir: str, data: Any) -> Callable[[Any], Callable[..., dict]]:
    """``extra_fields`` of :func:`jaxkd.data.pipeline.train_batches` for a text stream:
    each batch's stored top-k logits, checked against its windows' fingerprints."""
    manifest = check(out_dir, data)

    def fields_for(source: Any) -> Callable[..., dict]:
        del source
        return StoredSequenceLogits(out_dir, manifest).batch_fields

    return fields_for


def _start_or_resume(out_dir: str, manifest: dict[str, Any]) -> None:
    path = os.path.join(out_dir, MANIFEST_FILE)
    if os.path.exists(path):
        existing = _read_manifest(out_dir)
        for field in _IDENTITY:
            if existing.get(field) != manifest.get(field):
                difference = teacher_logits.first_difference(field, existing.get(field),
                                                             manifest.get(field))
                raise ConfigError(f"{path} belongs to other teacher logits: {difference}; "
                                  "choose another output directory")
        for name in os.listdir(out_dir):
            if name.endswith(".tmp"):
                os.remove(os.path.join(out_dir, name))
        return
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise ConfigError(f"{out_dir} is not empty and holds no {MANIFEST_FILE}: choose an "
                          "empty or new output directory")
    os.makedirs(out_dir, exist_ok=True)
    files.write_json(path, manifest)


def _read_manifest(out_dir: str) -> dict[str, Any]:
    path = os.path.join(out_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        raise MissingError(f"{path} does not exist: write the logits with python -m "
                           "jaxkd.sequence_logits first")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except ValueError as e:
        raise ConfigError(f"{path} is corrupt ({type(e).__name__}): write the logits "
                          "again") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{path} is not {FORMAT} version {FORMAT_VERSION} (format "
                          f"{manifest.get('format')!r}, version "
                          f"{manifest.get('format_version')!r})")
    return manifest


def is_sequence_logits(out_dir: str) -> bool:
    """Whether ``out_dir``'s manifest is of this format (else :mod:`jaxkd.teacher_logits`)."""
    try:
        with open(os.path.join(out_dir, MANIFEST_FILE)) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def main(argv: Sequence[str]) -> int:
    from jaxkd import configfile

    p = argparse.ArgumentParser(prog="python -m jaxkd.sequence_logits",
                                description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a causal LM run's config (its data; "
                   "its distill.teacher.workdir is the teacher unless --teacher)")
    p.add_argument("--teacher", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--top_k", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch_size", type=int, default=8)
    args = p.parse_args(argv)
    try:
        config = configfile.load(args.config)
        run = config.stages[config.stage_order[-1]] if "stages" in config else config
        teacher = args.teacher or run.distill.teacher.workdir
        manifest = write(teacher, run.data, args.out, top_k=args.top_k,
                         temperature=args.temperature, dtype=args.dtype,
                         batch_size=args.batch_size)
    except ConfigError as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 2
    size = sum(c["bytes"] for c in manifest["chunks"])
    print(f"{manifest['count']} windows, {size / manifest['count'] / manifest['length']:.0f} "
          f"bytes per token, in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
