"""The one reader of local data files: CSV, TSV, JSON, JSON lines and Parquet.

The format comes from the file name: ``.csv``, ``.tsv``, ``.json``, ``.jsonl`` or ``.parquet``;
a text format may be gzip-compressed with a further ``.gz`` (``HumanEval.jsonl.gz``). Text is
read as UTF-8 (a byte-order mark is dropped).

* CSV follows the usual quoting rules; TSV is read with quoting off (GLUE style: a ``"`` is
  text, never a field delimiter). A row shorter than the header gets ``None`` for its missing
  cells; cells beyond the header are dropped. A row with more non-empty cells than the header
  (typically text holding an unquoted delimiter) is a bad row: it is listed in
  :attr:`Table.long_rows` (readers that need whole rows skip it, as classification data does)
  and reported in one warning on the ``"balora"`` logger naming its line.
* ``.jsonl`` holds one JSON object per line (lines end at ``\n``, ``\r\n`` or ``\r`` only: a
  U+2028 or U+0085 inside a JSON string is text); ``.json`` holds one JSON array of objects, or
  JSON lines.
* Blank lines are skipped and counted (:attr:`Table.blank_lines`).

Every problem with a file (missing, not a file, unknown suffix, malformed, not UTF-8 (naming
the line), a JSON line the decoder refuses (naming the line: syntax, nesting too deep, an
integer of more than 4300 digits), no rows, no column names) raises a one-line error that
names what the file is for and its path: ``FileNotFoundError`` for a missing file,
``ValueError`` for everything else.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SUFFIXES", "Table", "cell_text", "data_file_stem", "read_records", "read_table"]

#: Supported file suffixes (each text format also with ``.gz`` after it).
SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
_TEXT_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")

logger = logging.getLogger("balora")


@dataclass
class Table:
    """The records of one file.

    ``rows``: one dict per record, in file order. ``columns``: the column names in file order
    (the header of a CSV/TSV, the Parquet schema, or every JSON key in order of first use).
    ``blank_lines``: blank lines skipped in a text file. ``long_rows``: the CSV/TSV rows with
    more non-empty fields than the header (cut to the header), as ``{index in rows: line}``.
    """

    rows: list[dict]
    columns: list[str]
    blank_lines: int = 0
    long_rows: dict[int, int] = field(default_factory=dict)


def _format_of(path: Path) -> tuple[str, bool] | None:
    """(the suffix that names the format, whether the file is gzip-compressed), or None for a
    name without a supported suffix."""
    suffixes = [s.lower() for s in path.suffixes]
    gzipped = suffixes[-1:] == [".gz"]
    suffix = "".join(suffixes[-2:-1] if gzipped else suffixes[-1:])
    return (suffix, gzipped) if suffix in (_TEXT_SUFFIXES if gzipped else SUFFIXES) else None


def data_file_stem(name: str) -> str | None:
    """``name``'s file name without the suffix that names its format (``data/yelp.tsv`` -> ``yelp``,
    ``x.jsonl.gz`` -> ``x``); None when it does not end in a supported suffix."""
    path = Path(name.replace("\\", "/"))
    found = _format_of(path)
    if found is None:
        return None
    suffix, gzipped = found
    return path.name[: len(path.name) - len(suffix) - 3 * gzipped] or None


def _format(path: Path, what: str) -> tuple[str, bool]:
    """(the suffix that names the format, whether the file is gzip-compressed)."""
    found = _format_of(path)
    if found is None:
        gzipped = path.suffixes[-1:] and path.suffixes[-1].lower() == ".gz"
        shown = "".join(path.suffixes[-2:] if gzipped else path.suffixes[-1:])
        raise ValueError(
            f"unsupported {what} {path.name!r} (unknown file extension {shown!r}); "
            f"use one of {', '.join(SUFFIXES)} (a text format may end in .gz)"
        )
    return found


def _text(path: Path, gzipped: bool, what: str) -> str:
    """The file's content as text (gunzipped when ``gzipped``)."""
    try:
        data = path.read_bytes()
        if gzipped:
            data = gzip.decompress(data)
        return data.decode("utf-8-sig")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise ValueError(f"cannot read {what} {path}: {type(exc).__name__}: {exc}") from None
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"cannot read {what} {path}: not UTF-8 text (line {line}, byte {exc.start})") from None


def _delimited(text: str, tsv: bool, path: Path, what: str) -> Table:
    """Rows of a CSV (quoted fields) or TSV (quoting off) text with a header line."""
    if tsv:
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(io.StringIO(text, newline=""))
    rows, blank, long_rows = [], 0, {}
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{what} {path} has no rows (the file is empty)")
        for cells in reader:
            if not any(c.strip() for c in cells):
                blank += 1
                continue
            if any(c.strip() for c in cells[len(header):]):
                long_rows[len(rows)] = reader.line_num
            rows.append({name: cells[i] if i < len(cells) else None for i, name in enumerate(header)})
    except csv.Error as exc:
        kind = "TSV" if tsv else "CSV"
        raise ValueError(f"cannot read {what} {path}: not valid {kind} near line {reader.line_num}: {exc}") from None
    return Table(rows, list(header), blank, long_rows)


#: The line ends of JSON lines: JSON strings cannot hold a raw CR or LF, but may hold U+2028 or U+0085,
#: where ``str.splitlines`` would also break.
_LINE_END = re.compile(r"\r\n|\r|\n")


def _json_value(text: str) -> object:
    """``json.loads(text)``; every failure (syntax, an integer of more than 4300 digits, nesting deeper
    than the interpreter's recursion limit) is a ValueError with a one-line reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg} at column {exc.colno}" if exc.lineno == 1 else str(exc)) from None
    except ValueError as exc:
        raise ValueError(" ".join(str(exc).split(";")[0].split())) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _json(text: str, array_allowed: bool, path: Path, what: str) -> Table:
    """Rows of a JSON array of objects (``.json`` only) or of JSON lines."""
    blank = 0
    if array_allowed and text.lstrip().startswith("["):
        try:
            rows = _json_value(text)
        except ValueError as exc:
            raise ValueError(f"cannot read {what} {path}: not valid JSON ({exc})") from None
    else:
        rows = []
        lines = _LINE_END.split(text)
        if lines[-1] == "":  # the end of the last line
            lines.pop()
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                blank += 1
                continue
            try:
                rows.append(_json_value(line))
            except ValueError as exc:
                raise ValueError(f"cannot read {what} {path}: line {lineno} is not valid JSON ({exc})") from None
    if not all(isinstance(row, dict) for row in rows):
        raise ValueError(
            f"cannot read {what} {path}: it must hold JSON objects (one per line, or an array of objects)"
        )
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return Table(rows, list(columns), blank)


def _parquet(path: Path, what: str) -> Table:
    import pyarrow.parquet  # noqa: PLC0415 - a dependency of datasets, only needed here

    try:
        table = pyarrow.parquet.read_table(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure means a bad file for the user
        first = (str(exc).strip().splitlines() or [""])[0]
        raise ValueError(f"cannot read {what} {path} as Parquet: {type(exc).__name__}: {first}") from None
    return Table(table.to_pylist(), list(table.column_names))


def cell_text(value) -> str:
    """A raw cell as a string: None -> "", bool -> "0"/"1", numbers via str()."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    return str(value)


def read_table(path: str | Path, *, what: str = "data file") -> Table:
    """Read a CSV/TSV/JSON/JSON-lines/Parquet file (see the module docstring) into a :class:`Table`.

    ``what`` says what the file is for (``"MBPP file"``, ``"SFT data file"``) in error
    messages. Raises a one-line ``FileNotFoundError`` when ``path`` does not exist and a
    one-line ``ValueError`` when it is a folder, has an unsupported suffix, is malformed or
    holds no rows.
    """
    file = Path(path).expanduser()
    suffix, gzipped = _format(file, what)
    if not file.exists():
        raise FileNotFoundError(f"{what} not found: {file}")
    if not file.is_file():
        raise ValueError(f"{what} {file} is a folder, not a file")
    if suffix == ".parquet":
        table = _parquet(file, what)
    else:
        text = _text(file, gzipped, what)
        if not text.strip():
            raise ValueError(f"{what} {file} has no rows (the file is empty)")
        if suffix in (".csv", ".tsv"):
            table = _delimited(text, suffix == ".tsv", file, what)
        else:
            table = _json(text, suffix == ".json", file, what)
    if not table.rows:
        raise ValueError(f"{what} {file} has no rows")
    if not any(str(c).strip() for c in table.columns):  # an empty header line, or only {} records
        raise ValueError(f"{what} {file} has no column names (an empty header line, or only empty records)")
    if table.long_rows:
        n, lines = len(table.long_rows), list(table.long_rows.values())
        shown = ", ".join(map(str, lines[:5])) + (", ..." if n > 5 else "")
        logger.warning("%d row%s of %s %s %s more fields than the header (line%s %s): "
                       "quote text that holds the delimiter", n, "s" * (n != 1), what, file,
                       "have" if n != 1 else "has", "s" * (n != 1), shown)
    return table


def read_records(path: str | Path, *, what: str = "data file") -> list[dict]:
    """The records of a CSV/TSV/JSON/JSON-lines/Parquet file, one dict per row, in file order.

    The one local-file reader of the package: see :func:`read_table` for the errors.
    """
    return read_table(path, what=what).rows
