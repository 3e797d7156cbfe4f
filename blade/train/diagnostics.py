"""What the selection did: per-source and per-label selection rates, mean proxy loss and mean score
(which of the two signals separates a kind of noise), score histograms (paper Fig. 3), and sample
sequences with their masks for `blade inspect`.

Counts accumulate locally every step and are all-reduced only when a diagnostics record is written,
so the per-step cost is a couple of bincounts.
"""
from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

from blade.runtime.dist import all_reduce

HIST_BINS = 40
ROWS = ("selected", "total", "proxy_loss", "score", "scored")  # per-name accumulators


class SelectionDiagnostics:
    def __init__(self, source_names: list[str], label_names: list[str], run_dir: str, world):
        self.sources = list(source_names)
        self.labels = ["none"] + list(label_names)  # label id 0 = unlabelled
        self.run_dir, self.world = run_dir, world
        shape = (len(ROWS), len(self.sources)), (len(ROWS), len(self.labels))
        self.window = [torch.zeros(s, dtype=torch.float64) for s in shape]
        self.run_total = [torch.zeros(s, dtype=torch.float64) for s in shape]
        self.hist = None
        self.last_score_mean = float("nan")

    def state_dict(self) -> dict:
        """The run totals (already all-reduced: the same on every rank)."""
        return {"run_total": [t.tolist() for t in self.run_total]}

    def load_state_dict(self, state: dict) -> None:
        for total, saved in zip(self.run_total, state["run_total"], strict=True):
            total.copy_(torch.tensor(saved, dtype=torch.float64))

    def rank_state_dict(self) -> dict:
        """This rank's counts of the window not yet all-reduced, and its last mean score."""
        return {"window": [w.clone() for w in self.window], "last_score_mean": self.last_score_mean}

    def load_rank_state_dict(self, state: dict) -> None:
        for window, saved in zip(self.window, state["window"], strict=True):
            window.copy_(saved)
        self.last_score_mean = state["last_score_mean"]

    @staticmethod
    def merge_rank_states(states: list[dict], rank: int) -> dict:
        """Rank `rank`'s state after resharding from len(states) ranks: rank 0 takes the old windows'
        sum, so that the next flush counts every token once."""
        window = [sum(s["window"][i] for s in states) for i in range(len(states[0]["window"]))]
        return {"window": window if rank == 0 else [torch.zeros_like(w) for w in window],
                "last_score_mean": states[0]["last_score_mean"]}

    def due(self, step: int, cfg) -> bool:
        interval = cfg.selection.diag_interval
        return bool(interval) and ((step + 1) % interval == 0 or step == cfg.train.steps - 1)

    def observe(self, step: int, mask: torch.Tensor, mbs: list, cfg, proxy_loss: torch.Tensor,
                score: torch.Tensor | None = None):
        """Count selected/total tokens and sum the proxy losses (and scores) per source and label;
        histogram the scores on diag steps. mask, proxy_loss, score: [micro-batches, B*T]."""
        valid = torch.stack([mb.valid.flatten() for mb in mbs]).cpu()  # the counters live on the CPU
        rows = [mask.cpu()[valid].double(), None, proxy_loss.detach().cpu()[valid].double()]
        if score is not None:
            rows += [score.cpu()[valid].double(), None]
        for acc, key in zip(self.window, ("sources", "labels")):
            ids = torch.stack([getattr(mb, key).flatten() for mb in mbs]).cpu()[valid].long()
            n = acc.shape[1]
            for row, weights in enumerate(rows):
                acc[row] += torch.bincount(ids, weights=weights, minlength=n)[:n].double()
        if score is None:
            return
        s = score.cpu()[valid].float()
        mean = all_reduce(torch.tensor([float(s.sum()), float(s.numel())], dtype=torch.float64))
        self.last_score_mean = float(mean[0] / mean[1].clamp_min(1))
        if self.due(step, cfg):
            self.hist = self._histogram(s)
            if self.world.is_main:
                self._save_sample(step, mbs[0], mask[0], score[0])

    def _histogram(self, s: torch.Tensor) -> dict:
        big = torch.finfo(torch.float32).max
        lo = all_reduce(torch.tensor([float(s.min()) if s.numel() else big]), dist.ReduceOp.MIN)
        hi = all_reduce(torch.tensor([float(s.max()) if s.numel() else -big]), dist.ReduceOp.MAX)
        lo, hi = float(lo), float(hi)
        hi = hi if hi > lo else lo + 1.0
        counts = all_reduce(torch.histc(s, bins=HIST_BINS, min=lo, max=hi).double())
        edges = torch.linspace(lo, hi, HIST_BINS + 1)
        return {"edges": [round(e, 5) for e in edges.tolist()], "counts": [int(c) for c in counts.tolist()]}

    def _save_sample(self, step: int, mb, mask: torch.Tensor, score: torch.Tensor) -> None:
        T = mb.inputs.shape[1]
        record = {"step": step, "inputs": mb.inputs[0].tolist(), "targets": mb.targets[0].tolist(),
                  "labels": mb.labels[0].tolist(), "selected": mask[:T].int().tolist(),
                  "score": [round(x, 4) for x in score[:T].float().tolist()]}
        with open(os.path.join(self.run_dir, "samples.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")

    def _rates(self, counts: list[torch.Tensor]) -> dict:
        """{name: selected, total, rate, mean proxy loss, mean score (None where not measured)}."""
        def mean(total, count):
            return float(total / count) if count > 0 else None

        out = {}
        for names, c, key in zip((self.sources, self.labels), counts, ("by_source", "by_label")):
            out[key] = {name: {"selected": int(c[0, i]), "total": int(c[1, i]), "rate": mean(c[0, i], c[1, i]),
                               "proxy_loss": mean(c[2, i], c[1, i]), "score": mean(c[3, i], c[4, i])}
                        for i, name in enumerate(names)}
        return out

    def flush(self, step: int) -> dict:
        """The diagnostics record for the window that ends at `step` (a collective: all ranks call it)."""
        window = [all_reduce(w.clone()) for w in self.window]
        for total, w in zip(self.run_total, window):
            total += w
        for w in self.window:
            w.zero_()
        record = {"kind": "diag", "step": step, **self._rates(window)}
        if self.hist is not None:
            record["score_hist"], self.hist = self.hist, None
        return record

    def totals(self) -> dict:
        """Selection rates over the whole run (the run_total is already global)."""
        pending = [all_reduce(w.clone()) for w in self.window]
        return self._rates([t + p for t, p in zip(self.run_total, pending)])
