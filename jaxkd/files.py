"""Every file a run writes, written whole or not at all, on any file system etils knows.

Paths go through ``etils.epath`` (installed with Orbax), so a workdir may be local or
``gs://...``. A file is written to a temporary name beside it and then renamed over the
target: a reader (or a relaunch after a kill) sees the old file or the new one, never half
of one. On a local disk the bytes are also ``fsync``\\ed before the rename. (Object stores
make the rename a copy; the file under its final name is still complete.)
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from etils import epath

from jaxkd.schema import MissingError

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
    return epath.Path(p)


def _is_local(p: epath.Path) -> bool:
    return "://" not in os.fspath(p)


def write_bytes(target: PathLike, data: bytes) -> int:
    """Writes ``data`` to ``target`` atomically (temporary file, fsync, rename); returns
    its size. The parent directory must exist."""
    target = path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        if _is_local(target):
            with open(os.fspath(tmp), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            tmp.write_bytes(data)
        tmp.replace(target)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return len(data)


def write_text(target: PathLike, text: str) -> int:
    return write_bytes(target, text.encode())


def write_json(target: PathLike, value: Any, *, indent: int = 1, compact: bool = False,
               **kwargs: Any) -> int:
    """``value`` as JSON (indented, keys in the caller's order unless ``sort_keys``), then
    a newline; ``compact`` writes one line."""
    if compact:
        text = json.dumps(value, separators=(",", ":"), **kwargs)
    else:
        text = json.dumps(value, indent=indent, **kwargs) + "\n"
    return write_text(target, text)


def read_json(target: PathLike) -> Any:
    """The JSON value of a file; a one-line FileNotFoundError naming it if it is missing."""
    target = path(target)
    if not target.exists():
        raise MissingError(f"{target} does not exist")
    return json.loads(target.read_text())


def sha256(target: PathLike) -> str:
    """The sha256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with path(target).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def makedirs(target: PathLike) -> epath.Path:
    target = path(target)
    target.mkdir(parents=True, exist_ok=True)
    return target
