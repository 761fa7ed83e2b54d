"""The one launch path of the Triton kernels (beyond_cls.kernels.launch): an explicit config, the interpreter's
config (capped at a warp limit), refusal of too many warps, register caps only when compiled, and one cached
autotuner per set of configs, with each kernel module's own rules (block names, config filters, register caps)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from beyond_cls.kernels import abmilp, attention_stats
from beyond_cls.kernels import launch as launching
from beyond_cls.kernels.launch import KernelLaunch, autotuner, run
from beyond_cls.triton_mode import interpreting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _shifted_copy(X, Y, N, SHIFT, LIMIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y = x + BLOCK_N + SHIFT, BLOCK_M elements per program: the output shows which blocks ran."""
    offs = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = offs < N
    tl.store(Y + offs, tl.load(X + offs, mask=ok) + BLOCK_N + SHIFT, mask=ok)


CONFIGS = [(16, 3, 1, 1), (32, 5, 2, 1), (64, 7, 4, 2)]


def _kernel(**rules) -> KernelLaunch:
    return KernelLaunch("shifted_copy", _shifted_copy, CONFIGS, (8, 2, 4, 1), ["N"], **rules)


def _launch(kernel: KernelLaunch, n: int = 37, limit: int = 4, config=None) -> tuple[torch.Tensor, list]:
    """Run ``kernel`` on a NaN-prefilled output; (output − input − 0.5, the blocks each grid call saw)."""
    x = torch.randn(n, device=DEVICE)
    y = torch.full_like(x, float("nan"))
    grids = []

    def grid(blocks):
        grids.append(dict(blocks))
        return (triton.cdiv(n, blocks["BLOCK_M"]),)

    run(kernel, grid, (x, y, n, 0.5), dict(LIMIT=limit), config)
    return (y - x - 0.5).cpu(), grids


def test_explicit_config_sets_blocks_warps_and_stages():
    out, grids = _launch(_kernel(), config=(32, 5, 2, 1))
    assert grids == [{"BLOCK_M": 32, "BLOCK_N": 5}]
    assert torch.allclose(out, torch.full_like(out, 5.0), atol=1e-5)  # every element written, BLOCK_N = 5


@pytest.mark.skipif(not interpreting(), reason="the interpreter config runs only under TRITON_INTERPRET=1")
def test_interpreter_runs_its_config_capped_at_the_warp_limit(monkeypatch):
    calls = []
    real = launching.KernelLaunch.options
    monkeypatch.setattr(launching.KernelLaunch, "options",
                        lambda self, config, compiled=True: calls.append(config) or real(self, config, compiled))
    out, grids = _launch(_kernel(), n=41)
    assert grids == [{"BLOCK_M": 8, "BLOCK_N": 2}] and calls[-1] == (8, 2, 4, 1)
    assert torch.allclose(out, torch.full_like(out, 2.0), atol=1e-5)
    _launch(_kernel(warps_limit="LIMIT"), limit=2)
    assert calls[-1] == (8, 2, 2, 1)  # 4 warps capped at LIMIT = 2


def test_row_kernel_refuses_more_warps_than_its_limit():
    with pytest.raises(ValueError, match="4 warps, more than LIMIT = 2"):
        _launch(_kernel(warps_limit="LIMIT"), limit=2, config=(16, 3, 4, 1))
    out, _ = _launch(_kernel(warps_limit="LIMIT"), limit=2, config=(16, 3, 2, 1))
    assert torch.allclose(out, torch.full_like(out, 3.0), atol=1e-5)


def test_register_cap_only_when_compiled_and_custom_blocks():
    kernel = _kernel(max_registers=lambda warps: 65536 // (32 * warps) if warps > 1 else None,
                     blocks=lambda config, call: dict(BLOCK_M=config[0], BLOCK_N=config[1] + call["LIMIT"]))
    assert kernel.options((16, 3, 8, 2)) == dict(num_warps=8, num_stages=2, maxnreg=256)
    assert kernel.options((16, 3, 8, 2), compiled=False) == dict(num_warps=8, num_stages=2)
    assert kernel.options((16, 3, 1, 1)) == dict(num_warps=1, num_stages=1)  # no cap at one warp
    out, grids = _launch(kernel, limit=4, config=(16, 3, 1, 1))
    assert grids == [{"BLOCK_M": 16, "BLOCK_N": 7}]
    assert torch.allclose(out, torch.full_like(out, 7.0), atol=1e-5)


def test_autotuner_over_the_candidates_cached_per_set_of_configs():
    call = dict(N=37, LIMIT=2)
    kernel = _kernel(candidates=lambda call: [c for c in CONFIGS if c[2] <= call["LIMIT"]],
                     max_registers=lambda warps: 128 if warps == 2 else None)
    tuner = autotuner(kernel, call)
    assert isinstance(tuner, Autotuner) and tuner.keys == ["N"]
    assert [(c.kwargs, c.num_warps, c.num_stages, c.maxnreg) for c in tuner.configs] == [
        ({"BLOCK_M": 16, "BLOCK_N": 3}, 1, 1, None), ({"BLOCK_M": 32, "BLOCK_N": 5}, 2, 1, 128)]
    assert autotuner(kernel, dict(N=99, LIMIT=3)) is tuner  # same configs: the same autotuner (it keys by N)
    assert autotuner(kernel, dict(N=37, LIMIT=4)) is not tuner and len(kernel.tuners) == 2
    assert autotuner(_kernel(), call) is not autotuner(_kernel(), call)  # each KernelLaunch keeps its own
    asked = []
    keyed = _kernel(candidates=lambda call: asked.append(call["LIMIT"]) or CONFIGS[: call["LIMIT"]],
                    tuned_by=lambda call: call["LIMIT"])
    assert autotuner(keyed, dict(N=5, LIMIT=1)) is autotuner(keyed, dict(N=6, LIMIT=1))
    assert len(autotuner(keyed, dict(N=5, LIMIT=2)).configs) == 2
    assert asked == [1, 2]  # candidates computed once per tuned_by value, not per call


def test_compiled_launch_without_config_goes_to_the_autotuner(monkeypatch):
    tuned = []
    monkeypatch.setattr(launching, "interpreting", lambda: False)
    monkeypatch.setattr(Autotuner, "run",
                        lambda self, *args, grid=None, warmup=False, **meta: tuned.append((self, meta)))
    x = torch.zeros(5)
    run(_kernel(), lambda blocks: (1,), (x, x, 5, 0.0), dict(LIMIT=1))
    (tuner, meta), = tuned
    assert meta == dict(LIMIT=1) and len(tuner.configs) == 3


def test_abmilp_rules_reach_the_autotuner():
    """AbMILP's row kernels: configs with at most K_PAD warps that fit the register budget, the row as column groups
    of CHUNK_D-wide chunks, maxnreg by warps; the combine kernel: BLOCK_N/BLOCK_D, no register cap."""
    tokens = torch.empty(2, 196, 768, dtype=torch.bfloat16)
    fwd = abmilp._kernel("fwd", abmilp.INTERPRET_CONFIG)
    call = dict(Z=tokens, D=768, K_PAD=2, GIVEN=False, HAS_MASK=False, SPLIT=False)
    configs = autotuner(fwd, call).configs
    assert configs and all(c.num_warps <= 2 for c in configs)
    assert {(c.num_warps, c.maxnreg) for c in configs} <= {(1, 255), (2, 255)}
    assert all(c.kwargs["CHUNK_D"] == 256 and c.kwargs["GA"] == 2 and c.kwargs["BLOCK_D"] == 768 for c in configs)
    with pytest.raises(ValueError, match="warps"):
        fwd.check((4, 256, 4, 1), call)
    combine = abmilp._kernel("combine", abmilp.INTERPRET_CONFIG)
    assert combine.constexprs((64, 256, 4, 1), {}) == dict(BLOCK_N=64, BLOCK_D=256)
    assert "maxnreg" not in combine.options((64, 256, 4, 1))


def test_module_launches_keep_their_signatures(monkeypatch):
    """``abmilp.launch(name, grid, *args, ...)`` and ``attention_stats.launch(grid, *args, ...)`` hand their kernel
    and the call to the one launch path."""
    seen = []
    for module in (abmilp, attention_stats):
        monkeypatch.setattr(module, "run", lambda kernel, grid, args, meta, config: seen.append(
            (kernel.name, kernel.fn, args, meta, config)))
    abmilp.launch("bwd", None, 1, 2, config=(1, 256, 1, 1), K_PAD=1)
    attention_stats.launch(None, 3, config=None, HAS_BIAS=True)
    assert seen == [("bwd", abmilp.KERNELS["bwd"], (1, 2), dict(K_PAD=1), (1, 256, 1, 1)),
                    ("attention_stats", attention_stats.attention_stats_fwd_kernel, (3,), dict(HAS_BIAS=True), None)]
