"""blade.config: loading, inherit, overrides, strict types, ranges, paths, dump round trip, layout."""
import glob
import os
import re

import pytest

from blade.config import (
    BladeConfig,
    config_to_dict,
    dump_config,
    load_config,
)
from blade.data.paths import check_paths
from blade.errors import BladeError, ConfigError
from blade.train.schedule import describe_layout

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def raises(msg):
    return pytest.raises(ConfigError, match=re.escape(msg))


def write(path, text):
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- defaults, overrides

def test_defaults_without_file():
    assert load_config(None) == BladeConfig()


def test_overrides_parse_values_as_yaml():
    cfg = load_config(None, ["train.steps=10", "logging.wandb=off", "optim.lr=1e-3",
                             "data.target=null", "run.name=my run", "logging.progress=false",
                             "deepspeed.extra.zero_optimization.stage3_param_persistence_threshold=0"])
    assert cfg.train.steps == 10
    assert cfg.logging.wandb == "off"
    assert cfg.optim.lr == 1e-3
    assert cfg.data.target is None
    assert cfg.run.name == "my run"
    assert cfg.logging.progress is False
    assert cfg.deepspeed.extra == {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def test_override_applies_over_file(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  steps: 5\n  seed: 7\n")
    cfg = load_config(path, ["train.steps=9"])
    assert (cfg.train.steps, cfg.train.seed) == (9, 7)


def test_override_into_empty_section(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n")
    assert load_config(path, ["train.steps=3"]).train.steps == 3


@pytest.mark.parametrize("bad", ["train.steps", "steps=10", "=3", "train.=1", ".steps=1"])
def test_malformed_override(bad):
    with raises(f"config error: override '{bad}' must look like key.sub=value"):
        load_config(None, [bad])


def test_override_through_a_value(tmp_path):
    path = write(tmp_path / "c.yaml", "train:\n  steps: 5\n")
    with raises("config error: train.steps must be an integer, got {'x': 1} (dict)"):
        load_config(path, ["train.steps.x=1"])


def test_override_invalid_yaml_value():
    with raises("config error: override 'train.steps=[1': value is not valid YAML"):
        load_config(None, ["train.steps=[1"])


# ----------------------------------------------------------------------------- unknown keys, types

def test_unknown_key_suggests_closest():
    with raises("config error: unknown key 'selection.gama' (did you mean 'selection.gamma'?)"):
        load_config(None, ["selection.gama=0.5"])


def test_unknown_key_lists_valid_keys():
    with raises("config error: unknown key 'run.zzz' (valid keys: dir, name)"):
        load_config(None, ["run.zzz=1"])


def test_unknown_section_suggests_closest(tmp_path):
    path = write(tmp_path / "c.yaml", "trian:\n  steps: 3\n")
    with raises("config error: unknown section 'trian' (did you mean 'train'?)"):
        load_config(path)


def test_section_must_be_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", "train: 5\n")
    with raises("config error: train must be a mapping of keys, got 5 (int)"):
        load_config(path)


@pytest.mark.parametrize("override, msg", [
    ("train.steps=ten", "train.steps must be an integer, got 'ten' (str)"),
    ("train.steps=1.5", "train.steps must be an integer, got 1.5 (float)"),
    ("train.steps=true", "train.steps must be an integer, got True (bool)"),
    ("optim.lr=fast", "optim.lr must be a number, got 'fast' (str)"),
    ("logging.progress=1", "logging.progress must be true or false, got 1 (int)"),
    ("logging.progress='yes'", "logging.progress must be true or false, got 'yes' (str)"),
    ("run.dir=null", "run.dir must be a string, got None (NoneType)"),
    ("deepspeed.extra=5", "deepspeed.extra must be a mapping, got 5 (int)"),
    ("selection.strategy=rho", "selection.strategy must be one of full, random, rho1, blade; got 'rho'"),
    ("logging.wandb=true", "logging.wandb must be one of off, offline, online; got True"),
])
def test_wrong_type(override, msg):
    with raises("config error: " + msg):
        load_config(None, [override])


def test_type_coercions_that_are_allowed():
    cfg = load_config(None, ["optim.lr=1", "logging.progress=yes", "run.name=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.logging.progress is True  # a YAML 1.1 boolean
    assert cfg.run.name is None


# ----------------------------------------------------------------------------- ranges

@pytest.mark.parametrize("override, msg", [
    ("selection.gamma=1.5", "selection.gamma must be in (0, 1], got 1.5"),
    ("selection.gamma=0", "selection.gamma must be in (0, 1], got 0.0"),
    ("selection.eta=-0.1", "selection.eta must be in [0, 1], got -0.1"),
    ("selection.tau=0", "selection.tau must be >= 1, got 0"),
    ("selection.k_ref_steps=-1", "selection.k_ref_steps must be >= 0, got -1"),
    ("selection.rho1_ref_steps=-1", "selection.rho1_ref_steps must be >= 0, got -1"),
    ("selection.lam=-1", "selection.lam must be >= 0, got -1.0"),
    ("selection.warmup_full_ce_steps=-1", "selection.warmup_full_ce_steps must be >= 0, got -1"),
    ("selection.diag_interval=-1", "selection.diag_interval must be >= 0, got -1"),
    ("train.steps=0", "train.steps must be >= 1, got 0"),
    ("train.micro_batch_size=0", "train.micro_batch_size must be >= 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum must be >= 1, got 0"),
    ("train.eval_interval=-1", "train.eval_interval must be >= 0, got -1"),
    ("train.eval_sequences=-1", "train.eval_sequences must be >= 0, got -1"),
    ("optim.lr=0", "optim.lr must be > 0, got 0.0"),
    ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio must be in [0, 1], got 1.5"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0, got -1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0, got -0.1"),
    ("optim.beta1=1", "optim.beta1 must be in [0, 1), got 1.0"),
    ("optim.beta2=-0.5", "optim.beta2 must be in [0, 1), got -0.5"),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0, got -1.0"),
    ("model.dropout=1", "model.dropout must be in [0, 1), got 1.0"),
    ("model.vocab_size=1", "model.vocab_size must be >= 2, got 1"),
    ("model.loss_chunk_tokens=0", "model.loss_chunk_tokens must be >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0, got -1"),
    ("deepspeed.zero_stage=4", "deepspeed.zero_stage must be one of 0, 1, 2, 3, got 4"),
    ("checkpoint.interval=-1", "checkpoint.interval must be >= 0, got -1"),
    ("checkpoint.keep_last_n=0", "checkpoint.keep_last_n must be >= 1, got 0"),
    ("train.max_wall_time_s=-1", "train.max_wall_time_s must be >= 0, got -1.0"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps must be >= 1, got 0"),
    ("dist.timeout_s=0", "dist.timeout_s must be >= 1, got 0"),
])
def test_out_of_range(override, msg):
    with raises("config error: " + msg):
        load_config(None, [override])


def test_model_shape_checks():
    with raises("config error: model.dim (130) must be divisible by model.n_heads (4)"):
        load_config(None, ["model.dim=130"])
    with raises("config error: head size model.dim / model.n_heads = 33 must be even (RoPE"):
        load_config(None, ["model.dim=132"])
    with raises("config error: model.n_heads (4) must be divisible by model.n_kv_heads (3)"):
        load_config(None, ["model.n_kv_heads=3"])


def test_resume(tmp_path):
    with raises("config error: checkpoint.resume: no checkpoint at 'nope' "
                "(use auto, none or an existing checkpoint directory)"):
        load_config(None, ["checkpoint.resume=nope"])
    assert load_config(None, ["checkpoint.resume=auto"]).checkpoint.resume == "auto"
    assert load_config(None, [f"checkpoint.resume={tmp_path}"]).checkpoint.resume == str(tmp_path)


def test_fault_tolerance_keys():
    cfg = load_config(None)
    assert (cfg.train.max_wall_time_s, cfg.train.max_nonfinite_steps) == (0.0, 5)
    assert cfg.checkpoint.allow_data_change is False
    cfg = load_config(None, ["train.max_wall_time_s=3600", "train.max_nonfinite_steps=2",
                             "checkpoint.allow_data_change=true"])
    assert (cfg.train.max_wall_time_s, cfg.train.max_nonfinite_steps) == (3600.0, 2)
    assert cfg.checkpoint.allow_data_change is True
    with raises("config error: checkpoint.allow_data_change must be true or false, got 'yes please' (str)"):
        load_config(None, ["checkpoint.allow_data_change=yes please"])


# ----------------------------------------------------------------------------- files

def test_init_from_must_exist(tmp_path):
    assert load_config(None).model.init_from is None
    with pytest.raises(BladeError, match="is not a Hugging Face checkpoint directory"):
        load_config(None, [f"model.init_from={tmp_path}"])  # exists, but holds no checkpoint
    with raises("config error: model.init_from: no checkpoint at"):
        load_config(None, [f"model.init_from={tmp_path / 'nope.gguf'}"])


def test_check_paths(tmp_path):
    for name in ("train", "val"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text('{"seq_len": 32}')
    (tmp_path / "target").mkdir()
    cfg = load_config(None, [f"data.train={tmp_path}/train", f"data.val={tmp_path}/val",
                             f"data.target={tmp_path}/target"])
    with raises(f"config error: data.target: no manifest.json in '{tmp_path}/target' "
                "(run `blade prepare` first, or fix the path)"):
        check_paths(cfg)
    cfg.data.target = None
    with raises("config error: selection.strategy=blade needs data.target"):
        check_paths(cfg)
    cfg.selection.strategy = "full"
    check_paths(cfg)
    cfg.data.train = "data/x"
    with raises("config error: data.train: no manifest.json in 'data/x' (run `blade prepare` first"):
        check_paths(cfg)


def test_data_that_cannot_work_is_refused_up_front(tmp_path):
    """Before any engine is built (and at --dry-run): sequences longer than the model, target and pool
    sequences of different lengths (the reference trains on both in one batch), unreadable manifests."""
    def data(name, text):
        (tmp_path / name).mkdir(exist_ok=True)
        (tmp_path / name / "manifest.json").write_text(text)
        return f"data.{name}={tmp_path / name}"

    base = [data("train", '{"seq_len": 64}'), data("val", '{"seq_len": 32}'), "model.max_seq_len=64"]
    check_paths(load_config(None, base + [data("target", '{"seq_len": 64}')]))
    with raises("config error: data.target has seq_len 32 but data.train has 64: the reference trains on "
                "both in one batch; prepare them with the same --seq-len"):
        check_paths(load_config(None, base + [data("target", '{"seq_len": 32}')]))
    none = ["data.target=null", "selection.strategy=random"]
    check_paths(load_config(None, base + none))  # no reference: no target needed
    with raises("config error: the data's seq_len 64 (data.train) exceeds model.max_seq_len 32"):
        check_paths(load_config(None, base + none + ["model.max_seq_len=32"]))
    with raises("config error: data.val: cannot read seq_len from"):
        check_paths(load_config(None, base + none + [data("val", "[1, 2")]))


@pytest.mark.parametrize("overrides, msg", [
    (["selection.k_ref_steps=0"], "selection.k_ref_steps must be >= 1 for strategy blade"),
    (["selection.strategy=rho1", "selection.rho1_ref_steps=0"], "selection.rho1_ref_steps must be >= 1"),
    (["selection.ref_precision=bf16", "deepspeed.zero_stage=0"],
     "selection.ref_precision=bf16 with train.precision=fp32 needs deepspeed.zero_stage >= 1"),
])
def test_combinations_that_would_fail_late_are_refused(overrides, msg):
    with raises("config error: " + msg):
        load_config(None, overrides)
    from blade.cli import main

    assert main(["train", "--dry-run", *overrides]) == 2  # the dry run refuses them too


def test_combinations_that_work_are_accepted():
    load_config(None, ["selection.strategy=random", "selection.k_ref_steps=0"])  # no reference
    load_config(None, ["selection.ref_precision=bf16", "deepspeed.zero_stage=1"])
    load_config(None, ["selection.ref_precision=bf16", "deepspeed.zero_stage=0", "train.precision=bf16"])


def test_missing_config_file():
    with raises("config error: config file 'x.yaml' not found"):
        load_config("x.yaml")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "train:\n  steps: 3\n  seed: [1\n")
    with pytest.raises(ConfigError, match=r"config error: invalid YAML in '.*bad\.yaml' line \d+") as e:
        load_config(path)
    assert "\n" not in str(e.value)


def test_top_level_must_be_mapping(tmp_path):
    path = write(tmp_path / "c.yaml", "- a\n- b\n")
    with raises("must hold a mapping of sections, got list"):
        load_config(path)


def test_sci_notation_is_a_float(tmp_path):
    path = write(tmp_path / "c.yaml", "optim:\n  lr: 3e-4\n  eps: 1e-8\n")
    cfg = load_config(path)
    assert (cfg.optim.lr, cfg.optim.eps) == (3e-4, 1e-8)


# ----------------------------------------------------------------------------- inherit

def test_inherit_chain_deep_merges(tmp_path):
    write(tmp_path / "a.yaml", "model:\n  dim: 64\n  n_layers: 3\n"
                               "deepspeed:\n  extra:\n    x: {p: 1, q: 2}\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "b.yaml", "inherit: ../a.yaml\nmodel:\n  dim: 96\n"
                                       "deepspeed:\n  extra:\n    x: {q: 3}\n")
    path = write(tmp_path / "sub" / "c.yaml", "inherit: b.yaml\ntrain:\n  steps: 7\n")
    cfg = load_config(path)
    assert (cfg.model.dim, cfg.model.n_layers, cfg.train.steps) == (96, 3, 7)
    assert cfg.deepspeed.extra == {"x": {"p": 1, "q": 3}}


def test_inherit_cycle(tmp_path):
    write(tmp_path / "a.yaml", "inherit: b.yaml\n")
    path = write(tmp_path / "b.yaml", "inherit: a.yaml\n")
    with raises("config error: inherit cycle:"):
        load_config(path)


def test_inherit_missing_file(tmp_path):
    path = write(tmp_path / "a.yaml", "inherit: gone.yaml\n")
    with raises(f"config error: config file '{tmp_path}/gone.yaml' not found (inherited by '{path}')"):
        load_config(path)


# ----------------------------------------------------------------------------- dump, shipped configs

def test_dump_load_round_trip(tmp_path):
    cfg = load_config(None, ["optim.eps=1e-12", "run.name=null", "data.val=null", "logging.wandb=off",
                             "run.dir='123'", "deepspeed.extra.a.b=[1, 2]", "model.rope_theta=500000"])
    path = str(tmp_path / "run" / "config.yaml")
    dump_config(cfg, path)
    assert load_config(path) == cfg
    assert config_to_dict(cfg)["deepspeed"]["extra"] == {"a": {"b": [1, 2]}}


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.yaml"))),
                         ids=os.path.basename)
def test_shipped_configs_load(path):
    from blade.config_yaml import read_yaml

    init = (read_yaml(path).get("model") or {}).get("init_from")
    # a recipe's checkpoint that is not downloaded here (tests/test_families.py resolves it from its config.json)
    load_config(path, [] if init is None or os.path.exists(init) else ["model.init_from=null"])


def test_shipped_config_values():
    q = load_config(os.path.join(CONFIGS, "quickstart.yaml"))
    assert (q.run.dir, q.data.train, q.model.vocab_size, q.model.max_seq_len) == \
        ("runs/quickstart", "data/builtin/train", 2048, 128)
    assert (q.train.steps, q.selection.gamma, q.selection.tau, q.selection.k_ref_steps) == (150, 0.6, 40, 20)
    assert (q.logging.wandb, q.deepspeed.zero_stage, q.optim.lr) == ("offline", 3, 2e-3)
    t = load_config(os.path.join(CONFIGS, "tiny_test.yaml"))
    assert (t.model.dim, t.model.ffn_hidden, t.train.steps, t.train.micro_batch_size) == (64, 176, 20, 4)
    assert (t.logging.wandb, t.logging.progress, t.selection.tau) == ("off", False, 40)
    tl = load_config(os.path.join(CONFIGS, "tinyllama-1.1b.yaml"))
    assert (tl.model.n_kv_heads, tl.model.tie_embeddings, tl.selection.tau, tl.train.steps) == \
        (4, False, 1000, 5000)


# ----------------------------------------------------------------------------- describe_layout

def test_describe_layout_arithmetic():
    cfg = load_config(None, ["train.micro_batch_size=8", "train.grad_accum=2", "train.steps=120",
                             "selection.tau=40", "selection.warmup_full_ce_steps=20"])
    text = describe_layout(cfg, world_size=2, seq_len=128)
    assert "2 ranks x micro-batch 8 x grad accum 2" in text
    assert "32 sequences x seq_len 128 = 4,096 tokens per step" in text
    assert f"{120 * 4096:,} tokens seen" in text
    assert f"~{round(4096 * (20 + 100 * 0.6)):,} trained" in text
    assert "3 reference syncs" in text


def test_describe_layout_full_and_uneven_syncs():
    full = describe_layout(load_config(None, ["selection.strategy=full"]), 1, 64)
    assert "all trained" in full and "syncs" not in full
    blade = describe_layout(load_config(None, ["train.steps=101", "selection.tau=50"]), 1, 64)
    assert "3 reference syncs (ceil(101 / 50))" in blade
