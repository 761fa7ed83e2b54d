"""Whether a setting's value has its field's type, and how to say it in one short line.

A field's annotation is the type (``bool`` takes only booleans, ``int`` integers but no booleans, ``float`` any
number, ``str`` strings, ``list[X]`` lists of X or one X); a list setting held as text declares its items' type
(:attr:`beyond_cls.config.Setting.items`) and takes comma-separated text, one item or a list of items. Values in
messages are cut short without building their whole ``repr`` (a YAML alias bomb would expand to gigabytes).
"""

from __future__ import annotations

import functools
import operator
import os
import reprlib
import types
import typing
from typing import Any

__all__ = ["as_plain", "field_types", "short", "type_problem"]

_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 60, 60, 40
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4


def short(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters, without ever building the whole of it (YAML aliases)."""
    return _SHORT.repr(value)[:120]


_NAMES = {bool: ["true", "false"], int: ["an integer"], float: ["a number"], str: ["a string"],
          type(None): ["null"]}
_PLURALS = {int: "integers", float: "numbers", str: "strings", type(None): "nulls", bool: "booleans"}


def _fits(value: Any, tp: Any) -> bool:
    """Whether ``value`` is of the annotated type ``tp`` (bool is no int, an int is a float; unknown types pass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value) if args else True
    if tp is bool or tp is type(None) or tp is str:
        return isinstance(value, tp)
    if tp in (int, float):
        return isinstance(value, int if tp is int else (int, float)) and not isinstance(value, bool)
    return True


def _arms(tp: Any) -> tuple[Any, ...]:
    """The types of a union, or ``(tp,)``."""
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)


def _names(tp: Any) -> list[str]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return [n for a in args for n in _names(a)]
    if origin in (list, tuple) and args:
        inner = typing.get_args(args[0]) or (args[0],)
        return ["a list of " + " or ".join(_PLURALS.get(a, str(a)) for a in inner)]
    return _NAMES.get(tp, [getattr(tp, "__name__", str(tp))])


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def _expected(tp: Any, items: type | None) -> tuple[Any, str]:
    """The type a value must have and its description: a list setting takes one item too (the job makes it a
    list); with ``items``: text, one item or a list of items."""
    if items is None:
        arms = _arms(tp)
        singles = [typing.get_args(a)[0] for a in arms if typing.get_origin(a) is list and typing.get_args(a)]
        singles = [b for a in singles for b in (typing.get_args(a) or (a,)) if b not in arms]
        accepted = functools.reduce(operator.or_, [*singles, tp])
        return accepted, _either(list(dict.fromkeys(_names(accepted))))
    item = items | str if items is not str else str
    accepted: Any = str | items | list[item]
    names = ["a comma-separated string", *([] if items is str else _names(items)), *_names(list[items])]
    if _fits(None, tp):
        accepted, names = accepted | None, [*names, "null"]
    return accepted, _either(names)


def _type_error(name: str, value: Any, tp: Any, what: str) -> str:
    """The message for a value of the wrong type; for a list where a list is accepted, its first bad item."""
    items = [typing.get_args(a)[0] for a in _arms(tp) if typing.get_origin(a) in (list, tuple) and typing.get_args(a)]
    if isinstance(value, (list, tuple)) and items:
        item = functools.reduce(operator.or_, items)
        for i, v in enumerate(value):
            if not _fits(v, item):
                return f"{name}[{i}] must be {_either(_names(item))}, got {short(v)} ({type(v).__name__})"
    return f"{name} must be {what}, got {short(value)} ({type(value).__name__})"


def as_plain(value: Any) -> Any:
    """Path objects as strings (also in lists): the Python API may pass them where a setting holds a path."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, os.PathLike) for v in value):
        return [os.fspath(v) if isinstance(v, os.PathLike) else v for v in value]
    return value


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> evaluated annotation of a config dataclass (cached per class)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation that cannot be evaluated: not checked
        return {}


def type_problem(name: str, value: Any, annotation: Any, items: type | None = None) -> str | None:
    """None when ``value`` fits setting ``name``'s ``annotation`` (and ``items``), else the one-line message."""
    tp, what = _expected(annotation, items)
    return None if _fits(value, tp) else _type_error(name, value, tp, what)
