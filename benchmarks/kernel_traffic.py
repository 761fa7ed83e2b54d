"""AbMILP bytes per call and token elements per loop iteration, counted in Triton's interpreter (for
``kernel_report.py``, which runs this file with TRITON_INTERPRET=1: the plan as JSON on stdin, the result as JSON
on stdout).

Bytes: every byte the kernels' loads and stores touch (masked lanes excluded; lanes of one load or store that
touch the same element count once), per launch argument, at a small
batch and two small token counts at which the host functions launch the same kernels with the same constexprs as at
the full shape; carried to the full shape per argument: an argument whose size follows the shape (tokens, scores,
pooled) is touched as often per byte, a fixed-size one (the weight) as often per program, linearly in the token
count (the programs of each launch at the full shape come from its grid). Plus the host-side PyTorch ops, run at the
full shape on allocated tensors while the launches are captured. Token elements per iteration: the distinct token
elements the loop's token loads (the ones made most often; loads are told apart by their call path in the kernel's
source) read in one full trip.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections import Counter

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FREE_OPS = ("empty", "new_empty", "empty_strided", "set_", "detach", "lift_fresh", "alias")
SMALL_BATCHES = (1, 2, 3, 4, 5, 6, 8, 12, 16)
SMALL_TOKENS = ((32, 48), (64, 96), (128, 160))


def _span(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _inputs(b: int, n: int, d: int, k: int, dtype: torch.dtype, real: bool) -> dict:
    """The call's inputs: random (``real``: computed on) or only allocated (captured); tokens are the patch slice of
    an encoder output, the scorer float32."""
    make = torch.randn if real else torch.empty
    return dict(tokens=make(b, n + 1, d).to(dtype)[:, 1:], weight=make(k, d) * d**-0.5, bias=torch.zeros(k),
                grad=make(b, k, d))


class _Counter:
    """While entered, counts what each interpreted load and store touches, per argument of the current launch, and
    the most distinct token elements one execution of each token load reads, by call path in the kernels' source."""

    def __init__(self, module):
        self.files = {kernel.fn.__code__.co_filename for kernel in module.KERNELS.values()}
        self.spans: list[tuple[int, int, int]] = []
        self.bytes: list[int] = []
        self.tokens = (0, 0)
        self.sites: dict[tuple, list[int]] = {}  # call path -> [executions, most distinct token elements in one]

    def _count(self, ptrs, mask) -> None:
        import numpy as np

        # the distinct addresses of the active lanes: lanes of one load that read the same element (a tile
        # broadcast over warps) are one read of memory
        addr = np.unique(ptrs.data[np.broadcast_to(np.asarray(mask.data, dtype=bool), ptrs.data.shape)])
        size = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
        token_addr = addr[(addr >= self.tokens[0]) & (addr < self.tokens[1])]
        if token_addr.size:
            frame, path = sys._getframe(), []
            while frame is not None:
                if frame.f_code.co_filename in self.files:
                    path.append(frame.f_lineno)
                frame = frame.f_back
            site = self.sites.setdefault(tuple(path), [0, 0])
            site[0] += 1
            site[1] = max(site[1], token_addr.size)
        for start, end, j in self.spans:
            inside = (addr >= start) & (addr < end)
            self.bytes[j] += int(inside.sum()) * size
            addr = addr[~inside]

    def elements(self) -> int:
        """Token elements of one full trip of the loop: its token loads are the ones made most often."""
        trips = max(count for count, _ in self.sites.values())
        return sum(most for count, most in self.sites.values() if count == trips)

    def __enter__(self):
        from triton.runtime.interpreter import InterpreterBuilder

        self.saved = InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store
        load, store = self.saved

        def counted_load(builder, ptrs, mask, *args, **kwargs):
            self._count(ptrs, mask)
            return load(builder, ptrs, mask, *args, **kwargs)

        def counted_store(builder, ptrs, value, mask, *args, **kwargs):
            self._count(ptrs, mask)
            return store(builder, ptrs, value, mask, *args, **kwargs)

        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = counted_load, counted_store
        return self

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpreterBuilder

        InterpreterBuilder.create_masked_load, InterpreterBuilder.create_masked_store = self.saved


class _Stop(Exception):
    """Raised by a grid function to learn the grid of a launch without running it."""


def _with_grid(args: tuple, seen: list, stop: bool) -> tuple:
    """``args`` with the grid function (the first callable) recording the grid it returns (then stopping)."""
    out, wrapped = [], False
    for arg in args:
        if callable(arg) and not wrapped and not isinstance(arg, torch.Tensor):
            def grid(meta, fn=arg):
                seen.append(math.prod(fn(meta)))
                if stop:
                    raise _Stop
                return fn(meta)
            arg, wrapped = grid, True
        out.append(arg)
    return tuple(out)


def _capture(module, inputs: dict, pick=None, host_bytes: bool = False, counter: _Counter | None = None) -> dict:
    """Forward then backward (frozen tokens) with every launch recorded, per pass: its kernel name, constexprs,
    config, argument sizes and programs. With ``counter`` the kernels run in the interpreter at ``pick(launch)``, and
    their touched bytes per argument and token elements per trip are recorded; else nothing runs (grids are read at
    ``pick(launch)``, the host ops run on the given tensors). Also the outputs and host-op bytes per pass."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from beyond_cls.kernels import aot

    phase, out = ["fwd"], {"launches": {"fwd": [], "bwd": []}, "outputs": {}, "host": Counter()}
    if counter is not None:
        counter.tokens = _span(inputs["tokens"])

    class HostBytes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if not (func.is_view or func.__name__.split(".")[0] in _FREE_OPS):
                out["host"][phase[0]] += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, result))
                                             if isinstance(t, torch.Tensor))
            return result

    launch = module.launch

    def recorded(*args, config=None, **meta):
        record = aot.Launch(module, args, meta)
        chosen = tuple(pick(record)) if pick else tuple(record.configs[0])
        seen: list[int] = []
        entry = dict(name=record.name, meta=sorted((k, str(v)) for k, v in meta.items()), config=chosen,
                     sizes=[t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0 for t in args],
                     tokens=[isinstance(t, torch.Tensor) and _span(t) == _span(inputs["tokens"]) for t in args])
        if counter is None:
            with contextlib.suppress(_Stop):
                launch(*_with_grid(args, seen, stop=True), config=chosen, **meta)
        else:
            counter.spans = [(*_span(t), j) for j, t in enumerate(args) if isinstance(t, torch.Tensor)]
            counter.bytes, counter.sites = [0] * len(args), {}
            launch(*_with_grid(args, seen, stop=False), config=chosen, **meta)
            entry.update(touched=list(counter.bytes), elements=counter.elements() if counter.sites else None)
        entry["programs"] = seen[0] if seen else 1
        out["launches"][phase[0]].append(entry)

    module.launch = recorded
    try:
        with HostBytes() if host_bytes else contextlib.nullcontext():
            pooled, scores = module.abmilp_forward(inputs["tokens"], inputs["weight"], inputs["bias"], None)
            out["outputs"]["fwd"] = [pooled, scores]
            phase[0] = "bwd"
            out["outputs"]["bwd"] = list(module.abmilp_backward(inputs["grad"], None, inputs["tokens"],
                                                                inputs["weight"], scores, pooled, False))
    finally:
        module.launch = launch
    return out


def _structure(captured: dict) -> list:
    """What a call launches: kernel names and constexprs, per pass."""
    return [(p, e["name"], e["meta"]) for p, launches in captured["launches"].items() for e in launches]


def _small_shape(module, n: int, d: int, k: int, dtype: torch.dtype, structure: list) -> tuple[int, int, int] | None:
    """(batch, tokens, more tokens): the smallest batch and token counts that launch what the full shape launches."""
    for n1, n2 in [*[(a, b) for a, b in SMALL_TOKENS if b < n], (n, n)]:
        for b in SMALL_BATCHES:
            if all(_structure(_capture(module, _inputs(b, m, d, k, dtype, real=False))) == structure for m in (n1, n2)):
                return b, n1, n2
    return None


def carry(small: list[dict], more: list[dict], full: list[dict], n_small: int, n_more: int, n_full: int) -> float:
    """Kernel bytes at the full shape from the per-argument counts of two small shapes (see the module docstring)."""
    total = 0.0
    for s, m, f in zip(small, more, full, strict=True):
        for touched, touched2, size, size2, size_full in zip(s["touched"], m["touched"], s["sizes"], m["sizes"],
                                                               f["sizes"], strict=True):
            if not size:
                continue
            if size != size2 or size != size_full:  # follows the shape: as many touches per byte
                total += touched * size_full / size
            else:  # fixed size: touches per program, linear in the token count
                per, per2 = touched / s["programs"], touched2 / m["programs"]
                slope = (per2 - per) / (n_more - n_small) if n_more != n_small else 0.0
                total += (per + slope * (n_full - n_small)) * f["programs"]
    return total


def measure(plan: list[dict], module=None) -> dict:
    """For each case of ``plan`` (shape, batch, n, d, k, dtype, bytes: whether to count them, candidates:
    {kernel: [configs]}): with ``bytes``, the bytes each pass moves with every kernel at its first kept config;
    always, the token elements per iteration of every kept config, as [d, kernel, config, elements].
    ``module``: another kernel module with the same host functions (default ``beyond_cls.kernels.abmilp``)."""
    if module is None:
        from beyond_cls.kernels import abmilp as module

    rows, elements, done = [], [], set()
    with _Counter(module) as counter:
        for case in plan:
            batch, n, d, k, dtype = case["batch"], case["n"], case["d"], case["k"], _DTYPES[case["dtype"]]
            candidates = {name: [tuple(c) for c in configs] for name, configs in case["candidates"].items()}

            def pick(record, index=0, candidates=candidates):
                if isinstance(record, dict):  # a launch captured at the full shape
                    configs = candidates.get(record["name"]) or [record["config"]]
                else:
                    configs = candidates.get(record.name) or record.configs
                return configs[min(index, len(configs) - 1)]

            full = _capture(module, _inputs(batch, n, d, k, dtype, real=False), pick, host_bytes=True)
            small = _small_shape(module, n, d, k, dtype, _structure(full))
            if small is None:
                print(f"kernel traffic: {case['shape']}: no small shape launches what the full one does",
                      file=sys.stderr)
                continue
            b, n1, n2 = small
            torch.manual_seed(0)
            runs = {m: _capture(module, _inputs(b, m, d, k, dtype, real=True), pick, counter=counter)
                    for m in ((n1, n2) if case.get("bytes") else (n1,))}
            for index in range(max(len(c) for c in candidates.values())):  # token elements of every kept config
                wanted = {(d, e["name"], tuple(pick(e, index))) for p in ("fwd", "bwd") for e in full["launches"][p]}
                if wanted <= done:
                    continue
                run = runs[n1] if index == 0 else _capture(
                    module, _inputs(b, n1, d, k, dtype, real=True), lambda r, i=index: pick(r, i), counter=counter)
                for entry in run["launches"]["fwd"] + run["launches"]["bwd"]:
                    key = (d, entry["name"], entry["config"])
                    if entry["elements"] and key not in done:
                        done.add(key)
                        elements.append([d, entry["name"], list(entry["config"]), entry["elements"]])
            if not case.get("bytes"):
                continue
            size = torch.empty(0, dtype=dtype).element_size()
            tokens = batch * n * d * size
            for pass_ in ("fwd", "bwd"):
                kernel = carry(runs[n1]["launches"][pass_], runs[n2]["launches"][pass_], full["launches"][pass_],
                               n1, n2, n)
                first = runs[n1]["launches"][pass_]
                read = sum(t for e in first for t, is_tokens in zip(e["touched"], e["tokens"]) if is_tokens)
                host = full["host"][pass_]
                rows.append({"shape": case["shape"], "pass": pass_, "host_bytes": host, "bytes": round(kernel) + host,
                             "minimum": tokens + sum(t.nbytes for t in full["outputs"][pass_]),
                             "configs": {e["name"]: list(e["config"]) for e in full["launches"][pass_]},
                             "token_reads": read / (b * n1 * d * size),
                             "small_shape": [b, n1, n2]})
    return {"traffic": rows, "elements": elements}


if __name__ == "__main__":
    print(json.dumps(measure(json.load(sys.stdin))))
