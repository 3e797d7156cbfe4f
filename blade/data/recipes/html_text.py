"""Readable text of generated documentation pages (Sphinx, DocBook, pod2html): the main content
without navigation, scripts, sidebars or tables of contents (used by blade/data/recipes/extract.py)."""
from __future__ import annotations

import re
from html.parser import HTMLParser

_DROP_TAGS = {"script", "style", "head", "nav"}
_DROP_CLASSES = {"navheader", "navfooter", "sphinxsidebar", "related", "footer", "headerlink",
                 "toc", "docnav"}  # docnav: the debian-handbook Prev/Home/Next bars
_DROP_IDS = {"banner", "navigation"}
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}
_PARAGRAPH = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "blockquote",
              "section", "article", "aside", "header", "footer", "main", "ul", "ol", "dl", "form",
              "fieldset", "figure", "figcaption", "address", "hr", "caption", "details"}
_LINE = {"br", "li", "tr", "dt", "dd", "summary"}
_CELL = {"td", "th"}
_SPACES = re.compile(r"\s+")
_TRAILING = re.compile(r"[ \t]+\n")


class _Writer:
    """Text with whitespace collapsed outside <pre> and consecutive breaks merged (at most one
    blank line); lines never start with a collapsed space."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.breaks = 0  # newlines owed before the next text

    def text(self, data: str, verbatim: bool) -> None:
        if not verbatim:
            data = _SPACES.sub(" ", data)
            if self.breaks or not self.parts or self.parts[-1][-1] in " \t\n":
                data = data.lstrip(" ")
        elif self.breaks:  # the newline after <pre> (or any leading one) is already owed
            data = data.lstrip("\n")
        if not data:
            return
        if self.breaks and self.parts:  # counting the newlines a <pre> may have ended with
            last = self.parts[-1]
            self.parts.append("\n" * (self.breaks - len(last) + len(last.rstrip("\n"))))
        self.breaks = 0
        self.parts.append(data)

    def brk(self, newlines: int) -> None:
        self.breaks = max(self.breaks, newlines)

    def cell(self) -> None:
        """A tab between table cells on one line."""
        if self.parts and not self.breaks:
            self.parts[-1] = self.parts[-1].rstrip(" ")
            self.parts.append("\t")

    def result(self) -> str:
        return _TRAILING.sub("\n", "".join(self.parts) + "\n").strip("\n")


class _Extractor(HTMLParser):
    """Only the page's writer is fed outside the main element, both inside it; dropped elements
    feed neither. For the dropped and the main element, nesting of their own tag is counted."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.page, self.main = _Writer(), _Writer()
        self.found_main = False
        self.skip: list | None = None     # [tag, depth] of the dropped element we are in
        self.inside: list | None = None   # [tag, depth] of the main element we are in
        self.pre = 0

    def writers(self) -> tuple[_Writer, ...]:
        return (self.page, self.main) if self.inside else (self.page,)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if self.skip:
            self.skip[1] += tag == self.skip[0]
            return
        attr = dict(attrs)
        classes = set((attr.get("class") or "").split())
        if tag in _DROP_TAGS or classes & _DROP_CLASSES or attr.get("id") in _DROP_IDS:
            if tag not in _VOID:
                self.skip = [tag, 1]
            return
        if self.inside:
            self.inside[1] += tag == self.inside[0]
        elif tag not in _VOID and (attr.get("role") == "main" or (tag == "div" and "body" in classes)):
            self.inside, self.found_main = [tag, 1], True
        self.pre += tag == "pre"
        self.block(tag, start=True)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID:
            return
        if self.skip:
            self.skip[1] -= tag == self.skip[0]
            if not self.skip[1]:
                self.skip = None
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        self.block(tag, start=False)
        if self.inside and tag == self.inside[0]:
            self.inside[1] -= 1
            if not self.inside[1]:
                self.inside = None

    def block(self, tag: str, start: bool) -> None:
        for writer in self.writers():
            if tag in _PARAGRAPH:
                writer.brk(2)
            elif tag in _LINE:
                writer.brk(1)
            elif tag in _CELL and start:
                writer.cell()

    def handle_data(self, data: str) -> None:
        if not self.skip:
            for writer in self.writers():
                writer.text(data, verbatim=self.pre > 0)


def html_text(html: str) -> str:
    """Readable text of a generated documentation page: the main content (Sphinx role="main" or
    div.body) when there is one, without navigation, scripts, sidebars or tables of contents."""
    parser = _Extractor()
    parser.feed(html)
    parser.close()
    return (parser.main if parser.found_main else parser.page).result()
