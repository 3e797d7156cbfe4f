"""What `blade bench` (blade/bench/run.py) reads from the machine and the processes: device sync, barrier
and the reduction of one number over the ranks; the memory probe (CUDA allocator stats, or the process
RSS with the C allocator told to return freed memory for the CPU memory steps); the bytes of the tensors
an engine holds; the counter of collective ops; the device peak and the data loader alone; the load
average and the description of the machine and the code. What the report makes of them:
blade/bench/report.py.
"""
from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager

import torch

from blade.model import flops
from blade.runtime import malloc
from blade.runtime.dist import all_reduce, barrier, free_port, rank_and_world


def _cuda(device: str) -> bool:
    return device.startswith("cuda")


def device_sync(device: str) -> None:
    if _cuda(device):
        torch.cuda.synchronize()


def _reduce(value: float, op=None) -> float:
    """One float reduced over the ranks; on a device tensor under nccl (it takes no CPU tensors)."""
    return float(all_reduce(torch.tensor([value], dtype=torch.float64), op)[0])


def run_tool_on_ranks(script: str, world: int, args: list[str], tag: str, cwd: str):
    """Run `script --worker ARGS` on `world` local gloo ranks under torchrun (1 thread each) and return
    the JSON that its rank 0 printed after `TAG ` (the tools/bench_*.py pattern)."""
    import json
    import subprocess
    import sys


    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": cwd,
           "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                          f"--master_port={free_port()}", os.path.abspath(script), "--worker", *args],
                         capture_output=True, text=True, env=env, cwd=cwd)
    if out.returncode:
        sys.stderr.write(out.stderr[-3000:])
        raise SystemExit(f"{os.path.basename(script)}: {world} ranks failed (exit {out.returncode})")
    line = next(line for line in out.stdout.splitlines() if line.startswith(tag + " "))
    return json.loads(line[len(tag) + 1:])


def print_tool_result(table: str, rows: list, load_before: str, out: str | None) -> None:
    """Print a tool's markdown table with the machine load around it; optionally save the rows."""
    import json

    load_after = loadavg()
    print(table)
    print(f"\nload average before {load_before}, after {load_after}; {os.cpu_count()} cores, 1 thread per rank")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"rows": rows, "loadavg_before": load_before.split(), "loadavg_after": load_after.split()},
                      f, indent=1)


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


class MemoryProbe:
    """Bytes in use now and the peak since `reset()`: CUDA allocator stats, or the process RSS."""

    def __init__(self, device: str):
        self.cuda = _cuda(device)
        self.can_reset = self.cuda
        self.window_steps = 0
        self.allocator, self.steered = "", False
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.can_reset = True
            except OSError:
                self.can_reset = False

    def _allocator_note(self) -> str:
        """How the RSS was made to follow the live tensors, for the report."""
        if not self.steered:
            return (f"under {self.allocator}, which blade cannot tell to return freed memory: the RSS also "
                    "holds what it caches, and the step figure is a LOWER bound")
        if self.allocator == "tcmalloc":
            return "with tcmalloc decommitting freed pages at once (aggressive_memory_decommit) so that " \
                   "freed tensors leave the RSS"
        return "with glibc mallopt(M_MMAP_THRESHOLD=64 KiB) and malloc_trim so that freed tensors leave the RSS"

    @property
    def during_timing(self) -> bool:
        """CUDA allocator stats cost nothing, so the timed steps measure memory too; on the CPU the
        peak needs freed memory returned to the OS at once (below), which doubled the 100M model's step
        time under glibc (page faults on every fresh activation), so separate untimed steps measure it
        after the timing."""
        return self.cuda

    def open_cpu_window(self, steps: int) -> None:
        """From here on (the timing is over) the allocator returns what is freed (blade/runtime/malloc.py),
        so the RSS follows the live tensors."""
        self.window_steps = steps
        self.allocator = malloc.active_allocator()
        self.steered = malloc.return_freed_memory()

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def reset(self) -> int:
        """Start a peak window; returns the current bytes."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self.current()
        malloc.trim()  # freed heap pages leave the RSS; reusing them faults them in again (counted)
        if self.can_reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        return self.current()

    def peak(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated()
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return self.current()

    def note(self) -> str:
        state = ("state = bytes of the distinct tensors the strategy's engines hold between steps (weight "
                 "partitions, fp32 masters, AdamW moments, gradient buffers), counted tensor by tensor"
                 + ("; " if self.cuda else " and page by page (only pages in RAM; bench.json's "
                    "state_allocated_bytes adds untouched address space, which a GPU would allocate); "))
        if self.cuda:
            return state + ("step = max_memory_allocated during a step minus memory_allocated at its start "
                            "(median over the timed steps); peak = state + step.")
        return state + (f"step = peak resident set size (RSS) of the rank's process during {self.window_steps} "
                        "extra untimed step(s) per strategy after the timing (VmHWM, reset before each step"
                        + ("" if self.can_reset else "; NOT reset here: /proc/self/clear_refs was not writable")
                        + ") minus the RSS at its start (median over those steps), " + self._allocator_note()
                        + " (that allocation mode doubles the step time of the 100M model under glibc, hence "
                        "not during the timed steps); peak = state + step, one strategy's share of a process "
                        "that holds every strategy's trainer at once (above the interpreter and libraries).")


def resident_bytes(ptr: int, nbytes: int) -> int:
    """Bytes of [ptr, ptr + nbytes) that are in RAM (mincore): a CPU tensor allocated with torch.empty
    holds address space, not memory, until it is written. nbytes if the kernel cannot tell."""
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    start = ptr - ptr % page
    pages = (ptr + nbytes - start + page - 1) // page
    vec = (ctypes.c_ubyte * pages)()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        if libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(pages * page), vec) != 0:
            return nbytes
    except (OSError, AttributeError):
        return nbytes
    return min(nbytes, page * sum(v & 1 for v in vec))


def held_tensor_bytes(engine, max_depth: int = 3) -> tuple[int, int]:
    """(resident, allocated) bytes of the distinct tensor storages an engine keeps: its module's
    parameters (the ZeRO-3 partition, or the whole tensor below stage 3), their gradients and buffers,
    everything tensor-valued reachable from its optimizer wrapper (fp32 masters, flat low-precision
    buffers, gradient partitions and buckets) and the base optimizer's state (AdamW moments). Each
    storage counts once. On a GPU both numbers are the allocated bytes; on the CPU `resident` counts
    only the pages in RAM (DeepSpeed's 5e8-element gradient bucket is mostly untouched address space
    there, but real memory on a GPU)."""
    from blade.runtime.zero import base_optimizer, local_shards

    seen, total = set(), [0, 0]

    def add(t) -> None:
        if t is None or not isinstance(t, torch.Tensor) or t.is_meta:
            return
        storage = t.untyped_storage()
        key = (storage.data_ptr(), t.device)
        if storage.nbytes() and key not in seen:
            seen.add(key)
            total[1] += storage.nbytes()
            total[0] += (storage.nbytes() if t.device.type != "cpu"
                         else resident_bytes(storage.data_ptr(), storage.nbytes()))

    def visit(obj, depth: int) -> None:
        if isinstance(obj, torch.Tensor):
            add(obj)
        elif isinstance(obj, (list, tuple, set)):
            for x in obj:
                visit(x, depth)
        elif isinstance(obj, dict):
            for x in obj.values():
                visit(x, depth)
        elif depth < max_depth and hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, type)):
            for x in vars(obj).values():
                visit(x, depth + 1)

    for shard in local_shards(engine):
        add(shard)
    for p in engine.module.parameters():
        add(p.grad)
    for b in engine.module.buffers():
        add(b)
    visit(engine.optimizer, 0)
    for state in base_optimizer(engine).state.values():
        visit(state, 0)
    return total[0], total[1]


def _tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(y) for y in x)
    return 0


@contextmanager
def count_collectives():
    """Count every c10d collective op run inside (all-reduce, all-gather, reduce-scatter, broadcast,
    barrier, send/recv, ... whoever calls it: torch.distributed, DeepSpeed's stored function handles)
    and the bytes of the tensors handed to them. Yields a dict filled in on exit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found = {"ops": 0, "bytes": 0, "names": []}

    class _Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "c10d":
                found["ops"] += 1
                found["bytes"] += _tensor_bytes(list(args)) + _tensor_bytes(list((kwargs or {}).values()))
                found["names"].append(str(func.overloadpacket.__name__))
            return func(*args, **(kwargs or {}))

    with _Counter():
        yield found


def machine_info(device: str) -> dict:
    import deepspeed

    info = {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "python": platform.python_version(), "cores": os.cpu_count(), "platform": platform.platform()}
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
        info["cpu_bf16"] = "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    info["memory_bytes"] = mem
    info["malloc"] = malloc.active_allocator()
    if _cuda(device):
        name = torch.cuda.get_device_name()
        info["device_name"] = name
        info["description"] = (f"{torch.cuda.device_count()} x {name}, CPU {cpu}, {os.cpu_count()} cores, "
                               f"{mem / 2**30:.0f} GiB RAM")
    else:
        info["device_name"] = f"CPU ({cpu})"
        info["description"] = (f"{cpu}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB RAM, no GPU"
                               + (", AVX512-BF16" if info.get("cpu_bf16") else "")
                               + f", {info['malloc']} malloc")
    return info


def _git_describe() -> str:
    import subprocess

    from blade import ROOT

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (head or "unknown") + ("+uncommitted changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def measure_peak(precision: str, device: str) -> tuple[float, str]:
    """Every rank at once (so each gets its own share of the machine); the mean over ranks."""
    barrier()
    peak, how = flops.device_peak(precision)
    world = rank_and_world()[1]
    return _reduce(peak) / world, how


def measure_loader(trainer, min_seconds: float = 1.0, max_steps: int = 500) -> dict:
    """The training data path alone (read, decode, collate, to_micro_batch), all ranks at once."""
    from blade.data.reader import DataStream
    from blade.train.batch import to_micro_batch

    cfg, w = trainer.cfg, trainer.world
    t = cfg.train
    stream = DataStream(trainer.datasets["train"], t.seed + 7, cfg.data.shuffle, t.micro_batch_size, w.world_size,
                        w.rank, t.grad_accum, cfg.data.num_workers)
    for _ in range(2):  # start workers, warm the page cache
        [to_micro_batch(b, w.device) for b in stream.next_step()]
    barrier()
    tokens, steps, t0 = 0, 0, time.perf_counter()
    while steps < max_steps and time.perf_counter() - t0 < min_seconds:
        mbs = [to_micro_batch(b, w.device) for b in stream.next_step()]
        tokens += sum(int(mb.valid.sum()) for mb in mbs)
        steps += 1
    device_sync(w.device)
    rate = _reduce(tokens / (time.perf_counter() - t0))  # ranks load in parallel: the sum
    return {"tokens_per_s": rate, "steps": steps, "num_workers": cfg.data.num_workers}
