"""README.md and docs/*.md keep working: every ``beyond_cls`` name they use resolves, every relative link and anchor
points at something that exists, every command and ``--option`` in a shell block is one the CLI parses, every
``make`` target is in the Makefile, and the tables copied from a registry are the registry's."""

from __future__ import annotations

import ast
import importlib
import re
import shlex
from pathlib import Path

import pytest

from beyond_cls import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
DOTTED = re.compile(r"(?<![\w./-])(?:beyond_cls|bc)(?:\.\w+)+")
FROM_IMPORT = re.compile(r"from (beyond_cls(?:\.\w+)*) import ([\w, ]+)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
INLINE = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?:beyond_cls|tests|benchmarks|csrc|docs)/[\w/.-]*")
PROGRAMS = ("beyond-cls", "beyond_cls", "beyond_cls.cli")


def read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def blocks(text: str, languages: tuple[str, ...]) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if lang in languages]


def prose(text: str) -> str:
    """The text outside fenced blocks."""
    return FENCE.sub("", text)


def resolve(dotted: str) -> object:
    """Import the longest module prefix of ``dotted`` (``bc`` is ``beyond_cls``), then get the remaining attributes."""
    parts = dotted.split(".")
    if parts[0] == "bc":
        parts[0] = "beyond_cls"
    obj, i = None, len(parts)
    while i:
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError:
            i -= 1
    if obj is None:
        raise ImportError(f"no module in {dotted}")
    for name in parts[i:]:
        obj = getattr(obj, name)
    return obj


def python_names(code: str) -> set[str]:
    """Dotted ``beyond_cls`` names a Python block uses: imported names and ``bc.x.y`` / ``beyond_cls.x.y`` chains."""
    tree = ast.parse(code)
    aliases = {"beyond_cls": "beyond_cls"}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "beyond_cls":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "beyond_cls"
                    found.add(a.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "beyond_cls":
            found |= {f"{node.module}.{a.name}" for a in node.names}
    for node in ast.walk(tree):
        chain = []
        while isinstance(node, ast.Attribute):
            chain.append(node.attr)
            node = node.value
        if chain and isinstance(node, ast.Name) and node.id in aliases:
            found.add(".".join([aliases[node.id], *reversed(chain)]))
    return found


def text_names(text: str) -> set[str]:
    """Dotted names and ``from beyond_cls.x import a, b`` in the prose, inline code and shell blocks."""
    outside_python = FENCE.sub(lambda m: "" if m.group(1) == "python" else m.group(0), text)
    found = set(DOTTED.findall(outside_python))
    for module, names in FROM_IMPORT.findall(outside_python):
        found |= {f"{module}.{n.strip()}" for n in names.split(",") if n.strip()}
    return found


def unresolved(text: str) -> list[str]:
    names = text_names(text)
    for code in blocks(text, ("python",)):
        names |= python_names(code)
    bad = []
    for name in sorted(names):
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            bad.append(f"{name} ({exc})")
    return bad


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.*)$", prose(read(path)), flags=re.M)}


def broken_links(path: Path, text: str) -> list[str]:
    bad = []
    for target in LINK.findall(prose(text)):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.name}")
    return bad


def shell_commands(text: str) -> list[list[str]]:
    """The commands of every shell block, continuation lines joined, comments and pipes cut."""
    commands = []
    for body in blocks(text, ("bash", "sh", "shell", "console")):
        for line in body.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            for part in re.split(r"\s(?:\||&&|;)\s", line):
                if part.strip():
                    commands.append(shlex.split(part))
    return commands


def subparsers(parser) -> dict:
    return parser._subparsers._group_actions[0].choices if parser._subparsers else {}


def cli_errors(words: list[str], parser) -> list[str]:
    """What a ``beyond-cls`` command line uses that the parser lacks: its (sub)command or an ``--option``."""
    start = next((i for i, w in enumerate(words) if w.endswith("beyond-cls") or w in PROGRAMS[1:]), None)
    if start is None or (words[start] != "beyond-cls" and not words[start].endswith("/beyond-cls")
                         and words[start - 1] != "-m"):
        return []
    args, line = words[start + 1:], " ".join(words)
    target = parser
    while args and not args[0].startswith("-") and subparsers(target):
        if args[0] not in subparsers(target):
            return [f"{line}: no command {args[0]!r}"]
        target, args = subparsers(target)[args[0]], args[1:]
    return [f"{line}: no option {a.split('=')[0]}" for a in args
            if a.startswith("--") and a.split("=")[0] not in target._option_string_actions]


def make_errors(words: list[str], targets: set[str]) -> list[str]:
    if words[:1] != ["make"]:
        return []
    return [f"make {w}: no such target" for w in words[1:] if not w.startswith("-") and w not in targets]


def path_errors(text: str) -> list[str]:
    """Repository paths named in inline code or shell blocks that do not exist (placeholders in capitals skipped)."""
    spans = INLINE.findall(prose(text)) + [w for c in shell_commands(text) for w in c]
    paths = {m.group(0).rstrip(".") for s in spans for m in [REPO_PATH.fullmatch(s)] if m}
    return [f"{p}: no such file or folder" for p in sorted(paths)
            if not re.search(r"[A-Z<*{]", p) and not (ROOT / p).exists()]


def docs_errors(path: Path, text: str) -> list[str]:
    parser = cli.build_parser()
    targets = set(re.findall(r"^([\w-]+):", read(ROOT / "Makefile"), flags=re.M))
    found = unresolved(text) + broken_links(path, text) + path_errors(text)
    for words in shell_commands(text):
        found += cli_errors(words, parser) + make_errors(words, targets)
    return found


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_name_link_command_and_path_of_the_docs_exists(path):
    errors = docs_errors(path, read(path))
    assert not errors, f"{path.relative_to(ROOT)}:\n  " + "\n  ".join(errors)


def test_the_docs_use_the_cli_and_the_api():
    """The checks have something to check: shell blocks with commands and Python blocks with API names."""
    text = "\n".join(read(p) for p in DOCS)
    commands = [w for w in shell_commands(text) if any(x.endswith("beyond-cls") for x in w)]
    assert len(commands) > 30
    assert {"beyond_cls.load_encoder", "beyond_cls.AttentionRecorder", "beyond_cls.ops.abmilp_pool"} <= set().union(
        *(python_names(c) for c in blocks(text, ("python",))))


def test_the_checks_catch_made_up_names(tmp_path):
    page = tmp_path / "page.md"
    text = (
        "Call `beyond_cls.probe.run_all(...)` or `from beyond_cls.heads import NoSuchHead`; see [x](missing.md),\n"
        "[y](#nowhere), `beyond_cls/heads/no_such_module.py`.\n\n"
        "```python\nimport beyond_cls as bc\nbc.ops.no_such_op(x)\n```\n\n"
        "```bash\nbeyond-cls analyze --modle vit --out runs/x\nbeyond-cls analyse --out y\nmake no-such-target\n"
        "python -m beyond_cls probe --data d \\\n    --no-such-flag 3\n```\n"
    )
    errors = "\n".join(docs_errors(page, text))
    for wrong in ("beyond_cls.probe.run_all", "beyond_cls.heads.NoSuchHead", "beyond_cls.ops.no_such_op",
                  "missing.md", "#nowhere", "no_such_module.py", "no option --modle", "no command 'analyse'",
                  "make no-such-target", "no option --no-such-flag"):
        assert wrong in errors, wrong
    good = "`beyond_cls.probe.run` and\n\n```bash\nbeyond-cls analyze --model vit --out runs/x  # a #comment\n```\n"
    assert docs_errors(page, good) == []


def test_the_formats_table_is_the_registry():
    from beyond_cls.models.formats import CHECKPOINT_FORMATS

    text = read(ROOT / "docs" / "models.md")
    rows = re.findall(r"^\| `(\w+)` \| (.*) \|$", text.split("## Checkpoint formats", 1)[1].split("\n## ", 1)[0],
                      flags=re.M)
    assert rows == [(f.name, f.description) for f in CHECKPOINT_FORMATS.values()], \
        "docs/models.md's checkpoint formats table differs from the registry's names and descriptions"
