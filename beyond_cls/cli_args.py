"""Command-line flags made from config dataclasses: one flag per field, in titled groups, with the help, default,
choices and checks of its :class:`~beyond_cls.config.Setting`.

Flags left out stay None, so a ``--config`` file's values give way only to flags actually given.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from beyond_cls.config import GROUPS, Number, Setting

CONFIG_HELP = "YAML file of these settings, keyed by name (checkpoint_format or checkpoint-format); flags given win"


def _formats() -> list[str]:
    from beyond_cls.models import CHECKPOINT_FORMATS

    return ["auto", *CHECKPOINT_FORMATS]


# Choices whose registry fills at import time: looked up when a parser is built.
LATE_CHOICES: dict[str, Callable[[], Sequence[str]]] = {"checkpoint_format": _formats}


def flag(name: str) -> str:
    """``checkpoint_format`` -> ``--checkpoint-format``."""
    return "--" + name.replace("_", "-")


def number_type(number: Number) -> Callable[[str], Any]:
    """An argparse type for ``number``: errors read ``argument --x: expected a positive integer, got '0'``."""

    def parse(text: str) -> Any:
        try:
            return number.parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _shown(f: dataclasses.Field, s: Setting) -> str | None:
    if s.shown is not None:
        return f"default: {s.shown}"
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        return "required"
    if isinstance(f.default, bool):
        return f"default: {'on' if f.default else 'off'}"
    return None if f.default is None else f"default: {f.default}"


def help_text(f: dataclasses.Field, s: Setting) -> str:
    """The flag's help: the setting's text, its other names, ``repeatable``, and the default read off the
    dataclass, once."""
    also = "also " + ", ".join(map(flag, s.aliases)) if s.aliases else None
    notes = ", ".join(n for n in (also, "repeatable" if s.repeat else None, _shown(f, s)) if n)
    text = s.help + (": off" if f.default is True else "")  # the flag is --no-NAME
    return (text + (f" ({notes})" if notes else "")).replace("%", "%%")


def _flag_options(f: dataclasses.Field, s: Setting) -> tuple[list[str], dict[str, Any]]:
    if s.positional:  # optional on the command line, so that --config can give it
        return [f.name], {"nargs": "*" if s.repeat else "?", "default": argparse.SUPPRESS, "help": help_text(f, s),
                          **({"metavar": s.metavar} if s.metavar else {})}
    kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text(f, s)}
    if f.default is True:
        return ["--no-" + f.name.replace("_", "-")], {**kw, "action": "store_const", "const": False}
    if f.default is False:
        return [flag(f.name)], {**kw, "action": "store_const", "const": True}
    if f.default is None and str(f.type).startswith("bool"):
        return [flag(f.name)], {**kw, "action": argparse.BooleanOptionalAction}
    choices = LATE_CHOICES[f.name]() if f.name in LATE_CHOICES else s.choices
    if choices:
        kw["choices"] = choices
    if s.metavar:
        kw["metavar"] = s.metavar
    if s.number is not None:
        kw["type"] = number_type(s.number)
    if s.repeat:
        kw["action"] = "append"
    return [s.flag or flag(f.name)], kw


def add_settings(parser: argparse.ArgumentParser, cls: type, per_model: Sequence[str] = ()) -> None:
    """``--config`` and one flag per field of the config dataclass ``cls``, in groups ordered as :data:`GROUPS`.

    ``per_model``: ``model`` and the fields that belong to the ``--model`` before them (see :class:`PerModel`).
    """
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    groups = {g: parser.add_argument_group(f"{g} settings") for g in GROUPS}
    required_first = sorted(dataclasses.fields(cls), key=lambda f: _shown(f, f.metadata["setting"]) != "required")
    for f in required_first:
        s = f.metadata["setting"]
        names, kw = _flag_options(f, s)
        if f.name in per_model:
            kw.update(action=PerModel, attached=tuple(n for n in per_model if n != "model"))
        groups[s.group].add_argument(*names, **kw)
        for alias in s.aliases:  # former names: accepted, listed in the help of the flag they stand for
            groups[s.group].add_argument(flag(alias), **{**kw, "help": argparse.SUPPRESS})


class PerModel(argparse.Action):
    """``--model`` (repeatable) and the encoder flags that belong to the most recent ``--model``.

    With one ``--model`` every dest holds a plain value; from the second on, ``model`` and each flag given
    for any model hold lists aligned with the models (None: not given). Flags before any ``--model`` stay
    plain values that override a --config file's, unless a ``--model`` follows: then they are an error.
    """

    def __init__(self, *args: Any, attached: tuple[str, ...], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attached = attached

    def __call__(self, parser, namespace, values, option_string=None):
        models = getattr(namespace, "model", None)
        count = 0 if models is None else len(models) if isinstance(models, list) else 1
        if self.dest == "model":
            for dest in self.attached:
                value = getattr(namespace, dest, None)
                if count == 0 and value is not None:
                    self._fail(parser, f"{flag(dest)} must come after the --model it belongs to")
                if count >= 1 and value is not None:  # keep the lists aligned with the models
                    setattr(namespace, dest, (value if isinstance(value, list) else [value]) + [None])
            namespace.model = values if count == 0 else [*(models if count > 1 else [models]), values]
            return
        value = getattr(namespace, self.dest, None)
        if count <= 1:
            if value is not None:
                self._fail(parser, f"{option_string} given twice" + (f" for --model {models}" if count else ""))
            setattr(namespace, self.dest, values)
            return
        value = list(value) if isinstance(value, list) else [None] * count
        if value[-1] is not None:
            self._fail(parser, f"{option_string} given twice for --model {models[-1]}")
        value[-1] = values
        setattr(namespace, self.dest, value)

    @staticmethod
    def _fail(parser: argparse.ArgumentParser, message: str) -> None:
        parser.exit(2, f"{parser.prog}: error: {message}\n")
