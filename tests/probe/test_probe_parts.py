"""Probe building blocks: config, samplers, metrics, summaries, LR schedule, state files, Slurm parsing."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from beyond_cls.config import ConfigError
from beyond_cls.optim import mae_lr
from beyond_cls.probe import ProbeConfig, summarize
from beyond_cls.probe.distributed import first_slurm_host
from beyond_cls.probe.metrics import average_precision, mean_average_precision, topk_correct
from beyond_cls.probe.sampler import EvalBatchSampler, TrainBatchSampler
from beyond_cls.probe.state import PreemptionWatch, load_state, save_atomic
from beyond_cls.tables import format_table

BASE = dict(model="vit_tiny_patch16_224", data="d", out="o")


# ----------------------------------------------------------------------------------------- config
def test_config_defaults_are_the_paper_protocol():
    cfg = ProbeConfig(**BASE)
    assert (cfg.epochs, cfg.warmup_epochs, cfg.blr, cfg.effective_batch) == (90, 10, 0.1, 16384)
    assert (cfg.optimizer, cfg.momentum, cfg.weight_decay, cfg.min_lr) == ("lars", 0.9, 0.0, 0.0)
    assert cfg.heads == "cls,mean,abmilp,abmilp+cls"
    assert cfg.accumulation(world_size=8) == (8, 16384)  # 256 per GPU x 8 GPUs x 8 micro-batches
    assert cfg.accumulation(world_size=64) == (1, 16384)


def test_encoder_compiles_by_default_on_cuda_only():
    from beyond_cls.cli import build_parser

    assert ProbeConfig(**BASE, device="cpu").compile is False
    assert ProbeConfig(**BASE, device="cuda:1").compile is True
    assert ProbeConfig(**BASE, device="auto").compile is torch.cuda.is_available()
    assert ProbeConfig(**BASE, device="cuda", compile=False).compile is False
    assert ProbeConfig(**BASE).cuda_graphs is True
    args = build_parser().parse_args(["probe", "--no-compile", "--no-cuda-graphs"])
    assert (args.compile, args.cuda_graphs) == (False, False)
    assert build_parser().parse_args(["probe"]).compile is None  # unset: the config decides by device


def test_short_runs_scale_the_default_warmup():
    """Fewer epochs than MAE's 10 warm-up epochs and none given: 10/90 of the run; explicit ones stay checked."""
    assert ProbeConfig(**BASE, epochs=9).warmup_epochs == pytest.approx(1.0)
    assert ProbeConfig(**BASE, epochs=3).warmup_epochs == pytest.approx(1 / 3, abs=1e-6)
    assert ProbeConfig(**BASE, epochs=10).warmup_epochs == pytest.approx(10 / 9, abs=1e-6)
    assert ProbeConfig(**BASE, epochs=11).warmup_epochs == 10
    assert ProbeConfig(**BASE, epochs=3, warmup_epochs=0.5).warmup_epochs == 0.5
    with pytest.raises(ConfigError, match="warmup_epochs"):
        ProbeConfig(**BASE, epochs=3, warmup_epochs=3)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(batch_size=0), "batch_size"),
        (dict(epochs=10, warmup_epochs=10), "warmup_epochs"),
        (dict(optimizer="adam"), "optimizer"),
        (dict(lrs="0.1,abc"), "lrs"),
        (dict(lrs="0.1,0.1"), "distinct"),
        (dict(lrs="0.1,0.1000001"), "first 6 significant digits"),
        (dict(lr=0.5, lrs="0.1"), "not both"),
        (dict(seeds="1,1"), "seeds"),
        (dict(mean="0.5,0.5"), "mean"),
        (dict(resume="maybe"), "resume"),
        (dict(block=-3), "block"),
        (dict(precision="fp8"), "precision"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ProbeConfig(**BASE, **kwargs)


def test_accumulation_must_divide_the_effective_batch():
    cfg = ProbeConfig(**BASE, batch_size=300)
    with pytest.raises(ConfigError, match="not a multiple"):
        cfg.accumulation(1)
    assert ProbeConfig(**BASE, batch_size=300, accum_iter=3).accumulation(2) == (3, 1800)


def test_views_cycle_only_when_asked():
    assert ProbeConfig(**BASE).views() is None
    assert ProbeConfig(**BASE, cache="c").views() == 1
    assert ProbeConfig(**BASE, cache_views=4).views() == 4


# ----------------------------------------------------------------------------------------- samplers
def _epoch(sampler, epoch, start=0):
    sampler.set_epoch(epoch, start)
    return list(sampler)


def test_processes_and_accumulation_partition_the_same_steps():
    one = TrainBatchSampler(103, batch_size=4, accum_iter=4, seed=3)
    two = [TrainBatchSampler(103, batch_size=4, accum_iter=2, world_size=2, rank=r, seed=3) for r in range(2)]
    # per process: ceil(103 / W) samples (DistributedSampler), whole micro-batches of 4 (drop_last)
    assert (one.micro_per_epoch, one.steps_per_epoch, one.leftover, len(one)) == (25, 6, 1, 25)
    assert all((s.micro_per_epoch, s.steps_per_epoch, s.leftover, len(s)) == (13, 6, 1, 13) for s in two)
    single = _epoch(one, 1)
    ranks = [_epoch(s, 1) for s in two]
    for step in range(6):
        joint = [ranks[r][step * 2 + a] for a in range(2) for r in range(2)]
        assert joint == single[step * 4 : step * 4 + 4]
    used = [i for batch in single for i, _ in batch]
    assert len(used) == len(set(used)) == 100  # no repeats; only the incomplete last micro-batch is dropped
    padded = [i for r in ranks for batch in r for i, _ in batch]  # 2 × 52 = 104: one sample repeated as padding
    assert len(padded) == 104 and set(padded) == set(range(103)) and padded.count(single[0][0][0]) == 2


def test_epochs_shuffle_differently_and_resume_mid_epoch():
    s = TrainBatchSampler(50, batch_size=5, accum_iter=2, seed=0)
    e0, e1 = _epoch(s, 0), _epoch(s, 1)
    assert [k[0] for k in e0[0]] != [k[0] for k in e1[0]]
    assert {v for b in e0 for _, v in b} == {0} and {v for b in e1 for _, v in b} == {1}
    assert _epoch(s, 1, start=3) == e1[6:]  # step 3 starts at micro-batch 3 * accum
    assert _epoch(TrainBatchSampler(50, 5, 2, seed=1), 0) != e0
    cyc = TrainBatchSampler(50, 5, 2, views=3)
    assert {v for b in _epoch(cyc, 4) for _, v in b} == {1}


def test_eval_sampler_covers_every_sample_once_without_padding():
    shards = [list(EvalBatchSampler(23, 4, world_size=3, rank=r, view=2)) for r in range(3)]
    flat = sorted(i for shard in shards for batch in shard for i, _ in batch)
    assert flat == list(range(23))
    assert all(v == 2 for shard in shards for batch in shard for _, v in batch)
    assert len(EvalBatchSampler(23, 4, world_size=3, rank=0)) == 2


# ----------------------------------------------------------------------------------------- metrics
def test_topk_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    assert topk_correct(logits, target, ks=(1, 2, 5)).tolist() == [1.0, 2.0, 3.0]


def test_average_precision_matches_the_definition():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    positive = torch.tensor([True, False, True, False, True])
    expected = (1 / 1 + 2 / 3 + 3 / 5) / 3
    assert math.isclose(float(average_precision(scores, positive)), expected)
    targets = torch.stack([positive, ~positive, torch.zeros(5, dtype=torch.bool)], 1).float()
    both = torch.stack([scores, scores, scores], 1)
    expected_neg = (1 / 2 + 2 / 4) / 2
    assert math.isclose(mean_average_precision(both, targets), (expected + expected_neg) / 2)  # empty class skipped


def test_summary_mean_and_std_over_seeds():
    rows = [{"seed": s, "head": "a", "aggregation": "abmilp", "blr": 0.1, "lr": 0.4, "top1": t, "top5": 90.0,
             "entropy": 1.0} for s, t in ((0, 70.0), (1, 72.0), (2, 74.0))]
    (out,) = summarize(rows)
    assert out["top1"] == 72.0 and out["top1_std"] == 2.0 and out["seeds"] == 3 and out["top5_std"] == 0.0
    table = format_table([out, {"aggregation": "cls", "top1": float("nan")}], ["aggregation", "top1"])
    assert "72.00" in table and "–" in table


# ----------------------------------------------------------------------------------------- schedule
def test_mae_schedule_values_at_known_steps():
    # 10 warm-up epochs of 90, lr 0.4: linear ramp, then half-cosine to 0
    assert mae_lr(0, 0.4, 0, 10, 90) == 0
    assert math.isclose(mae_lr(5, 0.4, 0, 10, 90), 0.2)
    assert math.isclose(mae_lr(10, 0.4, 0, 10, 90), 0.4)
    assert math.isclose(mae_lr(50, 0.4, 0, 10, 90), 0.2)
    assert math.isclose(mae_lr(90, 0.4, 0, 10, 90), 0.0, abs_tol=1e-12)
    assert math.isclose(mae_lr(10 + 80 / 3, 0.4, 0, 10, 90), 0.4 * 0.5 * (1 + math.cos(math.pi / 3)))


# ----------------------------------------------------------------------------------------- state
def test_save_atomic_replaces_or_keeps(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_atomic({"format": "beyond_cls.probe", "version": 1, "x": torch.ones(2)}, path)
    assert torch.equal(load_state(path)["x"], torch.ones(2))

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        save_atomic({"x": 2}, path)
    monkeypatch.undo()
    assert torch.equal(load_state(path)["x"], torch.ones(2))  # the old file survived
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left


def test_load_state_refuses_other_files(tmp_path):
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a beyond-cls probe checkpoint"):
        load_state(tmp_path / "other.pt")


def test_preemption_watch_catches_and_restores():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionWatch() as watch:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert watch.signal_name == "SIGUSR1" and watch.exit_code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before


# ----------------------------------------------------------------------------------------- slurm
@pytest.mark.parametrize(
    "nodelist,host",
    [("gpu001", "gpu001"), ("gpu[003-005,010]", "gpu003"), ("a[7,9],b01", "a7"), ("node-1,node-2", "node-1")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_launch_environment_torchrun_wins_over_slurm(monkeypatch):
    from beyond_cls.probe.distributed import _launch_env

    # _launch_env exports RANK, MASTER_ADDR... for env:// rendezvous: give it a private copy of the environment
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")})
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[017-018]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    assert _launch_env() == (5, 8, 1)
    assert os.environ["MASTER_ADDR"] == "gpu017" and os.environ["MASTER_PORT"] == str(20000 + 123456 % 20000)
    assert os.environ["RANK"] == "5" and os.environ["WORLD_SIZE"] == "8"
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert _launch_env() == (2, 4, 0)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name)
    assert _launch_env() == (0, 1, 0)  # a single srun task is a single process


@pytest.mark.parametrize("env,match", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT not"),  # a shell's leftovers
    ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, "0 <= RANK < WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "expected integers"),
])
def test_launch_environment_half_set_is_an_error(monkeypatch, env, match):
    from beyond_cls.probe.distributed import _launch_env

    monkeypatch.setattr(os, "environ", {**{k: v for k, v in os.environ.items() if k not in (
        "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}, **env})
    with pytest.raises(ConfigError, match=match):
        _launch_env()
