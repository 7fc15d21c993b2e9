"""Typed settings: one frozen dataclass per config block, checked in the user's words.

A *block* is a dataclass whose fields declare their rule with :func:`choice`,
:func:`integer`, :func:`number`, :func:`regex`, :func:`items` and friends (a plain default
means "any value of the default's type")::

    @dataclasses.dataclass(frozen=True)
    class Merging(schema.Block):
        enabled: bool = False
        metric: str = schema.choice("euclidean", ("euclidean", "cosine"), noun="a metric")
        threshold: float = schema.number(0.0)

        def check(self):                      # rules between fields
            if self.metric == "cosine" and not -1 <= self.threshold <= 1:
                raise schema.FieldError("threshold", f"={self.threshold!r} must be in [-1, 1]")

Building a block (``Merging(metric="cosine")``) checks every field and then ``check``;
a bad value raises :class:`FieldError`, one line that names the field
(``metric='x' is not a metric; allowed: euclidean, cosine``). :func:`parse` builds a block
from a ``ConfigDict`` block and names it as the user wrote it
(``config.merging.metric='x' is not a metric; ...``), refusing unknown fields;
:func:`defaults` gives the ``ConfigDict`` of a block's defaults, for configs to start from.
Library functions take their block's fields as keyword arguments and build the block, so
the rules live once, here; :func:`named` re-raises the ``FieldError`` of a call made for a
config block under that block's name.

Only ``dataclasses``, ``re`` and ``ml_collections`` are imported: configs load without jax.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import ml_collections


class ConfigError(ValueError):
    """A value the user chose (a config field, a file, an argument) that jaxkd refuses.

    Its message is one line in the user's words; the launcher prints it without a
    traceback. Any other exception is jaxkd's own bug and keeps its traceback.
    """


class MissingError(ConfigError, FileNotFoundError):
    """A file or directory that the user named (or that a run they named should hold) does
    not exist; also a ``FileNotFoundError``."""


class FieldError(ConfigError):
    """A bad value of one field: ``str(e)`` is ``field`` followed by ``detail``
    (``"sparsity=1.5 must be in [0, 1)"``), prefixed by the block's name once known."""

    def __init__(self, field: str, detail: str):
        self.field, self.detail = field, detail
        sep = "" if detail.startswith(("=", "[", ".", ":")) else " "
        super().__init__(f"{field}{sep}{detail}")

    def under(self, where: str) -> FieldError:
        """The same error named under ``where`` (``'config.pruning'``)."""
        return FieldError(f"{where}.{self.field}" if where else self.field, self.detail)


@contextlib.contextmanager
def named(where: str) -> Iterator[None]:
    """Re-raises a :class:`FieldError` raised inside as ``where.field``."""
    try:
        yield
    except FieldError as e:
        raise e.under(where) from None


# ----------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """What values a field takes; ``convert`` returns the checked value or raises."""

    def convert(self, field: str, value: Any) -> Any:
        return value


def _describe(value: Any) -> str:
    return f"={value!r}"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
    options: tuple[Any, ...]
    noun: str = "supported"

    def convert(self, field: str, value: Any) -> Any:
        if isinstance(value, bool) or value not in self.options:
            shown = ", ".join("''" if o == "" else str(o) for o in self.options)
            raise FieldError(field, f"{_describe(value)} is not {self.noun}; allowed: {shown}")
        return value


@dataclasses.dataclass(frozen=True)
class Integer(Rule):
    minimum: int | None = None
    maximum: int | None = None

    def convert(self, field: str, value: Any) -> int:
        ok = _is_int(value)
        ok = ok and (self.minimum is None or value >= self.minimum)
        ok = ok and (self.maximum is None or value <= self.maximum)
        if not ok and self.minimum == 1 and self.maximum is None:
            raise FieldError(field, f"{_describe(value)} must be a positive integer")
        if not ok:
            bounds = [f">= {self.minimum}" if self.minimum is not None else "",
                      f"<= {self.maximum}" if self.maximum is not None else ""]
            bounds = " and ".join(b for b in bounds if b)
            raise FieldError(field, f"{_describe(value)} must be an integer"
                                    f"{' ' + bounds if bounds else ''}")
        return int(value)


@dataclasses.dataclass(frozen=True)
class Number(Rule):
    """A real number in ``[lo, hi]``, each end open or closed (None: unbounded)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    hi_name: str | None = None  # how to print the upper end (e.g. "sparsity=0.5")

    def convert(self, field: str, value: Any) -> float:
        ok = _is_number(value) and value == value  # NaN fails
        if ok and self.lo is not None:
            ok = value > self.lo if self.lo_open else value >= self.lo
        if ok and self.hi is not None:
            ok = value < self.hi if self.hi_open else value <= self.hi
        if not ok:
            raise FieldError(field, f"{_describe(value)} must be {self.interval()}")
        return float(value)

    def interval(self) -> str:
        if self.lo is not None and self.hi is not None:
            return (f"in {'(' if self.lo_open else '['}{self.lo:g}, "
                    f"{self.hi_name or format(self.hi, 'g')}{')' if self.hi_open else ']'}")
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return "a number"


@dataclasses.dataclass(frozen=True)
class Regex(Rule):
    def convert(self, field: str, value: Any) -> str:
        try:
            re.compile(value)
        except (re.error, TypeError) as e:
            raise FieldError(field, f"{_describe(value)} is not a valid regex: {e}") from None
        return value


@dataclasses.dataclass(frozen=True)
class Flag(Rule):
    def convert(self, field: str, value: Any) -> bool:
        if not isinstance(value, bool) and not (_is_int(value) and value in (0, 1)):
            raise FieldError(field, f"{_describe(value)} must be True or False")
        return bool(value)


@dataclasses.dataclass(frozen=True)
class Text(Rule):
    optional: bool = False  # None allowed

    def convert(self, field: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        if not isinstance(value, str):
            raise FieldError(field, f"{_describe(value)} must be a string")
        return value


@dataclasses.dataclass(frozen=True)
class Maybe(Rule):
    """None, or a value that ``rule`` takes."""

    rule: Rule = Rule()

    def convert(self, field: str, value: Any) -> Any:
        return None if value is None else self.rule.convert(field, value)


@dataclasses.dataclass(frozen=True)
class Items(Rule):
    """A tuple whose every item follows ``item`` (named ``field[i]`` in errors)."""

    item: Rule = Rule()

    def convert(self, field: str, value: Any) -> tuple[Any, ...]:
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, Sequence):
            raise FieldError(field, f"{_describe(value)} must be a tuple")
        return tuple(self.item.convert(f"{field}[{i}]", v) for i, v in enumerate(value))


@dataclasses.dataclass(frozen=True)
class Keys(Rule):
    """A mapping with exactly the keys of ``fields`` (each a Rule): a small record."""

    fields: tuple[tuple[str, Rule], ...]

    def convert(self, field: str, value: Any) -> dict[str, Any]:
        names = [n for n, _ in self.fields]
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()
        if not isinstance(value, Mapping) or set(value) != set(names):
            raise FieldError(field, f"{_describe(value)} must be a dict with exactly the keys "
                                    f"{' and '.join(repr(n) for n in names)}")
        return {n: rule.convert(f"{field}.{n}", value[n]) for n, rule in self.fields}


@dataclasses.dataclass(frozen=True)
class Record(Rule):
    """A mapping read as the nested block ``cls`` (unknown keys refused, defaults filled)."""

    cls: type = object

    def convert(self, field: str, value: Any) -> Any:
        if isinstance(value, self.cls):
            return value
        if isinstance(value, ml_collections.ConfigDict):
            value = value.to_dict()
        if not isinstance(value, Mapping):
            raise FieldError(field, f"{_describe(value)} must be a dict of "
                                    f"{', '.join(field_names(self.cls))}")
        return build(self.cls, value, where=field)


@dataclasses.dataclass(frozen=True)
class Free(Rule):
    """A mapping passed on as it is (model kwargs, loss terms): checked where it is used."""

    def convert(self, field: str, value: Any) -> Any:
        if isinstance(value, ml_collections.ConfigDict):
            return value.to_dict()
        return value


def _declare(default: Any, rule: Rule) -> Any:
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"rule": rule})
    return dataclasses.field(default=default, metadata={"rule": rule})


def choice(default: Any, options: Sequence[Any], *, noun: str = "supported") -> Any:
    """A field that takes one of ``options`` (``'x' is not {noun}; allowed: ...``)."""
    return _declare(default, Choice(tuple(options), noun))


def integer(default: int, *, minimum: int | None = None, maximum: int | None = None) -> Any:
    return _declare(default, Integer(minimum, maximum))


def number(default: float, *, lo: float | None = None, hi: float | None = None,
           lo_open: bool = False, hi_open: bool = False) -> Any:
    return _declare(default, Number(lo, hi, lo_open, hi_open))


def regex(default: str) -> Any:
    return _declare(default, Regex())


def text(default: str | None, *, optional: bool = False) -> Any:
    return _declare(default, Text(optional))


def items(default: tuple[Any, ...], item: Rule = Rule()) -> Any:
    return _declare(tuple(default), Items(item))


def maybe(default: Any, rule: Rule) -> Any:
    """A field that is None or follows ``rule``."""
    return _declare(default, Maybe(rule))


def free(default: Any) -> Any:
    return _declare(default, Free())


def _rule_of(f: dataclasses.Field) -> Rule:
    if "rule" in f.metadata:
        return f.metadata["rule"]
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
    return {"bool": Flag(), "int": Integer(), "float": Number(), "str": Text()}.get(kind, Rule())


# ----------------------------------------------------------------------------- blocks


class Block:
    """Base of the typed blocks: checks every field, then :meth:`check`, at construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Block):
                continue
            object.__setattr__(self, f.name, _rule_of(f).convert(f.name, value))
        self.check()

    def check(self) -> None:
        """Rules between fields; raise :class:`FieldError` naming the field."""

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (getattr(self, f.name).to_dict() if isinstance(getattr(self, f.name),
                                                                       Block)
                         else getattr(self, f.name)) for f in dataclasses.fields(self)}

    def kwargs(self, *, exclude: Sequence[str] = ("enabled",)) -> dict[str, Any]:
        """The fields as keyword arguments of the block's library function."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in exclude}


B = TypeVar("B", bound=Block)


def field_names(cls: type[Block]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def build(cls: type[B], values: Mapping[str, Any] | None = None, *, where: str = "") -> B:
    """``cls(**values)`` with unknown fields refused and errors named under ``where``."""
    values = dict(values or {})
    unknown = sorted(set(values) - set(field_names(cls)))
    if unknown:
        raise FieldError(where or cls.__name__, f"has unknown field(s) {', '.join(unknown)}; "
                                                f"fields: {', '.join(field_names(cls))}")
    with named(where):
        return cls(**values)


def parse(cls: type[B], block: Any, where: str) -> B:
    """The typed block of a config block (a ``ConfigDict``, a dict or already a ``cls``);
    a nested block field is parsed as ``where.field``. Errors name ``where.field``."""
    if isinstance(block, cls):
        return block
    if isinstance(block, ml_collections.ConfigDict):
        block = block.to_dict()
    if block is not None and not isinstance(block, Mapping):
        raise ConfigError(f"{where} must be a block of fields, got {block!r}")
    values = dict(block or {})
    for f in dataclasses.fields(cls):
        nested = _nested_type(cls, f)
        if nested is not None and f.name in values:
            values[f.name] = parse(nested, values[f.name], f"{where}.{f.name}")
    return build(cls, values, where=where)


def _nested_type(cls: type[Block], f: dataclasses.Field) -> type[Block] | None:
    default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
               else f.default)
    return type(default) if isinstance(default, Block) else None


def nested(cls: type[B]) -> Any:
    """A field holding a whole nested block, default ``cls()``."""
    return dataclasses.field(default_factory=cls)


def defaults(cls: type[Block]) -> ml_collections.ConfigDict:
    """The ``ConfigDict`` of a block's defaults (the ``config.<block>`` a config starts from)."""
    return ml_collections.ConfigDict(cls().to_dict())
