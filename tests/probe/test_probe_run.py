"""``beyond-cls probe`` end to end on CPU: outputs, equivalences (processes, bank, cache, resume), failures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from beyond_cls.cli import main
from beyond_cls.data import make_synthetic_dataset
from beyond_cls.probe import NonFiniteLoss, ProbeConfig, run
from beyond_cls.probe.features import TokenSource
from beyond_cls.probe.logs import json_safe
from beyond_cls.probe.state import load_state
from beyond_cls.units import format_lrs
from tests.tiny_probe import TINY, TINY_SET


def _flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif v is False and k == "progress":
            out.append("--no-progress")
        else:
            out += [flag, str(v)]
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe") / "set"
    return make_synthetic_dataset(root, TINY_SET)


def _bank(out: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    return load_state(out / f"seed{seed}" / "checkpoint.pt")["bank"]


def _cli(args: list[str], env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable, "-m"]), "beyond_cls.cli", "probe", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def test_run_writes_results_logs_and_table(dataset, tmp_path, capsys):
    out = tmp_path / "run"
    results = run(dict(TINY, data=str(dataset), out=str(out), seeds="0,1", eval_every=1))
    assert {r["head"] for r in results["rows"]} == {f"{h}@blr{lr}" for h in ("cls", "mean", "abmilp")
                                                    for lr in ("0p1", "1")}
    assert len(results["rows"]) == 12 and len(results["summary"]) == 6
    for row in results["rows"]:
        assert 0 <= row["top1"] <= row["top5"] <= 100
    lrs = {r["head"]: r["lr"] for r in results["summary"]}
    assert lrs["abmilp@blr1"] == pytest.approx(8 / 256)  # lr = blr x effective batch / 256
    saved = json.loads((out / "results.json").read_text())
    assert saved["effective_batch"] == 8 and saved["accum_iter"] == 2 and saved["token_source"]["block"] == 11
    assert (out / "results.csv").read_text().splitlines()[0].startswith("seed,head,aggregation,blr,lr,top1,top5")
    assert (out / "config.yaml").exists()
    for seed in (0, 1):
        lines = [json.loads(x) for x in (out / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
        evals = [x for x in lines if "eval" in x]
        assert [x["epoch"] for x in evals] == [1, 2, 3]
        train = [x for x in lines if "loss" in x]
        assert train and all(set(x["loss"]) == {r["head"] for r in results["summary"]} for x in train)
        assert any(p.name.startswith("events.out.tfevents") for p in (out / f"seed{seed}" / "tb").iterdir())
        state = load_state(out / f"seed{seed}" / "checkpoint.pt")
        assert state["epoch"] == 3 and state["global_step"] == 9 and state["final"] is not None
    # seeds give different heads
    weight = "heads.abmilp@blr1.head.1.weight"
    assert not torch.equal(_bank(out, 0)[weight], _bank(out, 1)[weight])
    table = capsys.readouterr().out
    assert "| aggregation" in table and "top1_std" in table and "abmilp" in table
    # rerunning a finished run resumes it: nothing is trained again, the results are the same
    events = sorted((out / "seed0" / "tb").iterdir())
    again = run(dict(TINY, data=str(dataset), out=str(out), seeds="0,1", eval_every=1))
    assert json_safe(again["rows"]) == json_safe(results["rows"])  # NaN (entropy of [cls]) as None
    assert sorted((out / "seed0" / "tb").iterdir()) == events  # no empty event file from the re-read


def test_bank_heads_equal_heads_trained_alone(dataset, tmp_path):
    run(dict(TINY, data=str(dataset), out=str(tmp_path / "bank")))
    run(dict(TINY, data=str(dataset), out=str(tmp_path / "alone"), heads="abmilp", lrs="1.0"))
    bank, alone = _bank(tmp_path / "bank"), _bank(tmp_path / "alone")
    assert set(alone) < set(bank)
    for key, value in alone.items():
        torch.testing.assert_close(bank[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(bank["heads.abmilp@blr1.head.1.weight"], bank["heads.abmilp@blr0p1.head.1.weight"])


def test_gradient_accumulation_equals_the_mean_gradient(dataset, tmp_path):
    """One optimizer step over 2 micro-batches = one LARS step with the mean of their gradients."""
    from beyond_cls.optim import LARS
    from beyond_cls.probe.bank import HeadBank
    from beyond_cls.probe.distributed import DistEnv
    from beyond_cls.probe.streams import MicroBatch
    from beyond_cls.probe.trainer import ProbeTrainer

    cfg = ProbeConfig(**dict(TINY, data="-", out=str(tmp_path), warmup_epochs=0, epochs=2, eval_every=0))
    micro = [(torch.randn(4, 5, 192), torch.randint(0, 3, (4,))) for _ in range(2)]

    class Stream:
        def train_batches(self, epoch, start_step=0):
            return (MicroBatch(t, None, y, 0) for t, y in micro)

    bank = HeadBank(["abmilp", "mean"], [1.0], 192, 3, 1, True, seed=5)
    reference = HeadBank(["abmilp", "mean"], [1.0], 192, 3, 1, True, seed=5)
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    trainer = ProbeTrainer(cfg, env, 0, tmp_path, bank, Stream(), steps_per_epoch=1, effective_batch=8,
                           accum_iter=2, multilabel=False)
    from beyond_cls.probe.state import PreemptionWatch

    trainer._train_epoch(PreemptionWatch())
    lr = 1.0 * 8 / 256
    opt = LARS(reference.parameters(), lr=lr)
    for tokens, target in micro:
        logits = reference(tokens)
        loss = sum(torch.nn.functional.cross_entropy(v, target) for v in logits.values()) / 2
        loss.backward()
    opt.step()
    for (name, got), want in zip(bank.named_parameters(), reference.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    assert trainer.global_step == 1


# effective batch 16: per epoch 6 micro-batches of 4 on one process (1 step of 4, 2 left over), 3 per process on
# two (1 step of 2, 1 left over each): the leftovers are the same micro-batches, forwarded without a step
@pytest.mark.parametrize("blocks,effective", [(None, 16), ("2,11", 8)])
def test_two_processes_equal_one_with_accumulation(dataset, tmp_path, blocks, effective):
    common = dict(TINY, data=dataset, epochs=2, heads="mean,abmilp,attn-mean", lrs="1.0", effective_batch=effective)
    if blocks is not None:  # layer-wise heads through DDP too
        common["blocks"] = blocks
    single = _cli(_flags(**common, out=tmp_path / "one", accum_iter=effective // 4))
    assert single.returncode == 0, single.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    double = _cli(_flags(**common, out=tmp_path / "two"), launcher=torchrun,
                  env={"OMP_NUM_THREADS": "1"})
    assert double.returncode == 0, double.stderr
    one, two = _bank(tmp_path / "one"), _bank(tmp_path / "two")
    for key in one:
        if "running" in key or "num_batches" in key:
            continue  # BatchNorm running statistics: one update per micro-batch and process, as in MAE
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)
    updates = [k for k in one if re.fullmatch(r"heads\.(b\d+/)?mean@blr1\.head\.0\.num_batches_tracked", k)]
    assert len(updates) == (1 if blocks is None else 2)
    assert all(int(one[k]) == 2 * int(two[k]) == 12 for k in updates)
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2 and results["accum_iter"] == effective // 8
    assert results["effective_batch"] == effective


def test_resume_after_sigkill_equals_uninterrupted(dataset, tmp_path):
    args = _flags(**TINY, data=dataset, ckpt_minutes=0)
    whole = _cli([*args, "--out", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    killed = _cli([*args, "--out", str(tmp_path / "cut")], env={"BEYOND_CLS_FAULT": "KILL@5"})
    assert killed.returncode == -9, killed.stderr
    state = load_state(tmp_path / "cut" / "seed0" / "checkpoint.pt")
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 1, 4)  # mid-epoch, step 5 lost
    resumed = _cli([*args, "--out", str(tmp_path / "cut")])
    assert resumed.returncode == 0, resumed.stderr
    assert "checkpoint.pt at epoch 2, step 1/" in resumed.stdout  # where it resumed, 1-based epoch
    a, b = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("whole", "cut"))
    assert a == b
    for key, value in _bank(tmp_path / "whole").items():
        torch.testing.assert_close(_bank(tmp_path / "cut")[key], value, rtol=0, atol=0, msg=key)


def test_sigterm_saves_and_exits_for_requeue(dataset, tmp_path):
    proc = _cli([*_flags(**TINY, data=dataset, ckpt_minutes=1000), "--out", str(tmp_path)],
                env={"BEYOND_CLS_FAULT": "TERM@2"})
    assert proc.returncode == 143, proc.stderr
    assert "SIGTERM" in proc.stderr and "resume" in proc.stderr and "Traceback" not in proc.stderr
    state = load_state(tmp_path / "seed0" / "checkpoint.pt")
    # the signal arrives after step 2 and is honoured at the next step boundary
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 3, 3) and state["final"] is None


def test_cached_run_equals_uncached_run_with_the_same_views(dataset, tmp_path):
    common = dict(TINY, data=str(dataset), cache_views=2)
    cached = run(dict(common, out=str(tmp_path / "cached"), cache=str(tmp_path / "cache"), cache_dtype="fp32"))
    plain = run(dict(common, out=str(tmp_path / "plain")))
    for key, value in _bank(tmp_path / "plain").items():
        torch.testing.assert_close(_bank(tmp_path / "cached")[key], value, rtol=1e-4, atol=1e-6, msg=key)
    assert [r["top1"] for r in cached["rows"]] == [r["top1"] for r in plain["rows"]]
    shards = sorted((tmp_path / "cache").rglob("*.bin"))
    assert sorted(p.name for p in shards) == ["train_v0.bin", "train_v1.bin", "val_v0.bin"]
    stamps = [p.stat().st_mtime_ns for p in shards]
    run(dict(common, out=str(tmp_path / "again"), cache=str(tmp_path / "cache"), cache_dtype="fp32"))
    assert [p.stat().st_mtime_ns for p in shards] == stamps  # reused, not extracted again
    bf16 = run(dict(common, out=str(tmp_path / "bf16"), cache=str(tmp_path / "cache")))  # default bf16 cache
    assert len(sorted((tmp_path / "cache").rglob("*.bin"))) == 6 and len(bf16["rows"]) == len(plain["rows"])


@pytest.mark.slow
def test_compiled_encoder_trains_like_the_eager_one_on_cpu(dataset, tmp_path):
    """--compile (the default on CUDA) exercised on the CPU: the compiled token source feeds the same bank (≈ 40 s
    of Inductor compiling on 2 cores)."""
    common = dict(TINY, data=str(dataset), heads="mean,abmilp", lrs="1", epochs=2)
    compiled = run(dict(common, out=str(tmp_path / "compiled"), compile=True))
    eager = run(dict(common, out=str(tmp_path / "eager"), compile=False))
    assert [r["head"] for r in compiled["rows"]] == [r["head"] for r in eager["rows"]]
    for key, value in _bank(tmp_path / "eager").items():
        torch.testing.assert_close(_bank(tmp_path / "compiled")[key], value, rtol=1e-3, atol=1e-4, msg=key)


def test_gpu_decode_path_runs_on_cpu(dataset, tmp_path):
    results = run(dict(TINY, data=str(dataset), out=str(tmp_path), decode="gpu", heads="abmilp", lrs="1"))
    assert len(results["rows"]) == 1 and 0 <= results["rows"][0]["top1"] <= 100


def test_corrupt_image_stops_with_its_name_or_is_skipped(dataset, tmp_path, capsys):
    broken = tmp_path / "set"
    shutil.copytree(dataset, broken)
    victim = sorted((broken / "train").rglob("*.jpg"))[5]
    victim.write_bytes(victim.read_bytes()[:200])
    argv = ["probe", *_flags(**TINY, data=broken, out=tmp_path / "a")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and victim.name in err
    assert main(["probe", *_flags(**TINY, data=broken, out=tmp_path / "b"), "--skip-bad-images"]) == 0
    state = load_state(tmp_path / "b" / "seed0" / "checkpoint.pt")
    assert state["images_skipped"] >= 1


# micro-batch 7 = step 4 (epoch 2, step 1): read at once (a checkpoint is due every step) or one step later;
# micro-batch 11 = step 6, the last of epoch 2: read before the epoch's checkpoint
@pytest.mark.parametrize("first_bad,ckpt_minutes,where", [(7, 0, "epoch 2, step 1"), (7, 1000, "epoch 2, step 1"),
                                                          (11, 1000, "epoch 2, step 3")])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path, monkeypatch, first_bad,
                                                                    ckpt_minutes, where):
    forward = TokenSource.forward
    calls = {"n": 0}

    def poisoned(self, images):
        calls["n"] += 1
        tokens = forward(self, images)
        return tokens * float("nan") if calls["n"] >= first_bad else tokens

    monkeypatch.setattr(TokenSource, "forward", poisoned)
    with pytest.raises(NonFiniteLoss, match=f"cls@blr0p1.*{where};"):
        run(dict(TINY, data=str(dataset), out=str(tmp_path), ckpt_minutes=ckpt_minutes))
    state = load_state(tmp_path / "seed0" / "checkpoint.pt")
    assert state["global_step"] == 3  # every step, or the end of epoch 1
    assert all(torch.isfinite(v).all() for v in state["bank"].values() if v.is_floating_point())


class _Batches:
    """A token stream of ``steps`` optimizer steps of 2 micro-batches of 4 random images, on ``device``."""

    def __init__(self, steps: int, device: str = "cpu"):
        self.micro = [(torch.randn(4, 5, 192, device=device), torch.randint(0, 3, (4,), device=device))
                      for _ in range(2 * steps)]

    def train_batches(self, epoch, start_step=0):
        from beyond_cls.probe.streams import MicroBatch

        return (MicroBatch(t, None, y, 0) for t, y in self.micro[2 * start_step:])


def _trainer(tmp_path, stream: _Batches, device: str = "cpu"):
    from beyond_cls.probe.bank import HeadBank
    from beyond_cls.probe.distributed import DistEnv
    from beyond_cls.probe.trainer import ProbeTrainer

    cfg = ProbeConfig(**dict(TINY, data="-", out=str(tmp_path), warmup_epochs=0, epochs=2, log_every=1000,
                             device=device))
    bank = HeadBank(["abmilp", "mean"], [1.0], 192, 3, 1, True, seed=5)
    env = DistEnv(0, 1, 0, torch.device(device))
    steps = len(stream.micro) // 2
    return ProbeTrainer(cfg, env, 0, tmp_path, bank, stream, steps_per_epoch=steps, effective_batch=8,
                        accum_iter=2, multilabel=False)


def test_training_steps_send_no_python_numbers_to_the_device(tmp_path, monkeypatch):
    """The step flags of one process are host-side decisions: no tensor is built from Python numbers per step
    (on CUDA each would be a synchronous host-to-device copy)."""
    from beyond_cls.probe.state import PreemptionWatch

    trainer = _trainer(tmp_path, _Batches(4))
    made = []
    tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or tensor(*a, **k))
    trainer._train_epoch(PreemptionWatch())
    assert made == [] and trainer.global_step == 4


@pytest.mark.gpu
def test_training_step_host_syncs_do_not_grow_with_the_steps(tmp_path):
    """On CUDA the flags of a step are read one step later from pinned memory: the synchronizing calls of an
    epoch (its last log line) do not depend on how many steps it has."""
    import warnings

    from beyond_cls.probe.state import PreemptionWatch

    counts = []
    for steps in (2, 6):
        trainer = _trainer(tmp_path / str(steps), _Batches(steps, "cuda"), "cuda")
        trainer._train_epoch(PreemptionWatch())  # warm-up: allocations, LARS state
        trainer.step = 0
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer._train_epoch(PreemptionWatch())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[0] == counts[1], counts


def _coco(root: Path) -> Path:
    """A 3-category COCO-2014 layout: 12 train and 6 val images, multi-hot labels from the instances JSON."""
    cats = [{"id": i, "name": n} for i, n in ((1, "person"), (3, "car"), (18, "dog"))]
    for split, count in (("train2014", 12), ("val2014", 6)):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(count):
            name = f"COCO_{split}_{i:012d}.jpg"
            Image.new("RGB", (40, 30), ((i * 40) % 255, 90, 160)).save(root / split / name)
            images.append({"id": i + 1, "file_name": name, "width": 40, "height": 30})
            for j, cat in enumerate(cats):
                if (i >> j) & 1 or j == i % 3:
                    anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cat["id"], "iscrowd": 0})
        (root / "annotations").mkdir(exist_ok=True)
        doc = {"images": images, "annotations": anns, "categories": cats}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc))
    return root


def test_multilabel_coco_reports_map(tmp_path):
    root = _coco(tmp_path / "coco")
    results = run(dict(TINY, data=str(root), dataset="coco", out=str(tmp_path / "out"), effective_batch=4,
                       heads="mean,abmilp", lrs="1"))
    for row in results["rows"]:
        assert 0 < row["mAP"] <= 100 and "top1" not in row


@pytest.mark.parametrize(
    "argv_tail,message",
    [
        (["--heads", "cls,pool"], "pool"),
        (["--data", "{missing}"], "does-not-exist"),
        (["--block", "12"], "block 12"),
        (["--effective-batch", "4096"], "smaller than one optimizer step"),
        (["--batch-size", "3"], "not a multiple"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv_tail, message, dataset, tmp_path, capsys):
    fill = {"missing": str(tmp_path / "does-not-exist")}
    argv = ["probe", *_flags(**TINY, data=dataset, out=tmp_path / "o"), *[a.format(**fill) for a in argv_tail]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("beyond-cls probe: error:"), err
    assert message in err


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--epochs", "-1"), ("--precision", "fp8"),
                                        ("--amp", "fp8"), ("--blr", "nan"),
                                        ("--dataset", "mnist")])
def test_bad_flag_values_exit_2(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["probe", flag, value])
    assert exc.value.code == 2 and flag in capsys.readouterr().err


def test_help_lists_every_flag_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for flag in ("--model", "--checkpoint", "--data", "--dataset", "--out", "--epochs", "--batch-size",
                 "--accum-iter", "--blr", "--lr", "--optimizer", "--heads", "--lrs", "--block", "--seeds",
                 "--num-workers", "--decode", "--cache", "--cache-views", "--ckpt-minutes", "--resume", "--compile",
                 "--precision", "--amp", "--skip-bad-images", "--config"):
        assert flag in text, flag
    assert "(default: 90)" in text and "(default: lars)" in text and "(default: 16384)" in text


def test_bench_probe_measures_every_part_and_the_baseline(tmp_path, monkeypatch, capfd):
    import functools

    from beyond_cls.probe import bench
    from beyond_cls.probe.bench import BenchProbeConfig, bench_probe

    monkeypatch.setenv("BEYOND_CLS_CACHE", str(tmp_path))
    # an encoder whose token source is block 3 (as the zoo's SimMIM is block 7): bench and baseline use it
    monkeypatch.setattr(bench, "load_encoder", functools.partial(bench.load_encoder, block=3))
    cfg = BenchProbeConfig(model="vit_tiny_patch16_224", img_size=32, batch_size=4, steps=1, warmup=0,
                           num_workers=0, heads="cls,abmilp", num_classes=10, device="cpu")
    result = bench_probe(cfg)
    for part in ("loader", "encoder", "heads", "step", "baseline_per_head"):
        assert result[part] > 0, part
    assert set(result["baseline"]) == {"cls", "abmilp"}
    expected = result["step"] * sum(1 / r for r in result["baseline"].values())
    assert result["speedup_per_head"] == pytest.approx(expected)
    printed, errors = capfd.readouterr()
    assert "loader" in printed and "baseline" in printed and "per head" in printed
    assert "tokens of block 3, pre-norm" in printed and result["token_block"] == 3
    assert "find_unused_parameters" not in errors  # DDP's C++ warning about the baseline is not shown
    rates = [line for line in printed.splitlines() if line.endswith("images/s") or "images/s  (" in line]
    assert len(rates) == 6 and len({line.index(" images/s") for line in rates}) == 1  # one column of rates


@pytest.mark.gpu
@pytest.mark.parametrize("compile_encoder,blocks", [(False, None), (True, None), (True, "5,11")])
def test_probe_on_cuda_with_gpu_decoding(dataset, tmp_path, compile_encoder, blocks):
    heads = TINY["heads"] + ",attn-mean,attn-center,guide:vit_tiny_patch16_224"  # the fused kept rows, compiled too
    extra = {} if blocks is None else {"blocks": blocks}  # layer-wise: block hooks under torch.compile
    results = run(dict(TINY, data=str(dataset), out=str(tmp_path), device="cuda", decode="gpu", precision="bf16",
                       channels_last=True, compile=compile_encoder, num_workers=2, heads=heads, **extra))
    assert all(0 <= r["top1"] <= 100 for r in results["rows"])
    assert {r["block"] for r in results["rows"]} == ({11} if blocks is None else {5, 11})
    state = load_state(tmp_path / "seed0" / "checkpoint.pt")
    assert state["global_step"] == 9 and all(v.device.type == "cpu" for v in state["bank"].values())


def test_progress_bar_shows_the_learning_rates_applied(dataset, tmp_path, capfd):
    """lr= is the optimizer's rate (base lr × batch/256 × schedule factor), not the schedule factor."""
    run(dict(TINY, data=str(dataset), out=str(tmp_path), progress=True, epochs=2))
    shown = set(re.findall(r"lr ([0-9.e+-]+)\.\.([0-9.e+-]+), \d+ img/s, run ETA ", capfd.readouterr().err))
    logged = [json.loads(line) for line in (tmp_path / "seed0" / "metrics.jsonl").read_text().splitlines()]
    factors = [r["lr_factor"] for r in logged if "lr_factor" in r]
    scale = 8 / 256  # effective batch 8
    expected = {tuple(format_lrs([0.1 * scale * f, 1.0 * scale * f])) for f in factors}
    assert shown and shown <= expected


def test_end_of_run_marks_best_lrs_and_resume_says_where(dataset, tmp_path, capsys):
    results = run(dict(TINY, data=str(dataset), out=str(tmp_path), epochs=2))
    printed = capsys.readouterr().out
    for aggregation in ("cls", "mean", "abmilp"):
        rows = [r for r in results["summary"] if r["aggregation"] == aggregation]
        best = max(rows, key=lambda r: r["top1"])
        assert [r["best"] for r in rows].count("*") == 1 and best["best"] == "*"
    assert "min in all" in printed and "training images/s" in printed and results["images_trained"] > 0
    assert "| best" in printed
    run(dict(TINY, data=str(dataset), out=str(tmp_path), epochs=2))
    printed = capsys.readouterr().out
    assert "finished: its final evaluation is reused" in printed and "nothing left to train" in printed
