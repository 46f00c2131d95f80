"""The one local-file reader: every format, gzip, and one-line errors."""

import gzip
import json

import datasets
import pytest

from balora.data.files import SUFFIXES, read_records, read_table

ROWS = [{"question": "1+1?", "answer": "2"}, {"question": "Say \"hi\", twice", "answer": "hi hi"}]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_every_format_gives_the_same_records(tmp_path):
    files = [
        _write(tmp_path / "d.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS)),
        _write(tmp_path / "d.json", json.dumps(ROWS)),
        _write(tmp_path / "lines.json", "\n".join(json.dumps(r) for r in ROWS)),
        _write(tmp_path / "d.csv", 'question,answer\n1+1?,2\n"Say ""hi"", twice",hi hi\n'),
        _write(tmp_path / "d.tsv", 'question\tanswer\n1+1?\t2\nSay "hi", twice\thi hi\n'),
    ]
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    files.append(parquet)
    for path in files:
        assert read_records(path) == ROWS, path.name
    assert SUFFIXES == (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def test_gzipped_text_files(tmp_path):
    packed = tmp_path / "d.jsonl.gz"
    packed.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS).encode()))
    assert read_records(packed) == ROWS
    packed_json = tmp_path / "D.JSON.GZ"
    packed_json.write_bytes(gzip.compress(json.dumps(ROWS).encode()))
    assert read_records(packed_json) == ROWS
    packed_csv = tmp_path / "d.csv.gz"
    packed_csv.write_bytes(gzip.compress('question,answer\n1+1?,2\n"Say ""hi"", twice",hi hi\n'.encode()))
    assert read_records(packed_csv) == ROWS
    with pytest.raises(ValueError, match="unknown file extension '.parquet.gz'"):
        read_records(_write(tmp_path / "d.parquet.gz", "x"))
    not_gzip = _write(tmp_path / "fake.jsonl.gz", json.dumps(ROWS[0]))
    with pytest.raises(ValueError, match="cannot read data file .*fake.jsonl.gz: BadGzipFile") as err:
        read_records(not_gzip)
    assert "\n" not in str(err.value)


def test_table_keeps_columns_blank_lines_and_short_rows(tmp_path):
    csv = _write(tmp_path / "d.csv", "\ufeffa,b,c\n1,2,3\n\n  \n4\n5,6,7,8\n")
    table = read_table(csv)
    assert table.columns == ["a", "b", "c"]  # the byte-order mark is not part of the name
    assert table.rows == [{"a": "1", "b": "2", "c": "3"}, {"a": "4", "b": None, "c": None},
                          {"a": "5", "b": "6", "c": "7"}]
    assert table.blank_lines == 2
    jsonl = _write(tmp_path / "d.jsonl", '{"x": 1}\n\n{"y": 2, "x": 3}\n')
    table = read_table(jsonl)
    assert table.columns == ["x", "y"] and table.blank_lines == 1
    assert table.rows == [{"x": 1}, {"y": 2, "x": 3}]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("empty.csv", "", r"MBPP file .*empty.csv has no rows \(the file is empty\)"),
        ("blank.jsonl", "\n \n", r"has no rows \(the file is empty\)"),
        ("header.csv", "a,b\n", "header.csv has no rows"),
        ("none.json", "[]", "none.json has no rows"),
        ("d.xlsx", "x", r"unsupported MBPP file 'd.xlsx' \(unknown file extension '.xlsx'\); use one of .csv"),
        ("d.gz", "x", "unknown file extension '.gz'"),
        ("noext", "x", "unsupported MBPP file 'noext'"),
        ("bad.jsonl", '{"a": 1}\n{oops\n', r"cannot read MBPP file .*bad.jsonl: line 2 is not valid JSON"),
        ("bad.json", "[1, 2", "not valid JSON"),
        ("list.jsonl", "[1]\n", "must hold JSON objects"),
        ("scalars.json", "[1, 2]", "must hold JSON objects"),
        ("bad.parquet", "not parquet", r"cannot read MBPP file .*bad.parquet as Parquet"),
    ],
)
def test_bad_files_are_one_line_value_errors(tmp_path, name, content, match):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=match) as err:
        read_records(path, what="MBPP file")
    assert "\n" not in str(err.value)


def test_not_utf8_and_folders_are_value_errors(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.csv: not UTF-8 text"):
        read_records(latin)
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(ValueError, match="is a folder, not a file"):
        read_records(tmp_path / "folder.jsonl")


def test_missing_file_is_a_one_line_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="HumanEval file not found: .*missing.jsonl") as err:
        read_records(tmp_path / "missing.jsonl", what="HumanEval file")
    assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="^data file not found"):
        read_records(str(tmp_path / "missing.csv"))
