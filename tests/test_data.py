"""ShardDataset, GlobalOrder, DataStream: exact coverage, world-size independence, resume, bad data.

The synthetic dataset stores sample i (canonical order) with tokens[0] == i, so a batch row names
the sample it came from.
"""
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import torch

from blade.data.reader import (
    DataStream,
    GlobalOrder,
    ShardDataset,
    batch_positions,
    eval_batches,
)
from blade.data.shards import FORMAT, KEY, sha256_file, write_shard
from blade.errors import DataError

N, PER_SHARD, SEQ = 48, 10, 8  # shards of 10, 10, 10, 10, 8 samples
BAD = "shard-000001.tar"       # holds samples 10..19


def make_dataset(root, n=N, per_shard=PER_SHARD, seq_len=SEQ):
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for first in range(0, n, per_shard):
        rows = np.arange(first, min(first + per_shard, n))
        name = f"shard-{len(shards):06d}.tar"
        tokens = (rows[:, None] + np.arange(seq_len + 1)).astype(np.uint16)
        write_shard(str(root / name), tokens, np.repeat(rows[:, None] % 3, seq_len + 1, 1),
                    np.repeat(rows[:, None] % 2, seq_len + 1, 1))
        shards.append({"name": name, "sequences": len(rows), "sha256": sha256_file(str(root / name))})
    manifest = {"format": FORMAT, "seq_len": seq_len, "vocab_size": 1000,
                "tokenizer": {"file": "tokenizer.model", "sha256": "0" * 64},
                "sources": ["a", "b", "c"], "labels": ["noise"], "shards": shards, "num_sequences": n}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return str(root)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture
def copy(data_dir, tmp_path):
    return shutil.copytree(data_dir, tmp_path / "data")


def ids(batches):
    """Sample ids (tokens[:, 0]) of a list of micro-batches, in order."""
    return torch.cat([b["tokens"][:, 0] for b in batches]).tolist()


def read_steps(stream, steps):
    return [stream.next_step() for _ in range(steps)]


def test_dataset_reads_canonical_order(data_dir):
    ds = ShardDataset(data_dir)
    assert len(ds) == N and ds.seq_len == SEQ and ds.shard_sizes == [10, 10, 10, 10, 8]
    assert ds.source_names == ["a", "b", "c"] and ds.label_names == ["noise"]
    for i in range(N):
        item = ds[i]
        assert item["tokens"].dtype == np.int64 and item["tokens"].shape == (SEQ + 1,)
        assert item["tokens"][0] == i and item["sources"][0] == i % 3 and item["labels"][0] == i % 2
        assert item["valid"]
    assert ShardDataset(data_dir).fingerprint == ds.fingerprint and ds.skipped_sequences == 0


def test_global_order_is_a_two_level_permutation_per_epoch():
    sizes, seed = [5, 3, 7], 11
    order = GlobalOrder(sizes, seed, shuffle=True)
    starts = np.cumsum(sizes) - sizes
    epochs = []
    for e in range(3):
        want = []  # the documented rule, restated
        for k in np.random.default_rng([seed, e]).permutation(3):
            within = np.random.default_rng([seed, e, k]).permutation(sizes[k])
            want += [int(starts[k] + j) for j in within]
        got = [order.index(e * 15 + q) for q in range(15)]
        assert got == want and sorted(got) == list(range(15))
        epochs.append(got)
    assert epochs[0] != epochs[1] != epochs[2]
    assert [order.index(p) for p in range(15)] == epochs[0]  # going back re-derives epoch 0
    plain = GlobalOrder(sizes, seed, shuffle=False)
    assert [plain.index(p) for p in range(40)] == [p % 15 for p in range(40)]


def test_batch_layout_is_a_pure_function():
    assert list(batch_positions(100, 0, micro=2, world=2, rank=1)) == [102, 103]
    # micro-batch q = s * accum + m of rank r: start + s*G + m*micro*world + r*micro + j
    micro, world, accum = 3, 2, 4
    for s in range(3):
        for m in range(accum):
            for r in range(world):
                first = 7 + s * micro * world * accum + m * micro * world + r * micro
                got = batch_positions(7, s * accum + m, micro, world, r)
                assert list(got) == list(range(first, first + micro))


def test_one_rank_micro4_equals_two_ranks_micro2(data_dir):
    ds = ShardDataset(data_dir)
    one = DataStream(ds, seed=3, shuffle=True, micro=4, world=1, rank=0, accum=2)
    two = [DataStream(ds, seed=3, shuffle=True, micro=2, world=2, rank=r, accum=2)
           for r in range(2)]
    for _ in range(9):  # crosses the epoch boundary (8 sequences per step, 48 per epoch)
        a, b0, b1 = one.next_step(), two[0].next_step(), two[1].next_step()
        for m in range(2):
            for key in ("tokens", "sources", "labels", "valid"):
                assert torch.equal(a[m][key], torch.cat([b0[m][key], b1[m][key]]))
    assert one.position == two[0].position == two[1].position == 72


def test_two_ranks_two_workers_read_an_epoch_exactly_once(data_dir):
    ds = ShardDataset(data_dir)
    ranks = [DataStream(ds, seed=5, shuffle=True, micro=2, world=2, rank=r, accum=3, num_workers=2)
             for r in range(2)]
    single = DataStream(ds, seed=5, shuffle=True, micro=4, world=1, rank=0, accum=3)
    per_rank = [read_steps(s, N // 12) for s in ranks]  # 12 sequences per step
    reference = read_steps(single, N // 12)
    seen = [i for steps in per_rank for step in steps for i in ids(step)]
    assert sorted(seen) == list(range(N))
    for s in range(N // 12):
        for m in range(3):
            both = ids([per_rank[0][s][m]]) + ids([per_rank[1][s][m]])
            assert both == ids([reference[s][m]])
    batch = per_rank[0][0][0]
    assert batch["tokens"].dtype == torch.long and batch["tokens"].shape == (2, SEQ + 1)
    assert batch["valid"].dtype == torch.bool and batch["valid"].all()
    assert torch.equal(batch["index"], batch["tokens"][:, 0])


def test_resume_mid_epoch_continues_identically_across_epochs(data_dir):
    ds = ShardDataset(data_dir)
    a = DataStream(ds, seed=9, shuffle=True, micro=2, world=2, rank=1, accum=2)
    read_steps(a, 3)
    state = a.state_dict()
    assert state["position"] == 24 and state["epoch"] == 0
    rest = [ids(step) for step in read_steps(a, 6)]  # positions 24..71: crosses into epoch 1
    for workers in (0, 2):
        b = DataStream(ShardDataset(data_dir), seed=9, shuffle=True, micro=2, world=2, rank=1,
                       accum=2, num_workers=workers)
        read_steps(b, 2)  # running (and, with workers, prefetching) before the restore
        b.load_state_dict(json.loads(json.dumps(state)))
        assert [ids(step) for step in read_steps(b, 6)] == rest and b.position == 72


def test_epochs_are_shuffled_differently(data_dir):
    def stream(shuffle):
        return DataStream(ShardDataset(data_dir), 1, shuffle, micro=N, world=1, rank=0, accum=1)

    shuffled = stream(True)
    first, second = ids(shuffled.next_step()), ids(shuffled.next_step())
    assert sorted(first) == sorted(second) == list(range(N)) and first != second
    assert shuffled.state_dict()["epoch"] == 2
    assert ids(stream(False).next_step()) == list(range(N))


def test_resume_on_other_data_is_refused(data_dir, tmp_path):
    state = DataStream(ShardDataset(data_dir), 0, True, 2, 1, 0, 1).state_dict()
    other = DataStream(ShardDataset(make_dataset(tmp_path / "other", n=40)), 0, True, 2, 1, 0, 1)
    with pytest.raises(DataError, match="fingerprint mismatch"):
        other.load_state_dict(state)


def test_eval_batches_are_fixed_and_unshuffled(data_dir):
    ds = ShardDataset(data_dir)
    first = eval_batches(ds, micro=2, world=2, rank=1, sequences=26)
    # rank 1 reads rows 2, 3 of every 4; global rows 26, 27 of the last batch are padding (sequence 25)
    assert ids(first) == [i for q in range(6) for i in (4 * q + 2, 4 * q + 3)] + [25, 25]
    assert [v for b in first for v in b["valid"].tolist()][-2:] == [False, False]
    again = eval_batches(ds, micro=2, world=2, rank=1, sequences=26)
    assert all(torch.equal(x["tokens"], y["tokens"]) for x, y in zip(first, again))


@pytest.mark.parametrize("world,micro", [(1, 1), (1, 8), (2, 3), (4, 2), (3, 5)])
@pytest.mark.parametrize("sequences", [0, 17])
def test_eval_set_is_the_same_on_any_world_size_and_micro_batch(data_dir, world, micro, sequences):
    ds = ShardDataset(data_dir)
    per_rank = [eval_batches(ds, micro, world, r, sequences) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # the same number of micro-batches on every rank
    seen = [int(i) for batches in per_rank for b in batches for i, v in zip(b["index"], b["valid"]) if v]
    assert sorted(seen) == list(range(sequences or N))  # each sequence once, none twice


def member(path, name):
    with tarfile.open(path) as tf:
        return tf.getmember(name)


def overwrite(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def break_shard(root, how):
    shard = root / BAD
    if how == "missing_manifest":
        os.remove(root / "manifest.json")
    elif how == "missing_shard":
        os.remove(shard)
    elif how == "empty_shard":
        shard.write_bytes(b"")
    elif how == "truncated_shard":
        shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 3])
    elif how == "corrupt_header":
        overwrite(shard, member(shard, f"{KEY}.labels.npy").offset + 100, b"garbage!")
    elif how == "count_mismatch":
        manifest = json.loads((root / "manifest.json").read_text())
        manifest["shards"][1]["sequences"] = 11
        (root / "manifest.json").write_text(json.dumps(manifest))
    elif how == "corrupt_member":
        indexed = ShardDataset(str(root)).shards[1]  # sample 12 is row 2 of shard 1
        overwrite(shard, indexed.data_offset + 2 * indexed.row_bytes + 4, b"\x00garbage")


OPEN_ERRORS = {
    "missing_manifest": "manifest.json not found",
    "missing_shard": f"{BAD} is missing",
    "empty_shard": f"{BAD} is empty (0 bytes)",
    "truncated_shard": f"{BAD} is truncated",
    "corrupt_header": f"{BAD} has a corrupt tar header at byte",
    "count_mismatch": f"{BAD} holds 10 samples but manifest.json says 11",
}


@pytest.mark.parametrize("how", sorted(OPEN_ERRORS))
def test_bad_data_is_a_one_line_error_naming_the_shard(copy, how):
    break_shard(copy, how)
    with pytest.raises(DataError) as e:
        ShardDataset(str(copy))
    assert OPEN_ERRORS[how] in str(e.value) and "\n" not in str(e.value)


def test_shards_of_the_old_format_are_refused_with_the_fix(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "blade-shards/1"}))
    with pytest.raises(DataError, match="holds blade-shards/1 shards .*re-run `blade prepare`"):
        ShardDataset(str(copy))


def test_corrupt_member_and_foreign_token_ids_fail_at_read_naming_shard_and_sample(copy, data_dir):
    with pytest.raises(DataError, match=f"token id 27 >= vocab_size 20 in shard .*{BAD} sample "
                                        "19: the data was tokenized with a different"):
        ShardDataset(data_dir, vocab_size=20)[19]
    break_shard(copy, "corrupt_member")
    ds = ShardDataset(str(copy))  # headers are fine: found when the sample is read
    assert ds[11]["valid"]
    with pytest.raises(DataError, match=rf"shard .*{BAD} sample 12 \(its row 2\) is corrupt \(checksum mismatch\)"):
        ds[12]


@pytest.mark.parametrize("how", sorted(set(OPEN_ERRORS) - {"missing_manifest"}))
def test_skip_excludes_a_bad_shard_with_counts(copy, data_dir, how):
    break_shard(copy, how)
    with pytest.warns(UserWarning, match=f"skipping: shard .*{BAD}"):
        ds = ShardDataset(str(copy), on_bad_shard="skip")
    assert ds.skipped_shards == [BAD]
    assert ds.skipped_sequences == (11 if how == "count_mismatch" else 10)  # as the manifest says
    assert [ds[i]["tokens"][0] for i in range(len(ds))] == [*range(10), *range(20, N)]
    assert ds.fingerprint != ShardDataset(data_dir).fingerprint  # a resume would be refused


def test_skip_masks_a_corrupt_sample_without_shifting_positions(copy, data_dir):
    break_shard(copy, "corrupt_member")
    ds = ShardDataset(str(copy), on_bad_shard="skip")
    with pytest.warns(UserWarning, match=f"masking: shard .*{BAD} sample 12 "):
        item = ds[12]
    assert not item["valid"] and not item["tokens"].any() and ds.skipped_sequences == 1
    ds[12]
    assert ds.skipped_sequences == 1  # counted once per sample

    fresh = ShardDataset(str(copy), on_bad_shard="skip")  # workers report their masks back
    clean = DataStream(ShardDataset(data_dir), 2, True, micro=4, world=1, rank=0, accum=1)
    masked = DataStream(fresh, 2, True, micro=4, world=1, rank=0, accum=1, num_workers=2)
    for _ in range(N // 4):
        want, got = clean.next_step()[0], masked.next_step()[0]
        assert torch.equal(got["index"], want["index"])
        bad = got["index"] == 12
        assert torch.equal(got["valid"], ~bad) and not got["tokens"][bad].any()
        assert torch.equal(got["tokens"][~bad], want["tokens"][~bad])
    assert fresh.bad_samples == {12} and fresh.skipped_sequences == 1
