"""Every kernel config timed at the static report's shapes, beside the baselines, in one GPU call (device.sh).

    python benchmarks/sweep.py --csv benchmarks/results/sweep_<gpu>.csv --seconds 120

Attention: every config of ``attention_stats.CONFIGS`` (with and without two kept rows) at ViT-B/16, ViT-L/16,
DINOv2-L/14+reg and ViT-H/14 shapes in bf16, beside SDPA (flash) and eager attention + statistics
(``beyond_cls.reference``). AbMILP: every config of every kernel the forward and the backward (frozen tokens)
launch, at D = 768 / 1024 / 1280, K = 1 and 8, bf16 tokens, then each pass at its fastest configs, beside eager
and ``torch.compile``'d eager pooling and a copy of the tokens (the bandwidth roof). Times are medians of
``triton.testing.do_bench_cudagraph`` (``do_bench`` where a graph cannot be captured), in ms.

Each row is written to the CSV as soon as it is measured (a crash keeps what was measured); measurements stop
cleanly before the deadline (``--seconds``), most important first; the end prints the fastest config per
(kernel, shape) and its ratio to the baselines, also written next to the CSV as ``.md``. First, the kernels are
compiled for this GPU in a process pool (Triton's cache, as the JIT would specialize them), so timing does not
wait for one compile at a time. Without CUDA (``device.sh --rehearse``) the same code runs tiny shapes in Triton's
interpreter, timed by the wall clock: those rows test the script, not the kernels.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_report import ABMILP_SHAPES, ATTENTION_SHAPES, BRANCHES  # noqa: E402

TINY_ATTENTION = {"tiny": (1, 2, 40, 16, 1)}
TINY_ABMILP = {"tiny": (2, 20, 32)}
COLUMNS = ["kernel", "shape", "config", "median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "timer", "device",
           "torch", "triton", "date"]
REP_MS = 20  # do_bench_cudagraph's timed span per replay
CLOCK = time.monotonic  # the deadline's clock (tests replace it)


@dataclass
class Task:
    """One measurement: ``fn`` timed as (kernel, shape, config); ``flops`` / ``bytes`` per call for the rates."""

    kernel: str
    shape: str
    config: str
    fn: Callable[[], object]
    flops: float = 0.0
    bytes: float = 0.0


class Rows:
    """The CSV, one row appended and flushed per measurement."""

    def __init__(self, path: Path, device: str):
        import triton

        self.path, self.rows = path, []
        self.common = dict(device=device, torch=torch.__version__, triton=triton.__version__,
                           date=datetime.date.today().isoformat())
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writeheader()

    def add(self, task: Task, times: tuple[float, float, float], timer: str) -> dict:
        median, p20, p80 = times
        row = dict(kernel=task.kernel, shape=task.shape, config=task.config, median_ms=round(median, 5),
                   p20_ms=round(p20, 5), p80_ms=round(p80, 5),
                   tflops=round(task.flops / median / 1e9, 2) if task.flops else "",
                   gbps=round(task.bytes / median / 1e6, 1) if task.bytes else "", timer=timer, **self.common)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerow(row)
        self.rows.append(row)
        return row


class Deadline:
    """Whether one more measurement fits before ``seconds`` from now (judged by the longest one so far)."""

    def __init__(self, seconds: float, clock: Callable[[], float] | None = None):
        clock = clock or CLOCK
        self.clock, self.end, self.longest = clock, clock() + seconds, 0.0

    def allows(self) -> bool:
        return self.clock() + 1.5 * self.longest < self.end

    def took(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


def gpu_timer(fn: Callable[[], object]) -> tuple[tuple[float, float, float], str]:
    import triton.testing

    quantiles = [0.5, 0.2, 0.8]
    try:
        return tuple(triton.testing.do_bench_cudagraph(fn, rep=REP_MS, quantiles=quantiles)), "cudagraph"
    except Exception:  # a graph cannot hold every function (e.g. a host sync): plain events
        torch.cuda.synchronize()
        return tuple(triton.testing.do_bench(fn, warmup=5, rep=REP_MS, quantiles=quantiles)), "do_bench"


def wall_timer(fn: Callable[[], object], repeats: int = 3) -> tuple[tuple[float, float, float], str]:
    """CPU stand-in (rehearsals): wall-clock ms of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return (statistics.median(times), min(times), max(times)), "wall (CPU interpreter, not GPU)"


# ------------------------------------------------------------------------------------------------ tasks


def _configs(launch) -> list[tuple[tuple | None, str]]:
    """(config, label) of every config the launch's autotuner keeps on this GPU; in the interpreter its one config
    (None: the module picks it)."""
    from beyond_cls.kernels import aot

    if os.environ.get("TRITON_INTERPRET") == "1":
        return [(None, "interpreter config")]
    return [(call.config or None, call.config_label()) for call in aot.jit_calls(launch)]


def attention_tasks(name: str, shape: tuple, device: str, keep: bool) -> Iterator[Task]:
    """SDPA (flash on CUDA) and eager attention + statistics, then every launch config of the fused kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from beyond_cls import reference
    from beyond_cls.kernels import aot, attention_stats

    b, h, n, d, prefix = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = torch.randn(b, n, 3, h, d, dtype=dtype, device=device).permute(2, 0, 3, 1, 4).unbind(0)
    label = f"{name} {b}x{h}x{n}x{d} P{prefix} {str(dtype).removeprefix('torch.')}"
    flops = attention_stats.flops(b, h, n, d)
    if not keep:
        def sdpa():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if device == "cuda" else [SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v)

        yield Task("sdpa", label, "", sdpa, flops)
        yield Task("eager+stats", label, "", lambda: reference.attention_with_stats(q, k, v, prefix), flops)
    rows = (0, n // 2) if keep else None
    launches = aot.capture_launches(attention_stats, lambda: attention_stats.attention_with_stats_forward(
        q, k, v, prefix, None, None, rows), gpu=device == "cuda")
    for launch in launches:
        for config, name in _configs(launch):
            yield Task("attention" + ("+keep2" if keep else ""), label, name,
                       lambda launch=launch, config=config: launch.module.launch(*launch.args, config=config,
                                                                                 **launch.meta), flops)


def _record_and_run(module, launches: list, best: dict | None = None):
    """A ``launch`` that runs each kernel at ``best[name]`` (default: as the module picks: autotuned on a GPU) and
    records the launch."""
    from beyond_cls.kernels import aot

    original = module.launch

    def launch(*args, config=None, **meta):
        record = aot.Launch(module, args, meta)
        launches.append(record)
        original(*args, config=(best or {}).get(record.name), **meta)

    return launch


def abmilp_tasks(name: str, shape: tuple, k: int, device: str, compiled: bool, rows: Rows) -> Iterator[Task]:
    """Copy and eager (and compiled) pooling, every launch config of every kernel of the forward and of the backward
    (frozen tokens), then each pass with every kernel at its fastest config measured so far."""
    from beyond_cls import reference
    from beyond_cls.kernels import abmilp

    b, n, d = shape
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens = torch.randn(b, n + 1, d, device=device).to(dtype)[:, 1:]  # the patch slice of an encoder output
    weight = (torch.randn(k, d, device=device) * d**-0.5).requires_grad_()
    bias = torch.zeros(k, device=device, requires_grad=True)
    token_bytes = tokens.numel() * tokens.element_size()
    label = f"{name} {b}x{n}x{d} K{k} {str(dtype).removeprefix('torch.')}"
    out = torch.empty_like(tokens)
    yield Task("copy", label, "", lambda: out.copy_(tokens), bytes=2 * token_bytes)

    def fwd_bwd(pool):
        def step():
            pooled, _ = pool(tokens, weight, bias)
            pooled.float().sum().backward()
        return step

    eager = reference.abmilp_pool
    yield Task("abmilp fwd", label, "eager", lambda: eager(tokens, weight, bias), bytes=token_bytes)
    yield Task("abmilp fwd+bwd", label, "eager", fwd_bwd(eager), bytes=2 * token_bytes)
    if compiled:
        fast = torch.compile(reference.abmilp_pool)
        yield Task("abmilp fwd", label, "compiled", lambda: fast(tokens, weight, bias), bytes=token_bytes)
        yield Task("abmilp fwd+bwd", label, "compiled", fwd_bwd(fast), bytes=2 * token_bytes)

    w, bb = weight.detach(), bias.detach()
    launches: list = []
    original = abmilp.launch
    abmilp.launch = _record_and_run(abmilp, launches)
    try:  # real intermediates (logits, scores) for the replays
        pooled, scores = abmilp.abmilp_forward(tokens, w, bb, None)
        forward = list(launches)
        grad = torch.randn_like(pooled)
        abmilp.abmilp_backward(grad, None, tokens, w, scores, pooled, False)
        backward = launches[len(forward):]
    finally:
        abmilp.launch = original

    def run_pass(pass_: str, best: dict):
        def step():
            abmilp.launch = _record_and_run(abmilp, [], best)
            try:
                p, s = abmilp.abmilp_forward(tokens, w, bb, None)
                if pass_ == "fwd+bwd":
                    abmilp.abmilp_backward(grad, None, tokens, w, s, p, False)
            finally:
                abmilp.launch = original
        return step

    tried = {}
    for pass_, records in (("fwd", forward), ("fwd+bwd", backward)):
        for launch in records:
            tried[launch.name] = _configs(launch)
            for config, name in tried[launch.name]:
                yield Task(f"abmilp.{launch.name}", label, name,
                           lambda launch=launch, config=config: launch.module.launch(*launch.args, config=config,
                                                                                     **launch.meta))
        best = {launch.name: _fastest(rows, f"abmilp.{launch.name}", label, tried[launch.name])
                for launch in forward + (backward if pass_ == "fwd+bwd" else [])}
        yield Task(f"abmilp {pass_}", label, "fused, fastest configs", run_pass(pass_, best),
                   bytes=token_bytes * (1 if pass_ == "fwd" else 2))


def _fastest(rows: Rows, kernel: str, shape: str, tried: list[tuple[tuple | None, str]]) -> tuple | None:
    """The config of ``tried`` measured fastest for (kernel, shape) so far (None: none measured, autotune)."""
    measured = {r["config"]: r["median_ms"] for r in rows.rows if r["kernel"] == kernel and r["shape"] == shape}
    timed = [(measured[name], i) for i, (_, name) in enumerate(tried) if name in measured]
    return tried[min(timed)[1]][0] if timed else None


def tasks(device: str, quick: bool, rows: Rows) -> Iterator[Task]:
    """Every measurement, most important first: ViT-B attention, the first AbMILP shape at K=1 (with the compiled
    baseline on CUDA), then the other shapes."""
    attention = TINY_ATTENTION if quick else ATTENTION_SHAPES
    pooling = TINY_ABMILP if quick else ABMILP_SHAPES
    first_att, first_pool = next(iter(attention)), next(iter(pooling))
    for keep in (False, True):
        yield from attention_tasks(first_att, attention[first_att], device, keep)
    yield from abmilp_tasks(first_pool, pooling[first_pool], BRANCHES[0], device, device == "cuda", rows)
    for name, shape in attention.items():
        if name != first_att:
            for keep in (False, True):
                yield from attention_tasks(name, shape, device, keep)
    for name, shape in pooling.items():
        for k in BRANCHES:
            if (name, k) != (first_pool, BRANCHES[0]):
                yield from abmilp_tasks(name, shape, k, device, False, rows)


# ------------------------------------------------------------------------------------------------ winners


def winners(rows: list[dict]) -> list[str]:
    """Markdown lines: the fastest config per (kernel, shape) and its ratio to the baselines of its shape."""
    def ms(kernel, shape, config=""):
        found = [r["median_ms"] for r in rows if (r["kernel"], r["shape"], r["config"]) == (kernel, shape, config)]
        return found[0] if found else None

    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["config"] and r["config"] not in ("eager", "compiled"):
            groups.setdefault((r["kernel"], r["shape"]), []).append(r)
    lines = ["| kernel | shape | fastest config | ms | runner-up | vs baselines |", "|---|---|---|---:|---|---|"]
    for (kernel, shape), group in groups.items():
        ranked = sorted(group, key=lambda r: r["median_ms"])
        best = ranked[0]
        versus = []
        if kernel.startswith("attention"):
            if (t := ms("sdpa", shape)) is not None:
                versus.append(f"time / SDPA's {best['median_ms'] / t:.2f}")
            if (t := ms("eager+stats", shape)) is not None:
                versus.append(f"eager+stats' time / this {t / best['median_ms']:.1f}")
        elif kernel in ("abmilp fwd", "abmilp fwd+bwd"):
            for other in ("eager", "compiled"):
                if (t := ms(kernel, shape, other)) is not None:
                    versus.append(f"{other}'s time / this {t / best['median_ms']:.2f}")
            copy = [r for r in rows if r["kernel"] == "copy" and r["shape"] == shape]
            if copy and best["gbps"] and copy[0]["gbps"]:
                versus.append(f"bandwidth {100 * best['gbps'] / copy[0]['gbps']:.0f}% of the copy's")
        runner = f"{ranked[1]['config']} ({ranked[1]['median_ms']:.4g})" if len(ranked) > 1 else ""
        lines.append(f"| {kernel} | {shape} | {best['config']} | {best['median_ms']:.4g} | {runner} "
                     f"| {'; '.join(versus)} |")
    return lines


# ------------------------------------------------------------------------------------------------ main


def warm_cache(arch: int, quick: bool, seconds: float) -> str:
    """Compile every bf16 kernel config for ``sm_<arch>`` in a process pool (a fresh process, which forks its
    workers before any CUDA use), filling Triton's cache for the timing; bounded by ``seconds``."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import sweep; "
            "sweep._warm(int(sys.argv[2]), sys.argv[3] == '1')")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    start = time.monotonic()
    try:
        done = subprocess.run([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(arch),
                               "1" if quick else "0"], env=env, timeout=seconds, capture_output=True, text=True)
    except subprocess.TimeoutExpired:
        return f"warm-up: stopped after {seconds:.0f} s (the rest compiles on first use)"
    tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or [""]
    return f"warm-up: exit {done.returncode} in {time.monotonic() - start:.0f} s: {tail[0]}"


def _warm(arch: int, quick: bool) -> None:
    from kernel_report import cases, jit_calls

    from beyond_cls.kernels import aot

    calls = [call for case, call in jit_calls(cases(quick)) if case.dtype == "bf16"]
    jobs, _ = aot.unique_jobs(calls, (arch,))
    aot.map_compiles(_compile_only, jobs)
    print(f"{len(jobs)} kernels compiled for sm_{arch}")


def _compile_only(call, arch: int) -> None:
    from beyond_cls.kernels import aot

    aot.compile_call(call, arch)


def main(argv: list[str] | None = None, timer: Callable | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", type=Path, required=True, help="rows, written as measured")
    parser.add_argument("--seconds", type=float, default=120.0, help="stop measuring before this many seconds")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the default without CUDA)")
    args = parser.parse_args(argv)
    start = CLOCK()
    cuda = torch.cuda.is_available()
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported: they run in the interpreter
        print("sweep: no CUDA: tiny shapes in Triton's interpreter, wall-clock times (not GPU timings)")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    if cuda:
        major, minor = torch.cuda.get_device_capability()
        print(warm_cache(10 * major + minor, args.quick, 0.3 * args.seconds), flush=True)
    rows = Rows(args.csv, device)
    deadline = Deadline(args.seconds - (CLOCK() - start))
    timer = timer or (gpu_timer if cuda else wall_timer)
    measured, stopped = 0, False
    for task in tasks("cuda" if cuda else "cpu", args.quick or not cuda, rows):
        if not deadline.allows():
            stopped = True
            break
        began = CLOCK()
        try:
            times, how = timer(task.fn)
        except Exception as error:  # one failing case must not lose the others
            print(f"sweep: {task.kernel} {task.shape} {task.config}: failed: {type(error).__name__}: {error}")
            continue
        finally:
            deadline.took(CLOCK() - began)
        row = rows.add(task, times, how)
        measured += 1
        print(f"  {row['kernel']:<16} {row['shape']:<36} {row['config']:<24} {row['median_ms']:>10.4f} ms", flush=True)
    if stopped:
        print(f"sweep: stopped cleanly before the deadline after {measured} measurements; the rest were not made")
    table = winners(rows.rows)
    md = [f"# Kernel sweep on {device}", "", f"{rows.common['date']} · torch {rows.common['torch']} · triton "
          f"{rows.common['triton']} · {measured} measurements{' (stopped at the deadline)' if stopped else ''} · "
          f"median ms, timer: {rows.rows[0]['timer'] if rows.rows else '-'}", "", *table]
    args.csv.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
