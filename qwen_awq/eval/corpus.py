"""Offline English text for AWQ calibration and perplexity evaluation, read from the test data inside the
`gensim` wheel (never from the network) and extracted once into cache_dir()/"corpus" as two disjoint splits.
"""
# Sources, both in gensim/test/test_data:
# - enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2: a 2016 English Wikipedia dump sample
#   (CC BY-SA): 100 articles with prose once redirects and link lists are dropped. Markup is stripped to plain
#   paragraphs. Every 5th article in dump order (20) is held out for evaluation; paragraphs of the other 80
#   are calibration documents.
# - lee_background.cor: 300 Australian news articles (the Lee et al. 2005 corpus), calibration only.
# No article is on both sides, and a paragraph also found in the held-out split is dropped from calibration.
from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

from qwen_awq.assets import cache_dir
from qwen_awq.errors import AssetMissing

CORPUS_PACKAGE = "gensim"
# gensim's own dependencies (scipy, smart_open, ...) are not needed: only its data files are read.
CORPUS_INSTALL = "pip install --no-deps gensim"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_FILE = "lee_background.cor"
CORPUS_VERSION = 1  # bump when the extraction rules change, so stale caches are rebuilt
HELDOUT_EVERY = 5  # article i (dump order, 0-based) is held out when i % 5 == 4: ~20% of the articles
MIN_WORDS = 20  # shorter paragraphs are headings, captions or markup debris, not prose
# Sections after which an article holds only citations and link lists.
END_SECTIONS = frozenset({"references", "external links", "see also", "further reading", "notes",
                          "bibliography", "sources", "footnotes", "citations", "notes and references"})
# Links into these namespaces render as images or page metadata, not as text.
DROP_NAMESPACES = frozenset({"file", "image", "category", "media"})
DROP_TAGS = ("ref", "math", "gallery", "timeline", "syntaxhighlight", "source", "pre", "score", "imagemap",
             "code", "chem", "hiero", "nowiki", "table")
# Template name -> the positional argument holding its visible text (the rest of the template is styling).
INLINE_TEMPLATES = {"lang": 1, "nowrap": 0, "small": 0, "nobr": 0, "transl": -1, "em": 0}
RANGE_WORDS = frozenset({"to", "and", "-", "–", "or", "by", "x", "×"})
LEFTOVER_MARKUP = ("{{", "}}", "[[", "]]", "{|", "|}", "<", ">")


def gensim_data_dir() -> Path:
    """gensim/test/test_data, located without importing gensim (its import pulls in scipy and more)."""
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    for location in list(spec.submodule_search_locations or []) if spec is not None else []:
        folder = Path(location) / "test" / "test_data"
        if (folder / WIKI_FILE).is_file() and (folder / NEWS_FILE).is_file():
            return folder
    raise AssetMissing(f"the offline English corpus (gensim's test data) is missing; run: {CORPUS_INSTALL}")


def corpus_dir() -> Path:
    return cache_dir() / "corpus"


def calibration_texts() -> list[str]:
    """Calibration documents (Wikipedia paragraphs, then news articles); none occurs in heldout_text()."""
    text = _cached("calibration").read_text(encoding="utf-8")
    return [doc for doc in text.split("\n\n") if doc]


def heldout_text() -> str:
    """The held-out Wikipedia articles as plain text: paragraphs split by blank lines, articles likewise."""
    return _cached("heldout").read_text(encoding="utf-8").rstrip("\n")


def _cached(split: str) -> Path:
    path = corpus_dir() / f"{split}-v{CORPUS_VERSION}.txt"
    if not path.is_file():
        _extract(gensim_data_dir(), corpus_dir())
    return path


def _extract(data: Path, out: Path) -> None:
    """Build both splits and write them atomically (write a temporary file, then rename)."""
    calibration, heldout = split_articles(read_wiki_articles(data / WIKI_FILE))
    held = set(heldout)
    documents = [p for p in calibration if p not in held] + read_news(data / NEWS_FILE)
    out.mkdir(parents=True, exist_ok=True)
    for split, paragraphs in (("calibration", documents), ("heldout", heldout)):
        tmp = out / f".{split}-v{CORPUS_VERSION}.{os.getpid()}.tmp"
        tmp.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
        os.replace(tmp, out / f"{split}-v{CORPUS_VERSION}.txt")


def split_articles(articles: list[list[str]]) -> tuple[list[str], list[str]]:
    """(calibration paragraphs, held-out paragraphs): whole articles go to one side, chosen by position."""
    calibration: list[str] = []
    heldout: list[str] = []
    for i, paragraphs in enumerate(articles):
        (heldout if i % HELDOUT_EVERY == HELDOUT_EVERY - 1 else calibration).extend(paragraphs)
    return calibration, heldout


def read_news(path: Path) -> list[str]:
    """lee_background.cor holds one article per line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    return [" ".join(line.split()) for line in lines if len(line.split()) >= MIN_WORDS]


def read_wiki_articles(path: Path) -> list[list[str]]:
    """Prose paragraphs of each main-namespace, non-redirect page of a MediaWiki XML dump, in dump order."""
    articles: list[list[str]] = []
    with bz2.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            text = element.findtext("{*}revision/{*}text") or ""
            is_article = element.findtext("{*}ns") == "0" and element.find("{*}redirect") is None
            if is_article:
                paragraphs = wiki_paragraphs(text)
                if paragraphs:
                    articles.append(paragraphs)
            element.clear()  # keep memory flat over the whole dump
    return articles


def wiki_paragraphs(wikitext: str) -> list[str]:
    """Plain-text prose paragraphs of one article's wikitext; lists, tables and end sections are dropped."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in strip_markup(wikitext).splitlines():
        heading = re.fullmatch(r"\s*(=+)\s*(.*?)\s*\1\s*", line)
        if heading and heading.group(2).strip().lower() in END_SECTIONS:
            break
        if heading or not line.strip() or line.lstrip()[:1] in ("*", "#", ":", ";", "|", "!"):
            paragraphs.append(" ".join(current))
            current = []
        else:
            current.append(line.strip())
    paragraphs.append(" ".join(current))
    return [p for p in map(_tidy, paragraphs) if _is_prose(p)]


def strip_markup(wikitext: str) -> str:
    """Wikitext -> text with headings and list markers still at line starts (wiki_paragraphs reads them)."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.S)
    text = re.sub(r"<ref\b[^>]*/>", "", text, flags=re.I)
    tags = "|".join(DROP_TAGS)
    text = re.sub(rf"<({tags})\b[^>]*>.*?</\1\s*>", "", text, flags=re.S | re.I)
    text = _innermost_first(text, re.compile(r"\{\{([^{}]*)\}\}"), _render_template)  # templates nest
    text = _innermost_first(text, re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S), lambda m: "")  # tables too
    text = _replace_links(text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]", r"\1", text)  # [url label] -> label
    text = re.sub(r"'{2,}", "", text)  # bold / italic quotes
    text = re.sub(r"<[^<>\n]*>", "", text)  # remaining inline tags (<br/>, <sup>, <small>)
    text = re.sub(r"__[A-Z]+__", "", text)  # magic words such as __NOTOC__
    return html.unescape(text)


def _innermost_first(text: str, pattern: re.Pattern[str], render: Callable[[re.Match[str]], str]) -> str:
    while True:
        text, count = pattern.subn(render, text)
        if count == 0:
            return text


def _render_template(match: re.Match[str]) -> str:
    """Templates that print words inside a sentence keep them ({{convert|52,419|sqmi}} -> "52,419 sqmi");
    all others (citations, infoboxes, notes) vanish."""
    name, *parts = match.group(1).split("|")
    args = [a.strip() for a in parts if "=" not in a]  # positional arguments only
    name = name.strip().lower()
    if name == "convert" and len(args) >= 2:
        ranged = len(args) >= 4 and args[1] in RANGE_WORDS  # {{convert|2|to|3|m}}
        return " ".join(args[:4] if ranged else args[:2])
    index = INLINE_TEMPLATES.get(name)
    return args[index] if index is not None and -len(args) <= index < len(args) else ""


def _replace_links(text: str) -> str:
    """[[target|label]] -> label, [[target]] -> target; image, category and interwiki links vanish.

    File captions may hold links of their own, so links are resolved innermost first.
    """
    pattern = re.compile(r"\[\[([^\[\]]*)\]\]")

    def render(match: re.Match[str]) -> str:
        target, _, label = match.group(1).partition("|")
        target = target.strip().lstrip(":")
        namespace = target.split(":", 1)[0].strip().lower() if ":" in target else ""
        if namespace in DROP_NAMESPACES:
            return ""
        if label:
            return label.rsplit("|", 1)[-1]
        return "" if namespace else target  # bare interwiki / interlanguage links render nothing

    return _innermost_first(text, pattern, render)


def _tidy(paragraph: str) -> str:
    """Collapse spaces and the empty brackets and stray spaces that removed templates leave behind."""
    text = re.sub(r"\(\s*[,;:]?\s*\)", "", paragraph)
    text = " ".join(text.split())
    return re.sub(r" ([,.;:])", r"\1", text)


def _is_prose(paragraph: str) -> bool:
    return len(paragraph.split()) >= MIN_WORDS and not any(m in paragraph for m in LEFTOVER_MARKUP)
