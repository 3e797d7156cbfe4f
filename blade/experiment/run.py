"""`blade experiment`: does BLADE select better tokens than RHO-1, random and full training?

    blade experiment --out runs/experiment [--quick] [--ranks 2] [section.key=value ...]

1. data:   the debian-docs recipe (blade/data/recipes/debian_docs.py), built once into --data
2. base:   pretrain a small model with full CE on the general corpus (configs/experiment/base.yaml)
3. export: the base proxy as a Hugging Face directory, the continual runs' model.init_from
4. continue from it on the noisy pool with each strategy (configs/experiment/continual.yaml): same
           seed, same data order, same steps; tau, K and rho1's K0 derived from the run length
5. report: target validation loss curves, selected-token rates per noise label against their base
           rates, score histograms (paper Fig. 3), Dist(u, w) (Fig. 4) -> OUT/report/ (experiment_report)

Every stage is a `blade train` on --ranks local processes (launch/local.sh); its output goes to
OUT/<stage>/train.log. A finished stage leaves OUT/<stage>/DONE (with its settings) and is skipped
on the next invocation; an interrupted one resumes from its last checkpoint (checkpoint.resume=auto).
Overrides given on the command line apply to the continual runs (after the derived schedule).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from blade import ROOT
from blade.config import STRATEGIES, SelectionConfig
from blade.errors import BladeError
from blade.runtime.preempt import EXIT_PREEMPTED, Preempted
from blade.train.schedule import n_reference_phases

CONFIGS = {False: ("base.yaml", "continual.yaml"), True: ("quick-base.yaml", "quick-continual.yaml")}


def scaled_schedule(steps: int) -> dict:
    """The paper's schedule (5000 steps: tau 1000, K 300) scaled to `steps`, as continual.yaml says."""
    tau = max(1, round(steps / 5))
    k = max(1, round(0.3 * tau))
    syncs = n_reference_phases(SelectionConfig(strategy="blade", tau=tau), steps)  # no warm-up
    return {"selection.tau": tau, "selection.k_ref_steps": k, "selection.rho1_ref_steps": syncs * k,
            "selection.diag_interval": max(1, tau // 4)}




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


def _prepare_data(data: str, cache: str, size: str, say) -> dict:
    recipe = os.path.join(data, "recipe.json")
    if os.path.isfile(recipe) and not _current_format(data):
        say(f"data: {data} holds shards of an older format: rebuilding it from the cache")
    elif os.path.isfile(recipe):
        with open(recipe) as f:
            manifest = json.load(f)
        if manifest.get("size") != size:
            raise BladeError(f"{data} holds the {manifest.get('size')!r} corpus, this experiment "
                             f"needs {size!r}: pass another --data or delete it")
        say(f"data: reusing {data} (recipe.json)")
        return manifest
    from blade.data.recipes.debian_docs import build_debian_docs

    say(f"data: building the debian-docs corpus ({size}) in {data}")
    return build_debian_docs(data, cache, size=size)


def _export_base(stage: Stage, data: str) -> str:
    """The base run's final proxy -> OUT/base/hf (Hugging Face layout, with the data's tokenizer)."""
    from blade.interop.export import export
    from blade.interop.export_hf import export_hf

    hf = os.path.join(stage.dir, "hf")
    if not os.path.isfile(os.path.join(hf, "config.json")):
        flat = os.path.join(stage.dir, "export")
        export(stage.run_dir, flat)
        export_hf(os.path.join(flat, "model.safetensors"), hf,
                  tokenizer=os.path.join(data, "tokenizer.model"))
    return hf


def _last_eval(run_dir: str) -> float | None:
    from blade.runtime.metrics import read_metrics

    evals = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
    return evals[-1]["val_loss"] if evals else None


def run_experiment(out: str, data: str, cache: str, quick: bool = False, ranks: int = 2,
                   strategies: tuple[str, ...] = STRATEGIES, seed: int = 1234,
                   overrides: tuple[str, ...] = (), command: str = "", say=print) -> str:
    """All stages; returns the path of OUT/report/report.md."""
    from blade.config import load_config
    from blade.experiment.report import collect, write_report

    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise BladeError(f"unknown strategies {unknown}: choose from {', '.join(STRATEGIES)}")
    t0 = time.time()
    manifest = _prepare_data(data, cache, "quick" if quick else "default", say)
    base_yaml, continual_yaml = (os.path.join(ROOT, "configs", "experiment", c) for c in CONFIGS[quick])
    paths = [f"data.train={data}/base", f"data.val={data}/val", f"data.target={data}/target"]
    base = Stage(out, "base", base_yaml, [*paths, f"train.seed={seed}"])
    times = {"base": base.run(ranks, say)}
    init = _export_base(base, data)
    steps = load_config(continual_yaml, list(overrides)).train.steps
    schedule = [f"{k}={v}" for k, v in scaled_schedule(steps).items()]
    runs = {}
    for strategy in strategies:
        stage = Stage(out, strategy, continual_yaml,
                      [f"data.train={data}/train", f"data.val={data}/val", f"data.target={data}/target",
                       f"model.init_from={init}", f"train.seed={seed}", f"selection.strategy={strategy}",
                       *schedule, *overrides])
        times[strategy] = stage.run(ranks, say)
        runs[strategy] = stage.run_dir
    cfg = load_config(continual_yaml, [f"model.init_from={init}", *schedule, *overrides])
    results = collect(runs, _last_eval(base.run_dir))
    meta = _meta(cfg, manifest, ranks, seed, times, time.time() - t0, command, load_config(base_yaml))
    return write_report(os.path.join(out, "report"), results, meta)


def _meta(cfg, manifest: dict, ranks: int, seed: int, times: dict, total_s: float, command: str,
          base_cfg) -> dict:
    import torch

    from blade.model.transformer import Transformer

    t, s, m = cfg.train, cfg.selection, cfg.model
    with torch.device("meta"):
        params = sum(p.numel() for p in Transformer(m).parameters())
    tokens = t.micro_batch_size * ranks * t.grad_accum * manifest["settings"]["seq_len"]
    pool = manifest["splits"]["train"]
    setup = [
        f"data: debian-docs recipe ({manifest['size']}), pool {pool['chars'] / 1e6:.1f} MB / "
        f"{pool['sequences']:,} sequences; reference set {manifest['splits']['target']['sequences']:,} "
        f"sequences; validation {manifest['splits']['val']['sequences']:,} sequences (held out)",
        f"model: Llama, dim {m.dim}, {m.n_layers} layers, vocab {m.vocab_size}, "
        f"{params / 1e6:.2f}M parameters, {t.precision}, {ranks} ranks, ZeRO-"
        f"{cfg.deepspeed.zero_stage}",
        f"base: {base_cfg.train.steps} steps of full CE on the general corpus, lr {base_cfg.optim.lr}",
        f"continual: {t.steps} steps x {tokens:,} tokens, lr {cfg.optim.lr} ({cfg.optim.schedule}, "
        f"warm-up {cfg.optim.warmup_steps}), seed {seed}, same data order for every strategy",
        f"selection: gamma {s.gamma}; blade tau {s.tau}, K {s.k_ref_steps}, lambda {s.lam}; rho1 "
        f"K0 {s.rho1_ref_steps} (= blade's total reference steps)",
        f"wall time: {total_s / 60:.1f} min in all; " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()),
    ]
    return {"command": command, "setup": setup, "steps": t.steps, "gamma": s.gamma, "tau": s.tau,
            "k_ref_steps": s.k_ref_steps, "rho1_ref_steps": s.rho1_ref_steps, "seed": seed,
            "stage_wall_time_s": times, "wall_time_s": total_s,
            "pool_label_token_counts": pool["label_token_counts"]}
