"""`blade plan`: one rank's peak memory for a config, part by part, before a job is launched.

    blade plan configs/tinyllama-1.1b.yaml --ranks 8 --memory-gib 80

The parts (bytes per rank; N ranks, P parameters):
- proxy state: weights, gradients, fp32 master and AdamW moments, sharded by the ZeRO stage
  (blade/model/memory.py);
- reference: rho1 and blade keep a second model. At ZeRO-3 it holds only its weight partitions between
  phases (blade/runtime/zero.py release_training_state); a reference phase adds its gradients, master,
  moments and reduce bucket. Below stage 3 it keeps everything;
- reduce bucket: at ZeRO-3 DeepSpeed allocates `reduce_bucket_size` elements (default 5e8) per engine
  for the gradient reduce-scatter. A GPU holds the whole allocation; a CPU process touches only the pages
  it writes (at most P elements);
- activations: the tensors one training micro-batch saves for the backward, counted exactly by running
  the model's forward on fake tensors (torch FakeTensorMode: shapes only, no memory, well under a second
  at 7B) under the configured activation checkpointing, plus the input each recomputed block keeps;
- head: one chunk of logits (`model.loss_chunk_tokens` x vocab) in fp32 and in the model's precision;
- gathered (ZeRO-3): DeepSpeed keeps a parameter gathered from its forward to its backward use when
  fewer than `stage3_max_reuse_distance` elements (default 1e9) are fetched in between, so up to that
  many parameters stay whole through a step, plus the `stage3_prefetch_bucket_size` (5e7) in flight
  (at most the model each);
- optimizer step: torch's foreach AdamW makes about three temporaries the size of the fp32 master
  partition.

A step's transient is the higher of its forward parts (activations, head, gathered parameters) and the
optimizer step's temporaries: by the optimizer step the activations and the gathered parameters are
freed. A bare ZeRO-3 engine at ~100M peaked in its forward (within 2 % of the plan). Inside the trainer,
`blade bench` under tcmalloc (launch/malloc.sh) and torch.profiler's count of the live tensors agree with
that: 0.95-1.03 x the forward parts at 11M, 33M and 86M. Under glibc the bench's RSS read about the sum of
all parts, more than the live tensors (docs/benchmarks/cpu-2core_2026-12-03b.md). A reference phase adds
the reference's training state. docs/benchmarks/ compares the plan with `blade bench`; tests/test_plan.py
checks the parts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json

import torch

from blade.config import STRATEGIES_WITH_REFERENCE, BladeConfig, ModelConfig
from blade.model.memory import bytes_per_param, param_count, state_bytes_per_rank

# DeepSpeed's zero_optimization defaults (elements)
ZERO_DEFAULTS = {"reduce_bucket_size": 500_000_000, "stage3_prefetch_bucket_size": 50_000_000,
                 "stage3_max_reuse_distance": 1_000_000_000}


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd saves for the backward in one forward of `model`
    (parameters excluded), plus the input each recomputed (checkpointed) block holds outside autograd.
    Works on real and on fake tensors (storages are told apart by their C++ identity)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, targets)
    cfg = model.cfg
    held = sum(model._recomputed(i) for i in range(cfg.n_layers)) * tokens.numel() * cfg.dim
    return sum(seen.values()) + held * next(model.parameters()).element_size()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def activation_bytes(m: ModelConfig, batch: int, seq_len: int, precision: str) -> int:
    """saved_activation_bytes of one training micro-batch [batch, seq_len], counted on fake tensors.
    Every saved tensor but the RoPE tables' slices has the batch dimension, so the count is linear in
    the batch: two fake forwards (batch 1 and 2) give it for any batch."""
    one, two = _activation_line(json.dumps(dataclasses.asdict(m), sort_keys=True), seq_len, precision)
    return one + (batch - 1) * (two - one)


@functools.lru_cache(maxsize=64)
def _activation_line(model_json: str, seq_len: int, precision: str) -> tuple[int, int]:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blade.model.transformer import Transformer

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    out = []
    for batch in (1, 2):
        with FakeTensorMode(), _default_dtype(dtype):
            model = Transformer(ModelConfig(**json.loads(model_json))).train()
            for module in model.modules():  # as DeepSpeed casts the model: buffers (RoPE tables) too
                for name, buf in module._buffers.items():
                    if buf is not None and buf.is_floating_point():
                        module._buffers[name] = buf.to(dtype)
            tokens = torch.zeros((batch, seq_len), dtype=torch.long)
            out.append(saved_activation_bytes(model, tokens, tokens))
    return out[0], out[1]


def _zero_setting(cfg: BladeConfig, key: str) -> int:
    return int(cfg.deepspeed.extra.get("zero_optimization", {}).get(key, ZERO_DEFAULTS[key]))


@dataclasses.dataclass
class Plan:
    """Bytes per rank by part (module docstring)."""
    parameters: int
    proxy_state: float
    reference_weights: float
    reference_phase: float
    reduce_bucket: float
    activations: float
    head: float
    gathered: float
    optimizer_step: float

    @property
    def state(self) -> float:
        """What a rank holds between steps (what `blade bench` reports as state)."""
        return self.proxy_state + self.reference_weights + self.reduce_bucket

    @property
    def forward(self) -> float:
        """What the forward and backward hold at their peak: activations, logits chunk, gathered weights."""
        return self.activations + self.head + self.gathered

    @property
    def transient(self) -> float:
        """What a training step adds on top of the state (`blade bench`'s step memory): the forward's
        parts or, once they are freed, the optimizer step's temporaries, whichever is higher."""
        return max(self.forward, self.optimizer_step)

    @property
    def step_peak(self) -> float:
        return self.state + self.transient

    @property
    def peak(self) -> float:
        """The higher of a training step and a reference phase (which trains the reference)."""
        return self.step_peak + self.reference_phase


def plan(cfg: BladeConfig, world: int, seq_len: int | None = None, gpu: bool = True) -> Plan:
    """The memory plan of `cfg` on `world` ranks for micro-batches of `seq_len` tokens (default: the
    model's max_seq_len). `gpu`: count the reduce buckets' whole allocation (else the touched pages)."""
    m, t = cfg.model, cfg.train
    seq_len = seq_len or m.max_seq_len
    stage, P = cfg.deepspeed.zero_stage, param_count(m)
    low = bytes_per_param(t.precision)["weights"]
    reference = cfg.selection.strategy in STRATEGIES_WITH_REFERENCE
    ref_precision = "bf16" if cfg.selection.ref_precision == "bf16" else t.precision
    bucket_elems = _zero_setting(cfg, "reduce_bucket_size")
    bucket = (bucket_elems if gpu else min(bucket_elems, P)) * low if stage == 3 else 0.0
    ref_state = ref_weights = 0.0
    if reference:  # at ZeRO-3 released to its weight partitions between phases; below, kept whole
        ref_state = state_bytes_per_rank(P, ref_precision, stage, world)
        ref_weights = P * bytes_per_param(ref_precision)["weights"] / world if stage == 3 else ref_state
    live = (min(P, _zero_setting(cfg, "stage3_max_reuse_distance"))
            + min(P, _zero_setting(cfg, "stage3_prefetch_bucket_size")))
    chunk = min(m.loss_chunk_tokens, t.micro_batch_size * seq_len)
    master_partition = 4 * P / (world if stage >= 1 else 1)
    return Plan(
        parameters=P,
        proxy_state=state_bytes_per_rank(P, t.precision, stage, world),
        reference_weights=ref_weights,
        reference_phase=(ref_state - ref_weights + bucket) if reference and stage == 3 else 0.0,
        reduce_bucket=bucket,
        activations=float(activation_bytes(m, t.micro_batch_size, seq_len, t.precision)),
        head=float(chunk * m.vocab_size * (4 + low)),
        gathered=float(live * low) if stage == 3 else 0.0,
        optimizer_step=3 * master_partition,
    )


def largest_micro_batch(cfg: BladeConfig, world: int, budget: float, seq_len: int | None = None,
                        gpu: bool = True, limit: int = 4096) -> int:
    """The largest train.micro_batch_size whose planned peak fits in `budget` bytes (0: none fits)."""
    def fits(size: int) -> bool:
        trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=size))
        return plan(trial, world, seq_len, gpu).peak <= budget

    low, high = 0, 1  # fits(low) (or low == 0), and high is the first size to try
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:  # the peak grows with the micro-batch: bisect
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return min(low, limit)


def describe_plan(cfg: BladeConfig, world: int, budget: float | None, seq_len: int | None = None,
                  gpu: bool = True) -> str:
    """The table `blade plan` prints."""
    p = plan(cfg, world, seq_len, gpu)
    gib = 2**30
    rows = [("proxy state (weights, grads, fp32 master, AdamW)", p.proxy_state),
            ("reference weights (between phases)", p.reference_weights),
            ("ZeRO-3 reduce bucket" + ("" if gpu else " (CPU: touched pages)"), p.reduce_bucket),
            ("= state", p.state),
            (f"activations (micro-batch {cfg.train.micro_batch_size} x {seq_len or cfg.model.max_seq_len}, "
             f"checkpointing {cfg.model.activation_checkpointing})", p.activations),
            ("head (one chunk of logits)", p.head),
            ("ZeRO-3 parameters kept gathered and prefetched", p.gathered),
            ("optimizer step temporaries (foreach AdamW; after the above are freed)", p.optimizer_step),
            ("= peak of a training step (state + the higher of the two)", p.step_peak),
            ("+ a reference phase (its grads, master, moments, bucket)", p.reference_phase),
            ("= peak", p.peak)]
    lines = [f"plan: {p.parameters:,} parameters, {cfg.selection.strategy}, ZeRO-{cfg.deepspeed.zero_stage}, "
             f"{cfg.train.precision}, {world} rank{'s' * (world != 1)}; GiB per rank"]
    lines += [f"  {name:<72} {value / gib:9.2f}" for name, value in rows]
    if budget:
        fits = "fits" if p.peak <= budget else "does NOT fit"
        lines.append(f"  {fits} in {budget / gib:.1f} GiB; largest micro-batch that fits: "
                     f"{largest_micro_batch(cfg, world, budget, seq_len, gpu)}")
    return "\n".join(lines)
