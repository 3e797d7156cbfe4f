"""Typed configuration: one dataclass per component, loaded from commented YAML, `a.b=value` overrides.

    cfg = load_config("configs/quickstart.yaml", ["train.steps=10", "logging.wandb=off"])

YAML is data (safe loader, never executed). `inherit: other.yaml` deep-merges a file over another.
Every user mistake raises ConfigError with one line naming the problem and the fix. The dataclass
schema is frozen: other modules code against these names.
"""
from __future__ import annotations

import difflib
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from blade.config_yaml import apply_override, deep_merge, read_yaml  # noqa: F401 (deep_merge: re-exported)
from blade.errors import ConfigError

STRATEGIES = ("full", "random", "rho1", "blade")  # the baselines and BLADE, behind selection.strategy
STRATEGIES_WITH_REFERENCE = ("rho1", "blade")     # the ones that score with a reference model


@dataclass
class RunConfig:
    dir: str = "runs/default"          # run directory: config.yaml, metrics.jsonl, checkpoints/
    name: Optional[str] = None         # display name (wandb); defaults to the basename of dir


@dataclass
class ModelConfig:
    vocab_size: int = 2048
    dim: int = 128                     # d_model
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2                # grouped-query attention: n_heads % n_kv_heads == 0
    ffn_hidden: int = 352              # SwiGLU hidden size
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False             # bias on the q/k/v projections (Qwen2), none on the output one
    # RoPE frequency scaling: none | llama3 (Llama-3.1+: low frequencies divided by rope_scaling_factor,
    # high ones kept, a smooth ramp between; wavelength bounds from rope_original_max_seq_len)
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    dropout: float = 0.0
    init_std: float = 0.02
    loss_chunk_tokens: int = 2048      # tokens per chunk of the per-token cross-entropy
    # recompute blocks in the backward instead of keeping their activations: none | full (every block)
    # | every_n (blocks 0, n, 2n, ...; n = activation_checkpointing_every); the gradients are the same
    activation_checkpointing: Literal["none", "full", "every_n"] = "none"
    activation_checkpointing_every: int = 2
    init_from: Optional[str] = None    # pretrained HF directory or .gguf (docs/interop.md): weights and shape


@dataclass
class DataConfig:
    # training pool: a directory written by `blade prepare`, or {directory: weight, ...} to draw from
    # several in those proportions (blade/data/mixture.py)
    train: Union[str, dict] = "data/builtin/train"
    target: Union[str, dict, None] = "data/builtin/target"  # target set D_val the reference trains on (or a mixture)
    val: Optional[str] = "data/builtin/val"        # held-out evaluation set
    shuffle: bool = True
    num_workers: int = 0               # dataloader worker processes per rank
    on_bad_shard: Literal["error", "skip"] = "error"
    on_exhausted: Literal["repeat", "stop"] = "repeat"  # a training source runs out: next epoch, or end the run

    def dirs(self, key: str) -> list[str]:
        """The directories of data.train / data.target / data.val: one, those of a mixture, or none."""
        value = getattr(self, key)
        return list(value) if isinstance(value, dict) else [value] if value is not None else []


@dataclass
class TrainConfig:
    steps: int = 200                   # optimizer steps of the proxy
    seed: int = 1234
    micro_batch_size: int = 8          # sequences per rank per micro-batch
    grad_accum: int = 1                # micro-batches per optimizer step
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_interval: int = 50            # 0 = never
    eval_sequences: int = 0            # sequences of data.val per evaluation (the first ones); 0 = all
    max_wall_time_s: float = 0.0       # stop (checkpoint, exit 75) before this much wall time; 0 = off
    max_nonfinite_steps: int = 5       # abort after this many non-finite (skipped) steps in a row
    compile: bool = False              # torch.compile each transformer block (inductor; CPU needs a C++ compiler)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1          # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0             # 0 = off
    fused: bool = False                # torch's fused AdamW kernel (CPU and GPU; not bitwise equal to the loop)


@dataclass
class SelectionConfig:
    strategy: Literal[STRATEGIES] = "blade"
    gamma: float = 0.6                 # keep ratio: top ceil(gamma * n_valid) tokens of the global batch
    tau: int = 50                      # blade: re-sync the reference from the proxy every tau steps
    k_ref_steps: int = 15              # blade: reference steps after each sync (K)
    rho1_ref_steps: int = 50           # rho1: steps training the static reference once (K0)
    lam: float = 1.0                   # lambda: weight of the masked train-pool term in the reference loss
    eta: float = 1.0                   # Frank-Wolfe step: weights (1-eta)*gamma + eta*mask; 1 = hard mask
    warmup_full_ce_steps: int = 0      # plain CE on all tokens before the first selection
    ref_precision: Literal["same", "bf16"] = "same"
    ref_offload: bool = False          # ZeRO-3: keep the reference's parameters on the CPU
    diag_interval: int = 25            # steps between score histograms / dist_u_w / per-source rates; 0 = off
    exact_interval: int = 0            # steps between exact bi-level oracle measurements (tiny models); 0 = off
    exact_target_sequences: int = 64   # first sequences of data.target in the oracle's fixed target batch


@dataclass
class CheckpointConfig:
    interval: int = 0                  # steps between checkpoints; 0 = only at syncs (if any) and the end
    resume: str = "none"               # none | auto | PATH
    keep_last_n: int = 3
    allow_data_change: bool = False    # resume on data whose fingerprint differs (same positions)


@dataclass
class LoggingConfig:
    wandb: Literal["off", "offline", "online"] = "offline"
    wandb_project: str = "blade"
    progress: bool = True              # console progress bar on rank 0


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 3
    overlap_comm: bool = False
    extra: dict = field(default_factory=dict)  # raw DeepSpeed keys, deep-merged last (escape hatch)


@dataclass
class DistConfig:
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    timeout_s: int = 300
    threads_per_rank: int = 0          # 0 = cores // local ranks


@dataclass
class BladeConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    dist: DistConfig = field(default_factory=DistConfig)


# ----------------------------------------------------------------------------- strict conversion

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               dict: "a mapping"}


def _unknown(kind: str, name: str, valid: list[str], prefix: str = "") -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid {kind}s: {', '.join(valid)}"
    return ConfigError(f"config error: unknown {kind} '{prefix}{name}' ({hint})")


def _check(name: str, value, tp):
    """Return `value` if it has type `tp` (int widens to float), else raise a one-line ConfigError."""
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if value is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value not in choices:
            raise ConfigError(f"config error: {name} must be one of {', '.join(map(str, choices))}; "
                              f"got {value!r}")
        return value
    if get_origin(tp) is Union:  # Optional[X] or X | Y
        if value is None and type(None) in get_args(tp):
            return None
        options = [a for a in get_args(tp) if a is not type(None)]
        for option in options[:-1]:
            if isinstance(value, option) and not isinstance(value, bool):
                return value
        tp = options[-1]
        if len(options) > 1 and not isinstance(value, tp):
            raise ConfigError(f"config error: {name} must be {' or '.join(_TYPE_NAMES[a] for a in options)}, "
                              f"got {value!r} ({type(value).__name__})")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (isinstance(value, bool) and tp is not bool):
        raise ConfigError(f"config error: {name} must be {_TYPE_NAMES[tp]}, "
                          f"got {value!r} ({type(value).__name__})")
    return value


_RENAMED = {  # keys of earlier versions -> what replaced them
    "train.eval_batches": "use train.eval_sequences, the number of data.val sequences per evaluation "
                          "(the same set on any world size; 0 = all)",
}


def _section(name: str, cls, raw) -> object:
    if raw is None:  # a section header with every key commented out
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {name} must be a mapping of keys, "
                          f"got {raw!r} ({type(raw).__name__})")
    hints = get_type_hints(cls)
    for key in raw:
        if f"{name}.{key}" in _RENAMED:
            raise ConfigError(f"config error: {name}.{key} is gone: {_RENAMED[f'{name}.{key}']}")
        if key not in hints:
            raise _unknown("key", str(key), list(hints), prefix=f"{name}.")
    return cls(**{k: _check(f"{name}.{k}", v, hints[k]) for k, v in raw.items()})


def _from_dict(raw: dict) -> BladeConfig:
    hints = get_type_hints(BladeConfig)
    for name in raw:
        if name not in hints:
            raise _unknown("section", str(name), list(hints))
    return BladeConfig(**{name: _section(name, hints[name], sec) for name, sec in raw.items()})


# ----------------------------------------------------------------------------- validation

_RULES = {
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= 2": lambda v: v >= 2,
    "> 0": lambda v: v > 0,
    "in (0, 1]": lambda v: 0 < v <= 1,
    "in [0, 1]": lambda v: 0 <= v <= 1,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "one of 0, 1, 2, 3": lambda v: v in (0, 1, 2, 3),
}

_RANGES = {
    "model.vocab_size": ">= 2", "model.dim": ">= 1", "model.n_layers": ">= 1",
    "model.n_heads": ">= 1", "model.n_kv_heads": ">= 1", "model.ffn_hidden": ">= 1",
    "model.max_seq_len": ">= 1", "model.rope_theta": "> 0", "model.norm_eps": "> 0",
    "model.rope_scaling_factor": ">= 1", "model.rope_low_freq_factor": "> 0",
    "model.rope_original_max_seq_len": ">= 1",
    "model.dropout": "in [0, 1)", "model.init_std": "> 0", "model.loss_chunk_tokens": ">= 1",
    "model.activation_checkpointing_every": ">= 1",
    "data.num_workers": ">= 0",
    "train.steps": ">= 1", "train.seed": ">= 0", "train.micro_batch_size": ">= 1",
    "train.grad_accum": ">= 1", "train.eval_interval": ">= 0", "train.eval_sequences": ">= 0",
    "train.max_wall_time_s": ">= 0", "train.max_nonfinite_steps": ">= 1",
    "optim.lr": "> 0", "optim.min_lr_ratio": "in [0, 1]", "optim.warmup_steps": ">= 0",
    "optim.weight_decay": ">= 0", "optim.beta1": "in [0, 1)", "optim.beta2": "in [0, 1)",
    "optim.eps": "> 0", "optim.grad_clip": ">= 0",
    "selection.gamma": "in (0, 1]", "selection.tau": ">= 1", "selection.k_ref_steps": ">= 0",
    "selection.rho1_ref_steps": ">= 0", "selection.lam": ">= 0", "selection.eta": "in [0, 1]",
    "selection.warmup_full_ce_steps": ">= 0", "selection.diag_interval": ">= 0",
    "selection.exact_interval": ">= 0", "selection.exact_target_sequences": ">= 1",
    "checkpoint.interval": ">= 0", "checkpoint.keep_last_n": ">= 1",
    "deepspeed.zero_stage": "one of 0, 1, 2, 3",
    "dist.timeout_s": ">= 1", "dist.threads_per_rank": ">= 0",
}


MIN_WEIGHT = 1 / 1024  # a mixture draws in blocks of 1024 sequences (blade/data/mixture.py)


def _check_mixture(name: str, weights: dict) -> None:
    """{directory: weight}: at least one directory, positive numeric weights, none below MIN_WEIGHT."""
    if not weights:
        raise ConfigError(f"config error: {name} is an empty mapping: give a directory, or "
                          "{directory: weight, ...}")
    for path, w in weights.items():
        if not isinstance(path, str) or isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
            raise ConfigError(f"config error: {name}: {path!r}: {w!r} must be a directory name with a "
                              "weight > 0")
        if w / sum(weights.values()) < MIN_WEIGHT:
            raise ConfigError(f"config error: {name}: the weight of {path} is below 1/1024 of the total: "
                              "raise it or leave the directory out")


def validate(cfg: BladeConfig) -> None:
    """Range and consistency checks on a typed config (the data directories: blade/data/paths.py)."""
    for name, rule in _RANGES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if not _RULES[rule](value):
            raise ConfigError(f"config error: {name} must be {rule}, got {value}")
    m = cfg.model
    if m.dim % m.n_heads:
        raise ConfigError(f"config error: model.dim ({m.dim}) must be divisible by "
                          f"model.n_heads ({m.n_heads})")
    if (m.dim // m.n_heads) % 2:
        raise ConfigError(f"config error: head size model.dim / model.n_heads = {m.dim // m.n_heads} "
                          f"must be even (RoPE rotates pairs of dimensions)")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"config error: model.n_heads ({m.n_heads}) must be divisible by "
                          f"model.n_kv_heads ({m.n_kv_heads})")
    if m.rope_scaling == "llama3" and m.rope_high_freq_factor <= m.rope_low_freq_factor:
        raise ConfigError(f"config error: model.rope_high_freq_factor ({m.rope_high_freq_factor}) must be "
                          f"greater than model.rope_low_freq_factor ({m.rope_low_freq_factor})")
    sel = cfg.selection
    steps_key = {"blade": "k_ref_steps", "rho1": "rho1_ref_steps"}.get(sel.strategy)
    if steps_key and getattr(sel, steps_key) == 0:
        raise ConfigError(f"config error: selection.{steps_key} must be >= 1 for strategy {sel.strategy}: "
                          "an untrained reference equals the proxy, every score is 0 and the tie-break "
                          "alone would choose the tokens (for that, use selection.strategy=random)")
    if (sel.strategy in STRATEGIES_WITH_REFERENCE and sel.ref_precision == "bf16"
            and cfg.train.precision == "fp32" and cfg.deepspeed.zero_stage == 0):
        raise ConfigError("config error: selection.ref_precision=bf16 with train.precision=fp32 needs "
                          "deepspeed.zero_stage >= 1 (at stage 0 the two engines keep different master "
                          "copies and the sync cannot copy one into the other); raise the stage or use "
                          "ref_precision=same")
    if sel.exact_interval and cfg.data.target is None:
        raise ConfigError("config error: selection.exact_interval needs data.target (the oracle measures "
                          "the change of the target loss): set data.target or selection.exact_interval=0")
    if sel.exact_interval and cfg.train.precision == "bf16" and cfg.deepspeed.zero_stage == 0:
        raise ConfigError("config error: selection.exact_interval with train.precision=bf16 needs "
                          "deepspeed.zero_stage >= 1 (the oracle reads the fp32 master weights and AdamW "
                          "moments where ZeRO keeps them); raise the stage or set selection.exact_interval=0")
    if m.init_from is not None and not os.path.exists(m.init_from):
        raise ConfigError(f"config error: model.init_from: no checkpoint at '{m.init_from}' (give a "
                          "Hugging Face checkpoint directory or a .gguf file)")
    for key in ("train", "target"):
        if isinstance(getattr(cfg.data, key), dict):
            _check_mixture(f"data.{key}", getattr(cfg.data, key))
    resume = cfg.checkpoint.resume
    if resume not in ("none", "auto") and not os.path.isdir(resume):
        raise ConfigError(f"config error: checkpoint.resume: no checkpoint at '{resume}' "
                          f"(use auto, none or an existing checkpoint directory)")


# ----------------------------------------------------------------------------- public API

def load_config(path: str | None, overrides: list[str] = ()) -> BladeConfig:
    """Defaults <- YAML file (with its inherit chain) <- `section.key=value` overrides, validated."""
    raw = read_yaml(path) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    if isinstance(raw.get("model"), dict) and raw["model"].get("init_from") is not None:
        from blade.interop.pretrained import merge_pretrained_config

        # the shape comes from the checkpoint: it replaces a config file's shape keys (saying so);
        # a conflicting one given on the command line is an error
        given = [o.partition("=")[0].strip().split(".") for o in overrides]
        explicit = {parts[1] for parts in given if len(parts) == 2 and parts[0] == "model"}
        raw["model"] = merge_pretrained_config(raw["model"], explicit, say=_say_once)
    cfg = _from_dict(raw)
    validate(cfg)
    return cfg


def _say_once(message: str) -> None:
    """A note from config loading, printed by the first rank only (every rank loads the config)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"blade: {message}", file=sys.stderr, flush=True)


def config_to_dict(cfg: BladeConfig) -> dict:
    return asdict(cfg)


def dump_config(cfg: BladeConfig, path: str) -> None:
    """Write the resolved config as YAML (load_config reads it back to an equal config)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)
