"""`blade bench --profile`: one extra step of each benchmarked strategy under torch.profiler, after the
timed steps (so the profiler's overhead never touches the timings).

Every rank runs the profiled step (the step has collectives); rank 0 writes, into OUT/profile/:

    STRATEGY_trace.json     Chrome / Perfetto trace of the step (chrome://tracing, ui.perfetto.dev)
    STRATEGY_top_ops.txt    torch's table of operators sorted by self CPU time (and by self device time
                            on a GPU)

and returns the top operators for bench.json and the report. Self time is the time spent in an
operator itself, not in the operators it calls: the table says where the step's time goes.
"""
from __future__ import annotations

import os

TOP_ROWS = 25      # rows of the written table
TOP_IN_REPORT = 8  # operators in bench.json / report.md


def profile_steps(trainers: dict, steps_done: dict, out: str, main: bool, device: str,
                  device_sync, barrier) -> dict:
    """Profile one train_step of every trainer (in order); advances `steps_done`. Returns, on rank 0,
    {strategy: {"trace", "table", "step_s", "top_ops": [{"name", "self_cpu_s", "calls"}, ...]}}."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    folder = os.path.join(out, "profile")
    if main:
        os.makedirs(folder, exist_ok=True)
    found = {}
    for name, tr in trainers.items():
        device_sync(device)
        barrier()
        with profile(activities=activities) as prof:
            tr.stepper.train_step(steps_done[name])
            device_sync(device)
        steps_done[name] += 1
        if not main:
            continue
        trace = os.path.join(folder, f"{name}_trace.json")
        prof.export_chrome_trace(trace)
        averages = prof.key_averages()
        tables = [averages.table(sort_by="self_cpu_time_total", row_limit=TOP_ROWS)]
        if cuda:
            tables.append(averages.table(sort_by="self_device_time_total", row_limit=TOP_ROWS))
        table = os.path.join(folder, f"{name}_top_ops.txt")
        with open(table, "w") as f:
            f.write(f"blade bench --profile: one {name} step, operators by self CPU time\n\n")
            f.write("\n\n".join(tables) + "\n")
        ranked = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)
        total_us = sum(e.self_cpu_time_total for e in averages)
        found[name] = {
            "trace": trace, "table": table, "self_cpu_total_s": total_us / 1e6,
            "top_ops": [{"name": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
                        for e in ranked[:TOP_IN_REPORT]]}
    return found


def render_profile(profiles: dict) -> list[str]:
    """The report's "Profile" section: the top operators of each profiled step."""
    if not profiles:
        return []
    lines = ["", "## Profile (one extra step each, after the timing; `--profile`)", ""]
    for name, p in profiles.items():
        lines += [f"**{name}**: trace `{os.path.basename(p['trace'])}`, table "
                  f"`{os.path.basename(p['table'])}` in `profile/`; self CPU time of all operators "
                  f"{p['self_cpu_total_s']:.3f} s (rank 0).", "",
                  "| operator | self CPU s | share | calls |", "|---|---|---|---|"]
        for op in p["top_ops"]:
            share = op["self_cpu_s"] / p["self_cpu_total_s"] if p["self_cpu_total_s"] else 0.0
            lines.append(f"| `{op['name']}` | {op['self_cpu_s']:.4f} | {100 * share:.1f} % | {op['calls']} |")
        lines.append("")
    return lines
