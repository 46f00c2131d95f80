"""Bad input never becomes a result: non-finite config values, too few classes, free-text labels,
incomplete checkpoints, undecodable files and NaN losses all fail (or are skipped) with one line."""

from __future__ import annotations

import logging

import pytest

from balora.config import ConfigError, load_config


@pytest.mark.parametrize("override, match", [
    ("regularizers.lambda_consistency=nan", "regularizers.lambda_consistency must be a finite number"),
    ("regularizers.lambda_svd=.inf", "regularizers.lambda_svd must be a finite number"),
    ("regularizers.temperature=inf", "regularizers.temperature must be a finite number"),
    ("train.learning_rate=nan", "train.learning_rate must be a finite number"),
    ("train.weight_decay=.nan", "train.weight_decay must be a finite number"),
    ("train.epochs=inf", "train.epochs must be a finite number"),
    ("adapter.alpha=-.inf", "adapter.alpha must be a finite number"),
    ("regularizers.focus_schedule=[1,2]", "regularizers.focus_schedule: a schedule is a name or a mapping"),
    ("regularizers.focus_schedule={kind: cosine, floor: abc}", "regularizers.focus_schedule.floor must be a number"),
    ("regularizers.consistency_schedule={kind: [1]}", "regularizers.consistency_schedule.kind must be a schedule name"),
])
def test_non_finite_and_mistyped_config_values_are_one_line_config_errors(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_one_class_is_refused_for_classification(tmp_path):
    from balora.data import load_classification_files

    train = _write(tmp_path / "train.csv", "text,label\na,pos\nb,pos\nc,pos\n")
    eval_ = _write(tmp_path / "eval.csv", "text,label\nd,pos\n")
    with pytest.raises(ValueError, match="at least two classes in the train split, found only 'pos'") as info:
        load_classification_files("one", train, eval_)
    assert "\n" not in str(info.value)
    _write(train, "text,label\na,pos\nb,neg\n")
    assert load_classification_files("two", train, eval_).num_labels == 2


def test_rows_with_more_fields_than_the_header_are_bad_rows(tmp_path, caplog):
    from balora.data import load_classification_files
    from balora.data.files import read_table

    train = _write(tmp_path / "train.csv",
                   "text,label\ngood one,pos\ntext, with a comma,neg\nfine,neg\nalso fine,pos,\n")
    eval_ = _write(tmp_path / "eval.csv", "text,label\nd,pos\n")
    table = read_table(train)
    assert table.long_rows == {1: 3}  # the trailing empty cell of line 5 is not a bad row
    with caplog.at_level(logging.WARNING, logger="balora"):
        task = load_classification_files("commas", train, eval_)
    assert task.label_names == ["neg", "pos"]  # not " with a comma"
    assert task.skipped == {"more fields than the header": 1}
    assert len(task.train) == 3
    messages = [r.getMessage() for r in caplog.records if r.name == "balora"]
    assert any("train.csv" in m and "more fields than the header (line 3)" in m for m in messages)


def test_a_free_text_label_column_is_refused_naming_the_file(tmp_path):
    from balora.data import load_classification_files

    rows = "".join(f"text {i},label number {i}\n" for i in range(60))
    train = _write(tmp_path / "train.csv", "text,label\n" + rows)
    eval_ = _write(tmp_path / "eval.csv", "text,label\ntext 0,label number 0\n")
    with pytest.raises(ValueError, match=r"train\.csv \(column 'label'\): the labels look like free text") as info:
        load_classification_files("free", train, eval_)
    assert "60 distinct labels in 60 rows" in str(info.value) and "\n" not in str(info.value)
    # many classes with several rows each (Reuters R52: 52 classes) are classes, not free text
    rows = "".join(f"text {i},class {i % 52}\n" for i in range(52 * 3))
    _write(train, "text,label\n" + rows)
    _write(eval_, "text,label\nd,class 0\n")
    assert load_classification_files("many", train, eval_).num_labels == 52


def test_undecodable_bytes_and_broken_sft_lines_name_the_file_and_line(tmp_path):
    from balora.data.files import read_records
    from balora.data.sft import load_sft_dataset

    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\nok,a\ncaf\xe9,b\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: not UTF-8 text \(line 3, byte"):
        read_records(latin)
    broken = _write(tmp_path / "sft.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "c", \n')
    with pytest.raises(ValueError, match=r"SFT data file .*sft\.jsonl: line 2 is not valid JSON") as info:
        load_sft_dataset(str(broken))
    assert "\n" not in str(info.value)
    latin_sft = tmp_path / "latin.jsonl"
    latin_sft.write_bytes('{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"SFT data file .*latin\.jsonl: not UTF-8 text \(line 2"):
        load_sft_dataset(str(latin_sft))


def test_resume_skips_an_incomplete_checkpoint_and_says_which(tmp_path, caplog):
    from balora.run_dir import last_checkpoint

    assert last_checkpoint(tmp_path) is None
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="balora"):
        assert last_checkpoint(tmp_path) == tmp_path / "checkpoints" / "checkpoint-4"
    skipped = [r.getMessage() for r in caplog.records if "incomplete checkpoint" in r.getMessage()]
    assert len(skipped) == 2 and "checkpoint-10 (no trainer_state.json)" in skipped[0]
    assert "checkpoint-6" in skipped[1]


def test_nan_logits_in_the_generation_objective_are_the_classification_error():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from balora.objectives.generation import GenerationObjective
    from balora.regularizers import formulas

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    ids = torch.randint(1, 64, (2, 6))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    objective = GenerationObjective()
    loss, _ = objective(model, inputs)
    assert torch.isfinite(loss)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(ValueError, match="^logits contains NaN or inf values$"):
        objective(model, inputs)  # a later step: the loss check
    with pytest.raises(ValueError, match="^logits contains NaN or inf values$"):
        GenerationObjective()(model, inputs)  # the first step: the head check
    with pytest.raises(ValueError, match="^student_logits contains NaN or inf values$"):  # classification's
        formulas.consistency_loss(torch.full((2, 3), float("nan")), torch.zeros(2, 3))


def test_a_failed_validation_leaves_no_run_directory(tiny_model_dir, task_files, tmp_path):
    from balora.runs import train_run

    train_file, eval_file = task_files
    one_class = _write(tmp_path / "one.csv", "text,label\na,pos\nb,pos\n")
    runs = tmp_path / "runs"

    def config(train):
        return load_config(None, [
            f"output_dir={runs}", f"model.name={tiny_model_dir}", "model.max_length=16", "data.task=files",
            f"data.train_file={train}", f"data.eval_file={eval_file}", "adapter.method=lora",
            "adapter.rank=2", "train.max_steps=1", "train.report_to=[]",
        ])

    with pytest.raises(FileNotFoundError, match="missing.csv"):
        train_run(config(tmp_path / "missing.csv"), progress=False)
    with pytest.raises(ValueError, match="at least two classes"):
        train_run(config(one_class), progress=False)
    assert not runs.exists() or not any(runs.iterdir())


# --------------------------------------------------------------------------- found by the fuzz pass (test_fuzz.py)


@pytest.mark.parametrize("override, match", [
    ("adapter.rank=", r"^adapter\.rank must be int, got None$"),  # was a TypeError ('<' with None)
    ("data.task=null", r"^data\.task must be str, got None$"),  # was an AttributeError
    ("output_dir=null", r"^output_dir must be str, got None$"),  # was accepted
    ("train.report_to=[1]", r"^train\.report_to must be a list of str, got the item 1$"),  # was accepted
    ("adapter.target_modules=[query, 2]", "adapter.target_modules must be a list of str, got the item 2"),
    ("model.name=[unclosed", r"^override 'model\.name=\[unclosed' is not valid YAML \(line 1, column 10\)"),
    ("train.learning_rate=" + "9" * 400, "train.learning_rate must be a finite number, got an integer beyond the float"),
    ("adapter.rank=" + "9" * 5000, r"^override 'adapter\.rank=9+\.\.\. is not valid YAML: Exceeds the limit \(4300 digits\)"),
    ("name=2024-02-30", r"^override 'name=2024-02-30' is not valid YAML: day is out of range for month$"),
    ("regularizers.focus_schedule={kind: cosine, 1: 2}", "regularizers.focus_schedule has the key 1; schedule fields"),
    ("model=0", r"^model must be a mapping, got int$"),  # was read as an empty section
])
def test_mistyped_overrides_found_by_the_fuzzer_are_one_line_config_errors(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_malformed_yaml_files_found_by_the_fuzzer_are_one_line_config_errors(tmp_path):
    config = tmp_path / "run.yaml"
    cases = [
        (b"- a list\n", ["train.epochs=2"], "the config must be a mapping of sections, got list"),
        (b"{1: 2}\n", [], r"unknown key\(s\) 1; known:"),
        (b"model: {true: x}\n", [], r"unknown key\(s\) model\.True; known: "),
        ("name: ok\nmodel: {name: caf\xe9}\n".encode("latin-1"), [], r"run\.yaml is not UTF-8 text \(line 2, byte"),
        (b"model: {name: " + b"[" * 3000 + b"]" * 3000 + b"}\n", [], r"run\.yaml is nested too deeply"),
    ]
    for data, overrides, match in cases:
        config.write_bytes(data)
        with pytest.raises(ConfigError, match=match) as info:
            load_config(config, overrides)
        assert "\n" not in str(info.value)
    config.write_text("model:\ntrain: {epochs: 2}\n")  # an empty section, then an override into it
    assert load_config(config, ["model.name=tiny"]).model.name == "tiny"


def test_json_lines_may_hold_unicode_line_separators(tmp_path):
    from balora.data.files import read_table

    text = '{"text": "a\u2028b", "label": 1}\r\n{"text": "c\x85d", "label": 2}\n\n{"text": "e", "label": 3}\n'
    table = read_table(_write(tmp_path / "d.jsonl", text))  # str.splitlines broke lines at U+2028 and U+0085
    assert [r["text"] for r in table.rows] == ["a\u2028b", "c\x85d", "e"] and table.blank_lines == 1


@pytest.mark.parametrize("line, match", [
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", r"line 2 is not valid JSON \(nested too deeply\)"),
    ('{"label": 1' + "0" * 5000 + "}", r"line 2 is not valid JSON \(Exceeds the limit \(4300 digits\)"),
])
def test_json_the_decoder_refuses_is_one_line_naming_the_file_and_line(tmp_path, line, match):
    from balora.data.files import read_table

    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=r"cannot read data file .*d\.jsonl: " + match) as info:
        read_table(path)  # was a RecursionError / a ValueError not naming the file
    assert "\n" not in str(info.value)


def test_an_empty_header_line_is_refused(tmp_path):
    from balora.data.files import read_table

    for name, text in (("d.csv", "\ntext,label\na,1\n"), ("d.jsonl", "{}\n{}\n")):
        with pytest.raises(ValueError, match=f"{name} has no column names"):
            read_table(_write(tmp_path / name, text))  # was rows of {} (an SFT set of 0 rows)


def test_classification_labels_and_cells_found_by_the_fuzzer(tmp_path):
    from balora.data import load_classification_files

    eval_ = _write(tmp_path / "eval.csv", "text,label\nd,1\n")
    task = load_classification_files("digits", _write(tmp_path / "t.csv", "text,label\na,\u00b2\nb,1\nc,1\n"), eval_)
    assert task.label_names == ["1", "\u00b2"]  # "²".isdigit() is True but int("²") failed
    rows = ['{"text": "a", "label": "1"}', '{"text": ["a list"], "label": "1"}', '{"text": "b", "label": {"x": 1}}',
            '{"text": "c", "label": "2"}']
    task = load_classification_files("typed", _write(tmp_path / "t.jsonl", "\n".join(rows)), eval_)
    assert task.skipped == {"not a text or number": 2} and task.train["text"] == ["a", "c"]  # was "['a list']"
    unusable = _write(tmp_path / "bad-eval.csv", "text,label\nd,9\n")
    with pytest.raises(ValueError, match=r"bad-eval\.csv: no usable rows left in the eval split"):
        load_classification_files("named", tmp_path / "t.csv", unusable)  # was "named: no usable rows ..."


def test_sft_columns_arrow_cannot_hold_name_the_file_column_and_row(tmp_path):
    from balora.data.sft import load_sft_dataset

    cases = [
        ('{"prompt": "a", "response": "b"}\n{"prompt": 1, "response": "c"}\n',
         r"column 'prompt': row 2 holds a value that cannot be stored with the rows before it \(Expected bytes"),
        ('{"prompt": "a", "response": "b", "n": 1' + "0" * 25 + "}\n", "column 'n': row 1 holds a value"),
        ('{"prompt": ' + "[" * 600 + "]" * 600 + ', "response": "b"}\n', "a value is nested too deeply"),
    ]
    for text, match in cases:  # were ArrowTypeError, OverflowError, RecursionError tracebacks
        path = _write(tmp_path / "sft.jsonl", text)
        with pytest.raises(ValueError, match=r"cannot read SFT data file .*sft\.jsonl: " + match) as info:
            load_sft_dataset(str(path))
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- validated before anything is loaded


class ModelLoaded(Exception):
    """Raised in place of loading a tokenizer or model: validation let the run through to the model."""


@pytest.fixture
def refuse_model_loading(monkeypatch):
    """Make every model or tokenizer load of a run raise :class:`ModelLoaded` (nothing is loaded)."""
    def refuse(*args, **kwargs):
        raise ModelLoaded

    for target in ("balora.runs_classification.load_tokenizer", "balora.runs_classification.load_sequence_classifier",
                   "balora.runs_generation.load_causal_lm"):
        monkeypatch.setattr(target, refuse)


def _files_config(tmp_path, *extra):
    from conftest import write_task_files

    train, eval_ = write_task_files(tmp_path)
    return [f"output_dir={tmp_path / 'runs'}", "data.task=files", f"data.train_file={train}",
            f"data.eval_file={eval_}", "adapter.method=lora", "train.max_steps=1", "train.report_to=[]", *extra]


def _no_run_directory(tmp_path) -> bool:
    runs = tmp_path / "runs"
    return not runs.exists() or not any(runs.iterdir())


def test_every_path_is_checked_before_a_model_is_loaded(tmp_path, refuse_model_loading):
    from balora.runs import train_run

    base = _files_config(tmp_path)
    with pytest.raises(ModelLoaded):  # the good config reaches the model: the checks below run earlier
        train_run(load_config(None, base), progress=False)
    cases = [
        ([f"data.train_file={tmp_path / 'missing.csv'}"], FileNotFoundError, "missing.csv"),
        ([f"data.eval_file={tmp_path / 'missing.csv'}"], FileNotFoundError, "missing.csv"),
        ([f"data.eval_file={tmp_path}"], ValueError, "unknown file extension"),
    ]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            train_run(load_config(None, base + extra), progress=False)
    assert _no_run_directory(tmp_path)


def test_a_missing_model_path_is_refused_before_a_run_directory(tmp_path):
    from balora.models import ModelLoadError
    from balora.runs import train_run

    sft = _write(tmp_path / "sft.jsonl", '{"prompt": "1+1?", "response": "2"}\n')
    missing = f"model.name={tmp_path / 'no-model'}"
    for overrides in (_files_config(tmp_path, missing),
                      [f"output_dir={tmp_path / 'runs'}", "family=generation", f"data.task={sft}", missing]):
        with pytest.raises(ModelLoadError, match="no-model") as info:
            train_run(load_config(None, overrides), progress=False)
        assert "\n" not in str(info.value)
    assert _no_run_directory(tmp_path)


def test_an_output_dir_that_is_a_file_is_refused_before_loading(tmp_path, refuse_model_loading):
    from balora.runs import train_run

    blocker = _write(tmp_path / "taken", "a file")
    for output_dir in (blocker, blocker / "below"):
        config = load_config(None, [*_files_config(tmp_path), f"output_dir={output_dir}"])
        with pytest.raises(ConfigError, match=f"output_dir={output_dir}: {blocker} is a file, not a folder"):
            train_run(config, progress=False)
    assert blocker.read_text() == "a file"


@pytest.mark.parametrize("override, match", [
    ("train.lr_scheduler=reduce_lr_on_plateau", "train.lr_scheduler must be one of"),
    ("train.lr_scheduler=cosine_with_min_lr", "train.lr_scheduler must be one of"),
    ("train.lr_scheduler=warmup_stable_decay", "train.lr_scheduler must be one of"),
    ("train.report_to=[tensorbord]", "train.report_to: unknown integration 'tensorbord'"),
])
def test_settings_transformers_refuses_late_are_config_errors(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_a_reporting_integration_that_is_not_installed_is_refused_before_loading(tmp_path, refuse_model_loading):
    from transformers.integrations import get_available_reporting_integrations

    from balora.runs import train_run

    if "wandb" in get_available_reporting_integrations():
        pytest.skip("wandb is installed here: no integration known to be missing")
    with pytest.raises(ConfigError, match=r"^train\.report_to: wandb is not installed \(pip install wandb\)$"):
        train_run(load_config(None, [*_files_config(tmp_path), "train.report_to=[wandb]"]), progress=False)
    assert _no_run_directory(tmp_path)


def test_generation_paths_are_checked_before_a_model_is_loaded(tmp_path, refuse_model_loading):
    from balora.runs import train_run

    sft = _write(tmp_path / "sft.jsonl", '{"prompt": "1+1?", "response": "2"}\n')
    base = [f"output_dir={tmp_path / 'runs'}", "family=generation", f"data.task={sft}", "adapter.method=lora",
            "train.max_steps=1", "train.report_to=[]"]
    with pytest.raises(ModelLoaded):
        train_run(load_config(None, base), progress=False)
    cases = [
        ([f"data.task={tmp_path / 'missing.jsonl'}"], FileNotFoundError, "missing.jsonl"),
        (["eval.benchmark=gsm8k", f"data.eval_file={tmp_path / 'test.jsonl'}"], FileNotFoundError, "test.jsonl"),
        ([f"eval.perplexity_corpus={tmp_path / 'missing.txt'}"], ValueError, "unknown perplexity corpus"),
    ]
    for extra, error, match in cases:
        with pytest.raises(error, match=match):
            train_run(load_config(None, base + extra), progress=False)
    assert _no_run_directory(tmp_path)


def test_a_resume_folder_is_checked_first(tmp_path, refuse_model_loading):
    from balora.runs import train_run

    folder = tmp_path / "runs" / "old"
    with pytest.raises(FileNotFoundError, match="is not a run directory"):
        train_run(None, resume=folder, progress=False)
    folder.mkdir(parents=True)
    _write(folder / "config.yaml", "model: {name: [unclosed\n")
    with pytest.raises(ConfigError, match=r"old/config\.yaml is not valid YAML \(line 2") as info:
        train_run(None, resume=folder, progress=False)
    assert "\n" not in str(info.value)
    _write(folder / "config.yaml", "train: {learning_rate: .nan}\n")
    with pytest.raises(ConfigError, match="train.learning_rate must be a finite number"):
        train_run(None, resume=folder, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"]


def test_an_unknown_key_with_a_line_break_is_named_on_one_line(tmp_path):
    """Found by the fuzzer: a YAML key of blank lines printed a two-line error."""
    from balora.config import ConfigError, load_config

    path = tmp_path / "bad.yaml"
    path.write_bytes(b"? '\n\n  '\n: null\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "\n" not in str(err.value) and "unknown key" in str(err.value)
