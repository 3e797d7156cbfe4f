"""Run a function on N gloo ranks in fresh processes (the OLMo-core pattern, CPU only).

    results = run_distributed(fn, world_size=2, args=(x,))   # fn(rank, world_size, *args) -> picklable

`fn` must be importable (a module-level function in a test module). Each rank gets RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_ADDR/MASTER_PORT, one torch thread, DS_ACCELERATOR=cpu and an initialised gloo
process group (through deepspeed.init_distributed when `deepspeed=True`). An exception on any rank is
re-raised in the parent with that rank's traceback.
"""
from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from blade.runtime.dist import free_port  # noqa: F401 (tests import it from here)


def _worker(rank, world_size, port, fn, args, deepspeed, queue):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                      OMP_NUM_THREADS="1")
    try:
        import datetime

        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        timeout = datetime.timedelta(seconds=120)
        if deepspeed:
            from blade.runtime.dist import init_deepspeed_distributed

            init_deepspeed_distributed(timeout)
        else:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
        result = fn(rank, world_size, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - forwarded to the parent with its traceback
        queue.put((rank, False, traceback.format_exc()))
    queue.close()
    queue.join_thread()  # flush the result to the parent before the hard exit
    os._exit(0)  # skip interpreter teardown: avoids gloo's intermittent abort at exit


def run_distributed(fn, world_size: int = 2, args: tuple = (), deepspeed: bool = False,
                    timeout: float = 300.0) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, deepspeed, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        for _ in range(world_size):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = payload
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 30)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
