"""Job configs: dataclasses that load from YAML and take command-line overrides."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or value is wrong; the message names the key and what was expected."""


def load_config(cls: type[T], path: str | os.PathLike | None = None, **overrides: Any) -> T:
    """Build ``cls`` from an optional YAML file, then apply non-None ``overrides`` on top."""
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of keys to values")
        unknown = sorted(set(k.replace("-", "_") for k in loaded) - names)
        if unknown:
            raise ConfigError(f"config file {path}: unknown keys {unknown}; known keys: {sorted(names)}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in overrides.items() if v is not None and k in names})
    missing = [
        f.name for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        flags = ", ".join("--" + n.replace("_", "-") for n in missing)
        raise ConfigError(f"missing required setting(s) {flags} (on the command line or in --config)")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{cls.__name__}: {exc}") from None


def check_run_settings(cfg: object) -> None:
    """The checks every dataset-streaming job shares: image size, batch size, image cap, workers, precision."""
    from beyond_cls.runtime import check_precision

    for name in ("img_size", "batch_size"):
        if int(getattr(cfg, name)) <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {getattr(cfg, name)}")
    max_images = getattr(cfg, "max_images", None)
    if max_images is not None and max_images <= 0:
        raise ConfigError(f"max_images must be a positive integer, got {max_images}")
    if cfg.num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {cfg.num_workers}")
    check_precision(cfg.precision)


def _default_num_workers() -> int:
    from beyond_cls.data.folder import default_num_workers

    return default_num_workers()


@dataclass(kw_only=True)
class RunSettings:
    """The run settings every dataset-streaming job shares (``analyze``, ``aggregations``, ``localize``);
    keyword-only, checked by :func:`check_run_settings`."""

    weights_dir: str | None = None
    split: str = "val"
    img_size: int = 224
    batch_size: int = 64
    max_images: int | None = None
    num_workers: int = field(default_factory=_default_num_workers)
    device: str = "auto"
    precision: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        check_run_settings(self)


@dataclass(kw_only=True)
class StreamSettings(RunSettings):
    """:class:`RunSettings` plus one encoder and a dataset adapter: the jobs that stream a split through encoders
    for selection vectors (``aggregations``, ``localize``)."""

    model: str | None = None
    checkpoint: str | None = None
    checkpoint_format: str = "auto"
    arch: str | None = None
    source: str | None = None
    dataset: str = "imagefolder"
