"""Static report of the Triton kernels, without a GPU: what an sm_90 (or sm_80) GPU would run.

    make kernel-report                                        # -> benchmarks/results/static_sm90.{csv,md}
    python benchmarks/kernel_report.py --arch 80 --out build  # sm_80 -> build/static_sm80.{csv,md}

Every kernel is compiled at the launches a GPU run makes: the host functions run on CPU tensors in the layouts the
package passes (timm's strided q/k/v, patch slices of the encoder output) with the kernel modules' ``launch``
captured, and each launch at each config its autotuner keeps is compiled as Triton's JIT specializes it
(``beyond_cls.kernels.aot``). Per compile: registers and spill bytes from the bundled ``ptxas -v``, the
dynamic shared memory Triton launches with, and the SASS instructions of the main loop from ``cuobjdump -sass``
(the instructions between a backward branch and its target; of the innermost loops holding tensor-core
instructions, else of all innermost loops, the one that loads the most: the loop over key blocks or token tiles).
``loop_sass_per_element`` = loop SASS per thread x threads / elements per iteration (attention: the
BLOCK_M x BLOCK_N score elements of one key block; pooling: the token elements of one token tile, counted in
Triton's interpreter by ``kernel_traffic.py``, which also counts AbMILP's bytes per call against the minimum:
the tokens read once per pass plus the pass's outputs).

Compiles run in a process pool beside the interpreter; nothing is cached in the repository (Triton's own cache is
outside it).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# name: (B, H, N, d, prefix tokens)
ATTENTION_SHAPES = {
    "vit_b16": (256, 12, 197, 64, 1),
    "vit_l16": (256, 16, 197, 64, 1),
    "dinov2_l14_reg4": (256, 16, 261, 64, 5),
    "vit_h14": (256, 16, 257, 80, 1),
}
# name: (B, N, D): patch tokens of ViT-B/16, ViT-L/16, ViT-L/14 and ViT-H/14
ABMILP_SHAPES = {
    "d768_n196": (1024, 196, 768),
    "d1024_n196": (1024, 196, 1024),
    "d1024_n256": (1024, 256, 1024),
    "d1280_n256": (1024, 256, 1280),
}
BRANCHES = (1, 8)
TARGETS = {"attention_loop_per_element": 11.0, "attention_regs": 168}
COLUMNS = ["kernel", "shape", "config", "regs", "spill_bytes", "smem_bytes", "loop_sass", "loop_sass_per_element",
           "threads", "elements_per_iteration", "loops"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    """One host call at one shape: which launches builder of ``aot``, its arguments and its label."""

    op: str  # "attention" or "abmilp"
    shape: str
    dtype: str
    builder: str
    args: tuple
    options: dict = field(default_factory=dict, hash=False)
    keep: bool = False


def cases(quick: bool = False) -> list[Case]:
    """Every host call of the report (``quick``: one shape per op, for tests and rehearsals)."""
    out = []
    for name, (b, h, n, d, prefix) in list(ATTENTION_SHAPES.items())[: 1 if quick else None]:
        for dtype in ("bf16", "fp32"):
            for keep in (False, True):
                label = f"{name} {b}x{h}x{n}x{d} P{prefix} {dtype}{' keep2' if keep else ''}"
                options = {"keep_rows": (0, n // 2)} if keep else {}
                out.append(Case("attention", label, dtype, "attention_launches", (b, h, n, d, prefix, _DTYPES[dtype]),
                                options, keep=keep))
    for name, (b, n, d) in list(ABMILP_SHAPES.items())[: 1 if quick else None]:
        for k in BRANCHES:
            for dtype in ("bf16", "fp16", "fp32"):
                for pass_ in ("fwd", "bwd"):  # the probe's case: frozen tokens, no token gradient
                    out.append(Case("abmilp", f"{name} {b}x{n}x{d} K{k} {dtype} {pass_}", dtype, "abmilp_launches",
                                    (b, n, d, k, _DTYPES[dtype]), {"passes": (pass_,)}))
    return out


def jit_calls(selected: list[Case]) -> list[tuple[Case, object]]:
    """(case, JitCall) of every launch of every case at every config its autotuner keeps."""
    from beyond_cls.kernels import aot

    calls = []
    for case in selected:
        for launch in getattr(aot, case.builder)(*case.args, **case.options):
            calls += [(case, call) for call in aot.jit_calls(launch)]
    return calls


def inspect_call(call, arch: int) -> dict:
    """Compile ``call`` for ``sm_<arch>`` and read its resources and main loop (runs in a worker process)."""
    from beyond_cls.kernels import aot

    compiled = aot.compile_call(call, arch)
    usage = aot.resource_usage(compiled, arch)
    loops = aot.sass_loops(aot.sass(compiled))
    main = aot.main_loop(loops)
    return dict(regs=usage.regs, spill_bytes=usage.spill_bytes, smem_bytes=usage.shared, threads=usage.threads,
                cubin_regs=aot.cubin_usage(compiled)["regs"], loop_sass=main.instructions if main else None,
                loops=" ".join(f"{loop.instructions}{'*' if loop == main else ''}" for loop in loops))


def _kernel_name(case: Case, call) -> str:
    return "attention" if case.op == "attention" else f"abmilp.{call.launch_name}"


def elements_per_iteration(case: Case, call, token_elements: dict) -> float | None:
    """Score elements of one key block (attention: BLOCK_M x BLOCK_N, the first two entries of its configs) or
    token elements of one token tile (pooling: measured in the interpreter, ``kernel_traffic.py``)."""
    if case.op == "attention":
        return call.config[0] * call.config[1] if len(call.config) >= 2 else None
    b, n, d, k, _ = case.args
    return token_elements.get((d, call.launch_name, tuple(call.config)))


def report_rows(calls: list[tuple[Case, object]], results: list[dict], token_elements: dict) -> list[dict]:
    """One CSV row per (case, launch config): the columns of :data:`COLUMNS` plus the case's fields."""
    rows = []
    for (case, call), result in zip(calls, results):
        elements = elements_per_iteration(case, call, token_elements)
        loop = result["loop_sass"]
        per_element = round(loop * result["threads"] / elements, 2) if loop and elements else None
        rows.append(dict(kernel=_kernel_name(case, call), shape=case.shape, config=call.config_label(),
                         regs=result["regs"], spill_bytes=result["spill_bytes"], smem_bytes=result["smem_bytes"],
                         loop_sass=loop, loop_sass_per_element=per_element, threads=result["threads"],
                         elements_per_iteration=round(elements, 1) if elements else None, loops=result["loops"],
                         case=case, cubin_regs=result["cubin_regs"]))
    return rows


# ------------------------------------------------------------------------------------------------ targets


def _mark(ok: bool) -> str:
    return "pass" if ok else "**FAIL**"


def targets(rows: list[dict], traffic: list[dict], arch: int, limit: int) -> list[tuple[str, str, str]]:
    """(target, measured, pass/fail) lines of the static targets (docs/performance.md)."""
    out = []
    vit_b = [r for r in rows if r["case"].op == "attention" and r["shape"].startswith("vit_b16")
             and r["case"].dtype == "bf16" and not r["case"].keep]
    for r in vit_b:
        per, regs = r["loop_sass_per_element"], r["regs"]
        ok = per is not None and per <= TARGETS["attention_loop_per_element"] and regs <= TARGETS["attention_regs"]
        out.append((f"attention ViT-B/16 bf16 {r['config']}: loop ≤ {TARGETS['attention_loop_per_element']:g} "
                    f"SASS per score element, ≤ {TARGETS['attention_regs']} registers",
                    f"{per} per element, {regs} registers", _mark(ok)))
    # kept rows are recomputed after the loop: with them the bf16 loop may differ by register allocation, not grow
    plain = {(r["shape"], r["config"]): r["loop_sass"] for r in rows if r["case"].op == "attention"
             and r["case"].dtype == "bf16" and not r["case"].keep}
    deltas = [(r, plain.get((r["shape"].replace(" keep2", ""), r["config"]))) for r in rows
              if r["case"].op == "attention" and r["case"].dtype == "bf16" and r["case"].keep]
    grown = [f"{r['shape']} {r['config']}: {before} → {r['loop_sass']}" for r, before in deltas
             if before is None or r["loop_sass"] is None or r["loop_sass"] > before * 1.01]
    spread = [r["loop_sass"] - before for r, before in deltas if before is not None and r["loop_sass"] is not None]
    out.append(("attention bf16: kept rows add nothing to the loop (loop SASS with keep2 ≤ without + 1 %)",
                "; ".join(grown[:3]) + (f" (+{len(grown) - 3})" if len(grown) > 3 else "") if grown else
                f"keep2 − without: {min(spread, default=0):+d} to {max(spread, default=0):+d} instructions",
                _mark(not grown)))
    for what, picked in (("bf16, every kernel, shape and config", lambda r: r["case"].dtype == "bf16"),
                         ("AbMILP, every dtype (fp32 tokens included)", lambda r: r["case"].op == "abmilp")):
        spills = [r for r in rows if picked(r) and r["spill_bytes"]]
        out.append((f"no spills: {what}", f"{len(spills)} of {sum(map(picked, rows))} spill"
                    + (": " + "; ".join(f"{r['kernel']} {r['shape']} {r['config']} ({r['spill_bytes']} B)"
                                        for r in spills[:3]) if spills else ""), _mark(not spills)))
    over = [r for r in rows if r["case"].dtype == "bf16" and r["smem_bytes"] > limit]
    out.append((f"shared memory ≤ {limit} bytes (sm_{arch} block limit), bf16",
                f"{len(over)} over" + (": " + "; ".join(f"{r['kernel']} {r['config']}" for r in over[:3]) if over
                                       else f"; max {max((r['smem_bytes'] for r in rows), default=0)}"),
                _mark(not over)))
    for pass_, word in (("fwd", "forward"), ("bwd", "backward")):
        reads = [t["token_reads"] for t in traffic if t["pass"] == pass_]
        if reads:
            out.append((f"AbMILP {word} reads the tokens once", f"{min(reads):.2f}–{max(reads):.2f} × the tokens",
                        _mark(max(reads) <= 1.01)))
    return out


# ------------------------------------------------------------------------------------------------ AbMILP bytes


def traffic_plan(calls: list[tuple[Case, object]]) -> list[dict]:
    """The AbMILP calls ``kernel_traffic.py`` runs: every shape in bf16 (token elements per iteration of every kept
    config), bytes of bf16 at the first and last shape and of fp32 at the first, K = 1 and 8."""
    plan: dict[tuple, dict] = {}
    names = list(ABMILP_SHAPES)
    for case, call in calls:
        name = case.shape.split()[0]
        if case.op != "abmilp" or not (case.dtype == "bf16" or (case.dtype == "fp32" and name == names[0])):
            continue
        b, n, d, k, _ = case.args
        entry = plan.setdefault((name, case.dtype, k), dict(
            shape=f"{name} {b}x{n}x{d} K{k} {case.dtype}", batch=b, n=n, d=d, k=k, dtype=case.dtype, candidates={},
            bytes=case.dtype == "fp32" or name in (names[0], names[-1])))
        configs = entry["candidates"].setdefault(call.launch_name, [])
        if call.config and list(call.config) not in configs:
            configs.append(list(call.config))
    return list(plan.values())


def _traffic_process(plan: list[dict]) -> subprocess.Popen:
    """``kernel_traffic.py`` in the interpreter (TRITON_INTERPRET=1 before the kernels are imported), at low
    priority beside the compiles."""
    script = Path(__file__).resolve().parent / "kernel_traffic.py"
    child = subprocess.Popen([sys.executable, str(script)], env=dict(os.environ, TRITON_INTERPRET="1"),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=lambda: os.nice(10))
    child.stdin.write(json.dumps(plan))
    child.stdin.close()
    return child


def traffic_table(traffic: list[dict]) -> list[str]:
    """Markdown lines: bytes per call of each pass vs the minimum."""
    lines = ["| shape | pass | configs | token reads | MB per call | of which host ops | minimum MB | / minimum |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for t in traffic:
        configs = ", ".join(f"{name} {tuple(config)}" for name, config in t["configs"].items())
        lines.append(f"| {t['shape']} | {t['pass']} | {configs} | {t['token_reads']:.2f} × | {t['bytes'] / 1e6:,.1f} "
                     f"| {t['host_bytes'] / 1e6:,.1f} | {t['minimum'] / 1e6:,.1f} | {t['bytes'] / t['minimum']:.3f} |")
    return lines


# ------------------------------------------------------------------------------------------------ writing


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown(rows: list[dict], traffic: list[dict], arch: int, specializations: dict[str, str]) -> str:
    import triton

    from beyond_cls.kernels import aot

    limit = aot.SHARED_MEMORY_BYTES[arch]
    lines = [f"# Static kernel report, sm_{arch}", "",
             f"{datetime.date.today().isoformat()} · triton {triton.__version__} · torch {torch.__version__} · "
             f"bundled ptxas {aot.tools_version()} (`ptxas -v --gpu-name={aot.sm_name(arch)}`, `cuobjdump -sass`) · "
             "no GPU used: compiled as the JIT specializes the host functions' launches "
             "(`make kernel-report`, `benchmarks/kernel_report.py`)", "",
             "## Targets", "", "| target | measured | mark |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {k} |" for t, m, k in targets(rows, traffic, arch, limit)]
    mismatch = [r for r in rows if r["regs"] != r["cubin_regs"]]
    if mismatch:
        lines += ["", f"Note: {len(mismatch)} compiles used other register counts in Triton's own cubin than in "
                  "`ptxas -v` on its PTX (Triton passes extra ptxas flags); the table shows ptxas -v's."]
    lines += ["", "Columns: `regs` registers per thread, `spill_bytes` spill stores + loads per thread, `smem_bytes` "
              "dynamic shared memory per block, `loop_sass` SASS instructions of the main loop (key blocks or token "
              "tiles), `per element` = loop SASS x threads / elements per iteration (attention: BLOCK_M x BLOCK_N "
              "score elements of a key block; pooling: token elements of a token tile, counted in the interpreter), "
              "`loops` every loop's SASS count "
              "(* the main one; outer loops include their inner ones).", ""]
    for op, title in (("attention", "Attention + row statistics"), ("abmilp", "AbMILP pooling")):
        lines += [f"## {title}", "", "| kernel | shape | config | regs | spill | smem | loop SASS | per element "
                  "| loops |", "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            if r["case"].op == op:
                lines.append(f"| {r['kernel']} | {r['shape']} | {r['config']} | {r['regs']} | {r['spill_bytes']} "
                             f"| {r['smem_bytes']} | {r['loop_sass']} | {r['loop_sass_per_element']} | {r['loops']} |")
        lines.append("")
    if traffic:
        lines += ["## AbMILP bytes per call vs the minimum", "",
                  "Per call at B=1024, frozen tokens (the probe), every kernel at the first config its autotuner "
                  "keeps. Kernel bytes: every byte the kernels' loads and stores touch (masked lanes excluded, the "
                  "lanes of one load that read the same element once; the GPU's L2 may serve re-reads), counted "
                  "per argument in Triton's interpreter at a small batch and two small token counts that launch "
                  "what the full shape launches, carried to the full shape (an "
                  "argument that follows the shape: as many touches per byte; a fixed-size one, e.g. the weight: as "
                  "many per program, linear in the token count; programs from each launch's grid). Host ops: the "
                  "PyTorch ops of the host functions at the full shape (inputs + outputs). Minimum: the tokens read "
                  "once in the pass + the pass's outputs (forward: pooled and scores; backward: the weight and bias "
                  "gradients). `token reads`: bytes loaded from the tokens / their size.", ""]
        lines += traffic_table(traffic) + [""]
    lines += ["## Specializations (as the JIT makes them)", ""]
    lines += [f"- `{name}`: {text}" for name, text in specializations.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (default: 90)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for static_sm<arch>.{csv,md}")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--quick", action="store_true", help="one shape per op (tests, rehearsals)")
    parser.add_argument("--no-traffic", action="store_true", help="skip the interpreted AbMILP counts")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("run without TRITON_INTERPRET=1: the kernels must be compiled, not interpreted")
    from beyond_cls.kernels import aot

    calls = jit_calls(cases(args.quick))
    child = None if args.no_traffic else _traffic_process(traffic_plan(calls))
    jobs, index = aot.unique_jobs([call for _, call in calls], args.arch)
    print(f"kernel report: {len(calls)} launches x {len(args.arch)} arch(s) -> {len(jobs)} distinct compiles, "
          f"{args.workers} workers", flush=True)
    results = aot.map_compiles(inspect_call, jobs, workers=args.workers)
    counted = {"traffic": [], "elements": []}
    if child is not None:
        out = child.stdout.read()
        if child.wait() != 0 or not out.strip():
            print("kernel report: the interpreted AbMILP counts failed (see above); the report goes without them")
        else:
            counted = json.loads(out.splitlines()[-1])
    token_elements = {(d, name, tuple(config)): value for d, name, config, value in counted["elements"]}
    args.out.mkdir(parents=True, exist_ok=True)
    for a, arch in enumerate(args.arch):
        picked = [results[index[i * len(args.arch) + a]] for i in range(len(calls))]
        rows = report_rows(calls, picked, token_elements)
        specializations = {}
        for case, call in calls:
            key = f"{_kernel_name(case, call)} {case.dtype}"
            if key not in specializations:
                specializations[key] = f"{aot.describe(call, arch)} (at {case.shape})"
        stem = args.out / f"static_sm{arch}"
        write_csv(rows, stem.with_suffix(".csv"))
        stem.with_suffix(".md").write_text(markdown(rows, counted["traffic"], arch, specializations))
        print(f"wrote {stem}.csv and .md")
        for target, measured, mark in targets(rows, counted["traffic"], arch, aot.SHARED_MEMORY_BYTES[arch]):
            print(f"  [{mark.strip('*')}] {target}: {measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
