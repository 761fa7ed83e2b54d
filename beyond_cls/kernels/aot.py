"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, without a GPU, as the JIT would.

A *launch capture* runs a kernel module's real host function on CPU tensors while the module's
``launch`` records its calls instead of running them (:func:`capture_launches`). Each recorded
launch is replayed through the module's own ``launch`` with ``Autotuner.run`` and ``JITFunction.run``
recording the exact arguments, constexprs and options the kernel receives at every config its autotuner
keeps (:func:`jit_calls`). :func:`compile_call` compiles such a call for ``sm_<arch>`` through
``JITFunction.warmup`` under a stand-in driver, so Triton's own binder specializes it: 16-byte
aligned pointers and integers divisible by 16 get ``tt.divisibility``, integers equal to 1 become
constexprs. The cubin is the one a GPU run of that call builds. :func:`resource_usage` (bundled
``ptxas -v``) and :func:`sass_loops` (bundled ``cuobjdump -sass``) read it.

CI compiles every kept config of every kernel this way for sm_80 and sm_90 (``tests/ops/test_triton_aot.py``);
``benchmarks/kernel_report.py`` writes the static report.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from beyond_cls.triton_mode import as_if_compiled

ARCHS = (80, 90)
SHARED_MEMORY_BYTES = {80: 166912, 90: 232448}  # per block, opt-in maximum (A100, H100)
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid")


@dataclass
class Launch:
    """One call of a kernel module's ``launch`` made by a host function: its positional arguments (the
    kernel name first for modules with several kernels, then the grid function and the kernel's
    arguments) and keywords (constexprs the host chose)."""

    module: ModuleType
    args: tuple
    meta: dict

    @property
    def name(self) -> str:
        """The kernel's name in the module (``CONFIGS`` key), or the module's name for a one-kernel module."""
        return self.args[0] if isinstance(self.module.CONFIGS, dict) else self.module.__name__.rsplit(".", 1)[-1]

    @property
    def configs(self) -> list[tuple]:
        """The module's ``CONFIGS`` for this launch (its autotuner may keep fewer: :func:`jit_calls`)."""
        configs = self.module.CONFIGS
        return list(configs[self.args[0]] if isinstance(configs, dict) else configs)


@dataclass
class JitCall:
    """One kernel launch as the JIT receives it: ``kernel[grid](*args, **kwargs)`` at launch config ``config``."""

    kernel: JITFunction
    args: tuple
    kwargs: dict
    grid: object
    config: tuple
    launch_meta: dict = field(default_factory=dict)  # the constexprs the host function passed
    launch_name: str = ""  # :attr:`Launch.name`

    @property
    def name(self) -> str:
        return self.kernel.__name__

    @property
    def config_constexprs(self) -> dict[str, object]:
        """The constexprs the launch config set (e.g. block sizes): those the host function did not pass."""
        return {k: v for k, v in self.kwargs.items() if k not in self.launch_meta and k not in _OPTIONS}

    def config_label(self) -> str:
        """e.g. ``M128 N64 w8 s3`` for BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3."""
        blocks = " ".join(f"{k.removeprefix('BLOCK_')}{v}" for k, v in self.config_constexprs.items())
        return f"{blocks} w{self.kwargs.get('num_warps', 4)} s{self.kwargs.get('num_stages', 3)}".strip()


@contextlib.contextmanager
def _patched(owner: object, name: str, value: object) -> Iterator[None]:
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def capture_launches(module: ModuleType, host: Callable[[], object], gpu: bool = True) -> list[Launch]:
    """Run ``host()`` (a call of ``module``'s host functions) with ``module.launch`` recording, not running; ``gpu``:
    as on a GPU (hosts choose interpreter-only flags under TRITON_INTERPRET=1; it is hidden meanwhile)."""
    records: list[Launch] = []

    def record(*args, config=None, **meta):
        records.append(Launch(module, args, meta))

    with as_if_compiled() if gpu else contextlib.nullcontext(), _patched(module, "launch", record):
        host()
    return records


class TensorSpec:
    """What the JIT reads of a tensor argument, its dtype and address: stands in for the tensor in a captured call,
    so that captured calls hold no memory (captures allocate full-size tensors)."""

    __slots__ = ("_ptr", "dtype")

    def __init__(self, tensor: torch.Tensor):
        self.dtype, self._ptr = tensor.dtype, tensor.data_ptr()

    def data_ptr(self) -> int:
        return self._ptr


def _replay(launch: Launch, config: tuple | None) -> list[JitCall]:
    """The JIT calls ``launch`` makes at ``config``; at None, the ones its autotuner would time (one per config it
    keeps, each as the autotuner calls it), or its direct calls when it runs without one."""
    calls: list[JitCall] = []

    def run(kernel, *args, grid, warmup, **kwargs):
        args = tuple(TensorSpec(a) if isinstance(a, torch.Tensor) else a for a in args)
        grid = grid(dict(zip(kernel.arg_names, args)) | kwargs) if callable(grid) else grid
        calls.append(JitCall(kernel, args, kwargs, grid, config or (), dict(launch.meta), launch.name))

    def tune(tuner, *args, grid=None, warmup=False, **kwargs):
        tuner.nargs = dict(zip(tuner.arg_names, args))
        for candidate in tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs:
            run(tuner.fn, *args, grid=grid, warmup=warmup, **kwargs, **candidate.all_kwargs())
        tuner.nargs = None

    with as_if_compiled(), _patched(JITFunction, "run", run), _patched(Autotuner, "run", tune):
        launch.module.launch(*launch.args, config=config, **launch.meta)
    return calls


def jit_calls(launch: Launch, configs: Sequence[tuple] | None = None) -> list[JitCall]:
    """The JIT calls ``launch`` makes at each of ``configs``, replayed through the module's own ``launch`` (which maps
    a config to constexprs and options). Default: the calls its autotuner would try on a GPU (the configs of
    ``CONFIGS`` it keeps for this launch), each labelled with the ``CONFIGS`` entry that makes the same call."""
    if configs is not None:
        return [call for config in configs for call in _replay(launch, config)]
    explicit = []
    for config in launch.configs:
        try:
            explicit += [(config, call.kwargs) for call in _replay(launch, config)]
        except Exception:  # a config this launch cannot take (the autotuner does not keep it either)
            continue
    calls = _replay(launch, None)
    for call in calls:
        same = [config for config, kwargs in explicit if all(call.kwargs.get(k) == v for k, v in kwargs.items())]
        call.config = same[0] if same else ()
    return calls


def attention_launches(batch: int, heads: int, n: int, d: int, prefix: int, dtype: torch.dtype, bias: bool = False,
                       keep_rows: Sequence[int] | None = None, module: ModuleType | None = None) -> list[Launch]:
    """The launches of one ``attention_with_stats_forward`` call as timm makes it: q, k, v strided views of one
    qkv [B, N, 3, H, d] tensor permuted to [B, H, N, d]; with ``bias`` a float32 [1, H, N, N] (BEiT's relative
    position bias). Tensors are allocated, never touched: nothing runs. ``module``: another copy of the kernel
    module (default ``beyond_cls.kernels.attention_stats``)."""
    if module is None:
        from beyond_cls.kernels import attention_stats as module

    q, k, v = torch.empty(batch, n, 3, heads, d, dtype=dtype).permute(2, 0, 3, 1, 4).unbind(0)
    bias_t = torch.empty(1, heads, n, n, dtype=torch.float32) if bias else None
    rows = list(keep_rows) if keep_rows else None
    return capture_launches(module, lambda: module.attention_with_stats_forward(
        q, k, v, prefix, None, bias_t, rows))


def abmilp_launches(batch: int, n: int, d: int, k: int, dtype: torch.dtype, passes: Sequence[str] = ("fwd", "bwd"),
                    mask: bool = False, grad_scores: bool = False, tokens_grad: bool = False, scorer: bool = True,
                    prefix: int = 1, module: ModuleType | None = None) -> list[Launch]:
    """The launches of AbMILP pooling (``scorer``: ``abmilp_forward`` / ``abmilp_backward``; else softmax pooling
    with given logits) as the heads make them: tokens the [B, N, D] patch slice of an encoder output
    [B, prefix + N, D], a float32 [K, D] scorer (float64 for float64 tokens), float32 gradients. ``module``:
    another copy of the kernel module (default ``beyond_cls.kernels.abmilp``)."""
    abmilp = module
    if abmilp is None:
        from beyond_cls.kernels import abmilp

    tokens = torch.empty(batch, prefix + n, d, dtype=dtype)[:, prefix:]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weight, bias = torch.empty(k, d, dtype=acc), torch.empty(k, dtype=acc)
    logits = torch.empty(batch, n, k, dtype=acc).transpose(1, 2)  # a Linear scorer's output, transposed
    keep = torch.ones(batch, n, dtype=torch.bool) if mask else None
    pooled, scores = torch.empty(batch, k, d, dtype=acc), torch.empty(batch, k, n, dtype=acc)
    grad_pooled = torch.empty(batch, k, d, dtype=acc)
    grad_s = torch.empty(batch, k, n, dtype=acc) if grad_scores else None

    def host():
        if "fwd" in passes:
            if scorer:
                abmilp.abmilp_forward(tokens, weight, bias, keep)
            else:
                abmilp.softmax_pool_forward(tokens, logits, keep)
        if "bwd" in passes:
            if scorer:
                abmilp.abmilp_backward(grad_pooled, grad_s, tokens, weight, scores, pooled, tokens_grad)
            else:
                abmilp.softmax_pool_backward(grad_pooled, grad_s, tokens, scores, pooled, tokens_grad)

    return capture_launches(abmilp, host)


class _TargetDriver:
    """Stands in for Triton's driver, which the JIT asks only for the current device, stream and target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> str:
        return f"aot-sm_{self.target.arch}"

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


@contextlib.contextmanager
def _target(arch: int) -> Iterator[None]:
    from triton.runtime.driver import driver

    saved = driver._active  # the active driver, if any; reset_active() would build a CUDA one (none here)
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver._active = saved


def _jit(call: JitCall) -> JITFunction:
    if not isinstance(call.kernel, JITFunction):
        raise RuntimeError(f"{call.name} was decorated under TRITON_INTERPRET=1: compile in a process without it")
    return call.kernel


def specialization(call: JitCall, arch: int) -> tuple[list, dict]:
    """(per-argument (type, specialization) pairs, launch options) as Triton's binder makes them for ``call``."""
    kernel = _jit(call)
    with _target(arch):
        binder = kernel.device_caches[_TargetDriver(arch).get_current_device()][-1]
        _, spec, options = binder(*call.args, **call.kwargs)
    return list(spec), dict(options)


def specialization_key(call: JitCall, arch: int) -> str:
    """Equal for two calls exactly when the JIT would compile them to the same kernel."""
    spec, options = specialization(call, arch)
    return f"{call.kernel.__module__}.{call.kernel.__qualname__}|{spec}|{sorted(options.items())}|{arch}"


def describe(call: JitCall, arch: int = 90) -> str:
    """The runtime specialization in words: arguments the JIT marks divisible by 16, or turns into 1."""
    spec, _ = specialization(call, arch)
    names = call.kernel.arg_names
    ones = [n for n, (ty, value) in zip(names, spec) if ty == "constexpr" and value == 1 and n not in call.kwargs]
    div = [n for n, (ty, value) in zip(names, spec) if ty != "constexpr" and value == "D"]
    return f"divisible by 16: {', '.join(div) or '-'}; equal to 1: {', '.join(ones) or '-'}"


def compile_call(call: JitCall, arch: int):
    """Compile ``call`` for ``sm_<arch>`` as the JIT would on that GPU; returns Triton's compiled kernel."""
    kernel = _jit(call)
    with as_if_compiled(), _target(arch):  # code generation differs under TRITON_INTERPRET=1
        return kernel.warmup(*call.args, grid=call.grid, **call.kwargs)


# ------------------------------------------------------------------------------------------ reading the cubin


def _tool(name: str) -> str:
    return getattr(triton.knobs.nvidia, name).path


def sm_name(arch: int) -> str:
    """``ptxas --gpu-name`` of ``arch`` as Triton compiles it (``sm_90a`` for Hopper)."""
    return f"sm_{arch}{'a' if arch >= 90 else ''}"


@dataclass(frozen=True)
class Usage:
    """Resources of one compiled kernel: registers per thread, spill bytes, dynamic shared memory, threads."""

    regs: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    threads: int

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads


def resource_usage(compiled, arch: int) -> Usage:
    """Registers and spills from the bundled ``ptxas -v --gpu-name=sm_XX`` on the kernel's PTX; shared memory as
    Triton launches it (dynamic, ``metadata.shared``)."""
    with tempfile.TemporaryDirectory(prefix="beyond_cls_ptxas_") as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([_tool("ptxas"), "-v", f"--gpu-name={sm_name(arch)}", ptx, "-o", ptx + ".o"],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or frame is None:
        raise RuntimeError(f"unexpected ptxas -v output:\n{log}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return Usage(int(regs.group(1)), stores, loads, stack, compiled.metadata.shared, 32 * compiled.metadata.num_warps)


def cubin_usage(compiled) -> dict[str, int]:
    """Registers, stack frame and local memory per thread of the cubin itself (``cuobjdump -res-usage``: fast, no
    recompile). A stack frame or local memory means spilled registers (Triton kernels have no local arrays)."""
    with tempfile.TemporaryDirectory(prefix="beyond_cls_res_") as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", cubin], capture_output=True, text=True,
                             check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", out))
    if set(found) != {"REG", "STACK", "LOCAL"}:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{out}")
    return {"regs": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"])}


def sass(compiled) -> str:
    """The kernel's SASS (``cuobjdump -sass`` on its cubin)."""
    with tempfile.TemporaryDirectory(prefix="beyond_cls_sass_") as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        return subprocess.run([_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True,
                              check=True).stdout


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_PREDICATE = re.compile(r"^@!?U?P[T\d]+\s+")
_MMA = re.compile(r"^(HMMA|HGMMA|DMMA|IMMA|IGMMA|QGMMA|BMMA|UTC\w*MMA)")
_GLOBAL_LOAD = re.compile(r"^(LDG|LDGSTS|UTMALDG|UBLKCP)")


@dataclass(frozen=True)
class Loop:
    """A loop of the SASS: the instructions from a backward branch's target to the branch."""

    start: int
    end: int
    instructions: int  # NOPs excluded
    mma: int  # tensor-core instructions
    load_bytes: int  # bytes per thread of its global loads (TMA copies count 128 each)

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and self != other


def parse_sass(text: str) -> list[tuple[int, str]]:
    """(address, instruction without its predicate) of every SASS instruction in ``text``."""
    return [(int(addr, 16), _PREDICATE.sub("", instr)) for addr, instr in _LINE.findall(text)]


_WIDTH = {"128": 16, "64": 8, "32": 4, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _load_bytes(opcode: str) -> int:
    """Bytes one thread loads from global memory with ``opcode`` (0 for other instructions)."""
    if not _GLOBAL_LOAD.match(opcode):
        return 0
    if opcode.startswith(("UTMALDG", "UBLKCP")):
        return 128
    return max((_WIDTH[m] for m in opcode.split(".")[1:] if m in _WIDTH), default=4)


def sass_loops(text: str) -> list[Loop]:
    """Every loop of the SASS (one per backward-branch target, to its last backward branch), in address order."""
    instrs = parse_sass(text)
    ends: dict[int, int] = {}
    for addr, instr in instrs:
        parts = instr.split()
        if parts and parts[0].split(".")[0] in ("BRA", "JMP"):
            targets = re.findall(r"0x([0-9a-f]+)", instr)
            target = int(targets[-1], 16) if targets else None
            if target is not None and target < addr:
                ends[target] = max(ends.get(target, addr), addr)
    loops = []
    for start, end in sorted(ends.items()):
        body = [instr.split()[0] for addr, instr in instrs if start <= addr <= end and not instr.startswith("NOP")]
        loops.append(Loop(start, end, len(body), sum(bool(_MMA.match(op)) for op in body),
                          sum(_load_bytes(op) for op in body)))
    return loops


def main_loop(loops: Sequence[Loop]) -> Loop | None:
    """The loop that streams the key blocks or token tiles: among the loops holding tensor-core instructions
    (else all), the innermost ones; of those, the one loading the most bytes per iteration (the first on a tie)."""
    candidates = [loop for loop in loops if loop.mma] or list(loops)
    innermost = [loop for loop in candidates if not any(loop.contains(other) for other in candidates)]
    return max(innermost, key=lambda loop: (loop.load_bytes, -loop.start), default=None)


# ------------------------------------------------------------------------------------------ many at once

_JOBS: list = []  # (JitCall, arch) per job; read by forked workers


def _run_job(args: tuple[Callable, int]):
    fn, index = args
    call, arch = _JOBS[index]
    return fn(call, arch)


def _lower_priority() -> None:
    os.nice(10)  # compiles fill idle cores; whatever else runs keeps its share


def map_compiles(fn: Callable[[JitCall, int], object], jobs: Sequence[tuple[JitCall, int]],
                 workers: int | None = None) -> list:
    """``[fn(call, arch) for call, arch in jobs]`` in forked worker processes (compiles are independent and
    single-threaded), at lower priority. ``fn`` must be a module-level function; results are pickled back."""
    workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
    _JOBS[:] = list(jobs)
    try:
        if workers == 1:
            return [fn(call, arch) for call, arch in jobs]
        with multiprocessing.get_context("fork").Pool(workers, initializer=_lower_priority) as pool:
            return pool.map(_run_job, [(fn, i) for i in range(len(jobs))], chunksize=1)
    finally:
        _JOBS.clear()


def unique_jobs(calls: Sequence[JitCall], archs: Sequence[int] = ARCHS) -> tuple[list[tuple[JitCall, int]], list[int]]:
    """(distinct (call, arch) compiles, index into them of every (call, arch) in ``calls`` x ``archs`` order)."""
    jobs: list[tuple[JitCall, int]] = []
    where: dict[str, int] = {}
    index = []
    for call in calls:
        for arch in archs:
            key = specialization_key(call, arch)
            if key not in where:
                where[key] = len(jobs)
                jobs.append((call, arch))
            index.append(where[key])
    return jobs, index


@functools.lru_cache(maxsize=1)
def tools_version() -> str:
    """The bundled ptxas release, e.g. ``12.9``."""
    out = subprocess.run([_tool("ptxas"), "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release ([\d.]+)", out)
    return found.group(1) if found else "unknown"
