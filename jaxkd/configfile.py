"""Config files and their command-line overrides: ``--config=configs/x.py[:ARG]`` and
``--config.<field>=<value>``.

A config file is plain Python with ``get_config(arg=None)`` returning a
``ml_collections.ConfigDict`` (big_vision style); ``ARG`` is the text after the colon, which
the config reads with :func:`jaxkd.config.parse_arg` (each config declares its args). An
override names a field that exists (``optimizer.learning_rate``; a chain's stage fields are
``stages.<stage>.<field>``) and gives a value of the field's type: ``true``/``false`` for a
bool, a number, any text for a string, a Python literal for a tuple, dict or ``None`` field
(a tuple also as ``a,b,c``). Every mistake is a :class:`ConfigError` of one line naming the
flag as typed and what is allowed.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from jaxkd.schema import ConfigError

PREFIX = "--config."
_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of ``'path/to/config.py[:ARG]'``: ``get_config(ARG)`` of that file."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py"):
        raise ConfigError(f"--config={spec!r}: give the path of a .py config file "
                          f"(e.g. configs/default.py{':' + arg if arg else ''})")
    if not os.path.isfile(path):
        near = _near_files(path)
        raise ConfigError(f"--config={spec!r}: {path} does not exist"
                          + (f"; did you mean {' or '.join(near)}?" if near else ""))
    module_spec = importlib.util.spec_from_file_location(
        f"jaxkd_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # its own errors keep their traceback
    if not hasattr(module, "get_config"):
        raise ConfigError(f"--config={spec!r}: {path} defines no get_config(arg=None)")
    try:
        config = module.get_config(arg or None)
    except ConfigError as e:
        raise ConfigError(f"--config={spec!r}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"--config={spec!r}: get_config returned a "
                          f"{type(config).__name__}, not a ml_collections.ConfigDict")
    return config


def _near_files(path: str) -> list[str]:
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if n.endswith(".py")]
    return [os.path.join(os.path.dirname(path), n) for n in
            difflib.get_close_matches(os.path.basename(path), names, n=2, cutoff=0.6)]


def split_overrides(argv: Sequence[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """``(overrides, rest)``: every ``--config.<field>=<value>`` (or ``--config.<field>
    <value>``) as ``(flag as typed, field, value)``, and the other arguments."""
    overrides, rest = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith(PREFIX):
            rest.append(arg)
            continue
        flag, eq, value = arg.partition("=")
        if not eq:
            if not args:
                raise ConfigError(f"{flag}: give a value ({flag}=VALUE)")
            value = args.pop(0)
        overrides.append((flag, flag[len(PREFIX):], value))
    return overrides, rest


def override(config: ml_collections.ConfigDict, field: str, text: str, *,
             flag: str | None = None) -> None:
    """Sets ``config.<field>`` (a dotted path to an existing field) from ``text``."""
    flag = flag or PREFIX + field
    parts = field.split(".")
    node: Any = config
    for depth, part in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict | dict) else []
        if part not in keys:
            raise ConfigError(_no_field(flag, parts[:depth], part, keys, config))
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    if isinstance(current, ml_collections.ConfigDict | dict) and not text.lstrip().startswith("{"):
        fields = ", ".join(current.keys()) or "(none)"
        raise ConfigError(f"{flag}: is a block, not a value; set one of its fields "
                          f"({flag}.<field>): {fields}")
    node[parts[-1]] = parse_value(text, current, flag)


def _no_field(flag: str, path: list[str], part: str, keys: list[str],
              config: ml_collections.ConfigDict) -> str:
    where = "config" + "".join(f".{p}" for p in path)
    if not keys:
        return f"{flag}: {where} is a value, it has no field {part!r}"
    near = difflib.get_close_matches(part, keys, n=1, cutoff=0.6)
    hint = f"did you mean {PREFIX}{'.'.join([*path, near[0]])}? " if near else ""
    text = f"{flag}: {where} has no field {part!r}; {hint}its fields: {', '.join(keys)}"
    if not path and "stages" in config and part != "stages":
        text += f" (a stage's field is {PREFIX}stages.<stage>.<field>; stages: " \
                f"{', '.join(config.get('stage_order') or config.stages.keys())})"
    return text


def parse_value(text: str, current: Any, flag: str) -> Any:
    """``text`` as a value of ``current``'s type."""
    if isinstance(current, bool):
        if text.lower() in _TRUE + _FALSE:
            return text.lower() in _TRUE
        raise ConfigError(f"{flag}={text!r}: expects true or false")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            try:
                number = float(text)  # 1e4
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
            raise ConfigError(f"{flag}={text!r}: expects an integer") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{flag}={text!r}: expects a number") from None
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None if current is not None else text
        if isinstance(current, tuple | list):  # a,b,c
            value = tuple(_literal(t.strip()) for t in text.split(",") if t.strip())
        if value is None:
            raise ConfigError(f"{flag}={text!r}: expects a Python literal like "
                              f"{current!r}") from None
    if isinstance(current, tuple | list):
        value = tuple(value) if isinstance(value, tuple | list) else (value,)
    elif isinstance(current, ml_collections.ConfigDict | dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{flag}={text!r}: expects a dict like {{'field': value}}")
        value = ml_collections.ConfigDict(value)
    return value


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply(config: ml_collections.ConfigDict, overrides: Sequence[tuple[str, str, str]]) -> None:
    """Every override, in order."""
    for flag, field, value in overrides:
        override(config, field, value, flag=flag)
