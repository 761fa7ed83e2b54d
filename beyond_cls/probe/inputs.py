"""What a probe run reads once for all its seeds: the two splits, the frozen encoder's token and selection sources,
the views' normalization and the batch accounting (accumulation, effective batch)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from beyond_cls.data.datasets import build_dataset
from beyond_cls.data.views import ViewDataset
from beyond_cls.models import load_encoder
from beyond_cls.models.info import EncoderInfo
from beyond_cls.probe.bank import selection_names
from beyond_cls.probe.config import ProbeConfig
from beyond_cls.probe.distributed import DistEnv
from beyond_cls.probe.features import TokenSource, check_block_token_bytes, source_block
from beyond_cls.probe.sampler import EvalBatchSampler, TrainBatchSampler
from beyond_cls.probe.selections import SelectionSource
from beyond_cls.probe.streams import target_tensor
from beyond_cls.selection import encoder_norm

__all__ = ["RunInputs", "load_inputs"]


@dataclass
class RunInputs:
    """The settings and processes of one run, and what they read (see :func:`load_inputs`)."""

    cfg: ProbeConfig
    env: DistEnv
    train_set: Any
    val_set: Any
    info: EncoderInfo
    tokens: nn.Module  # the TokenSource (compiled with --compile)
    blocks: list[int] | None  # --blocks: a layer-wise bank, tokens [B, K, N, D] from one pass
    width: int  # token channels (x n with --n-last-blocks: tokens concatenated along the channels)
    selections: list[str]  # the non-trainable heads' selections (HeadBank.selections)
    source: SelectionSource  # tokens and those selections from one encoder pass
    view_kwargs: dict[str, Any]
    val_views: ViewDataset
    train_targets: Tensor
    val_targets: Tensor
    accum: int
    effective: int

    @property
    def multilabel(self) -> bool:
        return bool(getattr(self.train_set, "multilabel", False))

    @property
    def block(self) -> int:
        """The block the tokens are read at (the deepest of a layer-wise or --n-last-blocks run)."""
        return source_block(self.tokens)

    @property
    def token_blocks(self) -> list[int | None]:
        """One entry per token group of the bank: the --blocks, else [None] (the token source's block)."""
        return self.blocks or [None]

    def train_views(self, seed: int) -> ViewDataset:
        """The augmented train views of ``seed``."""
        return ViewDataset(self.train_set, train=True, seed=seed, crop=self.cfg.crop, **self.view_kwargs)

    def samplers(self, seed: int) -> tuple[TrainBatchSampler, EvalBatchSampler]:
        """This process's train batches of ``seed`` and its share of the eval batches."""
        cfg, env = self.cfg, self.env
        train = TrainBatchSampler(len(self.train_set), cfg.batch_size, self.accum, env.world_size, env.rank, seed=seed,
                                  views=cfg.views())
        return train, EvalBatchSampler(len(self.val_set), cfg.batch_size, env.world_size, env.rank)


def load_inputs(cfg: ProbeConfig, env: DistEnv, specs: list[str]) -> RunInputs:
    """Build the splits, load the encoder (token source from the flags, else the zoo's, else the last block,
    pre-norm) and the selection source of the non-trainable heads among ``specs``."""
    options = {"subset_file": cfg.subset_file} if cfg.subset_file else {}
    train_set = build_dataset(cfg.dataset, cfg.data, "train", **options)
    val_set = build_dataset(cfg.dataset, cfg.data, "val", **options)
    torch.manual_seed(cfg.seed_list()[0])  # a randomly initialized encoder (no --checkpoint) is reproducible
    encoder = load_encoder(
        cfg.model, cfg.checkpoint, checkpoint_format=cfg.checkpoint_format, arch=cfg.arch, img_size=cfg.img_size,
        block=cfg.block, final_norm=cfg.final_norm, source=cfg.source, weights_dir=cfg.weights_dir,
    )
    info = encoder.beyond_cls_info
    blocks = cfg.block_list(info.depth)
    if blocks is not None:
        check_block_token_bytes(cfg.batch_size, len(blocks), info.num_tokens, info.embed_dim)
    tokens = TokenSource(encoder, info.block if blocks is None else None, info.final_norm,
                         blocks=blocks, n_last=cfg.n_last_blocks or 1).to(env.device)
    if cfg.channels_last:
        tokens = tokens.to(memory_format=torch.channels_last)
    if cfg.compile:
        tokens = torch.compile(tokens)
    accum, effective = cfg.accumulation(env.world_size)
    mean, std = encoder_norm(info, *cfg.normalization())
    view_kwargs = dict(img_size=cfg.img_size, mean=mean, std=std, decode=cfg.decode,
                       skip_bad_images=cfg.skip_bad_images)
    selections = selection_names(specs, blocks)
    source = SelectionSource(tokens, selections, mean, std, img_size=cfg.img_size, weights_dir=cfg.weights_dir,
                             device=env.device)
    return RunInputs(
        cfg, env, train_set, val_set, info, tokens, blocks, info.embed_dim * (cfg.n_last_blocks or 1), selections,
        source, view_kwargs,
        ViewDataset(val_set, train=False, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation, **view_kwargs),
        target_tensor(train_set), target_tensor(val_set), accum, effective,
    )
