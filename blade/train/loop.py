"""The training loop: build a run, fit it, evaluate, checkpoint on schedule, stop when asked.

    for step in range(start, steps):
        if a reference phase is due (blade: W, W + tau, ...; rho1: W):
            reference_phase(step)        # scores its pool, w <- u, checkpoint (co-scheduled), K steps
        train_step(step)                 # one BLADE / RHO-1 / random / full step: blade/train/step.py
        diagnostics, eval every train.eval_interval, checkpoint every checkpoint.interval
        stop point: SIGTERM / SIGUSR1 / wall time agreed by all ranks -> checkpoint, exit 75

Fault tolerance (docs/checkpointing.md): complete checkpoints and bit-exact resume (blade/train/state.py
over blade/runtime/checkpoint.py), stops agreed at step boundaries (blade/runtime/preempt.py), and a
guard that skips steps with non-finite losses or gradients (in the step).
"""
from __future__ import annotations

import os
import sys

from blade.config import BladeConfig, config_to_dict, dump_config
from blade.data.paths import check_paths
from blade.data.mixture import open_dataset
from blade.data.reader import DataStream, eval_batches
from blade.errors import ConfigError, DataExhausted
from blade.runtime import checkpoint, faults, run_lock
from blade.runtime.dist import World, all_reduce_sum
from blade.runtime.metrics import MetricsLogger
from blade.runtime.preempt import Preempted, StopRequest
from blade.runtime.timing import PhaseTimer
from blade.train import engines, oracle, schedule, state
from blade.train.batch import to_micro_batch
from blade.train.diagnostics import SelectionDiagnostics
from blade.train.step import BladeStep, Counters, NonFiniteAbort


class _StopNow(Exception):
    """An agreed stop inside the reference phase or an evaluation (caught in fit)."""


class Trainer:
    def __init__(self, cfg: BladeConfig, world: World):
        self.cfg, self.world = cfg, world
        t, sel = cfg.train, cfg.selection
        check_paths(cfg)  # the data exists and fits the model and the strategy: refused before any engine
        oracle.check_config(cfg)  # selection.exact_interval: tractable models only
        self._lock_run_dir()  # one job per run directory
        self.datasets = {name: open_dataset(path, cfg.model.vocab_size, cfg.data.on_bad_shard)
                         for name, path in (("train", cfg.data.train), ("target", cfg.data.target),
                                            ("val", cfg.data.val)) if path}
        uses_reference = schedule.uses_reference(sel.strategy)
        if cfg.model.init_from:  # the data must be tokenized for the pretrained model's vocabulary
            from blade.interop.pretrained import check_data_compat

            for path in (*cfg.data.dirs("train"), *cfg.data.dirs("target"), *cfg.data.dirs("val")):
                check_data_compat(cfg.model.init_from, path)
        resume_path = state.resume_point(cfg, world, self.say)  # before the engines: refusals come fast

        def stream(name, seed, stop_when_exhausted=False):
            return DataStream(self.datasets[name], seed, cfg.data.shuffle, t.micro_batch_size,
                              world.world_size, world.rank, t.grad_accum, cfg.data.num_workers, stop_when_exhausted)

        self.streams = {"train": stream("train", t.seed, cfg.data.on_exhausted == "stop")}
        if uses_reference:  # the reference phase's own streams: D_val and pool batches
            self.streams.update(ref_target=stream("target", t.seed + 1), ref_pool=stream("train", t.seed + 2))
        self.engines = engines.Engines(cfg, world.world_size)
        self.counters = Counters()
        self.start_step, self.eval_pending = 0, None
        self.last_saved, self.last_path = None, None  # the newest checkpoint of this run's state
        self.stop = StopRequest(t.max_wall_time_s)
        self.timer = PhaseTimer()  # time_<phase>_s in the records; `blade bench` sets sync_cuda
        train = self.datasets["train"]
        self.diagnostics = SelectionDiagnostics(train.source_names, train.label_names, cfg.run.dir, world)
        self.log = MetricsLogger(cfg.run.dir, world.is_main, cfg.logging.wandb, cfg.logging.wandb_project,
                                 cfg.run.name or os.path.basename(os.path.normpath(cfg.run.dir)),
                                 config_to_dict(cfg), t.steps, cfg.logging.progress)
        exact = oracle.ExactOracle(cfg, world, self.datasets.get("target"), self.log)
        self.stepper = BladeStep(cfg, world, self.engines, self.streams, self.diagnostics, self.counters,
                                 self.timer, self.log, self.stop, self.check_stop, exact)
        saved = state.restore(self, resume_path) if resume_path else None
        if world.is_main:
            dump_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
            os.makedirs(checkpoint.root(cfg.run.dir), exist_ok=True)
        self.log.start()  # wandb, with the resumed run id; before the RNG states are set
        if saved:
            self.start_step = self.last_saved = saved["step"]
            self.last_path = resume_path
            checkpoint.set_rng_state(saved["rng"])  # last: nothing after this may draw random numbers

    def _lock_run_dir(self) -> None:
        """Rank 0 takes the run directory's lock; every rank learns the outcome (a collective)."""
        refused = ""
        if self.world.is_main:
            try:
                run_lock.acquire(self.cfg.run.dir)
            except ConfigError as e:
                refused = str(e)
            except OSError as e:  # an unwritable run.dir: refused on every rank, not on rank 0 alone
                refused = f"cannot lock run.dir {self.cfg.run.dir} ({e.strerror}): check that it is writable"
        if all_reduce_sum([float(bool(refused))])[0]:
            raise ConfigError(refused or f"run.dir {self.cfg.run.dir} is in use by another job (see rank 0)")

    def components(self) -> dict:
        """Everything stateful a checkpoint saves besides the engines' weights (blade/train/state.py)."""
        return {"loop": self, "counters": self.counters, "reference": self.engines, "phase": self.stepper.phase,
                "diagnostics": self.diagnostics, "metrics": self.log, "streams": self.streams,
                "data": self.datasets}

    def state_dict(self) -> dict:
        return {"eval_pending": self.eval_pending}  # a stop cut this evaluation: redo it first

    def load_state_dict(self, saved: dict) -> None:
        self.eval_pending = saved["eval_pending"]

    @property
    def proxy(self):
        return self.engines.proxy

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> float | None:
        """Mean loss per token of data.val (sum over tokens / global token count), logged and returned."""
        if "val" not in self.datasets:
            return None
        t, total = self.cfg.train, [0.0, 0.0]  # the same sequences on any world size (reader.eval_batches)
        for b, batch in enumerate(eval_batches(self.datasets["val"], t.micro_batch_size, self.world.world_size,
                                               self.world.rank, t.eval_sequences)):
            self.check_stop("eval_batch", step, b)
            mb = to_micro_batch(batch, self.world.device)
            lu = engines.per_token_loss(self.proxy, mb.inputs, mb.targets, grad=False)
            total[0] += float((lu * mb.valid).sum())
            total[1] += float(mb.valid.sum())
        loss_sum, count = all_reduce_sum(total)
        c = self.counters
        val_loss = loss_sum / max(count, 1)
        self.log.log({"kind": "eval", "step": step, "val_loss": val_loss,
                      "val_tokens": int(count), "tokens_seen": c.tokens_seen, "tokens_trained": c.tokens_trained})
        return val_loss

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg, finished, completed = self.cfg, False, self.cfg.train.steps
        self.stop.install()
        try:
            if self.eval_pending is not None:  # a stop interrupted this evaluation: finish it first
                self.evaluate(self.eval_pending)
                self.eval_pending = None
            for step in range(self.start_step, cfg.train.steps):
                try:
                    self.run_step(step)
                except DataExhausted as used_up:  # data.on_exhausted=stop: the run ends before this step
                    completed = step
                    self.log.log({"kind": "data_exhausted", "step": step, "message": str(used_up)})
                    if self.world.is_main:
                        print(f"step {step}: {used_up}", flush=True)
                    break
            self.save_checkpoint(completed)
            finished = True
        except _StopNow as stop:
            self.stopped(*stop.args)  # raises Preempted
        finally:
            self.stop.uninstall()
            if not finished:
                self.log.close()
        c = self.counters
        summary = {"kind": "summary", "step": completed - 1, "tokens_seen": c.tokens_seen,
                   "tokens_trained": c.tokens_trained, "nonfinite_skipped": c.nonfinite_skipped,
                   **self.diagnostics.totals()}
        self.log.log(summary)
        self.log.close()
        if self.world.is_main:
            print(format_summary(summary, self.log.first_last()), flush=True)
        return summary

    def run_step(self, step: int) -> None:
        cfg, twins = self.cfg, self.engines
        modules = {"proxy": twins.proxy.module, "reference": twins.reference and twins.reference.module}
        # a resume from a sync checkpoint finishes that phase first, even if selection.tau changed
        if schedule.reference_phase_before(cfg.selection, step) or self.stepper.phase.pending is not None:
            with faults.poisoned(modules, faults.point("ref_phase", step)):  # tests only
                self.stepper.reference_phase(step, save=self.save_checkpoint)  # saves after w <- u
        with faults.poisoned(modules, faults.point("train_step", step)):  # tests only
            record = self.stepper.train_step(step)
        if record["kind"] == "train":
            if twins.reference_ready and self.diagnostics.due(step, cfg):
                record["dist_u_w"] = engines.relative_distance(twins.proxy, twins.reference,
                                                               self.world.world_size)
            self.stop.note(step_s=record["step_time_s"])
        if self.diagnostics.due(step, cfg):
            self.log.log(self.diagnostics.flush(step))
        self.log.log(record)
        done, streak = step + 1, self.counters.nonfinite_streak
        if streak >= cfg.train.max_nonfinite_steps:
            path = self.save_checkpoint(done)
            raise NonFiniteAbort(f"{streak} non-finite steps in a row ({step - streak + 1}..{step}): "
                                 f"stopped; {path} holds the last good weights. Lower optim.lr, check the "
                                 "data, or raise train.max_nonfinite_steps")
        if cfg.train.eval_interval and (done % cfg.train.eval_interval == 0 or done == cfg.train.steps):
            self.evaluate(step)
        interval = cfg.checkpoint.interval
        phase_next = done < cfg.train.steps and schedule.reference_phase_before(cfg.selection, done)
        if interval and done % interval == 0 and not phase_next:  # else the phase's sync checkpoint
            self.save_checkpoint(done)
        self.check_stop("step_end", step)

    def check_stop(self, where: str, step: int, index: int | None = None) -> None:
        """A collective at a point every rank reaches: raise _StopNow if any rank wants to stop."""
        faults.point(where, step, *([] if index is None else [index]))
        reason = self.stop.agreed()
        if reason is not None:
            raise _StopNow(reason, where, step)

    def stopped(self, reason: str, where: str, step: int) -> None:
        """Checkpoint what can be resumed exactly, then raise Preempted (the CLI exits with 75)."""
        if where in ("step_end", "eval_batch"):  # step `step` is done; a cut evaluation is redone first
            self.eval_pending = step if where == "eval_batch" else None
            self.save_checkpoint(step + 1)
            completed = step + 1
        elif where == "ref_score":  # before the sync: the state before the phase (with w_prev) is saved
            self.stepper.unscore()
            self.save_checkpoint(step)
            completed = step
        else:  # after the sync: the partial phase is dropped, its sync checkpoint is the resume point
            completed = self.last_saved or 0
        self.log.log({"kind": "preempt", "step": completed - 1, "reason": reason, "where": where,
                      "checkpoint": self.last_path})
        where = self.last_path or "none yet: the run restarts from the beginning"
        raise Preempted(f"stopped ({reason}) after {completed} steps; resume point: {where}")

    def save_checkpoint(self, completed: int) -> str | None:
        """Checkpoint the state after `completed` steps (a collective), once per state."""
        if completed == 0 or completed == self.last_saved:  # step 0 is the seeded initial state
            return self.last_path
        seconds, self.last_path = state.save(self, completed)
        self.last_saved = completed
        self.stop.note(save_s=seconds)
        return self.last_path

    def say(self, message: str) -> None:
        if self.world.is_main:
            print(f"blade: {message}", file=sys.stderr, flush=True)


def format_summary(summary: dict, first_last: dict) -> str:
    lines = [f"done: {summary['step'] + 1} steps, {summary['tokens_seen']:,} tokens seen, "
             f"{summary['tokens_trained']:,} trained"]
    for key, (first, last) in first_last.items():
        lines.append(f"  {key}: {first:.4f} -> {last:.4f}")
    rates = {n: v["rate"] for n, v in summary.get("by_label", {}).items() if v["rate"] is not None}
    if len(rates) > 1:
        lines.append("  selected rate by label: " + ", ".join(f"{n} {r:.2f}" for n, r in rates.items()))
    return "\n".join(lines)
