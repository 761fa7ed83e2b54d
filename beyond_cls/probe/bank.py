"""The head bank: every (aggregation, learning rate) pair as its own LinearProbe, trained at once.

Head specs (``--heads``, comma-separated):

| spec | aggregation |
|---|---|
| ``cls`` | the [cls] token |
| ``mean`` | mean of the patch tokens |
| ``abmilp`` / ``abmilp+cls`` | AbMILP over the patches / over [cls] and the patches |
| ``abmilp-k8``, ``abmilp-mlp2-gelu`` | options: ``k<K>`` branches, ``mlp<depth>``, ``relu|gelu|tanh``, ``pos`` |
| ``saabmilp``, ``saabmilp-h4-map`` | SA-AbMILP: ``h<heads>``, ``map`` or ``both`` (default) plus the AbMILP options |
| ``ap1``, ``ap12`` | attentive probing with 1 or 12 heads |
| ``attn-mean``, ``attn-minent``, ``attn-center`` | patches weighted by the encoder's own last-block attention |
| ``guide:MODEL[@CKPT]`` | patches weighted by another encoder's [cls] attention on the same images |

The last two rows are non-trainable aggregations (paper Tab. 5; :mod:`beyond_cls.selection`): only their
BatchNorm + Linear train, and their weights arrive with the tokens as ``selections`` [B, M, num_patches],
one per distinct such spec in :attr:`HeadBank.selections` order (:mod:`beyond_cls.probe.selections`).

Each head is initialized from its own seed, derived from the run seed and its spec, so a head
trained in a bank starts (and, with the same data, ends) exactly like the same head trained alone.

Layer-wise banks (``blocks=[5, 11]``, ``probe --blocks``): every (block, spec, lr) is a head keyed
``b<block>/<key>`` and reads its block's tokens from a stacked [B, K, N, D] input; its initialization does
not depend on the block, so block 11's heads train exactly like a bank of block 11 alone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from beyond_cls.config import ConfigError
from beyond_cls.heads import AbMILP, AttentivePool, ClsToken, LinearProbe, MeanPatch, SelectionPool, SelfAttentionAbMILP
from beyond_cls.selection import ATTENTION_METHODS, entropy, parse_method

__all__ = [
    "HeadBank", "HeadEntry", "build_aggregation", "head_key", "is_selection_spec", "parse_heads", "selection_name",
    "selection_names", "selection_specs",
    "split_selection_name",
]

_ACTS = ("relu", "gelu", "tanh")


@dataclass(frozen=True)
class HeadEntry:
    """One trained head: its ModuleDict key, aggregation spec, base learning rate and token block (None: the
    bank's single block)."""

    key: str
    spec: str
    blr: float
    block: int | None = None


def is_selection_spec(spec: str) -> bool:
    """Whether ``spec`` is a non-trainable aggregation whose weights come with the tokens."""
    return spec in ATTENTION_METHODS or spec.startswith("guide:")


def selection_specs(specs: list[str]) -> list[str]:
    """The distinct non-trainable specs among ``specs``, in order: the order their weights arrive in."""
    return list(dict.fromkeys(s for s in specs if is_selection_spec(s)))


def head_key(spec: str, blr: float, block: int | None = None) -> str:
    """ModuleDict key of a head (no dots allowed there): ``abmilp+cls`` at 0.1 → ``abmilp+cls@blr0p1``; of
    block 5 in a layer-wise bank → ``b5/abmilp+cls@blr0p1``.

    A guide's checkpoint is shown by its file stem: ``guide:dino_vit_base_patch16@/w/dino.pth`` → ``guide:
    dino_vit_base_patch16@dino@blr0p1``."""
    if spec.startswith("guide:"):
        method = parse_method(spec)
        spec = f"guide:{method.model}" + (f"@{Path(method.checkpoint).stem}" if method.checkpoint else "")
    prefix = "" if block is None else f"b{block}/"
    return prefix + f"{spec}@blr{blr:g}".replace(".", "p")


def selection_name(spec: str, block: int | None) -> str:
    """Name of the selection weights a non-trainable head reads: a guide's are the same for every block; the
    encoder's own attention (``attn-*``) is that of the head's block (``b5/attn-mean``)."""
    return spec if block is None or spec.startswith("guide:") else f"b{block}/{spec}"


def split_selection_name(name: str) -> tuple[int | None, str]:
    """``b5/attn-mean`` → (5, ``attn-mean``); a name without a block prefix → (None, name)."""
    prefix, sep, spec = name.partition("/")
    if sep and prefix[:1] == "b" and prefix[1:].isdigit():
        return int(prefix[1:]), spec
    return None, name


def selection_names(specs: list[str], blocks: Sequence[int] | None = None) -> list[str]:
    """The distinct selection weights a bank of ``specs`` (over ``blocks``) reads, in :attr:`HeadBank.selections`
    order."""
    groups: list[int | None] = [None] if blocks is None else list(blocks)
    return list(dict.fromkeys(selection_name(s, b) for b in groups for s in specs if is_selection_spec(s)))


def _normalize_spec(text: str) -> str:
    """Lower-case a spec, except a guide's model name and weights path."""
    text = text.strip()
    kind, sep, rest = text.partition(":")
    return f"{kind.lower()}:{rest}" if sep and kind.lower() == "guide" else text.lower()


def parse_heads(text: str) -> list[str]:
    """Split and validate ``--heads``; each spec must build (checked without a model)."""
    specs = [_normalize_spec(s) for s in text.split(",") if s.strip()]
    if not specs:
        raise ConfigError(f"heads: expected a comma-separated list such as cls,mean,abmilp; got {text!r}")
    if len(set(specs)) != len(specs):
        raise ConfigError(f"heads: {text!r} lists a head twice")
    for spec in specs:
        build_aggregation(spec, dim=48, num_prefix_tokens=1, has_class_token=True)
    return specs


def _abmilp_kwargs(spec: str, options: list[str]) -> dict:
    kwargs: dict = {}
    for opt in options:
        if opt.startswith("k") and opt[1:].isdigit():
            kwargs["branches"] = int(opt[1:])
        elif opt.startswith("mlp") and opt[3:].isdigit():
            kwargs["depth"] = int(opt[3:])
        elif opt in _ACTS:
            kwargs["act"] = opt
        elif opt == "pos":
            kwargs["pos_cond"] = True
        else:
            raise ConfigError(
                f"head {spec!r}: unknown option {opt!r}; AbMILP options are k<branches>, mlp<depth>, "
                f"{', '.join(_ACTS)}, pos"
            )
    return kwargs


def build_aggregation(spec: str, dim: int, num_prefix_tokens: int, has_class_token: bool) -> nn.Module:
    """The aggregation module of one head spec (see the module docstring)."""
    if is_selection_spec(spec) or spec.startswith("abmilp:"):
        method = parse_method(spec)
        if method.kind == "abmilp":
            raise ConfigError(f"head {spec!r}: a trained run's AbMILP is not a probe head; train it with abmilp")
        if method.kind in ("attn-mean", "attn-minent") and not has_class_token:
            raise ConfigError(f"head {spec!r} reads the [cls] attention, and this encoder has no [cls] token "
                              "(attn-center or guide:MODEL work)")
        return SelectionPool(dim, num_prefix_tokens=num_prefix_tokens)
    base, *options = spec.split("-")
    needs_cls = base in ("cls", "abmilp+cls", "saabmilp+cls")
    if needs_cls and not has_class_token:
        raise ConfigError(f"head {spec!r} needs a [cls] token, and this encoder has none")
    try:
        if base in ("cls", "mean") or base.startswith("ap"):
            if options:
                raise ConfigError(f"head {spec!r}: {base!r} takes no options")
            if base == "cls":
                return ClsToken(dim)
            if base == "mean":
                return MeanPatch(dim, num_prefix_tokens=num_prefix_tokens)
            if not base[2:].isdigit():
                raise ConfigError(f"head {spec!r}: attentive probing is ap<heads>, e.g. ap1 or ap12")
            return AttentivePool(dim, num_heads=int(base[2:]), num_prefix_tokens=num_prefix_tokens)
        content = "patch+cls" if base.endswith("+cls") else "patch"
        if base in ("abmilp", "abmilp+cls"):
            return AbMILP(dim, content=content, num_prefix_tokens=num_prefix_tokens, **_abmilp_kwargs(spec, options))
        if base in ("saabmilp", "saabmilp+cls"):
            heads = [o for o in options if o.startswith("h") and o[1:].isdigit()]
            apply_to = [o for o in options if o in ("map", "both")]
            rest = [o for o in options if o not in heads and o not in apply_to]
            return SelfAttentionAbMILP(
                dim,
                num_heads=int(heads[-1][1:]) if heads else 1,
                apply_to=apply_to[-1] if apply_to else "both",
                content=content,
                num_prefix_tokens=num_prefix_tokens,
                **_abmilp_kwargs(spec, rest),
            )
    except ValueError as exc:  # the heads' own argument checks
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"head {spec!r}: {exc}") from None
    raise ConfigError(
        f"unknown head {spec!r}; known: cls, mean, abmilp, abmilp+cls, saabmilp, saabmilp+cls, ap<heads> "
        "(AbMILP options as abmilp-k4-mlp2-gelu-pos), attn-mean, attn-minent, attn-center, guide:MODEL[@CHECKPOINT]"
    )


def _head_seed(seed: int, spec: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{spec}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _scores_entropy(scores: Tensor) -> Tensor:
    """Mean entropy (nats) of score distributions over the last dim, summed over the batch (float64)."""
    s = scores.double().clamp_min(0)
    ent = -(s * torch.where(s > 0, s.log(), torch.zeros_like(s))).sum(-1)  # [B, ...]
    return ent.reshape(ent.shape[0], -1).mean(1).sum()


class HeadBank(nn.Module):
    """``ModuleDict`` of :class:`LinearProbe` heads keyed by :func:`head_key`; one forward for all.

    ``selections``: the distinct non-trainable specs (with ``blocks``: their :func:`selection_name`), in the order
    their weights arrive in ``forward``. ``blocks``: a layer-wise bank, tokens [B, K, N, D] of these blocks.
    """

    def __init__(
        self,
        specs: list[str],
        base_lrs: list[float],
        dim: int,
        num_classes: int,
        num_prefix_tokens: int,
        has_class_token: bool,
        seed: int = 0,
        blocks: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.blocks = None if blocks is None else list(blocks)
        groups: list[int | None] = [None] if self.blocks is None else self.blocks
        self.entries = [HeadEntry(head_key(s, lr, b), s, lr, b) for b in groups for s in specs for lr in base_lrs]
        self.num_prefix_tokens = num_prefix_tokens
        self.heads = nn.ModuleDict()
        for entry in self.entries:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_head_seed(seed, entry.spec))
                agg = build_aggregation(entry.spec, dim, num_prefix_tokens, has_class_token)
                self.heads[entry.key] = LinearProbe(agg, agg.out_dim, num_classes)
        self.selections = selection_names(specs, self.blocks)
        # per token block: the selections its heads read (indices into self.selections), each head's place there
        self._block_selections: dict[int | None, list[int]] = {}
        self._selection_of: dict[str, int] = {}
        for e in self.entries:
            if is_selection_spec(e.spec):
                used = self._block_selections.setdefault(e.block, [])
                index = self.selections.index(selection_name(e.spec, e.block))
                if index not in used:
                    used.append(index)
                self._selection_of[e.key] = used.index(index)
        self._pool = SelectionPool(dim, num_prefix_tokens)

    def _groups(self, tokens: Tensor, selections: Tensor | None):
        """(tokens of one block [B, N, D], its entries, its selections [B, m, P] or None) per token block."""
        if self.selections and (selections is None or selections.shape[1] != len(self.selections)):
            got = None if selections is None else tuple(selections.shape)
            raise ValueError(f"heads {', '.join(self.selections)} need selections [B, {len(self.selections)}, "
                             f"num_patches] with the tokens, got {got}")
        if self.blocks is None:
            yield tokens, self.entries, selections if self.selections else None
            return
        if tokens.dim() != 4 or tokens.shape[1] != len(self.blocks):
            raise ValueError(f"a bank of blocks {self.blocks} needs tokens [B, {len(self.blocks)}, N, D], "
                             f"got {tuple(tokens.shape)}")
        for i, block in enumerate(self.blocks):
            used = self._block_selections.get(block)
            picked = None if not used else selections[:, used]
            yield tokens[:, i].contiguous(), [e for e in self.entries if e.block == block], picked

    def forward(self, tokens: Tensor, selections: Tensor | None = None) -> dict[str, Tensor]:
        """Logits of every head, keyed like :attr:`heads`; ``selections`` [B, M, P] for the non-trainable ones.

        ``tokens``: [B, N, D], or [B, K, N, D] for a bank of K ``blocks``."""
        out = {}
        for block_tokens, entries, picked in self._groups(tokens, selections):
            pooled = None if picked is None else self._pool.pool_many(block_tokens, picked)
            for e in entries:
                head = self.heads[e.key]
                out[e.key] = (head(block_tokens) if e.key not in self._selection_of
                              else head.head(pooled[:, self._selection_of[e.key]]))
        return {key: out[key] for key in self.heads}

    @torch.no_grad()
    def forward_eval(
        self, tokens: Tensor, selections: Tensor | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(logits, summed aggregation entropy over the batch) per head; entropy NaN for [cls].

        Mean pooling has entropy log(#patches); learned pooling the entropy of its scores; non-trainable
        pooling the entropy of its selection vectors.
        """
        logits, entropies = {}, {}
        for block_tokens, entries, picked in self._groups(tokens, selections):
            num_patches = block_tokens.shape[1] - self.num_prefix_tokens
            pooled = None if picked is None else self._pool.pool_many(block_tokens, picked)
            for e in entries:
                key, head = e.key, self.heads[e.key]
                agg = head.aggregation
                if key in self._selection_of:
                    m = self._selection_of[key]
                    logits[key] = head.head(pooled[:, m])
                    entropies[key] = entropy(picked[:, m].double()).sum()
                elif hasattr(agg, "forward_with_scores"):
                    pooled_head, scores = agg.forward_with_scores(block_tokens)
                    logits[key] = head.head(pooled_head.flatten(1))
                    entropies[key] = _scores_entropy(scores)
                else:
                    logits[key] = head(block_tokens)
                    value = math.log(num_patches) if isinstance(agg, MeanPatch) else float("nan")
                    entropies[key] = torch.tensor(value * block_tokens.shape[0], dtype=torch.float64,
                                                  device=block_tokens.device)
        return logits, entropies

    def param_groups(self, lr_scale: float) -> list[dict]:
        """One optimizer param group per head with ``base_lr = blr · lr_scale`` and its ``key``."""
        return [
            {"params": list(self.heads[e.key].parameters()), "base_lr": e.blr * lr_scale, "key": e.key}
            for e in self.entries
        ]
