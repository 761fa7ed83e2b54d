"""The heads as the authors' code builds them: PyTorch's default Linear init (MAE's as an option), a
trainable ``-pos`` table trained by LARS, SA-AbMILP without qkv bias; and checkpoints written before, which must
load and give the outputs they gave then."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from torch import nn

from beyond_cls.heads import AbMILP, LinearProbe
from beyond_cls.optim import LARS
from beyond_cls.probe.bank import HeadBank, legacy_bank_state
from beyond_cls.probe.head_loading import load_probe_head
from beyond_cls.probe.state import save_atomic

D, C, GRID = 64, 7, (4, 4)
P = GRID[0] * GRID[1]


def test_linear_keeps_pytorchs_default_init_mae_is_an_option():
    torch.manual_seed(3)
    probe = LinearProbe(AbMILP(D), D, C)
    torch.manual_seed(3)
    AbMILP(D)
    want = nn.Linear(D, C)  # the authors' head: a fresh nn.Linear, no re-init
    assert torch.equal(probe.head[1].weight, want.weight) and torch.equal(probe.head[1].bias, want.bias)
    bound = 1 / math.sqrt(D)  # kaiming-uniform(a=√5): U(±1/√fan_in), the bias too
    assert probe.head[1].weight.abs().max() <= bound and probe.head[1].bias.abs().min() > 0
    mae = LinearProbe(AbMILP(D), D, 1000, init="mae")
    assert abs(mae.head[1].weight.std().item() - 0.01) < 0.001  # truncated at ±2 (absolute), as timm's
    assert torch.equal(mae.head[1].bias, torch.zeros(1000))
    with pytest.raises(ValueError, match="init"):
        LinearProbe(AbMILP(D), D, C, init="xavier")


@pytest.mark.parametrize("head_init", ["pytorch", "mae"])
def test_bank_init_is_deterministic_per_seed(head_init):
    def weights(seed: int) -> dict[str, torch.Tensor]:
        bank = HeadBank(["cls", "abmilp-pos"], [0.1, 1.0], D, C, 1, True, seed=seed, grid=GRID, head_init=head_init)
        return bank.state_dict()

    a, b, other = weights(5), weights(5), weights(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    linears = [k for k in a if k.endswith("head.1.weight")]
    assert len(linears) == 4 and all(not torch.equal(a[k], other[k]) for k in linears)
    biases = [a[k.replace("weight", "bias")] for k in linears]
    assert all((bias == 0).all() == (head_init == "mae") for bias in biases)


def test_pos_table_is_trained_by_lars_like_any_matrix():
    """The authors' table is a Parameter of the head, in LARS's one param group: weight decay and the trust ratio
    apply to it (ndim > 1), as to their [1, N, D] table."""
    bank = HeadBank(["abmilp+cls-pos"], [0.1], D, C, 1, True, grid=GRID)
    key = "abmilp+cls-pos@blr0p1"
    table = bank.heads[key].aggregation.pos_embed
    assert table.shape == (1 + P, D) and table.requires_grad
    (group,) = bank.param_groups(1.0)
    assert any(p is table for p in group["params"])
    before = table.detach().clone()
    opt = LARS(bank.param_groups(1.0), lr=0.5, weight_decay=0.05)
    for g in opt.param_groups:
        g["lr"] = 0.5
    tokens, labels = torch.randn(6, 1 + P, D), torch.randint(0, C, (6,))
    bank.zero_grad()
    nn.functional.cross_entropy(bank(tokens)[key], labels).backward()
    grad = table.grad.detach().clone()
    assert grad.abs().sum() > 0 and grad[0].abs().sum() > 0  # the zero [cls] row trains too
    opt.step()
    d = grad + 0.05 * before  # the MAE / authors' LARS on a matrix: decay, then the trust ratio
    want = before - 0.5 * d * (0.001 * before.norm() / d.norm())
    torch.testing.assert_close(table.detach(), want, rtol=1e-5, atol=1e-7)


def test_pos_table_needs_the_encoders_grid():
    with pytest.raises(ValueError, match="patch grid"):
        HeadBank(["abmilp-pos"], [0.1], D, C, 1, True)
    bank = HeadBank(["abmilp-pos"], [0.1], D, C, 1, True, grid=(2, 3))  # non-square grids: rows x cols
    assert bank.heads["abmilp-pos@blr0p1"].aggregation.pos_embed.shape == (6, D)
    bank(torch.randn(2, 1 + 6, D))
    with pytest.raises(ValueError, match="2x3 patch grid"):
        bank(torch.randn(2, 1 + 9, D))


def test_sa_abmilp_has_no_qkv_bias():
    keys = HeadBank(["saabmilp-map"], [0.1], D, C, 1, True).state_dict()
    assert "heads.saabmilp-map@blr0p1.aggregation.attn.qkv.weight" in keys
    assert not any(k.endswith("qkv.bias") for k in keys)


# --- checkpoints of beyond-cls 0.1 ---------------------------------------------------------------------------

OLD_HEADS = "abmilp-pos,abmilp+cls-mlp2-pos,saabmilp-h2-map,mean"


def _old_pos(num_patches: int) -> torch.Tensor:
    """The fixed embedding of the previous version, written out: (row, column) halves of sin/cos at 10000^(-i/(D/4))."""
    g, q = math.isqrt(num_patches), D // 4
    omega = 1.0 / 10000 ** (torch.arange(q, dtype=torch.float64) / q)
    r, c = torch.arange(num_patches) // g, torch.arange(num_patches) % g

    def half(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.sin(x[:, None] * omega), torch.cos(x[:, None] * omega)], 1)

    return torch.cat([half(r.double()), half(c.double())], 1)


def _old_state() -> dict[str, torch.Tensor]:
    """A bank state dict as the previous version wrote it: SA-AbMILP with a qkv bias, no ``pos_embed`` key."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    aggregation = {
        "abmilp-pos": {"scorer.0.weight": rand(1, D), "scorer.0.bias": rand(1)},
        "abmilp+cls-mlp2-pos": {"scorer.0.weight": rand(D, D), "scorer.0.bias": rand(D),
                                "scorer.2.weight": rand(1, D), "scorer.2.bias": rand(1)},
        "saabmilp-h2-map": {"attn.qkv.weight": rand(3 * D, D), "attn.qkv.bias": rand(3 * D),
                            "attn.proj.weight": rand(D, D), "attn.proj.bias": rand(D),
                            "abmilp.scorer.0.weight": rand(1, D), "abmilp.scorer.0.bias": rand(1)},
        "mean": {},
    }
    state = {}
    for spec, params in aggregation.items():
        prefix = f"heads.{spec}@blr0p1."
        state.update({prefix + "aggregation." + k: v for k, v in params.items()})
        state.update({prefix + "head.0.running_mean": rand(D), prefix + "head.0.running_var": rand(D).abs() + 0.5,
                      prefix + "head.0.num_batches_tracked": torch.tensor(12), prefix + "head.1.weight": rand(C, D),
                      prefix + "head.1.bias": rand(C)})
    return state


def _old_outputs(state: dict, spec: str, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pooled [B, D], scores [B, N'], logits [B, C]) by the previous version's definitions, in float64."""
    s = {k.split("@blr0p1.")[1]: v.double() for k, v in state.items() if k.startswith(f"heads.{spec}@")}
    x = tokens.double()
    patches = x[:, 1:]
    if spec == "abmilp-pos":
        content = patches
        logits = (content + _old_pos(P)) @ s["aggregation.scorer.0.weight"].T + s["aggregation.scorer.0.bias"]
    elif spec == "abmilp+cls-mlp2-pos":
        content = x
        pe = torch.cat([torch.zeros(1, D, dtype=torch.float64), _old_pos(P)])
        hidden = torch.relu((content + pe) @ s["aggregation.scorer.0.weight"].T + s["aggregation.scorer.0.bias"])
        logits = hidden @ s["aggregation.scorer.2.weight"].T + s["aggregation.scorer.2.bias"]
    else:  # SA-AbMILP "map": two-head self-attention with qkv bias scores, the raw patches are pooled
        content = patches
        b, n, _ = patches.shape
        qkv = (patches @ s["aggregation.attn.qkv.weight"].T + s["aggregation.attn.qkv.bias"])
        q, k, v = qkv.view(b, n, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
        mixed = ((q @ k.transpose(-1, -2)) * (D // 2) ** -0.5).softmax(-1) @ v
        mixed = mixed.transpose(1, 2).reshape(b, n, D) @ s["aggregation.attn.proj.weight"].T
        mixed = mixed + s["aggregation.attn.proj.bias"]
        logits = mixed @ s["aggregation.abmilp.scorer.0.weight"].T + s["aggregation.abmilp.scorer.0.bias"]
    scores = logits[..., 0].softmax(-1)
    pooled = torch.einsum("bn,bnd->bd", scores, content)
    normed = (pooled - s["head.0.running_mean"]) / torch.sqrt(s["head.0.running_var"] + 1e-6)
    return pooled, scores, normed @ s["head.1.weight"].T + s["head.1.bias"]


def test_old_bank_state_loads_and_reproduces_its_outputs():
    state, tokens = _old_state(), torch.randn(5, 1 + P, D)
    specs = OLD_HEADS.split(",")
    current = HeadBank(specs, [0.1], D, C, 1, True, grid=GRID)
    with pytest.raises(ValueError, match="beyond-cls 0.1.*legacy=True") as info:  # one line, not torch's list
        current.load_state_dict(state)
    assert "\n" not in str(info.value)
    assert legacy_bank_state(state, current.state_dict())
    assert not legacy_bank_state(current.state_dict(), current.state_dict())
    bank = HeadBank(specs, [0.1], D, C, 1, True, grid=GRID, legacy=True)
    bank.load_state_dict(state)
    logits = bank.eval()(tokens)
    for spec in specs[:3]:
        pooled, scores, want = _old_outputs(state, spec, tokens)
        torch.testing.assert_close(logits[f"{spec}@blr0p1"].double(), want, rtol=1e-4, atol=1e-5)
        got_pooled, got_scores = bank.heads[f"{spec}@blr0p1"].aggregation.forward_with_scores(tokens)
        torch.testing.assert_close(got_scores[:, 0].double(), scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_pooled[:, 0].double(), pooled, rtol=1e-4, atol=1e-5)


def test_old_run_heads_load_for_aggregations_and_localize(tmp_path):
    """``abmilp:RUN#KEY`` (aggregations, localize) on a run written by beyond-cls 0.1: rebuilt the old way."""
    state, tokens = _old_state(), torch.randn(3, 1 + P, D)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model": "vit_tiny_patch16_224", "data": "d", "out": str(tmp_path), "heads": OLD_HEADS, "seeds": "0",
    }))
    encoder = {"num_prefix_tokens": 1, "has_class_token": True, "embed_dim": D, "grid_size": list(GRID),
               "num_patches": P}
    (tmp_path / "results.json").write_text(json.dumps({"encoder": encoder, "token_source": {"block": None}}))
    (tmp_path / "seed0").mkdir()
    save_atomic({"format": "beyond_cls.probe", "version": 1, "bank": state}, tmp_path / "seed0" / "checkpoint.pt")
    for spec in ("abmilp-pos", "saabmilp-h2-map", "abmilp+cls-mlp2-pos"):
        head = load_probe_head(tmp_path, f"{spec}@blr0p1")
        assert head.with_cls == ("+cls" in spec)
        pooled, scores, _ = _old_outputs(state, spec, tokens)
        with torch.no_grad():
            got_pooled, got_scores = head.aggregation.forward_with_scores(tokens)
        torch.testing.assert_close(got_scores[:, 0].double(), scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_pooled[:, 0].double(), pooled, rtol=1e-4, atol=1e-5)
