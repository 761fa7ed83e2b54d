"""How every Triton kernel of the package is launched, written once.

A kernel module describes each kernel as a :class:`KernelLaunch` (its ``@triton.jit`` function, launch configs,
interpreter config, autotune key, and its own rules as data) and its ``launch`` calls :func:`run`, which picks:

- ``config`` given: that config's constexprs, warps, stages and register cap (``maxnreg``, compiled runs only);
- no config under ``TRITON_INTERPRET=1``: ``interpret_config`` (autotuning would time numpy);
- no config on a GPU: an autotuner over the configs that suit the call, built once per kernel and what those
  configs depend on (kept in the :class:`KernelLaunch`); it keys its choice by ``key`` and the tensor arguments' dtypes.

A config is ``(block, block, num_warps, num_stages)``; the two blocks become the constexprs ``block_names``
unless the kernel maps them itself (``blocks``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import triton

from beyond_cls.triton_mode import interpreting

Config = tuple[int, int, int, int]  # (block, block, num_warps, num_stages)


@dataclass(frozen=True, eq=False)
class KernelLaunch:
    """One kernel and its launch rules (build it once: :func:`run` is on every launch's path). Callables take the
    call: the kernel's arguments by name plus the constexprs the host passed.

    ``blocks(config, call)``: the constexprs a config sets (default: its two blocks as ``block_names``).
    ``candidates(call)``: the configs the autotuner may try for this call (default: all of ``configs``).
    ``tuned_by(call)``: all that ``candidates`` and ``blocks`` depend on, a cheap key for the call's autotuner
    (default: the configs as launched, computed per call when either callable is set).
    ``max_registers(num_warps)``: ``maxnreg`` at that many warps, or None for none.
    ``warps_limit``: a constexpr that ``num_warps`` may not exceed (the interpreter config is capped at it)."""

    name: str
    fn: object  # a JITFunction (an InterpretedFunction under TRITON_INTERPRET=1)
    configs: Sequence[Config]
    interpret_config: Config
    key: Sequence[str]
    block_names: tuple[str, str] = ("BLOCK_M", "BLOCK_N")
    blocks: Callable[[Config, Mapping], dict] | None = None
    candidates: Callable[[Mapping], Sequence[Config]] | None = None
    tuned_by: Callable[[Mapping], Hashable] | None = None
    max_registers: Callable[[int], int | None] | None = None
    warps_limit: str | None = None
    tuners: dict = field(default_factory=dict, repr=False)  # autotuners built so far, by tuned_by(call)

    def constexprs(self, config: Config, call: Mapping) -> dict:
        """The constexprs ``config`` sets for ``call``."""
        if self.blocks is not None:
            return self.blocks(config, call)
        return dict(zip(self.block_names, config[:2]))

    def options(self, config: Config, compiled: bool = True) -> dict:
        """``num_warps``, ``num_stages`` and, for a compiled run, ``maxnreg`` where the kernel caps registers."""
        options = dict(num_warps=config[2], num_stages=config[3])
        cap = self.max_registers(config[2]) if self.max_registers is not None else None
        if cap and compiled:
            options["maxnreg"] = cap
        return options

    def check(self, config: Config, call: Mapping) -> None:
        """Raise a ValueError if the kernel cannot run at ``config`` for ``call`` (too many warps)."""
        if self.warps_limit is not None and config[2] > call[self.warps_limit]:
            raise ValueError(f"{self.name}: {config[2]} warps, more than {self.warps_limit} = "
                             f"{call[self.warps_limit]} (the most this kernel takes)")

    def interpreter_config(self, call: Mapping) -> Config:
        """``interpret_config``, its warps capped at ``warps_limit``."""
        block_a, block_b, warps, stages = self.interpret_config
        if self.warps_limit is not None:
            warps = min(warps, call[self.warps_limit])
        return block_a, block_b, warps, stages


def _launched(kernel: KernelLaunch, call: Mapping) -> tuple:
    """The configs the autotuner tries for ``call``, as (constexprs, options) item tuples."""
    chosen = kernel.candidates(call) if kernel.candidates is not None else kernel.configs
    return tuple((tuple(sorted(kernel.constexprs(c, call).items())), tuple(sorted(kernel.options(c).items())))
                 for c in chosen)


def autotuner(kernel: KernelLaunch, call: Mapping):
    """The autotuner over the configs that suit ``call``, built once per ``tuned_by(call)`` (or per set of configs
    as launched) and kept in ``kernel.tuners``; it keys its own choice by ``key`` and the dtypes."""
    if kernel.tuned_by is not None:
        by = kernel.tuned_by(call)
    elif kernel.candidates is None and kernel.blocks is None:
        by = ()  # the same configs for every call
    else:
        by = _launched(kernel, call)
    tuner = kernel.tuners.get(by)
    if tuner is None:
        configs = [triton.Config(dict(blocks), **dict(options)) for blocks, options in _launched(kernel, call)]
        tuner = kernel.tuners[by] = triton.autotune(configs=configs, key=list(kernel.key))(kernel.fn)
    return tuner


def run(kernel: KernelLaunch, grid: Callable[[dict], tuple], args: Sequence, meta: Mapping,
        config: Config | None = None) -> None:
    """Launch ``kernel`` over ``grid(constexprs)`` with ``args`` and the host's constexprs ``meta``: at ``config``
    when given, else at its interpreter config in the interpreter, else autotuned (see the module docstring)."""
    reads_args = kernel.blocks is not None or kernel.candidates is not None or kernel.tuned_by is not None
    call = dict(zip(kernel.fn.arg_names, args), **meta) if reads_args else meta
    compiled = not interpreting()
    if config is None and not compiled:
        config = kernel.interpreter_config(call)
    if config is None:
        autotuner(kernel, call)[grid](*args, **meta)
        return
    kernel.check(config, call)
    blocks = kernel.constexprs(config, call)
    kernel.fn[grid(blocks)](*args, **meta, **blocks, **kernel.options(config, compiled))
