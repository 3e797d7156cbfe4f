"""Llama-style decoder (RMSNorm, grouped-query attention with RoPE, SwiGLU) in plain torch.

The forward returns the per-token cross-entropy, not logits: data selection scores every token, and
the loss is computed in chunks so that full-vocabulary logits of the whole batch never exist at once.
RoPE uses the Hugging Face Llama "rotate half" layout, so HF Llama checkpoints load without permuting
wq/wk.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from blade.config import ModelConfig
from blade.runtime.zero import full_numel, gathered

IGNORE_INDEX = -100


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of `h @ weight.T` against `targets`, `chunk` rows at a time.

    apply(h [N, D], weight [V, D], targets [N], chunk) -> loss [N], 0 where targets == IGNORE_INDEX.
    The logits matmul runs in the inputs' dtype (bf16 for a bf16 model: the logits are rounded to bf16,
    as Hugging Face Llama's bf16 head returns them); log-sum-exp, the loss and the softmax of backward
    are computed in fp32 (fp64 for fp64 inputs), and the loss is fp32. For low-precision inputs the
    target's logit is an exact fp32 dot product, so of the logits only the log-sum-exp sees bf16
    rounding (it halves the error bound and made a bf16 model's selection decisions 1.6x closer to an
    fp32 model's on the quickstart: tools/head_selection_check.py). The gradient matmuls run in the
    inputs' dtype again; the weight gradient is accumulated in fp32 across chunks. Only h, weight,
    targets and the per-row logsumexp are saved; backward recomputes each chunk's logits, so peak
    memory is one [chunk, V] block of logits (one copy in each dtype) in both passes. No copy of the
    weight is made. fp32 inputs run exactly the fp32 arithmetic of before.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk):
        if h.dtype != weight.dtype:
            raise TypeError(f"h and weight must share a dtype, got {h.dtype} and {weight.dtype}")
        acc = torch.promote_types(h.dtype, torch.float32)
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0)
        lse = torch.empty(h.shape[0], dtype=acc, device=h.device)
        loss = torch.empty_like(lse)
        for s in range(0, h.shape[0], chunk):
            logits = (h[s:s + chunk] @ weight.t()).to(acc)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            if h.dtype == acc:
                target_logit = logits.gather(1, safe[s:s + chunk, None]).squeeze(1)
            else:  # exact in fp32 ([chunk, D]): only the log-sum-exp sees bf16-rounded logits
                target_logit = (h[s:s + chunk].to(acc) * weight[safe[s:s + chunk]].to(acc)).sum(-1)
            loss[s:s + chunk] = lse[s:s + chunk] - target_logit
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk = chunk
        return loss.masked_fill_(~valid, 0.0)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        h, weight, targets, lse = ctx.saved_tensors
        acc, chunk, low = lse.dtype, ctx.chunk, h.dtype
        valid = targets != IGNORE_INDEX
        safe = targets.masked_fill(~valid, 0)
        scale = torch.where(valid, grad_loss.to(acc), 0.0)  # ignored rows get a zero gradient
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        # fp32 (fp64) accumulator of the weight gradient; a low-precision single chunk needs none
        direct = low != acc and h.shape[0] <= chunk
        grad_w = None
        if ctx.needs_input_grad[1] and not direct:
            grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        for s in range(0, h.shape[0], chunk):
            h_c = h[s:s + chunk]
            g = (h_c @ weight.t()).to(acc).sub_(lse[s:s + chunk, None]).exp_()  # softmax
            g[torch.arange(g.shape[0], device=g.device), safe[s:s + chunk]] -= 1.0  # - onehot
            g = g.mul_(scale[s:s + chunk, None]).to(low)
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ weight
            if ctx.needs_input_grad[1]:
                if direct:
                    grad_w = g.t() @ h_c
                elif low == acc:
                    grad_w.addmm_(g.t(), h_c)
                else:
                    grad_w += g.t() @ h_c
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """fp32 inverse frequencies [head_dim / 2]: theta^(-2i/head_dim), rescaled for rope_scaling=llama3.

    llama3 (transformers' `_compute_llama3_parameters`): wavelengths longer than
    original_max / low_freq_factor are stretched by `factor`, those shorter than original_max /
    high_freq_factor are kept, and the band between interpolates linearly in original_max / wavelength.
    """
    head_dim = cfg.dim // cfg.n_heads
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if cfg.rope_scaling == "none":
        return inv_freq
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    ramp = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old / high) & (wavelen <= old / low)
    return torch.where(medium, ramp, scaled)


def rope_tables(inv_freq: torch.Tensor, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin of shape [max_seq_len, head_dim]; frequencies concatenated twice (HF Llama layout)."""
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, head_dim] by position; cos/sin are [T, head_dim]."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # HF Llama: normalise in fp32, cast back, then scale (torch's rms_norm would scale before the
        # cast, so it normalises only; on the CPU it equals x * rsqrt(mean(x^2) + eps) bit for bit)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.dropout = cfg.dropout
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # K/V head j serves query heads j*rep .. j*rep+rep-1 (HF repeat_kv), without repeating K/V
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True, enable_gqa=self.n_heads != self.n_kv_heads)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_heads * self.head_dim)
        return self.resid_dropout(self.wo(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_hidden, cfg.dim, bias=False)  # down
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class LMHead(nn.Module):
    """Output projection; its forward computes the chunked per-token loss (or logits without targets).

    The loss must run inside this module's forward: ZeRO-3 gathers a parameter only in the pre-forward
    hook of a module that owns it, and re-gathers it for backward through hooks on that module's
    outputs. With tied embeddings `weight` is the embedding's nn.Parameter itself, registered in both
    modules (the pattern ZeRO-3 supports for HF tied heads); `Module.parameters()` yields it once.
    """

    def __init__(self, weight: nn.Parameter, chunk: int):
        super().__init__()
        self.weight = weight
        self.chunk = chunk

    def forward(self, h, targets=None):
        if targets is None:
            return F.linear(h, self.weight)
        weight = self.weight
        if torch.is_autocast_enabled(h.device.type):  # the matmul in autocast's dtype, as F.linear would
            dtype = torch.get_autocast_dtype(h.device.type)
            h, weight = h.to(dtype), weight.to(dtype)
        loss = ChunkedCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, targets.reshape(-1),
                                         self.chunk)
        return loss.view(targets.shape)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads or cfg.n_heads % cfg.n_kv_heads or (cfg.dim // cfg.n_heads) % 2:
            raise ValueError(f"need dim % n_heads == 0, n_heads % n_kv_heads == 0 and an even head_dim; "
                             f"got dim={cfg.dim}, n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}")
        if cfg.loss_chunk_tokens < 1:
            raise ValueError(f"loss_chunk_tokens must be >= 1, got {cfg.loss_chunk_tokens}")
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        head_weight = (self.tok_emb.weight if cfg.tie_embeddings
                       else nn.Parameter(torch.empty(cfg.vocab_size, cfg.dim)))
        self.lm_head = LMHead(head_weight, cfg.loss_chunk_tokens)
        # fp32 tables; a bf16 cast of the whole model rounds them as HF's cast at use would
        cos, sin = rope_tables(rope_frequencies(cfg), cfg.max_seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """normal(0, init_std); wo and w2 scaled by 1/sqrt(2 * n_layers) (GPT-2); RMSNorm weights 1,
        biases 0.

        Under deepspeed.zero.Init the parameters are already partitioned (empty) here, so each one is
        gathered, set from rank 0's RNG and re-partitioned: the weights equal a plain build's.
        """
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            with gathered(p):
                if name.endswith("norm.weight"):
                    nn.init.ones_(p)
                elif name.endswith(".bias"):
                    nn.init.zeros_(p)
                elif name.endswith(("attn.wo.weight", "mlp.w2.weight")):
                    nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
                else:
                    nn.init.normal_(p, 0.0, std)

    def _hidden(self, tokens):
        T = tokens.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(tokens)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for i, layer in enumerate(self.layers):
            if self._recomputed(i):  # activations of the block are recomputed in the backward
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        return self.norm(x)

    def _recomputed(self, i: int) -> bool:
        mode = self.cfg.activation_checkpointing
        if mode == "none" or not (self.training and torch.is_grad_enabled()):
            return False
        return mode == "full" or i % self.cfg.activation_checkpointing_every == 0

    def forward(self, tokens, targets):
        """tokens, targets: LongTensor [B, T] -> per-token cross-entropy [B, T] (fp32; 0 where ignored)."""
        return self.lm_head(self._hidden(tokens), targets)

    def logits(self, tokens):
        """Full logits [B, T, V] (materialised: for inspection and tests)."""
        return self.lm_head(self._hidden(tokens))

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Unique parameter count (ZeRO-3 aware); exclude_embedding drops the token-embedding matrix."""
        n = sum(full_numel(p) for p in self.parameters())
        if exclude_embedding:
            n -= full_numel(self.tok_emb.weight)
        return n
