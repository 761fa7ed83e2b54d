"""The authors' epoch ends, last and best accuracy, and older runs' files.

The authors' rule, as MAE's ``train_one_epoch`` on a ``drop_last`` loader applies it: micro-batch ``j`` of an
epoch of ``M`` whole micro-batches sets the lr to the schedule at ``epoch + j / M`` when ``j % A == 0``, adds the
gradient of loss / A, and steps when ``(j + 1) % A == 0``; the micro-batches after the last step are forwarded
(BatchNorm statistics update) but never stepped, their gradient zeroed at the next epoch's start.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from beyond_cls.config import ConfigError
from beyond_cls.optim import LARS
from beyond_cls.probe import NonFiniteLoss, Preempted, ProbeConfig, run, summarize
from beyond_cls.probe.bank import HeadBank
from beyond_cls.probe.distributed import DistEnv
from beyond_cls.probe.head_loading import load_probe_head
from beyond_cls.probe.logs import json_safe
from beyond_cls.probe.metrics import last_and_best
from beyond_cls.probe.sampler import TrainBatchSampler
from beyond_cls.probe.state import load_state, save_atomic
from beyond_cls.probe.streams import MicroBatch
from beyond_cls.probe.trainer import FAULT_ENV, ProbeTrainer
from beyond_cls.tables import format_table
from tests.tiny_probe import TINY

N_TRAIN, N_VAL, TOKENS, DIM, CLASSES = 24, 9, 5, 32, 3
BATCH, ACCUM, EPOCHS = 2, 5, 3  # 12 micro-batches per epoch: 2 optimizer steps, 2 micro-batches left over
KEY = "cls@blr1"  # its BatchNorm sees the [cls] tokens only: its statistics tell which micro-batches ran


class _Tokens:
    """A token stream over fixed random tokens, in the order of the real train sampler."""

    def __init__(self, sampler: TrainBatchSampler):
        gen = torch.Generator().manual_seed(7)
        self.sampler = sampler
        self.train = torch.randn(N_TRAIN, TOKENS, DIM, generator=gen)
        self.labels = torch.randint(0, CLASSES, (N_TRAIN,), generator=gen)
        self.val = torch.randn(N_VAL, TOKENS, DIM, generator=gen)
        self.val_labels = torch.randint(0, CLASSES, (N_VAL,), generator=gen)

    def train_batches(self, epoch, start_step=0):
        self.sampler.set_epoch(epoch, start_step)
        for keys in self.sampler:
            idx = torch.tensor([i for i, _ in keys])
            yield MicroBatch(self.train[idx], None, self.labels[idx], 0)

    def eval_batches(self):
        yield MicroBatch(self.val, None, self.val_labels, 0)


def _cfg(out, **kw) -> ProbeConfig:
    return ProbeConfig(**dict(TINY, data="-", out=str(out), heads="cls,mean", lrs="1.0", epochs=EPOCHS,
                              warmup_epochs=1, batch_size=BATCH, accum_iter=ACCUM, eval_every=1, **kw))


def _trainer(out, **kw) -> tuple[ProbeTrainer, _Tokens]:
    sampler = TrainBatchSampler(N_TRAIN, BATCH, ACCUM, seed=0)
    stream = _Tokens(sampler)
    bank = HeadBank(["cls", "mean"], [1.0], DIM, CLASSES, 1, True, seed=5)
    trainer = ProbeTrainer(_cfg(out, **kw), DistEnv(0, 1, 0, torch.device("cpu")), 0, out, bank, stream,
                           sampler.steps_per_epoch, BATCH * ACCUM, ACCUM, False,
                           micro_per_epoch=sampler.micro_per_epoch)
    return trainer, stream


def _mae_lr(t: float, base: float, warmup: float, epochs: float) -> float:
    if t < warmup:
        return base * t / warmup
    return 0.5 * base * (1 + math.cos(math.pi * (t - warmup) / (epochs - warmup)))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted run: (trainer, stream, the bank's initial state, the lr of every step, final results)."""
    trainer, stream = _trainer(tmp_path_factory.mktemp("whole"))
    initial = {k: v.clone() for k, v in trainer.bank.state_dict().items()}
    applied = []  # the lr of every optimizer step, as the update reads it
    update = trainer.steps.update
    trainer.steps.update = lambda: applied.append(trainer.optimizer.param_groups[0]["lr"]) or update()
    final = trainer.fit()
    return trainer, stream, initial, applied, final


def test_epoch_ends_lr_and_batchnorm_follow_the_authors_loop(whole):
    trainer, stream, initial, applied, _ = whole
    sampler = stream.sampler
    assert (sampler.micro_per_epoch, sampler.steps_per_epoch, sampler.leftover) == (12, 2, 2)

    # the authors' loop, written out: one [cls] head, torch BatchNorm + Linear, LARS, loader with drop_last
    base = 1.0 * BATCH * ACCUM / 256
    norm = torch.nn.BatchNorm1d(DIM, affine=False, eps=1e-6)
    linear = torch.nn.Linear(DIM, CLASSES)
    linear.load_state_dict({p: initial[f"heads.{KEY}.head.1.{p}"] for p in ("weight", "bias")})
    opt = LARS(linear.parameters(), lr=0.0)
    want = []
    for epoch in range(EPOCHS):
        perm = sampler.permutation(epoch)
        micro = [perm[j * BATCH : (j + 1) * BATCH] for j in range(N_TRAIN // BATCH)]  # drop_last per micro-batch
        opt.zero_grad()
        for j, idx in enumerate(micro):
            if j % ACCUM == 0:
                lr = _mae_lr(j / len(micro) + epoch, base, 1, EPOCHS)
                opt.param_groups[0]["lr"] = lr
            logits = linear(norm(stream.train[idx][:, 0]))
            (torch.nn.functional.cross_entropy(logits, stream.labels[idx]) / ACCUM).backward()
            if (j + 1) % ACCUM == 0:
                want.append(lr)
                opt.step()
                opt.zero_grad()
    assert applied == pytest.approx(want, rel=1e-12, abs=0) and len(applied) == EPOCHS * 2
    assert applied[1] == pytest.approx(base * (5 / 12))  # per micro-batch spacing: 5/12 of an epoch, not 1/2
    got = trainer.bank.state_dict()
    assert int(got[f"heads.{KEY}.head.0.num_batches_tracked"]) == EPOCHS * 12 == int(norm.num_batches_tracked)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(got[f"heads.{KEY}.head.0.{name}"], getattr(norm, name), rtol=1e-6, atol=1e-7)
    for name in ("weight", "bias"):  # leftovers never stepped, their gradient never carried into a step
        torch.testing.assert_close(got[f"heads.{KEY}.head.1.{name}"], getattr(linear, name).detach(),
                                   rtol=1e-5, atol=1e-6)
    assert trainer.bank.storage.grads.abs().max() == 0  # zeroed at the epoch end


@pytest.mark.parametrize("fault,where", [("TERM@1", (0, 2, 2)), ("TERM@2", (1, 1, 3))])
def test_preempted_run_resumes_bit_identically_around_the_leftovers(whole, tmp_path, monkeypatch, fault, where):
    """TERM@1: saved after the epoch's last step, before its leftover micro-batches; TERM@2: mid-epoch."""
    whole, _, _, _, final = whole
    monkeypatch.setenv(FAULT_ENV, fault)
    cut, _ = _trainer(tmp_path / "cut")
    with pytest.raises(Preempted):
        cut.fit()
    state = load_state(tmp_path / "cut" / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["global_step"]) == where and state["final"] is None
    monkeypatch.delenv(FAULT_ENV)
    resumed, _ = _trainer(tmp_path / "cut")
    same = lambda a, b: json.dumps(a) == json.dumps(b)  # noqa: E731 - NaN entropies ([cls]) compare equal here
    assert same(resumed.fit(), final) and same(resumed.history, whole.history)
    for key, value in whole.bank.state_dict().items():
        torch.testing.assert_close(resumed.bank.state_dict()[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("n,world,batch", [(103, 2, 4), (24, 3, 5), (1000, 8, 7), (10, 4, 3)])
def test_per_process_micro_batches_are_those_of_a_distributed_sampler_with_drop_last(n, world, batch):
    """Counts per process and the samples of an epoch: torch's DistributedSampler (no shuffle, over our
    permutation) and a drop_last loader, as the authors' script builds them."""
    ours = [TrainBatchSampler(n, batch, 2, world_size=world, rank=r, seed=4) for r in range(world)]
    perm = ours[0].permutation(3).tolist()
    theirs = []
    for r in range(world):
        sampler = torch.utils.data.DistributedSampler(perm, num_replicas=world, rank=r, shuffle=False)
        loader = torch.utils.data.DataLoader(perm, batch_size=batch, sampler=sampler, drop_last=True)
        assert ours[r].micro_per_epoch == len(loader)
        theirs += [int(i) for b in loader for i in b]
    mine = [i for s in ours for keys in (s.set_epoch(3), list(s))[1] for i, _ in keys]
    assert sorted(mine) == sorted(theirs)


def test_a_non_finite_leftover_loss_stops_before_the_epoch_is_saved(tmp_path):
    trainer, stream = _trainer(tmp_path)
    batches = stream.train_batches

    def poisoned(epoch, start_step=0):  # epoch 2's two leftover micro-batches
        for j, batch in enumerate(batches(epoch, start_step), start_step * ACCUM):
            yield batch._replace(tokens=batch.tokens * math.nan) if (epoch, j) == (1, 11) else batch

    stream.train_batches = poisoned
    with pytest.raises(NonFiniteLoss, match=r"at epoch 2, in the micro-batches left over after its last step;"):
        trainer.fit()
    state = load_state(tmp_path / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 0, 2)  # epoch 1's end, the last good one
    assert all(torch.isfinite(v).all() for v in state["bank"].values() if v.is_floating_point())


def test_last_and_best_over_the_evaluated_epochs():
    history = [{"epoch": 1, "results": {"a": {"top1": 50.0}}}, {"epoch": 2, "results": {"a": {"top1": 70.0}}},
               {"epoch": 3, "results": {"a": {"top1": 70.0}}}, {"epoch": 4, "results": {"a": {"top1": 60.0}}}]
    assert last_and_best(history, "a", "top1") == {"top1_last": 60.0, "top1_best": 70.0, "best_epoch": 2}
    nan = [{"epoch": 1, "results": {"a": {"mAP": math.nan}}}, {"epoch": 2, "results": {"a": {"mAP": 5.0}}}]
    assert last_and_best(nan, "a", "mAP") == {"mAP_last": 5.0, "mAP_best": 5.0, "best_epoch": 2}
    assert format_table([{"best_epoch": [3, 2]}], ["best_epoch"]).splitlines()[-1] == "| 3/2        |"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (real encoder and sampler) whose epochs leave micro-batches over."""
    from beyond_cls.data import SyntheticConfig, make_synthetic_dataset

    root = tmp_path_factory.mktemp("epochs")
    data = make_synthetic_dataset(root / "set", SyntheticConfig(num_classes=3, train_per_class=8, val_per_class=3,
                                                                image_size=64, object_size=(12, 20)))
    settings = dict(TINY, data=str(data), out=str(root / "run"), heads="cls,abmilp", lrs="1.0", epochs=2,
                    batch_size=BATCH, accum_iter=ACCUM, eval_every=1)
    return settings, run(settings)


def test_results_carry_last_best_and_best_epoch(finished, capsys):
    settings, results = finished
    out = settings["out"]
    state = load_state(f"{out}/seed0/checkpoint.pt")
    assert state["version"] == 2 and state["layout"] == [BATCH, 1, ACCUM] and state["micro_per_epoch"] == 12
    assert int(state["bank"][f"heads.{KEY}.head.0.num_batches_tracked"]) == 2 * 12  # leftovers forwarded
    history = state["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    for row in results["rows"]:
        scores = [h["results"][row["head"]]["top1"] for h in history]
        assert row["top1_last"] == row["top1"] == scores[-1]
        assert row["top1_best"] == max(scores) and scores[row["best_epoch"] - 1] == max(scores)
    for row in results["summary"]:
        assert {"top1_best", "top1_best_std", "best_epoch"} <= set(row) and len(row["best_epoch"]) == 1
    with open(f"{out}/results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {"top1_last", "top1_best", "best_epoch"} <= set(rows[0])
    assert [float(r["top1_best"]) for r in rows] == [r["top1_best"] for r in results["rows"]]
    with open(f"{out}/results.json") as f:
        saved = json.load(f)
    assert saved["rows"] == json_safe(results["rows"])


def _as_version_1(path, finished: bool) -> None:
    """Rewrite a state as the previous version wrote it (no layout; unfinished: no final evaluation)."""
    state = load_state(path)
    state["version"] = 1
    del state["layout"], state["micro_per_epoch"]
    if not finished:
        state["final"] = None
    save_atomic(state, path)


def test_older_results_and_finished_states_still_load(finished, tmp_path, capsys):
    import shutil

    settings, results = finished
    old = tmp_path / "old"
    shutil.copytree(settings["out"], old)
    new_keys = {"top1_last", "top1_best", "top1_best_std", "best_epoch"}
    doc = json.loads((old / "results.json").read_text())
    for part in ("rows", "summary"):
        doc[part] = [{k: v for k, v in row.items() if k not in new_keys} for row in doc[part]]
    (old / "results.json").write_text(json.dumps(doc))
    assert [r["top1"] for r in summarize(doc["rows"])] == [r["top1"] for r in doc["summary"]]
    _as_version_1(old / "seed0" / "checkpoint.pt", finished=True)
    head = load_probe_head(old)  # the run's AbMILP head, from a results file without the new keys
    assert head.key == "abmilp@blr1"
    again = run(dict(settings, out=str(old)))  # a finished version-1 run: its final evaluation is reused
    assert json_safe(again["rows"]) == json_safe(results["rows"])
    assert "finished: its final evaluation is reused" in capsys.readouterr().out


def test_an_unfinished_older_state_is_refused_with_one_line(finished, tmp_path):
    import shutil

    settings, _ = finished
    old = tmp_path / "old"
    shutil.copytree(settings["out"], old)
    path = old / "seed0" / "checkpoint.pt"
    _as_version_1(path, finished=False)
    before = (old / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        run(dict(settings, out=str(old)))
    message = str(err.value)
    assert len(message.splitlines()) == 1 and str(path) in message
    assert "version 1" in message and "version 2" in message and "--resume none" in message
    assert (old / "config.yaml").read_text() == before  # refused before anything was written


def test_another_micro_batch_layout_refuses_the_resume(finished, tmp_path):
    import shutil

    settings, _ = finished
    old = tmp_path / "old"
    shutil.copytree(settings["out"], old)
    with pytest.raises(ConfigError, match=r"batch size × processes × accum_iter: '2×1×5' → '5×1×2'"):
        run(dict(settings, out=str(old), batch_size=5, accum_iter=2))
