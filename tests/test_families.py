"""Model families (blade/interop/families.py): Llama 3.x with llama3 RoPE scaling (tied and untied heads)
and Qwen2 (q/k/v biases, tied head), each a small random model that `transformers` builds offline from
a config and saves:

- imported by blade: per-token losses equal transformers' within 1e-5;
- exported by blade: transformers re-loads it (the family's class) with blade's logits;
- trained 5 steps on 2 gloo ranks under ZeRO-3 from model.init_from: the same losses as one process,
  and the trained run exported (blade export -> export-hf) gives transformers the run's logits.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blade.config import ModelConfig
from blade.interop.export_hf import export_hf
from blade.interop.pretrained import load_pretrained, model_config_from_pretrained
from blade.model.transformer import Transformer

transformers = pytest.importorskip("transformers", reason="pip install -e .[test] (transformers)")

ATOL = 1e-5     # fp32, 2 layers: measured max |diff| ~ 2e-6 (losses) and ~ 3e-6 (logits)
VOCAB = 512     # the vocabulary of the tests' built-in data (tests/conftest.py)
# head_dim 8, theta 500: wavelengths 6.3, 30, 140, 660 against original_max 32 / high 4 = 8 and
# 32 / low 1 = 32: one frequency kept, one on the smooth ramp, two divided by the factor
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 4.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
CASES = {"llama3-tied": ("LlamaConfig", True, LLAMA3),
         "llama3-untied": ("LlamaConfig", False, LLAMA3),
         "qwen2-tied": ("Qwen2Config", True, {"rope_type": "default", "rope_theta": 1e6})}


def family_checkpoint(root, case: str, seed: int = 0):
    """A random model of the case's family (non-trivial norms and biases) saved by transformers."""
    config_class, tie, rope = CASES[case]
    cfg = getattr(transformers, config_class)(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters=dict(rope), attn_implementation="eager")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    model.save_pretrained(str(root))
    return str(root), model


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    return (request.param, *family_checkpoint(tmp_path_factory.mktemp(request.param), request.param))


def tokens(T=40, seed=1):
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


def import_model(path) -> Transformer:
    model = Transformer(ModelConfig(**model_config_from_pretrained(path))).eval()
    load_pretrained(model, path)
    return model


def per_token_losses(logits, x):
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")


def test_import_gives_transformers_per_token_losses(case):
    name, path, hf = case
    fields = model_config_from_pretrained(path)
    assert fields["qkv_bias"] == name.startswith("qwen2")
    assert fields["tie_embeddings"] == name.endswith("-tied")
    assert fields["rope_scaling"] == ("llama3" if name.startswith("llama3") else "none")
    if name.startswith("llama3"):
        assert (fields["rope_scaling_factor"], fields["rope_low_freq_factor"], fields["rope_high_freq_factor"],
                fields["rope_original_max_seq_len"], fields["rope_theta"]) == (4.0, 1.0, 4.0, 32, 500.0)
    model = import_model(path)
    assert (model.lm_head.weight is model.tok_emb.weight) == fields["tie_embeddings"]
    x = tokens()
    with torch.no_grad():
        ref = per_token_losses(hf(x).logits, x)
        got = model(x[:, :-1], x[:, 1:])
    assert (got - ref).abs().max().item() < ATOL
    if name.startswith("llama3"):  # the scaling matters: plain RoPE on the same weights is far off
        plain = Transformer(ModelConfig(**{**fields, "rope_scaling": "none"})).eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            plain = plain(x[:, :-1], x[:, 1:])
        assert (plain - ref).abs().max().item() > 100 * ATOL


def test_export_reloads_in_transformers_with_equal_logits(case, tmp_path):
    name, path, hf = case
    model = import_model(path)
    with torch.no_grad():  # the exported weights differ from the imported ones
        model.layers[0].attn.wk.weight.mul_(1.5)
        if model.cfg.qkv_bias:
            model.layers[1].attn.wq.bias.add_(0.3)
    out = export_hf(model, str(tmp_path / "hf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back) is type(hf)
    assert back.config.tie_word_embeddings == model.cfg.tie_embeddings
    assert back.config.rope_parameters == hf.config.rope_parameters
    x = tokens(seed=2)
    with torch.no_grad():
        assert (back(x).logits - model.logits(x)).abs().max().item() < ATOL
    again = import_model(out)  # and blade reads its own export back bit for bit
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def test_qwen2_gguf_is_not_permuted(tmp_path):
    """llama.cpp writes Qwen2 Q/K rows in HF's rotate-half layout (and its biases as attn_q.bias)."""
    from tests.test_interop import write_gguf

    path, hf = family_checkpoint(tmp_path / "hf", "qwen2-tied")
    file = write_gguf(tmp_path / "q.gguf", hf, arch="qwen2", rope_theta=1e6)
    assert model_config_from_pretrained(file) == model_config_from_pretrained(path)
    got, expected = import_model(file), import_model(path)
    for layer in expected.layers:  # write_gguf stores ffn_up as fp16
        layer.mlp.w3.weight.data = layer.mlp.w3.weight.data.half().float()
    for (n, a), b in zip(expected.named_parameters(), got.parameters()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- 2 ranks, ZeRO-3

def _fit(rank, world, overrides):
    from blade.config import load_config
    from blade.runtime.dist import World
    from blade.train.loop import Trainer
    from tests.conftest import TINY

    return Trainer(load_config(TINY, overrides), World(rank, world, rank, "cpu")).fit()


@pytest.mark.parametrize("name", list(CASES))
def test_continual_training_on_two_zero3_ranks_equals_one_process(name, tmp_path, builtin_data):
    from blade.interop.export import export, load_exported
    from blade.runtime.metrics import read_metrics
    from tests.conftest import tiny_overrides
    from tests.dist_harness import run_distributed
    from tests.test_loop import assert_same_losses

    path, hf = family_checkpoint(tmp_path / "hf", name)
    losses = {}
    for world, micro in ((1, 8), (2, 4)):  # the same global batch of 8 sequences
        run_dir = str(tmp_path / f"w{world}")
        # configs/tiny_test.yaml's shape keys give way to the checkpoint's (not named on the command line)
        overrides = tiny_overrides(builtin_data, run_dir, f"model.init_from={path}", "selection.strategy=full",
                                   "train.steps=5", f"train.micro_batch_size={micro}", "train.eval_interval=0",
                                   "deepspeed.zero_stage=3", "optim.lr=1e-3", "optim.warmup_steps=0")
        run_distributed(_fit, world, args=(overrides,), deepspeed=True)
        losses[world] = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert_same_losses(losses[1], losses[2])
    assert len(losses[2]) == 5
    # the trained 2-rank run: blade export -> export-hf -> transformers gives the run's logits
    export(str(tmp_path / "w2"), str(tmp_path / "export"))
    trained = load_exported(str(tmp_path / "export"))
    out = export_hf(str(tmp_path / "export" / "model.safetensors"), str(tmp_path / "export-hf"))
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(back) is type(hf)
    x = tokens(T=32, seed=3)
    with torch.no_grad():
        assert (back(x).logits - trained.logits(x)).abs().max().item() < ATOL
        moved = (back(x).logits - hf(x).logits).abs().max().item()
    assert moved > 1e-3  # five steps at lr 1e-3 changed the model
    from blade.eval.harness import as_hf_checkpoint  # `blade eval RUN` converts the run the same way

    again = transformers.AutoModelForCausalLM.from_pretrained(as_hf_checkpoint(str(tmp_path / "w2"), str(
        tmp_path / "eval")), attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(again(x).logits, back(x).logits)
    assert np.isclose(trained.cfg.rope_theta, hf.config.rope_parameters["rope_theta"])


# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B, transformers 4.45 format: legacy rope_scaling)
LLAMA_32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256}


def test_the_1b_recipe_resolves_from_llama_3_2_1b(tmp_path):
    """configs/continual-llama3.2-1b.yaml against Llama-3.2-1B's config.json: the shape, the llama3 RoPE
    scaling and the tied head come from the checkpoint; 1.24 B parameters, as Meta states."""
    import json
    import os

    from blade.config import load_config
    from blade.model.memory import param_count

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_32_1B))
    recipe = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "continual-llama3.2-1b.yaml")
    m = load_config(recipe, [f"model.init_from={tmp_path}"]).model
    assert (m.vocab_size, m.dim, m.n_layers, m.n_heads, m.n_kv_heads, m.ffn_hidden) == (128256, 2048, 16, 32, 8, 8192)
    assert (m.rope_scaling, m.rope_scaling_factor, m.rope_original_max_seq_len, m.rope_theta) == \
        ("llama3", 32.0, 8192, 500000.0)
    assert m.tie_embeddings and not m.qkv_bias and m.max_seq_len == 2048
    assert round(param_count(m) / 1e9, 2) == 1.24
