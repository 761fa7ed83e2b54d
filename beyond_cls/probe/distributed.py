"""Process-group setup for torchrun and Slurm ``srun`` launches, and the few collectives the trainer uses.

torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) win;
otherwise ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` are read and the master address is the
first host of ``SLURM_JOB_NODELIST``. NCCL on CUDA, gloo on the CPU. One process needs nothing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from beyond_cls.config import ConfigError
from beyond_cls.runtime import resolve_device

__all__ = ["DistEnv", "all_gather_objects", "all_reduce_sum", "first_slurm_host", "init_distributed"]


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,010],cpu01`` → ``gpu003``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _launch_env() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return _torchrun_env(env)
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" not in env:
            if not nodelist:
                raise ConfigError("Slurm launch without SLURM_JOB_NODELIST: set MASTER_ADDR")
            env["MASTER_ADDR"] = first_slurm_host(nodelist)
        # a port derived from the job id, so concurrent jobs on one node do not collide
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
        env["RANK"], env["WORLD_SIZE"] = str(rank), str(world)
        return rank, world, int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def _torchrun_env(env: Any) -> tuple[int, int, int]:
    """RANK / WORLD_SIZE / LOCAL_RANK, checked: a half-set environment (a shell's leftovers) would otherwise
    wait forever for peers that never come."""
    try:
        rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    except ValueError:
        raise ConfigError(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r}, "
                          f"LOCAL_RANK={env.get('LOCAL_RANK')!r}: expected integers") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} (LOCAL_RANK={local}) do not describe a process "
                          "of a launch: expected 0 <= RANK < WORLD_SIZE")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and k not in env]
    if missing:
        raise ConfigError(f"RANK={rank} and WORLD_SIZE={world} are set but {' and '.join(missing)} not: launch "
                          "with torchrun or srun, or unset RANK and WORLD_SIZE (left over from another job?)")
    return rank, world, local


def init_distributed(device_spec: str = "auto") -> DistEnv:
    """Join the process group of a torchrun or srun launch (a no-op for one process)."""
    rank, world, local_rank = _launch_env()
    if world == 1:
        return DistEnv(0, 1, 0, resolve_device(device_spec))
    if device_spec == "auto":
        device_spec = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device_spec == "cuda":
        device_spec = f"cuda:{local_rank}"
    device = resolve_device(device_spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
    return DistEnv(rank, world, local_rank, device)


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place (identity for one process)."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every process's ``obj`` in rank order (``[obj]`` for one process)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out
