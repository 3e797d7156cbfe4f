"""Model FLOPs by formula, device peaks, and what a BLADE step costs on top of plain training.

Conventions (the usual MFU ones, as in PaLM / torchtitan): a multiply-add is 2 FLOPs; only matmuls
count; the embedding lookup is free; backward = 2 x forward; recomputation (our chunked cross-entropy
recomputes the head's logits in backward) is *not* model FLOPs. Causal attention counts only the
scores that are used: a query at position t attends to t + 1 keys.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from blade.config import BladeConfig, ModelConfig

# Dense bf16 / fp32 (non-tensor-core) peaks per device, FLOP/s, from the vendors' data sheets.
GPU_PEAKS = {
    "A100": {"bf16": 312e12, "fp32": 19.5e12},
    "H100": {"bf16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp32": 67e12},
}


def linear_flops_per_token(m: ModelConfig) -> float:
    """Forward FLOPs per token of every matmul with a weight (projections, MLP, head)."""
    head_dim = m.dim // m.n_heads
    kv = m.n_kv_heads * head_dim
    attn = 2 * m.dim * (m.dim + 2 * kv) + 2 * m.dim * m.dim       # wq, wk, wv, wo
    mlp = 3 * 2 * m.dim * m.ffn_hidden                             # w1, w3, w2
    return m.n_layers * (attn + mlp) + 2 * m.dim * m.vocab_size    # + the LM head


def attention_flops_per_sequence(m: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward FLOPs of QK^T and AV for one sequence (all heads, all layers)."""
    pairs = seq_len * (seq_len + 1) / 2 if causal else seq_len * seq_len
    return m.n_layers * 2 * 2 * m.dim * pairs


def forward_flops(m: ModelConfig, batch: int, seq_len: int, causal: bool = True) -> float:
    return batch * (seq_len * linear_flops_per_token(m) + attention_flops_per_sequence(m, seq_len, causal))


@dataclass
class StepFlops:
    """Model FLOPs of one optimizer step over the whole world, split by where they are spent."""
    proxy_train: float        # forward + backward of the proxy on the global batch
    proxy_rescore: float      # extra no-grad proxy forward when scoring under gradient accumulation
    reference_forward: float  # the reference's scoring forward
    reference_phase: float    # per sync: scoring K pool batches + K reference steps, divided by tau

    @property
    def total(self) -> float:
        return self.proxy_train + self.proxy_rescore + self.reference_forward + self.reference_phase


def step_flops(cfg: BladeConfig, world_size: int, seq_len: int, strategy: str | None = None) -> StepFlops:
    strategy = strategy or cfg.selection.strategy
    t, sel = cfg.train, cfg.selection
    seqs = t.micro_batch_size * world_size * t.grad_accum
    fwd = forward_flops(cfg.model, seqs, seq_len)
    scored = strategy in ("rho1", "blade")
    phase = 0.0
    if strategy == "blade":
        # K pool batches scored by u and the outgoing w, then K steps on val + pool sequences
        phase = sel.k_ref_steps * (2 * fwd + 3 * 2 * fwd) / sel.tau
    return StepFlops(proxy_train=3 * fwd,
                     proxy_rescore=fwd if scored and t.grad_accum > 1 else 0.0,
                     reference_forward=fwd if scored else 0.0,
                     reference_phase=phase)


def device_peak(precision: str, device: str | None = None) -> tuple[float, str]:
    """(peak FLOP/s, how it was obtained) for one device: the data-sheet table on known GPUs,
    a measured matmul rate on the CPU (the share of the cores one rank uses)."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peaks in GPU_PEAKS.items():
            if key in name:
                return peaks[precision], f"{key} data sheet ({precision})"
        return measure_matmul_peak(precision, "cuda"), f"measured matmul on {name}"
    return measure_matmul_peak(precision, "cpu"), f"measured matmul, {torch.get_num_threads()} CPU thread(s)"


def measure_matmul_peak(precision: str, device: str, n: int = 1024, seconds: float = 0.5) -> float:
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t0)
