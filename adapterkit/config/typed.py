"""Typed parsing: the raw mapping of a recipe checked and coerced against the schema's classes, each
problem naming its file and line (or override), the bad value and what is allowed."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from adapterkit.config.source import RecipeSource
from adapterkit.errors import Problem, did_you_mean

# ---------------------------------------------------------------------------------------------
# Typed parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


_NO = object()


def _coerce(value: Any, tp: Any, key: str, src: RecipeSource, problems: list[Problem]) -> Any:
    """Return `value` converted to `tp`, or _NO (with no problem recorded) if it does not fit."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg, key, src, problems)
            if out is not _NO:
                return out
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if origin is Literal:
        # YAML 1.1 reads a bare `off` (and `on`, `no`, `yes`) as a boolean; a choice named off means it.
        if isinstance(value, bool) and not value and "off" in typing.get_args(tp):
            return "off"
        return value if isinstance(value, str) and value in typing.get_args(tp) else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads `2e-4` (no dot) as a string; a careful user still means a number.
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _NO
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return _NO
        items = [_coerce(v, item_tp, key, src, problems) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            return _NO
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return _NO
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            return _NO
        return _build(tp, value, key + ".", src, problems)
    raise TypeError(f"unsupported config type {tp!r}")


def _where(src: RecipeSource, key: str) -> str:
    while key:
        if key in src.where:
            return src.where[key]
        key = key.rpartition(".")[0]
    return src.path


def _build(cls: type, data: dict[str, Any], prefix: str, src: RecipeSource, problems: list[Problem]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            hint = did_you_mean(str(key), names)
            allowed = ", ".join(names)
            problems.append(Problem(_where(src, dotted), f"unknown key '{key}'" + (f" ({hint})" if hint else ""),
                                    dotted, f"use one of: {allowed}"))
            continue
        tp = hints[key]
        out = _coerce(value, tp, dotted, src, problems)
        if out is _NO:
            choices = typing.get_args(tp) if typing.get_origin(tp) is Literal else ()
            hint = did_you_mean(value, choices) if isinstance(value, str) and choices else None
            problems.append(Problem(_where(src, dotted), f"{value!r} is not allowed" + (f" ({hint})" if hint else ""),
                                    dotted, f"expected {_type_name(tp)}"))
            continue
        kwargs[key] = out
    return cls(**kwargs)
