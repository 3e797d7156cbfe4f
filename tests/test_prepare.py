"""prepare -> shards -> read: the packed stream, labels, sources and manifest are exactly right."""
import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from blade.data.prepare import prepare, prepare_splits
from blade.data.reader import ShardDataset
from blade.data.tokenizer import Tokenizer
from blade.errors import DataError
from tests.test_tokenizer import MARK, VOCAB, corpus, corpus_documents, tok_model  # noqa: F401 (fixtures)

SEQ = 32


@pytest.fixture(scope="session")
def prepared(corpus, tok_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return out, prepare(corpus, str(out), seq_len=SEQ, tokenizer=tok_model, shard_sequences=16)


def expected_stream(paths, tok, source_names, label_names, mix=True, seed=0):
    """The packed stream rebuilt without blade.prepare: token, source and label id per token. The
    documents of all inputs (those with text) are in the order of default_rng(seed).permutation."""
    docs = [d for d in corpus_documents(paths) if d[0]]
    if mix:
        docs = [docs[j] for j in np.random.default_rng(seed).permutation(len(docs))]
    tokens, sources, labels = [], [], []
    for text, source, spans in docs:
        ids = tok.encode(text)
        lab = [0] * len(ids)
        if spans:  # ASCII text: token k covers text[len(decode(ids[:k])):len(decode(ids[:k + 1]))]
            ends = [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]
            begins = [0] + ends[:-1]
            for start, end, name in spans:
                for k in range(len(ids)):
                    if begins[k] < end and ends[k] > start:
                        lab[k] = 1 + label_names.index(name)
        tokens += ids + [tok.eos_id]
        sources += [source_names.index(source)] * (len(ids) + 1)
        labels += lab + [0]
    return np.array(tokens), np.array(sources), np.array(labels)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # wds: open files
def test_round_trip_reproduces_the_packed_stream(corpus, prepared):
    out, m = prepared
    tok = Tokenizer(str(out / "tokenizer.model"))
    stream = expected_stream(corpus, tok, m["sources"], m["labels"])
    n = (len(stream[0]) - 1) // SEQ
    assert m["num_sequences"] == n and m["dropped_tail_tokens"] == len(stream[0]) - (n * SEQ + 1)
    want = [np.stack([a[i * SEQ:i * SEQ + SEQ + 1] for i in range(n)]) for a in stream]
    assert (want[2] > 0).sum() > 50  # the corpus does exercise labels

    shards = [str(out / s["name"]) for s in m["shards"]]  # a plain webdataset reader reads them
    samples = list(wds.WebDataset(shards, shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["shard"] * len(shards)
    tokens = np.concatenate([s["tokens.npy"] for s in samples])
    assert tokens.dtype == np.uint16
    np.testing.assert_array_equal(tokens, want[0])

    ds = ShardDataset(str(out))
    assert len(ds) == n and ds.seq_len == SEQ and ds.source_names == m["sources"]
    for i in range(n):
        item = ds[i]
        assert item["valid"]
        for key, expected in zip(("tokens", "sources", "labels"), want):
            np.testing.assert_array_equal(item[key], expected[i])


def test_manifest_counts_and_checksums(corpus, tok_model, prepared):
    out, m = prepared
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    assert m["format"] == "blade-shards/2" and m["seq_len"] == SEQ and m["mixed"]
    tok = Tokenizer(tok_model)
    assert m["vocab_size"] == tok.vocab_size
    assert m["tokenizer"] == {"file": "tokenizer.model", "sha256": tok.fingerprint}
    assert Tokenizer(str(out / "tokenizer.model")).fingerprint == tok.fingerprint
    names = [s["name"] for s in m["shards"]]
    assert names == [f"shard-{i:06d}.tar" for i in range(len(names))]
    assert sum(s["sequences"] for s in m["shards"]) == m["num_sequences"]
    assert all(s["sequences"] == 16 for s in m["shards"][:-1])
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert s["bytes"] == len(data) and s["sha256"] == hashlib.sha256(data).hexdigest()
    assert set(m["sources"]) == {"web", "books", "plain", "notes"}
    assert set(m["labels"]) == {"noise", "pii"}

    _, sources, labels = expected_stream(corpus, tok, m["sources"], m["labels"])
    kept = m["num_sequences"] * SEQ + 1  # every stream token up to the dropped tail, once
    src, lab = Counter(sources[:kept].tolist()), Counter(labels[:kept].tolist())
    assert m["tokens_per_source"] == {name: src[i] for i, name in enumerate(m["sources"])}
    assert m["label_token_counts"] == {name: lab[i + 1] for i, name in enumerate(m["labels"])}


def test_keep_order_packs_the_inputs_as_given(corpus, tok_model, tmp_path):
    m = prepare(corpus, str(tmp_path), seq_len=SEQ, tokenizer=tok_model, mix=False)
    tok = Tokenizer(tok_model)
    stream = expected_stream(corpus, tok, m["sources"], m["labels"], mix=False)
    ds = ShardDataset(str(tmp_path))
    got = np.concatenate([ds[0]["tokens"]] + [ds[i]["tokens"][1:] for i in range(1, len(ds))])
    np.testing.assert_array_equal(got, stream[0][:len(got)])
    assert not m["mixed"]


def test_workers_give_byte_identical_shards(corpus, tok_model, tmp_path, monkeypatch):
    monkeypatch.setattr("blade.data.prepare.DOCS_PER_TASK", 3)  # several tasks even for this corpus
    one = prepare(corpus, str(tmp_path / "one"), seq_len=SEQ, tokenizer=tok_model, workers=1)
    two = prepare(corpus, str(tmp_path / "two"), seq_len=SEQ, tokenizer=tok_model, workers=2)
    assert one == two and len(one["shards"]) >= 1
    for s in one["shards"]:
        assert (tmp_path / "one" / s["name"]).read_bytes() == (tmp_path / "two" / s["name"]).read_bytes()


def test_label_covers_exactly_the_overlapping_tokens(tok_model, tmp_path):
    text = f"the clean data then {MARK} and more clean text"
    start = text.index(MARK)
    doc = {"text": text, "source": "web", "labels": [[start, start + len(MARK), "noise"]]}
    (tmp_path / "one.jsonl").write_text(json.dumps(doc) + "\n")
    prepare([str(tmp_path / "one.jsonl")], str(tmp_path / "out"), seq_len=2, tokenizer=tok_model)
    ds = ShardDataset(str(tmp_path / "out"))
    tokens = np.concatenate([ds[0]["tokens"]] + [ds[i]["tokens"][1:] for i in range(1, len(ds))])
    labels = np.concatenate([ds[0]["labels"]] + [ds[i]["labels"][1:] for i in range(1, len(ds))])
    hit = np.flatnonzero(labels)
    assert len(hit) and np.all(np.diff(hit) == 1)  # one contiguous run
    tok = Tokenizer(tok_model)
    assert tok.decode(tokens[hit]).strip() == MARK

    def covered(k):  # characters of the (ASCII) text covered by the first k tokens
        return len(tok.decode(tokens[:k]))

    end = start + len(MARK)  # the run overlaps the span, its neighbours do not
    assert covered(hit[0]) <= start < covered(hit[0] + 1)
    assert covered(hit[-1]) < end <= covered(hit[-1] + 1)


def test_prepare_is_reproducible(corpus, tok_model, tmp_path):
    a = prepare(corpus[1:2], str(tmp_path / "a"), seq_len=16, tokenizer=tok_model)
    b = prepare(corpus[1:2], str(tmp_path / "b"), seq_len=16, tokenizer=tok_model)
    assert a == b and a["sources"] == ["plain"]


def test_prepare_splits_share_one_tokenizer_and_name_lists(corpus, tmp_path):
    ms = prepare_splits({"train": corpus[:1], "val": corpus[2:]}, str(tmp_path), seq_len=16,
                        vocab_size=VOCAB)
    model = (tmp_path / "tokenizer.model").read_bytes()
    for name, m in ms.items():
        assert (tmp_path / name / "tokenizer.model").read_bytes() == model
        assert m["tokenizer"]["sha256"] == hashlib.sha256(model).hexdigest()
        assert ShardDataset(str(tmp_path / name)).fingerprint
    assert ms["train"]["sources"] == ms["val"]["sources"] == ["books", "web", "notes"]
    assert ms["train"]["labels"] == ms["val"]["labels"] == ["noise", "pii"]
    assert ms["train"]["tokens_per_source"]["notes"] == 0 < ms["val"]["tokens_per_source"]["notes"]


BAD_INPUTS = {  # name -> (file contents or None for a missing file, seq_len, message fragment)
    "missing.jsonl": (None, 8, "missing.jsonl not found"),
    "no_text.jsonl": ('{"text": "the data"}\n{"txt": "x"}\n', 8, 'no_text.jsonl:2: no "text"'),
    "bad_json.jsonl": ('{"text": "the data"\n', 8, "bad_json.jsonl:1: invalid JSON"),
    "span.jsonl": ('{"text": "the data", "labels": [[2, 99, "noise"]]}\n', 8,
                   "span.jsonl:1: label span [2, 99, 'noise'] is out of range"),
    "span_form.jsonl": ('{"text": "the data", "labels": [[2, "noise"]]}\n', 8,
                        "span_form.jsonl:1: label [2, 'noise'] is not"),
    "empty.jsonl": ("\n\n", 8, "empty.jsonl holds no documents"),
    "empty.txt": ("", 8, "empty.txt holds no documents"),
    "table.csv": ("text\nthe data\n", 8, "neither .jsonl nor .txt"),
    "short.txt": ("the data", 64, "fewer than one sample"),
    "tiny_seq.txt": ("the data " * 20, 1, "seq_len 1 is too small"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_inputs_raise_one_line_data_errors(name, tok_model, tmp_path):
    content, seq_len, fragment = BAD_INPUTS[name]
    if content is not None:
        (tmp_path / name).write_text(content)
    with pytest.raises(DataError) as e:
        prepare([str(tmp_path / name)], str(tmp_path / "out"), seq_len=seq_len, tokenizer=tok_model)
    assert fragment in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def _batch_shares(out, sources, world=2, micro=8):
    """Per global batch (micro x world sequences), the share of each source's tokens."""
    from blade.data.reader import DataStream

    ds = ShardDataset(out)
    streams = [DataStream(ds, 0, True, micro, world, r, 1) for r in range(world)]
    shares = []
    for _ in range(len(ds) // (micro * world)):
        ids = np.concatenate([s.next_step()[0]["sources"][:, 1:].reshape(-1).numpy() for s in streams])
        shares.append(np.bincount(ids, minlength=len(sources))[:len(sources)] / ids.size)
    return np.array(shares)


@pytest.mark.parametrize("mix", [True, False])
def test_inputs_given_in_source_order_give_mixed_batches(tok_model, tmp_path, mix):
    """Four inputs, one source each, given one after the other: every global batch holds each source at
    its corpus share up to 4 standard errors; without mixing they do not. Documents are the sampling
    unit: a batch of T tokens holds about T / (mean tokens per document) of them."""
    rng = np.random.default_rng(1)
    words = "the data cache server node file build test user query log".split()
    inputs = []
    for k, name in enumerate(("web", "code", "books", "forum")):
        docs = [{"text": " ".join(rng.choice(words, rng.integers(2, 12))), "source": name}
                for _ in range(100 + 60 * k)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
        inputs.append(str(tmp_path / f"{name}.jsonl"))
    m = prepare(inputs, str(tmp_path / "out"), seq_len=16, tokenizer=tok_model, shard_sequences=32, mix=mix)
    corpus = np.array([m["tokens_per_source"][s] for s in m["sources"]]) / sum(m["tokens_per_source"].values())
    shares = _batch_shares(str(tmp_path / "out"), m["sources"])
    docs_per_batch = 16 * 16 / ((m["num_sequences"] * 16 + 1) / m["documents"])
    within = np.abs(shares - corpus) <= 4 * np.sqrt(corpus * (1 - corpus) / docs_per_batch)
    assert len(shares) >= 10 and within.all() == mix
