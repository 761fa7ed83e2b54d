"""The head bank: every (aggregation, learning rate) pair as its own LinearProbe, trained at once.

Head specs (``--heads``, comma-separated) are declared by the head modules in :mod:`beyond_cls.heads`
(:mod:`beyond_cls.heads.registry`: syntax, module, [cls] need, entropy; the README's table lists them).
Non-trainable aggregations (paper Tab. 5; :mod:`beyond_cls.selection`) train only their BatchNorm + Linear;
their weights arrive with the tokens as ``selections`` [B, M, num_patches], one per distinct such spec in
:attr:`HeadBank.selections` order (:mod:`beyond_cls.probe.selections`).

Each head is initialized from its own seed, derived from the run seed and its spec, so a head
trained in a bank starts (and, with the same data, ends) exactly like the same head trained alone.

Layer-wise banks (``blocks=[5, 11]``, ``probe --blocks``): every (block, spec, lr) is a head keyed
``b<block>/<key>`` and reads its block's tokens from a stacked [B, K, N, D] input; its initialization does
not depend on the block, so block 11's heads train exactly like a bank of block 11 alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from beyond_cls.heads import LinearProbe, SelectionPool
from beyond_cls.heads.registry import build_aggregation, find, parse_heads
from beyond_cls.numerics import entropy, max_entropy

__all__ = [
    "HeadBank", "HeadEntry", "build_aggregation", "head_key", "is_selection_spec", "parse_heads", "selection_name",
    "selection_names", "selection_specs", "split_selection_name",
]


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
    return find(spec).selection is not None


def selection_specs(specs: list[str]) -> list[str]:
    """The distinct non-trainable specs among ``specs``, in order: the order their weights arrive in."""
    return list(dict.fromkeys(s for s in specs if is_selection_spec(s)))


def head_key(spec: str, blr: float, block: int | None = None) -> str:
    """ModuleDict key of a head (no dots allowed there): ``abmilp+cls`` at 0.1 → ``abmilp+cls@blr0p1``; of
    block 5 in a layer-wise bank → ``b5/abmilp+cls@blr0p1``. The spec is shown as its aggregation's ``key``
    says: a guide's checkpoint by its file stem (``guide:dino_vit_base_patch16@dino@blr0p1``)."""
    prefix = "" if block is None else f"b{block}/"
    return prefix + f"{find(spec).key(spec)}@blr{blr:g}".replace(".", "p")


def selection_name(spec: str, block: int | None) -> str:
    """Name of the selection weights a non-trainable head reads: a guide's are the same for every block; the
    encoder's own attention (``attn-*``) is that of the head's block (``b5/attn-mean``)."""
    return spec if block is None or find(spec).selection != "block" else f"b{block}/{spec}"


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


def _head_seed(seed: int, spec: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{spec}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _scores_entropy(scores: Tensor) -> Tensor:
    """Mean entropy (nats) of score distributions over the last dim, summed over the batch (float64)."""
    ent = entropy(scores.double())  # [B, ...]
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
        self._entropy = {e.key: find(e.spec).entropy for e in self.entries}
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
        """(logits, summed aggregation entropy over the batch) per head, as each aggregation declares
        (:data:`~beyond_cls.heads.registry.ENTROPIES`): NaN for [cls], log(#patches) for mean pooling, the entropy
        of the scores of learned pooling and of the selection vectors of non-trainable pooling.
        """
        logits, entropies = {}, {}
        for block_tokens, entries, picked in self._groups(tokens, selections):
            num_patches = block_tokens.shape[1] - self.num_prefix_tokens
            pooled = None if picked is None else self._pool.pool_many(block_tokens, picked)
            for e in entries:
                key, head = e.key, self.heads[e.key]
                if key in self._selection_of:
                    m = self._selection_of[key]
                    logits[key] = head.head(pooled[:, m])
                    entropies[key] = entropy(picked[:, m].double()).sum()
                elif self._entropy[key] == "scores":
                    pooled_head, scores = head.aggregation.forward_with_scores(block_tokens)
                    logits[key] = head.head(pooled_head.flatten(1))
                    entropies[key] = _scores_entropy(scores)
                else:
                    logits[key] = head(block_tokens)
                    value = max_entropy(num_patches) if self._entropy[key] == "uniform" else float("nan")
                    entropies[key] = torch.tensor(value * block_tokens.shape[0], dtype=torch.float64,
                                                  device=block_tokens.device)
        return logits, entropies

    def param_groups(self, lr_scale: float) -> list[dict]:
        """One optimizer param group per head with ``base_lr = blr · lr_scale`` and its ``key``."""
        return [
            {"params": list(self.heads[e.key].parameters()), "base_lr": e.blr * lr_scale, "key": e.key}
            for e in self.entries
        ]
