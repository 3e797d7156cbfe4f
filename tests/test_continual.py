"""Continual pretraining from a real pretrained model (SmolLM2-135M GGUF) with the shipped
configs/continual-smollm2.yaml, unedited, on 2 ranks: its first step's loss is the imported model's on
that batch (a single-process forward), far below ln(vocab); then BLADE trains and evaluates."""
import json
import math
import os

import pytest
import torch

from blade.runtime.metrics import read_metrics
from tests.dist_harness import run_distributed
from tests.test_interop import PROSE, SMOL, needs_smol

pytestmark = [pytest.mark.slow, needs_smol]
CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "continual-smollm2.yaml")


def _fit(rank, world, overrides):
    from blade.config import load_config
    from blade.runtime.dist import World
    from blade.train.loop import Trainer

    return Trainer(load_config(CONFIG, overrides), World(rank, world, rank, "cpu")).fit()


def first_batch_loss(cfg, global_batch: int) -> float:
    """Mean per-token loss of the imported model on the run's first global batch, in one process."""
    from blade.data.mixture import open_dataset
    from blade.data.reader import DataStream
    from blade.interop.pretrained import load_pretrained
    from blade.model.transformer import Transformer
    from blade.train.batch import to_micro_batch

    model = Transformer(cfg.model).eval()
    load_pretrained(model, SMOL)
    ds = open_dataset(cfg.data.train, cfg.model.vocab_size, "error")
    (batch,) = DataStream(ds, cfg.train.seed, cfg.data.shuffle, global_batch, 1, 0, 1).next_step()
    mb = to_micro_batch(batch, "cpu")
    with torch.no_grad():
        loss = model(mb.inputs, mb.targets)
    return float(loss.sum() / (mb.targets != -100).sum())


def test_the_shipped_continual_config_starts_at_the_imported_model(tmp_path):
    from blade.config import load_config
    from blade.data.corpus import generate_builtin_corpus
    from blade.data.prepare import prepare_splits

    raw = tmp_path / "raw"
    generate_builtin_corpus(str(raw), seed=3, scale=0.03)
    prose = tmp_path / "prose.jsonl"
    prose.write_text("\n".join(json.dumps({"text": PROSE, "source": "prose"}) for _ in range(20)))
    # `blade prepare --builtin DIR --tokenizer <the gguf>`, smaller and with English prose in val
    prepare_splits({"train": [str(raw / "pool.jsonl"), str(prose)], "target": [str(raw / "target.jsonl")],
                    "val": [str(prose)]}, str(tmp_path / "data"), seq_len=64, tokenizer=SMOL)
    # the config file as shipped; only where the data and the run are, and fewer steps
    overrides = [f"run.dir={tmp_path / 'run'}", *(f"data.{k}={tmp_path / 'data' / k}" for k in ("train", "target", "val")),
                 "train.steps=3", "train.micro_batch_size=2", "train.eval_interval=3", "train.eval_sequences=4",
                 "selection.tau=2", "selection.k_ref_steps=1"]
    cfg = load_config(CONFIG, overrides)
    assert os.path.samefile(cfg.model.init_from, SMOL)  # the wheel's GGUF, relative to the repository root
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.vocab_size) == (576, 30, 49152)
    run_distributed(_fit, 2, args=(overrides,), deepspeed=True, timeout=900)
    records = read_metrics(str(tmp_path / "run"))
    first = next(r for r in records if r["kind"] == "train")
    val = next(r for r in records if r["kind"] == "eval")["val_loss"]
    # step 0's loss over the whole batch is the imported model's (2 ranks x 2 sequences, in one process)
    assert first["loss_all_tokens"] == pytest.approx(first_batch_loss(cfg, 4), rel=1e-5)
    assert first["loss_all_tokens"] < math.log(49152) - 4, first  # a random model starts at ~10.8
    assert val < 4.5, val  # technical prose: ~3 nats under SmolLM2 (tests/test_interop.py)
    assert any(r["kind"] == "ref" for r in records)
