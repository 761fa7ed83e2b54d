"""Every autotune config of every Triton kernel compiles to a cubin for sm_80 and sm_90, without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SCRIPT = """
import json
import multiprocessing
import os

from beyond_cls.kernels import abmilp, attention_stats
from beyond_cls.kernels.aot import ARCHS, SHARED_MEMORY_BYTES, compile_for

specs = [(attention_stats._attention_stats_fwd_kernel, s) for s in attention_stats.aot_specializations()]
specs += [(kernel, s) for kernel, s in abmilp.aot_specializations()]
jobs = [(i, arch) for i in range(len(specs)) for arch in ARCHS]


def compile_one(job):
    i, arch = job
    kernel, spec = specs[i]
    compiled = compile_for(kernel, spec, arch)
    assert compiled.asm["cubin"] and f"sm_{arch}" in compiled.asm["ptx"], (spec.label, arch)
    return [spec.label, arch, compiled.metadata.shared, SHARED_MEMORY_BYTES[arch]]


# compiles are independent and single-threaded: one process per core (forked: the workers share specs)
workers = min(len(jobs), os.cpu_count() or 1, 8)
if workers > 1:
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        rows = pool.map(compile_one, jobs, chunksize=1)
else:
    rows = [compile_one(job) for job in jobs]
print(json.dumps(rows))
"""


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90():
    # a fresh interpreter: the kernels must be decorated without TRITON_INTERPRET to compile
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads(proc.stdout.splitlines()[-1])
    from beyond_cls.kernels import abmilp
    from beyond_cls.kernels.attention_stats import CONFIGS

    pooling_configs = sum(len(configs) for configs in abmilp.CONFIGS.values())
    # attention: bf16, fp32 and bf16 with kept rows per config; pooling: bf16 and fp32 tokens per config
    assert len(rows) == (len(CONFIGS) * 3 + pooling_configs * 2) * 2
    # bf16 (the production path) fits shared memory in every config; fp32 in at least one per arch,
    # which the autotuner keeps (configs that do not fit are pruned at launch)
    assert all(shared <= limit for label, _, shared, limit in rows if label.startswith("bfloat16")), rows
    # every pooling config fits everywhere, for bf16 and fp32 tokens
    pooling = [row for row in rows if row[0].split("-")[0] in abmilp.CONFIGS]
    assert len(pooling) == pooling_configs * 2 * 2
    assert all(shared <= limit for label, _, shared, limit in pooling), pooling
    for arch in (80, 90):
        assert any(shared <= limit for label, a, shared, limit in rows if label.startswith("float32") and a == arch)
