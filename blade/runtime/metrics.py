"""Metrics sinks on rank 0: `<run.dir>/metrics.jsonl`, wandb (offline by default), a console progress line.

Every record carries `kind` ("train", "eval", "ref", "diag", "summary") and `step`.
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
import time


class MetricsLogger:
    """State: the wandb run id (a resumed run continues the same wandb run) and the first and latest
    headline losses. wandb starts with start() (the Trainer calls it after a resume loaded the id)."""

    def __init__(self, run_dir: str, enabled: bool, wandb_mode: str = "off", project: str = "blade",
                 run_name: str | None = None, config: dict | None = None, total_steps: int = 0,
                 progress: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        self.progress = progress and enabled
        self.wandb_id = secrets.token_hex(4)  # os.urandom: draws nothing from the seeded RNGs
        self._file = None
        self._wandb = None
        self._wandb_args = (run_dir, wandb_mode, project, run_name, config) if wandb_mode != "off" else None
        self._t0 = time.time()
        self._first_last: dict[str, list[float]] = {}
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self._file = open(os.path.join(run_dir, "metrics.jsonl"), "a", buffering=1)

    def state_dict(self) -> dict:
        return {"wandb_id": self.wandb_id, "first_last": self._first_last}

    def load_state_dict(self, state: dict) -> None:
        self.wandb_id = state["wandb_id"]
        self._first_last.update(state["first_last"])

    def start(self) -> None:
        """Open the wandb run (once; the first record opens it otherwise)."""
        if self.enabled and self._wandb is None and self._wandb_args is not None:
            self._wandb = _start_wandb(*self._wandb_args, run_id=self.wandb_id)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(_jsonable(record)) + "\n")
        for key in ("loss_all_tokens", "val_loss"):
            if key in record:
                self._first_last.setdefault(key, [record[key], record[key]])[1] = record[key]
        self.start()
        if self._wandb is not None:
            flat = {f"{record['kind']}/{k}": v for k, v in record.items()
                    if k not in ("kind", "step") and isinstance(v, (int, float))}
            self._wandb.log(flat, step=record["step"])
        if self.progress and record["kind"] == "train":
            self._progress(record)
        elif self.progress and record["kind"] == "eval":
            print(f"\n  eval step {record['step']}: val_loss {record['val_loss']:.4f}", file=sys.stderr)

    def _progress(self, r: dict) -> None:
        done = r["step"] + 1
        rate = r["tokens_seen"] / max(1e-9, time.time() - self._t0)
        eta = (time.time() - self._t0) / done * (self.total_steps - done)
        line = (f"step {done}/{self.total_steps} | loss {r['loss']:.4f} | kept {r['kept_fraction']:.2f}"
                f" | {rate:,.0f} tok/s | eta {eta:4.0f}s")
        end = "\r" if sys.stderr.isatty() and done < self.total_steps else "\n"
        if end == "\r" or done % max(1, self.total_steps // 20) == 0 or done == self.total_steps:
            print(line, file=sys.stderr, end=end, flush=True)

    def first_last(self) -> dict[str, list[float]]:
        """First and latest value of the headline losses (for the end-of-run summary)."""
        return self._first_last

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


def _start_wandb(run_dir: str, mode: str, project: str, name: str | None, config: dict | None,
                 run_id: str | None = None):
    """run_id: continue that wandb run (a resumed training run keeps the id in its checkpoint)."""
    import wandb

    return wandb.init(project=project, name=name, dir=run_dir, mode=mode, config=config, id=run_id,
                      resume="allow" if run_id else None, settings=wandb.Settings(silent=True))


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them visible instead of breaking the file
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
