"""SentencePiece training/loading, exact round trips, character offsets on non-ASCII text.

Also home of the small corpus and tokenizer fixtures that test_prepare.py and test_data.py import.
"""
import hashlib
import json
import random

import pytest

from blade.data.tokenizer import Tokenizer, train_sentencepiece
from blade.errors import DataError

WORDS = ("the of and data model token shard noise clean text train sample every little "
         "stream epoch batch rank worker seed order").split()
UNICODE_WORDS = ["café", "naïve", "straße", "日本語", "Ωmega", "über"]
MARK = "zqxjunk"  # labelled "noise" wherever it is inserted
VOCAB = 320


def write_corpus(root, n_docs=300, seed=0):
    """Two JSONL files and one .txt: sources by field and by file stem, labelled spans, non-ASCII.

    Labelled documents are ASCII (test_prepare recomputes their token offsets by decoding).
    """
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    a, b, notes = root / "mixed.jsonl", root / "plain.jsonl", root / "notes.txt"
    with open(a, "w") as fa, open(b, "w") as fb:
        for i in range(n_docs):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 40))]
            record = {"source": "web" if i % 3 else "books"}
            if i % 4 == 0:  # non-ASCII, unlabelled
                words[rng.randrange(len(words))] = rng.choice(UNICODE_WORDS)
            elif i % 4 == 1:  # a noise span over the marker word, sometimes a second label
                at = rng.randrange(len(words))
                words[at] = MARK
                text = " ".join(words)
                start = text.index(MARK) if at == 0 else text.index(" " + MARK) + 1
                record["labels"] = [[start, start + len(MARK), "noise"]]
                if i % 8 == 1:
                    record["labels"].append([0, len(words[0]), "pii"])
            record["text"] = " ".join(words) + ("\nsecond line" if i % 5 == 0 else "")
            if i % 7 == 3:
                fb.write(json.dumps({"text": record["text"]}) + "\n\n")  # blank line: skipped
            else:
                fa.write(json.dumps(record, ensure_ascii=i % 2 == 0) + "\n")
    notes.write_text("A plain note about café culture.\n日本語 text\twith a tab.\n",
                     encoding="utf-8")
    return [str(a), str(b), str(notes)]


def corpus_documents(paths):
    """(text, source, labels) per document, read independently of blade.prepare."""
    docs = []
    for p in paths:
        stem = p.rsplit("/", 1)[-1].split(".")[0]
        if p.endswith(".txt"):
            docs.append((open(p, encoding="utf-8").read(), stem, []))
            continue
        for line in open(p, encoding="utf-8"):
            if line.strip():
                obj = json.loads(line)
                docs.append((obj["text"], obj.get("source", stem), obj.get("labels", [])))
    return docs


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tok_model(corpus, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tok.model")
    return train_sentencepiece((t for t, _, _ in corpus_documents(corpus)), VOCAB, path, seed=0)


def test_training_is_deterministic_and_fingerprint_is_file_sha(corpus, tok_model, tmp_path):
    again = train_sentencepiece((t for t, _, _ in corpus_documents(corpus)), VOCAB,
                                str(tmp_path / "again.model"), seed=0)
    data = open(tok_model, "rb").read()
    assert open(again, "rb").read() == data
    tok = Tokenizer(tok_model)
    assert tok.fingerprint == Tokenizer(again).fingerprint == hashlib.sha256(data).hexdigest()
    assert 260 < tok.vocab_size <= VOCAB
    assert (tok.bos_id, tok.eos_id) == (1, 2)


@pytest.mark.parametrize("text", ["the data model", "café 日本語 über\nnew line\tand tab",
                                  "  leading spaces and 🙂 emoji (byte fallback)", "x", ""])
def test_encode_decode_round_trip(tok_model, text):
    tok = Tokenizer(tok_model)
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.encode_with_offsets(text)[0] == ids


def test_offsets_are_character_offsets_on_non_ascii(tok_model):
    tok = Tokenizer(tok_model)
    text = "café 日本語 straße 🙂 Ωmega data"
    ids, spans = tok.encode_with_offsets(text)
    assert len(spans) == len(ids) and max(e for _, e in spans) == len(text)
    # Independent check: each piece's surface is exactly the text it claims. Runs of byte pieces
    # share their character's span and together hold its UTF-8 bytes.
    i = 0
    while i < len(ids):
        begin, end = spans[i]
        if tok.sp.is_byte(ids[i]):
            j = i
            while j < len(ids) and spans[j] == spans[i] and tok.sp.is_byte(ids[j]):
                j += 1
            raw = bytes(int(tok.sp.id_to_piece(ids[k])[3:5], 16) for k in range(i, j))  # "<0xF0>"
            assert raw == text[begin:end].encode() and end - begin == 1
            i = j
            continue
        surface = tok.sp.id_to_piece(ids[i]).replace("▁", " ")
        assert surface == text[begin:end] or (begin == 0 and surface == " " + text[begin:end])
        i += 1
    at = text.index("日本語")  # byte offset 7 != character offset 5
    covering = [k for k, (b, e) in enumerate(spans) if b < at + 3 and e > at]
    assert "日本語" in tok.decode([ids[k] for k in covering])
    emoji = [k for k, (b, e) in enumerate(spans) if b <= text.index("🙂") < e]
    assert len(emoji) == 4 and tok.decode([ids[k] for k in emoji]) == "🙂"


def test_missing_or_invalid_model_is_a_data_error(tmp_path):
    bad, empty = tmp_path / "bad.model", tmp_path / "empty.model"
    bad.write_bytes(b"not a sentencepiece model")
    empty.write_bytes(b"")
    for path, why in [(tmp_path / "missing.model", "cannot read"), (bad, "not a valid"),
                      (empty, "not a valid")]:
        with pytest.raises(DataError, match=why) as e:
            Tokenizer(str(path))
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_vocab_too_small_is_a_data_error(corpus, tmp_path):
    texts = [t for t, _, _ in corpus_documents(corpus)]
    with pytest.raises(DataError, match="raise vocab_size"):
        train_sentencepiece(texts, 100, str(tmp_path / "small.model"))
