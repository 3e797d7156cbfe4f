"""The peer anchor: a plain torch DDP training loop of blade's own model (blade/model/transformer.py) on
the same model, batch, precision and optimizer settings, without DeepSpeed and without selection. What
full cross-entropy in blade costs on top of plain training is its step time divided by this one.

`blade bench --anchor` steps it in the same processes and in the same interleaved rounds as the
strategies, so that the drift of a shared machine hits both alike (tools/bench_ddp.py runs it alone).

One step: forward under torch.autocast(bfloat16) when train.precision is bf16 (fp32 weights, as
autocast wants them), the mean per-token loss, backward (DDP all-reduces the gradients in buckets,
overlapped with the backward), gradient clipping at optim.grad_clip, torch.optim.AdamW (blade's
parameter groups, betas, eps and weight decay; the fused kernel with optim.fused=true, as in blade),
zero_grad. Tokens are random: the time does not depend on them.
"""
from __future__ import annotations

import contextlib

import torch

from blade.model.transformer import Transformer
from blade.train.engines import param_groups


class DDPAnchor:
    def __init__(self, cfg, rank: int, device: str, seq_len: int):
        from torch.nn.parallel import DistributedDataParallel

        o = cfg.optim
        torch.manual_seed(cfg.train.seed)
        self.model = DistributedDataParallel(Transformer(cfg.model).to(device))
        self.opt = torch.optim.AdamW(param_groups(self.model.module, o.weight_decay), lr=o.lr,
                                     betas=(o.beta1, o.beta2), eps=o.eps, fused=o.fused or None)
        self.grad_clip, self.device = o.grad_clip, device
        self.shape = (cfg.train.micro_batch_size, seq_len + 1)
        self.vocab, self.bf16 = cfg.model.vocab_size, cfg.train.precision == "bf16"
        self.generator = torch.Generator().manual_seed(rank)

    def step(self) -> float:
        """One training step; returns its loss."""
        tokens = torch.randint(0, self.vocab, self.shape, generator=self.generator).to(self.device)
        device_type = "cuda" if self.device.startswith("cuda") else "cpu"
        autocast = torch.autocast(device_type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            loss = self.model(tokens[:, :-1], tokens[:, 1:]).mean()
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return float(loss)

    def num_params(self) -> int:
        return self.model.module.num_params()
