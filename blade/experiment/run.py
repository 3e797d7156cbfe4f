"""`blade experiment`: does BLADE select better tokens than RHO-1, random and full training?

    blade experiment --out runs/experiment [--quick] [--ranks 2] [section.key=value ...]
    blade experiment --data DIR [--init-from HF_DIR] --seeds 3 --grid selection.lam=0,1 ...

1. data:   --data DIR: train/, target/, val/ (and base/) written by `blade prepare`; by default the
           debian-docs recipe (blade/data/recipes/debian_docs.py), built once into DIR if DIR is absent
2. base:   pretrain a small model with full CE on DIR/base (configs/experiment/base.yaml; --base-config),
           once, with the first seed; or --init-from a pretrained checkpoint instead
3. export: the base proxy as a Hugging Face directory, the continual runs' model.init_from
4. continue from it on the pool with each strategy (configs/experiment/continual.yaml; --config): same
           seed, same data order, same steps; tau, K and rho1's K0 derived from the run length
           (grid.py), repeated for every seed (--seeds) and --grid point
5. report: one seed, no grid: target validation loss curves, selected-token rates per label and
           source, score histograms (paper Fig. 3), Dist(u, w) (Fig. 4) -> OUT/report/ (report.py);
           otherwise the statistics over seeds (study.py) with the per-seed reports in OUT/report/seed*/

Every stage is a `blade train` on --ranks local processes (launch/local.sh); its output goes to
OUT/<stage>/train.log. A finished stage leaves OUT/<stage>/DONE (with its settings) and is skipped
on the next invocation; an interrupted one resumes from its last checkpoint (checkpoint.resume=auto).
Overrides given on the command line apply to the continual runs (the schedule is derived from them).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from blade import ROOT
from blade.config import STRATEGIES
from blade.errors import BladeError
from blade.experiment.grid import parse_grid, point_label, seed_list, stage_overrides
from blade.experiment.study import write_reports
from blade.runtime.preempt import EXIT_PREEMPTED, Preempted

SPLITS = ("train", "target", "val")  # base/ too unless --init-from
CONFIGS = {False: ("base.yaml", "continual.yaml"), True: ("quick-base.yaml", "quick-continual.yaml")}


class Stage:
    """One `blade train` run in OUT/<name>/run, skipped when OUT/<name>/DONE records the same settings."""

    def __init__(self, out: str, name: str, config: str, overrides: list[str]):
        self.dir = os.path.join(out, name)
        self.name, self.config, self.overrides = name, config, overrides
        self.run_dir = os.path.join(self.dir, "run")
        self.settings = {"config": os.path.basename(config), "overrides": overrides}

    @property
    def done(self) -> bool:
        marker = os.path.join(self.dir, "DONE")
        if not os.path.isfile(marker):
            return False
        with open(marker) as f:
            if json.load(f)["settings"] != self.settings:
                raise BladeError(f"{self.dir} was made with other settings than this experiment's: "
                                 "delete it or pass another --out")
        return True

    def run(self, ranks: int, say) -> float:
        if self.done:
            say(f"{self.name}: done earlier ({self.dir}/DONE)")
            with open(os.path.join(self.dir, "DONE")) as f:
                return json.load(f)["wall_time_s"]
        os.makedirs(self.dir, exist_ok=True)
        log = os.path.join(self.dir, "train.log")
        say(f"{self.name}: training on {ranks} rank(s), log {log}")
        # the project's local launcher: torchrun, a free port, the accelerator, threads per rank
        cmd = ["bash", os.path.join(ROOT, "launch", "local.sh"), str(ranks), "-c", self.config,
               f"run.dir={self.run_dir}", *self.overrides]
        env = {**os.environ, "PYTHON": sys.executable}
        t0 = time.time()
        with open(log, "a") as f:
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
        seconds = time.time() - t0
        if code == EXIT_PREEMPTED:
            raise Preempted(f"{self.name} was stopped and checkpointed; run the same command again "
                            "to continue")
        if code:
            raise BladeError(f"{self.name} failed (exit {code}): see {log}")
        with open(os.path.join(self.dir, "DONE"), "w") as f:
            json.dump({"settings": self.settings, "wall_time_s": seconds}, f, indent=1)
        return seconds


def _current_format(data: str) -> bool:
    from blade.data.shards import FORMAT

    try:
        with open(os.path.join(data, "train", "manifest.json")) as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _prepare_data(data: str, cache: str, size: str, say) -> dict | None:
    """The recipe manifest of a debian-docs directory (built when `data` does not exist); None for a
    directory the user prepared (`blade prepare`), whose splits are checked."""
    recipe = os.path.join(data, "recipe.json")
    if os.path.isfile(recipe) and not _current_format(data):
        say(f"data: {data} holds shards of an older format: rebuilding it from the cache")
    elif os.path.isfile(recipe):
        with open(recipe) as f:
            manifest = json.load(f)
        if manifest.get("size") != size:
            raise BladeError(f"{data} holds the {manifest.get('size')!r} corpus, this experiment "
                             f"needs {size!r}: pass another --data or delete it")
        say(f"data: reusing {data} (recipe.json)" + (f"; {manifest['package_drift']}"
                                                       if "package_drift" in manifest else ""))
        return manifest
    elif os.path.exists(data):
        missing = [s for s in SPLITS if not os.path.isfile(os.path.join(data, s, "manifest.json"))]
        if missing:
            raise BladeError(f"--data {data} has no prepared {', '.join(f'{m}/' for m in missing)}: write "
                             f"each split with `blade prepare ... --out {data}/SPLIT` (one tokenizer)")
        say(f"data: using the prepared splits in {data}")
        return None
    from blade.data.recipes.debian_docs import build_debian_docs

    say(f"data: building the debian-docs corpus ({size}) in {data}")
    manifest = build_debian_docs(data, cache, size=size)
    say(f"data: {manifest['package_drift']}")
    return manifest


def _split_manifest(data: str, split: str) -> dict:
    with open(os.path.join(data, split, "manifest.json")) as f:
        return json.load(f)


def _shape_overrides(data: str, config: str, init_from: str | None) -> list[str]:
    """model.vocab_size / max_seq_len of the data where the config's differ (never with --init-from:
    the checkpoint has the shape)."""
    from blade.config import load_config

    if init_from:
        return []
    train, model = _split_manifest(data, "train"), load_config(config).model
    out = []
    if train.get("vocab_size") and train["vocab_size"] != model.vocab_size:
        out.append(f"model.vocab_size={train['vocab_size']}")
    if train["seq_len"] != model.max_seq_len:
        out.append(f"model.max_seq_len={train['seq_len']}")
    return out


def _export_base(stage: Stage, data: str) -> str:
    """The base run's final proxy -> OUT/base/hf (Hugging Face layout, with the data's tokenizer)."""
    from blade.interop.export import export
    from blade.interop.export_hf import export_hf

    hf = os.path.join(stage.dir, "hf")
    if not os.path.isfile(os.path.join(hf, "config.json")):
        flat = os.path.join(stage.dir, "export")
        export(stage.run_dir, flat)
        tokenizer = os.path.join(data, "tokenizer.model")
        export_hf(os.path.join(flat, "model.safetensors"), hf,
                  tokenizer=tokenizer if os.path.isfile(tokenizer) else None)
    return hf


def _last_eval(run_dir: str) -> float | None:
    from blade.runtime.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    return evals[-1]["val_loss"] if evals else None


def _stage_name(label: str, seed: int, first_seed: int) -> str:
    """OUT/<name>: blade[lam=0] with seed 1235 -> blade_lam=0-s1235 (the first seed has no suffix)."""
    name = label.replace("[", "_").replace("]", "").replace(",", "_").replace("/", "-")
    return name if seed == first_seed else f"{name}-s{seed}"


def run_experiment(out: str, data: str, cache: str, quick: bool = False, ranks: int = 2,
                   strategies: tuple[str, ...] = STRATEGIES, seed: int = 1234, seeds: int = 1,
                   grid: tuple[tuple[str, ...], ...] = (), init_from: str | None = None,
                   configs: tuple[str | None, str | None] = (None, None),
                   overrides: tuple[str, ...] = (), command: str = "", say=print) -> str:
    """All stages; returns the path of OUT/report/report.md. `configs`: the base and continual YAML
    (default configs/experiment/[quick-]base.yaml and [quick-]continual.yaml)."""
    from blade.config import load_config

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise BladeError(f"unknown strategies {unknown}: choose from {', '.join(STRATEGIES)}")
    seed_values, points = seed_list(seed, seeds), parse_grid([list(g) for g in grid])
    if init_from and not os.path.exists(init_from):
        raise BladeError(f"--init-from {init_from} does not exist: give a Hugging Face directory or .gguf")
    t0 = time.time()
    manifest = _prepare_data(data, cache, "quick" if quick else "default", say)
    if not init_from and not os.path.isfile(os.path.join(data, "base", "manifest.json")):
        raise BladeError(f"--data {data} has no base/ split: prepare one with `blade prepare ... --out "
                         f"{data}/base` (same tokenizer) or pass --init-from a pretrained checkpoint")
    base_yaml, continual_yaml = (given or os.path.join(ROOT, "configs", "experiment", default)
                                 for given, default in zip(configs, CONFIGS[quick]))
    shape = _shape_overrides(data, continual_yaml, init_from)
    steps = load_config(continual_yaml, [*shape, *overrides]).train.steps
    for point in points:  # a bad key or value is one line now, not after the base stage
        load_config(continual_yaml, [*shape, *stage_overrides("blade", steps, list(overrides), point)])
    paths = [f"data.val={data}/val", f"data.target={data}/target"]
    times, base_loss, base_cfg = {}, None, None
    if init_from:
        init = init_from
    else:
        base = Stage(out, "base", base_yaml, [f"data.train={data}/base", *paths, f"train.seed={seed}",
                                              *_shape_overrides(data, base_yaml, None)])
        times["base"] = base.run(ranks, say)
        init, base_loss, base_cfg = _export_base(base, data), _last_eval(base.run_dir), load_config(base_yaml)
    defaults = {s: stage_overrides(s, steps, list(overrides), {}) for s in strategies}
    stages, rows = {}, {}  # (label, seed) -> Stage; label -> {"strategy", "runs": {seed: dir}, "versus"}
    for point in [{}, *points]:
        at_point = {}  # strategy -> label at this point: a row is compared with full and rho1 of its point
        for run_seed in seed_values:
            for strategy in strategies:
                settings = stage_overrides(strategy, steps, list(overrides), point)
                label = point_label(strategy, settings, defaults[strategy])
                row = rows.setdefault(label, {"strategy": strategy, "runs": {}, "versus": at_point})
                at_point[strategy] = label
                if (label, run_seed) not in stages:
                    stage = Stage(out, _stage_name(label, run_seed, seed), continual_yaml,
                                  [f"data.train={data}/train", *paths, f"model.init_from={init}",
                                   f"train.seed={run_seed}", f"selection.strategy={strategy}", *shape, *settings])
                    stages[label, run_seed] = stage
                    times[stage.name] = stage.run(ranks, say)
                    row["runs"][run_seed] = stage.run_dir
    cfg = load_config(continual_yaml, [f"model.init_from={init}", *shape, *defaults[strategies[0]]])
    meta = _meta(cfg, data, manifest, ranks, seed_values, times, time.time() - t0, command, base_cfg,
                 init_from)
    return write_reports(os.path.join(out, "report"), rows, seed_values, base_loss, meta)


def _data_lines(data: str, manifest: dict | None) -> list[str]:
    if manifest is None:
        seqs = {s: _split_manifest(data, s)["num_sequences"] for s in SPLITS}
        return [f"data: {data} (prepared splits), pool {seqs['train']:,} sequences; reference set "
                f"{seqs['target']:,} sequences; validation {seqs['val']:,} sequences"]
    pool = manifest["splits"]["train"]
    return [f"data: debian-docs recipe ({manifest['size']}), pool {pool['chars'] / 1e6:.1f} MB / "
            f"{pool['sequences']:,} sequences; reference set {manifest['splits']['target']['sequences']:,} "
            f"sequences; validation {manifest['splits']['val']['sequences']:,} sequences (held out)"]


def _meta(cfg, data: str, manifest: dict | None, ranks: int, seeds: list[int], times: dict, total_s: float,
          command: str, base_cfg, init_from: str | None) -> dict:
    from blade.model.memory import param_count

    t, s, m = cfg.train, cfg.selection, cfg.model
    params = param_count(m)
    seq_len = _split_manifest(data, "train")["seq_len"]
    tokens = t.micro_batch_size * ranks * t.grad_accum * seq_len
    start = (f"start: {init_from} (--init-from)" if base_cfg is None else
             f"base: {base_cfg.train.steps} steps of full CE on the general corpus, lr {base_cfg.optim.lr}")
    setup = [
        *_data_lines(data, manifest),
        f"model: Llama, dim {m.dim}, {m.n_layers} layers, vocab {m.vocab_size}, "
        f"{params / 1e6:.2f}M parameters, {t.precision}, {ranks} ranks, ZeRO-{cfg.deepspeed.zero_stage}",
        start,
        f"continual: {t.steps} steps x {tokens:,} tokens, lr {cfg.optim.lr} ({cfg.optim.schedule}, "
        f"warm-up {cfg.optim.warmup_steps}), seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}, "
        "the same data order for every strategy of a seed",
        f"selection: gamma {s.gamma}; blade tau {s.tau}, K {s.k_ref_steps}, lambda {s.lam}; rho1 "
        f"K0 {s.rho1_ref_steps} (= blade's total reference steps)",
        f"wall time: {sum(times.values()) / 60:.1f} min summed over the {len(times)} stages ("
        + (", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()) if len(times) <= 6 else
           f"base {times.get('base', 0) / 60:.1f} min, the longest {max(times.values()) / 60:.1f} min")
        + f"); {total_s / 60:.1f} min this invocation",
    ]
    return {"command": command, "setup": setup, "steps": t.steps, "gamma": s.gamma, "tau": s.tau,
            "k_ref_steps": s.k_ref_steps, "rho1_ref_steps": s.rho1_ref_steps, "seed": seeds[0],
            "seeds": seeds, "stage_wall_time_s": times, "wall_time_s": total_s,
            "pool_label_token_counts": _split_manifest(data, "train").get("label_token_counts", {})}
