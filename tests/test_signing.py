"""Signed artifacts and their lineage: Ed25519 over the manifest, refusals in one line, and
the chain of runs an artifact descends from."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from jaxkd import export, train
from jaxkd.config import hinton_losses, run_config
from jaxkd.export import lineage, signing
from jaxkd.export.encoding import ArtifactError
from jaxkd.schema import ConfigError, MissingError


def small(data_dir, steps=20, **kwargs):
    c = run_config("digits", "mlp", widths=(16,))
    c.data.data_dir = str(data_dir)
    c.batch_size, c.eval_batch_size, c.num_steps = 32, 360, steps
    c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = steps
    return c


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """A teacher, a student distilled from it, and a student started from that student."""
    root = tmp_path_factory.mktemp("lineage")
    teacher, student, third = (str(root / n) for n in ("teacher", "student", "third"))
    train.train_and_evaluate(small(data_dir), teacher)
    c = small(data_dir)
    c.distill.teacher.workdir = teacher
    c.distill.losses = hinton_losses(0.5, 2.0)
    train.train_and_evaluate(c, student)
    c = small(data_dir)
    c.init.method, c.init.teacher_workdir = "copy", student
    train.train_and_evaluate(c, third)
    return teacher, student, third


def export_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxkd.export", *args], capture_output=True,
                          text=True, timeout=300)


def test_the_manifest_records_the_lineage_back_to_the_first_teacher(runs):
    teacher, student, third = runs
    t, s, x = (export.read_lineage(os.path.join(d, "artifact")) for d in runs)
    assert t["teachers"] == [] and t["init"] is None
    assert t["dataset"]["spec"]["name"] == "digits" and len(t["config_sha256"]) == 64
    assert s["teachers"][0]["workdir"] == os.path.abspath(teacher)
    assert s["teachers"][0]["artifact_sha256"] == lineage.manifest_sha256(
        os.path.join(teacher, "artifact"))
    assert s["teachers"][0]["lineage"] == t  # the teacher's own lineage, nested
    assert x["init"]["workdir"] == os.path.abspath(student) and x["init"]["lineage"] == s
    assert t["config_sha256"] != s["config_sha256"] and t["dataset"] == s["dataset"]
    assert {"jax", "flax", "optax", "numpy"} <= set(t["packages"])
    out = export_cli("lineage", os.path.join(third, "artifact"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(os.path.abspath(os.path.join(third, "artifact")))
    assert any(line.strip().startswith(f"started from: {os.path.abspath(student)}")
               for line in lines)
    assert any(line.strip().startswith(f"teacher: {os.path.abspath(teacher)}")
               for line in lines)


def test_sign_and_verify_and_every_refusal(runs, tmp_path):
    artifact = str(tmp_path / "artifact")
    shutil.copytree(os.path.join(runs[1], "artifact"), artifact)
    key = str(tmp_path / "key.pem")
    out = export_cli("keygen", f"--out={key}")
    assert out.returncode == 0 and os.path.exists(key + ".pub")
    assert oct(os.stat(key).st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="exists: keygen never overwrites a key"):
        signing.keygen(key)
    # Unsigned: verify passes without a key, refuses when a signature is required.
    assert export_cli("verify", artifact).stdout.rstrip().endswith("; not signed")
    out = export_cli("verify", artifact, f"--public-key={key}.pub")
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "is not signed (no signature.json) but a signed artifact is required" in out.stderr
    out = export_cli("sign", artifact, f"--key={key}")
    assert out.returncode == 0, out.stderr
    out = export_cli("verify", artifact, f"--public-key={key}.pub")
    assert out.returncode == 0 and out.stdout.rstrip().endswith("; signature valid")
    # Another key.
    other = str(tmp_path / "other.pem")
    signing.keygen(other)
    with pytest.raises(ArtifactError, match=r"was made with another key \(public key"):
        signing.verify_signed(artifact, other + ".pub")
    # A changed manifest (its files still match it).
    manifest = os.path.join(artifact, "manifest.json")
    record = json.load(open(manifest))
    record["metrics"]["train_eval"]["accuracy"] = 1.0
    saved = open(manifest, "rb").read()
    with open(manifest, "w") as f:
        json.dump(record, f, separators=(",", ":"), sort_keys=True)
    out = export_cli("verify", artifact)
    assert out.returncode == 1 and "the manifest changed after signing" in out.stderr
    with open(manifest, "wb") as f:
        f.write(saved)
    signing.verify_signed(artifact, key + ".pub", require=True)
    # A changed tensor file.
    name = sorted(record["files"])[0]
    path = os.path.join(artifact, name)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(ArtifactError, match=f"{path} does not match manifest.json"):
        signing.verify_signed(artifact, key + ".pub")
    open(path, "wb").write(bytes(data[:len(data) // 2]) + bytes([data[len(data) // 2] ^ 1])
                           + bytes(data[len(data) // 2 + 1:]))
    signing.verify_signed(artifact, key + ".pub", require=True)
    # A changed lineage: the manifest pins it, so the signature covers it.
    path = os.path.join(artifact, "lineage.json")
    lineage_record = json.load(open(path))
    lineage_record["teachers"] = []
    with open(path, "w") as f:
        json.dump(lineage_record, f, separators=(",", ":"), sort_keys=True)
    with pytest.raises(ArtifactError, match=f"{path} does not match manifest.json"):
        signing.verify_signed(artifact, key + ".pub")
    with pytest.raises(ArtifactError, match=f"{path} does not match manifest.json"):
        export.read_lineage(artifact)
    # Bad key files.
    with pytest.raises(MissingError, match="nope.pem does not exist"):
        signing.sign(os.path.join(runs[1], "artifact"), str(tmp_path / "nope.pem"))
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="junk.pem is not a PEM private key"):
        signing.sign(os.path.join(runs[1], "artifact"), str(tmp_path / "junk.pem"))


def test_an_artifact_with_its_lineage_inside_the_manifest_is_still_read(runs, tmp_path):
    """Artifacts written before lineage.json kept the lineage in the manifest: a later run
    that names one as its teacher reads it from there."""
    artifact = tmp_path / "artifact"
    shutil.copytree(os.path.join(runs[0], "artifact"), artifact)
    inline = export.read_lineage(str(artifact))
    record = json.load(open(artifact / "manifest.json"))
    record["lineage"] = inline
    (artifact / "lineage.json").unlink()
    (artifact / "manifest.json").write_text(json.dumps(record))
    export.verify(str(artifact))
    assert export.read_lineage(str(artifact)) == inline
    assert lineage.run_entry(str(tmp_path))["lineage"] == inline
