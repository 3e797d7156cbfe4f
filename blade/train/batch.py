"""A micro-batch as the step sees it: inputs, next-token targets (IGNORE_INDEX where nothing is trained:
a skipped corrupt sample), and each target's source and noise label for the diagnostics."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from blade.model.transformer import IGNORE_INDEX


@dataclass
class MicroBatch:
    inputs: torch.Tensor    # [B, T] token ids
    targets: torch.Tensor   # [B, T] next-token ids, IGNORE_INDEX where not trained on
    sources: torch.Tensor   # [B, T] source id of each target
    labels: torch.Tensor    # [B, T] noise label of each target (0 = none)

    @property
    def valid(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX


def to_micro_batch(batch: dict, device: str) -> MicroBatch:
    tokens = batch["tokens"].to(device)
    targets = tokens[:, 1:].clone()
    targets[~batch["valid"].to(device)] = IGNORE_INDEX  # a skipped (corrupt) sample trains nothing
    return MicroBatch(tokens[:, :-1], targets, batch["sources"][:, 1:].to(device),
                      batch["labels"][:, 1:].to(device))
