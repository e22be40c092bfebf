"""Pydantic annotation -> click parameter type, for the flags flows/cli.py generates from the job configs: scalars,
`X | None` (`null` unsets), lists (repeat the flag or separate with commas), Literal/Enum choices, and YAML for
anything else (pydantic validates it)."""
from __future__ import annotations

import enum
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import click
import yaml

NULL = "null"  # the YAML spelling of None; an optional field's flag takes it to unset the field


class OptionalValue(click.ParamType):
    """`X | None`: a value of X, or `null` for None."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() == NULL:
            return None
        return self.inner.convert(value, param, ctx)


class CommaList(click.ParamType):
    """One occurrence of a list flag: comma-separated values, each converted by the element type."""

    name = "list"

    def __init__(self, inner: click.ParamType):
        self.inner = inner

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return list(value)
        return [self.inner.convert(v.strip(), param, ctx) for v in str(value).split(",") if v.strip()]


class Mapped(click.Choice):
    """Literal/Enum choices: the user types str(value), the config gets the value itself."""

    def __init__(self, values: list[Any]):
        self.values = {str(getattr(v, "value", v)): v for v in values}
        super().__init__(list(self.values))

    def convert(self, value, param, ctx):
        return self.values[super().convert(value, param, ctx)]


class YAMLValue(click.ParamType):
    """Fallback for any other type (dict, nested union...): the value is read as YAML; pydantic validates it."""

    name = "yaml"

    def convert(self, value, param, ctx):
        try:
            return yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError as e:
            self.fail(f"{value!r} is not valid YAML: {e}", param, ctx)


SCALARS: dict[Any, click.ParamType] = {int: click.INT, float: click.FLOAT, str: click.STRING, Path: click.STRING}


def strip_optional(ann: Any) -> tuple[Any, bool]:
    if typing.get_origin(ann) in (Union, types.UnionType):
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(ann))
    return ann, False


def strip_annotated(ann: Any) -> Any:
    while typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    return ann


def click_type(ann: Any) -> tuple[click.ParamType | None, bool]:
    """(click type, is a list); type None means a bool flag pair."""
    ann, optional = strip_optional(strip_annotated(ann))
    ann = strip_annotated(ann)
    origin = typing.get_origin(ann)
    is_list = False
    if origin in (list, tuple, set, frozenset) or ann in (list, tuple, set, frozenset):
        args = [a for a in typing.get_args(ann) if a is not Ellipsis]
        ann, is_list = (strip_annotated(args[0]) if len(set(args)) == 1 else str), True
        origin = typing.get_origin(ann)
    if ann is bool and not optional and not is_list:
        return None, False
    if origin is Literal:
        t: click.ParamType = Mapped(list(typing.get_args(ann)))
    elif isinstance(ann, type) and issubclass(ann, enum.Enum):
        t = Mapped(list(ann))
    elif ann is bool:
        t = click.BOOL
    else:
        t = SCALARS.get(ann) or YAMLValue()
    if is_list:
        t = CommaList(t)
    if optional:
        t = OptionalValue(t)
    return t, is_list


def metavar_for(ptype: click.ParamType, is_list: bool) -> str:
    inner = ptype.inner if isinstance(ptype, OptionalValue) else ptype
    inner = inner.inner if isinstance(inner, CommaList) else inner
    if isinstance(inner, click.Choice):
        word = "|".join(inner.choices)
    else:
        word = {"integer": "N", "float": "F", "text": "TEXT", "boolean": "BOOL"}.get(inner.name, "VALUE")
    if is_list:
        word = f"{word}[,{word}...]"
    return f"{word}|{NULL}" if isinstance(ptype, OptionalValue) else word


def show(value: Any, is_bool: bool = False) -> str:
    if value is None:
        return NULL
    if is_bool:
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(getattr(value, "value", value))
