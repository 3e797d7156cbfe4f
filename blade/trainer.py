"""The training loop. It reads like the algorithm in BLADE.md:

    for t in steps:
        if blade and t is a sync step:  reference_phase()   # score K pool batches with u, w_prev;
                                                             # w <- u (local shards); K steps of w; freeze
        b ~ D_tr                                             # this step's global batch = one FW block
        l_u = proxy per-token CE (graph kept);  l_w = reference per-token CE (no grad)
        mask = exact global top-ceil(gamma * n_valid) of l_u - l_w   (all ranks, all micro-batches)
        loss = sum(mask * l_u) / sum(mask) over the global batch;  proxy step
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import engines, selection
from .config import BladeConfig, config_to_dict, dump_config
from .data import DataStream, ShardDataset, eval_batches
from .diagnostics import SelectionDiagnostics
from .dist import World
from .errors import ConfigError
from .metrics import MetricsLogger

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


def all_reduce_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


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
        self.tokens_seen = 0
        self.tokens_trained = 0
        self.diagnostics = SelectionDiagnostics(self.train_ds.source_names, self.train_ds.label_names,
                                                cfg.run.dir, world)
        self.log = MetricsLogger(cfg.run.dir, world.is_main, cfg.logging.wandb, cfg.logging.wandb_project,
                                 cfg.run.name or os.path.basename(os.path.normpath(cfg.run.dir)),
                                 config_to_dict(cfg), t.steps, cfg.logging.progress)
        if world.is_main:
            dump_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
            os.makedirs(os.path.join(cfg.run.dir, "checkpoints"), exist_ok=True)

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

    def scores(self, mbs: list[MicroBatch], proxy_losses: list[torch.Tensor]) -> torch.Tensor:
        """s = l(u) - l(w) per token, [M, B*T]; invalid positions are masked out by the caller."""
        ref = [self.per_token_loss(self.reference, mb, grad=False) for mb in mbs]
        return torch.stack([(lu.detach().float() - lw.float()).flatten() for lu, lw in zip(proxy_losses, ref)])

    # ------------------------------------------------------------------ one proxy step
    def train_step(self, step: int) -> dict:
        cfg, sel = self.cfg, self.cfg.selection
        t0 = time.perf_counter()
        mbs = [to_micro_batch(b, self.world.device) for b in self.train_stream.next_step()]
        t_data = time.perf_counter() - t0
        valid = torch.stack([mb.valid.flatten() for mb in mbs])
        keep_graph = len(mbs) == 1  # with accumulation, score first (no grad) and recompute to train
        self.proxy.train()
        losses = [self.per_token_loss(self.proxy, mb, grad=keep_graph) for mb in mbs]

        stats, score, t_ref = None, None, 0.0
        t1 = time.perf_counter()
        if not self.selecting(step):
            mask = valid
        elif sel.strategy == "random":
            mask, stats = selection.select_random(valid, sel.gamma, cfg.train.seed, step)
        else:
            score = self.scores(mbs, losses)
            t_ref = time.perf_counter() - t1
            mask, stats = selection.select_by_score(score, valid, sel.gamma)
        t_select = time.perf_counter() - t1 - t_ref
        if self.selecting(step) or sel.strategy == "full":  # warm-up steps would blur the rates
            self.diagnostics.observe(step, mask, mbs, cfg, score)
        weights = selection.frank_wolfe_weights(mask, valid, sel.gamma, sel.eta if self.selecting(step) else 1.0)

        total_weight, n_valid, n_selected = all_reduce_sum(
            [float(weights.sum()), float(valid.sum()), float(mask.sum())])
        local = [0.0, 0.0]  # sum(w * l), sum(l) over valid tokens: the logged losses
        for m, mb in enumerate(mbs):
            lu = losses[m] if keep_graph else self.per_token_loss(self.proxy, mb, grad=True)
            w = weights[m].view_as(lu)
            loss, = selection.masked_mean_loss_scale([lu], [w], total_weight, self.world.world_size)
            self.proxy.backward(loss, scale_wrt_gas=False)
            self.proxy.step()
            local[0] += float((lu.detach() * w).sum())
            local[1] += float((lu.detach() * mb.valid).sum())
        trained_loss, all_loss = all_reduce_sum(local)

        self.tokens_seen += int(n_valid)
        self.tokens_trained += int(n_selected)
        record = {
            "kind": "train", "step": step,
            "loss": trained_loss / max(total_weight, 1e-12),   # mean over the tokens trained on
            "loss_all_tokens": all_loss / max(n_valid, 1),      # proxy loss over the whole batch
            "lr": engines.lr_at(cfg, step), "grad_norm": _float(self.proxy.get_global_grad_norm()),
            "tokens_seen": self.tokens_seen, "tokens_trained": self.tokens_trained,
            "n_valid": int(n_valid), "n_selected": int(n_selected),
            "kept_fraction": n_selected / max(n_valid, 1),
            "data_time_s": t_data, "ref_forward_time_s": t_ref, "selection_time_s": t_select,
            "step_time_s": time.perf_counter() - t0,
            "data_skipped_sequences": self.train_ds.skipped_sequences,
        }
        if stats is not None:
            record.update(topk_rounds=stats.rounds, score_threshold=stats.threshold)
        if self.selecting(step) and sel.strategy in ("rho1", "blade"):
            record["score_mean"] = self.diagnostics.last_score_mean
        return record

    # ------------------------------------------------------------------ the reference
    def reference_phase(self, step: int) -> None:
        """Sync w <- u, then K steps of CE(w; b_val) + lam * masked CE(w; b_tr); then w is frozen.

        rho1 trains once, from the current proxy, on the target set alone (lam = 0)."""
        sel, t0 = self.cfg.selection, time.perf_counter()
        rho1 = sel.strategy == "rho1"
        k_steps = sel.rho1_ref_steps if rho1 else sel.k_ref_steps
        pool, masks = [], []
        if not rho1:  # masks come from the selection rule against the outgoing reference w_prev
            for _ in range(k_steps):
                mbs = [to_micro_batch(b, self.world.device) for b in self.ref_pool_stream.next_step()]
                valid = torch.stack([mb.valid.flatten() for mb in mbs])
                if self.reference_ready:
                    lu = [self.per_token_loss(self.proxy, mb, grad=False) for mb in mbs]
                    mask, _ = selection.select_by_score(self.scores(mbs, lu), valid, sel.gamma)
                else:
                    mask = valid  # first sync: no previous reference, all ones
                pool.append(mbs)
                masks.append(mask)
        t_sync = time.perf_counter()
        engines.sync_reference(self.proxy, self.reference)
        t_sync = time.perf_counter() - t_sync
        lr = engines.lr_at(self.cfg, step)  # the proxy's current LR, constant over the phase
        engines.set_lr(self.reference, lr)
        self.reference.train()
        ref_loss = float("nan")
        for k in range(k_steps):
            targets = [to_micro_batch(b, self.world.device) for b in self.ref_target_stream.next_step()]
            ref_loss = self.reference_step(targets, None if rho1 else pool[k], None if rho1 else masks[k])
        self.reference.eval()
        self.reference_ready = True
        self.log.log({"kind": "ref", "step": step, "strategy": sel.strategy, "ref_steps": k_steps,
                      "ref_lr": lr, "ref_final_loss": ref_loss, "sync_time_s": t_sync,
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
        for batch in eval_batches(self.val_ds, t.micro_batch_size, self.world.world_size,
                                  self.world.rank, t.eval_batches):
            mb = to_micro_batch(batch, self.world.device)
            lu = self.per_token_loss(self.proxy, mb, grad=False)
            total[0] += float((lu * mb.valid).sum())
            total[1] += float(mb.valid.sum())
        loss_sum, count = all_reduce_sum(total)
        self.log.log({"kind": "eval", "step": step, "val_loss": loss_sum / max(count, 1),
                      "val_tokens": int(count), "tokens_seen": self.tokens_seen})

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        for step in range(cfg.train.steps):
            if self.needs_reference_phase(step):
                self.reference_phase(step)
            record = self.train_step(step)
            if self.reference is not None and self.reference_ready and self.diagnostics.due(step, cfg):
                record["dist_u_w"] = engines.relative_distance(self.proxy, self.reference,
                                                               self.world.world_size)
            if self.diagnostics.due(step, cfg):
                self.log.log(self.diagnostics.flush(step))
            self.log.log(record)
            last = step == cfg.train.steps - 1
            if cfg.train.eval_interval and ((step + 1) % cfg.train.eval_interval == 0 or last):
                self.evaluate(step)
        summary = {"kind": "summary", "step": cfg.train.steps - 1, "tokens_seen": self.tokens_seen,
                   "tokens_trained": self.tokens_trained, **self.diagnostics.totals()}
        self.log.log(summary)
        self.log.close()
        if self.world.is_main:
            print(format_summary(summary, self.log.first_last()), flush=True)
        return summary


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
