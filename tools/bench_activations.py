"""Activation memory of one training forward: the bytes autograd saves for the backward.

    .venv/bin/python tools/bench_activations.py -c configs/100m.yaml model.vocab_size=2048 \
        model.max_seq_len=128 --batch 8 --seq 128

For each model.activation_checkpointing mode, counts the distinct storages of the tensors saved for
backward (torch.autograd.graph.saved_tensors_hooks) during one forward of a plain model (no DeepSpeed:
parameters are excluded, only activations count). A checkpointed block's input is held by the
checkpoint itself, not saved through the hook: it is added by hand (one [batch, seq, dim] tensor per
recomputed block). Prints one JSON line per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def saved_bytes(model, tokens, targets) -> int:
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(tokens, targets).sum()
    loss.backward()
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    args = p.parse_args()

    import torch

    from blade.config import load_config
    from blade.model.transformer import Transformer

    torch.set_num_threads(1)
    for mode in ("none", "every_n", "full"):
        cfg = load_config(args.config, [*args.overrides, f"model.activation_checkpointing={mode}"])
        torch.manual_seed(0)
        model = Transformer(cfg.model).train()
        tokens = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1))
        nbytes = saved_bytes(model, tokens[:, :-1], tokens[:, 1:])
        held = sum(model._recomputed(i) for i in range(cfg.model.n_layers)) * args.batch * args.seq * cfg.model.dim * 4
        print(json.dumps({"activation_checkpointing": mode, "every": cfg.model.activation_checkpointing_every,
                          "tokens": args.batch * args.seq, "activations_mib": round((nbytes + held) / 2**20, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
