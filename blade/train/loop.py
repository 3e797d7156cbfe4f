"""The training loop. It reads like the algorithm in BLADE.md:

    for t in steps:
        if blade and t is a sync step:  reference_phase()   # score K pool batches with u, w_prev;
                                                             # w <- u (local shards); K steps of w; freeze
        b ~ D_tr                                             # this step's global batch = one FW block
        l_u = proxy per-token CE (graph kept);  l_w = reference per-token CE (no grad)
        mask = exact global top-ceil(gamma * n_valid) of l_u - l_w   (all ranks, all micro-batches)
        loss = sum(mask * l_u) / sum(mask) over the global batch;  proxy step
        checkpoint every checkpoint.interval steps, before every sync, at the end and on a stop request

Fault tolerance (docs/checkpointing.md): complete checkpoints and bit-exact resume (blade/checkpoint.py),
SIGTERM/SIGUSR1/wall-time stops agreed by all ranks at step boundaries (blade/preempt.py), and a guard
that skips steps with non-finite losses or gradients.
"""
from __future__ import annotations

import math
import os
import secrets
import sys
import time
from dataclasses import dataclass

import torch

from blade.config import BladeConfig, config_to_dict, dump_config
from blade.data.reader import DataStream, ShardDataset, eval_batches
from blade.errors import BladeError, ConfigError
from blade.runtime import checkpoint, faults
from blade.runtime.dist import World, all_reduce
from blade.runtime.metrics import MetricsLogger
from blade.runtime.preempt import Preempted, StopRequest
from blade.runtime.timing import REF_PHASES, STEP_PHASES, PhaseTimer
from blade.train import engines, selection
from blade.train import state as resume
from blade.train.diagnostics import SelectionDiagnostics

IGNORE = -100


@dataclass
class MicroBatch:
    inputs: torch.Tensor    # [B, T] token ids
    targets: torch.Tensor   # [B, T] next-token ids, IGNORE where not trained on
    sources: torch.Tensor   # [B, T] source id of each target
    labels: torch.Tensor    # [B, T] noise label of each target (0 = none)

    @property
    def valid(self) -> torch.Tensor:
        return self.targets != IGNORE


def to_micro_batch(batch: dict, device: str) -> MicroBatch:
    tokens = batch["tokens"].to(device)
    targets = tokens[:, 1:].clone()
    targets[~batch["valid"].to(device)] = IGNORE  # a skipped (corrupt) sample trains nothing
    return MicroBatch(tokens[:, :-1], targets, batch["sources"][:, 1:].to(device),
                      batch["labels"][:, 1:].to(device))


class NonFiniteAbort(BladeError):
    """Too many non-finite steps in a row: the run stops after checkpointing the last good weights."""


class _StopNow(Exception):
    """An agreed stop inside the reference phase or an evaluation (caught in fit)."""


def all_reduce_sum(values: list[float]) -> list[float]:
    return all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()


class Trainer:
    def __init__(self, cfg: BladeConfig, world: World):
        self.cfg, self.world = cfg, world
        t, sel = cfg.train, cfg.selection
        on_bad = cfg.data.on_bad_shard
        self.train_ds = ShardDataset(cfg.data.train, cfg.model.vocab_size, on_bad)
        self.target_ds = ShardDataset(cfg.data.target, cfg.model.vocab_size, on_bad) if cfg.data.target else None
        self.val_ds = ShardDataset(cfg.data.val, cfg.model.vocab_size, on_bad) if cfg.data.val else None
        if self.train_ds.seq_len > cfg.model.max_seq_len:
            raise ConfigError(f"config error: the data's seq_len {self.train_ds.seq_len} exceeds "
                              f"model.max_seq_len {cfg.model.max_seq_len}; raise model.max_seq_len")
        if sel.strategy in ("rho1", "blade") and self.target_ds is None:
            raise ConfigError(f"config error: selection.strategy={sel.strategy} needs data.target "
                              "(the target set the reference trains on)")
        self.uses_reference = sel.strategy in ("rho1", "blade")
        if cfg.model.init_from:  # the data must be tokenized for the pretrained model's vocabulary
            from blade.interop.pretrained import check_data_compat

            for path in filter(None, (cfg.data.train, cfg.data.target, cfg.data.val)):
                check_data_compat(cfg.model.init_from, path)
        resume_path = resume.resume_point(self)  # before the engines: refusals come fast

        def stream(ds, seed):
            return DataStream(ds, seed, cfg.data.shuffle, t.micro_batch_size, world.world_size,
                              world.rank, t.grad_accum, cfg.data.num_workers)

        self.train_stream = stream(self.train_ds, t.seed)
        if self.uses_reference:  # the reference phase's own streams: D_val and pool batches
            self.ref_target_stream = stream(self.target_ds, t.seed + 1)
            self.ref_pool_stream = stream(self.train_ds, t.seed + 2)

        # Same seed => identical initial weights; same config => identical partitioning.
        self.proxy = engines.build_engine(cfg, world.world_size, t.seed, schedule=True)
        self.reference = None
        if self.uses_reference:
            bf16 = True if sel.ref_precision == "bf16" else None
            self.reference = engines.build_engine(cfg, world.world_size, t.seed, schedule=False,
                                                  bf16=bf16, offload_params=sel.ref_offload)
        self.reference_ready = False  # becomes True once w has been trained (first sync / rho1)
        self.last_sync_step = None
        self.tokens_seen = self.tokens_trained = 0
        self.nonfinite_skipped = self.nonfinite_streak = 0
        self.start_step, self.eval_pending = 0, None
        self.last_saved, self.last_path = None, None  # the newest checkpoint of this run's state
        self.stop = StopRequest(t.max_wall_time_s)
        self.timer = PhaseTimer()  # time_<phase>_s in the records; `blade bench` sets sync_cuda
        self.diagnostics = SelectionDiagnostics(self.train_ds.source_names, self.train_ds.label_names,
                                                cfg.run.dir, world)
        saved = resume.restore(self, resume_path) if resume_path else None
        self.wandb_id = saved["wandb_id"] if saved else secrets.token_hex(4)  # os.urandom: no RNG draw
        self.log = MetricsLogger(cfg.run.dir, world.is_main, cfg.logging.wandb, cfg.logging.wandb_project,
                                 cfg.run.name or os.path.basename(os.path.normpath(cfg.run.dir)),
                                 config_to_dict(cfg), t.steps, cfg.logging.progress, wandb_id=self.wandb_id)
        if world.is_main:
            dump_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
            os.makedirs(checkpoint.root(cfg.run.dir), exist_ok=True)
        if saved:
            self.log.first_last().update(saved.get("first_last", {}))
            checkpoint.set_rng_state(self._saved_rng)  # last: nothing after this may draw random numbers

    # ------------------------------------------------------------------ schedule
    def selecting(self, step: int) -> bool:
        return self.cfg.selection.strategy != "full" and step >= self.cfg.selection.warmup_full_ce_steps

    def needs_reference_phase(self, step: int) -> bool:
        sel = self.cfg.selection
        if not self.uses_reference or step < sel.warmup_full_ce_steps:
            return False
        since = step - sel.warmup_full_ce_steps
        if sel.strategy == "rho1":
            return since == 0  # static reference: trained once, never re-synced
        return since % sel.tau == 0

    # ------------------------------------------------------------------ per-token losses
    def per_token_loss(self, engine, mb: MicroBatch, grad: bool) -> torch.Tensor:
        if grad:
            return engine(mb.inputs, mb.targets)
        was_training = engine.module.training
        engine.eval()
        with torch.no_grad():
            loss = engine(mb.inputs, mb.targets)
        engine.train(was_training)
        engines.drop_gathered(engine)
        return loss

    def scores(self, mbs: list[MicroBatch], proxy_losses: list[torch.Tensor],
               ref: list[torch.Tensor] | None = None) -> torch.Tensor:
        """s = l(u) - l(w) per token, [M, B*T]; invalid positions are masked out by the caller."""
        if ref is None:
            ref = [self.per_token_loss(self.reference, mb, grad=False) for mb in mbs]
        return torch.stack([(lu.detach().float() - lw.float()).flatten() for lu, lw in zip(proxy_losses, ref)])

    # ------------------------------------------------------------------ one proxy step
    def train_step(self, step: int) -> dict:
        cfg, sel = self.cfg, self.cfg.selection
        t0 = time.perf_counter()
        self.timer.reset()
        with self.timer("data_wait"):
            mbs = [to_micro_batch(b, self.world.device) for b in self.train_stream.next_step()]
        valid = torch.stack([mb.valid.flatten() for mb in mbs])
        keep_graph = len(mbs) == 1  # with accumulation, score first (no grad) and recompute to train
        self.proxy.train()
        ref_losses = None  # the reference forward first, so its temporaries never meet the proxy's graph
        if self.selecting(step) and sel.strategy in ("rho1", "blade"):
            with self.timer("reference_forward"):
                ref_losses = [self.per_token_loss(self.reference, mb, grad=False) for mb in mbs]
        with self.timer("proxy_forward"):
            losses = [self.per_token_loss(self.proxy, mb, grad=keep_graph) for mb in mbs]
        poison = faults.point("train_step", step)
        if "nan_loss" in poison:
            losses = [lu * float("nan") for lu in losses]
        bad = sum(float((~torch.isfinite(lu.detach()) & mb.valid).sum()) for lu, mb in zip(losses, mbs))
        n_bad, n_valid = all_reduce_sum([bad, float(valid.sum())])
        if n_bad:  # the same decision on every rank, before any backward: no update anywhere
            return self.skip_step(step, int(n_valid), t0, f"{int(n_bad)} non-finite token losses")

        stats, score = None, None
        if not self.selecting(step):
            mask = valid
        elif sel.strategy == "random":
            with self.timer("selection"):
                mask, stats = selection.select_random(valid, sel.gamma, cfg.train.seed, step)
        else:
            with self.timer("reference_forward"):
                score = self.scores(mbs, losses, ref_losses)
            with self.timer("selection"):
                mask, stats = selection.select_by_score(score, valid, sel.gamma)
        if self.selecting(step) or sel.strategy == "full":  # warm-up steps would blur the rates
            proxy_loss = torch.stack([lu.detach().float().flatten() for lu in losses])
            self.diagnostics.observe(step, mask, mbs, cfg, proxy_loss, score)
        weights = selection.frank_wolfe_weights(mask, valid, sel.gamma, sel.eta if self.selecting(step) else 1.0)

        total_weight, n_selected = all_reduce_sum([float(weights.sum()), float(mask.sum())])
        local = [0.0, 0.0]  # sum(w * l), sum(l) over valid tokens: the logged losses
        for m, mb in enumerate(mbs):
            with self.timer("proxy_forward"):
                lu = losses[m] if keep_graph else self.per_token_loss(self.proxy, mb, grad=True)
            w = weights[m].view_as(lu)
            loss, = selection.masked_mean_loss_scale([lu], [w], total_weight, self.world.world_size)
            if "nan_grad" in poison:
                loss = faults.nan_grad(loss)
            with self.timer("backward"):
                self.proxy.backward(loss, scale_wrt_gas=False)
            with self.timer("optimizer_step"):
                self.proxy.step()
            local[0] += float((lu.detach() * w).sum())
            local[1] += float((lu.detach() * mb.valid).sum())
        trained_loss, all_loss = all_reduce_sum(local)
        grad_norm = self.proxy.get_global_grad_norm()
        if getattr(self.proxy.optimizer, "overflow", False):  # DeepSpeed skipped it: non-finite grad norm
            return self.skip_step(step, int(n_valid), t0, "non-finite gradient norm")
        if grad_norm is not None and not math.isfinite(_float(grad_norm)):
            raise NonFiniteAbort(f"step {step}: a non-finite gradient was applied (this DeepSpeed setup does "
                                 "not skip such steps; with ZeRO-1/2 and bf16 set deepspeed.extra.bf16."
                                 f"check_grad_overflow=true); resume from {self.last_path or 'the start'}")

        self.nonfinite_streak = 0
        self.tokens_seen += int(n_valid)
        self.tokens_trained += int(n_selected)
        record = {
            "kind": "train", "step": step,
            "loss": trained_loss / max(total_weight, 1e-12),   # mean over the tokens trained on
            "loss_all_tokens": all_loss / max(n_valid, 1),      # proxy loss over the whole batch
            "lr": engines.lr_at(cfg, step), "grad_norm": _float(grad_norm),
            "tokens_seen": self.tokens_seen, "tokens_trained": self.tokens_trained,
            "n_valid": int(n_valid), "n_selected": int(n_selected),
            "kept_fraction": n_selected / max(n_valid, 1),
            **self.timer.record(STEP_PHASES), "step_time_s": time.perf_counter() - t0,
            "data_skipped_sequences": self.train_ds.skipped_sequences,
            "nonfinite_skipped": self.nonfinite_skipped,
        }
        if stats is not None:
            record.update(topk_rounds=stats.rounds, score_threshold=stats.threshold)
        if self.selecting(step) and sel.strategy in ("rho1", "blade"):
            record["score_mean"] = self.diagnostics.last_score_mean
        return record

    def skip_step(self, step: int, n_valid: int, t0: float, why: str) -> dict:
        """A step without an update on any rank: its batch is consumed and the LR schedule advances
        (it follows the step index), the weights and optimizer moments stay as they were."""
        if self.proxy.lr_scheduler is not None:
            self.proxy.lr_scheduler.step()  # DeepSpeed does not step it for a skipped update
        self.nonfinite_skipped += 1
        self.nonfinite_streak += 1
        self.tokens_seen += n_valid
        return {"kind": "skip", "step": step, "reason": why, "lr": engines.lr_at(self.cfg, step),
                "n_valid": n_valid, "tokens_seen": self.tokens_seen, "tokens_trained": self.tokens_trained,
                "nonfinite_skipped": self.nonfinite_skipped, "nonfinite_streak": self.nonfinite_streak,
                "step_time_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ the reference
    def reference_phase(self, step: int) -> None:
        """Sync w <- u, then K steps of CE(w; b_val) + lam * masked CE(w; b_tr); then w is frozen.

        rho1 trains once, from the current proxy, on the target set alone (lam = 0)."""
        sel, t0 = self.cfg.selection, time.perf_counter()
        self.timer.reset()
        rho1 = sel.strategy == "rho1"
        k_steps = sel.rho1_ref_steps if rho1 else sel.k_ref_steps
        pool, masks = [], []
        if not rho1:  # masks come from the selection rule against the outgoing reference w_prev
            for k in range(k_steps):
                self.check_stop("ref_score", step, k)
                mbs = [to_micro_batch(b, self.world.device) for b in self.ref_pool_stream.next_step()]
                valid = torch.stack([mb.valid.flatten() for mb in mbs])
                if self.reference_ready:
                    with self.timer("ref_score"):
                        lu = [self.per_token_loss(self.proxy, mb, grad=False) for mb in mbs]
                        mask, _ = selection.select_by_score(self.scores(mbs, lu), valid, sel.gamma)
                else:
                    mask = valid  # first sync: no previous reference, all ones
                pool.append(mbs)
                masks.append(mask)
        with self.timer("sync"):
            engines.sync_reference(self.proxy, self.reference)
        # the proxy's scheduled LR, constant over the phase; past the proxy's warm-up, which a fresh
        # optimizer does not share (a sync at step 0 would otherwise train w at lr / warmup_steps)
        lr = engines.lr_at(self.cfg, max(step, self.cfg.optim.warmup_steps))
        engines.set_lr(self.reference, lr)
        self.reference.train()
        ref_loss = float("nan")
        for k in range(k_steps):
            self.check_stop("ref_step", step, k)
            t_step = time.perf_counter()
            targets = [to_micro_batch(b, self.world.device) for b in self.ref_target_stream.next_step()]
            with self.timer("ref_train"):
                ref_loss = self.reference_step(targets, None if rho1 else pool[k], None if rho1 else masks[k])
            self.stop.note(step_s=time.perf_counter() - t_step)
        self.reference.eval()
        self.reference_ready, self.last_sync_step = True, step
        self.log.log({"kind": "ref", "step": step, "strategy": sel.strategy, "ref_steps": k_steps,
                      "ref_lr": lr, "ref_final_loss": ref_loss, **self.timer.record(REF_PHASES),
                      "ref_phase_time_s": time.perf_counter() - t0})

    def reference_step(self, targets: list[MicroBatch], pool: list[MicroBatch] | None,
                       masks: torch.Tensor | None) -> float:
        """One reference optimizer step; val and pool sequences go through one forward together."""
        lam = self.cfg.selection.lam
        n_val = sum(float(mb.valid.sum()) for mb in targets)
        n_pool = float(masks.sum()) if pool is not None else 0.0
        n_val, n_pool = all_reduce_sum([n_val, n_pool])
        logged = 0.0
        for m, mb in enumerate(targets):
            w = mb.valid.float() / max(n_val, 1.0)
            inputs, tgts = mb.inputs, mb.targets
            if pool is not None and n_pool > 0:
                inputs = torch.cat([inputs, pool[m].inputs])
                tgts = torch.cat([tgts, pool[m].targets])
                w = torch.cat([w, lam * masks[m].view_as(pool[m].targets).float() / n_pool])
            lw = self.reference(inputs, tgts)
            loss, = selection.masked_mean_loss_scale([lw], [w], 1.0, self.world.world_size)
            self.reference.backward(loss, scale_wrt_gas=False)
            self.reference.step()
            logged += float((lw.detach() * w).sum())
        return all_reduce_sum([logged])[0]

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, step: int) -> None:
        if self.val_ds is None:
            return
        t, total = self.cfg.train, [0.0, 0.0]
        for b, batch in enumerate(eval_batches(self.val_ds, t.micro_batch_size, self.world.world_size,
                                               self.world.rank, t.eval_batches)):
            self.check_stop("eval_batch", step, b)
            mb = to_micro_batch(batch, self.world.device)
            lu = self.per_token_loss(self.proxy, mb, grad=False)
            total[0] += float((lu * mb.valid).sum())
            total[1] += float(mb.valid.sum())
        loss_sum, count = all_reduce_sum(total)
        self.log.log({"kind": "eval", "step": step, "val_loss": loss_sum / max(count, 1),
                      "val_tokens": int(count), "tokens_seen": self.tokens_seen,
                      "tokens_trained": self.tokens_trained})

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg, finished = self.cfg, False
        self.stop.install()
        try:
            if self.eval_pending is not None:  # a stop interrupted this evaluation: finish it first
                self.evaluate(self.eval_pending)
                self.eval_pending = None
            for step in range(self.start_step, cfg.train.steps):
                self.run_step(step)
            self.save_checkpoint(cfg.train.steps)
            finished = True
        except _StopNow as stop:
            self.stopped(*stop.args)  # raises Preempted
        finally:
            self.stop.uninstall()
            if not finished:
                self.log.close()
        summary = {"kind": "summary", "step": cfg.train.steps - 1, "tokens_seen": self.tokens_seen,
                   "tokens_trained": self.tokens_trained, "nonfinite_skipped": self.nonfinite_skipped,
                   **self.diagnostics.totals()}
        self.log.log(summary)
        self.log.close()
        if self.world.is_main:
            print(format_summary(summary, self.log.first_last()), flush=True)
        return summary

    def run_step(self, step: int) -> None:
        cfg = self.cfg
        if self.needs_reference_phase(step):
            self.save_checkpoint(step)  # co-scheduled with the sync: the state before w <- u
            self.reference_phase(step)
        record = self.train_step(step)
        if record["kind"] == "train":
            if self.reference is not None and self.reference_ready and self.diagnostics.due(step, cfg):
                record["dist_u_w"] = engines.relative_distance(self.proxy, self.reference,
                                                               self.world.world_size)
            self.stop.note(step_s=record["step_time_s"])
        if self.diagnostics.due(step, cfg):
            self.log.log(self.diagnostics.flush(step))
        self.log.log(record)
        done = step + 1
        if self.nonfinite_streak >= cfg.train.max_nonfinite_steps:
            first = step - self.nonfinite_streak + 1
            path = self.save_checkpoint(done)
            raise NonFiniteAbort(f"{self.nonfinite_streak} non-finite steps in a row ({first}..{step}): "
                                 f"stopped; {path} holds the last good weights. Lower optim.lr, check the "
                                 "data, or raise train.max_nonfinite_steps")
        if cfg.train.eval_interval and (done % cfg.train.eval_interval == 0 or done == cfg.train.steps):
            self.evaluate(step)
        interval = cfg.checkpoint.interval
        if interval and done % interval == 0:
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
        else:  # inside the reference phase: its partial work is dropped, the checkpoint before it stays
            completed = self.last_saved or 0
        self.log.log({"kind": "preempt", "step": completed - 1, "reason": reason, "where": where,
                      "checkpoint": self.last_path})
        raise Preempted(reason, completed, self.last_path)

    # ------------------------------------------------------------------ checkpoints
    def engines(self) -> dict:
        return resume.engines(self)  # {"proxy": ..., "reference": ...}

    def save_checkpoint(self, completed: int) -> str | None:
        """Checkpoint the state after `completed` steps (a collective), once per state; see resume.py."""
        if completed == 0 or completed == self.last_saved:  # step 0 is the seeded initial state
            return self.last_path
        seconds, self.last_path = resume.save(self, completed)
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


def _float(x) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if torch.is_tensor(x) else x)


def n_sync_steps(cfg: BladeConfig) -> int:
    sel = cfg.selection
    if sel.strategy != "blade":
        return int(sel.strategy == "rho1")
    return math.ceil(max(0, cfg.train.steps - sel.warmup_full_ce_steps) / sel.tau)
