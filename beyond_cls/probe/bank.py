"""The head bank: every (aggregation, learning rate) pair as its own LinearProbe, trained at once.

Head specs (``--heads``, comma-separated) are declared by the head modules in :mod:`beyond_cls.heads`
(:mod:`beyond_cls.heads.registry`: syntax, module, [cls] need, entropy; docs/reference.md's table lists them).
Non-trainable aggregations (paper Tab. 5; :mod:`beyond_cls.selection`) train only their BatchNorm + Linear;
their weights arrive with the tokens as ``selections`` [B, M, num_patches], one per distinct such spec in
:attr:`HeadBank.selections` order (:mod:`beyond_cls.probe.selections`).

Each head is initialized from its own seed, derived from the run seed and its spec, so a head
trained in a bank starts (and, with the same data, ends) exactly like the same head trained alone. Its Linear keeps
PyTorch's default initialization, as the authors' code (``head_init="mae"``: MAE's trunc-normal(0.01), zero bias).

Layer-wise banks (``blocks=[5, 11]``, ``probe --blocks``): every (block, spec, lr) is a head keyed
``b<block>/<key>`` and reads its block's tokens from a stacked [B, K, N, D] input; its initialization does
not depend on the block, so block 11's heads train exactly like a bank of block 11 alone.

The bank runs its heads batched, with few host-side ops, while each head stays its own module (state-dict
keys, optimizer param group): the heads of one spec and block read the tokens once
(:mod:`beyond_cls.heads.groups`); the BatchNorm + Linear of all heads with one feature size run as one batch norm
over the concatenated features and one batched matmul; per-head losses come from one cross entropy. Parameters,
gradients and BatchNorm statistics are views of a few flat tensors (:mod:`beyond_cls.probe.bank_storage`), so
autograd accumulates one gradient per stack of heads and one op zeroes them all. Each head's features, logits,
gradients and updates are those it gets in a bank of its own, bit for bit on the CPU (MLP / positional AbMILP
scorers up to the rounding of one batched ``softmax_pool`` GEMM); tests/probe/test_bank_step.py compares them with
the head-by-head path this replaced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from beyond_cls.heads import LinearProbe, SelectionPool
from beyond_cls.heads.groups import forward_shared, share_key
from beyond_cls.heads.registry import build_aggregation, find, parse_heads
from beyond_cls.numerics import entropy, max_entropy
from beyond_cls.probe.bank_storage import BankStorage

__all__ = [
    "HeadBank", "HeadEntry", "build_aggregation", "head_key", "is_selection_spec", "legacy_bank_state", "parse_heads",
    "selection_name", "selection_names", "selection_specs", "split_selection_name",
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


def legacy_bank_state(state: Mapping[str, Any], expected: Iterable[str]) -> bool:
    """Whether a bank ``state`` dict was written by beyond-cls 0.1, given the keys a current bank of its heads has
    (``expected``): an SA-AbMILP ``attn.qkv.bias``, or a ``-pos`` head without its ``pos_embed``."""
    return any(k.endswith(".attn.qkv.bias") for k in state) or any(
        k.endswith(".pos_embed") and k not in state for k in expected)


def _head_seed(seed: int, spec: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{spec}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 62) - 1)


def _scores_entropy(scores: Tensor) -> Tensor:
    """Mean entropy (nats) of score distributions over the last dim, summed over the batch (float64)."""
    ent = entropy(scores.double())  # [B, ...]
    return ent.reshape(ent.shape[0], -1).mean(1).sum()


@dataclass
class SpecGroup:
    """The heads of one spec on one token block (consecutive entries): computed together (``shared``), head by
    head (``single``), or pooled with the given selection weights (``selection``, index ``selection`` of the
    block's picked selections)."""

    block: int | None
    entries: list[HeadEntry]
    modules: list[nn.Module]
    kind: str
    index: int = 0
    linear: int = 0
    selection: int = 0


@dataclass
class LinearGroup:
    """The BatchNorm + Linear of the heads with one feature size, run batched: entries (ascending indices) and
    their probes."""

    entries: list[int] = field(default_factory=list)
    probes: list[LinearProbe] = field(default_factory=list)


class HeadBank(nn.Module):
    """``ModuleDict`` of :class:`LinearProbe` heads keyed by :func:`head_key`; one forward for all.

    ``selections``: the distinct non-trainable specs (with ``blocks``: their :func:`selection_name`), in the order
    their weights arrive in ``forward``. ``blocks``: a layer-wise bank, tokens [B, K, N, D] of these blocks.
    ``grid``: the encoder's patch grid (rows, cols), needed by ``-pos`` heads (their trainable positional
    embedding). ``head_init``: the Linear's initialization (:data:`~beyond_cls.heads.HEAD_INITS`). ``legacy``: build
    the aggregations as beyond-cls 0.1 did (fixed ``-pos`` embedding, SA-AbMILP qkv bias), to load
    checkpoints written then. ``n_last_blocks``: the tokens (width ``dim``) are that many blocks' tokens concatenated
    along the channels (``probe --n-last-blocks``, DINO's linear eval); ``cls+mean`` then averages the last block's.
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
        *,
        grid: tuple[int, int] | None = None,
        head_init: str = "pytorch",
        legacy: bool = False,
        n_last_blocks: int = 1,
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
                agg = build_aggregation(entry.spec, dim, num_prefix_tokens, has_class_token, grid, legacy,
                                        n_last_blocks)
                self.heads[entry.key] = LinearProbe(agg, agg.out_dim, num_classes, init=head_init)
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
        self.spec_groups, self.linear_groups = self._plan()
        self.storage = BankStorage(self)
        self.legacy = legacy

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; a state written by beyond-cls 0.1 into a current bank is one ValueError."""
        if strict and not self.legacy and legacy_bank_state(state_dict, self.state_dict()):
            raise ValueError("this head-bank state was written by beyond-cls 0.1 (SA-AbMILP with a qkv bias or a fixed "
                             "-pos embedding): load it into HeadBank(..., legacy=True), as abmilp:RUN does")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _plan(self) -> tuple[list[SpecGroup], list[LinearGroup]]:
        """The spec groups in entry order, and the linear groups (by feature size, BatchNorm eps and momentum)."""
        spec_groups: list[SpecGroup] = []
        linear: dict[tuple, LinearGroup] = {}
        index = {e.key: i for i, e in enumerate(self.entries)}
        for (block, _spec), run in groupby(self.entries, key=lambda e: (e.block, e.spec)):
            entries = list(run)
            modules = [self.heads[e.key].aggregation for e in entries]
            keys = {share_key(m) for m in modules}
            kind = ("selection" if entries[0].key in self._selection_of else
                    "shared" if None not in keys and len(keys) == 1 else "single")
            group = SpecGroup(block, entries, modules, kind, len(spec_groups),
                              selection=self._selection_of.get(entries[0].key, 0))
            for e in entries:
                probe: LinearProbe = self.heads[e.key]
                norm, lin = probe.head[0], probe.head[1]
                if norm.momentum is None:
                    raise ValueError(f"head {e.key}: the bank's batched BatchNorm needs a momentum, got None")
                members = linear.setdefault((lin.in_features, norm.eps, norm.momentum), LinearGroup())
                group.linear = list(linear).index((lin.in_features, norm.eps, norm.momentum))
                members.entries.append(index[e.key])
                members.probes.append(probe)
            spec_groups.append(group)
        return spec_groups, list(linear.values())

    def _apply(self, fn, recurse: bool = True):  # .to(), .double(), ...: new tensors, laid out again
        super()._apply(fn, recurse)
        if getattr(self, "storage", None) is not None:
            self.storage = BankStorage(self)
        return self

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient in place (one op): gradients stay views of the bank's flat gradient."""
        self.storage.zero_grad()

    def _blocks(self, tokens: Tensor, selections: Tensor | None) -> Iterator[tuple[Tensor, list[SpecGroup], Tensor]]:
        """(tokens of one block [B, N, D], its spec groups, its selections [B, m, P] or None) per token block."""
        if self.selections and (selections is None or selections.shape[1] != len(self.selections)):
            got = None if selections is None else tuple(selections.shape)
            raise ValueError(f"heads {', '.join(self.selections)} need selections [B, {len(self.selections)}, "
                             f"num_patches] with the tokens, got {got}")
        if self.blocks is None:
            yield tokens, self.spec_groups, selections if self.selections else None
            return
        if tokens.dim() != 4 or tokens.shape[1] != len(self.blocks):
            raise ValueError(f"a bank of blocks {self.blocks} needs tokens [B, {len(self.blocks)}, N, D], "
                             f"got {tuple(tokens.shape)}")
        for i, block in enumerate(self.blocks):
            used = self._block_selections.get(block)
            picked = None if not used else selections[:, used]
            yield tokens[:, i].contiguous(), [g for g in self.spec_groups if g.block == block], picked

    def _features(self, tokens: Tensor, selections: Tensor | None, scores: bool = False):
        """(features [B, H_g, d] per linear group, per spec group its scores [B, L·K, N'] / picked selections)."""
        pieces: list[list[Tensor]] = [[] for _ in self.linear_groups]
        extra: list = []
        for block_tokens, groups, picked in self._blocks(tokens, selections):
            pooled = None if picked is None else self._pool.pool_many(block_tokens, picked)
            views: dict = {}  # views of this block's tokens the spec groups share
            for g in groups:
                out = pieces[g.linear]
                if g.kind == "selection":
                    out += [pooled[:, g.selection:g.selection + 1]] * len(g.entries)
                    extra.append(picked[:, g.selection] if scores else None)
                elif g.kind == "shared":
                    stacked = self.storage.stacked(g.index)
                    features, group_scores = forward_shared(g.modules, block_tokens, stacked, views)
                    out += features
                    extra.append(group_scores)
                else:
                    with_scores = scores and self._entropy[g.entries[0].key] == "scores"
                    results = [m.forward_with_scores(block_tokens) if with_scores else (m(block_tokens), None)
                               for m in g.modules]
                    out += [feat.flatten(1)[:, None] for feat, _ in results]
                    extra.append([s for _, s in results] if with_scores else None)
        return [_concat(p) for p in pieces], extra

    def _linear(self, g: int, features: Tensor) -> Tensor:
        """Logits [H_g, B, C] of linear group ``g``: one batch norm over the [B, H_g·d] features, one batched
        matmul."""
        b, h, d = features.shape
        probes = self.linear_groups[g].probes
        norm = probes[0].head[0]
        modes = {p.head[0].training for p in probes}
        if len(modes) > 1:
            raise ValueError("the BatchNorm modules of a head bank must all train or all evaluate")
        layout = self.storage.linear[g]
        training = norm.training
        y = F.batch_norm(features.reshape(b, h * d), layout.running_mean, layout.running_var, None, None, training,
                         norm.momentum, norm.eps)
        if training:
            layout.num_batches_tracked.add_(1)
        return torch.baddbmm(layout.bias, y.view(b, h, d).transpose(0, 1), layout.weight_t)

    def _logits(self, tokens: Tensor, selections: Tensor | None, scores: bool = False):
        if not self.storage.linked():
            self.storage = BankStorage(self)
        if torch.is_grad_enabled():
            self.storage.relink_grads()
        features, extra = self._features(tokens, selections, scores)
        return [self._linear(g, f) for g, f in enumerate(features)], extra

    def forward(
        self, tokens: Tensor, selections: Tensor | None = None, targets: Tensor | None = None, multilabel: bool = False
    ) -> dict[str, Tensor] | Tensor:
        """Logits of every head, keyed like :attr:`heads`; ``selections`` [B, M, P] for the non-trainable ones.

        ``tokens``: [B, N, D], or [B, K, N, D] for a bank of K ``blocks``. With ``targets`` the per-head losses [H]
        in entry order instead: the mean over dim 1 of :meth:`sample_losses`.
        """
        if targets is not None:
            return self.sample_losses(tokens, selections, targets, multilabel).mean(1)
        logits, _ = self._logits(tokens, selections)
        out = {}
        for group, values in zip(self.linear_groups, logits):
            out.update(zip((self.entries[i].key for i in group.entries), values.unbind(0)))
        return {key: out[key] for key in self.heads}

    def sample_losses(
        self, tokens: Tensor, selections: Tensor | None, targets: Tensor, multilabel: bool = False
    ) -> Tensor:
        """Per-head losses of every sample [H, B] in entry order, float32: cross entropy with int64 ``targets``
        [B]; with ``multilabel`` binary cross entropy with logits of 0/1 ``targets`` [B, C], per element [H, B·C].

        A head's loss (``nn.CrossEntropyLoss`` / ``nn.BCEWithLogitsLoss``) is the mean of its row; backpropagating
        the rows with the gradient 1/B (1/(B·C)) gives what the mean gives, bit for bit for the cross entropy, with
        fewer ops (:class:`~beyond_cls.probe.step.BankStep` does).
        """
        logits, _ = self._logits(tokens, selections)
        losses = [_sample_losses(values, targets, multilabel) for values in logits]
        if len(losses) == 1 and self.linear_groups[0].entries == list(range(len(self.entries))):
            return losses[0]
        order = [i for group in self.linear_groups for i in group.entries]
        return torch.cat(losses)[self.storage.inverse(order)]

    @torch.no_grad()
    def forward_eval(
        self, tokens: Tensor, selections: Tensor | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(logits, summed aggregation entropy over the batch) per head, as each aggregation declares
        (:data:`~beyond_cls.heads.registry.ENTROPIES`): NaN for [cls], log(#patches) for mean pooling, the entropy
        of the scores of learned pooling and of the selection vectors of non-trainable pooling.
        """
        logits_by_group, extra = self._logits(tokens, selections, scores=True)
        logits: dict[str, Tensor] = {}
        for group, values in zip(self.linear_groups, logits_by_group):
            logits.update(zip((self.entries[i].key for i in group.entries), values.unbind(0)))
        entropies: dict[str, Tensor] = {}
        tokens_n = tokens.shape[-2] - self.num_prefix_tokens
        for g, scores in zip(self.spec_groups, extra):
            kind = self._entropy[g.entries[0].key]
            if g.kind == "selection":
                value = entropy(scores.double()).sum()
                entropies.update((e.key, value) for e in g.entries)
            elif kind == "scores" and g.kind == "shared":
                k = scores.shape[1] // len(g.entries)  # branches per head
                entropies.update((e.key, _scores_entropy(scores[:, i * k:(i + 1) * k]))
                                 for i, e in enumerate(g.entries))
            elif kind == "scores":
                entropies.update((e.key, _scores_entropy(s)) for e, s in zip(g.entries, scores))
            else:
                value = max_entropy(tokens_n) if kind == "uniform" else float("nan")
                entropies.update((e.key, torch.tensor(value * tokens.shape[0], dtype=torch.float64,
                                                      device=tokens.device)) for e in g.entries)
        return {k: logits[k] for k in self.heads}, {k: entropies[k] for k in self.heads}

    def param_groups(self, lr_scale: float) -> list[dict]:
        """One optimizer param group per head with ``base_lr = blr · lr_scale`` and its ``key``."""
        return [
            {"params": list(self.heads[e.key].parameters()), "base_lr": e.blr * lr_scale, "key": e.key}
            for e in self.entries
        ]


def _concat(pieces: list[Tensor]) -> Tensor:
    """``torch.cat(pieces, 1)``, each run of pieces that need no gradient concatenated first: the backward then
    slices only the pieces that do (and the run as one)."""
    if len(pieces) == 1:
        return pieces[0]
    runs: list[Tensor] = []
    for needs_grad, run in groupby(pieces, key=lambda t: t.requires_grad):
        run = list(run)
        runs += run if needs_grad or len(run) == 1 else [torch.cat(run, 1)]
    return torch.cat(runs, 1) if len(runs) > 1 else runs[0]


def _sample_losses(logits: Tensor, targets: Tensor, multilabel: bool) -> Tensor:
    """Per-sample losses [H, B] ([H, B·C] multi-label) of logits [H, B, C], in float32."""
    h, b, c = logits.shape
    logits = logits.float()
    if multilabel:
        target = targets.float()[None].expand(h, b, c)
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").view(h, b * c)
    return F.cross_entropy(logits.reshape(h * b, c), targets.repeat(h), reduction="none").view(h, b)
