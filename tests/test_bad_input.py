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
