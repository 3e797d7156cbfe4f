"""Continual pretraining from a real pretrained model (SmolLM2-135M GGUF) on 2 ranks with ZeRO-3:
BLADE starts at the imported model's loss, not at ln(vocab)."""
import json
import math

import pytest

from blade.runtime.metrics import read_metrics
from tests.dist_harness import run_distributed
from tests.test_interop import PROSE, SMOL, needs_smol

pytestmark = [pytest.mark.slow, needs_smol]


def _fit(rank, world, config_path):
    from blade.config import load_config
    from blade.runtime.dist import World
    from blade.train.loop import Trainer

    return Trainer(load_config(config_path), World(rank, world, rank, "cpu")).fit()


def test_blade_continues_from_the_imported_model(tmp_path):
    from blade.data.corpus import generate_builtin_corpus
    from blade.data.prepare import prepare_splits

    raw = tmp_path / "raw"
    generate_builtin_corpus(str(raw), seed=3, scale=0.03)
    prose = tmp_path / "prose.jsonl"
    prose.write_text("\n".join(json.dumps({"text": PROSE, "source": "prose"}) for _ in range(20)))
    prepare_splits({"train": [str(raw / "pool.jsonl"), str(prose)], "target": [str(prose)],
                    "val": [str(prose)]}, str(tmp_path / "data"), seq_len=64, tokenizer=SMOL)
    config = {
        "run": {"dir": str(tmp_path / "run")},
        "model": {"init_from": SMOL, "max_seq_len": 64},   # the shape comes from the checkpoint
        "data": {k: str(tmp_path / "data" / k) for k in ("train", "target", "val")},
        "train": {"steps": 3, "micro_batch_size": 2, "eval_interval": 3, "eval_sequences": 4},
        "optim": {"lr": 1e-5, "warmup_steps": 0},
        "selection": {"strategy": "blade", "tau": 2, "k_ref_steps": 1, "diag_interval": 0},
        "logging": {"wandb": "off", "progress": False},
    }
    (tmp_path / "cfg.yaml").write_text(json.dumps(config))
    run_distributed(_fit, 2, args=(str(tmp_path / "cfg.yaml"),), deepspeed=True, timeout=900)
    records = read_metrics(str(tmp_path / "run"))
    first = next(r for r in records if r["kind"] == "train")
    val = next(r for r in records if r["kind"] == "eval")["val_loss"]
    ln_vocab = math.log(49152)
    # a randomly initialised model starts at ~ln(vocab) = 10.8; the pretrained one far below it
    assert first["loss_all_tokens"] < ln_vocab - 4, first
    assert val < 4.5, val  # technical prose: ~3 nats under SmolLM2 (tests/test_interop.py)
    assert any(r["kind"] == "ref" for r in records)
