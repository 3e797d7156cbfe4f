"""One step of the proxy, and the reference phase: Algorithm 1 of docs/algorithm.md, top to bottom.

    before steps W, W + tau, ...  reference_phase(): score K pool batches with u and the outgoing w,
                                  w <- u (local shards), the sync checkpoint (without w: it is u),
                                  K steps of CE(w; b_val) + lam * masked CE(w; b_tr)
    every step                    train_step(): b ~ D_tr (one Frank-Wolfe block = the global batch)
                                  l_u = proxy per-token CE;  l_w = reference per-token CE (no grad)
                                  mask = exact global top-ceil(gamma * n_valid) of s = l_u - l_w
                                  loss = sum(mask * l_u) / sum(mask) over the global batch; proxy step

The exact top-k, the Frank-Wolfe weights and the loss scaling are blade/train/selection.py; the
engines and the sync are blade/train/engines.py. Checkpoints, evaluation and stops are the loop's
(blade/train/loop.py).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch

from blade.errors import BladeError
from blade.model.transformer import IGNORE_INDEX
from blade.runtime import zero
from blade.runtime.dist import all_reduce_sum
from blade.runtime.timing import REF_PHASES, STEP_PHASES
from blade.train import engines, schedule, selection
from blade.train.batch import MicroBatch, to_micro_batch
from blade.train.pending_phase import PendingPhase, PhaseCheckpoint


@dataclass
class Counters:
    """Run totals that go into every train record and every checkpoint."""
    tokens_seen: int = 0
    tokens_trained: int = 0
    nonfinite_skipped: int = 0   # steps skipped for non-finite losses or gradients
    nonfinite_streak: int = 0    # ... of them in a row, up to now
    ref_nonfinite_skipped: int = 0  # reference steps and pool batches skipped for non-finite losses

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class NonFiniteAbort(BladeError):
    """A non-finite loss or gradient that cannot be skipped, or too many skipped steps in a row."""


class BladeStep:
    """The proxy step and the reference phase of one run (full, random, rho1 or blade).

    `check_stop(where, step, index)` is the loop's stop point: the reference phase calls it before
    every pool batch and reference step, so that a preemption never waits for a whole phase."""

    def __init__(self, cfg, world, twins: engines.Engines, streams: dict, diagnostics, counters: Counters,
                 timer, log, stop, check_stop, oracle):
        self.cfg, self.sel, self.world = cfg, cfg.selection, world
        self.twins, self.streams, self.diagnostics, self.counters = twins, streams, diagnostics, counters
        self.oracle = oracle  # blade/train/oracle.py: the exact bi-level choice, every exact_interval steps
        self.timer, self.log, self.stop, self.check_stop = timer, log, stop, check_stop
        self.scored = schedule.uses_reference(self.sel.strategy)  # rho1 / blade score with l(u) - l(w)
        self.phase = PhaseCheckpoint()  # a checkpoint component: the phase a sync checkpoint is inside
        self.before_scoring = None

    # ------------------------------------------------------------------ per-token losses
    def micro_batches(self, stream: str) -> list[MicroBatch]:
        return self.on_device(self.streams[stream].next_step())

    def on_device(self, batches: list[dict]) -> list[MicroBatch]:
        return [to_micro_batch(b, self.world.device) for b in batches]

    def per_token_loss(self, engine, mb: MicroBatch, grad: bool, train_mode: bool = False) -> torch.Tensor:
        return engines.per_token_loss(engine, mb.inputs, mb.targets, grad, train_mode)

    def score_forwards(self, mbs: list[MicroBatch]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The reference's and the proxy's per-token losses of every micro-batch. The reference runs
        first, so its temporaries never meet the proxy's graph. The proxy scores its batch as it
        trains on it (train mode); without accumulation that forward keeps its graph and is reused
        for the update, with accumulation the update re-forwards one micro-batch at a time (the price
        of an exact top-k over all micro-batches at the memory of one)."""
        keep_graph = len(mbs) == 1
        with self.timer("reference_forward"):
            ref = [self.per_token_loss(self.twins.reference, mb, grad=False) for mb in mbs]
        with self.timer("proxy_forward"):
            proxy = [self.per_token_loss(self.twins.proxy, mb, grad=keep_graph, train_mode=True) for mb in mbs]
        return proxy, ref

    def scores(self, mbs: list[MicroBatch], proxy_losses: list[torch.Tensor],
               ref: list[torch.Tensor] | None = None) -> torch.Tensor:
        """s = l(u) - l(w) per token, [M, B*T]; invalid positions are masked out by the caller."""
        if ref is None:
            ref = [self.per_token_loss(self.twins.reference, mb, grad=False) for mb in mbs]
        return torch.stack([(lu.detach().float() - lw.float()).flatten() for lu, lw in zip(proxy_losses, ref)])

    # ------------------------------------------------------------------ one proxy step
    def train_step(self, step: int) -> dict:
        cfg, sel, proxy, timer = self.cfg, self.sel, self.twins.proxy, self.timer
        t0 = time.perf_counter()
        timer.reset()
        with timer("data_wait"):
            mbs = self.micro_batches("train")
        valid = torch.stack([mb.valid.flatten() for mb in mbs])
        selecting = schedule.selecting(sel, step)
        proxy.train()

        # the Frank-Wolfe oracle: the exact top-k of the global batch (or the baselines' choice)
        stats, score, losses = None, None, None
        if selecting and self.scored:  # rho1 / blade: score every micro-batch, then select over all
            losses, ref_losses = self.score_forwards(mbs)
            masks = [mb.valid for mb in mbs]
            n_bad, n_bad_ref, n_valid = all_reduce_sum([_non_finite(losses, masks), _non_finite(ref_losses, masks),
                                                        float(valid.sum())])
            if n_bad or n_bad_ref:  # the same decision on every rank, before any backward
                which = f"{int(n_bad)} non-finite token losses" if n_bad else \
                    f"{int(n_bad_ref)} non-finite reference token losses"
                return self.skip_step(step, int(n_valid), t0, which)
            with timer("reference_forward"):
                score = self.scores(mbs, losses, ref_losses)
            with timer("selection"):
                mask, stats = selection.select_by_score(score, valid, sel.gamma, tie_seed=(cfg.train.seed, step))
        else:  # full, random, warm-up: the mask needs no losses, the training forward is the only one
            n_valid = all_reduce_sum([float(valid.sum())])[0]
            mask = valid
            if selecting:
                with timer("selection"):
                    mask, stats = selection.select_random(valid, sel.gamma, cfg.train.seed, step)
        weights = selection.frank_wolfe_weights(mask, valid, sel.gamma, sel.eta if selecting else 1.0)
        self.oracle.measure(step, proxy, mbs, mask, score)  # against the exact choice, when due (off: 0 cost)

        # the proxy update on sum(weights * l_u) / sum(weights) over the global batch
        total_weight, n_selected = all_reduce_sum([float(weights.sum()), float(mask.sum())])
        local = [0.0, 0.0]  # sum(w * l), sum(l) over valid tokens: the logged losses
        trained, grad_norm = [], None
        for m, mb in enumerate(mbs):
            with timer("proxy_forward"):
                reuse = losses is not None and losses[m].requires_grad  # the scoring forward kept its graph
                lu = losses[m] if reuse else self.per_token_loss(proxy, mb, grad=True)
            if not reuse:  # a forward no check has seen yet: check it before its backward
                n_bad = all_reduce_sum([_non_finite([lu], [mb.valid])])[0]
                if n_bad and m == 0:
                    return self.skip_step(step, int(n_valid), t0, f"{int(n_bad)} non-finite token losses")
                if n_bad:
                    raise NonFiniteAbort(f"step {step}: non-finite token losses in micro-batch {m}, after "
                                         "gradients of the earlier ones were accumulated; resume from the "
                                         "newest checkpoint with a lower optim.lr")
            trained.append(lu.detach())
            w = weights[m].view_as(lu)
            loss, = selection.masked_mean_loss_scale([lu], [w], total_weight, self.world.world_size)
            with timer("backward"):
                proxy.backward(loss, scale_wrt_gas=False)
            if m == len(mbs) - 1 and not zero.reports_grad_norm(proxy):
                grad_norm = self.own_grad_norm(step)
            with timer("optimizer_step"):
                proxy.step()
            local[0] += float((lu.detach() * w).sum())
            local[1] += float((lu.detach() * mb.valid).sum())
        trained_loss, all_loss = all_reduce_sum(local)
        grad_norm = proxy.get_global_grad_norm() if grad_norm is None else grad_norm
        if getattr(proxy.optimizer, "overflow", False):  # DeepSpeed skipped it: non-finite grad norm
            return self.skip_step(step, int(n_valid), t0, "non-finite gradient norm")
        if grad_norm is not None and not math.isfinite(_float(grad_norm)):
            raise NonFiniteAbort(f"step {step}: a non-finite gradient was applied (this DeepSpeed setup does "
                                 "not skip such steps; with ZeRO-1/2 and bf16 set deepspeed.extra.bf16."
                                 "check_grad_overflow=true); resume from the newest checkpoint")
        if selecting or sel.strategy == "full":  # warm-up steps would blur the rates
            proxy_loss = torch.stack([lu.float().flatten() for lu in (losses or trained)])
            self.diagnostics.observe(step, mask, mbs, cfg, proxy_loss, score)

        c = self.counters
        c.nonfinite_streak = 0
        c.tokens_seen += int(n_valid)
        c.tokens_trained += int(n_selected)
        record = {
            "kind": "train", "step": step,
            "loss": trained_loss / max(total_weight, 1e-12),   # mean over the tokens trained on
            "loss_all_tokens": all_loss / max(n_valid, 1),      # proxy loss over the whole batch
            "lr": engines.lr_at(cfg, step), "grad_norm": _float(grad_norm),
            "tokens_seen": c.tokens_seen, "tokens_trained": c.tokens_trained,
            "n_valid": int(n_valid), "n_selected": int(n_selected),
            "kept_fraction": n_selected / max(n_valid, 1),
            **timer.record(STEP_PHASES), "step_time_s": time.perf_counter() - t0,
            "data_skipped_sequences": self.streams["train"].ds.skipped_sequences,
            **({"data_mix": self.streams["train"].shares()} if isinstance(cfg.data.train, dict) else {}),
            "nonfinite_skipped": c.nonfinite_skipped,
        }
        if stats is not None:
            record.update(topk_rounds=stats.rounds, score_threshold=stats.threshold)
        if selecting and self.scored:
            record["score_mean"] = self.diagnostics.last_score_mean
        return record

    def own_grad_norm(self, step: int) -> float:
        """ZeRO stage 0 in fp32: DeepSpeed keeps no gradient norm and cannot skip a step, so blade
        computes the norm before the step and stops before applying a non-finite one."""
        norm = zero.grad_norm(self.twins.proxy)
        if not math.isfinite(norm):
            raise NonFiniteAbort(f"step {step}: non-finite gradient norm; ZeRO stage 0 in fp32 cannot skip a "
                                 "step, so the run stops before applying it: resume from the newest "
                                 "checkpoint with a lower optim.lr, or use ZeRO >= 1 or bf16")
        return norm

    def skip_step(self, step: int, n_valid: int, t0: float, why: str) -> dict:
        """A step without an update on any rank: its batch is consumed and the LR schedule advances
        (it follows the step index), the weights and optimizer moments stay as they were."""
        proxy, c = self.twins.proxy, self.counters
        if proxy.lr_scheduler is not None:
            proxy.lr_scheduler.step()  # DeepSpeed does not step it for a skipped update
        c.nonfinite_skipped += 1
        c.nonfinite_streak += 1
        c.tokens_seen += n_valid
        return {"kind": "skip", "step": step, "reason": why, "lr": engines.lr_at(self.cfg, step),
                "n_valid": n_valid, "tokens_seen": c.tokens_seen, "tokens_trained": c.tokens_trained,
                "nonfinite_skipped": c.nonfinite_skipped, "nonfinite_streak": c.nonfinite_streak,
                "step_time_s": time.perf_counter() - t0}

    # ------------------------------------------------------------------ the reference
    def reference_phase(self, step: int, save=None) -> None:
        """Score the pool against w_prev, sync w <- u, `save(step)` (the loop's checkpoint: the
        reference is u again and is left out of it, blade/train/pending_phase.py), then K steps of
        CE(w; b_val) + lam * masked CE(w; b_tr); then w is frozen. A phase resumed from that checkpoint
        skips to the sync with the saved masks.

        rho1 trains once, from the current proxy, on the target set alone (lam = 0)."""
        sel, twins, timer, t0 = self.sel, self.twins, self.timer, time.perf_counter()
        timer.reset()
        rho1 = sel.strategy == "rho1"
        k_steps = sel.rho1_ref_steps if rho1 else sel.k_ref_steps
        pending = self.phase.pending
        if pending is None:  # masks from the selection rule against the outgoing reference w_prev
            pool, masks = self.score_pool(step, k_steps) if not rho1 else ([], [])
        else:  # resumed from this phase's checkpoint: the same pool batches, the saved masks
            assert pending.step == step, (pending.step, step)
            pool, masks = [], []
            if not rho1:
                self.streams["ref_pool"].seek(pending.pool_start)
                pool = [self.streams["ref_pool"].next_step() for _ in range(k_steps)]
                masks = [pending.masks_for(batches) for batches in pool]
        with timer("sync"):
            engines.sync_reference(twins.proxy, twins.reference)
        if pending is None and save is not None:
            self.phase.pending = self.pending_phase(step, pool, masks)
            save(step)
        # the proxy's scheduled LR, constant over the phase; past the proxy's warm-up, which a fresh
        # optimizer does not share (a sync at step 0 would otherwise train w at lr / warmup_steps)
        lr = engines.lr_at(self.cfg, max(step, self.cfg.optim.warmup_steps))
        engines.set_lr(twins.reference, lr)
        twins.reference.train()
        ref_loss = float("nan")
        for k in range(k_steps):
            self.check_stop("ref_step", step, k)
            t_step = time.perf_counter()
            targets = self.micro_batches("ref_target")
            with timer("ref_train"):
                ref_loss = self.reference_step(targets, None if rho1 else self.on_device(pool[k]),
                                               None if rho1 else masks[k].to(self.world.device))
            self.stop.note(step_s=time.perf_counter() - t_step)
        twins.freeze_reference()
        self.phase.pending = None
        self.log.log({"kind": "ref", "step": step, "strategy": sel.strategy, "ref_steps": k_steps,
                      "ref_lr": lr, "ref_final_loss": ref_loss,
                      "ref_nonfinite_skipped": self.counters.ref_nonfinite_skipped, **timer.record(REF_PHASES),
                      "ref_phase_time_s": time.perf_counter() - t0})

    def score_pool(self, step: int, k_steps: int) -> tuple[list[list[dict]], list[torch.Tensor]]:
        """The phase's K pool batches (kept on the host) and their masks. What the scoring changes (the
        pool stream, the skip counter) is noted first: a stop inside it saves the state before the
        phase (`unscore`)."""
        self.before_scoring = (self.streams["ref_pool"].position, self.counters.ref_nonfinite_skipped)
        pool, masks = [], []
        for k in range(k_steps):
            self.check_stop("ref_score", step, k)
            pool.append(self.streams["ref_pool"].next_step())
            mask = self.pool_mask(self.on_device(pool[-1]), tie_seed=(self.cfg.train.seed + 2, step * k_steps + k))
            masks.append(mask.cpu())
        return pool, masks

    def unscore(self) -> None:
        """Back to the state before the phase's scoring (a stop came inside it)."""
        position, self.counters.ref_nonfinite_skipped = self.before_scoring
        self.streams["ref_pool"].seek(position)

    def pending_phase(self, step: int, pool: list[list[dict]], masks: list[torch.Tensor]) -> PendingPhase:
        if not pool:  # rho1: no pool term
            return PendingPhase(step, None, None, None)
        positions = torch.cat([b["position"] for batches in pool for b in batches])
        rows = torch.cat([m.view(positions.numel() // len(pool), -1) for m in masks])
        return PendingPhase(step, self.before_scoring[0], positions, rows)

    def pool_mask(self, mbs: list[MicroBatch], tie_seed: tuple[int, int]) -> torch.Tensor:
        """The reference's mask on a pool batch: the top-gamma of l(u) - l(w_prev); every valid token
        at the first sync (no w_prev yet); none when a score is non-finite (counted)."""
        valid = torch.stack([mb.valid.flatten() for mb in mbs])
        if not self.twins.reference_ready:
            return valid
        with self.timer("ref_score"):
            score = self.scores(mbs, [self.per_token_loss(self.twins.proxy, mb, grad=False) for mb in mbs])
            if all_reduce_sum([_non_finite([score], [valid])])[0]:
                self.counters.ref_nonfinite_skipped += 1
                return torch.zeros_like(valid)  # unscorable: this batch adds no pool term
            return selection.select_by_score(score, valid, self.sel.gamma, tie_seed=tie_seed)[0]

    def reference_step(self, targets: list[MicroBatch], pool: list[MicroBatch] | None,
                       masks: torch.Tensor | None) -> float:
        """One reference optimizer step; val and pool sequences go through one forward together.
        A non-finite loss on any rank skips the step everywhere (counted in ref_nonfinite_skipped);
        returns the step's loss (NaN when skipped)."""
        lam, reference = self.sel.lam, self.twins.reference
        n_val = sum(float(mb.valid.sum()) for mb in targets)
        n_pool = float(masks.sum()) if pool is not None else 0.0
        n_val, n_pool = all_reduce_sum([n_val, n_pool])
        logged = 0.0
        for m, mb in enumerate(targets):
            w = mb.valid.float() / max(n_val, 1.0)
            inputs, tgts = mb.inputs, mb.targets
            if pool is not None and n_pool > 0 and lam > 0:
                inputs = torch.cat([inputs, pool[m].inputs])
                tgts = torch.cat([tgts, pool[m].targets])
                w = torch.cat([w, lam * masks[m].view_as(pool[m].targets).float() / n_pool])
            lw = reference(inputs, tgts)
            if all_reduce_sum([_non_finite([lw], [tgts != IGNORE_INDEX])])[0]:
                if m > 0:  # earlier micro-batches' gradients are accumulated: no clean way back
                    raise NonFiniteAbort(f"non-finite reference loss in micro-batch {m} of a reference step "
                                         "with gradient accumulation; lower optim.lr or check data.target")
                self.counters.ref_nonfinite_skipped += 1
                return float("nan")
            loss, = selection.masked_mean_loss_scale([lw], [w], 1.0, self.world.world_size)
            reference.backward(loss, scale_wrt_gas=False)
            reference.step()
            logged += float((lw.detach() * w).sum())
        return all_reduce_sum([logged])[0]


def _non_finite(values: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    """This rank's positions inside `masks` whose value (a loss, a score) is NaN or infinite."""
    return sum(float((~torch.isfinite(v.detach()) & m.view_as(v)).sum()) for v, m in zip(values, masks))


def _float(x) -> float:
    if x is None:
        return float("nan")
    return float(x.item() if torch.is_tensor(x) else x)
