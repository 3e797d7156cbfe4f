"""Process-group set-up for every launcher: single process, torchrun, the deepspeed launcher, srun.

DeepSpeed does not read SLURM variables (it falls back to MPI discovery and fails without mpi4py),
so `map_launcher_env` translates them to the five torch.distributed variables first. On a machine
without a GPU we use gloo with DeepSpeed's CPU accelerator; with GPUs, nccl.
"""
from __future__ import annotations

import datetime
import importlib
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: str  # "cpu" or "cuda:N"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list ("n[1-3],m5" -> "n1"), via scontrol when present."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    m = re.match(r"([^,\[]+)(?:\[(\d+))?", nodelist)
    if not m:
        return nodelist
    return m.group(1) + (m.group(2) or "")


def map_launcher_env(env=os.environ) -> None:
    """Fill RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM, or for a single process."""
    if "RANK" not in env and "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    if "RANK" not in env:  # plain `python -m blade ...`: a world of one
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    env.setdefault("LOCAL_RANK", "0")


def free_port() -> int:
    """A TCP port that is free on this host right now (for a local rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_threads(threads_per_rank: int = 0) -> int:
    """One rank per core share: cores // local ranks, unless given (or OMP_NUM_THREADS is set)."""
    import torch

    if threads_per_rank <= 0:
        if "OMP_NUM_THREADS" in os.environ:
            threads_per_rank = int(os.environ["OMP_NUM_THREADS"])
        else:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE",
                                                                          os.environ.get("WORLD_SIZE", "1"))))
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
            threads_per_rank = max(1, (cores or 1) // max(1, local))
    torch.set_num_threads(threads_per_rank)
    return threads_per_rank


def init_deepspeed_distributed(timeout: datetime.timedelta, backend: str = "auto") -> None:
    """deepspeed.init_distributed with the CPU/gloo defaults that work (docs/deepspeed_cpu.md)."""
    import torch

    gpu = torch.cuda.is_available()
    if not gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        if not _have_compiler():
            # the shm op is JIT-built at init and only serves inference all-reduce; skip it without g++
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    if backend == "auto":
        backend = "nccl" if gpu else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)
    if gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _have_compiler() -> bool:
    from shutil import which

    return which(os.environ.get("CXX", "c++")) is not None or which("g++") is not None


def setup(timeout_s: int = 300, backend: str = "auto", threads_per_rank: int = 0) -> World:
    # DeepSpeed calls these deprecated collectives on every ZeRO step; one warning per call floods logs
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated")
    map_launcher_env()
    from blade.runtime.run_lock import die_with_launcher

    die_with_launcher()  # a killed torchrun leaves no rank writing into the run directory
    set_threads(threads_per_rank)
    init_deepspeed_distributed(datetime.timedelta(seconds=timeout_s), backend)
    import torch

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    return World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank, device)


# ----------------------------------------------------------------------------- small collectives
# The one set of helpers every module uses: each is a no-op in a world of one (or without a process
# group), and nccl gets its tensors on the GPU.


def rank_and_world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) when torch.distributed is not initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_reduce(t, op=None, group=None):
    """All-reduce a tensor in place on any backend (nccl wants it on the GPU); no-op alone."""
    import torch.distributed as dist

    if rank_and_world(group)[1] == 1:
        return t
    op = op or dist.ReduceOp.SUM
    if dist.get_backend(group) == "nccl" and not t.is_cuda:
        moved = t.cuda()
        dist.all_reduce(moved, op=op, group=group)
        t.copy_(moved.cpu())
    else:
        dist.all_reduce(t, op=op, group=group)
    return t


def all_gather(t, group=None):
    """Every rank's `t` (the same shape on every rank) stacked in rank order, [world, *t.shape], on every
    rank; t[None] alone. gloo gathers no bool tensors: pass integers."""
    import torch
    import torch.distributed as dist

    if rank_and_world(group)[1] == 1:
        return t[None]
    src = t.cuda() if dist.get_backend(group) == "nccl" and not t.is_cuda else t.contiguous()
    out = [torch.empty_like(src) for _ in range(rank_and_world(group)[1])]
    dist.all_gather(out, src, group=group)
    return torch.stack(out).to(t.device)


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums of a few Python numbers over the ranks, in float64 (one collective)."""
    import torch

    return all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()


def barrier() -> None:
    import torch.distributed as dist

    if rank_and_world()[1] > 1:
        dist.barrier()


def shutdown(exit_code: int = 0) -> None:
    """barrier, destroy, flush, os._exit: the only exit that never hits gloo's abort-at-exit."""
    import torch.distributed as dist

    try:
        if dist.is_initialized():
            if exit_code == 0:
                dist.barrier()
            dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
