"""SelectionDiagnostics' per-source and per-label counts and means against a direct computation."""
import torch

from blade.model.transformer import IGNORE_INDEX
from blade.runtime.dist import World
from blade.train.batch import MicroBatch
from blade.train.diagnostics import SelectionDiagnostics


class _Cfg:
    class selection:
        diag_interval = 0

    class train:
        steps = 10


def _micro_batch(gen, B=2, T=8, n_sources=3, n_labels=3):
    targets = torch.randint(0, 50, (B, T), generator=gen)
    targets[0, :2] = IGNORE_INDEX  # invalid positions count nowhere
    return MicroBatch(torch.zeros(B, T, dtype=torch.long), targets,
                      torch.randint(0, n_sources, (B, T), generator=gen),
                      torch.randint(0, n_labels, (B, T), generator=gen))


def test_rates_mean_losses_and_scores_per_label(tmp_path):
    gen = torch.Generator().manual_seed(0)
    diag = SelectionDiagnostics(["a", "b", "c"], ["x", "y"], str(tmp_path), World(0, 1, 0, "cpu"))
    seen = []
    for step in range(3):
        mbs = [_micro_batch(gen), _micro_batch(gen)]
        mask = torch.rand(2, 16, generator=gen) < 0.6
        loss, score = torch.rand(2, 16, generator=gen) * 5, torch.randn(2, 16, generator=gen)
        diag.observe(step, mask, mbs, _Cfg, loss, score if step else None)  # step 0 is not scored
        seen.append((mbs, mask, loss, score if step else None))
    totals = diag.totals()["by_label"]
    for label_id, name in enumerate(["none", "x", "y"]):
        sel = tot = loss_sum = score_sum = scored = 0.0
        for mbs, mask, loss, score in seen:
            for m, mb in enumerate(mbs):
                for i in range(16):
                    if mb.targets.flatten()[i] == IGNORE_INDEX or mb.labels.flatten()[i] != label_id:
                        continue
                    sel += float(mask[m, i])
                    tot += 1
                    loss_sum += float(loss[m, i])
                    if score is not None:
                        score_sum += float(score[m, i])
                        scored += 1
        got = totals[name]
        assert (got["selected"], got["total"]) == (sel, tot)
        assert abs(got["proxy_loss"] - loss_sum / tot) < 1e-6 and abs(got["score"] - score_sum / scored) < 1e-6
