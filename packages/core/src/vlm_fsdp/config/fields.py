"""Reflection over the config dataclasses: field docstrings, type names and value checking."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal

from vlm_fsdp.errors import ConfigError


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
    """Resolved type annotations of a dataclass's fields."""
    module = inspect.getmodule(cls)
    return typing.get_type_hints(cls, vars(module) if module else None)


def is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    """A short, readable spelling of a field type for error messages and docs."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def check_value(path: str, tp: Any, value: Any) -> Any:
    """Return `value` converted to field type `tp`, or raise ConfigError naming the field and expected type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return check_value(path, arg, value)
            except ConfigError:
                continue
        raise _type_error(path, tp, value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(repr(c) for c in choices)}")
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
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise _type_error(path, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _type_error(path, tp, value)
    raise AssertionError(f"unsupported config field type {tp!r} at {path}")


def _type_error(path: str, tp: Any, value: Any) -> ConfigError:
    shown = "null" if value is None else repr(value)
    return ConfigError(f"{path}: expected {type_name(tp)}, got {shown} ({type(value).__name__})")
