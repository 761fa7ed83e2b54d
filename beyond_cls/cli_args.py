"""Command-line flags made from config dataclasses: one flag per field, in titled groups, with the help, default,
choices and checks of its :class:`~beyond_cls.config.Setting`.

Flags left out stay None, so a ``--config`` file's values give way only to flags actually given.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from beyond_cls.config import GROUPS, Number, Setting

CONFIG_HELP = "YAML file of these settings, keyed by name (checkpoint_format or checkpoint-format); flags given win"


def _formats() -> list[str]:
    from beyond_cls.models import CHECKPOINT_FORMATS

    return ["auto", *CHECKPOINT_FORMATS]


def _datasets() -> Sequence[str]:
    from beyond_cls.data.registry import dataset_names

    return dataset_names()


# Choices whose registry fills at import time: looked up when a parser is built.
LATE_CHOICES: dict[str, Callable[[], Sequence[str]]] = {"checkpoint_format": _formats, "dataset": _datasets}


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


# ---------------------------------------------------------------------------- flags typed from MAE/timm habit
MIXED = "bf16"  # a bare --amp (timm's mixed-precision switch): the mixed dtype that needs no loss scaling
HABITS = {  # another codebase's flag -> ours, where the meaning is the same (underscore spellings are generic)
    "-b": "--batch-size",  # timm
    "-j": "--num-workers",  # timm
    "--workers": "--num-workers",  # timm
    "--output_dir": "--out",  # MAE
    "--data_path": "--data",  # MAE
    "--data-dir": "--data",  # timm
}
ANSWERS = {  # another codebase's flag that means something else here -> (the flag of ours it is about, the answer)
    "--pretrained": ("--checkpoint", "nothing is downloaded here; give the encoder weights with --checkpoint FILE "
                     "(a zoo name also finds its official file under --weights-dir; see beyond-cls zoo)"),
    "--finetune": ("--checkpoint", "MAE's --finetune names the pretrained weights; here that is --checkpoint FILE "
                   "(the encoder stays frozen)"),
    "--global_pool": ("--heads", "the aggregation is a head here: --heads mean (or cls, abmilp, ...)"),
    "--cls_token": ("--heads", "the aggregation is a head here: --heads cls (or mean, abmilp, ...)"),
    "--amp-dtype": ("--precision", "the autocast dtype is --precision bf16 or fp16"),
}


def _dashed(name: str) -> str:
    return name.replace("_", "-")


_HABITS = {_dashed(k): v for k, v in HABITS.items()}
_ANSWERS = {_dashed(k): v for k, v in ANSWERS.items()}


def _known(parser: argparse.ArgumentParser, option: str | None) -> bool:
    return option in parser._option_string_actions


def _ours(parser: argparse.ArgumentParser, name: str) -> str | None:
    """This parser's flag for ``name`` typed from habit (an underscore spelling, :data:`HABITS`), if it has one."""
    for ours in (_dashed(name) if name.startswith("--") else None, _HABITS.get(_dashed(name))):
        if _known(parser, ours):
            return ours
    return None


def _bare(parser: argparse.ArgumentParser, arg: str, rest: Sequence[str]) -> bool:
    """Whether ``arg`` is a ``--amp`` given without a value (``--amp fp8`` is a bad value, answered by argparse)."""
    return arg == "--amp" and _known(parser, arg) and (not rest or rest[0].startswith("-"))


def translate_habits(parser: argparse.ArgumentParser, args: Sequence[str]) -> list[str]:
    """``args`` with the flags of :data:`HABITS` and underscore spellings renamed to this parser's own, and a bare
    ``--amp`` given :data:`MIXED`; a flag of :data:`ANSWERS` ends parsing with its one-line answer."""
    args, out = list(args), []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        name, eq, value = arg.partition("=")
        if not arg.startswith("-") or _known(parser, name):
            out += [arg, MIXED] if _bare(parser, arg, args[i + 1:]) else [arg]
            continue
        if name[:2] in ("-b", "-j") and name[2:].isdigit():  # timm's -b64, -j8
            name, eq, value = name[:2], "=", name[2:]
        ours = _ours(parser, name)
        needs, answer = _ANSWERS.get(_dashed(name), (None, None))
        if ours is not None:
            arg = ours + eq + value
        elif answer is not None and _known(parser, needs):
            parser.error(f"{name}: {answer}")
        out.append(arg)
    return out


def _visible_flags(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings if o.startswith("--")]


def unknown_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """One line about the first argument ``parser`` does not take, with the closest flags it does take."""
    flags = [e for e in extras if e.startswith("-")]
    if not flags:
        return f"unexpected argument {extras[0]!r} ({parser.prog} --help lists what it takes)"
    typed = flags[0].partition("=")[0]
    close = closest(_dashed(typed.lower()), _visible_flags(parser))
    hint = f"did you mean {' or '.join(close)}?" if close else f"{parser.prog} --help lists the flags"
    return f"unknown flag {typed}; {hint}"


def closest(word: str, candidates: Sequence[str]) -> list[str]:
    """The candidates most like ``word`` (difflib ratio >= 0.7): the best, and a second one about as good."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    return [c for score, c in scored[:2] if score >= 0.7 and score >= scored[0][0] - 0.05] if scored else []


def habits_note(parser: argparse.ArgumentParser) -> str | None:
    """The other spellings ``parser`` takes, in one sentence for its epilog (None: it has no such flags)."""
    by_ours: dict[str, list[str]] = {}
    for habit, ours in HABITS.items():
        if _known(parser, ours):
            by_ours.setdefault(ours, []).append(habit)
    taken = [f"{' and '.join(habits)} ({ours})" for ours, habits in by_ours.items()]
    if _known(parser, "--amp"):
        taken.append(f"a bare --amp (--precision {MIXED})")
    dashed = sorted((o != "--batch-size", o) for o in _visible_flags(parser) if "-" in o[2:])
    if dashed:
        taken.insert(0, f"any flag with _ for - ({'--' + dashed[0][1][2:].replace('-', '_')})")
    return f"Also taken from MAE/timm habit: {', '.join(taken)}." if taken else None


class Parser(argparse.ArgumentParser):
    """An ArgumentParser (its subcommands' parsers too) that takes the spellings users type from MAE and timm
    habit (:func:`translate_habits`), answers an unknown flag or command with the closest ones, and keeps errors
    short."""

    def parse_known_args(self, args=None, namespace=None):
        args = translate_habits(self, sys.argv[1:] if args is None else args)
        self._check_command(args)
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(unknown_message(self, extras))
        return namespace, extras

    def _check_command(self, args: Sequence[str]) -> None:
        """An unknown subcommand is named with the closest ones."""
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        word = next((a for a in args if not a.startswith("-")), None)
        if sub is None or word is None or word in sub.choices:
            return
        close = closest(word, list(sub.choices))
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        self.error(f"unknown command {word!r}; {hint}(one of {', '.join(sub.choices)})")

    def error(self, message: str):
        """The usage when it is short (two lines at most), then ``PROG: error: MESSAGE``; exit code 2."""
        if self.format_usage().count("\n") <= 2:
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")
