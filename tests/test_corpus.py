"""Built-in corpus: determinism, exact noise labels, disjoint splits, sizes, predictability of clean text."""
import hashlib
import json
import math
import os
import random
import re
from collections import Counter

import pytest

from blade.data.corpus import (
    BOILERPLATE,
    NOISE_KINDS,
    TEXT_BUDGETS,
    _join,
    _pool_segments,
    generate_builtin_corpus,
)
from blade.errors import ConfigError

FILES = ("target", "val", "pool")


def _load(directory, name):
    with open(os.path.join(directory, f"{name}.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _words(text):
    return re.findall(r"[a-z_]+", text.lower())


def _spans(docs, kind):
    return [d["text"][s:e] for d in docs for s, e, label in d["labels"] if label == kind]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("corpus"))
    summary = generate_builtin_corpus(out)
    return summary, {name: _load(out, name) for name in FILES}


@pytest.fixture(scope="module")
def target_vocabulary(corpus):
    return {w for d in corpus[1]["target"] for w in _words(d["text"])}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
    def files(seed, name):
        generate_builtin_corpus(str(tmp_path / name), seed=seed, scale=0.05)
        return [(tmp_path / name / f"{f}.jsonl").read_bytes() for f in FILES]
    first = files(0, "a")
    assert files(0, "b") == first
    other = files(1, "c")
    assert all(x != y for x, y in zip(first, other))


def test_spans_are_sorted_in_range_and_disjoint_and_sources_match(corpus):
    for name, docs in corpus[1].items():
        for d in docs:
            assert set(d) == {"text", "source", "labels"} and d["text"]
            end_of_previous = 0
            for start, end, label in d["labels"]:
                assert end_of_previous <= start < end <= len(d["text"])
                assert label in NOISE_KINDS
                end_of_previous = end
            kinds = {label for _, _, label in d["labels"]}
            assert kinds == ({d["source"]} if d["source"] != "clean" else set())
            if name != "pool":
                assert d["source"] == "clean"


def test_joined_segments_label_exactly_the_injected_strings():
    rng = random.Random(0)
    for kind in NOISE_KINDS:
        for whole in (True, False):
            segments = _pool_segments(rng, set(), kind, whole)
            text, labels = _join(segments)
            assert [text[s:e] for s, e, _ in labels] == [t for t, label in segments if label]
            assert [label for _, _, label in labels] == [label for _, label in segments if label]
            unlabelled = [t for t, label in segments if label is None]
            assert len(text) == sum(map(len, (t for t, _ in segments))) + 2 * (len(segments) - 1)
            assert whole == (not unlabelled)


def test_whole_noise_documents_are_fully_labelled_and_spliced_spans_are_paragraphs(corpus):
    seen = set()
    for d in corpus[1]["pool"]:
        text, labels = d["text"], d["labels"]
        if labels == [[0, len(text), d["source"]]]:
            seen.add((d["source"], "whole"))
            continue
        for start, end, _ in labels:
            assert start == 0 or text[start - 2:start] == "\n\n"
            assert end == len(text) or text[end:end + 2] == "\n\n"
            seen.add((d["source"], "spliced"))
    assert seen == {(kind, form) for kind in NOISE_KINDS for form in ("whole", "spliced")}


def test_every_noisy_character_is_labelled(corpus, target_vocabulary):
    pool = corpus[1]["pool"]
    for d in pool:
        clean_parts, cursor = [], 0
        for start, end, _ in d["labels"]:
            clean_parts.append(d["text"][cursor:start])
            cursor = end
        clean_parts.append(d["text"][cursor:])
        assert set(_words(" ".join(clean_parts))) <= target_vocabulary
    for span in _spans(pool, "boilerplate"):
        assert all(block in BOILERPLATE for block in span.split("\n\n"))
    for kind in ("random_tokens", "char_noise", "off_target"):
        assert all(set(_words(span)) - target_vocabulary for span in _spans(pool, kind)), kind


def test_target_val_and_pool_clean_documents_are_disjoint(corpus):
    def hashes(docs):
        return {hashlib.sha256(d["text"].encode()).hexdigest() for d in docs if d["source"] == "clean"}
    target, val, pool = (hashes(corpus[1][name]) for name in FILES)
    assert len(target) == len(corpus[1]["target"]) and len(val) == len(corpus[1]["val"])
    assert not target & val and not val & pool and not target & pool


def test_default_sizes_and_summary(corpus):
    summary, docs = corpus
    assert set(summary["files"]["pool"]["sources"]) == {"clean", *NOISE_KINDS}
    for name in FILES:
        stats = summary["files"][name]
        assert stats["documents"] == len(docs[name])
        assert stats["chars"] == sum(len(d["text"]) for d in docs[name])
        assert TEXT_BUDGETS[name] <= stats["chars"] < 1.02 * TEXT_BUDGETS[name]
    labelled = sum(summary["files"]["pool"]["labels"].values()) / summary["files"]["pool"]["chars"]
    assert 0.25 < labelled < 0.5


def test_scale_multiplies_sizes_and_keeps_every_source(tmp_path):
    summary = generate_builtin_corpus(str(tmp_path / "small"), scale=0.1)
    pool = summary["files"]["pool"]
    assert 150_000 <= pool["chars"] < 160_000
    assert set(pool["sources"]) == {"clean", *NOISE_KINDS}
    tiny = generate_builtin_corpus(str(tmp_path / "tiny"), scale=1e-6)["files"]
    assert tiny["target"]["documents"] == tiny["val"]["documents"] == 1
    assert set(tiny["pool"]["sources"]) == {"clean", *NOISE_KINDS}
    with pytest.raises(ConfigError):
        generate_builtin_corpus(str(tmp_path / "bad"), scale=0)


def _bigram_cross_entropy(train, test, alphabet_size, smoothing):
    """Bits per symbol of `test` sequences under an add-k bigram model fitted on `train`."""
    pairs, firsts = Counter(), Counter()
    for seq in train:
        pairs.update(zip(seq, seq[1:]))
        firsts.update(seq[:-1])
    bits = n = 0
    for seq in test:
        for a, b in zip(seq, seq[1:]):
            bits -= math.log2((pairs[a, b] + smoothing) / (firsts[a] + smoothing * alphabet_size))
            n += 1
    return bits / n


def test_clean_text_is_much_more_predictable_than_noise(corpus, target_vocabulary):
    chars = 96  # alphabet: printable ASCII (95) + newline
    docs = corpus[1]
    target = [d["text"] for d in docs["target"]]
    val = [d["text"] for d in docs["val"]]
    char_bits = {kind: _bigram_cross_entropy(target, _spans(docs["pool"], kind), chars, 1)
                 for kind in ("random_tokens", "char_noise")}
    clean_bits = _bigram_cross_entropy(target, val, chars, 1)
    assert clean_bits < 4 and char_bits["random_tokens"] > clean_bits + 3
    assert char_bits["char_noise"] > clean_bits + 1
    words = [_words(t) for t in target]
    vocab = len(target_vocabulary)
    clean_word_bits = _bigram_cross_entropy(words, [_words(t) for t in val], vocab, 0.1)
    shuffled = [_words(t) for t in _spans(docs["pool"], "shuffled")]
    assert _bigram_cross_entropy(words, shuffled, vocab, 0.1) > clean_word_bits + 2
