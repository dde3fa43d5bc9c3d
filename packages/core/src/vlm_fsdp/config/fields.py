"""Reflection over the config dataclasses: field docstrings, type names, declared bounds and value checking.

A numeric field declares its bounds once, in its annotation: `num_layers: Annotated[int, Range(ge=1, le=10**5)]`
(and a list field its length with `Length`). `check_value` converts a value to a field's type and checks those
bounds; `field_problems` runs it over every field of a config, which is how `validate.problems` sees them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import math
import re
import reprlib
import textwrap
import types
import typing
import unicodedata
from functools import cache
from typing import Annotated, Any, Literal

from vlm_fsdp.errors import ConfigError

# Longest value shown in an error message; longer ones are cut.
SHOWN_CHARS = 60
# Longest string a config field takes (paths, names).
MAX_STRING_CHARS = 4096
# What YAML 1.1 reads as text but is meant as a number: 1e-5, 3E4.
_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclasses.dataclass(frozen=True)
class Range:
    """Bounds of a number: `ge`/`le` inclusive, `gt`/`lt` exclusive, None unbounded. Floats must also be finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, path: str, value: float) -> None:
        broken = self.broken(value)
        if broken:
            raise ConfigError(f"{path} must be {broken} ({self.describe()}), got {shorten(value)}")

    def broken(self, value: float) -> str | None:
        """The bound `value` breaks ('at least 1'), or None."""
        if self.ge is not None and value < self.ge:
            return f"at least {number(self.ge)}"
        if self.gt is not None and value <= self.gt:
            return f"greater than {number(self.gt)}"
        if self.le is not None and value > self.le:
            return f"at most {number(self.le)}"
        if self.lt is not None and value >= self.lt:
            return f"less than {number(self.lt)}"
        return None

    def describe(self) -> str:
        """The allowed range, e.g. '1 <= value <= 1,024'."""
        parts = []
        if self.ge is not None or self.gt is not None:
            parts.append(f"{number(self.ge)} <=" if self.ge is not None else f"{number(self.gt)} <")
        parts.append("value")
        if self.le is not None or self.lt is not None:
            parts.append(f"<= {number(self.le)}" if self.le is not None else f"< {number(self.lt)}")
        return " ".join(parts) if len(parts) > 1 else "any finite number"


@dataclasses.dataclass(frozen=True)
class Length:
    """Number of items of a list: between `min` and `max`; `what` names the items in messages."""

    min: int = 0
    max: int = 1024
    what: str = "items"

    def check(self, path: str, value: list) -> None:
        if self.min <= len(value) <= self.max:
            return
        wanted = f"exactly {self.min}" if self.min == self.max else f"{self.min} to {number(self.max)}"
        raise ConfigError(f"{path} must have {wanted} {self.what}, got {number(len(value))}: {shorten(value)}")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a dataclass (the string literal after its annotation)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


@cache
def field_types(cls: type) -> dict[str, Any]:
    """Resolved type annotations of a dataclass's fields, without their bounds (`int`, `list[int] | None`)."""
    module = inspect.getmodule(cls)
    return typing.get_type_hints(cls, vars(module) if module else None)


@cache
def field_hints(cls: type) -> dict[str, Any]:
    """Resolved type annotations of a dataclass's fields with their declared bounds (`Annotated[int, Range]`)."""
    module = inspect.getmodule(cls)
    return typing.get_type_hints(cls, vars(module) if module else None, include_extras=True)


def is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    """A short, readable spelling of a field type for error messages and docs."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return type_name(typing.get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _TypeMismatch(ConfigError):
    """The value is not of the field's type (as opposed to a value of the right type out of its bounds)."""


def check_value(path: str, tp: Any, value: Any) -> Any:
    """Return `value` converted to field type `tp` after checking the bounds `tp` declares, or raise ConfigError
    naming the field, the value (shortened) and what is expected."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        base, *rules = typing.get_args(tp)
        value = check_value(path, base, value)
        for rule in rules:
            rule.check(path, value)
        return value
    if origin in (typing.Union, types.UnionType):
        return _check_union(path, tp, value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str | int | bool) and value in choices:
            return value
        raise _TypeMismatch(f"{path}: {shorten(value)} is not one of {', '.join(repr(c) for c in choices)}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise _type_error(path, tp, value)
        return [check_value(f"{path}[{i}]", item, v) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _type_error(path, tp, value)
    if tp is float:
        return _check_float(path, value)
    if tp is str:
        return _check_string(path, value)
    raise AssertionError(f"unsupported config field type {tp!r} at {path}")


def _check_union(path: str, tp: Any, value: Any) -> Any:
    args = typing.get_args(tp)
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return check_value(path, arg, value)
        except _TypeMismatch:
            continue
    raise _type_error(path, tp, value)


def _check_float(path: str, value: Any) -> float:
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value):
        raise _TypeMismatch(
            f"{path}: expected float, got the text {shorten(value)}: YAML reads a number with an exponent as a "
            "number only with a dot in it and a signed exponent, e.g. 1.0e-5"
        )
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise _type_error(path, float, value)
    try:
        converted = float(value)
    except OverflowError:
        raise ConfigError(f"{path} must be a finite number, got {shorten(value)}, which is too large") from None
    if not math.isfinite(converted):
        raise ConfigError(f"{path} must be a finite number, got {converted}")
    return converted


def _check_string(path: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(path, str, value)
    if len(value) > MAX_STRING_CHARS:
        raise ConfigError(f"{path} must be at most {number(MAX_STRING_CHARS)} characters, got {number(len(value))}")
    bad = control_character(value)
    if bad is not None:
        raise ConfigError(f"{path}: {shorten(value)} holds the control character {describe_character(value[bad])}")
    return value


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    shown = "null" if value is None else shorten(value)
    return _TypeMismatch(f"{path}: expected {type_name(tp)}, got {shown} ({type(value).__name__})")


def field_problems(config: Any, prefix: str = "") -> list[str]:
    """Why fields of a config (and of its sections) break their type or declared bounds; empty when none does."""
    out = []
    for name, hint in field_hints(type(config)).items():
        path, value = f"{prefix}{name}", getattr(config, name)
        if is_config_class(hint):
            if isinstance(value, hint):
                out += field_problems(value, f"{path}.")
            else:
                out.append(f"{path}: expected a section ({hint.__name__}), got {shorten(value)}")
            continue
        try:
            check_value(path, hint, value)
        except ConfigError as err:
            out.append(str(err))
    return out


# --- showing values in messages ---------------------------------------------------------------------------

_SUSPECT = re.compile(r"[^\x20-\x7e]")
_NONCHARACTERS = frozenset("\ufffe\uffff")


class _ShortRepr(reprlib.Repr):
    """reprlib's cut-down repr, with integers too long for `repr` shown as their length."""

    def __init__(self) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple, self.maxdict, self.maxset = 3, 6, 6, 4, 4
        self.maxstring = self.maxother = SHOWN_CHARS

    def repr_int(self, x: int, level: int) -> str:
        return shorten(x)


_REPR = _ShortRepr()


def control_character(text: str, allowed: str = "") -> int | None:
    """Index of the first control character of `text` (ANSI escapes, NUL, newlines, bidi and zero-width format
    characters, undecodable bytes) that is not in `allowed`; None when there is none."""
    for match in _SUSPECT.finditer(text):
        char = match.group()
        if char not in allowed and (char in _NONCHARACTERS or unicodedata.category(char) in ("Cc", "Cf", "Cs")):
            return match.start()
    return None


def describe_character(char: str) -> str:
    """'U+001B', 'U+202E (right-to-left override)', 'U+DCFF (an undecodable byte)'."""
    name = "an undecodable byte" if unicodedata.category(char) == "Cs" else unicodedata.name(char, "").lower()
    return f"U+{ord(char):04X}" + (f" ({name})" if name else "")


def number(value: float) -> str:
    """A bound or count as written in messages: 1,048,576 or 1e-08."""
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}" if value.bit_length() < 64 else shorten(value)
    return f"{value:g}"


def shorten(value: Any, limit: int = SHOWN_CHARS) -> str:
    """`value` as Python writes it, control characters escaped and cut to about `limit` characters, so that an
    error message never echoes megabytes or terminal escape sequences."""
    if isinstance(value, int) and not isinstance(value, bool):
        digits = math.floor(value.bit_length() * math.log10(2)) + 1  # the exact count or one more
        return str(value) if digits <= limit else f"{'-' if value < 0 else ''}an integer of about {digits:,} digits"
    if isinstance(value, str):
        shown = repr(value[:limit])
        return shown if len(value) <= limit else f"{shown}... ({len(value):,} characters)"
    shown = _REPR.repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "..."
