"""Every launch config of every Triton kernel compiles for sm_80 and sm_90, without a GPU, at the specializations a
GPU run launches: the host functions' launches are captured on CPU tensors in the layouts the package passes and
specialized by Triton's own binder (``beyond_cls.kernels.aot``). The bf16 configs the autotuner may pick neither
spill registers nor exceed shared memory.

The compiles run in a fresh interpreter (this file as a script: kernels must be decorated without
TRITON_INTERPRET to compile), started in the background after collection (see tests/conftest.py); under
pytest-xdist by the fixture of the worker that runs this file, first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

# (label, tokens dtype, launches builder of aot, shape, options): bf16 / fp32 attention with and without bias and
# kept rows; AbMILP with bf16, fp32 and fp64 (exact tests) tokens, K = 1 to 16, mask, grad_scores, the tokens'
# gradient, softmax pooling, and a small batch whose rows are split (every launch config is kept by some case). The
# batch is part of the specialization (host decisions such as split counts follow it): the probe's 1024 where it
# matters. Tensors are allocated, never touched, and released after the capture.
CASES = {
    "attention bf16 d64 (ViT-B)": ("bfloat16", "attention_launches", (2, 12, 197, 64, 1), {}),
    "attention bf16 d80 bias keep2 (ViT-H)": ("bfloat16", "attention_launches", (2, 16, 257, 80, 1),
                                              {"bias": True, "keep_rows": (0, 128)}),
    "attention fp32 d64 prefix5": ("float32", "attention_launches", (2, 12, 261, 64, 5), {}),
    "abmilp bf16 K1 frozen": ("bfloat16", "abmilp_launches", (1024, 196, 768, 1), {}),
    "abmilp bf16 K1 D1024 N256 frozen (ViT-L/14)": ("bfloat16", "abmilp_launches", (1024, 256, 1024, 1), {}),
    "abmilp bf16 K8 mask grads": ("bfloat16", "abmilp_launches", (1024, 196, 768, 8),
                                  {"mask": True, "grad_scores": True, "tokens_grad": True}),
    "abmilp bf16 K16 D64 split rows": ("bfloat16", "abmilp_launches", (2, 196, 64, 16), {}),
    "abmilp bf16 K1 D384 (ViT-S)": ("bfloat16", "abmilp_launches", (1024, 196, 384, 1), {}),
    "abmilp bf16 K1 D64": ("bfloat16", "abmilp_launches", (1024, 196, 64, 1), {}),
    "abmilp bf16 K3 D64": ("bfloat16", "abmilp_launches", (1024, 196, 64, 3), {}),
    "softmax_pool bf16 K1": ("bfloat16", "abmilp_launches", (1024, 196, 768, 1),
                             {"scorer": False, "tokens_grad": True}),
    "abmilp fp32 K8 mask grads": ("float32", "abmilp_launches", (1024, 256, 1024, 8),
                                  {"mask": True, "grad_scores": True, "tokens_grad": True}),
    "abmilp fp64 K3 mask": ("float64", "abmilp_launches", (4, 196, 80, 3), {"mask": True, "tokens_grad": True}),
}


def _calls():
    """[(case label, JitCall)] of every case's launches at every config of their kernels."""
    from beyond_cls.kernels import aot

    calls = []
    for label, (dtype, builder, shape, options) in CASES.items():
        for launch in getattr(aot, builder)(*shape, getattr(torch, dtype), **options):
            calls += [(label, call) for call in aot.jit_calls(launch)]
    return calls


def _inspect(call, arch: int) -> dict:
    from beyond_cls.kernels import aot

    compiled = aot.compile_call(call, arch)
    assert compiled.asm["cubin"] and f"sm_{arch}" in compiled.asm["ptx"], (call.name, arch)
    return dict(aot.cubin_usage(compiled), shared=compiled.metadata.shared)


def main() -> None:
    """Compile every case (one process per core) and print one JSON row per (case, launch config, arch)."""
    from beyond_cls.kernels import aot

    calls = _calls()
    jobs, index = aot.unique_jobs([call for _, call in calls])
    results = aot.map_compiles(_inspect, jobs, workers=min(os.cpu_count() or 1, 8))
    rows, i = [], 0
    for label, call in calls:
        spec, _ = aot.specialization(call, aot.ARCHS[0])
        unaligned = [name for name, (ty, value) in zip(call.kernel.arg_names, spec)
                     if ty.startswith("*") and value != "D"]
        for arch in aot.ARCHS:
            rows.append(dict(results[index[i]], case=label, dtype=CASES[label][0], kernel=call.launch_name,
                             config=list(call.config), arch=arch, limit=aot.SHARED_MEMORY_BYTES[arch],
                             unaligned=unaligned, specialization=aot.describe(call, arch)))
            i += 1
    print(json.dumps(rows))


_background: dict[str, object] = {}


def _lower_priority() -> None:
    os.nice(10)  # the compiles fill idle cores; the other tests keep theirs


def start_background_compile(directory: str) -> None:
    """Start the compiles now, at low priority, so they overlap the rest of the session (called by conftest after
    collection when this test is selected; it runs last and collects the result)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out, err = os.path.join(directory, "aot.out"), os.path.join(directory, "aot.err")
    with open(out, "w") as stdout, open(err, "w") as stderr:  # the child keeps its own handles
        proc = subprocess.Popen([sys.executable, __file__], stdout=stdout, stderr=stderr, env=env,
                                preexec_fn=_lower_priority)
    _background.update(proc=proc, out=out, err=err)


def stop_background_compile() -> None:
    proc = _background.get("proc")
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    if "proc" not in _background:
        start_background_compile(str(tmp_path_factory.mktemp("aot")))
    proc, out, err = _background["proc"], _background["out"], _background["err"]
    returncode = proc.wait(timeout=1200)
    with open(err) as f:
        assert returncode == 0, f.read()[-4000:]
    with open(out) as f:
        return json.loads(f.read().splitlines()[-1])


def _fits(row: dict) -> bool:
    return row["shared"] <= row["limit"]


def _spills(row: dict) -> bool:
    return row["stack"] > 0 or row["local"] > 0


@pytest.mark.slow
def test_every_config_of_every_kernel_compiles_for_sm80_and_sm90(rows):
    """Each case's launches compile at every config their autotuner keeps, and every config of every kernel is kept
    by some case (a config no call can use would be dead weight in the autotuner's list)."""
    from beyond_cls.kernels import abmilp, attention_stats

    wanted = {("attention_stats", tuple(c)) for c in attention_stats.CONFIGS}
    wanted |= {(name, tuple(c)) for name, configs in abmilp.CONFIGS.items() for c in configs}
    for arch in (80, 90):
        compiled = {(r["kernel"], tuple(r["config"])) for r in rows if r["arch"] == arch}
        assert wanted <= compiled, sorted(wanted - compiled)
    assert {r["case"] for r in rows} == set(CASES)
    assert all(r["config"] for r in rows), [r for r in rows if not r["config"]]  # each maps to a CONFIGS entry
    # the capture keeps the layouts' alignment: every pointer is specialized as 16-byte aligned, as on a GPU
    assert not [r for r in rows if r["unaligned"]], [(r["case"], r["unaligned"]) for r in rows if r["unaligned"]]


@pytest.mark.slow
def test_default_bf16_configs_neither_spill_nor_exceed_shared_memory(rows):
    """CI's static performance guard: a bf16 config the autotuner may pick must not spill (no stack frame or local
    memory in the cubin) or need more shared memory than an A100 / H100 block has."""
    bad = [f"{r['case']} {r['kernel']} {tuple(r['config'])} sm_{r['arch']}: regs {r['regs']}, stack {r['stack']}, "
           f"local {r['local']}, shared {r['shared']}/{r['limit']}"
           for r in rows if r["dtype"] == "bfloat16" and (_spills(r) or not _fits(r))]
    assert not bad, "\n".join(bad)


@pytest.mark.slow
def test_wide_tokens_keep_a_config_per_kernel(rows):
    """fp32 tokens fit shared memory at one config at least per kernel and arch (the autotuner prunes configs that
    do not fit), and so do fp64 ones (exact tests only)."""
    for dtype in ("float32", "float64"):
        for arch in (80, 90):
            by_kernel: dict[str, list[bool]] = {}
            for r in rows:
                if r["dtype"] == dtype and r["arch"] == arch:
                    by_kernel.setdefault(r["kernel"], []).append(_fits(r))
            assert by_kernel and all(any(fits) for fits in by_kernel.values()), (dtype, arch, by_kernel)


def test_fp32_launches_use_gpu_dot_precision(monkeypatch):
    """Captured as on a GPU (TRITON_INTERPRET hidden meanwhile): float32 attention asks for 3xTF32 dots
    (float32-accurate, not TF32), no float32 launch for the interpreter's IEEE dots, no float64 one for TF32, and
    none for the interpreter's exact upcast."""
    from beyond_cls.kernels import GPU_FP32_DOT, aot

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for label, (dtype, builder, shape, options) in CASES.items():
        metas = [launch.meta for launch in getattr(aot, builder)(*shape, getattr(torch, dtype), **options)]
        values = {v for meta in metas for v in meta.values() if isinstance(v, str) and v}
        if dtype == "float32":
            assert "ieee" not in values, (label, metas)
            assert GPU_FP32_DOT in values or not label.startswith("attention"), (label, metas)
        elif dtype == "float64":
            assert not any("tf32" in v for v in values), (label, metas)
        upcasts = {k: v for meta in metas for k, v in meta.items() if ("UPCAST" in k or "INTERPRET" in k) and v}
        assert not upcasts, (label, upcasts)
    assert os.environ["TRITON_INTERPRET"] == "1"  # restored after each capture


if __name__ == "__main__":
    main()
