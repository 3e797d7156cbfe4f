"""Weighted mixtures: realised shares, world-size independence, resume, epochs, exhaustion, renumbering."""
import json

import numpy as np
import pytest
import torch

from blade.config import load_config
from blade.data.mixture import BLOCK, MixedDataset, block_counts, open_dataset
from blade.data.reader import DataStream, ShardDataset
from blade.errors import ConfigError, DataError, DataExhausted
from tests.test_data import make_dataset

A, B = 48, 30  # sequences of the two components


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    a = make_dataset(root / "a", n=A)
    b = make_dataset(root / "b", n=B, per_shard=7)
    manifest = json.loads((root / "b" / "manifest.json").read_text())  # other source names, other order
    (root / "b" / "manifest.json").write_text(json.dumps({**manifest, "sources": ["c", "d", "a"]}))
    return a, b


def mixed(dirs, wa=0.8, wb=0.2):
    return MixedDataset({dirs[0]: wa, dirs[1]: wb})


def indices(stream, steps):
    return torch.cat([b["index"] for _ in range(steps) for b in stream.next_step()]).tolist()


def test_block_counts_round_by_largest_remainder():
    assert block_counts([0.8, 0.2]).tolist() == [819, 205]  # 819.2 and 204.8
    assert block_counts([1, 1, 1]).sum() == BLOCK and block_counts([3]).tolist() == [BLOCK]


def test_realised_shares_are_the_weights_within_sampling_error(dirs):
    ds = mixed(dirs)
    stream = DataStream(ds, 5, True, micro=8, world=2, rank=0, accum=1)
    for _ in range(40):
        stream.next_step()
    n = stream.position  # 640 positions of a 1024-block: drawn without replacement from its quotas
    share = stream.shares()["b"]
    se = np.sqrt(0.2 * 0.8 / n * (BLOCK - n) / (BLOCK - 1))
    assert abs(share - 0.2) < 4 * se and stream.shares()["a"] == pytest.approx(1 - share)
    assert stream.order.drawn(BLOCK * 3).tolist() == (3 * block_counts([0.8, 0.2])).tolist()  # exact per block


def test_one_rank_equals_two_ranks_and_resume_is_exact(dirs):
    ds = mixed(dirs)
    one = DataStream(ds, 3, True, micro=4, world=1, rank=0, accum=1)
    two = [DataStream(ds, 3, True, micro=2, world=2, rank=r, accum=1) for r in range(2)]
    want = indices(one, 30)
    got = []
    for _ in range(30):
        got += [i for s in two for i in s.next_step()[0]["index"].tolist()]
    assert got == want

    first = DataStream(ds, 3, True, micro=4, world=1, rank=0, accum=1)
    indices(first, 12)
    resumed = DataStream(mixed(dirs), 3, True, micro=4, world=1, rank=0, accum=1)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as a checkpoint keeps it
    assert indices(resumed, 18) == want[12 * 4:]
    other = DataStream(mixed(dirs, 0.5, 0.5), 3, True, micro=4, world=1, rank=0, accum=1)
    with pytest.raises(DataError, match="fingerprint mismatch"):
        other.load_state_dict(first.state_dict())


def test_each_component_runs_its_own_epochs(dirs):
    ds = mixed(dirs)
    order = ds.order(7, True)
    drawn = [order.index(p) for p in range(900)]
    from_b = [i - A for i in drawn if i >= A]
    assert len(from_b) == order.drawn(900)[1]
    for e in range(len(from_b) // B):  # every epoch of b is a permutation of b
        assert sorted(from_b[e * B:(e + 1) * B]) == list(range(B))
    assert sorted([i for i in drawn if i < A][:A]) == list(range(A))


def test_exhausted_source_stops_the_stream_when_asked(dirs):
    ds = mixed(dirs, 0.5, 0.5)
    stop = DataStream(ds, 1, True, micro=4, world=2, rank=1, accum=2, stop_when_exhausted=True)
    steps = 0
    with pytest.raises(DataExhausted, match="b is used up after .* data.on_exhausted=repeat starts"):
        while True:
            stop.next_step()
            steps += 1
    assert stop.order.drawn(stop.position)[1] <= B < stop.order.drawn(stop.position + 16)[1]
    single = DataStream(ShardDataset(dirs[0]), 1, True, micro=4, world=1, rank=0, accum=1, stop_when_exhausted=True)
    assert len([single.next_step() for _ in range(A // 4)]) == A // 4  # exactly one epoch, then the stop
    with pytest.raises(DataExhausted):
        single.next_step()


def test_sources_and_labels_are_renumbered_into_merged_names(dirs):
    ds = mixed(dirs)
    assert ds.source_names == ["a", "b", "c", "d"] and ds.label_names == ["noise"]
    b = ShardDataset(dirs[1])
    for k in range(B):
        got, want = ds[A + k], b[k]
        names = [b.source_names[s] for s in want["sources"]]
        assert [ds.source_names[s] for s in got["sources"]] == names
        assert np.array_equal(got["labels"], want["labels"]) and np.array_equal(got["tokens"], want["tokens"])


def test_mixtures_of_different_sequence_lengths_are_refused(dirs, tmp_path):
    other = make_dataset(tmp_path / "long", n=10, seq_len=16)
    with pytest.raises(DataError, match="differ in seq_len or tokenizer"):
        MixedDataset({dirs[0]: 1, other: 1})


@pytest.mark.parametrize("value,message", [
    ("{}", "data.train is an empty mapping"),
    ("{a: 0}", "must be a directory name with a weight > 0"),
    ("{a: x}", "must be a directory name with a weight > 0"),
    ("{a: 1, b: 0.0001}", "below 1/1024"),
    ("[a, b]", "data.train must be a string or a mapping"),
])
def test_bad_mixtures_are_one_line_config_errors(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"data.train={value}"])


def test_target_mixtures_are_checked_like_training_mixtures(dirs):
    from blade.data.paths import check_paths

    cfg = load_config(None, [f"data.train={dirs[0]}", f"data.target={{{dirs[0]}: 1, {dirs[1]}: 2}}", "data.val=null",
                             "model.max_seq_len=64"])
    assert check_paths(cfg)["target"]["seq_len"] == 8 and cfg.data.dirs("target") == list(dirs)
    missing = load_config(None, [f"data.train={dirs[0]}", f"data.target={{{dirs[0]}: 1, nowhere: 1}}"])
    with pytest.raises(ConfigError, match=r"data.target\[nowhere\]: no manifest.json"):
        check_paths(missing)
    assert isinstance(open_dataset(cfg.data.target), MixedDataset)


def test_a_mixture_config_loads():
    cfg = load_config(None, ["data.train={data/web: 3, data/code: 1}", "data.on_exhausted=stop"])
    assert cfg.data.train == {"data/web": 3, "data/code": 1} and cfg.data.dirs("train") == ["data/web", "data/code"]


# ----------------------------------------------------------------------------- in the trainer


def test_a_mixture_run_resumes_bit_exactly_and_logs_its_shares(builtin_data, tmp_path):
    """blade on {train: 0.8, target: 0.2}: killed after step 5, resumed from step 4, equal to a straight run."""
    from blade.runtime.metrics import read_metrics
    from tests.test_checkpoint import INTERVAL, assert_same_run, launch, log_tail

    mix = f"data.train={{{builtin_data}/train: 0.8, {builtin_data}/target: 0.2}}"
    straight = str(tmp_path / "straight")
    assert launch(builtin_data, straight, mix) == [0, 0], log_tail(straight)
    run_dir = str(tmp_path / "run")
    launch(builtin_data, run_dir, mix, INTERVAL, faults_spec="kill@step_end:5#0")
    assert launch(builtin_data, run_dir, mix, INTERVAL, "checkpoint.resume=auto") == [0, 0], log_tail(run_dir)
    assert_same_run(straight, run_dir)
    last = [r for r in read_metrics(run_dir) if r["kind"] == "train"][-1]
    assert set(last["data_mix"]) == {"train", "target"} and abs(last["data_mix"]["target"] - 0.2) < 0.15


def _fit(rank, world, overrides):
    from blade.config import load_config
    from blade.runtime.dist import World
    from blade.train.loop import Trainer
    from tests.conftest import TINY

    return Trainer(load_config(TINY, overrides), World(rank, world, rank, "cpu")).fit()


def test_on_exhausted_stop_ends_the_run_after_one_epoch(builtin_data, tmp_path):
    from blade.runtime.checkpoint import newest_complete, root, step_name
    from blade.runtime.metrics import read_metrics
    from tests.conftest import tiny_overrides
    from tests.dist_harness import run_distributed

    epoch_steps = len(ShardDataset(f"{builtin_data}/val")) // 8
    run_dir = str(tmp_path / "run")
    overrides = tiny_overrides(builtin_data, run_dir, f"data.train={builtin_data}/val", "data.on_exhausted=stop",
                               "selection.strategy=random", "train.steps=1000", "train.eval_interval=0",
                               "train.micro_batch_size=8", "train.grad_accum=1")
    summary = run_distributed(_fit, 1, args=(overrides,), deepspeed=True)[0]
    records = read_metrics(run_dir)
    assert [r["step"] for r in records if r["kind"] == "data_exhausted"] == [epoch_steps]
    assert summary["step"] == epoch_steps - 1 and summary["tokens_seen"] == epoch_steps * 8 * 64
    assert newest_complete(root(run_dir)).endswith(step_name(epoch_steps))
