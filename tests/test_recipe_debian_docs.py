"""The debian-docs recipe's assembly on tiny generated inputs: normalisation, dedupe, the hash split,
no validation text anywhere else (checked by hash), the pool mix and its labels."""
import hashlib
import json
import os
import random

import pytest

from blade.data.prepare import prepare_splits
from blade.data.recipes import debian_docs as dd
from blade.data.recipes.debian_docs import Doc
from blade.data.recipes.noise import CORRUPTIONS

WORDS = ("the server cache doesn't grow when a client's request is retried; each worker reads "
         "the \"config\" file -- then it writes its log to disk and waits for the next job").split()


def _paragraph(rng: random.Random) -> str:
    return " ".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize() + "."
                    for _ in range(rng.randint(3, 6)))


def _docs(source: str, n: int, seed: int, shared: str | None = None) -> list[Doc]:
    rng = random.Random(f"{source}:{seed}")
    docs = []
    for i in range(n):
        paragraphs = [_paragraph(rng) for _ in range(rng.randint(3, 6))]
        if shared is not None and i % 7 == 0:  # the same paragraph on many pages, as in real docs
            paragraphs.insert(1, shared)
        docs.append(Doc(source, f"usr/share/doc/{source}/page{i}.html", "\n\n".join(paragraphs)))
    return docs


SHARED = ("Changed in version 3.2: this note is repeated on many pages of the documentation, long "
          "enough to count as a paragraph that may leak.")


@pytest.fixture(scope="module")
def groups():
    target = [_docs("target/python", 120, 0, SHARED), _docs("target/postgresql", 80, 1, SHARED)]
    general = [_docs("general/linux-doc", 60, 2), _docs("general/kjv", 20, 3)]
    mid = [_docs("general/fortunes", 40, 4)]
    natural = {label: [Doc(f"noise/{label}", f"{label}/{i}", f"{label} " * 60 + str(i)) for i in range(30)]
               for label in ("proof", "table", "misencoded")}
    natural["proof"].append(Doc("noise/proof", "dup", target[0][3].text))  # an exact duplicate
    return {"target": target, "general": general, "mid": mid, "natural": natural}


SIZE = dd.Size(base_mb=0.05, pool_mb=0.12, source_cap_mb=1, vocab_size=300, seq_len=32)


def _page(doc: Doc) -> str:
    return f"<html><body><div class='nav'>Home | Next</div><p>{doc.text}</p></body></html>"


@pytest.fixture(scope="module")
def assembled(groups):
    return dd.assemble(groups, SIZE, seed=0, page_text=_page)


def test_normalise_unicode_line_ends_and_blank_lines():
    assert dd.normalise("Cafe\u0301 \r\nnext  \n\n\n\nend\r") == "Caf\u00e9\nnext\n\nend"


def test_split_is_a_pure_function_of_the_path_with_the_planned_shares():
    names = [f"p/{i}.html" for i in range(4000)]
    splits = [dd.split_of("target/python", n) for n in names]
    assert splits == [dd.split_of("target/python", n) for n in names]
    share = {s: splits.count(s) / len(splits) for s in ("val", "target", "pool")}
    assert abs(share["val"] - 0.05) < 0.015 and abs(share["target"] - 0.25) < 0.03, share


def test_dedupe_keeps_the_first_copy_across_groups():
    a, b = Doc("x", "1", "same text"), Doc("y", "2", "same text")
    out, removed = dd.dedupe([[a], [Doc("y", "3", "other")], [b]])
    assert removed == 1 and out == [[a], [Doc("y", "3", "other")], []]


def test_validation_documents_come_from_the_val_split_only(assembled, groups):
    splits, _ = assembled
    assert splits["val"] and all(dd.split_of(d.source, d.src) == "val" for d in splits["val"])
    assert all(dd.split_of(d.source, d.src) == "target" for d in splits["target"])
    pool_targets = [d for d in splits["train"] if d.source.startswith(("target/", "corrupted/"))]
    assert pool_targets and all(  # a corrupted passage's src is its document's src + "#i"
        dd.split_of(d.source.replace("corrupted/", "target/"), d.src.rsplit("#", 1)[0]) == "pool"
        for d in pool_targets)
    html = [d for d in splits["train"] if d.source == "noise/html"]  # raw pages only of pool documents
    assert html and all(dd.split_of(*d.src.split(":", 1)) == "pool" for d in html)


def test_no_validation_text_leaks_into_other_datasets_by_hash(assembled):
    splits, stats = assembled
    val = {hashlib.sha256(d.text.encode()).hexdigest() for d in splits["val"]}
    val_paragraphs = {p for d in splits["val"] for p in d.text.split("\n\n") if len(p) >= 100}
    assert SHARED in val_paragraphs  # the shared paragraph is on a validation page ...
    for name in ("base", "train", "target"):
        texts = [d.text for d in splits[name]]
        assert not val & {hashlib.sha256(t.encode()).hexdigest() for t in texts}
        assert not any(p in val_paragraphs for t in texts for p in t.split("\n\n")), name
    assert stats["val_paragraphs_removed"] > 0  # ... so its copies elsewhere were removed
    records = {k: [d.record() for d in v] for k, v in splits.items()}
    report = dd.leak_check(records["val"], {k: v for k, v in records.items() if k != "val"})
    assert all(n == 0 for r in report.values() for n in r.values()), report


def test_leak_check_finds_a_planted_leak(assembled):
    splits, _ = assembled
    val = [d.record() for d in splits["val"]]
    paragraph = next(p for r in val for p in r["text"].split("\n\n") if len(p) >= 100)
    planted = {"train": [{"text": val[0]["text"]}, {"text": "intro\n\n" + paragraph}]}
    report = dd.leak_check(val, planted)
    assert report["train"]["val_documents"] == 1 and report["train"]["val_paragraphs"] >= 1


def test_pool_mix_and_labels(assembled):
    splits, stats = assembled
    pool = splits["train"]
    chars = stats["mix"]["chars"]
    total = sum(len(d.text) for d in pool)
    assert total == sum(chars.values())
    for part, share in dd.POOL_MIX.items():  # every part filled to its share (a document of slack)
        assert chars[part] >= 0.9 * share * SIZE.pool_mb * 1e6, (part, chars)
    assert set(stats["mix"]["corrupted_passages"]) == set(CORRUPTIONS)
    assert all(n > 0 for n in stats["mix"]["corrupted_passages"].values())
    for doc in pool:
        if doc.source.startswith("noise/"):  # natural sources: the whole document carries the label
            assert doc.labels == [[0, len(doc.text), doc.source.split("/")[1]]]
        elif doc.source.startswith("corrupted/"):
            assert doc.labels and all(0 <= s < e <= len(doc.text) and k in CORRUPTIONS
                                      for s, e, k in doc.labels)
        else:
            assert doc.labels == []
    assert stats["duplicates_removed"] == 1


def test_assembly_is_deterministic_and_seeded(groups, assembled):
    again, _ = dd.assemble(groups, SIZE, seed=0, page_text=_page)
    assert [d.record() for d in again["train"]] == [d.record() for d in assembled[0]["train"]]
    other, _ = dd.assemble(groups, SIZE, seed=1, page_text=_page)
    assert [d.record() for d in other["val"]] == [d.record() for d in assembled[0]["val"]]  # split: path only
    assert [d.record() for d in other["train"]] != [d.record() for d in assembled[0]["train"]]


def test_labels_reach_the_tokens_through_prepare(assembled, tmp_path):
    from blade.data.reader import ShardDataset

    splits, _ = assembled
    raw = tmp_path / "raw"
    raw.mkdir()
    for name, docs in splits.items():
        with open(raw / f"{name}.jsonl", "w") as f:
            for d in docs:
                f.write(json.dumps(d.record()) + "\n")
    manifests = prepare_splits({k: [str(raw / f"{k}.jsonl")] for k in splits}, str(tmp_path), seq_len=32,
                               vocab_size=400)
    counts = manifests["train"]["label_token_counts"]
    assert set(counts) >= set(CORRUPTIONS) | {"proof", "table", "misencoded", "html"}
    assert all(counts[k] > 0 for k in counts)
    ds = ShardDataset(os.path.join(tmp_path, "train"), 400, "error")
    assert ds.label_names == manifests["train"]["labels"]


def test_the_reference_recipe_pins_every_package_and_drift_is_named(tmp_path):
    """docs/experiments/debian-docs-seeds/recipe.json (the README's reported run) has a version and sha256
    for every package the recipe fetches; a fetch that differs is named in one line."""
    from blade.data.recipes.fetch import package_drift

    reference = json.load(open(dd.REFERENCE))
    known = {**reference["packages"], **reference["sdists"]}
    assert set(known) == set(dd.PACKAGES) | {dd.SDIST.partition("==")[0]}
    assert all(p["version"] and len(p["sha256"]) == 64 for p in known.values())
    same = package_drift(known, dd.REFERENCE)
    assert same.startswith(f"packages: all {len(known)} identical") and "\n" not in same
    changed = {**known, "bible-kjv": {"version": "9.9", "sha256": "0" * 64}, "extra-doc": {"version": "1",
                                                                                             "sha256": "1" * 64}}
    line = package_drift(changed, dd.REFERENCE)
    assert line.startswith(f"packages: 2 of {len(changed)} differ") and "\n" not in line
    assert f"bible-kjv 9.9 (reference {known['bible-kjv']['version']})" in line and "extra-doc 1 (not in the reference)" in line
    assert "not checked" in package_drift(known, str(tmp_path / "missing.json"))
