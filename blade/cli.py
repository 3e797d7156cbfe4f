"""`blade` command line: prepare, train, inspect. Each subcommand mirrors the function it calls.

    blade prepare --builtin data/builtin                 # the built-in corpus, no download
    blade prepare --recipe debian-docs --out data/debian-docs [--quick]   # real text from Debian packages
    blade prepare docs.jsonl more.txt --out data/mine --seq-len 512 --vocab-size 8000
    blade train configs/quickstart.yaml train.steps=50 selection.strategy=rho1 [--dry-run]
    blade plan configs/tinyllama-1.1b.yaml --ranks 8 --memory-gib 80   # peak memory per rank, by part
    blade inspect runs/quickstart
    launch/local.sh 2 --cmd bench -c configs/quickstart.yaml --strategies full,blade   # throughput
    blade export-hf weights.safetensors out/hf --tokenizer data/mine/tokenizer.json
    blade export runs/quickstart out/model               # newest checkpoint -> fp32 safetensors + config
    blade experiment --out runs/experiment [--quick]     # full / random / rho1 / blade on real data
    blade eval runs/continual-smollm2 --tasks blade_continuation[,hellaswag] [--limit 100]   # lm-eval
    blade experiment --data DIR --seeds 3 --grid selection.lam=0,1   # any prepared data, seeds, ablation
"""
from __future__ import annotations

import argparse
import os
import sys

from blade.errors import BladeError


def cmd_prepare(args) -> None:
    from blade.data.prepare import prepare, prepare_splits

    if args.recipe:
        from blade.data.recipes.debian_docs import build_debian_docs  # the one recipe (--recipe choices)

        if not args.out:
            raise BladeError(f"prepare --recipe {args.recipe} needs --out DIR")
        manifest = build_debian_docs(args.out, args.cache, size="quick" if args.quick else "default",
                                     seed=args.seed)
        counts = ", ".join(f"{k} {v['sequences']:,}" for k, v in manifest["splits"].items())
        print(f"prepared the {args.recipe} corpus in {args.out} (sequences: {counts}); see recipe.json")
        print(manifest["package_drift"])
        return
    if args.builtin:
        from blade.data.corpus import generate_builtin_corpus

        raw = os.path.join(args.builtin, "raw")
        generate_builtin_corpus(raw, seed=args.seed, scale=args.scale)
        prepare_splits({name: [os.path.join(raw, f"{src}.jsonl")] for name, src in
                        (("train", "pool"), ("target", "target"), ("val", "val"))},
                       args.builtin, seq_len=args.seq_len, vocab_size=args.vocab_size,
                       tokenizer=args.tokenizer, workers=args.workers)
        print(f"prepared the built-in corpus in {args.builtin}/{{train,target,val}}")
        return
    if not args.inputs or not args.out:
        raise BladeError("prepare needs INPUT files and --out DIR (or --builtin DIR)")
    manifest = prepare(args.inputs, args.out, seq_len=args.seq_len, tokenizer=args.tokenizer,
                       vocab_size=args.vocab_size, shard_sequences=args.shard_sequences, seed=args.seed,
                       mix=not args.no_mix, workers=args.workers)
    print(f"wrote {manifest['num_sequences']} sequences in {len(manifest['shards'])} shards to {args.out}")


def split_config_args(items: list[str], config: str | None) -> tuple[str | None, list[str]]:
    """`blade train CONFIG a.b=1` and `blade train -c CONFIG a.b=1` both work."""
    overrides = list(items)
    if config is None and overrides and "=" not in overrides[0]:
        config = overrides.pop(0)
    return config, overrides


def cmd_train(args) -> None:
    import yaml

    from blade.config import config_to_dict, load_config
    from blade.data.paths import check_paths
    from blade.train.schedule import describe_layout

    path, overrides = split_config_args(args.items, args.config)
    cfg = load_config(path, overrides)
    if cfg.train.compile:  # before any process group or engine: a missing compiler is a config error
        import torch

        from blade.model.compile import check_compile

        check_compile("cuda" if torch.cuda.is_available() else "cpu")
    if args.dry_run:
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        have_data = all(os.path.isfile(os.path.join(d, "manifest.json")) for d in cfg.data.dirs("train"))
        seq_len = check_paths(cfg)["train"]["seq_len"] if have_data else cfg.model.max_seq_len
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        print(describe_layout(cfg, world, seq_len))
        from blade.model.memory import GIB, describe_memory

        print(describe_memory(cfg, world, args.memory_gib * GIB if args.memory_gib else None))
        return
    check_paths(cfg)

    def train(world) -> None:
        from blade.train.loop import Trainer

        Trainer(cfg, world).fit()

    run_on_ranks(cfg, train)


def cmd_plan(args) -> None:
    from blade.config import load_config
    from blade.data.paths import check_paths
    from blade.model.memory import GIB
    from blade.model.plan import describe_plan

    path, overrides = split_config_args(args.items, args.config)
    cfg = load_config(path, overrides)
    if args.ranks < 1:
        raise BladeError(f"plan --ranks must be >= 1, got {args.ranks}")
    seq_len = args.seq_len
    if seq_len is None and all(os.path.isfile(os.path.join(d, "manifest.json")) for d in cfg.data.dirs("train")):
        seq_len = check_paths(cfg)["train"]["seq_len"]
    print(describe_plan(cfg, args.ranks, args.memory_gib * GIB if args.memory_gib else None, seq_len,
                        gpu=not args.cpu))


def run_on_ranks(cfg, body) -> None:
    """Set up this rank, run body(world), exit: 75 after a stop request (checkpoint written),
    2 for a user error (one line), 1 for a crash (traceback)."""
    from blade.runtime import dist
    from blade.runtime.preempt import EXIT_PREEMPTED, Preempted

    world = dist.setup(cfg.dist.timeout_s, cfg.dist.backend, cfg.dist.threads_per_rank)
    code = 0
    try:
        body(world)
    except Preempted as e:  # a checkpoint is written: requeue with checkpoint.resume=auto
        if world.is_main:
            print(f"blade: {e}; exit {EXIT_PREEMPTED} (resume with checkpoint.resume=auto)", file=sys.stderr)
        code = EXIT_PREEMPTED
    except BladeError as e:
        print(f"blade: error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    dist.shutdown(code)


def cmd_bench(args) -> None:
    from blade.config import load_config
    from blade.data.paths import check_paths

    path, overrides = split_config_args(args.items, args.config)
    cfg = load_config(path, overrides)
    check_paths(cfg)
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]

    def bench(world) -> None:
        from blade.bench.run import run_bench

        say = print if world.is_main else (lambda *a, **k: None)
        result = run_bench(path, overrides, world, strategies, args.warmup, args.steps, args.out,
                           measure_checkpoint=not args.no_checkpoint, memory_steps=args.memory_steps,
                           command="blade " + " ".join(sys.argv[1:]), say=say, profile=args.profile,
                           anchor=args.anchor)
        if result is not None:
            print(f"wrote {args.out}/bench.json, report.md and breakdown.png")
            for t in result["targets"]:
                print(f"  [{'PASS' if t['passed'] else 'FAIL'}] {t['target']}: {t['measured']}")

    run_on_ranks(cfg, bench)


def cmd_inspect(args) -> None:
    from blade.inspect_run import inspect_run

    out = inspect_run(args.run_dir, args.out)
    print(f"wrote plots and {os.path.join(out, 'index.html')}")


def cmd_export(args) -> None:
    from blade.interop.export import export

    meta = export(args.checkpoint, args.out)
    print(f"exported the proxy of {meta['source']} (after {meta['step']} steps) to {args.out}")


def cmd_export_hf(args) -> None:
    from blade.interop.export_hf import export_hf

    model_config = None
    if args.config:
        from blade.config import load_config

        model_config = load_config(args.config).model
    out = export_hf(args.weights, args.out, model_config=model_config, tokenizer=args.tokenizer,
                    dtype=args.dtype)
    print(f"wrote a Hugging Face checkpoint to {out}")


def cmd_eval(args) -> None:
    from blade.eval.harness import evaluate

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    name = os.path.basename(os.path.normpath(args.model)).removesuffix(".gguf")
    out = args.out or os.path.join("runs", "eval", name)
    summary = evaluate(args.model, tasks, out, limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.batch_size, device=args.device, seed=args.seed)
    for task, metrics in summary.items():
        shown = [f"{k} {v:.4f}" + (f" ± {metrics[k + '_stderr']:.4f}" if k + "_stderr" in metrics else "")
                 for k, v in metrics.items() if not k.endswith("_stderr") and k != "sample_len"]
        print(f"{task} ({metrics.get('sample_len', '?')} examples): {', '.join(shown)}")
    print(f"wrote {os.path.join(out, 'results.json')}")


def cmd_experiment(args) -> None:
    from blade.experiment.run import run_experiment
    from blade.runtime.preempt import EXIT_PREEMPTED, Preempted

    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    data = args.data or ("data/debian-docs-quick" if args.quick else "data/debian-docs")
    try:
        report = run_experiment(args.out, data, args.cache, quick=args.quick, ranks=args.ranks,
                                strategies=strategies, seed=args.seed, seeds=args.seeds,
                                grid=tuple(tuple(g) for g in args.grid or ()), init_from=args.init_from,
                                configs=(args.base_config, args.config), overrides=tuple(args.overrides),
                                command="blade " + " ".join(sys.argv[1:]))
    except Preempted as e:
        print(f"blade: {e}", file=sys.stderr)
        raise SystemExit(EXIT_PREEMPTED) from None
    print(f"wrote {report}")


def _default_cache() -> str:
    return os.environ.get("BLADE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "blade"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blade", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK carries the same
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="tokenize text into webdataset shards + manifest.json")
    pp.add_argument("inputs", nargs="*", help="JSONL (text, source, labels) or .txt files")
    pp.add_argument("--out", help="output directory")
    pp.add_argument("--builtin", metavar="DIR", help="generate and prepare the built-in corpus in DIR")
    pp.add_argument("--recipe", choices=("debian-docs",), help="build a real corpus from packages "
                    "fetched by name (needs apt-get and network; writes --out)")
    pp.add_argument("--quick", action="store_true", help="--recipe: the small size (CI, minutes)")
    pp.add_argument("--cache", default=_default_cache(), help="--recipe: where fetched packages are kept "
                    "(default $BLADE_CACHE or ~/.cache/blade)")
    pp.add_argument("--tokenizer", help="existing SentencePiece .model, Hugging Face tokenizer.json "
                    "or .gguf (its embedded tokenizer) (default: train a SentencePiece model)")
    pp.add_argument("--vocab-size", type=int, default=2048)
    pp.add_argument("--seq-len", type=int, default=128)
    pp.add_argument("--shard-sequences", type=int, default=512)
    pp.add_argument("--seed", type=int, default=0, help="seed of the document mix, the tokenizer "
                    "training, the built-in corpus and the recipe")
    pp.add_argument("--no-mix", action="store_true", help="keep the documents in input order (e.g. a "
                    "curriculum); by default all inputs' documents are shuffled together before packing")
    pp.add_argument("--workers", type=int, help="tokenizer processes (default: one per core); the "
                    "output is byte-identical for any number")
    pp.add_argument("--scale", type=float, default=1.0, help="built-in corpus size multiplier")
    pp.set_defaults(func=cmd_prepare)

    pt = sub.add_parser("train", help="train (launch one process per rank: launch/local.sh, srun, torchrun)")
    pt.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    pt.add_argument("-c", "--config", help="YAML config (or give it as the first argument)")
    pt.add_argument("--dry-run", action="store_true", help="print the resolved config, layout and memory "
                    "plan (which ZeRO stage fits), then exit")
    pt.add_argument("--memory-gib", type=float, help="--dry-run: memory per rank to plan for (default: the "
                    "GPU's, or the RAM divided by the local ranks)")
    pt.set_defaults(func=cmd_train)

    pl = sub.add_parser("plan", help="peak memory per rank of a config, part by part, and the largest "
                        "micro-batch that fits (no ranks are launched)")
    pl.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    pl.add_argument("-c", "--config", help="YAML config (or give it as the first argument)")
    pl.add_argument("--ranks", type=int, default=1, help="data-parallel ranks (GPUs) in all")
    pl.add_argument("--memory-gib", type=float, help="memory per rank: says whether the plan fits and the "
                    "largest micro-batch that does")
    pl.add_argument("--seq-len", type=int, help="tokens per sequence (default: the prepared data's, else "
                    "model.max_seq_len)")
    pl.add_argument("--cpu", action="store_true", help="count what a CPU process makes resident (the "
                    "touched pages of ZeRO-3's reduce bucket) instead of a GPU's allocation")
    pl.set_defaults(func=cmd_plan)

    pi = sub.add_parser("inspect", help="plots and an HTML page of what a run selected")
    pi.add_argument("run_dir")
    pi.add_argument("--out", help="output directory (default RUN_DIR/inspect)")
    pi.set_defaults(func=cmd_inspect)

    pb = sub.add_parser("bench", help="throughput, MFU, memory and step breakdown of each strategy "
                        "(launch like train: launch/local.sh N --cmd bench ...)")
    pb.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    pb.add_argument("-c", "--config", help="YAML config (or give it as the first argument)")
    pb.add_argument("--strategies", default="full,random,rho1,blade", help="comma-separated subset")
    pb.add_argument("--warmup", type=int, default=3, help="warm-up steps per strategy (not timed)")
    pb.add_argument("--steps", type=int, default=10, help="timed steps per strategy")
    pb.add_argument("--out", default="runs/bench", help="output directory")
    pb.add_argument("--no-checkpoint", action="store_true", help="do not time a checkpoint save")
    pb.add_argument("--anchor", action="store_true", help="also step a plain torch DDP loop of the same model "
                    "in the same rounds (the peer anchor) and report full / DDP")
    pb.add_argument("--profile", action="store_true", help="profile one extra step per strategy after the "
                    "timing: OUT/profile/STRATEGY_trace.json (Chrome/Perfetto) and STRATEGY_top_ops.txt")
    pb.add_argument("--memory-steps", type=int, default=3,
                    help="CPU: untimed steps per strategy that measure the peak RSS (after the timing)")
    pb.set_defaults(func=cmd_bench)

    px = sub.add_parser("export", help="a training checkpoint -> fp32 safetensors + config.yaml (no DeepSpeed "
                        "needed to load: blade.interop.export.load_exported)")
    px.add_argument("checkpoint", help="a checkpoints/step_* directory, or a run directory (its newest)")
    px.add_argument("out", help="output directory: model.safetensors, config.yaml, export.json")
    px.set_defaults(func=cmd_export)

    pe = sub.add_parser("export-hf", help="blade weights -> Hugging Face layout of the model's family (transformers loads it)")
    pe.add_argument("weights", help="blade weights: .safetensors/.pt file or a directory of .safetensors")
    pe.add_argument("out", help="output directory: config.json, model.safetensors, tokenizer files")
    pe.add_argument("--config", help="run config YAML with the model shape (default: config.json or "
                    "config.yaml next to the weights)")
    pe.add_argument("--tokenizer", help="tokenizer to ship (.model, tokenizer.json, .gguf; default: "
                    "tokenizer files next to the weights)")
    pe.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    pe.set_defaults(func=cmd_export_hf)
    pv = sub.add_parser("eval", help="downstream tasks with lm-evaluation-harness on a run, checkpoint, "
                        "export, .gguf or Hugging Face directory")
    pv.add_argument("model", help="run directory or checkpoint (its proxy), `blade export` directory, .gguf, "
                    "or Hugging Face directory")
    pv.add_argument("--tasks", default="blade_continuation", help="comma-separated: blade's local tasks "
                    "(blade_continuation, offline) or the harness's (hellaswag, gsm8k, ...: need network)")
    pv.add_argument("--limit", type=int, help="examples per task (default: all)")
    pv.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's)")
    pv.add_argument("--batch-size", type=int, default=8)
    pv.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    pv.add_argument("--seed", type=int, default=1234, help="the harness's seeds (few-shot sampling)")
    pv.add_argument("--out", help="results.json and the converted checkpoint (default runs/eval/NAME)")
    pv.set_defaults(func=cmd_eval)
    pr = sub.add_parser("experiment", help="selection quality on real data: pretrain a base model, "
                        "continue it with each strategy, report (README \"Results\")")
    pr.add_argument("overrides", nargs="*", help="section.key=value for the continual runs (before --grid)")
    pr.add_argument("--out", default="runs/experiment", help="output directory (stages + report/)")
    pr.add_argument("--quick", action="store_true", help="the small size that runs in minutes (CI)")
    pr.add_argument("--data", help="train/, target/, val/ and base/ written by `blade prepare` (default "
                    "data/debian-docs[-quick]: the debian-docs recipe, built if the directory is absent)")
    pr.add_argument("--init-from", help="start the continual runs from this pretrained checkpoint (Hugging "
                    "Face directory or .gguf) instead of training a base model on DATA/base")
    pr.add_argument("--base-config", help="YAML of the base stage (default configs/experiment/[quick-]base.yaml)")
    pr.add_argument("--config", help="YAML of the continual runs (default "
                    "configs/experiment/[quick-]continual.yaml)")
    pr.add_argument("--cache", default=_default_cache(), help="fetched packages (default $BLADE_CACHE or "
                    "~/.cache/blade)")
    pr.add_argument("--ranks", type=int, default=2, help="local processes per training stage")
    pr.add_argument("--strategies", default="full,random,rho1,blade", help="comma-separated subset")
    pr.add_argument("--seed", type=int, default=1234, help="train.seed of the base stage and the first seed")
    pr.add_argument("--seeds", type=int, default=1, help="repeat every continual run with seeds SEED, "
                    "SEED+1, ...; the report gives mean ± s.e. and paired tests")
    pr.add_argument("--grid", nargs="+", action="append", metavar="KEY=V1,V2",
                    help="an ablation: the product of the axes given after one --grid; several --grid "
                    "options add their points (one at a time). Blade gets every point, the other strategies "
                    "only what they read (rho1 the analogous K0)")
    pr.set_defaults(func=cmd_experiment)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "items") and all("=" in e and not e.startswith("-") for e in extra):
        args.items += extra  # section.key=value overrides given after the flags
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except BladeError as e:
        print(f"blade: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
