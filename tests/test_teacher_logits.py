"""jaxkd.teacher_logits: the stored logits are the teacher's, they stream with their
examples, a killed write resumes to the same bytes, and logits that do not fit are refused."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from jaxkd import config, teacher_logits, train
from jaxkd.config import run_config
from jaxkd.data import datasets, pipeline, sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHUNK = 5000  # 24,000 examples -> 5 files, the last one short
NUM_TRAIN, NUM_UNLABELLED = 4000, 20000


def data_config(data_dir, **overrides):
    c = config.data_config("mnist1d")
    c.data_dir = str(data_dir)
    c.transfer_split = "unlabelled"
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    c = run_config("mnist1d", "mlp", widths=(16,))
    c.data.data_dir = str(data_dir)
    c.batch_size, c.eval_batch_size, c.num_steps = 32, 200, 20
    c.optimizer.learning_rate = 3e-3
    c.log_every_steps, c.eval_every_steps, c.checkpoint_every_steps = 10, 1000, 1000
    train.train_and_evaluate(c, workdir)
    return workdir


@pytest.fixture(scope="module")
def numpy_teacher(teacher):
    """The teacher's logits from its weights.npz, in float64 numpy (not through jax)."""
    with np.load(os.path.join(teacher, "weights.npz"), allow_pickle=False) as f:
        w = {k: f[k].astype(np.float64) for k in f.files}

    def logits(x):
        hidden = np.maximum(x @ w["params/hidden1/kernel"] + w["params/hidden1/bias"], 0)
        return hidden @ w["params/head/kernel"] + w["params/head/bias"]

    return logits


@pytest.fixture(scope="module")
def stream_inputs(data_dir):
    """train then unlabelled, read straight through tfds (mnist1d's mean 0 / std 1)."""
    builder = tfds.builder("mnist1d", data_dir=str(data_dir))
    parts = []
    for split in ("train", "unlabelled"):
        source = builder.as_data_source(split)
        parts.append(np.stack([e["image"] for e in source.__getitems__(range(len(source)))]))
    return np.concatenate(parts).astype(np.float32)


@pytest.fixture(scope="module")
def written(teacher, data_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("logits")
    out = {"full": str(root / "full"), "top3": str(root / "top3")}
    teacher_logits.write(teacher, data_config(data_dir), out["full"], chunk_size=CHUNK)
    teacher_logits.write(teacher, data_config(data_dir), out["top3"], top_k=3, chunk_size=CHUNK)
    return out


def stored_records(out_dir, dtype):
    """Every record, decoded with the documented struct (not through StoredLogits)."""
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".array_record"))
    chunks = []
    for name in files:
        reader = array_record_module.ArrayRecordReader(os.path.join(out_dir, name))
        chunks.append(np.frombuffer(b"".join(reader.read_all()), dtype))
        reader.close()
    return np.concatenate(chunks)


def blake2b_64(rows):
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(),
                                    "little") for r in rows], np.uint64)


def assert_true_top_k(indices, values, expected, rtol):
    """``indices`` pick the k largest of ``expected`` in decreasing order (ties either way),
    and are exactly numpy's order wherever no two of the k + 1 largest are within 1e-4."""
    k = indices.shape[1]
    ranked = -np.sort(-expected, axis=1)
    np.testing.assert_allclose(np.take_along_axis(expected, indices, axis=1), ranked[:, :k],
                               rtol=0, atol=1e-5)
    assert all(len(set(row)) == k for row in indices.tolist())
    clear = (-np.diff(ranked[:, :k + 1], axis=1)).min(axis=1) > 1e-4
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(indices[clear],
                                  np.argsort(-expected, axis=1, kind="stable")[clear, :k])
    np.testing.assert_allclose(values, ranked[:, :k], rtol=rtol, atol=1e-4)


def one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, (word, message)


# --- what is written ---------------------------------------------------------------------

def test_full_logits_are_the_teachers_in_float16(written, numpy_teacher, stream_inputs):
    struct = np.dtype([("fingerprint", "<u8"), ("values", "<f2", (10,))])
    records = stored_records(written["full"], struct)
    assert len(records) == NUM_TRAIN + NUM_UNLABELLED
    expected = numpy_teacher(stream_inputs)
    np.testing.assert_allclose(records["values"].astype(np.float64), expected,
                               rtol=2 ** -10, atol=1e-4)
    np.testing.assert_array_equal(records["fingerprint"], blake2b_64(stream_inputs))
    manifest = json.load(open(os.path.join(written["full"], "manifest.json")))
    assert manifest["complete"] and manifest["count"] == 24000
    assert (manifest["top_k"], manifest["k"], manifest["num_classes"]) == (0, 10, 10)
    assert [c["count"] for c in manifest["chunks"]] == [5000] * 4 + [4000]
    assert manifest["inputs"]["train_split"] == "train"
    assert manifest["inputs"]["transfer_examples"] == NUM_UNLABELLED
    assert manifest["teacher"]["model"]["kwargs"]["widths"] == [16]
    step_dir = os.path.join(manifest["teacher"]["workdir"], "checkpoints",
                            str(manifest["teacher"]["step"]))
    listing = ""  # sha256sum's lines, sorted by path, without the trainer's seal file
    for path in sorted(os.path.relpath(os.path.join(root, f), step_dir)
                       for root, _, files in os.walk(step_dir) for f in files):
        if path != "jaxkd_sha256.json":
            content = open(os.path.join(step_dir, path), "rb").read()
            listing += f"{hashlib.sha256(content).hexdigest()}  {path}\n"
    assert manifest["teacher"]["checkpoint_sha256"] == hashlib.sha256(listing.encode()).hexdigest()


def test_top_k_are_the_largest_logits_in_order(written, numpy_teacher, stream_inputs):
    struct = np.dtype([("fingerprint", "<u8"), ("values", "<f2", (3,)), ("indices", "<i4", (3,)),
                       ("residual", "<f4")])
    records = stored_records(written["top3"], struct)
    logits = numpy_teacher(stream_inputs)
    assert_true_top_k(records["indices"], records["values"].astype(np.float64), logits,
                      rtol=2 ** -10)
    # The residual is the softmax mass (T = 1) outside the three largest logits.
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(records["residual"], 1 - np.sort(p, 1)[:, -3:].sum(1),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 2 ** -7)])
def test_other_value_types(teacher, data_dir, tmp_path, numpy_teacher, stream_inputs,
                           dtype, rtol):
    data = data_config(data_dir, transfer_split="")
    manifest = teacher_logits.write(teacher, data, str(tmp_path), top_k=5, dtype=dtype)
    assert manifest["record"]["bytes"] == 12 + 5 * (np.dtype(teacher_logits.DTYPES[dtype])
                                                    .itemsize + 4)
    stored = teacher_logits.StoredLogits.open(str(tmp_path), data, in_memory=False)
    fields = stored.batch_fields(np.arange(NUM_TRAIN))
    assert_true_top_k(fields["teacher_topk_indices"], fields["teacher_topk_logits"],
                      numpy_teacher(stream_inputs[:NUM_TRAIN]), rtol=rtol)


def test_the_teacher_sees_the_training_normalisation(teacher, data_dir, tmp_path, monkeypatch,
                                                     numpy_teacher, stream_inputs):
    """mnist1d's constants are 0 and 1: make them 0.5 and 2 to see them applied."""
    monkeypatch.setitem(datasets.DATASETS, "mnist1d", datasets.Dataset(mean=(0.5,), std=(2.0,)))
    data = data_config(data_dir, transfer_split="")
    manifest = teacher_logits.write(teacher, data, str(tmp_path), dtype="float32")
    assert (manifest["inputs"]["mean"], manifest["inputs"]["std"]) == ([0.5], [2.0])
    fields = teacher_logits.StoredLogits.open(str(tmp_path), data, in_memory=True).batch_fields(
        np.arange(NUM_TRAIN))
    np.testing.assert_allclose(fields["teacher_topk_logits"],
                               numpy_teacher((stream_inputs[:NUM_TRAIN] - 0.5) / 2.0),
                               rtol=1e-5, atol=1e-5)


def test_bad_options_are_one_line_errors(teacher, data_dir, tmp_path):
    for kwargs, words in [({"dtype": "int8"}, ["dtype='int8'", "float16"]),
                          ({"top_k": 11}, ["top_k=11", "10 classes"]),
                          ({"batch_size": 0}, ["batch_size=0"])]:
        with pytest.raises(ValueError) as excinfo:
            teacher_logits.write(teacher, data_config(data_dir), str(tmp_path), **kwargs)
        one_line_error(excinfo, *words)
    assert not os.listdir(tmp_path)


def test_bytes_per_example_is_what_the_format_implies(written, data_dir):
    # float16 values; top-k adds int32 indices and the float32 residual mass
    record_bytes = {"full": 8 + 10 * 2, "top3": 8 + 3 * (2 + 4) + 4}
    for kind, out_dir in written.items():
        manifest = teacher_logits.check(out_dir, data_config(data_dir))
        assert manifest["record"]["bytes"] == record_bytes[kind]
        files = [os.path.join(out_dir, f) for f in os.listdir(out_dir)]
        on_disk = sum(os.path.getsize(f) for f in files) / 24000
        assert teacher_logits.bytes_per_example(out_dir) == pytest.approx(on_disk)
        # Each record costs its struct plus ~1.3 bytes of group framing; each array_record
        # file adds up to two 64 KiB blocks of padding, index and footer.
        overhead = (2 * 65536 * len(manifest["chunks"]) + 4096) / 24000
        assert record_bytes[kind] + 1 < on_disk < record_bytes[kind] + 2 + overhead


# --- streaming -----------------------------------------------------------------------------

@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize("kind, k", [("full", 10), ("top3", 3)])
def test_streamed_fields_are_those_of_the_batch_examples(written, data_dir, numpy_teacher,
                                                         in_memory, kind, k):
    """Batch size 110 over 24,000 examples: steps 216..219 straddle the first epoch's end."""
    data = data_config(data_dir, in_memory=in_memory)
    stream = pipeline.train_batches(data, batch_size=110, seed=3, start_step=216,
                                    extra_fields=teacher_logits.stream(written[kind], data))
    plain = pipeline.train_batches(data, batch_size=110, seed=3, start_step=216)
    for _ in range(4):
        batch, reference = next(stream), next(plain)
        for key in ("image", "label"):
            np.testing.assert_array_equal(batch[key], reference[key])
        logits = batch["teacher_topk_logits"]
        assert logits.dtype == np.float32 and logits.shape == (110, k)
        assert batch["teacher_topk_indices"].dtype == np.int32
        expected = numpy_teacher(batch["image"].astype(np.float64))  # augment='none'
        if kind == "full":
            np.testing.assert_array_equal(batch["teacher_topk_indices"],
                                          np.broadcast_to(np.arange(10), (110, 10)))
            np.testing.assert_allclose(logits, expected, rtol=2 ** -10, atol=1e-4)
        else:
            assert_true_top_k(batch["teacher_topk_indices"], logits, expected, rtol=2 ** -10)


def test_streamed_fields_resume_and_split_over_processes_like_the_batch(written, data_dir):
    data = data_config(data_dir, augment="jitter", in_memory=False)
    kwargs = dict(batch_size=64, seed=1,
                  extra_fields=teacher_logits.stream(written["top3"], data))
    from_zero = pipeline.train_batches(data, **kwargs)
    batches = [next(from_zero) for _ in range(5)]
    resumed = next(pipeline.train_batches(data, start_step=3, **kwargs))
    for key, value in batches[3].items():
        np.testing.assert_array_equal(resumed[key], value)
    halves = [next(pipeline.train_batches(data, start_step=3, process_index=p, process_count=2,
                                          **kwargs)) for p in range(2)]
    for key, value in batches[3].items():
        np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), value)
    assert not np.array_equal(batches[3]["teacher_topk_logits"],
                              batches[4]["teacher_topk_logits"])


def test_examples_that_changed_since_the_write_are_refused(written, data_dir, monkeypatch):
    data = data_config(data_dir, in_memory=False)
    stored = teacher_logits.StoredLogits.open(written["top3"], data, in_memory=False)
    images, _ = pipeline.train_inputs(data).source.read(np.array([7, 4005]))
    stored.batch_fields(np.array([7, 4005]), images)  # the real examples pass
    images[1, 0] += 1e-3
    with pytest.raises(ValueError) as excinfo:
        stored.batch_fields(np.array([7, 4005]), images)
    one_line_error(excinfo, "example 4005", "another input", written["top3"])
    load = sources.load

    def reversed_load(source):  # the same examples in another order
        loaded = load(source)
        return sources.InMemory(loaded.images[::-1].copy(), loaded.labels)

    monkeypatch.setattr(sources, "load", reversed_load)
    monkeypatch.setattr(pipeline, "_LOADED", {})  # not the examples decoded earlier
    with pytest.raises(ValueError) as excinfo:
        data = data_config(data_dir)
        pipeline.train_batches(data, batch_size=10, seed=0,
                               extra_fields=teacher_logits.stream(written["top3"], data))
    one_line_error(excinfo, "example 0", "another input")


# --- resuming -----------------------------------------------------------------------------

KILLED_WRITER = """
import json, os, signal, sys, types
import ml_collections
from array_record.python import array_record_module
from jaxkd import teacher_logits


class DyingWriter:
    \"\"\"Kills the process after half of the third chunk's records went to the writer.\"\"\"

    def __init__(self, path, options):
        self.writer = array_record_module.ArrayRecordWriter(path, options)
        self.dies = "-00002-of-" in path
        self.written = 0

    def write(self, record):
        self.writer.write(record)
        self.written += 1
        if self.dies and self.written == 2500:
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self):
        self.writer.close()


teacher_logits.array_record_module = types.SimpleNamespace(
    ArrayRecordWriter=DyingWriter, ArrayRecordReader=array_record_module.ArrayRecordReader)
data = ml_collections.ConfigDict(json.loads(sys.argv[3]))
teacher_logits.write(sys.argv[1], data, sys.argv[2], chunk_size=int(sys.argv[4]))
"""


def test_a_killed_write_resumes_to_the_same_files(teacher, data_dir, written, tmp_path):
    out = str(tmp_path / "logits")
    data = data_config(data_dir)
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, teacher, out, data.to_json(), str(CHUNK)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    names = sorted(os.listdir(out))
    assert names == ["logits-00000-of-00005.array_record", "logits-00001-of-00005.array_record",
                     "logits-00002-of-00005.array_record.tmp", "manifest.json"]
    with pytest.raises(ValueError) as excinfo:
        teacher_logits.check(out, data)
    one_line_error(excinfo, "unfinished", "logits-00002-of-00005.array_record")
    first = os.stat(os.path.join(out, names[0]))

    teacher_logits.write(teacher, data, out, chunk_size=CHUNK)
    assert sorted(os.listdir(out)) == sorted(os.listdir(written["full"]))
    for name in os.listdir(out):
        with open(os.path.join(out, name), "rb") as a, \
                open(os.path.join(written["full"], name), "rb") as b:
            assert a.read() == b.read(), name
    again = os.stat(os.path.join(out, names[0]))
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)  # skipped
    teacher_logits.check(out, data)


def test_writing_into_logits_of_another_teacher_or_dataset_is_refused(
        teacher, data_dir, written, tmp_path):
    out = str(tmp_path / "logits")
    shutil.copytree(written["top3"], out)
    for kwargs, data, words in [
        ({"top_k": 5}, data_config(data_dir), ["top_k is 3 there, 5 here"]),
        ({"top_k": 3}, data_config(data_dir, transfer_split=""),
         ["inputs.transfer_split is 'unlabelled' there, '' here"]),
        ({"top_k": 3, "dtype": "float32"}, data_config(data_dir),
         ["dtype is 'float16' there, 'float32' here"]),
    ]:
        with pytest.raises(ValueError) as excinfo:
            teacher_logits.write(teacher, data, out, chunk_size=CHUNK, **kwargs)
        one_line_error(excinfo, "manifest.json", *words)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    manifest["teacher"]["checkpoint_sha256"] = "0" * 64
    json.dump(manifest, open(os.path.join(out, "manifest.json"), "w"))
    with pytest.raises(ValueError) as excinfo:
        teacher_logits.write(teacher, data_config(data_dir), out, top_k=3, chunk_size=CHUNK)
    one_line_error(excinfo, "teacher.checkpoint_sha256 is '0000")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError) as excinfo:
        teacher_logits.write(teacher, data_config(data_dir), str(tmp_path / "other"))
    one_line_error(excinfo, "not empty")


# --- checking against config.data ------------------------------------------------------------

def tampered(written, tmp_path, **inputs):
    out = str(tmp_path / "logits")
    shutil.copytree(written["full"], out)
    path = os.path.join(out, "manifest.json")
    manifest = json.load(open(path))
    manifest["inputs"].update(inputs)
    json.dump(manifest, open(path, "w"))
    return out


@pytest.mark.parametrize("data_overrides, manifest_inputs, words", [
    ({"name": "digits", "transfer_split": ""}, {},
     ["config.data.name", "'mnist1d'", "'digits'"]),
    ({}, {"builder_config": "large"}, ["config.data.builder_config", "'large'", "'default'"]),
    ({}, {"version": "0.9.0"}, ["dataset version", "'0.9.0'", "'1.0.0'"]),
    ({"transfer_split": ""}, {}, ["config.data.transfer_split", "'unlabelled'", "''"]),
    ({"train_split": "test"}, {}, ["config.data.train_split", "'train'", "'test'"]),
    ({}, {"train_examples": 3999}, ["config.data.train_split", "3999", "4000"]),
    ({}, {"mean": [0.5]}, ["normalisation mean", "[0.5]", "[0.0]"]),
    ({"augment": "jitter"}, {}, ["config.data.augment='jitter'", "un-augmented",
                                 "config.distill.allow_augment_with_precomputed=True"]),
])
def test_logits_that_do_not_fit_the_data_are_refused(written, data_dir, tmp_path,
                                                     data_overrides, manifest_inputs, words):
    out = tampered(written, tmp_path, **manifest_inputs)
    data = data_config(data_dir, **data_overrides)
    with pytest.raises(ValueError) as excinfo:
        teacher_logits.check(out, data)
    one_line_error(excinfo, *words)
    if data_overrides.get("augment"):  # unless explicitly allowed
        assert teacher_logits.check(out, data, allow_augment=True)["count"] == 24000


def test_missing_or_corrupt_files_are_named(written, data_dir, tmp_path):
    data = data_config(data_dir)
    out = tampered(written, tmp_path)
    assert teacher_logits.check(out, data)["complete"]
    chunk = os.path.join(out, "logits-00003-of-00005.array_record")
    original = open(chunk, "rb").read()

    flipped = bytearray(original)
    flipped[1000] ^= 1
    open(chunk, "wb").write(bytes(flipped))
    with pytest.raises(ValueError) as excinfo:
        teacher_logits.check(out, data)
    one_line_error(excinfo, chunk, "sha256", "corrupt")

    open(chunk, "wb").write(original[:-10])
    with pytest.raises(ValueError) as excinfo:
        teacher_logits.check(out, data)
    one_line_error(excinfo, chunk, "truncated")

    os.remove(chunk)
    with pytest.raises(FileNotFoundError) as excinfo:
        teacher_logits.check(out, data)
    one_line_error(excinfo, chunk, "missing")

    manifest = os.path.join(out, "manifest.json")
    open(manifest, "w").write('{"format_version": 1, "inputs": ')
    with pytest.raises(ValueError) as excinfo:
        teacher_logits.check(out, data)
    one_line_error(excinfo, manifest, "corrupt")
    os.remove(manifest)
    with pytest.raises(FileNotFoundError) as excinfo:
        pipeline.train_batches(data, batch_size=10, seed=0,
                               extra_fields=teacher_logits.stream(out, data))
    one_line_error(excinfo, manifest, "does not exist")


# --- command line ---------------------------------------------------------------------------

def test_command_line_takes_the_teachers_data_and_a_transfer_split(teacher, written, tmp_path):
    out = str(tmp_path / "logits")
    command = [sys.executable, "-m", "jaxkd.teacher_logits", f"--teacher_workdir={teacher}",
               f"--out={out}", "--top_k=3", "--transfer_split=unlabelled",
               f"--chunk_size={CHUNK}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    assert f"{teacher_logits.bytes_per_example(out):.2f} bytes per example" in last
    assert "30 bytes per record" in last
    for name in os.listdir(written["top3"]):  # the same bytes as written in this process
        with open(os.path.join(out, name), "rb") as a, \
                open(os.path.join(written["top3"], name), "rb") as b:
            assert a.read() == b.read(), name
