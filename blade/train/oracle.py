"""The exact one-step bi-level choice on a tractable model, and how close each strategy's choice comes.

Every `selection.exact_interval` selecting steps, on the step's global batch B (k = ceil(gamma n_valid)
tokens kept) and the proxy weights theta before their update:

    g_T      = grad L_T(theta)           L_T: mean CE of a fixed target batch (the first
                                         selection.exact_target_sequences sequences of data.target)
    o_i      = g_i . g_T                 first-order bi-level score of token i, g_i = grad l_i(theta):
                                         -lr o_i is the linearised change of L_T by a gradient step on i
                                         alone; the top-k of o is the Frank-Wolfe oracle of the exact
                                         objective (the best set of k to first order)
    dL_T(S)  = L_T(theta'_S) - L_T(theta)  theta'_S: the AdamW step the engine would take on the set S

and the record compares, for the same batch and the same proxy state: each strategy's scores with o
(Spearman, precision@k of its set against the oracle set) and each set's dL_T with the oracle set's.
The sets: the oracle's, the run's own (its actual mask), random (select_random's keys for this step),
loss (the top-k proxy loss: the reference-free score) and full. A blade run has no static reference,
so rho1's scores are measured in rho1 runs and vice versa (docs/algorithm.md, "The exact oracle").

The trial step is the engine's AdamW step (its moments, step count, scheduled lr, the weight decay of
each parameter's group, gradient clipping, eta's Frank-Wolfe weights), not an SGD step: the question is
which tokens help the target *in this training run*, and the AdamW step is what the run takes; a plain
SGD step at the AdamW lr moves the weights by lr * |g| instead of ~lr per coordinate and would only
confirm the linearisation that o already is. The first-order prediction is logged next to it
(`fo_<set>` = the set's weighted mean of o), so both views are in the record.

o is computed as one Jacobian-vector product J g_T (forward mode, torch.func.jvp), which is exactly the
vector of per-token gradients dotted with g_T: per-token gradients by torch.func.vmap over vjp cost ~2 s
per 128-token sequence on one core for a 0.9M model (30 s a batch) against 0.4 s for the JVP of the whole
batch, equal to 1e-5 relative (tests/test_oracle.py checks both against autograd token by token).

Rank 0 computes everything, on the CPU, in fp32, in eval mode (no dropout), from the gathered weights,
AdamW state and batch: the result does not depend on the world size. Nothing of it touches the engines'
modules or the global RNG, and when off it costs one integer test per step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, jvp, vjp

from blade.config import BladeConfig, OptimConfig
from blade.data.reader import eval_batches
from blade.errors import ConfigError
from blade.model.memory import param_count
from blade.model.transformer import IGNORE_INDEX, Transformer
from blade.runtime import zero
from blade.runtime.dist import all_gather
from blade.train import engines, schedule, selection
from blade.train.batch import to_micro_batch

MAX_EXACT_PARAMS = 2_000_000  # forward-mode AD of the whole batch on the CPU: seconds per measurement


def check_config(cfg: BladeConfig) -> None:
    """The oracle is for tractable models only: refuse larger ones before any engine is built."""
    n = param_count(cfg.model)
    if cfg.selection.exact_interval and n > MAX_EXACT_PARAMS:
        raise ConfigError(f"config error: selection.exact_interval needs a model of at most "
                          f"{MAX_EXACT_PARAMS:,} parameters (this one has {n:,}): the exact oracle differentiates "
                          "every token on the CPU; use a smaller model or set selection.exact_interval=0")


# ----------------------------------------------------------------------------- the mathematics (any model)

def transformer_token_losses(model: Transformer):
    """loss_fn(params, inputs, targets) -> per-token CE [B, T] of `model` run with `params`, in plain
    differentiable ops (the engine's chunked head has no forward-mode derivative), math attention."""
    def loss_fn(params, inputs, targets):
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            logits = functional_call(model, params, (inputs, None)).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="none").view(targets.shape)
    return loss_fn


def mean_loss(loss_fn, params, inputs, targets) -> torch.Tensor:
    """Mean per-token loss over the valid targets, accumulated in float64."""
    valid = targets != IGNORE_INDEX
    return (loss_fn(params, inputs, targets).double() * valid).sum() / valid.sum().clamp_min(1)


def first_order_scores(loss_fn, params, inputs, targets, direction) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_i, g_i . direction) for every token: one forward-mode pass, J @ direction."""
    return jvp(lambda p: loss_fn(p, inputs, targets), (params,), (direction,))


def adamw_trial(params: dict, grads: dict, exp_avg: dict, exp_avg_sq: dict, steps: int, lr: float,
                weight_decay: dict, o: OptimConfig) -> dict:
    """The weights after one step of torch's AdamW (the optimizer DeepSpeed runs) from this state, on
    copies: the moments after `steps` steps, the global gradient norm clipped to o.grad_clip first."""
    new = {n: p.detach().clone() for n, p in params.items()}
    groups = [{"params": [new[n] for n in new if weight_decay[n] == wd], "weight_decay": wd}
              for wd in sorted(set(weight_decay.values()))]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=o.fused or None)
    for n, p in new.items():
        p.grad = grads[n].detach().clone()
        if steps:
            opt.state[p] = {"step": torch.tensor(float(steps)), "exp_avg": exp_avg[n].clone(),
                            "exp_avg_sq": exp_avg_sq[n].clone()}
    if o.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(list(new.values()), o.grad_clip)
    opt.step()
    return new


def top_k(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest valid scores (ties to the lower position), as a mask."""
    order = torch.sort(scores.float().masked_fill(~valid, -torch.inf), descending=True, stable=True).indices
    mask = torch.zeros_like(valid)
    mask[order[:k]] = True
    return mask & valid


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 in float64, tied values sharing the mean of their ranks."""
    values, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts
    return (first + (counts - 1) / 2).double()[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (NaN when either side is constant)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


@dataclass
class Snapshot:
    """The proxy before its update and the step's global batch, in global token order (rank 0's copy)."""
    params: dict            # name -> fp32 master weights
    exp_avg: dict
    exp_avg_sq: dict
    steps: int              # AdamW steps taken so far
    weight_decay: dict      # name -> the engine's weight decay for it
    inputs: torch.Tensor    # [sequences, T]
    targets: torch.Tensor   # [sequences, T]
    mask: torch.Tensor      # [sequences * T] the run's selection (bool)
    scores: torch.Tensor | None  # [sequences * T] the run's scores (rho1 / blade)
    random_keys: torch.Tensor    # [sequences * T] select_random's keys at this step


def compare(loss_fn, snap: Snapshot, target: tuple[torch.Tensor, torch.Tensor], strategy: str, gamma: float,
            eta: float, lr: float, o: OptimConfig) -> dict:
    """The measurement of one step (no collectives; the same on any world size given the snapshot)."""
    params = snap.params
    valid = (snap.targets != IGNORE_INDEX).flatten()
    n_valid = int(valid.sum())
    k = selection.keep_count(gamma, n_valid)
    g_target, target_loss = grad_and_value(lambda p: mean_loss(loss_fn, p, *target))(params)
    losses, first_order = first_order_scores(loss_fn, params, snap.inputs, snap.targets, g_target)
    losses, first_order = losses.detach().flatten(), first_order.detach().flatten()

    sets = {"oracle": top_k(first_order, valid, k)}
    rankings = {"loss": losses, "random": snap.random_keys}
    if strategy in ("rho1", "blade", "random"):
        sets[strategy] = snap.mask & valid
        if snap.scores is not None:
            rankings[strategy] = snap.scores
    sets.setdefault("random", top_k(snap.random_keys, valid, k))
    sets.update(loss=top_k(losses, valid, k), full=valid)

    record = {"n_valid": n_valid, "k": k, "target_loss": float(target_loss), "forwards": 3 + len(sets),
              "backwards": 1 + len(sets)}
    for name, scores in rankings.items():
        record[f"spearman_{name}"] = spearman(scores.float()[valid], first_order[valid])
        record[f"precision_{name}"] = float((sets[name] & sets["oracle"]).sum()) / max(k, 1)
    _, pullback = vjp(lambda p: loss_fn(p, snap.inputs, snap.targets).flatten(), params)
    for name, mask in sets.items():
        w = valid.float() if name == "full" else selection.frank_wolfe_weights(mask, valid, gamma, eta)
        w = w / w.sum().clamp_min(1e-12)
        grads = pullback(w)[0]
        moved = adamw_trial(params, grads, snap.exp_avg, snap.exp_avg_sq, snap.steps, lr, snap.weight_decay, o)
        with torch.no_grad():
            record[f"dl_{name}"] = float(mean_loss(loss_fn, moved, *target)) - record["target_loss"]
        record[f"fo_{name}"] = float((w.double() * first_order.double()).sum())
    for name in sets:
        if name not in ("oracle", "random"):
            record[f"gain_{name}"] = _between(record, "dl", name, lower=True)
            record[f"fo_gain_{name}"] = _between(record, "fo", name, lower=False)
    return record


def _between(record: dict, key: str, name: str, lower: bool) -> float:
    """Where set `name` stands between random (0) and the oracle (1) on `key`."""
    span = record[f"{key}_oracle"] - record[f"{key}_random"]
    if span == 0:
        return float("nan")
    return (record[f"{key}_{name}"] - record[f"{key}_random"]) / span


# ----------------------------------------------------------------------------- in a run

class ExactOracle:
    """The measurement in a training run: due every exact_interval selecting steps (from the first
    one); gathers the snapshot (a collective), rank 0 compares and logs a `kind: oracle` record.
    The plain fp32 model and the target batch are built at the first measurement (nothing when off)."""

    def __init__(self, cfg: BladeConfig, world, target_dataset, log):
        self.cfg, self.world, self.target_dataset, self.log = cfg, world, target_dataset, log
        self.loss_fn, self.target = None, None

    def due(self, step: int) -> bool:
        sel = self.cfg.selection
        return bool(sel.exact_interval) and step >= sel.warmup_full_ce_steps and \
            (step - sel.warmup_full_ce_steps) % sel.exact_interval == 0

    def measure(self, step: int, proxy, mbs: list, mask: torch.Tensor, scores: torch.Tensor | None) -> None:
        """Called by the step after its selection, before its update (no-op unless due)."""
        if not self.due(step):
            return
        t0 = time.perf_counter()
        snap = self.snapshot(step, proxy, mbs, mask, scores)
        if not self.world.is_main:
            return
        if self.loss_fn is None:
            self.build()
        cfg, sel = self.cfg, self.cfg.selection
        lr = engines.lr_at(cfg, step)
        record = {"kind": "oracle", "step": step, "strategy": sel.strategy,
                  "since_reference": schedule.steps_since_reference(sel, step), "lr": lr}
        with zero.plain_linear():
            record.update(compare(self.loss_fn, snap, self.target, sel.strategy, sel.gamma, sel.eta, lr, cfg.optim))
        record["time_oracle_s"] = time.perf_counter() - t0
        self.log.log(record)

    def snapshot(self, step: int, proxy, mbs: list, mask: torch.Tensor, scores: torch.Tensor | None) -> Snapshot:
        """Gather the proxy's fp32 weights and AdamW state and the global batch (every rank takes part)."""
        seq_len = mbs[0].inputs.shape[1]
        inputs = _global(torch.stack([mb.inputs for mb in mbs])).reshape(-1, seq_len)
        targets = _global(torch.stack([mb.targets for mb in mbs])).reshape(-1, seq_len)
        m, n = mask.shape[0], mask[0].numel()
        return Snapshot(
            params=zero.full_fp32_state(proxy), exp_avg=zero.full_fp32_state(proxy, "exp_avg"),
            exp_avg_sq=zero.full_fp32_state(proxy, "exp_avg_sq"), steps=zero.optimizer_steps(proxy),
            weight_decay=zero.weight_decays(proxy), inputs=inputs, targets=targets,
            mask=_global(mask.reshape(m, n).to(torch.uint8)).flatten().bool(),
            scores=None if scores is None else _global(scores.reshape(m, n).float()).flatten(),
            random_keys=selection.random_keys(m, self.world.world_size, n, self.cfg.train.seed, step).flatten())

    def build(self) -> None:
        """The plain fp32 model (its init draws restored: the run's RNG is untouched) and the target batch."""
        with torch.random.fork_rng(devices=[]):
            model = Transformer(self.cfg.model).eval()
        self.loss_fn = transformer_token_losses(model)
        mbs = [to_micro_batch(b, "cpu") for b in eval_batches(
            self.target_dataset, self.cfg.train.micro_batch_size, 1, 0, self.cfg.selection.exact_target_sequences)]
        self.target = (torch.cat([mb.inputs for mb in mbs]), torch.cat([mb.targets for mb in mbs]))


def _global(t: torch.Tensor) -> torch.Tensor:
    """This rank's [M, ...] -> the global batch's [M * world, ...] in global order (micro-batch, then rank)."""
    parts = all_gather(t.cpu())
    return parts.transpose(0, 1).reshape(-1, *t.shape[1:])
