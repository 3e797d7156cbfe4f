"""blade.data.recipes.noise: every corruption's labels are exact, on generated multi-paragraph technical text.

Each kind-specific test undoes the corruption using only the labels (and the input) and demands the
input back, so a label that is off by one character, or an edit outside the labels, fails."""
from __future__ import annotations

import random
import re
import textwrap

import pytest

from blade.data.recipes import noise
from blade.data.recipes.noise import CORRUPTIONS, corrupt
from blade.errors import DataError

SEEDS = range(150)
MOST_PARAGRAPHS = {"mojibake": 2, "char_noise": 2, "word_shuffle": 2,
                   "repetition": 1, "splice": 1, "truncation": 1}
WORDS = ("file option index cache server user value command default output module function buffer table "
         "record parser commit branch remote config socket thread query column page daemon kernel path "
         "string array handle stream").split()
EXTRAS = ("don't", "it's", "the user's", "can't", "isn't", 'the "--{w}" option', 'a "{w}" value', "--",
          "café", "naïve", "Zürich", "€5")
SPLICE = (
    "\n".join(f"2023-01-0{i} 12:00:0{i} fail2ban.filter [{i}]: INFO Found 10.0.0.{i} - 2023-01-0{i}"
              for i in range(1, 9)),
    "gcide: Table (n.) 1. A flat surface; a slab. 2. A board on legs, used for meals, work or play; "
    "also, the food served on it. [1913 Webster] Syn: board, stand, counter.",
    "too short",
)
SENTENCE_END = re.compile(r"[.!?](?=\s)")


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
    for _ in range(rng.randint(0, 2)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(EXTRAS).format(w=rng.choice(WORDS)))
    return " ".join(words).capitalize() + rng.choice(".....?!")


def paragraph(rng: random.Random) -> str:
    style = rng.choice(("prose", "prose", "wrapped", "code", "list", "heading"))
    if style == "code":
        return "\n".join(f"    $ git {rng.choice(WORDS)} --{rng.choice(WORDS)} {rng.choice(WORDS)}"
                         for _ in range(rng.randint(2, 5)))
    if style == "list":
        return "\n".join("- " + sentence(rng) for _ in range(rng.randint(2, 4)))
    if style == "heading":
        return f"{rng.choice(WORDS).capitalize()} {rng.randint(1, 9)}"
    prose = " ".join(sentence(rng) for _ in range(rng.randint(1, 5)))
    if style == "wrapped":
        return textwrap.fill(prose, rng.randint(50, 90), break_on_hyphens=False, break_long_words=False)
    return prose


def document(seed: int) -> str:
    rng = random.Random(f"doc{seed}")
    return "\n\n".join(paragraph(rng) for _ in range(rng.randint(1, 6)))


def paragraph_ranges(text: str) -> list[tuple[int, int]]:
    ranges, pos = [], 0
    for p in text.split("\n\n"):
        ranges.append((pos, pos + len(p)))
        pos += len(p) + 2
    return ranges


def results(kind: str):
    """(input, output, spans) for every seed where the corruption applies."""
    for seed in SEEDS:
        text = document(seed)
        out = corrupt(text, kind, random.Random(seed), SPLICE)
        if out is not None:
            yield text, out[0], [(s, e) for s, e, _ in out[1]]


def changed_paragraphs(text: str, out: str, spans) -> list[tuple[str, str, list[tuple[int, int]]]]:
    """(original, corrupted, spans local to it) per changed paragraph; asserts that nothing else changed."""
    before, after = text.split("\n\n"), out.split("\n\n")
    assert len(before) == len(after)
    changed = []
    for (start, end), old, new in zip(paragraph_ranges(out), before, after):
        local = [(s - start, e - start) for s, e in spans if start <= s < e <= end]
        assert (old != new) == bool(local)
        if local:
            changed.append((old, new, local))
    assert sum(len(c[2]) for c in changed) == len(spans)  # no span crosses a paragraph break
    return changed


def unlabelled(text: str, spans) -> str:
    pieces, pos = [], 0
    for s, e in spans:
        pieces.append(text[pos:s])
        pos = e
    return "".join(pieces) + text[pos:]


def ungarble(s: str) -> str:
    """Inverse of the mojibake: characters back to bytes (cp1252, latin-1 for its holes), read as UTF-8."""
    def byte(c):
        try:
            return c.encode("cp1252")
        except UnicodeEncodeError:
            return c.encode("latin-1")
    return b"".join(byte(c) for c in s).decode("utf-8")


def is_sentence_start(para: str, s: int) -> bool:
    """s starts the paragraph's first word, or follows whitespace after a . ! or ?"""
    before = para[:s]
    return not before.strip() or (before[-1].isspace() and before.rstrip()[-1] in ".!?")


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_spans_valid_deterministic_and_local(kind):
    counts, applied = set(), 0
    for seed in SEEDS:
        text = document(seed)
        out = corrupt(text, kind, random.Random(seed), SPLICE)
        assert out == corrupt(text, kind, random.Random(seed), SPLICE)
        if out is None:
            continue
        applied += 1
        new, spans = out
        assert spans and all(label == kind for *_, label in spans)
        assert all(0 <= s < e <= len(new) for s, e, _ in spans)
        assert all(e <= s2 for (_, e, _), (s2, _, _) in zip(spans, spans[1:]))
        changed = changed_paragraphs(text, new, [(s, e) for s, e, _ in spans])
        n_paras = text.count("\n\n") + 1
        assert 1 <= len(changed) <= min(MOST_PARAGRAPHS[kind], max(1, n_paras - 1))
        counts.add(len(changed))
    assert applied >= 0.8 * len(SEEDS)
    assert counts == set(range(1, MOST_PARAGRAPHS[kind] + 1))


@pytest.mark.parametrize("kind", [k for k, most in MOST_PARAGRAPHS.items() if most == 2])
def test_one_or_two_paragraphs_when_every_paragraph_qualifies(kind):
    text = "\n\n".join(f"It's paragraph {i}, with \"quotes\" and many words. Then a second sentence."
                       for i in range(5))
    counts = []
    for seed in range(40):
        out, spans = corrupt(text, kind, random.Random(seed))
        counts.append(len(changed_paragraphs(text, out, [(s, e) for s, e, _ in spans])))
    assert 10 < counts.count(1) < 30 and counts.count(1) + counts.count(2) == 40


def test_mojibake_spans_decode_to_the_typographic_characters():
    for text, out, spans in results("mojibake"):
        for old, new, local in changed_paragraphs(text, out, spans):
            assert unlabelled(new, local).isascii()
            restored, pos = [], 0
            for s, e in local:
                char = ungarble(new[s:e])
                assert len(char) == 1 and not char.isascii()
                restored += [new[pos:s], char]
                pos = e
            typographic = "".join(restored) + new[pos:]
            quotes = re.findall("[\u201c\u201d]", typographic)
            assert quotes == ["\u201c", "\u201d"] * (len(quotes) // 2)
            plain = typographic.replace("\u2019", "'").replace(" \u2014 ", " -- ")
            assert re.sub("[\u201c\u201d]", '"', plain) == old
            assert "'" not in typographic and " -- " not in typographic


def test_mojibake_exact_bytes():
    out = corrupt('He said "hi" -- it\'s Á', "mojibake", random.Random(0))
    assert out == ("He said â€œhiâ€\x9d â€” itâ€™s Ã\x81",
                   [[8, 11, "mojibake"], [13, 16, "mojibake"], [17, 20, "mojibake"], [23, 26, "mojibake"],
                    [28, 30, "mojibake"]])


def _is_subsequence(part: str, whole: str) -> bool:
    rest = iter(whole)
    return all(c in rest for c in part)


def test_char_noise_labels_exactly_the_changed_characters():
    for text, out, spans in results("char_noise"):
        for old, new, local in changed_paragraphs(text, out, spans):
            labelled = set(i for s, e in local for i in range(s, e))
            # what is left unlabelled is the original text with letters removed (deleted or replaced)
            assert _is_subsequence("".join(c for i, c in enumerate(new) if i not in labelled), old)
            words = {m.span(): m.group() for m in re.finditer(r"\S+", new)}
            clean = iter(old.split())  # words without a label are unchanged, in their order
            assert all(any(w == o for o in clean) for (ws, we), w in words.items()
                       if not labelled & set(range(ws, we)))
            assert [c for c in new if not c.isalpha()] == [c for c in old if not c.isalpha()]


def test_char_noise_marks_a_deletion_at_the_following_character():
    class Deleting(random.Random):  # every letter is hit (random() = 0) and deleted (randrange = 2)
        def random(self):
            return 0.0

        def randrange(self, *args):
            return 2

    out, marks = noise._noisy_word("ab1c2", Deleting(0), 1.0)
    assert (out, marks) == ("12", [0, 1])  # the gaps before "1" and before "2"
    out, marks = noise._noisy_word("x1yz", Deleting(0), 1.0)
    assert (out, marks) == ("1", [0])      # the gap before "1", then a gap at the end: the last character


def labelled_fraction(rate, monkeypatch) -> float:
    monkeypatch.setattr(noise, "CHAR_NOISE_RATE", (rate, rate))
    labelled = total = 0
    for text, out, spans in results("char_noise"):
        for _, new, local in changed_paragraphs(text, out, spans):
            labelled += sum(e - s for s, e in local)
            total += len(new)
    return labelled / total


def test_char_noise_labelled_fraction_grows_with_rate(monkeypatch):
    low, high = labelled_fraction(0.1, monkeypatch), labelled_fraction(0.3, monkeypatch)
    assert 0.03 < low < high / 2 and high < 0.35, (low, high)


def test_word_shuffle_labels_permuted_sentences():
    def words(s):
        return re.sub(r"(?<=[^.!?])[.!?]+$", "", s).split()
    for text, out, spans in results("word_shuffle"):
        assert len(out) == len(text) and unlabelled(out, spans) == unlabelled(text, spans)
        for s, e in spans:
            old, new = text[s:e], out[s:e]
            start = next(r[0] for r in paragraph_ranges(text) if r[0] <= s < r[1])
            assert is_sentence_start(text[start:], s - start) and not SENTENCE_END.search(old[:-1] + " ")
            assert new != old and sorted(words(new)) == sorted(words(old)) and len(words(old)) >= 4
            assert re.findall(r"[.!?]*$", new) == re.findall(r"[.!?]*$", old)


def test_repetition_labels_exactly_the_copies():
    for text, out, spans in results("repetition"):
        unit = out[spans[0][0]:spans[0][1]]
        sep = out[spans[0][0] - 1]
        assert sep in " \n" and len(unit) >= 20 and 3 <= len(spans) <= 10
        assert all(out[s:e] == unit and out[s - 1] == sep for s, e in spans)
        assert all(e + 1 == s2 for (_, e), (s2, _) in zip(spans, spans[1:]))
        first = spans[0][0] - 1
        assert out[first - len(unit):first] == unit
        assert out[:first] + out[spans[-1][1]:] == text
        if sep == "\n":
            assert first - len(unit) == 0 or out[first - len(unit) - 1] == "\n"
        else:
            assert "\n" not in unit


def test_splice_labels_exactly_the_inserted_snippet():
    for text, out, spans in results("splice"):
        [(s, e)] = spans
        snippet = out[s:e]
        assert out[s - 1] == " " and not out[s - 2].isspace() and out[e].isspace()
        assert out[:s - 1] + out[e:] == text
        assert 50 <= len(snippet) <= 500 and snippet.strip() == snippet
        assert any(re.search(r"(?<!\S)" + re.escape(snippet) + r"(?!\S)", src) for src in SPLICE)


def test_splice_from_a_long_source():
    src = " ".join(f"word{i}" for i in range(200_000))
    text, spans = corrupt("Some clean words here.\n\nMore clean words.", "splice", random.Random(3), [src])
    [[s, e, _]] = spans
    assert re.search(r"(?<!\S)" + re.escape(text[s:e]) + r"(?!\S)", src)


def test_truncation_cuts_a_sentence_and_keeps_the_next_paragraph():
    for text, out, spans in results("truncation"):
        [(s, e)] = spans
        assert out[:e] == text[:e]
        start, end = next(r for r in paragraph_ranges(text) if r[0] <= s < r[1])
        assert out[e:] == text[end:]  # "\n\n" + the next paragraph, or nothing
        para = text[start:end]
        assert is_sentence_start(para, s - start)
        stop = SENTENCE_END.search(para, s - start)
        whole = para[s - start:stop.end() if stop else len(para)]
        fragment = out[s:e]
        assert whole.startswith(fragment) and whole[len(fragment)].isspace()
        n, k = len(whole.split()), len(fragment.split())
        assert n >= 6 and n / 5 <= k <= 4 * n / 5


@pytest.mark.parametrize("kind", [k for k in CORRUPTIONS if k != "char_noise"])
def test_one_word_document_offers_no_place(kind):
    assert corrupt("Hello", kind, random.Random(0), SPLICE) is None


def test_char_noise_on_one_word_labels_letters_inside_it():
    for seed in range(50):
        out = corrupt("Internationalisation", "char_noise", random.Random(seed))
        assert out is None or (out[1] and all(0 <= s < e <= len(out[0]) for s, e, _ in out[1]))


@pytest.mark.parametrize("kind, text, splice_texts", [
    ("splice", document(1), ()),
    ("splice", document(1), ("short", "x" * 600)),
    ("mojibake", "Plain ASCII text without any quotes.\n\nAnother plain one here.", ()),
    ("word_shuffle", "Too few words. Only three here!\n\na a a a.", ()),
    ("truncation", "One two three four five.\n\nSix seven eight nine ten.", ()),
    ("repetition", "Short line.\nAnother one.\n\nTiny.", ()),
])
def test_documents_without_a_place_give_none(kind, text, splice_texts):
    assert corrupt(text, kind, random.Random(0), splice_texts) is None


def test_unknown_kind_is_a_data_error():
    with pytest.raises(DataError, match="valid kinds: mojibake, char_noise, word_shuffle"):
        corrupt("text", "shouting", random.Random(0))
