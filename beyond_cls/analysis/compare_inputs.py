"""What ``compare`` reads: summary files and ``analyze`` run folders (a multi-model one stands for its per-model
subfolders), each with the run's resolved config when there is one, under names unique in the comparison."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from beyond_cls.analysis.analyze import CONFIG_FILE, MODELS_FILE, STATS_FILE
from beyond_cls.analysis.summary import AttentionSummary

__all__ = ["Loaded", "expand_inputs", "load_inputs", "load_summary", "run_config", "unique_names"]

#: One input: its summary, the file it came from, and the run's resolved config ({} without one).
Loaded = tuple[AttentionSummary, Path, dict]


def run_config(file: Path) -> dict:
    """The resolved ``analyze_config.json`` beside an ``attention_stats.json`` ({} when absent or unreadable)."""
    config = file.parent / CONFIG_FILE
    if file.name != STATS_FILE or not config.is_file():
        return {}
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def load_summary(path: str | os.PathLike) -> tuple[AttentionSummary, Path]:
    """The summary in a run directory or JSON file; ValueError naming the path when it cannot be used."""
    path = Path(path)
    if path.is_dir():
        file = path / STATS_FILE
        if not file.is_file():
            raise ValueError(f"run directory {path} has no {STATS_FILE} (run `beyond-cls analyze --out {path}`)")
    elif path.is_file():
        file = path
    else:
        raise ValueError(f"{path} does not exist (expected a run directory holding {STATS_FILE} or a JSON file)")
    try:
        summary = AttentionSummary.load(file)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        message = str(exc)
        if str(file) not in message:
            message = f"attention summary {file} is unusable: {message}"
        raise ValueError(message) from None
    if summary.patch_self is None or summary.patch_patch_entropy is None:
        raise ValueError(f"attention summary {file} has no patch_self / patch_patch_entropy values")
    shapes = {name: tuple(t.shape) for name, t in summary.fields().items()}
    first = shapes["patch_self"]
    if len(first) != 2 or 0 in first or any(s != first for s in shapes.values()):
        raise ValueError(
            f"attention summary {file}: every field must be one non-empty [blocks, heads] array, got {shapes}"
        )
    if summary.num_patches <= 0:
        raise ValueError(f"attention summary {file}: num_patches must be positive, got {summary.num_patches}")
    return summary, file


def unique_names(names: list[str], files: list[Path]) -> list[str]:
    """Make repeated display names unique by their run folder (then a counter)."""
    counts = {n: names.count(n) for n in names}
    out: list[str] = []
    for name, file in zip(names, files):
        if counts[name] > 1:
            name = f"{name} ({file.parent.name or file.stem})"
        base, i = name, 2
        while name in out:
            name, i = f"{base} #{i}", i + 1
        out.append(name)
    return out


def expand_inputs(inputs: list) -> list:
    """Each multi-model ``analyze`` folder (it holds ``analyze_models.json``) replaced by its per-model subfolders."""
    out = []
    for item in inputs:
        folder = Path(item)
        index = folder / MODELS_FILE
        if not (folder.is_dir() and index.is_file()):
            out.append(item)
            continue
        if (folder / STATS_FILE).is_file():
            raise ValueError(f"{folder} holds both {STATS_FILE} and {MODELS_FILE} (outputs of two analyze runs); "
                             "rerun analyze into a new folder")
        try:
            models = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{index} is unreadable: {exc}") from None
        if not isinstance(models, dict) or not models or not all(isinstance(e, dict) for e in models.values()):
            raise ValueError(f"{index}: expected a non-empty mapping label -> {{model, checkpoint, subfolder}}")
        out += [folder / str(entry.get("subfolder") or label) for label, entry in models.items()]
    return out


def load_inputs(inputs: str | os.PathLike | Sequence[str | os.PathLike],
                names: Sequence[str] | None) -> tuple[list[str], list[Loaded]]:
    """(display names, loaded inputs): a given name, else the summary's model, else the folder or file name;
    repeated names made unique. ValueError on no inputs or a ``names`` list of the wrong length."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    given = list(inputs)
    if not given:
        raise ValueError("compare needs at least one run directory or attention_stats.json file")
    expanded = expand_inputs(given)
    if names is not None and len(names) != len(expanded):
        note = "" if len(expanded) == len(given) else " (a multi-model analyze folder counts one per model)"
        raise ValueError(f"names has {len(names)} entries for {len(expanded)} inputs{note}")
    loaded = [(summary, file, run_config(file)) for summary, file in map(load_summary, expanded)]
    display = [
        (names[i] if names is not None else "") or s.model or (f.parent.name if f.name == STATS_FILE else f.stem)
        for i, (s, f, _) in enumerate(loaded)
    ]
    return unique_names(display, [f for _, f, _ in loaded]), loaded
