"""The package's modules form layers: no import cycle between modules, and each package (or top-level module)
imports only entries of lower layers (:data:`LAYERS`, written down in docs/internals.md), counting imports placed
inside functions."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. An entry is a subpackage of beyond_cls or one of its top-level modules ("beyond_cls" is the
# package's own __init__); it may import only entries of lower layers, never one of its own layer.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("numerics", "value_types", "triton_mode", "units", "fileio", "_extension", "optim"),
    ("statistics",),
    ("config", "reference"),
    ("runlock", "runtime", "kernels"),
    ("ops", "data"),
    ("models", "localization", "selection"),
    ("capture", "heads", "run_summary", "tables"),
    ("probe",),
    ("analysis",),
    ("beyond_cls", "demo", "cli_args", "cli_configs"),
    ("cli",),
    ("__main__",),
)


def package_modules() -> dict[str, Path]:
    """Module name -> source file, for every module of ``beyond_cls``."""
    found = {}
    for path in sorted((ROOT / "beyond_cls").rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every package module ``name`` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(resolve(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:  # ``from pkg import submodule`` imports the submodule
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else resolve(base))
    return {m for m in found if m and m.startswith("beyond_cls") and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def layer_entry(module: str) -> str:
    """The :data:`LAYERS` entry of a module: its subpackage or top-level module (``beyond_cls`` for the root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_violations(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...] = LAYERS) -> list[str]:
    """Imports that do not go down the layers (or leave an entry no layer lists), one line each."""
    level = {entry: i for i, layer in enumerate(layers) for entry in layer}
    found = []
    for module, imports in sorted(graph.items()):
        entry = layer_entry(module)
        if entry not in level:
            found.append(f"{module}: {entry!r} is in no layer")
            continue
        for target in sorted(imports):
            other = layer_entry(target)
            if other != entry and other in level and level[other] >= level[entry]:
                found.append(f"{module} -> {target} ({entry} may not import {other}: same or higher layer)")
    return found


def test_packages_import_only_lower_layers():
    violations = layer_violations(import_graph())
    assert not violations, "imports against the layer order (docs/internals.md, Layers):\n  " + "\n  ".join(violations)


def test_every_layer_entry_exists():
    entries = {layer_entry(m) for m in package_modules()}
    listed = [e for layer in LAYERS for e in layer]
    assert len(listed) == len(set(listed)), "an entry is listed twice"
    assert set(listed) == entries, f"missing {sorted(entries - set(listed))}, stale {sorted(set(listed) - entries)}"


@pytest.mark.parametrize(
    "graph, expected",
    [  # the two cycles between packages this check was written for (module by module they were acyclic)
        ({"beyond_cls.probe.selections": {"beyond_cls.analysis.row_capture"},
          "beyond_cls.analysis.compare": {"beyond_cls.probe.logs"},
          "beyond_cls.analysis.row_capture": set(), "beyond_cls.probe.logs": set()},
         ["beyond_cls.probe.selections -> beyond_cls.analysis.row_capture (probe may not import analysis: same "
          "or higher layer)"]),
        ({"beyond_cls.kernels.attention_stats": {"beyond_cls.ops._dispatch"}, "beyond_cls.ops._dispatch": set()},
         ["beyond_cls.kernels.attention_stats -> beyond_cls.ops._dispatch (kernels may not import ops: same or "
          "higher layer)"]),
        ({"beyond_cls.heads.abmilp": {"beyond_cls.capture"}, "beyond_cls.capture": set()},
         ["beyond_cls.heads.abmilp -> beyond_cls.capture (heads may not import capture: same or higher layer)"]),
        ({"beyond_cls.cli": {"beyond_cls.probe.run", "beyond_cls"}, "beyond_cls.probe.run": {"beyond_cls.probe"},
          "beyond_cls": set(), "beyond_cls.probe": set()}, []),
        ({"beyond_cls.extra": {"beyond_cls.ops"}, "beyond_cls.ops": set()},
         ["beyond_cls.extra: 'extra' is in no layer"]),
    ],
)
def test_the_layer_check_finds_imports_that_go_up(graph, expected):
    assert layer_violations(graph) == expected


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    cycles = _cycles(graph)
    detail = "\n".join(
        "  " + ", ".join(f"{m} -> {sorted(graph[m] & set(c))}" for m in c) for c in cycles
    )
    assert not cycles, f"import cycles (module -> what it imports inside the cycle):\n{detail}"


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycles(graph) == expected


def test_imports_inside_functions_count(tmp_path):
    pkg = tmp_path / "beyond_cls"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from beyond_cls import b\n")
    (pkg / "b.py").write_text("from .a import f\n")
    modules = {"beyond_cls": pkg / "__init__.py", "beyond_cls.a": pkg / "a.py", "beyond_cls.b": pkg / "b.py"}
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["beyond_cls.a"] == {"beyond_cls.b"} and graph["beyond_cls.b"] == {"beyond_cls.a"}
    assert _cycles(graph) == [["beyond_cls.a", "beyond_cls.b"]]


def test_a_lazy_import_up_the_layers_counts(tmp_path):
    pkg = tmp_path / "beyond_cls"
    (pkg / "probe").mkdir(parents=True)
    (pkg / "analysis").mkdir()
    for path in (pkg / "__init__.py", pkg / "probe" / "__init__.py", pkg / "analysis" / "__init__.py"):
        path.write_text("")
    (pkg / "probe" / "report.py").write_text("def f():\n    from ..analysis import summary\n")
    (pkg / "analysis" / "summary.py").write_text("X = 1\n")
    modules = {
        "beyond_cls": pkg / "__init__.py",
        "beyond_cls.probe": pkg / "probe" / "__init__.py",
        "beyond_cls.probe.report": pkg / "probe" / "report.py",
        "beyond_cls.analysis": pkg / "analysis" / "__init__.py",
        "beyond_cls.analysis.summary": pkg / "analysis" / "summary.py",
    }
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert graph["beyond_cls.probe.report"] == {"beyond_cls.analysis.summary"}
    assert layer_violations(graph) == [
        "beyond_cls.probe.report -> beyond_cls.analysis.summary (probe may not import analysis: same or higher layer)"
    ]


def documented_layers(text: str) -> tuple[tuple[str, ...], ...]:
    """The numbered list under "## Layers" of docs/internals.md, as :data:`LAYERS` entries (parentheses skipped)."""
    section = text.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    items = re.findall(r"^\d+\. (.*(?:\n   .*)*)", section, flags=re.M)
    names = {"kernels/": "kernels", "beyond_cls/__init__.py": "beyond_cls"}
    layers = []
    for item in items:
        bare = re.sub(r"\([^()]*\)", "", item)
        layers.append(tuple(names.get(n, n.rstrip("/")) for n in re.findall(r"`([^`]+)`", bare)))
    return tuple(layers)


def test_the_docs_write_down_the_layers():
    text = (ROOT / "docs" / "internals.md").read_text(encoding="utf-8")
    assert documented_layers(text) == LAYERS, "docs/internals.md's layer list differs from LAYERS"
    wrong = text.replace("`statistics` (", "`statistic` (", 1)
    assert documented_layers(wrong) != LAYERS
