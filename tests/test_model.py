"""Model tests: chunked per-token loss vs F.cross_entropy, gradients, RoPE, GQA, causality, ZeRO-3."""
import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from blade.config import ModelConfig
from blade.model.transformer import ChunkedCrossEntropy, Transformer, apply_rope
from tests.dist_harness import run_distributed

TINY = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                   max_seq_len=16, loss_chunk_tokens=7)
B, T = 2, 12
N = B * T


def make(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(replace(TINY, **overrides))


def batch(seed=1, vocab=TINY.vocab_size, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    targets = torch.randint(0, vocab, (b, t), generator=g)
    targets[0, 3] = targets[1, :2] = -100
    weights = torch.rand(b, t, generator=g)  # non-uniform upstream gradient
    return tokens, targets, weights


def reference_loss(logits, targets):
    V = logits.shape[-1]
    ce = F.cross_entropy(logits.float().view(-1, V), targets.view(-1), reduction="none", ignore_index=-100)
    return ce.view(targets.shape)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("chunk", [1, 7, N, N + 5])
def test_chunked_loss_and_grads_match_unchunked(chunk, tie):
    model = make(tie_embeddings=tie, loss_chunk_tokens=chunk)
    tokens, targets, w = batch()
    loss = model(tokens, targets)
    (loss * w).sum().backward()
    got = grads(model)
    model.zero_grad()
    ref = reference_loss(model.logits(tokens), targets)
    (ref * w).sum().backward()
    assert loss.dtype == torch.float32 and loss.shape == (B, T)
    assert (loss[targets == -100] == 0).all()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("chunk", [1, 7, N, N + 5])
def test_chunked_function_bf16(chunk):
    """bf16 head against an fp64 reference on the same (bf16-valued) inputs, with per-token weights.

    Stated tolerances: the logits are rounded once to bf16 (unit roundoff u = 2^-8) for the
    log-sum-exp, the target logit z_t is exact in fp32, so each per-token loss lse(z) - z_t is within
    u * max_j |z_j| = 2^-8 * max_j |z_j| (+ 1e-5 for fp32) of the exact one. Gradients (bf16
    softmax-minus-onehot times bf16 weights): Frobenius-relative error <= 2^-6 (observed ~0.5 % at
    these logit sizes, |z| <= ~15). The log-sum-exp must be the HF-Llama bf16 head's: the loss equals
    F.cross_entropy of the bf16 logits upcast to fp32, up to the rounding of z_t (u * |z_t|).
    """
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, 32, generator=g).bfloat16().requires_grad_()
    W = (torch.randn(97, 32, generator=g) * 0.5).bfloat16().requires_grad_()
    _, targets, w = batch()
    targets = targets.view(-1)
    loss = ChunkedCrossEntropy.apply(h, W, targets, chunk)
    (loss * w.view(-1)).sum().backward()
    h64, W64 = h.detach().double().requires_grad_(), W.detach().double().requires_grad_()
    z = h64 @ W64.t()
    ref = F.cross_entropy(z, targets, reduction="none", ignore_index=-100)
    (ref * w.view(-1).double()).sum().backward()
    assert loss.dtype == torch.float32 and (loss[targets == -100] == 0).all()
    bound = 2.0 ** -8 * z.abs().amax(dim=1) + 1e-5
    assert ((loss.double() - ref).abs() <= bound).all()
    logits = F.linear(h.detach(), W.detach())
    hf = F.cross_entropy(logits.float(), targets, reduction="none", ignore_index=-100)
    z_t = logits.float().gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    assert ((loss - hf).abs() <= 2.0 ** -8 * z_t.abs() + 1e-5).all()
    assert h.grad.dtype == W.grad.dtype == torch.bfloat16
    for got, want in ((h.grad, h64.grad), (W.grad, W64.grad)):
        assert (got.double() - want).norm() <= 2.0 ** -6 * want.norm()


def test_chunked_function_bf16_is_not_fp32_math():
    """The bf16 head really multiplies in bf16: with logits that bf16 cannot hold exactly its loss
    differs from the fp32-matmul loss (the old head, which upcast h and the weight)."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(64, 64, generator=g).bfloat16()
    W = torch.randn(128, 64, generator=g).bfloat16()
    targets = torch.randint(0, 128, (64,), generator=g)
    fp32_math = F.cross_entropy(h.float() @ W.float().t(), targets, reduction="none")
    assert (ChunkedCrossEntropy.apply(h, W, targets, 16) - fp32_math).abs().max() > 1e-3


def test_chunked_function_rejects_mixed_dtypes():
    with pytest.raises(TypeError, match="share a dtype"):
        ChunkedCrossEntropy.apply(torch.zeros(2, 4), torch.zeros(3, 4).bfloat16(), torch.zeros(2).long(), 2)


def test_head_under_autocast_runs_in_the_autocast_dtype():
    """Under torch.autocast (the DDP anchor, tools/bench_ddp.py) the head multiplies in bf16 like
    F.linear would, and still returns fp32 per-token losses."""
    model = make()
    tokens, targets, _ = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens, targets)
        h = model._hidden(tokens)
    assert loss.dtype == torch.float32
    want = ChunkedCrossEntropy.apply(h.flatten(0, 1).bfloat16(), model.lm_head.weight.bfloat16(),
                                     targets.flatten(), TINY.loss_chunk_tokens).view(targets.shape)
    assert torch.equal(loss, want)
    assert (loss - model(tokens, targets)).abs().max() > 1e-4  # not the fp32 head


def test_bf16_model_close_to_logits_reference():
    model = make().bfloat16()
    tokens, targets, _ = batch()
    torch.testing.assert_close(model(tokens, targets), reference_loss(model.logits(tokens), targets),
                               atol=3e-2, rtol=1e-2)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 3, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 6, -100, 3, 3])
    assert torch.autograd.gradcheck(lambda a, b: ChunkedCrossEntropy.apply(a, b, targets, 2), (h, W))


def test_parameter_names_tying_and_init():
    tied, untied = make(), make(tie_embeddings=False)
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())
    assert "lm_head.weight" in dict(untied.named_parameters())
    assert set(tied.state_dict()) >= {"tok_emb.weight", "lm_head.weight", "norm.weight",
                                      "layers.1.attn.wq.weight", "layers.1.mlp.w3.weight"}
    assert not any("rope" in k for k in tied.state_dict())  # tables are non-persistent buffers
    assert untied.num_params() - tied.num_params() == 97 * 32
    assert tied.num_params(exclude_embedding=True) == tied.num_params() - 97 * 32
    for name, t in make().state_dict().items():  # deterministic given the seed
        assert torch.equal(t, tied.state_dict()[name]), name
    big = make(dim=64, n_heads=4, ffn_hidden=256, vocab_size=512, n_layers=8)
    assert all((p == 1).all() for n, p in big.named_parameters() if n.endswith("norm.weight"))
    assert abs(big.tok_emb.weight.std().item() - 0.02) < 2e-3
    assert abs(big.layers[0].mlp.w2.weight.std().item() - 0.02 / 4) < 5e-4
    assert abs(big.layers[0].attn.wo.weight.std().item() - 0.02 / 4) < 5e-4


def rope_reference(x, theta):
    """Straightforward HF-Llama rotary embedding of x [B, H, T, hd]."""
    hd, T = x.shape[-1], x.shape[-2]
    inv_freq = torch.tensor([1.0 / theta ** (2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    rot = torch.cat([-x[..., hd // 2:], x[..., :hd // 2]], dim=-1)
    return x * cos + rot * sin


def test_rope_matches_reference_and_is_relative():
    model = make(rope_theta=500.0)
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    got = apply_rope(x, model.rope_cos, model.rope_sin)
    assert model.rope_cos.dtype == torch.float32
    torch.testing.assert_close(got, rope_reference(x, 500.0), atol=1e-6, rtol=1e-6)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    qs, ks = (apply_rope(v.expand(1, 1, 16, 8), model.rope_cos, model.rope_sin)[0, 0] for v in (q, k))
    torch.testing.assert_close(qs[5] @ ks[2], qs[13] @ ks[10])  # depends on the offset only


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make(n_kv_heads=1)
    mha = make(n_kv_heads=4)
    sd = gqa.state_dict()
    for i in range(TINY.n_layers):
        for w in ("wk", "wv"):
            key = f"layers.{i}.attn.{w}.weight"
            sd[key] = sd[key].view(1, 8, 32).repeat_interleave(4, dim=0).reshape(32, 32)
    mha.load_state_dict(sd)
    tokens, targets, w = batch()
    loss_mha, loss_gqa = mha(tokens, targets), gqa(tokens, targets)
    torch.testing.assert_close(loss_mha, loss_gqa)
    (loss_mha * w).sum().backward()
    (loss_gqa * w).sum().backward()
    for name, p in gqa.named_parameters():  # a shared K/V head gets the sum of its copies' gradients
        want = dict(mha.named_parameters())[name].grad
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            want = want.view(4, 8, 32).sum(0)
        torch.testing.assert_close(p.grad, want, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_hf_llama_bit_for_bit(dtype):
    """HF LlamaRMSNorm: fp32 normalisation, cast back, then the weight; forward and gradients."""
    norm = make().norm.to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(32) + 0.5)
    x = (torch.randn(3, 5, 32) * 3).to(dtype).requires_grad_()
    x_ref, w_ref = x.detach().clone().requires_grad_(), norm.weight.detach().clone().requires_grad_()
    xf = x_ref.float()
    ref = w_ref * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(dtype)
    got = norm(x)
    assert got.dtype == dtype and torch.equal(got, ref)
    g = torch.randn(3, 5, 32).to(dtype)
    got.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(norm.weight.grad, w_ref.grad)


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_causal(kv):
    model = make(n_kv_heads=kv)
    tokens, targets, _ = batch()
    base = model(tokens, targets)
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % TINY.vocab_size
    out = model(changed, targets)
    torch.testing.assert_close(out[:, :6], base[:, :6])
    assert not torch.allclose(out[:, 6:], base[:, 6:])


@pytest.mark.parametrize("mode", ["full", "every_n"])
def test_activation_checkpointing_gives_the_same_losses_and_gradients(mode):
    """Recomputed blocks (with dropout: the recomputation replays the RNG) change no bit."""
    tokens, targets, weights = batch()
    out = []
    for ac in ("none", mode):
        model = make(n_layers=3, dropout=0.2, activation_checkpointing=ac, activation_checkpointing_every=2)
        torch.manual_seed(5)
        loss = model(tokens, targets)
        (loss * weights).sum().backward()
        out.append((loss.detach(), grads(model)))
        assert [model._recomputed(i) for i in range(3)] == ([False] * 3 if ac == "none" else
                                                            [True, True, True] if ac == "full" else
                                                            [True, False, True])
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])
    model.eval()
    assert not model._recomputed(0)  # evaluation and scoring keep no graph: nothing to recompute


def test_too_long_sequence_raises():
    model = make()
    tokens = torch.zeros(1, TINY.max_seq_len + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens, tokens)


def test_dropout_train_vs_eval():
    model = make(dropout=0.2)
    tokens, targets, _ = batch()
    assert not torch.equal(model(tokens, targets), model(tokens, targets))
    model.eval()
    assert torch.equal(model(tokens, targets), model(tokens, targets))
    torch.testing.assert_close(model(tokens, targets), make()(tokens, targets))


def test_overfits_fixed_batch():
    model = make(seed=3)
    tokens, targets, _ = batch(seed=4, b=4, t=16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    first = None
    for _ in range(100):
        loss = model(tokens, targets).sum() / (targets != -100).sum()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < min(0.5, 0.1 * first), (first, loss.item())


def _zero3_worker(rank, world_size):
    """One ZeRO-3 rank: per-token loss and full gradients vs the plain model; returns mismatches.

    Covers tied/untied heads, models partitioned by initialize or built under zero.Init, and a second
    iteration (run with ZeRO-3's recorded prefetch trace). Persistence threshold 0 makes every
    parameter go through gather/release even in this tiny model; lr=0 keeps the weights fixed.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    ds_config = {"train_micro_batch_size_per_gpu": B, "train_batch_size": B * world_size,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "optimizer": {"type": "AdamW", "params": {"lr": 0.0, "weight_decay": 0.0,
                                                           "torch_adam": True}}}
    tokens, targets, w = batch()
    failures = []
    for tie, zero_init in [(True, False), (False, False), (True, True), (False, True)]:
        plain = make(tie_embeddings=tie, loss_chunk_tokens=5)
        ref = plain(tokens, targets)
        (ref * w).sum().backward()
        if zero_init:
            with deepspeed.zero.Init(config_dict_or_path=ds_config):
                model = make(tie_embeddings=tie, loss_chunk_tokens=5)
        else:
            model = copy.deepcopy(plain)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        assert (engine.module.lm_head.weight is engine.module.tok_emb.weight) == tie
        for it in range(2):
            loss = engine(tokens, targets)
            engine.backward((loss * w).sum())
            pairs = [("loss", loss, ref)] + [(name, safe_get_full_grad(p), q.grad) for (name, p), q in
                                             zip(engine.module.named_parameters(), plain.parameters())]
            for name, got, want in pairs:
                try:
                    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
                except AssertionError as e:
                    failures.append(f"tie={tie} zero_init={zero_init} it={it} {name}: {e}")
            engine.step()
    return failures


def test_zero3_matches_plain_model():
    (failures,) = run_distributed(_zero3_worker, world_size=1, deepspeed=True, timeout=120)
    assert not failures, "\n".join(failures)
