"""The fast head bank: batched heads, flat storage, BankStep (eager, emulated and CUDA graphs), host ops per step."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from beyond_cls import reference
from beyond_cls.models import load_encoder
from beyond_cls.optim import LARS
from beyond_cls.probe.bank import HeadBank
from beyond_cls.probe.bench import HostOpCounter, count_host_ops
from beyond_cls.probe.features import TokenSource
from beyond_cls.probe.step import BankStep
from tests.tiny_probe import TINY

# every way a head is computed: shared (cls, mean, K-branch abmilp_pool, softmax_pool of MLP/positional scorers),
# head by head (attentive probing, SA-AbMILP), with given selection weights (attn-mean)
SPECS = ["cls", "mean", "abmilp", "abmilp+cls", "abmilp-k2", "abmilp-mlp2-gelu", "abmilp-pos", "ap2", "saabmilp-map",
         "attn-mean"]
LRS = [0.1, 1.0]
CLASSES = 5
# equal to the per-head path up to rounding: [cls] (its BatchNorm read a strided view of the tokens there, one
# contiguous batch here), the MLP / positional scorers (one batched softmax_pool GEMM here); the rest bit for bit
ROUNDED = ("cls", "abmilp-mlp2-gelu", "abmilp-pos")


def _tiny_tokens(count: int) -> list[torch.Tensor]:
    """Tokens of the tiny probe's encoder (vit_tiny at 32 px: [cls] + 4 patches, D = 192) on random images."""
    source = TokenSource(load_encoder(TINY["model"], img_size=TINY["img_size"]), None, False)
    with torch.no_grad():
        return [source(torch.randn(4, 3, TINY["img_size"], TINY["img_size"])) for _ in range(count)]


def _batches(kind: str, count: int = 6) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    tokens = _tiny_tokens(count) if kind == "tiny" else [torch.randn(4, 197, 80) for _ in range(count)]
    return [(t, torch.rand(4, 1, t.shape[1] - 1).softmax(-1), torch.randint(0, CLASSES, (4,))) for t in tokens]


def _bank(dim: int, specs: list[str] = SPECS) -> HeadBank:
    return HeadBank(specs, LRS, dim, CLASSES, 1, True, seed=3, grid=(2, 2) if dim == 192 else (14, 14))


def _per_head_path(bank: HeadBank, batches, accum: int, lr_of, multilabel: bool = False) -> None:
    """The bank trained the way it was before it ran batched: each head's own modules, one loss per head, LARS
    (the reference, parameter by parameter) per param group."""
    bufs: dict[int, torch.Tensor] = {}
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    for step in range(len(batches) // accum):
        for tokens, sel, y in batches[step * accum:(step + 1) * accum]:
            losses = []
            for e in bank.entries:
                head = bank.heads[e.key]
                logits = head.head(bank._pool(tokens, sel[:, 0])) if e.spec == "attn-mean" else head(tokens)
                losses.append(loss_fn(logits, y.float() if multilabel else y))
            (torch.stack(losses).sum() / accum).backward()
        for e in bank.entries:
            params = list(bank.heads[e.key].parameters())
            reference.lars_step(params, [p.grad for p in params],
                                [bufs.setdefault(id(p), torch.zeros_like(p)) for p in params], lr=lr_of(e.blr, step))
        for p in bank.parameters():
            p.grad = None


def _fast_path(bank: HeadBank, batches, accum: int, lr_of, graphs: str, multilabel: bool = False) -> BankStep:
    opt = LARS(bank.param_groups(1.0))
    steps = BankStep(bank, opt, accum_iter=accum, graphs=graphs, multilabel=multilabel)
    for step in range(len(batches) // accum):
        for group in opt.param_groups:  # the schedule changes every lr at every step
            group["lr"] = lr_of(group["base_lr"], step)
        for tokens, sel, y in batches[step * accum:(step + 1) * accum]:
            steps.micro(tokens, sel, y.float() if multilabel else y)
        steps.update()
    return steps


def _lr(blr: float, step: int) -> float:
    return blr * 8 / 256 * (step + 1) / 3


@pytest.mark.parametrize("graphs", ["off", "emulate"])
@pytest.mark.parametrize("kind", ["tiny", "ragged"])
def test_bank_trains_like_the_per_head_path(kind, graphs):
    batches = _batches(kind)
    dim = batches[0][0].shape[-1]
    fast, slow = _bank(dim), _bank(dim)
    steps = _fast_path(fast, batches, 2, _lr, graphs)
    _per_head_path(slow, batches, 2, _lr)
    assert steps.status == ("emulated" if graphs == "emulate" else "off (asked)")
    got, want = fast.state_dict(), slow.state_dict()
    assert list(got) == list(want)  # the checkpoint layout: same keys, same order
    for key, value in want.items():
        spec = key.split(".")[1].split("@")[0]
        tol = dict(rtol=1e-5, atol=1e-6) if spec in ROUNDED else dict(rtol=0, atol=0)
        torch.testing.assert_close(got[key], value, **tol, msg=key)
    key = "heads.abmilp@blr1.head.1.weight"
    assert not torch.equal(got[key], _bank(dim).state_dict()[key])  # it trained


def test_multilabel_bank_matches_the_per_head_path_within_rounding():
    """Binary cross entropy: the mean's gradient is rounded once per element here, after the product per head
    there (``nn.BCEWithLogitsLoss``): a few ulps after three steps."""
    batches = [(t, sel, (torch.rand(4, CLASSES) > 0.5).long()) for t, sel, _ in _batches("ragged")]
    specs = ["cls", "abmilp", "abmilp-mlp2-gelu", "attn-mean"]
    fast, slow = _bank(80, specs), _bank(80, specs)
    _fast_path(fast, batches, 2, _lr, "off", multilabel=True)
    _per_head_path(slow, batches, 2, _lr, multilabel=True)
    start = _bank(80, specs).state_dict()
    for key, value in slow.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, rtol=1e-5, atol=1e-7, msg=key)
        if key.endswith("head.1.weight"):
            assert not torch.equal(value, start[key])


def test_emulated_graphs_follow_the_eager_steps_through_short_batches_and_reloads():
    """The static-buffer path the CUDA graphs run equals the eager one, also around micro-batches of another size
    (eager), of one image (running statistics) and none (zero loss), and after the optimizer state is reloaded."""
    batches = _batches("ragged", 8)
    short = [(t[:n], s[:n], y[:n]) for (t, s, y), n in zip(batches[:3], (3, 1, 0))]
    sequence = batches[:4] + short[:2] + batches[4:6] + [short[2], batches[6]]
    banks = {mode: _bank(80, ["mean", "abmilp", "abmilp-pos", "attn-mean"]) for mode in ("off", "emulate")}
    runs = {}
    for mode, bank in banks.items():
        opt = LARS(bank.param_groups(1.0), lr=0.05)
        steps = runs[mode] = BankStep(bank, opt, accum_iter=2, graphs=mode)
        for i in range(0, len(sequence), 2):
            for group in opt.param_groups:
                group["lr"] = 0.05 * (i + 1)
            for tokens, sel, y in sequence[i:i + 2]:
                losses = steps.micro(tokens, sel, y)
                assert losses.shape == (len(bank.entries),) and not losses.requires_grad
            steps.update()
            if i == 4:  # a resumed optimizer: new momentum tensors, the update graph is made again
                before = steps._update
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        if mode == "emulate":
            assert steps._micro is not None and steps._update is not before
    assert runs["emulate"].status == "emulated"
    for key, value in banks["off"].state_dict().items():
        torch.testing.assert_close(banks["emulate"].state_dict()[key], value, rtol=0, atol=0, msg=key)
    counts = [v for k, v in banks["off"].state_dict().items() if k.endswith("num_batches_tracked")]
    assert all(int(c) == 8 for c in counts)  # 10 micro-batches, 2 of them (1 and 0 images) on running statistics


def test_storage_views_checkpoints_and_gradients():
    bank = _bank(64, ["cls", "abmilp", "ap2"])
    flat = bank.storage.params
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    assert all(start <= p.data_ptr() < end for p in bank.parameters())  # every parameter is a view of one tensor
    # an old checkpoint (separate tensors) loads in place, and so does the state after a dtype change
    saved = {k: v.clone() + 1.0 if v.is_floating_point() else v.clone() for k, v in bank.state_dict().items()}
    bank.load_state_dict(saved)
    assert bank.storage.linked() and all(torch.equal(v, saved[k]) for k, v in bank.state_dict().items())
    bank.double()
    assert bank.storage.params.dtype == torch.float64 and bank.storage.linked()
    assert all(torch.equal(v, saved[k].to(v.dtype)) for k, v in bank.state_dict().items())
    t, y = torch.randn(4, 17, 64, dtype=torch.float64), torch.randint(0, CLASSES, (4,))
    bank(t, targets=y).sum().backward()
    grads = bank.storage.grads
    assert grads.abs().sum() > 0 and all(p.grad.data_ptr() >= grads.data_ptr() for p in bank.parameters())
    bank.zero_grad()
    assert grads.abs().sum() == 0 and bank.storage.linked_grads()
    bank(t, targets=y).sum().backward()
    opt = torch.optim.SGD(bank.parameters(), lr=0.1)
    opt.zero_grad()  # set_to_none: the next forward links zeroed views again
    bank(t, targets=y).sum().backward()
    once = grads.clone()
    bank.zero_grad()
    bank(t, targets=y).sum().backward()
    torch.testing.assert_close(grads, once, rtol=0, atol=0)
    bank.heads["abmilp@blr1"].to(torch.float32).to(torch.float64)  # a part replaced from outside: laid out again
    assert not bank.storage.linked()
    bank(t, targets=y)
    assert bank.storage.linked()


def test_bank_step_says_why_graphs_are_off():
    said = []
    bank = _bank(64, ["mean", "abmilp"])
    BankStep(bank, LARS(bank.param_groups(1.0)), graphs="on", say=said.append)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    fp16 = BankStep(bank, LARS(bank.param_groups(1.0)), graphs="emulate", scaler=scaler, say=said.append)
    sgd = BankStep(bank, torch.optim.SGD(bank.param_groups(1.0), lr=0.1), graphs="emulate", say=said.append)
    quiet = BankStep(bank, LARS(bank.param_groups(1.0)), say=said.append)  # auto on the CPU: nothing to say
    assert said == ["head bank CUDA graphs off: they need a CUDA device; the heads run eagerly"]
    assert fp16.status.startswith("off (fp16 loss scaling") and not fp16.graphs
    assert sgd.graphs and not sgd.graphs_update and "SGD updates eager" in sgd.status
    assert quiet.status == "off (they need a CUDA device)"
    with pytest.raises(ValueError, match="graphs must be one of"):
        BankStep(bank, LARS(bank.param_groups(1.0)), graphs="yes")


def _issue_step(lrs: list[float], dim: int = 768, classes: int = 1000):
    """One bank step of the issue's configuration: ViT-B width, the default heads × the e2e benchmark's lrs."""
    bank = HeadBank(["cls", "mean", "abmilp", "abmilp+cls"], lrs, dim, classes, 1, True)
    steps = BankStep(bank, LARS(bank.param_groups(1.0), lr=0.1), graphs="off")
    tokens, y = torch.randn(4, 197, dim), torch.randint(0, classes, (4,))

    def step() -> None:
        steps.micro(tokens, None, y)
        steps.update()

    step()  # lazily made state: momentum buffers, the staged learning rates
    return step


def test_host_ops_per_bank_step_of_the_issue_configuration():
    """12 heads at ViT-B width: forward, losses, backward and LARS in at most 80 ops dispatched from the host
    (≈ 541 when every head and param group ran on its own), and no more for 3 lrs than for 1."""
    step = _issue_step([0.05, 0.1, 0.2])
    with HostOpCounter() as counter:
        step()
    assert counter.count <= 80, counter.ops
    assert counter.ops["beyond_cls.abmilp_pool.default"] == 2  # abmilp and abmilp+cls: one read each for 3 lrs
    assert counter.ops["aten.native_batch_norm.default"] == counter.ops["aten.baddbmm.default"] == 1
    assert counter.ops["aten._foreach_addcmul_.Scalar"] == 1  # one LARS update for the 12 param groups
    assert count_host_ops(_issue_step([0.1], 96, 10)) == count_host_ops(_issue_step([0.05, 0.1, 0.2], 96, 10))


@pytest.mark.gpu
def test_cuda_graph_steps_match_eager_steps_without_host_syncs():
    """On CUDA the captured micro-batch and update replay what the eager step does, follow the lr schedule, and
    dispatch a handful of ops per step (input copies, the staged lrs)."""
    batches = [(t.cuda(), s.cuda(), y.cuda()) for t, s, y in _batches("ragged", 12)]
    banks = {mode: _bank(80, ["mean", "abmilp", "abmilp-k2", "abmilp-pos", "attn-mean"]).cuda()
             for mode in ("off", "on")}
    runs = {mode: _fast_path(bank, batches, 2, _lr, mode) for mode, bank in banks.items()}
    assert runs["on"].status == "on" and runs["on"]._micro is not None and runs["on"]._update is not None
    for key, value in banks["off"].state_dict().items():
        torch.testing.assert_close(banks["on"].state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    steps, (tokens, sel, y) = runs["on"], batches[0]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught, HostOpCounter() as counter:
            warnings.simplefilter("always")
            steps.micro(tokens, sel, y)
            steps.update()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert not [w for w in caught if "synchroniz" in str(w.message)]
    assert counter.count <= 8, counter.ops
