"""`blade` command line: prepare, train, inspect. Each subcommand mirrors the function it calls.

    blade prepare --builtin data/builtin                 # the built-in corpus, no download
    blade prepare docs.jsonl more.txt --out data/mine --seq-len 512 --vocab-size 8000
    blade train configs/quickstart.yaml train.steps=50 selection.strategy=rho1 [--dry-run]
    blade inspect runs/quickstart
"""
from __future__ import annotations

import argparse
import os
import sys

from .errors import BladeError


def cmd_prepare(args) -> None:
    from .prepare import prepare, prepare_splits

    if args.builtin:
        from .corpus import generate_builtin_corpus

        raw = os.path.join(args.builtin, "raw")
        generate_builtin_corpus(raw, seed=args.seed, scale=args.scale)
        prepare_splits({name: [os.path.join(raw, f"{src}.jsonl")] for name, src in
                        (("train", "pool"), ("target", "target"), ("val", "val"))},
                       args.builtin, seq_len=args.seq_len, vocab_size=args.vocab_size,
                       tokenizer=args.tokenizer)
        print(f"prepared the built-in corpus in {args.builtin}/{{train,target,val}}")
        return
    if not args.inputs or not args.out:
        raise BladeError("prepare needs INPUT files and --out DIR (or --builtin DIR)")
    manifest = prepare(args.inputs, args.out, seq_len=args.seq_len, tokenizer=args.tokenizer,
                       vocab_size=args.vocab_size, shard_sequences=args.shard_sequences)
    print(f"wrote {manifest['num_sequences']} sequences in {len(manifest['shards'])} shards to {args.out}")


def split_config_args(items: list[str], config: str | None) -> tuple[str | None, list[str]]:
    """`blade train CONFIG a.b=1` and `blade train -c CONFIG a.b=1` both work."""
    overrides = list(items)
    if config is None and overrides and "=" not in overrides[0]:
        config = overrides.pop(0)
    return config, overrides


def cmd_train(args) -> None:
    import yaml

    from .config import check_paths, config_to_dict, describe_layout, load_config

    path, overrides = split_config_args(args.items, args.config)
    cfg = load_config(path, overrides)
    if args.dry_run:
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        seq_len = _manifest_seq_len(cfg.data.train) or cfg.model.max_seq_len
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
        print(describe_layout(cfg, world, seq_len))
        return
    check_paths(cfg)
    from . import dist
    from .trainer import Trainer

    world = dist.setup(cfg.dist.timeout_s, cfg.dist.backend, cfg.dist.threads_per_rank)
    code = 0
    try:
        Trainer(cfg, world).fit()
    except BladeError as e:
        print(f"blade: error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    dist.shutdown(code)


def _manifest_seq_len(path: str) -> int | None:
    import json

    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return int(json.load(f)["seq_len"])
    except (OSError, ValueError, KeyError):
        return None


def cmd_inspect(args) -> None:
    from .inspect import inspect_run

    out = inspect_run(args.run_dir, args.out)
    print(f"wrote plots and {os.path.join(out, 'index.html')}")


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
    pp.add_argument("--tokenizer", help="existing SentencePiece .model (default: train one)")
    pp.add_argument("--vocab-size", type=int, default=2048)
    pp.add_argument("--seq-len", type=int, default=128)
    pp.add_argument("--shard-sequences", type=int, default=512)
    pp.add_argument("--seed", type=int, default=0, help="built-in corpus seed")
    pp.add_argument("--scale", type=float, default=1.0, help="built-in corpus size multiplier")
    pp.set_defaults(func=cmd_prepare)

    pt = sub.add_parser("train", help="train (launch one process per rank: launch/local.sh, srun, torchrun)")
    pt.add_argument("items", nargs="*", help="[CONFIG.yaml] [section.key=value ...]")
    pt.add_argument("-c", "--config", help="YAML config (or give it as the first argument)")
    pt.add_argument("--dry-run", action="store_true", help="print the resolved config and layout, then exit")
    pt.set_defaults(func=cmd_train)

    pi = sub.add_parser("inspect", help="plots and an HTML page of what a run selected")
    pi.add_argument("run_dir")
    pi.add_argument("--out", help="output directory (default RUN_DIR/inspect)")
    pi.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BladeError as e:
        print(f"blade: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
