"""A fuzz pass (Hypothesis) over the config loader, the data readers and ``balora train``.

Random YAML documents and ``key=value`` overrides, and random malformed CSV / TSV / JSON lines /
JSON bytes, never end in a traceback: the loader gives a valid config or a one-line ConfigError,
the readers give rows (bad rows skipped and counted) or a one-line error naming the file, and
``balora train`` on bad input exits with one line and leaves no run directory behind. Every bug
this module found has a plain regression test in test_bad_input.py.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import logging
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_bad_input import ModelLoaded, refuse_model_loading  # noqa: F401 - the fixture is used by name

from balora.config import SECTIONS, ConfigError, RunConfig, load_config

FUZZ = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# --------------------------------------------------------------------------- config documents

RUN_FIELDS = [f.name for f in dataclasses.fields(RunConfig) if f.name not in SECTIONS]
SECTION_FIELDS = {name: [f.name for f in dataclasses.fields(getattr(RunConfig(), name))] for name in SECTIONS}
ALL_KEYS = sorted({*RUN_FIELDS, *SECTIONS, *(k for keys in SECTION_FIELDS.values() for k in keys)})
#: Strings that mean something somewhere in a config, so that the fuzzer also reaches the cross-checks.
MEANINGFUL = [
    "lora", "pissa", "balora", "full", "dora", "pissa_niter_4", "lora+reg", "classification", "generation",
    "files", "gsm-symbolic", "reuters-r8", "sst2", "metamathqa", "constant", "cosine", "two_phase",
    "linear_warmup", "kl", "mse", "entropy", "covariance", "nuclear", "frobenius", "exact", "clamp", "fp16",
    "bf16", "gsm8k", "math", "alpaca", "chat", "grimm-tales", "tensorboard", "nan", "-.inf", "1e-4", "",
    "2024-02-30", "9" * 5000,  # scalars PyYAML's constructors refuse (an impossible date, > 4300 digits)
]

keys = st.one_of(st.sampled_from(ALL_KEYS + ["kind", "warmup_ratio", "floor"]), st.text(max_size=6),
                 st.integers(-3, 3), st.none(), st.booleans())
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10, 600), st.integers(), st.integers(min_value=10**300, max_value=10**320),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(MEANINGFUL), st.text(max_size=12),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(keys, inner, max_size=3)), max_leaves=8)


@st.composite
def documents(draw) -> object:
    """A config-like mapping (real sections and fields, random values), now and then not a mapping."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    doc = {}
    for key in draw(st.lists(st.one_of(st.sampled_from([*SECTIONS, *RUN_FIELDS]), keys), max_size=5)):
        if key in SECTIONS and draw(st.integers(0, 4)):
            fields = st.one_of(st.sampled_from(SECTION_FIELDS[key]), keys)
            doc[key] = draw(st.dictionaries(fields, values, max_size=4))
        else:
            doc[key] = draw(values)
    return doc


@st.composite
def yaml_bytes(draw) -> bytes:
    """A document as YAML, sometimes damaged: cut, spliced with YAML punctuation, deeply nested,
    with a byte-order mark, or not UTF-8."""
    text = yaml.safe_dump(draw(documents()), allow_unicode=True, sort_keys=False)
    damage = draw(st.sampled_from(["none"] * 6 + ["cut", "cut", "splice", "splice", "bom", "latin-1", "bytes", "deep"]))
    if damage == "cut":
        text = text[: draw(st.integers(0, len(text)))]
    elif damage == "splice":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(alphabet=":-[]{}&*!|>'\"%@`#,?\n\t \\", max_size=6)) + text[at:]
    elif damage == "deep":
        depth = draw(st.sampled_from([50, 2000]))  # within the limits, and beyond (slow: ~1 s)
        text = f"{draw(st.sampled_from(SECTIONS))}: {{name: {'[' * depth}1{']' * depth}}}\n"
    if damage == "bytes":
        return draw(st.binary(max_size=64))
    data = text.encode("utf-8")
    if damage == "bom":
        data = b"\xef\xbb\xbf" + data
    elif damage == "latin-1":
        data += "model: {name: caf\xe9}\n".encode("latin-1")
    return data


@st.composite
def overrides(draw) -> list[str]:
    """``key=value`` strings as the command line passes them: dotted real or random keys, values as
    YAML text (dumped values, random text with YAML punctuation, empty)."""
    items = []
    for _ in range(draw(st.integers(0, 4))):
        section = draw(st.sampled_from([*SECTIONS, "", *RUN_FIELDS]))
        field = draw(st.sampled_from(SECTION_FIELDS.get(section) or RUN_FIELDS)) if section in SECTIONS else ""
        key = draw(st.sampled_from([f"{section}.{field}", section or "name", f"{section}..{field}",
                                    f"{section}.{field}.x", draw(st.text(max_size=6))]))
        value = draw(st.one_of(
            st.builds(lambda v: yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix("..."),
                      values).map(lambda s: s.strip()),
            st.sampled_from(MEANINGFUL), st.text(max_size=10),
            st.text(alphabet="[]{}:,'\"!&*%@`\x00\t ", max_size=5),
        ))
        items.append(value if draw(st.integers(0, 14)) == 0 else f"{key}={value}")
    return items


def load_or_config_error(path, items) -> RunConfig | None:
    """``load_config(path, items)``: a RunConfig, or None after a one-line ConfigError naming what is wrong.

    A valid config must also survive what a run does with it: saved as config.yaml and read back
    by ``--resume``, it is the same config.
    """
    try:
        config = load_config(path, list(items))
    except ConfigError as err:
        message = str(err)
        assert message.strip() and "\n" not in message, repr(message)
        named = [*ALL_KEYS, "override", "config", "schedule", str(path)]
        assert any(name in message for name in named), message
        event(f"config error: {message.replace(str(path), '<file>').split(' ')[0]}")
        return None
    event("valid config")
    assert isinstance(config, RunConfig)
    with tempfile.TemporaryDirectory() as folder:  # as train_run saves it, and --resume reads it
        saved = Path(folder) / "config.yaml"
        saved.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        assert load_config(saved) == config
    return config


@FUZZ
@given(data=yaml_bytes(), items=overrides())
def test_random_yaml_and_overrides_load_or_fail_in_one_line(data, items):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_bytes(data)
        load_or_config_error(path, items)


@FUZZ
@given(items=overrides())
def test_random_overrides_alone_load_or_fail_in_one_line(items):
    load_or_config_error(None, items)


@settings(max_examples=60, deadline=None)
@given(doc=documents())
def test_a_document_and_the_same_values_as_overrides_agree(doc):
    """Overrides are a thin layer: ``section.key=value`` for every value gives what the file gives."""
    def plain(key) -> bool:  # a key an override can spell
        return isinstance(key, str) and key == key.strip() and key and "." not in key and "=" not in key

    if not isinstance(doc, dict) or not all(map(plain, doc)):
        return
    items = []
    for key, value in doc.items():
        nested = isinstance(value, dict) and value and all(map(plain, value))
        pairs = [(f"{key}.{k}", v) for k, v in value.items()] if nested else [(key, value)]
        items += [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
                  for k, v in pairs]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "run.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        from_file, from_items = load_or_config_error(path, []), load_or_config_error(None, items)
    assert (from_file is None) == (from_items is None)
    if from_file is not None:
        assert from_file == from_items


# --------------------------------------------------------------------------- data files

COLUMNS = ["text", "label", "text_pair", "prompt", "response", "instruction", "output", "messages",
           "conversations", "question", "answer", "query", "input", "system", ""]
#: Characters that break delimited and JSON text: delimiters, quotes, line ends (also U+2028, U+0085),
#: NUL, a byte-order mark, non-ASCII letters, "²" (a digit int() refuses).
NASTY = list(",;\t|\"'\n\r\\ \x00\ufeff\u2028\x85é€²٣") + ["pos", "neg", "1", "0", "-1", "2.5", "nan"]
cells = st.one_of(st.lists(st.sampled_from(NASTY), max_size=6).map("".join), st.text(max_size=6),
                  st.sampled_from(["pos", "neg", "1", "0", "a b c", ""]))


@st.composite
def delimited_text(draw, delimiter: str) -> str:
    """A header and rows, written by csv.writer (random quoting) or joined raw; rows of any length."""
    header = draw(st.lists(st.sampled_from(COLUMNS[:3]) | cells, max_size=4))
    if draw(st.booleans()):
        header = ["text", "label"] + header[:1]
    rows = draw(st.lists(st.lists(cells, max_size=5), max_size=8))
    if draw(st.integers(0, 9)) == 0:
        rows.append(["x" * draw(st.sampled_from([1000, 140_000])), "pos"])  # a huge field
    if draw(st.booleans()):
        out = io.StringIO()
        quoting = draw(st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL, csv.QUOTE_NONNUMERIC]))
        writer = csv.writer(out, delimiter=delimiter, quoting=quoting)
        for row in [header, *rows]:
            writer.writerow(row)
        return out.getvalue()
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    return end.join(delimiter.join(row) for row in [header, *rows]) + draw(st.sampled_from(["", end, end * 2]))


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True), cells),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["role", "content", "from",
                                                                                            "value", "x"]), inner,
                                                                         max_size=3)),
    max_leaves=6,
)
turns = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]),
                                        "content": cells}), max_size=3)
records = st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=4), st.one_of(json_values, turns), max_size=5)


@st.composite
def json_lines(draw) -> str:
    """JSON lines: objects, broken or cut lines, non-objects, blank lines, deep nesting, huge integers."""
    lines = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["object"] * 6 + ["cut", "not an object", "blank", "deep", "huge int", "text"]))
        if kind == "object":
            lines.append(json.dumps(draw(records), ensure_ascii=draw(st.booleans())))
        elif kind == "cut":
            line = json.dumps(draw(records))
            lines.append(line[: draw(st.integers(0, max(0, len(line) - 1)))])
        elif kind == "not an object":
            lines.append(json.dumps(draw(json_values)))
        elif kind == "blank":
            lines.append(draw(st.sampled_from(["", "  ", "\t"])))
        elif kind == "deep":
            depth = draw(st.integers(500, 5000))
            lines.append('{"text": ' + "[" * depth + "]" * depth + ', "label": 1}')
        elif kind == "huge int":
            lines.append('{"text": "a", "label": 1' + "0" * draw(st.sampled_from([20, 5000])) + "}")
        else:
            lines.append(draw(cells))
    return draw(st.sampled_from(["\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))


@st.composite
def json_array(draw) -> str:
    text = json.dumps(draw(st.lists(st.one_of(records, json_values), max_size=6)))
    return text[: draw(st.integers(0, len(text)))] if draw(st.integers(0, 3)) == 0 else text


@st.composite
def data_file(draw) -> tuple[str, bytes]:
    """(file name, bytes): one of the text formats, perhaps gzipped, perhaps damaged at the byte level."""
    suffix = draw(st.sampled_from([".csv", ".tsv", ".jsonl", ".json"]))
    if suffix == ".csv":
        text = delimited_text(",") if draw(st.integers(0, 3)) else delimited_text(draw(st.sampled_from(";|\t")))
        text = draw(text)
    elif suffix == ".tsv":
        text = draw(delimited_text("\t"))
    elif suffix == ".jsonl":
        text = draw(json_lines())
    else:
        text = draw(st.one_of(json_array(), json_lines()))
    data = text.encode("utf-8")
    damage = draw(st.sampled_from(["none"] * 5 + ["bom", "bad bytes", "binary", "empty"]))
    if damage == "bom":
        data = b"\xef\xbb\xbf" + data
    elif damage == "bad bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.sampled_from([b"\xff", b"\xe9", b"\x80abc", b"\xc3"])) + data[at:]
    elif damage == "binary":
        data = draw(st.binary(max_size=80))
    elif damage == "empty":
        data = b""
    if draw(st.integers(0, 7)) == 0:
        packed = gzip.compress(data)
        return f"data{suffix}.gz", packed[: draw(st.integers(0, len(packed)))] if draw(st.booleans()) else packed
    return f"data{suffix}", data


@st.composite
def classification_file(draw) -> tuple[str, bytes]:
    """A mostly well-formed labelled file (so that tasks do get built), with a few bad rows: unquoted
    delimiters, missing cells, empty texts or labels, blank lines, lists for texts, one label only."""
    labels = draw(st.sampled_from([["pos", "neg"], ["0", "1", "2"], ["1.5", "2.25"], ["pos"], ["a", "²"]]))
    rows = draw(st.lists(st.tuples(cells, st.sampled_from(labels) | cells, st.sampled_from(["ok"] * 5 + [
        "extra field", "short", "blank", "list"])), min_size=1, max_size=12))
    suffix = draw(st.sampled_from([".csv", ".tsv", ".jsonl"]))
    if suffix == ".jsonl":
        lines = [json.dumps({"text": [t] if bad == "list" else t, "label": y, "text_pair": "p"}) if bad != "blank"
                 else "" for t, y, bad in rows]
        return "files.jsonl", "\n".join(lines).encode()
    table = [["text", "label", "text_pair"]] + [
        {"extra field": [text, label, "p", "more"], "short": [text], "blank": []}.get(bad, [text, label, "p"])
        for text, label, bad in rows]
    if suffix == ".tsv":  # quoting off: a tab or a line end in a text is a field or a row of its own
        return "files.tsv", "".join("\t".join(row) + "\n" for row in table).encode()
    out = io.StringIO()
    csv.writer(out).writerows(table)
    return "files.csv", out.getvalue().encode()


def _one_line_naming(err: Exception, *paths: Path) -> str:
    message = str(err)
    assert message.strip() and "\n" not in message, repr(message)
    assert any(str(p) in message for p in paths), message
    return message


@pytest.fixture(autouse=True)
def _quiet_balora():
    """The readers' warnings on skipped rows are expected here by the thousand."""
    logger = logging.getLogger("balora")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


@FUZZ
@given(file=data_file())
def test_malformed_files_give_rows_or_one_line_naming_the_file(file):
    from balora.data.files import read_table

    name, data = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            table = read_table(path)
        except ValueError as err:
            message = _one_line_naming(err, path)
            if "not UTF-8" in message or "is not valid JSON" in message:
                assert "line " in message, message
            event("error")
            return
    event(f"{len(table.rows)} rows, {len(table.long_rows)} long")
    assert table.rows and all(isinstance(row, dict) for row in table.rows)
    if ".csv" in name or ".tsv" in name:
        assert all(list(row) == list(dict.fromkeys(table.columns)) for row in table.rows)
        assert all(0 <= i < len(table.rows) for i in table.long_rows)
    else:
        assert set().union(*table.rows) == set(table.columns)


GOOD_EVAL = "text,label,text_pair\nthe match,pos,p\nthe storm,neg,p\n"


@FUZZ
@given(train=st.one_of(classification_file(), classification_file(), data_file()),
       eval_=st.one_of(st.just(("eval.csv", GOOD_EVAL.encode())), classification_file(), data_file()),
       pair=st.booleans())
def test_malformed_classification_files_give_a_task_or_one_line_naming_a_file(train, eval_, pair):
    """A task whose every row is accounted for (kept, or skipped and counted), or a one-line error."""
    from balora.data import load_classification_files
    from balora.data.files import read_table

    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for split, (name, data) in (("train", train), ("eval", eval_)):
            paths.append(Path(folder) / f"{split}-{name}")
            paths[-1].write_bytes(data)
        try:
            task = load_classification_files("fuzz", *paths, text_pair_column="text_pair" if pair else None)
        except (ValueError, FileNotFoundError) as err:
            message = _one_line_naming(err, *paths)
            event(f"error: {message.split(': ', 1)[-1][:30]}")
            return
        event(f"task, skipped {sorted(task.skipped)}")
        tables = [read_table(p) for p in paths]
    rows = sum(len(t.rows) + t.blank_lines for t in tables)
    assert len(task.train) + len(task.eval) + sum(task.skipped.values()) == rows
    assert len(task.train) and len(task.eval)
    if task.label_names is not None:
        assert len(task.label_names) >= 2
        assert all(0 <= y < len(task.label_names) for y in [*task.train["label"], *task.eval["label"]])


@FUZZ
@given(file=data_file())
def test_malformed_sft_files_give_rows_or_one_line_naming_the_file(file):
    """load_sft_dataset keeps every record or names the file; each record converts or is a one-line error."""
    from balora.data.files import read_records
    from balora.data.sft import detect_format, load_sft_dataset, to_messages

    name, data = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        try:
            rows = load_sft_dataset(str(path))
        except (ValueError, FileNotFoundError) as err:
            _one_line_naming(err, path)
            event("error")
            return
        event("rows")
        assert len(rows) == len(read_records(path))
    try:
        detect_format(rows.column_names)
    except ValueError as err:
        assert "\n" not in str(err)
        return
    for row in rows:
        try:
            messages = to_messages(row)
        except ValueError as err:
            assert "\n" not in str(err)
            continue
        assert all(isinstance(m["content"], str) and m["role"] in ("system", "user", "assistant") for m in messages)


# --------------------------------------------------------------------------- balora train: never a run directory


@st.composite
def bad_runs(draw) -> tuple[list[str], tuple[str, bytes]]:
    """``balora train`` overrides and a training file, where the file or one setting is bad."""
    family = draw(st.sampled_from(["classification", "generation"]))
    file = draw(data_file())
    bad = draw(st.sampled_from(["file", "file", "setting", "missing", "output_dir"]))
    settings_ = []
    if bad == "setting":
        settings_ = [draw(st.sampled_from([
            "train.learning_rate=nan", "adapter.rank=", "train.lr_scheduler=reduce_lr_on_plateau", "model.name=",
            "train.report_to=[tensorbord]", "data.text_column=[1]", "regularizers.focus_schedule={1: 2}",
            "eval.perplexity_corpus=no-such-corpus", "data.max_train_examples=0", "train.epochs=1e400",
        ]))]
    return [f"family={family}", *settings_], file, bad


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=bad_runs())
def test_balora_train_on_bad_input_leaves_no_run_directory(run, refuse_model_loading, capsys):
    """The CLI in-process, its model loading refused: a bad setting, a missing file or an output_dir
    that is a file exits 2 with one line on stderr before any model is loaded; a fuzzed file does
    too, or is fine and reaches the model (and stops there). Never a run directory."""
    from balora.cli import main

    items, (name, data), bad = run
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        path = folder / name
        path.write_bytes(data)
        if bad == "missing":
            path.unlink()
        runs = folder / "runs"
        if bad == "output_dir":
            runs.write_text("a file")
        family = items[0].split("=")[1]
        source = ["data.task=files", f"data.train_file={path}", f"data.eval_file={folder / 'eval.csv'}"]
        if family == "generation":
            source = [f"data.task={path}"]
        (folder / "eval.csv").write_text(GOOD_EVAL)
        argv = ["train", "adapter.method=lora", "train.max_steps=1", "train.report_to=[]", *source, *items,
                f"output_dir={runs}", "--no-progress"]  # the fuzzed items after the defaults they may override
        capsys.readouterr()
        try:
            code = main(argv)
        except ModelLoaded:
            code = None  # valid input: the run got as far as the model
        event(f"{bad}: {'reached the model' if code is None else 'refused'}")
        err = capsys.readouterr().err
        if code is not None:
            assert code == 2, (argv, err)
            lines = [line for line in err.splitlines() if line.startswith("balora: error: ")]
            assert len(lines) == 1, err
        else:
            assert bad == "file", (argv, "was not refused before the model")
        if bad == "output_dir":
            assert runs.read_text() == "a file"
        else:
            assert not runs.exists() or not any(runs.iterdir()), argv
