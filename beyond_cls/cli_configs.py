"""Settings of the small commands (``compare``, ``probe-report``, ``zoo``, ``shard``): dataclasses like the jobs'
configs, so that each command takes ``--config`` and its flags come from one place."""

from __future__ import annotations

from dataclasses import dataclass

from beyond_cls.config import DATA, OUT, WEIGHTS_DIR, ConfigError, Settings, setting


@dataclass(kw_only=True)
class CompareConfig(Settings):
    """What ``beyond-cls compare`` draws from."""

    inputs: list[str] = setting(help="analyze output folders (a multi-model one stands for each of its models) or "
                                "attention_stats.json files", group="data", positional=True, repeat=True)
    out: str = OUT()
    names: str | None = setting(None, help="comma-separated display names, one per input", group="output",
                                items=str)
    family: list[str] | None = setting(None, help="family of a model (MIM or JEA)", group="model", repeat=True,
                                       metavar="NAME=FAMILY", shown="inferred from the name")

    def __post_init__(self) -> None:
        super().__post_init__()
        # a --config file may give one input or family as a plain string, and the names as a list
        for name in ("inputs", "family"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, [getattr(self, name)])
        if isinstance(self.names, (list, tuple)):
            self.names = ",".join(map(str, self.names))

    def families(self) -> dict[str, str] | None:
        """``family`` as name -> family; None when not given."""
        families = {}
        for item in self.family or ():
            name, sep, family = item.partition("=")
            if not sep or not name or not family:
                raise ConfigError(f"--family expects NAME=FAMILY, got {item!r}")
            families[name] = family
        return families or None

    def name_list(self) -> list[str] | None:
        return [n.strip() for n in self.names.split(",")] if self.names else None


@dataclass(kw_only=True)
class ProbeReportConfig(Settings):
    """What ``beyond-cls probe-report`` plots."""

    run: str = setting(help="probe output folder (holding results.json)", group="data", positional=True)
    out: str = OUT()
    analyze: str | None = setting(None, help="analyze output folder of the same encoder (attention_stats.json)",
                                  group="data")


@dataclass(kw_only=True)
class ZooConfig(Settings):
    """What ``beyond-cls zoo`` lists."""

    weights_dir: str | None = WEIGHTS_DIR()
    check: bool = setting(False, help="load every present file strictly; print OK or the error", group="runtime")


@dataclass(kw_only=True)
class ShardConfig(Settings):
    """What ``beyond-cls shard`` writes."""

    data: str = DATA(help="ImageFolder root holding train/<class>/ and val/<class>/")
    out: str = OUT(help="output folder for the shards")
    name: str = setting("shards", help="shard file-name prefix", group="output")
    shard_size: str | int = setting("1GB", help="per shard: a size such as 500MB or 1GB (decimal; KiB/MiB/GiB "
                                    "binary), or a plain number of samples", group="output")
