"""The aggregation registry: every ``--heads`` spec family declares itself here, once.

A head module calls :func:`register` with an :class:`Aggregation`; :func:`parse_heads` and
:func:`build_aggregation` (the probe's head bank), :func:`heads_help` (the CLI's ``--heads`` help) and
:func:`heads_table_markdown` (the table in docs/reference.md) read the registry, so adding a head is one module.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from beyond_cls.config import ConfigError

__all__ = [
    "AGGREGATIONS",
    "ENTROPIES",
    "Aggregation",
    "build_aggregation",
    "find",
    "heads_help",
    "heads_table_markdown",
    "ordered",
    "parse_heads",
    "register",
]

#: How the bank reports a head's aggregation entropy, and how the docs' table shows it.
ENTROPIES = {
    "none": "–",  # NaN: one token, no distribution over the patches
    "uniform": "log P",  # mean pooling: the uniform distribution over the P patches
    "scores": "of its scores",  # of the module's forward_with_scores weights, mean over branches/heads
    "selection": "of the given weights",  # of the selection vectors that arrive with the tokens
}
#: Where a non-trainable head's weights come from (None: the module pools by itself).
SELECTIONS = (None, "block", "image")


def _same(spec: str) -> str:
    return spec


@dataclass(frozen=True)
class Aggregation:
    """One spec family of ``--heads``.

    ``pattern``: a regex matching its specs (whole spec, any case). ``build(spec, dim, num_prefix_tokens)``: the
    module of a normalized spec; a bad spec raises ValueError or ConfigError. ``examples``: specs that build.
    ``trainable``: the aggregation has parameters (its BatchNorm + Linear always train). ``needs_cls``: it
    reads the [cls] token. ``entropy``: a key of :data:`ENTROPIES`. ``selection``: where its pooling weights
    come from when they arrive with the tokens: ``block`` (the token block's own attention) or ``image`` (the
    same for every block, e.g. another encoder's); None when the module computes them. ``normalize``: the
    spec's canonical case (lower case by default); ``key``: the spec as shown in head keys. ``layout_options``:
    ``build`` also takes the keywords ``grid`` (the encoder's patch grid (rows, cols), or None) and ``legacy``
    (build the module as beyond-cls 0.1 did, for checkpoints written then). ``block_options``: ``build`` also takes
    the keyword ``blocks``: the tokens concatenate that many blocks' tokens along the channels, the last block's last
    (``probe --n-last-blocks``); other aggregations treat such tokens as tokens of width ``dim``.
    """

    name: str
    syntax: str
    description: str
    pattern: str
    build: Callable[..., nn.Module]
    examples: tuple[str, ...]
    trainable: bool
    needs_cls: bool = False
    entropy: str = "scores"
    selection: str | None = None
    normalize: Callable[[str], str] = str.lower
    key: Callable[[str], str] = _same
    layout_options: bool = False
    block_options: bool = False

    def matches(self, spec: str) -> bool:
        return re.fullmatch(self.pattern, spec.strip(), flags=re.IGNORECASE) is not None


#: The registered aggregations by name, in registration order.
AGGREGATIONS: dict[str, Aggregation] = {}


def register(aggregation: Aggregation) -> Aggregation:
    """Add ``aggregation`` to the registry; a name registered twice or an unknown entropy kind is an error."""
    if aggregation.name in AGGREGATIONS:
        raise ValueError(f"aggregation {aggregation.name!r} is registered twice")
    if aggregation.entropy not in ENTROPIES:
        raise ValueError(f"aggregation {aggregation.name!r}: entropy must be one of {sorted(ENTROPIES)}")
    if aggregation.selection not in SELECTIONS:
        raise ValueError(f"aggregation {aggregation.name!r}: selection must be one of {SELECTIONS}")
    AGGREGATIONS[aggregation.name] = aggregation
    return aggregation


def ordered() -> list[Aggregation]:
    """The registered aggregations as the help and the table list them: by entropy kind (single token, uniform,
    learned scores, given weights), then in registration order."""
    kinds = list(ENTROPIES)
    return sorted(AGGREGATIONS.values(), key=lambda a: kinds.index(a.entropy))


def find(spec: str) -> Aggregation:
    """The registered aggregation of ``spec``; an unknown spec is a ConfigError listing the known syntaxes."""
    for aggregation in AGGREGATIONS.values():
        if aggregation.matches(spec):
            return aggregation
    known = ", ".join(a.syntax for a in ordered())
    raise ConfigError(f"unknown head {spec.strip()!r}; known: {known}")


def build_aggregation(
    spec: str,
    dim: int,
    num_prefix_tokens: int,
    has_class_token: bool,
    grid: tuple[int, int] | None = None,
    legacy: bool = False,
    blocks: int = 1,
) -> nn.Module:
    """The aggregation module of one head spec; a spec that cannot build is a one-line ConfigError.

    ``grid``: the encoder's patch grid (rows, cols), which a trainable positional embedding (``-pos``) needs;
    ``legacy``: build it as beyond-cls 0.1 did (for older checkpoints); ``blocks``: the tokens (width ``dim``) are
    that many blocks' tokens concatenated along the channels (``probe --n-last-blocks``).
    """
    aggregation = find(spec)
    if aggregation.needs_cls and not has_class_token:
        without = ", ".join(a.name for a in ordered() if not a.needs_cls)
        raise ConfigError(f"head {spec!r} needs a [cls] token, and this encoder has no [cls] token "
                          f"(heads that need none: {without})")
    options = {"grid": grid, "legacy": legacy} if aggregation.layout_options else {}
    if aggregation.block_options:
        options["blocks"] = blocks
    try:
        return aggregation.build(aggregation.normalize(spec.strip()), dim, num_prefix_tokens, **options)
    except ConfigError:
        raise
    except ValueError as exc:  # the modules' own argument checks
        raise ConfigError(f"head {spec!r}: {exc}") from None


def parse_heads(text: str | list[str]) -> list[str]:
    """Split, normalize and validate ``--heads`` (or a --config file's list of specs); each spec must build (checked
    without a model, on a 2x2 patch grid)."""
    if isinstance(text, (list, tuple)) and all(isinstance(s, str) for s in text):
        text = ",".join(text)
    if not isinstance(text, str):
        raise ConfigError(f"heads: expected a comma-separated list such as cls,mean,abmilp; got {text!r}")
    specs = [find(s).normalize(s.strip()) for s in text.split(",") if s.strip()]
    if not specs:
        raise ConfigError(f"heads: expected a comma-separated list such as cls,mean,abmilp; got {text!r}")
    if len(set(specs)) != len(specs):
        raise ConfigError(f"heads: {text!r} lists a head twice")
    for spec in specs:
        build_aggregation(spec, dim=48, num_prefix_tokens=1, has_class_token=True, grid=(2, 2))
    return specs


def heads_help() -> str:
    """The CLI's ``--heads`` help: the trained and the given-weight aggregations' spec syntax."""
    own = ", ".join(a.syntax for a in ordered() if a.selection is None)
    given = ", ".join(a.syntax for a in ordered() if a.selection is not None)
    return f"comma-separated aggregations: {own}; non-trainable, patches weighted by attention: {given}"


def heads_table_markdown() -> str:
    """The docs' table of ``--heads`` specs (docs/reference.md), one row per registered aggregation."""
    yes = {True: "yes", False: "no"}
    rows = ["| head (`--heads`) | aggregation | trained | needs [cls] | entropy |", "|---|---|---|---|---|"]
    rows += [f"| `{a.syntax}` | {a.description} | {yes[a.trainable]} | {yes[a.needs_cls]} | {ENTROPIES[a.entropy]} |"
             for a in ordered()]
    return "\n".join(rows) + "\n"
