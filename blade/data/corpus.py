"""Built-in synthetic corpus that makes token selection visible (no download).

    summary = generate_builtin_corpus("data/builtin/raw", seed=0, scale=1.0)

writes three JSONL files into `out_dir`, one document per line:

    {"text": str, "source": str, "labels": [[start_char, end_char, label_name], ...]}

* `target.jsonl` (~300 KB of text): clean target-domain documents, the set the reference model trains on;
* `val.jsonl` (~60 KB): held-out clean target documents;
* `pool.jsonl` (~1.5 MB): the noisy training pool.

`scale` multiplies the three text budgets (each file still gets at least one document, the pool at
least one of each kind, whole and spliced). Everything is ASCII, so characters are bytes.

Clean target style: "technical documentation" from a small probabilistic grammar (a few hundred
English words, subject-verb agreement, paragraphs of 3-8 sentences, occasional config lines such as
`set timeout = 30`). No clean document is ever written twice, so target, val and pool are disjoint.

Pool mix, drawn per document: 40 % clean (source "clean", no labels); 12 % for each noise kind,
half as a whole noisy document and half as 1-2 noisy paragraphs spliced into a clean document.
A document's source is its noise kind (one kind per document), or "clean" when it has no labels.
The first documents of the pool cycle through every (kind, whole/spliced) pair, so every source is
present at any scale. Noise kinds (label = source name):

* random_tokens: random strings of letters, digits and punctuation (unlearnable);
* boilerplate:   fixed blocks (licence, navigation menu, cookie banner, ...) repeated verbatim;
* shuffled:      clean sentences with their words shuffled;
* char_noise:    clean prose with ~25 % of characters substituted, inserted or deleted;
* off_target:    learnable prose of another domain (recipes, sports reports).

Labelling rule: a label span covers the whole injected noisy text (for char_noise the whole corrupted
paragraph, including the characters that survived); for a whole noisy document that is [0, len(text)).
Spliced paragraphs are joined to their clean neighbours by "\\n\\n", which stays unlabelled.
"""
from __future__ import annotations

import json
import os
import random
import string
from typing import List, Optional, Tuple

from blade.errors import ConfigError

TEXT_BUDGETS = {"target": 300_000, "val": 60_000, "pool": 1_500_000}  # characters at scale 1.0
NOISE_KINDS = ("random_tokens", "boilerplate", "shuffled", "char_noise", "off_target")
CLEAN_FRACTION = 0.4
CHAR_NOISE_RATE = 0.25

Segment = Tuple[str, Optional[str]]  # (text, noise label or None for clean text)

from blade.data.corpus_words import (  # noqa: E402 (the vocabulary: data, kept apart)
    ACTIONS,
    ADJECTIVES,
    ADVERBS,
    BOILERPLATE,
    CONFIG_FLAGS,
    CONFIG_KEYS,
    CONFIG_VALUES,
    CONJUNCTIONS,
    DAYS,
    DISHES,
    FIXED_CLAUSES,
    INGREDIENTS,
    INTRANSITIVE,
    MANNERS,
    MODALS,
    MODIFIERS,
    NOUNS,
    NUMBERS,
    PLAYS,
    PREPOSITIONS,
    RESULTS,
    ROLES,
    SCORES,
    STATES,
    TEAMS,
    TOOLS,
    UNITS,
    VERBS,
)

RANDOM_CHARS = string.ascii_letters + string.digits + string.punctuation


def _suffix_s(word: str) -> str:
    """Plural noun / third-person verb: cache -> caches, policy -> policies, index -> indexes."""
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _words(name: str) -> str:
    return name.replace("_", " ")


def _sentence(words: str) -> str:
    return words[0].upper() + words[1:] + "."


def _noun_phrase(rng: random.Random, plural: bool) -> str:
    noun = rng.choice(NOUNS)
    if rng.random() < 0.25:
        noun = rng.choice(MODIFIERS) + " " + noun
    if rng.random() < 0.4:
        noun = rng.choice(ADJECTIVES) + " " + noun
    if plural:
        return rng.choice(("the", "the", "all", "some", "many")) + " " + _suffix_s(noun)
    det = rng.choice(("the", "the", "the", "a", "each", "every"))
    if det == "a" and noun[0] in "aeiou":
        det = "an"
    return det + " " + noun


def _verb(verb: str, plural: bool) -> str:
    return verb if plural else _suffix_s(verb)


def _subject(rng: random.Random) -> Tuple[str, bool]:
    plural = rng.random() < 0.4
    return _noun_phrase(rng, plural), plural


def _object(rng: random.Random) -> str:
    return _noun_phrase(rng, rng.random() < 0.3)


def _clause(rng: random.Random) -> str:
    if rng.random() < 0.3:
        return rng.choice(FIXED_CLAUSES)
    subject, plural = _subject(rng)
    return f"{rng.choice(CONJUNCTIONS)} {subject} {_verb(rng.choice(INTRANSITIVE), plural)}"


def _prepositional(rng: random.Random) -> str:
    return f" {rng.choice(PREPOSITIONS)} {_object(rng)}" if rng.random() < 0.5 else ""


def _prose_sentence(rng: random.Random) -> str:
    subject, plural = _subject(rng)
    verb = _verb(rng.choice(VERBS), plural)
    be, do = ("are", "do") if plural else ("is", "does")
    template = rng.randrange(8)
    if template == 0:
        return _sentence(f"{subject} {verb} {_object(rng)}{_prepositional(rng)}")
    if template == 1:
        return _sentence(f"{_clause(rng)}, {subject} {verb} {_object(rng)}")
    if template == 2:
        return _sentence(f"{subject} {verb} {_object(rng)} {rng.choice(ADVERBS)}")
    if template == 3:
        modal = rng.choice(MODALS)
        return _sentence(f"{subject} {modal} {rng.choice(VERBS)} {_object(rng)}{_prepositional(rng)}")
    if template == 4:
        return _sentence(f"{subject} {be} {rng.choice(ADJECTIVES)} {_clause(rng)}")
    if template == 5:
        return _sentence(f"{subject} {do} not {rng.choice(VERBS)} {_object(rng)}")
    if template == 6:
        other, other_plural = _subject(rng)
        return _sentence(f"if {subject} {be} {rng.choice(ADJECTIVES)}, {other} "
                         f"{_verb(rng.choice(VERBS), other_plural)} {_object(rng)}")
    return _sentence(f"use {_object(rng)} to {rng.choice(VERBS)} {_object(rng)}")


def _prose_paragraph(rng: random.Random) -> str:
    return " ".join(_prose_sentence(rng) for _ in range(rng.randint(3, 8)))


def _config_line(rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        return f"set {rng.choice(CONFIG_KEYS)} = {rng.choice(CONFIG_VALUES)}"
    if form == 1:
        return f"export {rng.choice(CONFIG_KEYS).upper()}={rng.choice(CONFIG_VALUES)}"
    return f"{rng.choice(('enable', 'disable'))} {rng.choice(CONFIG_FLAGS)}"


def _clean_paragraphs(rng: random.Random) -> List[str]:
    """One clean document as paragraphs: a title, 2-5 prose paragraphs, sometimes config lines."""
    paragraphs = [f"How to {rng.choice(VERBS)} the {rng.choice(NOUNS)}"]
    for _ in range(rng.randint(2, 5)):
        paragraphs.append(_prose_paragraph(rng))
        if rng.random() < 0.25:
            paragraphs.append("\n".join(_config_line(rng) for _ in range(rng.randint(1, 4))))
    return paragraphs


def _unique_clean_paragraphs(rng: random.Random, seen: set) -> List[str]:
    """A clean document never generated before in this corpus (keeps target, val and pool disjoint)."""
    while True:
        paragraphs = _clean_paragraphs(rng)
        text = "\n\n".join(paragraphs)
        if text not in seen:
            seen.add(text)
            return paragraphs


# ---------------------------------------------------------------------------------------------
# Noise.
def _random_tokens(rng: random.Random) -> str:
    length = rng.randint(150, 600)
    words: List[str] = []
    while sum(map(len, words)) + len(words) < length:
        words.append("".join(rng.choice(RANDOM_CHARS) for _ in range(rng.randint(1, 12))))
    return " ".join(words)


def _shuffled(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(3, 8)):
        words = _prose_sentence(rng)[:-1].lower().split()
        rng.shuffle(words)
        sentences.append(_sentence(" ".join(words)))
    return " ".join(sentences)


def _char_noise(rng: random.Random) -> str:
    out: List[str] = []
    for char in _prose_paragraph(rng):
        if rng.random() >= CHAR_NOISE_RATE:
            out.append(char)
            continue
        edit = rng.randrange(3)
        if edit == 0:                                  # substitute
            out.append(rng.choice(string.ascii_lowercase))
        elif edit == 1:                                # insert before the character
            out.append(rng.choice(string.ascii_lowercase) + char)
        # edit == 2: delete
    return "".join(out)


def _recipe_sentence(rng: random.Random) -> str:
    ingredient = rng.choice(INGREDIENTS)
    template = rng.randrange(4)
    if template == 0:
        return _sentence(f"{rng.choice(ACTIONS)} {rng.choice(NUMBERS)} {rng.choice(UNITS)} of "
                         f"{ingredient} into the {rng.choice(TOOLS)}")
    if template == 1:
        return _sentence(f"stir the {ingredient} {rng.choice(MANNERS)} for {rng.choice(NUMBERS)} minutes")
    if template == 2:
        return _sentence(f"cook the {ingredient} in the {rng.choice(TOOLS)} until {rng.choice(STATES)}")
    return _sentence(f"season with {ingredient} and serve {rng.choice(('warm', 'hot', 'chilled'))}")


def _sports_sentence(rng: random.Random) -> str:
    template = rng.randrange(3)
    if template == 0:
        home, away = rng.sample(TEAMS, 2)
        return _sentence(f"{_words(home)} {_words(rng.choice(RESULTS))} {_words(away)} "
                         f"{_words(rng.choice(SCORES))} on {rng.choice(DAYS)}")
    if template == 1:
        return _sentence(f"the {rng.choice(ROLES)} {rng.choice(PLAYS)} in the "
                         f"{rng.choice(('first', 'second'))} half")
    return _sentence(f"the crowd {rng.choice(('cheered', 'roared', 'groaned'))} as the "
                     f"{rng.choice(ROLES)} {rng.choice(PLAYS)}")


def _off_target(rng: random.Random, recipe: bool) -> str:
    sentence = _recipe_sentence if recipe else _sports_sentence
    return " ".join(sentence(rng) for _ in range(rng.randint(3, 8)))


def _noise_paragraph(rng: random.Random, kind: str) -> str:
    if kind == "random_tokens":
        return _random_tokens(rng)
    if kind == "boilerplate":
        return rng.choice(BOILERPLATE)
    if kind == "shuffled":
        return _shuffled(rng)
    if kind == "char_noise":
        return _char_noise(rng)
    return _off_target(rng, recipe=rng.random() < 0.5)


def _whole_noise_document(rng: random.Random, kind: str) -> str:
    if kind == "off_target":
        recipe = rng.random() < 0.5
        title = (f"Recipe: {_words(rng.choice(DISHES))}" if recipe
                 else f"Match report: {_words(rng.choice(TEAMS))}")
        paragraphs = [title] + [_off_target(rng, recipe) for _ in range(rng.randint(2, 5))]
    else:
        paragraphs = [_noise_paragraph(rng, kind) for _ in range(rng.randint(3, 6))]
    return "\n\n".join(paragraphs)


# ---------------------------------------------------------------------------------------------
# Documents and files.
def _join(segments: List[Segment]) -> Tuple[str, list]:
    """Join segments with blank lines; labels are the [start, end) spans of the noisy segments."""
    parts, labels, offset = [], [], 0
    for text, label in segments:
        if parts:
            parts.append("\n\n")
            offset += 2
        if label is not None:
            labels.append([offset, offset + len(text), label])
        parts.append(text)
        offset += len(text)
    return "".join(parts), labels


def _pool_segments(rng: random.Random, seen: set, kind: str, whole: bool) -> List[Segment]:
    if kind == "clean":
        return [(p, None) for p in _unique_clean_paragraphs(rng, seen)]
    if whole:
        return [(_whole_noise_document(rng, kind), kind)]
    segments: List[Segment] = [(p, None) for p in _unique_clean_paragraphs(rng, seen)]
    for _ in range(rng.randint(1, 2)):
        segments.insert(rng.randint(0, len(segments)), (_noise_paragraph(rng, kind), kind))
    return segments


def _pool_plan(rng: random.Random):
    """Endless (kind, whole) draws (whole is ignored for clean); the first 11 cover every pair once."""
    pairs = [("clean", True)] + [(kind, whole) for kind in NOISE_KINDS for whole in (True, False)]
    rng.shuffle(pairs)
    yield from pairs
    weights = [CLEAN_FRACTION] + [(1 - CLEAN_FRACTION) / len(NOISE_KINDS)] * len(NOISE_KINDS)
    while True:
        kind = rng.choices(("clean",) + NOISE_KINDS, weights)[0]
        yield kind, rng.random() < 0.5


def _documents(name: str, budget: int, seed: int, seen: set):
    """Yield (text, source, labels) for one file until `budget` characters (and the plan) are used."""
    rng = random.Random(f"blade-corpus:{seed}:{name}")  # str seeds are hashed with sha512: stable
    plan = _pool_plan(rng) if name == "pool" else None
    required = 1 + 2 * len(NOISE_KINDS) if plan else 1
    chars = count = 0
    while chars < budget or count < required:
        kind, whole = next(plan) if plan else ("clean", True)
        text, labels = _join(_pool_segments(rng, seen, kind, whole))
        yield text, kind, labels
        chars += len(text)
        count += 1


def _write_file(path: str, documents) -> dict:
    stats = {"path": path, "documents": 0, "chars": 0, "sources": {}, "labels": {}}
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for text, source, labels in documents:
            f.write(json.dumps({"text": text, "source": source, "labels": labels}) + "\n")
            stats["documents"] += 1
            stats["chars"] += len(text)
            per_source = stats["sources"].setdefault(source, {"documents": 0, "chars": 0})
            per_source["documents"] += 1
            per_source["chars"] += len(text)
            for start, end, label in labels:
                stats["labels"][label] = stats["labels"].get(label, 0) + end - start
    return stats


def generate_builtin_corpus(out_dir: str, seed: int = 0, scale: float = 1.0) -> dict:
    """Write target.jsonl, val.jsonl and pool.jsonl into `out_dir`; return per-file statistics.

    The summary is {"seed", "scale", "files": {name: {"path", "documents", "chars",
    "sources": {source: {"documents", "chars"}}, "labels": {label: labelled chars}}}}.
    The same seed and scale give byte-identical files.
    """
    if not scale > 0:
        raise ConfigError(f"corpus scale must be > 0, got {scale}")
    os.makedirs(out_dir, exist_ok=True)
    seen: set = set()
    files = {}
    for name, size in TEXT_BUDGETS.items():
        budget = max(1, round(size * scale))
        files[name] = _write_file(os.path.join(out_dir, f"{name}.jsonl"),
                                  _documents(name, budget, seed, seen))
    return {"seed": seed, "scale": scale, "files": files}


def continuation_items(n: int, seed: int = 0) -> List[dict]:
    """`n` multiple-choice items in the target domain's style (the local evaluation task, blade/eval/tasks):
    {"context": a title and three sentences, "choices": 4 sentences, "label": index of the true next
    sentence}. The distractors are the pool's noise kinds: the true sentence with its words shuffled, a
    recipe sentence and a sports report sentence (off-target). The same n and seed give the same items."""
    rng, items = random.Random(f"continuation-{seed}"), []
    while len(items) < n:
        sentences = [_prose_sentence(rng) for _ in range(4)]
        words = sentences[-1][:-1].lower().split()
        rng.shuffle(words)
        choices = [sentences[-1], _sentence(" ".join(words)), _recipe_sentence(rng), _sports_sentence(rng)]
        if len(set(choices)) < 4:  # a short sentence can shuffle into itself
            continue
        order = rng.sample(range(4), 4)
        items.append({"context": f"How to {rng.choice(VERBS)} the {rng.choice(NOUNS)}\n\n"
                                 + " ".join(sentences[:-1]),
                      "choices": [choices[i] for i in order], "label": order.index(0)})
    return items
