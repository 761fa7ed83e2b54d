"""LARS against the per-parameter reference, and the MAE learning-rate schedule."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from beyond_cls import reference
from beyond_cls.optim import LARS, adjust_learning_rate, mae_lr, scaled_lr

F64 = torch.float64


def _make_params() -> dict[str, torch.nn.Parameter]:
    """A mix of shapes: 2-D, 4-D conv, bias, zero-initialised 2-D, and one that never gets a grad."""
    return {
        "w": torch.nn.Parameter(torch.randn(7, 5, dtype=F64)),
        "conv": torch.nn.Parameter(torch.randn(4, 3, 3, 3, dtype=F64)),
        "bias": torch.nn.Parameter(torch.randn(7, dtype=F64)),
        "zero": torch.nn.Parameter(torch.zeros(3, 4, dtype=F64)),
        "frozen": torch.nn.Parameter(torch.randn(6, dtype=F64)),
    }


GROUPS = [
    {"names": ["w", "bias"], "lr": 0.5, "momentum": 0.9},
    {"names": ["conv", "zero", "frozen"], "lr": 0.1, "momentum": 0.8, "trust_coefficient": 0.01},
]


def _groups(params: dict[str, torch.nn.Parameter]) -> list[dict]:
    out = []
    for g in GROUPS:
        group = {k: v for k, v in g.items() if k != "names"}
        group["params"] = [params[n] for n in g["names"]]
        out.append(group)
    return out


def _set_grads(params: dict[str, torch.nn.Parameter], gen: torch.Generator) -> None:
    for name, p in params.items():
        p.grad = None if name == "frozen" else torch.randn(p.shape, dtype=F64, generator=gen)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_lars_matches_reference(weight_decay):
    params = _make_params()
    ref = {n: p.detach().clone() for n, p in params.items()}
    bufs = {n: torch.zeros_like(p) for n, p in ref.items()}
    frozen_before = params["frozen"].detach().clone()
    opt = LARS(_groups(params), weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        _set_grads(params, gen)
        for g in GROUPS:
            names = [n for n in g["names"] if params[n].grad is not None]
            reference.lars_step(
                [ref[n] for n in names],
                [params[n].grad for n in names],
                [bufs[n] for n in names],
                lr=g["lr"],
                weight_decay=weight_decay,
                momentum=g["momentum"],
                trust_coefficient=g.get("trust_coefficient", 0.001),
            )
        zero_grad = params["zero"].grad.clone()
        opt.step()
        if step == 0:  # ‖p‖ = 0: trust ratio 1, so the first update is the raw grad (+0 decay)
            torch.testing.assert_close(params["zero"].detach(), -0.1 * zero_grad, rtol=0, atol=0)
        for n, p in params.items():
            torch.testing.assert_close(p.detach(), ref[n], rtol=1e-12, atol=1e-12, msg=f"{n} step {step}")
    assert torch.equal(params["frozen"].detach(), frozen_before)
    assert params["frozen"] not in opt.state
    assert all(set(opt.state[params[n]]) == {"mu"} for n in ("w", "conv", "bias", "zero"))
    for n in ("w", "conv", "bias", "zero"):
        torch.testing.assert_close(opt.state[params[n]]["mu"], bufs[n], rtol=1e-12, atol=1e-12)


def test_lars_hand_computed():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=F64))  # ‖w‖ = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=F64))
    opt = LARS([w, b], lr=1.0, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001)
    w.grad = torch.tensor([[0.6, 0.8]], dtype=F64)
    b.grad = torch.tensor([0.5, 0.25], dtype=F64)
    opt.step()
    # d = g + 0.1·w = [0.9, 1.2], ‖d‖ = 1.5, ratio = 0.001·5/1.5 = 1/300 → d = [0.003, 0.004]
    torch.testing.assert_close(w.detach(), torch.tensor([[2.997, 3.996]], dtype=F64))
    # bias: no decay, no trust ratio: mu = g
    torch.testing.assert_close(b.detach(), torch.tensor([0.5, -2.25], dtype=F64))
    opt.step()  # same bias grad: mu = 0.9·[0.5, 0.25] + [0.5, 0.25] = [0.95, 0.475]
    torch.testing.assert_close(b.detach(), torch.tensor([-0.45, -2.725], dtype=F64))


def test_lars_state_dict_round_trip():
    params_a = _make_params()
    opt_a = LARS(_groups(params_a), weight_decay=0.05)
    gen = torch.Generator().manual_seed(2)
    for _ in range(2):
        _set_grads(params_a, gen)
        opt_a.step()
    params_b = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params_a.items()}
    opt_b = LARS(_groups(params_b), lr=123.0)  # hyperparameters come back from the state dict
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[0]["lr"] == 0.5
    assert opt_b.param_groups[1]["weight_decay"] == 0.05
    for _ in range(3):
        _set_grads(params_a, gen)
        for n, p in params_b.items():
            p.grad = None if params_a[n].grad is None else params_a[n].grad.clone()
        opt_a.step()
        opt_b.step()
    for n in params_a:
        assert torch.equal(params_a[n].detach(), params_b[n].detach()), n


def test_lars_no_host_sync(monkeypatch):
    params = _make_params()
    opt = LARS(_groups(params), weight_decay=0.05)
    _set_grads(params, torch.Generator().manual_seed(3))
    before = {n: p.detach().clone() for n, p in params.items()}

    def _sync(*args, **kwargs):
        raise AssertionError("host sync inside LARS.step")

    for name in ("item", "tolist", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, _sync)
    opt.step()
    opt.step()
    monkeypatch.undo()
    assert not torch.equal(params["w"].detach(), before["w"])


def test_lars_closure_and_bad_args():
    w = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([w], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() == pytest.approx(4.0)
    assert not torch.equal(w.detach(), torch.ones(2, 2))
    with pytest.raises(ValueError, match="momentum"):
        LARS([w], momentum=-0.1)
    with pytest.raises(ValueError, match="weight_decay"):
        LARS([w], weight_decay=-1.0)


def test_mae_lr_values():
    kw = dict(lr=1.0, min_lr=0.01, warmup_epochs=10, epochs=90)
    assert mae_lr(0, **kw) == 0.0
    assert mae_lr(5, **kw) == pytest.approx(0.5)
    assert mae_lr(2.5, **kw) == pytest.approx(0.25)  # fractional epoch inside warm-up
    assert mae_lr(10, **kw) == pytest.approx(1.0)
    assert mae_lr(50, **kw) == pytest.approx(0.01 + 0.99 * 0.5)
    expected = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (30.25 - 10) / 80))
    assert mae_lr(30.25, **kw) == pytest.approx(expected)
    assert mae_lr(90, **kw) == pytest.approx(0.01)
    # per-iteration schedule after warm-up: strictly decreasing
    values = [mae_lr(10 + i / 7, **kw) for i in range(80 * 7 + 1)]
    assert all(a > b for a, b in itertools.pairwise(values))
    assert mae_lr(0, lr=1.0, min_lr=0.0, warmup_epochs=0, epochs=90) == pytest.approx(1.0)
    assert mae_lr(45, lr=1.0, min_lr=0.0, warmup_epochs=0, epochs=90) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="epochs"):
        mae_lr(0, lr=1.0, min_lr=0.0, warmup_epochs=10, epochs=10)


def test_adjust_learning_rate_lr_scale():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = LARS([{"params": [a]}, {"params": [b], "lr_scale": 0.5}], lr=0.0)
    value = adjust_learning_rate(opt, 5, lr=2.0, min_lr=0.0, warmup_epochs=10, epochs=90)
    assert value == pytest.approx(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5)


def test_scaled_lr():
    assert scaled_lr(0.1, 16384) == 6.4
    assert scaled_lr(0.1, 256) == pytest.approx(0.1)


def test_lars_float32_equals_the_reference_bit_for_bit():
    """One multi-tensor update over all groups, with the lrs as a tensor, rounds like the per-parameter reference."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(7, 5), (7,), (3, 3, 2), (1,), (4, 6)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    groups = [[0, 1], [2], [3, 4]]
    opt = LARS([{"params": [params[i] for i in g], "lr": 0.1 * (k + 1)} for k, g in enumerate(groups)],
               weight_decay=0.01)
    for step in range(4):
        for k, group in enumerate(opt.param_groups):
            group["lr"] = 0.1 * (k + 1) / (step + 1)  # changing lrs reach the staged tensor
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        for k, g in enumerate(groups):
            reference.lars_step([ref[i] for i in g], [params[i].grad for i in g], [bufs[i] for i in g],
                                lr=opt.param_groups[k]["lr"], weight_decay=0.01)
        opt.step()
        for p, want in zip(params, ref):
            torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)


def test_lars_update_ops_do_not_grow_with_the_groups():
    from beyond_cls.probe.bench import count_host_ops

    def ops(groups: int) -> int:
        params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(groups)] + [torch.nn.Parameter(torch.randn(3))]
        opt = LARS([{"params": [p], "lr": 0.1 * (i + 1)} for i, p in enumerate(params)])
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # momentum buffers, staged lrs
        return count_host_ops(opt.step)

    assert ops(2) == ops(12) <= 20
