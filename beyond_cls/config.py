"""Job configs: dataclasses whose fields carry their own help, group and checks; YAML files and command-line
overrides fill them (:func:`load_config`), and ``beyond_cls.cli_args`` turns the same fields into flags.

Every value is checked against its field's type (a YAML ``"false"`` is no boolean, ``1.5`` no integer; a path
object counts as a string) and its setting's choices and range; list settings given as text (``seeds: 0,1``)
declare the type of their items (:attr:`Setting.items`). Config files are read as UTF-8, with at most
:data:`MAX_CONFIG_VALUES` values once YAML aliases are expanded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from beyond_cls.value_types import as_plain, field_types, short, type_problem

T = TypeVar("T")

GROUPS = ("model", "data", "schedule", "heads", "runtime", "output")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
MAX_CONFIG_VALUES = 10_000  # values of a config file with its YAML aliases expanded (an alias bomb expands to 10^9)
MAX_CONFIG_TEXT = 10_000  # characters of one string value


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the key and what was expected."""


@dataclass(frozen=True)
class Number:
    """A numeric range: a finite ``kind`` above ``minimum`` (``strict``) or at least it, described as ``what``."""

    kind: type
    minimum: float
    strict: bool
    what: str

    def holds(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int if self.kind is int else (int, float)):
            return False
        return math.isfinite(value) and (value > self.minimum if self.strict else value >= self.minimum)

    def parse(self, text: str) -> Any:
        """``text`` as a number in range; ValueError ``expected {what}, got {text!r}`` otherwise."""
        try:
            value = self.kind(text)
        except ValueError:
            value = None
        if not self.holds(value):
            raise ValueError(f"expected {self.what}, got {text!r}")
        return value


POSITIVE_INT = Number(int, 0, True, "a positive integer")
NON_NEGATIVE_INT = Number(int, 0, False, "an integer >= 0")
POSITIVE_FLOAT = Number(float, 0, True, "a positive number")
NON_NEGATIVE_FLOAT = Number(float, 0, False, "a number >= 0")
BLOCK = Number(int, -1, False, "a block index (0-based, -1 = last)")


class _Required:
    """The default of a :class:`Setting` that has none."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Setting:
    """Everything about one setting; calling it declares a dataclass field (optionally with another default).

    ``shown``: the default in words where the value says little (None, a factory); ``aliases``: former names,
    accepted as flags and as config keys; ``flag``: the flag when it is not ``--<field name>``; ``repeat``: the
    flag repeats and its values make a list; ``positional``: an argument without a flag (a list with ``repeat``);
    ``items``: a list setting held as text (``"0,1"``), which a config file may also give as one value or a list
    of this type (the field's type is then not checked, the items are).
    """

    default: Any = REQUIRED
    help: str = ""
    group: str = "runtime"
    factory: Callable[[], Any] | None = None
    choices: tuple = ()
    number: Number | None = None
    shown: str | None = None
    aliases: tuple[str, ...] = ()
    flag: str | None = None
    repeat: bool = False
    positional: bool = False
    metavar: str | None = None
    items: type | None = None

    def __call__(self, default: Any = MISSING, **changes: Any) -> Any:
        if default is not MISSING:
            changes = {"shown": None, **changes, "default": default, "factory": None}
        s = dataclasses.replace(self, **changes)
        if s.group not in GROUPS:
            raise ValueError(f"setting group must be one of {GROUPS}, got {s.group!r}")
        if s.factory is not None:
            return field(default_factory=s.factory, metadata={"setting": s})
        return field(default=MISSING if s.default is REQUIRED else s.default, metadata={"setting": s})


def setting(default: Any = REQUIRED, **facts: Any) -> Any:
    """A dataclass field declared with its :class:`Setting` facts (help, group, checks, CLI details)."""
    return Setting(default, **facts)()


def settings_of(cls: type) -> dict[str, Setting]:
    """Field name -> :class:`Setting` of a config dataclass (class or instance)."""
    return {f.name: f.metadata["setting"] for f in dataclasses.fields(cls) if "setting" in f.metadata}


def check_settings(cfg: object) -> None:
    """ConfigError naming the first field whose value is of the wrong type or outside its setting's choices or
    range (values shown cut short). Path objects become strings.

    None passes where the field's default is None (unset)."""
    hints = field_types(type(cfg))
    for f in dataclasses.fields(cfg):
        s, value = f.metadata.get("setting"), getattr(cfg, f.name)
        if s is None or (value is None and f.default is None):
            continue
        plain = as_plain(value)
        if plain is not value:
            setattr(cfg, f.name, plain)
            value = plain
        if s.choices and value not in s.choices:
            raise ConfigError(f"{f.name} must be one of {', '.join(map(str, s.choices))}; got {short(value)}")
        if s.number is not None and not s.number.holds(value):
            raise ConfigError(f"{f.name} must be {s.number.what}, got {short(value)}")
        problem = type_problem(f.name, value, hints[f.name], s.items) if f.name in hints else None
        if problem:
            raise ConfigError(problem)


def current_names(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """``values`` with ``-`` in keys read as ``_`` and former names (:attr:`Setting.aliases`) as today's."""
    former = {alias: name for name, s in settings_of(cls).items() for alias in s.aliases}
    out: dict[str, Any] = {}
    for key, value in values.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {short(key)} is not a setting name")
        name = former.get(key.replace("-", "_"), key.replace("-", "_"))
        if name in out:
            raise ConfigError(f"{where}: {name} given twice (once as {short(key)})")
        out[name] = value
    return out


def _check_size(data: Any, where: str) -> None:
    """ConfigError when ``data`` holds more than :data:`MAX_CONFIG_VALUES` values (counting each use of a YAML
    alias) or a string longer than :data:`MAX_CONFIG_TEXT`; stops counting there, so a bomb costs nothing."""
    stack, count = [data], 0
    while stack:
        value = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_VALUES} values once its YAML aliases are expanded")
        if isinstance(value, str) and len(value) > MAX_CONFIG_TEXT:
            raise ConfigError(f"{where}: a value of {len(value)} characters (at most {MAX_CONFIG_TEXT})")
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML error in one line: the problem and where."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(exc).split())[:200]


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping a YAML config file holds; ConfigError naming the file when it is missing, not UTF-8, not YAML,
    not a mapping, nested too deeply, or too large once its aliases are expanded."""
    path = Path(path)
    where = f"config file {path}"
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{where} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{where} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML: {_yaml_error(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where} must hold a mapping of keys to values")
    _check_size(loaded, where)
    return loaded


def _command_line_name(f: dataclasses.Field) -> str:
    """How the command line names a field: its flag (``--name`` or its own ``flag``), or its name when positional."""
    s = f.metadata.get("setting")
    if s is not None and s.positional:
        return f"{f.name} (positional)"
    return s.flag if s is not None and s.flag else "--" + f.name.replace("_", "-")


def _did_you_mean(unknown: list[str], names: set[str]) -> str:
    """`` (did you mean batch_size?)`` for the unknown keys that are close to a known one."""
    close = [match[0] for key in unknown if (match := difflib.get_close_matches(key, sorted(names), n=1))]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def load_config(cls: type[T], path: str | os.PathLike | None = None, **overrides: Any) -> T:
    """Build ``cls`` from an optional YAML file, then apply non-None ``overrides`` on top.

    Unknown keys are refused, in the file and in ``overrides`` (a typo must not leave a default in place)."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if path is not None:
        values = current_names(cls, read_config_file(path), f"config file {path}")
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys {short(unknown)}{_did_you_mean(unknown, names)}; "
                              f"known keys: {sorted(names)}")
    former = {alias: name for name, s in settings_of(cls).items() for alias in s.aliases}
    unknown = sorted(k for k in overrides if former.get(k.replace("-", "_"), k.replace("-", "_")) not in names)
    if unknown:
        raise ConfigError(f"unknown settings {short(unknown)} of {cls.__name__}; known: {sorted(names)}")
    values.update(current_names(cls, {k: v for k, v in overrides.items() if v is not None}, "settings"))
    missing = [
        f for f in dataclasses.fields(cls)
        if f.name not in values and f.default is MISSING and f.default_factory is MISSING
    ]
    if missing:
        flags = ", ".join(_command_line_name(f) for f in missing)
        raise ConfigError(f"missing required setting(s) {flags} (on the command line or in --config)")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def parse_normalization(mean: Any, std: Any) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``--mean``/``--std`` values (``"0.5,0.5,0.5"``, a list, or None) as three floats each, None where unset;
    ConfigError unless each is three finite numbers and the std positive."""
    out = []
    for name, value in (("mean", mean), ("std", std)):
        if value is None:
            out.append(None)
            continue
        items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
        try:
            numbers = tuple(float(v) for v in items if not (isinstance(v, str) and not v.strip()))
        except (TypeError, ValueError):
            numbers = ()
        if len(numbers) != 3 or not all(map(math.isfinite, numbers)) or (name == "std" and min(numbers) <= 0):
            what = "positive numbers" if name == "std" else "numbers"
            raise ConfigError(f"{name} must be three comma-separated {what}, got {short(value)}")
        out.append(numbers)
    return out[0], out[1]


def spec_list(value: Any, name: str) -> list[str]:
    """Head specs given as comma-separated text, a list of such texts (a repeated flag, a YAML list) or a mix, as
    one flat list; ConfigError when it is empty or names a spec twice."""
    items = value if isinstance(value, (list, tuple)) else [value]
    specs = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not specs:
        raise ConfigError(f"{name}: expected comma-separated head specs, got {short(value)}")
    twice = sorted({s for s in specs if specs.count(s) > 1})
    if twice:
        raise ConfigError(f"{name}: {', '.join(twice)} given twice")
    return specs


def default_num_workers() -> int:
    """CPUs this process may use, capped at 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return min(8, cpus)


MODEL = Setting(help="zoo name (beyond-cls zoo), timm ViT name, or hf:PATH (a Hugging Face save_pretrained folder or a "
                "hub id in the local cache; pip install 'beyond-cls[hf]'), e.g. mae_vit_base_patch16", group="model")
CHECKPOINT = Setting(None, help="encoder weights: .pth/.pt/.pth.tar or .safetensors (local path)", group="model",
                     shown="a zoo name's official file under --weights-dir, else random weights")
CHECKPOINT_FORMAT = Setting("auto", help="checkpoint layout", group="model", shown="auto: the zoo's, else detected")
ARCH = Setting(None, help="timm architecture for a zoo name's weights, e.g. vit_small_patch16_224; NAME:heads=N "
               "states the head count (MoCo-v3 ViT-S: vit_small_patch16_224:heads=12)", group="model",
               shown="the zoo's")
SOURCE = Setting(None, help="sub-model of a training checkpoint: I-JEPA target_encoder or encoder, DINO/iBOT "
                 "teacher or student", group="model", shown="the zoo's: target_encoder, teacher")
WEIGHTS_DIR = Setting(None, help="folder with the zoo's official files", group="model", shown="$BEYOND_CLS_WEIGHTS")
IMG_SIZE = Setting(224, help="input resolution", group="data", number=POSITIVE_INT)
DATA = Setting(help="dataset root folder (ImageFolder: SPLIT/<class>/<images>, or --dataset's layout)", group="data")
#: its choices are the dataset registry's names (beyond_cls.data.registry), filled in where the flags are made
DATASET = Setting("imagefolder", help="dataset layout of --data (docs/reference.md: the datasets table)", group="data")
SPLIT = Setting("val", help="split folder under --data; train or val for other adapters", group="data")
MAX_IMAGES = Setting(None, help="at most this many images: a random sample drawn with --seed (recorded), not the "
                     "first ones", group="data", shown="all", number=POSITIVE_INT)
SEED = Setting(0, help="seed of the --max-images sample", group="data", number=NON_NEGATIVE_INT)
OUT = Setting(help="output folder", group="output")
BATCH_SIZE = Setting(64, help="images per batch", group="runtime", number=POSITIVE_INT)
#: the inference commands' batch; probe's (a training micro-batch, 256 as in the MAE protocol) is its own setting
INFERENCE_BATCH = dataclasses.replace(BATCH_SIZE, help="images per inference batch (per process; results do not "
                                      "depend on it; probe's training micro-batch is its own --batch-size, 256)")
MEAN = Setting(None, help="input normalization mean, three comma-separated numbers (0-1 pixel scale)", group="data",
               shown="the encoder's: its zoo entry's or checkpoint's, else ImageNet's", items=float)
STD = Setting(None, help="input normalization std, three comma-separated numbers (0-1 pixel scale)", group="data",
              shown="the encoder's: its zoo entry's or checkpoint's, else ImageNet's", items=float)
EXAMPLES = Setting(help="images drawn with their maps", group="output", number=NON_NEGATIVE_INT, aliases=("overlays",))
NUM_WORKERS = Setting(factory=default_num_workers, help="data loading workers (per process)", group="runtime",
                      shown="min(8, CPUs)", number=NON_NEGATIVE_INT)
DEVICE = Setting("auto", help="auto (CUDA when available), cpu, cuda or cuda:N (under torchrun/srun: the local GPU)",
                 group="runtime")
PRECISION = Setting("auto", help="autocast dtype; auto is bf16 on CUDA, fp32 on the CPU", group="runtime",
                    choices=PRECISIONS, aliases=("amp",))
PROGRESS = Setting(True, help="progress bars", group="output")
STEPS = Setting(10, help="timed batches per measurement", group="schedule", number=POSITIVE_INT)
WARMUP = Setting(3, help="untimed batches first", group="schedule", number=NON_NEGATIVE_INT)


@dataclass(kw_only=True)
class Settings:
    """Root of the job configs: checks every field against its :class:`Setting` after construction."""

    def __post_init__(self) -> None:
        check_settings(self)


@dataclass(kw_only=True)
class EncoderSettings(Settings):
    """One encoder: a zoo or timm name, its weights and how to read them."""

    model: str = MODEL()
    checkpoint: str | None = CHECKPOINT()
    checkpoint_format: str = CHECKPOINT_FORMAT()
    arch: str | None = ARCH()
    source: str | None = SOURCE()
    weights_dir: str | None = WEIGHTS_DIR()
    img_size: int = IMG_SIZE()


@dataclass(kw_only=True)
class RunSettings(Settings):
    """How a dataset-streaming job (``analyze``, ``aggregations``, ``localize``, ``demo``) reads and runs."""

    split: str = SPLIT()
    max_images: int | None = MAX_IMAGES()
    batch_size: int = INFERENCE_BATCH()
    num_workers: int = NUM_WORKERS()
    device: str = DEVICE()
    precision: str = PRECISION()
    progress: bool = PROGRESS()


@dataclass(kw_only=True)
class NormalizedSettings(Settings):
    """A job that normalizes images: ``--mean``/``--std``, else the encoder's own."""

    mean: str | None = MEAN()
    std: str | None = STD()

    def __post_init__(self) -> None:
        super().__post_init__()
        self.normalization()

    def normalization(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """(mean, std) given as ``--mean``/``--std``, None where the encoder's own applies."""
        return parse_normalization(self.mean, self.std)


@dataclass(kw_only=True)
class StreamSettings(EncoderSettings, RunSettings, NormalizedSettings):
    """An encoder streaming a dataset split into an output folder: ``analyze``, ``aggregations``, ``localize``."""

    model: str | None = MODEL(None, shown="none: only abmilp:RUN methods, which bring their run's encoder")
    data: str = DATA()
    dataset: str = DATASET()
    seed: int = SEED()
    out: str = OUT()
