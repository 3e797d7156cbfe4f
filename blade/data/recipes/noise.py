"""Synthetic corruptions of clean documents, with exact per-character labels of the corrupted spans.

A noisy training pool mixes these into clean text so that a token-selection method can be scored by how
often it picks noise (docs/design.md, "The selection-quality benchmark").
Each corruption touches one place or 1-2 paragraphs (paragraphs are separated by "\\n\\n") and leaves
every other character of the document byte-identical. Spans are character offsets into the new text.
"""
from __future__ import annotations

import functools
import itertools
import random
import re
import string
from typing import Callable, Optional, Sequence

from blade.errors import DataError

CORRUPTIONS = ("mojibake", "char_noise", "word_shuffle", "repetition", "splice", "truncation")
CHAR_NOISE_RATE = (0.1, 0.3)  # per-paragraph letter edit rate p ~ uniform(*CHAR_NOISE_RATE)
SPLICE_CHARS = (50, 500)  # length range of a spliced snippet
REPEAT_COPIES = (3, 10)  # extra copies inserted by "repetition"
MIN_REPEAT_CHARS = 20

_CP1252_HOLES = frozenset((0x81, 0x8D, 0x8F, 0x90, 0x9D))  # bytes cp1252 leaves undefined
_LETTERS = string.ascii_lowercase
_SENTENCE = re.compile(r"\S.*?(?:[.!?](?=\s)|(?=\s*\Z))", re.S)
_WORD_START = re.compile(r"(?<!\S)\S")
_WORD_END = re.compile(r"\S(?!\S)")

Spans = list[tuple[int, int]]
Transform = Callable[[str, random.Random], Optional[tuple[str, Spans]]]


def _sentences(para: str) -> Spans:
    """(start, end) of each sentence: up to a . ! or ? followed by whitespace, or to the paragraph end."""
    return [m.span() for m in _SENTENCE.finditer(para)]


def _garble(c: str) -> str:
    """c's UTF-8 bytes read as cp1252 (latin-1 for its undefined bytes): '’' -> 'â€™'."""
    return "".join(chr(b) if b in _CP1252_HOLES else bytes([b]).decode("cp1252") for b in c.encode())


def _typographic(para: str) -> str:
    para = re.sub(r'"([^"]*)"', "\u201c\\1\u201d", para)
    return para.replace("'", "\u2019").replace(" -- ", " \u2014 ")


def _mojibake(para: str, rng: random.Random) -> Optional[tuple[str, Spans]]:
    """Typographic quotes and dashes first, so that plain ASCII prose has something to garble."""
    out, spans, pos = [], [], 0
    for c in _typographic(para):
        if not c.isascii():
            c = _garble(c)
            spans.append((pos, pos + len(c)))
        out.append(c)
        pos += len(c)
    return ("".join(out), spans) if spans else None


def _noisy_word(word: str, rng: random.Random, p: float) -> tuple[str, list[int]]:
    """Each letter with probability p is substituted, deleted or preceded by an inserted letter.

    Returns the new word and the positions in it where it differs from the original: a substituted
    or inserted letter, and for a deletion the character that now follows the gap (the one before it
    at the word's end)."""
    out, marks, gap = [], [], False
    for c in word:
        if not c.isalpha() or rng.random() >= p:
            if gap:
                marks.append(len(out))
                gap = False
            out.append(c)
            continue
        op = rng.randrange(3)
        if op == 2:
            gap = True
            continue
        marks.append(len(out))
        gap = False
        out += [rng.choice(_LETTERS.replace(c.lower(), ""))] if op == 0 else [rng.choice(_LETTERS), c]
    if gap and out:
        marks.append(len(out) - 1)
    return "".join(out), sorted(set(marks))


def _runs(positions: list[int]) -> Spans:
    """Sorted positions -> [start, end) spans of consecutive runs."""
    spans: Spans = []
    for i in positions:
        if spans and spans[-1][1] == i:
            spans[-1] = (spans[-1][0], i + 1)
        else:
            spans.append((i, i + 1))
    return spans


def _char_noise(para: str, rng: random.Random) -> Optional[tuple[str, Spans]]:
    """Letter edits at a per-paragraph rate; labels are exactly the changed characters."""
    p = rng.uniform(*CHAR_NOISE_RATE)
    out, marks, pos = [], [], 0
    for piece in re.split(r"(\s+)", para):  # words alternate with the (untouched) whitespace
        if piece and not piece.isspace():
            piece, edited = _noisy_word(piece, rng, p)
            marks += [pos + i for i in edited]
        out.append(piece)
        pos += len(piece)
    return ("".join(out), _runs(marks)) if marks else None


def _word_shuffle(para: str, rng: random.Random) -> Optional[tuple[str, Spans]]:
    """Permute the words of each sentence in place: the whitespace between them and the final . ! ? stay."""
    out, spans = para, []
    for s, e in _sentences(para):
        words, gaps = para[s:e].split(), re.findall(r"\s+", para[s:e])
        punct = re.search(r"(?<=[^.!?])[.!?]+$", words[-1])
        punct = punct.group() if punct else ""
        words[-1] = words[-1][:len(words[-1]) - len(punct)]
        if len(words) < 4 or len(set(words)) < 2:
            continue
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        out = out[:s] + "".join(w + g for w, g in zip(shuffled, gaps + [""])) + punct + out[e:]
        spans.append((s, e))
    return (out, spans) if spans else None


def _repetition(para: str, rng: random.Random) -> Optional[tuple[str, Spans]]:
    """Follow one line (separator "\\n") or one-line sentence (separator " ") by N extra copies of it."""
    units = [(m.start(), m.end(), "\n") for m in re.finditer(r"^.{%d,}$" % MIN_REPEAT_CHARS, para, re.M)]
    units += [(s, e, " ") for s, e in _sentences(para) if e - s >= MIN_REPEAT_CHARS and "\n" not in para[s:e]]
    if not units:
        return None
    s, e, sep = rng.choice(units)
    n, size = rng.randint(*REPEAT_COPIES), e - s
    copies = [(e + k * (size + 1) + 1, e + (k + 1) * (size + 1)) for k in range(n)]
    return para[:e] + (sep + para[s:e]) * n + para[e:], copies


def _snippet(texts: Sequence[str], rng: random.Random) -> Optional[str]:
    """SPLICE_CHARS characters of one of texts, starting and ending at whitespace; None if none has any.

    Tries texts, and start words within a text, cyclically from random ones, so that a long text costs
    one short scan in the usual case."""
    lo, hi = SPLICE_CHARS
    k = rng.randrange(len(texts))
    for src in (texts[(k + i) % len(texts)] for i in range(len(texts))):
        pos = rng.randrange(len(src) + 1)
        for m in itertools.chain(_WORD_START.finditer(src, pos), _WORD_START.finditer(src, 0, pos)):
            window = src[m.start():m.start() + hi + 1]  # one more char so the end test sees past hi
            ends = [w.end() for w in _WORD_END.finditer(window, lo - 1) if w.end() <= hi]
            if ends:
                return window[:rng.choice(ends)]
    return None


def _splice(para: str, rng: random.Random, snippet: str) -> Optional[tuple[str, Spans]]:
    """Insert " " + snippet after a word that is followed by another word of the paragraph."""
    gaps = [m.end() for m in re.finditer(r"\S(?=\s+\S)", para)]
    if not gaps:
        return None
    at = rng.choice(gaps)
    return para[:at] + " " + snippet + para[at:], [(at + 1, at + 1 + len(snippet))]


def _truncation(para: str, rng: random.Random) -> Optional[tuple[str, Spans]]:
    """Cut a sentence of >= 6 words after 20-80 % of its words and drop the rest of the paragraph.

    The last paragraph qualifies too, so a document may end in the fragment."""
    candidates = []
    for s, e in _sentences(para):
        ends = [s + m.end() for m in re.finditer(r"\S+", para[s:e])]
        if len(ends) >= 6:
            candidates.append((s, ends))
    if not candidates:
        return None
    s, ends = rng.choice(candidates)
    cut = ends[rng.randint(-(-len(ends) // 5), 4 * len(ends) // 5) - 1]
    return para[:cut], [(s, cut)]


# kind -> (paragraph transform, most paragraphs per document)
_TRANSFORMS: dict[str, tuple[Transform, int]] = {
    "mojibake": (_mojibake, 2), "char_noise": (_char_noise, 2), "word_shuffle": (_word_shuffle, 2),
    "repetition": (_repetition, 1), "splice": (_splice, 1), "truncation": (_truncation, 1),
}


def corrupt(text: str, kind: str, rng: random.Random,
            splice_texts: Sequence[str] = ()) -> Optional[tuple[str, list[list]]]:
    """Corrupt one document; return (new_text, spans) with spans = [[start, end, kind], ...] (character
    offsets into new_text, sorted, non-overlapping, start < end), or None when this document offers no
    place for the corruption (e.g. too short, no suitable paragraph; the caller then picks another
    document). splice_texts are the natural low-quality texts "splice" cuts its snippets from."""
    if kind not in _TRANSFORMS:
        raise DataError(f"unknown corruption kind {kind!r}; valid kinds: {', '.join(CORRUPTIONS)}")
    transform, most = _TRANSFORMS[kind]
    if kind == "splice":
        snippet = _snippet(splice_texts, rng) if splice_texts else None
        if snippet is None:
            return None
        transform = functools.partial(_splice, snippet=snippet)
    paras = text.split("\n\n")
    want = min(rng.randint(1, most), max(1, len(paras) - 1))  # never every paragraph of a longer document
    done = {}
    for i in rng.sample(range(len(paras)), len(paras)):
        if len(done) == want:
            break
        result = transform(paras[i], rng)
        if result:
            done[i] = result
    if not done:
        return None
    spans, pos = [], 0
    for i in range(len(paras)):
        if i in done:
            paras[i], local = done[i]
            spans += [[pos + s, pos + e, kind] for s, e in local]
        pos += len(paras[i]) + 2
    return "\n\n".join(paras), spans
