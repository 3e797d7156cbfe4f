"""Activation memory of one training forward: the bytes autograd saves for the backward.

    .venv/bin/python tools/bench_activations.py -c configs/100m.yaml model.vocab_size=2048 \
        model.max_seq_len=128 --batch 8 --seq 128

For each model.activation_checkpointing mode, counts the distinct storages of the tensors saved for
backward during one forward of a plain model (no DeepSpeed: parameters are excluded, only activations
count), plus the input each recomputed block holds: blade.model.plan.saved_activation_bytes, which
`blade plan` runs on fake tensors. Prints one JSON line per mode, with the plan's figure beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()

    import torch

    from blade.config import load_config
    from blade.model.plan import activation_bytes, saved_activation_bytes
    from blade.model.transformer import Transformer

    torch.set_num_threads(1)
    for mode in ("none", "every_n", "full"):
        cfg = load_config(args.config, [*args.overrides, f"model.activation_checkpointing={mode}"])
        torch.manual_seed(0)
        model = Transformer(cfg.model).train()
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1))
        nbytes = saved_activation_bytes(model, tokens[:, :-1], tokens[:, 1:])
        planned = activation_bytes(cfg.model, args.batch, args.seq, "fp32")
        print(json.dumps({"activation_checkpointing": mode, "every": cfg.model.activation_checkpointing_every,
                          "tokens": args.batch * args.seq, "activations_mib": round(nbytes / 2**20, 1),
                          "planned_mib": round(planned / 2**20, 1)}), flush=True)


if __name__ == "__main__":
    main()
