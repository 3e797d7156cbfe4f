"""`blade bench`: the throughput of every selection strategy on one model, one dataset and one machine,
measured in one launch (the same processes, the same machine state).

    launch/local.sh 2 --cmd bench -c configs/quickstart.yaml --strategies full,blade --steps 20

What happens on every rank:

1. the matmul peak of one rank's share of the device is measured (CPU; GPUs use the data-sheet
   table in blade/model/flops.py), the data loader is timed alone;
2. one Trainer per strategy is built from the same config, seed and data (so the same initial
   weights and batches); the first reference phase (blade: the first sync; rho1: its one-time
   training) and one step run right after each build, and the memory the trainer keeps is taken;
3. warm-up steps, then timed steps interleaved A B C D, B C D A, ... so that machine drift (other
   jobs, thermal state) falls on every strategy alike; every timed step starts after a barrier and
   ends after the device finished (CUDA: synchronize);
4. each strategy that re-syncs its reference (blade) times one real reference phase (score K pool
   batches with u and the outgoing w, sync, its checkpoint, K reference steps; the checkpoint is timed
   apart), and the sync is run once more under a counter of every collective op (torch dispatch of c10d
   ops, so nothing escapes it);
5. `--profile`: one more step per strategy under torch.profiler (blade/bench/profile.py);
   one real checkpoint save per other strategy is timed;
6. CPU only: `--memory-steps` untimed steps per strategy measure the peak memory (the
   definition: blade/bench/report.py).

Rank 0 then aggregates the ranks' numbers and writes bench.json, report.md and breakdown.png; the
definitions of every reported number are in blade/bench/report.py, the instruments (memory probe,
collective counter, device peak, loader timing) in blade/bench/probes.py.
"""
from __future__ import annotations

import datetime
import gc
import os
import shutil
import time

import torch
import torch.distributed as dist

from blade.bench.probes import (
    MemoryProbe,
    _cuda,
    _git_describe,
    barrier,
    count_collectives,
    device_sync,
    held_tensor_bytes,
    loadavg,
    machine_info,
    measure_loader,
    measure_peak,
)
from blade.bench.report import (
    StrategyRun,
    analytic_floor,
    check_targets,
    global_tokens_per_step,
    spread,
    summarize_strategy,
    write_outputs,
)
from blade.config import STRATEGIES
from blade.errors import BladeError
from blade.runtime.timing import REF_PHASES

ANCHOR = "ddp"  # the peer anchor's name in the rounds and in bench.json


def bench_overrides(strategy: str, run_dir: str) -> list[str]:
    """What the bench changes in the user's config for every strategy (documented in the report)."""
    return [f"selection.strategy={strategy}", f"run.dir={run_dir}", "logging.wandb=off",
            "logging.progress=false", "checkpoint.resume=none", "checkpoint.interval=0",
            "train.eval_interval=0", "selection.warmup_full_ce_steps=0"]


# ============================================================================ the run


def run_bench(config: str | None, overrides: list[str], world, strategies=STRATEGIES, warmup: int = 3,
              steps: int = 10, out: str = "runs/bench", measure_checkpoint: bool = True,
              command: str = "", say=print, memory_steps: int = 3, profile: bool = False,
              anchor: bool = False) -> dict | None:
    """Run on every rank (the world is set up); returns the result on rank 0 (None elsewhere)."""
    from blade.config import load_config
    from blade.train import schedule
    from blade.train.loop import Trainer

    if warmup < 1 or steps < 1:
        raise BladeError("bench needs --warmup >= 1 and --steps >= 1")
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise BladeError(f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)}")
    base = load_config(config, overrides)
    main = world.is_main
    load_before = loadavg()
    runs_dir = os.path.join(out, "runs")
    if main:
        shutil.rmtree(runs_dir, ignore_errors=True)
        os.makedirs(runs_dir, exist_ok=True)
    barrier()
    probe = MemoryProbe(world.device)
    precision = base.train.precision
    peak_start, how = measure_peak(precision, world.device)

    trainers, raw, steps_done = {}, {}, {}
    for name in strategies:
        cfg = load_config(config, list(overrides) + bench_overrides(name, os.path.join(runs_dir, name)))
        gc.collect()
        device_sync(world.device)
        before = probe.current()  # RSS / allocated: a cross-check of the tensor count below
        tr = Trainer(cfg, world)
        tr.timer.sync_cuda = _cuda(world.device)
        tr.timer.wait_phases = ("selection",)  # skew between ranks is booked as rank_wait
        run = StrategyRun(name)
        if schedule.reference_phase_before(cfg.selection, 0):
            run.first_phase_s = _timed(world.device, lambda: tr.stepper.reference_phase(0))
        tr.stepper.train_step(0)
        steps_done[name] = 1
        gc.collect()
        device_sync(world.device)
        run.state_growth_bytes = probe.current() - before
        held = [held_tensor_bytes(e) for e in tr.engines.by_name().values()]
        run.state_bytes, run.state_allocated_bytes = sum(h[0] for h in held), sum(h[1] for h in held)
        trainers[name], raw[name] = tr, run
        say(f"bench: built {name} (state {run.state_bytes / 2**20:.1f} MiB on rank {world.rank})")

    first = trainers[strategies[0]]
    ddp = None
    if anchor:  # the peer anchor, stepped in the same rounds (blade/bench/anchor.py)
        from blade.bench.anchor import DDPAnchor

        ddp = DDPAnchor(first.cfg, world.rank, world.device, first.datasets["train"].seq_len)
        raw[ANCHOR] = StrategyRun(ANCHOR)
    loader = measure_loader(first)
    say(f"bench: data loader alone {loader['tokens_per_s']:,.0f} tokens/s")

    order = list(strategies)
    timed = order + ([ANCHOR] if ddp else [])
    for _ in range(warmup - 1):
        for name in order:
            trainers[name].stepper.train_step(steps_done[name])
            steps_done[name] += 1
    for _ in range(warmup if ddp else 0):
        ddp.step()

    if "blade" in trainers:  # the sync under the collective counter, then one real reference phase
        from blade.train import engines

        tr, run = trainers["blade"], raw["blade"]
        barrier()
        with count_collectives() as found:  # before the phase: the phase re-syncs and trains w again
            engines.sync_reference(tr.engines.proxy, tr.engines.reference)
        run.sync_collectives = {"ops": found["ops"], "bytes": found["bytes"],
                                "names": sorted(set(found["names"]))}
        saves = []  # blade's checkpoint is the one its phase writes after w <- u: timed there, in place

        def save(step):
            try:
                saves.append(_timed(world.device, lambda: tr.save_checkpoint(step)))
            except Exception as e:  # noqa: BLE001 - reported, the timing of the rest stands
                run.checkpoint_error = f"{type(e).__name__}: {e}"
        phase_s = _timed(world.device, lambda: tr.stepper.reference_phase(steps_done["blade"],
                                                                           save=save if measure_checkpoint else None))
        run.ref_phase_s = phase_s - sum(saves)
        run.checkpoint_s = saves[0] if saves else None
        run.ref_phase_parts = {k: tr.timer.get(k) for k in REF_PHASES}
        say(f"bench: blade reference phase {run.ref_phase_s:.3f} s, sync collectives {found['ops']}")

    for r in range(steps):
        for name in timed[r % len(timed):] + timed[:r % len(timed)]:
            run = raw[name]
            device_sync(world.device)
            barrier()
            if probe.during_timing:
                start = probe.reset()
            t0 = time.perf_counter()
            if name == ANCHOR:
                ddp.step()
            else:
                record = trainers[name].stepper.train_step(steps_done[name])
            device_sync(world.device)
            run.step_s.append(time.perf_counter() - t0)
            if probe.during_timing:
                peak = probe.peak()
                run.step_peak_bytes.append(max(0, peak - start))
                run.process_peak_bytes = max(run.process_peak_bytes, peak)
            if name == ANCHOR:
                continue
            steps_done[name] += 1
            run.phases.append({k: v for k, v in record.items() if k.startswith("time_")})
            run.n_valid.append(record.get("n_valid", 0))
            run.n_selected.append(record.get("n_selected", 0))
            if "topk_rounds" in record:
                run.rounds.append(record["topk_rounds"])
            trainers[name].log.log(record)
        if main and (r + 1) % max(1, steps // 5) == 0:
            say(f"bench: {r + 1}/{steps} timed rounds")

    profiles = {}
    if profile:  # after the timing: the profiler's overhead never reaches a timed step
        from blade.bench.profile import profile_steps

        profiles = profile_steps(trainers, steps_done, out, main, world.device, device_sync, barrier)
        say(f"bench: profiled one step of {', '.join(trainers)} into {out}/profile/")

    if measure_checkpoint:
        for name in strategies:
            tr, run = trainers[name], raw[name]
            if run.checkpoint_s is not None or run.checkpoint_error:  # blade's: timed in its phase
                continue
            try:
                run.checkpoint_s = _timed(world.device, lambda: tr.save_checkpoint(steps_done[name]))
            except Exception as e:  # noqa: BLE001 - reported, the timing of the rest stands
                run.checkpoint_error = f"{type(e).__name__}: {e}"
    peak_end, _ = measure_peak(precision, world.device)
    if not probe.during_timing:  # CPU: the memory steps, after everything that is timed
        probe.open_cpu_window(memory_steps)
        for name in order:  # gradient buckets are touched page by page: take the state again
            held = [held_tensor_bytes(e) for e in trainers[name].engines.by_name().values()]
            raw[name].state_bytes = max(raw[name].state_bytes, sum(h[0] for h in held))
        for _ in range(memory_steps):
            for name in order:
                tr, run = trainers[name], raw[name]
                gc.collect()
                barrier()
                start = probe.reset()
                tr.stepper.train_step(steps_done[name])
                peak = probe.peak()
                run.step_peak_bytes.append(max(0, peak - start))
                run.process_peak_bytes = max(run.process_peak_bytes, peak)
                steps_done[name] += 1
    for tr in trainers.values():
        tr.log.close()

    gathered = [None] * world.world_size
    if dist.is_initialized() and world.world_size > 1:
        dist.all_gather_object(gathered, raw)
    else:
        gathered = [raw]
    barrier()
    if main and measure_checkpoint:
        for name in strategies:
            shutil.rmtree(os.path.join(runs_dir, name, "checkpoints"), ignore_errors=True)
    if not main:
        return None

    seq_len = first.datasets["train"].seq_len
    peak = max(peak_start, peak_end)  # the higher of the two readings: the conservative MFU
    result = {"meta": {}, "order": timed, "loader": loader, "max_rounds": _max_rounds(),
              "strategies": {}}
    for name in strategies:
        cfg = trainers[name].cfg
        result["strategies"][name] = summarize_strategy(name, [g[name] for g in gathered], cfg,
                                                        world.world_size, seq_len, peak)
    cfg = trainers[strategies[0]].cfg
    result["analytic_floor"] = analytic_floor(cfg, world.world_size, seq_len)
    t = cfg.train
    result["meta"] = {
        "command": command, "config": config or "(built-in defaults)", "overrides": list(overrides),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "git": _git_describe(),
        "machine": machine_info(world.device), "loadavg_before": load_before, "loadavg_after": loadavg(),
        "world_size": world.world_size, "threads_per_rank": torch.get_num_threads(),
        "zero_stage": cfg.deepspeed.zero_stage, "precision": precision,
        "ref_precision": cfg.selection.ref_precision, "micro_batch_size": t.micro_batch_size,
        "grad_accum": t.grad_accum, "seq_len": seq_len,
        "tokens_per_step": global_tokens_per_step(t.micro_batch_size, t.grad_accum, world.world_size, seq_len),
        "params": first.proxy.module.num_params(), "warmup": warmup, "steps": steps,
        "peak_flops": peak, "peak_flops_start": peak_start, "peak_flops_end": peak_end, "peak_how": how,
        "memory_note": probe.note(), "bench_overrides": bench_overrides("STRATEGY", "OUT/runs/STRATEGY"),
    }
    if ddp:
        times = [max(g[ANCHOR].step_s[i] for g in gathered) for i in range(len(raw[ANCHOR].step_s))]
        result["anchor"] = {"name": "plain torch DDP of blade's model and optimizer (blade/bench/anchor.py)",
                            "step_s": spread(times)}
    result["targets"] = check_targets(result)
    result["profile"] = profiles
    result["raw"] = {name: {"step_s": [max(g[name].step_s[i] for g in gathered)
                                       for i in range(len(raw[name].step_s))]} for name in strategies}
    write_outputs(result, out)
    return result


def _max_rounds() -> int:
    from blade.train.selection import MAX_ROUNDS

    return MAX_ROUNDS


def _timed(device: str, fn) -> float:
    device_sync(device)
    barrier()
    t0 = time.perf_counter()
    fn()
    device_sync(device)
    return time.perf_counter() - t0
