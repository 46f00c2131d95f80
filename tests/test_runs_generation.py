"""Generation runs end to end on a tiny Llama: run directory, PEFT adapter round trip, resume, demo,
the run's score equal to ``balora evaluate``'s, perplexity, gradient checkpointing."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from balora.cli import main
from balora.config import load_config
from balora.runs import train_run


def _config(model_dir, tmp_path, method="balora", steps=4, **extra):
    overrides = [
        "family=generation", f"output_dir={tmp_path / 'runs'}", f"model.name={model_dir}", "model.max_length=96",
        "data.task=gsm-symbolic", "data.max_train_examples=16",
        f"adapter.method={method}", "adapter.rank=4", "adapter.target_modules=[q_proj,v_proj,up_proj]",
        f"train.max_steps={steps}", "train.save_steps=2", "train.logging_steps=1", "train.batch_size=2",
        "train.report_to=[]", "train.learning_rate=1e-2", "train.loss_chunk_size=16",
        "eval.max_examples=3", "eval.max_new_tokens=6", "eval.batch_size=3",
        *[f"{k}={v}" for k, v in extra.items()],
    ]
    if method == "balora" or method.endswith("+reg"):
        # every term active from step 0, so a 4-step run exercises all of them
        overrides += ["regularizers.consistency_schedule=constant", "regularizers.focus_schedule=constant"]
    return load_config(None, overrides)


def test_generation_run_directory_predictions_and_adapter_round_trip(tiny_causal_lm_dir, tmp_path, monkeypatch):
    import balora.runs as runs

    trained, probe = {}, torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])

    def keep_logits(model, *args):  # the trained model's outputs, before conversion to LoRA
        with torch.no_grad():
            trained["logits"] = model(input_ids=probe).logits
        return save_final(model, *args)

    save_final = runs.save_final
    monkeypatch.setattr(runs, "save_final", keep_logits)
    result = train_run(_config(tiny_causal_lm_dir, tmp_path), progress=False)
    run = result.run_dir
    for name in ("config.yaml", "metrics.json", "log_history.json", "loss_curve.png", "adapter",
                 "initial_adapter", "predictions.jsonl"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["method"] == "pissa+reg" and metrics["global_steps"] == 4
    assert metrics["benchmark"] == "gsm8k" and metrics["total"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["split"].startswith("by template")
    logged = [h for h in result.log_history if "task_loss" in h]
    assert logged and all(k in logged[0] for k in ("reg_consistency", "reg_diversity", "reg_svd", "lambda_svd"))
    predictions = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and {"question", "generated"} <= set(predictions[0])

    # the PiSSA adapter was converted to plain LoRA: it loads on the ORIGINAL model with PeftModel
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == tiny_causal_lm_dir
    assert not (run / "adapter" / "config.json").exists()  # a causal LM adapter: no classifier config
    card = (run / "adapter" / "README.md").read_text()
    assert "More Information Needed" not in card and "pipeline_tag: text-generation" in card
    assert "| λ1 schedule | constant |" in card and "| SVD solver | auto |" in card
    assert f"| accuracy | {metrics['accuracy']:.4f} |" in card and "| evaluation problems | 3 |" in card
    assert "balora train balora_config.yaml" in card and (run / "adapter" / "balora_config.yaml").is_file()
    base = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)
    model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    assert any("lora_A" in n for n, _ in model.named_parameters())
    # ... and reproduces the trained model exactly (which differs from the pre-trained one)
    with torch.no_grad():
        reloaded = model(input_ids=probe).logits
        pretrained = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir)(input_ids=probe).logits
    torch.testing.assert_close(reloaded, trained["logits"], atol=1e-4, rtol=1e-4)
    assert (reloaded - pretrained).abs().max() > 1e-3


def test_generation_resume_continues_from_the_last_checkpoint(tiny_causal_lm_dir, tmp_path):
    full = train_run(_config(tiny_causal_lm_dir, tmp_path / "a", method="lora+reg"), progress=False)
    crashed = tmp_path / "crashed"
    shutil.copytree(full.run_dir, crashed)
    for name in ("metrics.json", "log_history.json", "loss_curve.png", "predictions.jsonl"):
        (crashed / name).unlink()
    shutil.rmtree(crashed / "adapter")
    shutil.rmtree(crashed / "checkpoints" / "checkpoint-4")
    assert main(["train", "--resume", str(crashed), "--no-progress"]) == 0
    assert json.loads((crashed / "metrics.json").read_text())["global_steps"] == 4
    a = load_file(str(full.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(crashed / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


def test_math_demo_table(tiny_causal_lm_dir, tmp_path, capsys):
    argv = ["demo", "--task", "math", "--methods", "lora,balora", "--output-dir", str(tmp_path), "--no-progress",
            f"model.name={tiny_causal_lm_dir}", "model.max_length=96", "data.max_train_examples=8",
            "train.max_steps=2", "train.batch_size=2", "train.report_to=[]", "adapter.rank=2",
            "eval.max_examples=2", "eval.max_new_tokens=4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for method in ("pre-trained", "lora", "balora"):
        assert method in out
    demo_dir = next(tmp_path.glob("demo-gsm-symbolic*"))
    summary = json.loads((demo_dir / "summary.json").read_text())
    assert [r["method"] for r in summary] == ["pre-trained", "lora", "balora"]
    assert all(r["total"] == 2 for r in summary)
    assert (demo_dir / "comparison.png").exists()


def test_generation_user_errors_are_one_line(tiny_causal_lm_dir, tmp_path, capsys):
    argv = ["train", "family=generation", f"model.name={tiny_causal_lm_dir}", "data.task=/nonexistent/data.jsonl",
            f"output_dir={tmp_path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "nonexistent" in err


WORDS = "apples pears plums figs".split()


def _math_rows(n: int, offset: int) -> list[dict]:
    rows = []
    for i in range(offset, offset + n):
        a, b = i % 7 + 1, i % 5 + 2
        rows.append({"question": f"Tom has {a} {WORDS[i % 4]} and buys {b} more. How many {WORDS[i % 4]} now?",
                     "answer": f"{a} + {b} = {a + b}\n#### {a + b}"})
    return rows


def _write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def plain_causal_lm_dir(tiny_causal_lm_dir, tmp_path):
    """The tiny Llama with a tokenizer WITHOUT chat template that adds a BOS token (Alpaca prompts)."""
    from transformers import AutoTokenizer

    from balora.data.sft.formats import has_chat_template

    path = tmp_path / "plain-llama"
    AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).save_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    tokenizer.chat_template = None
    tokenizer.add_bos_token = True
    tokenizer.save_pretrained(path)
    reloaded = AutoTokenizer.from_pretrained(path)
    assert not has_chat_template(reloaded) and reloaded("x")["input_ids"][0] == reloaded.bos_token_id
    return str(path)


def test_run_score_equals_balora_evaluate_without_chat_template(plain_causal_lm_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, GenerationMixin

    from balora.data.sft.encode import prompt_token_ids
    from balora.evaluation.runner import RECORDS_FILE, run_evaluation

    train_file = _write_jsonl(tmp_path / "train.jsonl", _math_rows(12, 0))
    eval_file = _write_jsonl(tmp_path / "test.jsonl", _math_rows(5, 100))
    prompts: list[list[list[int]]] = []  # per generate() call: the unpadded prompt ids of each row
    generate = GenerationMixin.generate

    def recording_generate(self, input_ids=None, attention_mask=None, **kwargs):
        prompts.append([ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask)])
        return generate(self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", recording_generate)
    config = load_config(None, [
        "family=generation", f"output_dir={tmp_path / 'runs'}", f"model.name={plain_causal_lm_dir}",
        "model.max_length=96", f"data.task={train_file}", f"data.eval_file={eval_file}", "eval.benchmark=gsm8k",
        "eval.max_new_tokens=8", "eval.batch_size=2", "adapter.method=balora", "adapter.rank=4",
        "adapter.target_modules=[q_proj,v_proj]", "train.max_steps=3", "train.batch_size=4",
        "train.report_to=[]", "train.learning_rate=1e-2", "train.save_steps=3",
    ])
    run = train_run(config, progress=False)
    run_prompts, prompts[:] = [p for call in prompts for p in call], []
    metrics, out_dir = run_evaluation(None, run.run_dir, "gsm8k", output_dir=tmp_path / "eval", path=eval_file,
                                      max_new_tokens=8, batch_size=2, progress=False)
    eval_prompts = [p for call in prompts for p in call]

    tokenizer = AutoTokenizer.from_pretrained(plain_causal_lm_dir)
    questions = [r["question"] for r in _math_rows(5, 100)]
    expected = sorted(prompt_token_ids(tokenizer, q) for q in questions)  # the prompts training encoded
    assert expected[0][0] == tokenizer.bos_token_id
    assert sorted(run_prompts) == expected and sorted(eval_prompts) == expected
    assert run_prompts == eval_prompts  # same batches, same order
    run_records = [json.loads(line) for line in (run.run_dir / "predictions.jsonl").read_text().splitlines()]
    eval_records = [json.loads(line) for line in (out_dir / RECORDS_FILE).read_text().splitlines()]
    assert [r["question"] for r in run_records] == questions and run_records == eval_records
    for key in ("accuracy", "correct", "total", "no_answer", "benchmark"):
        assert metrics[key] == run.metrics[key], key
    assert run.metrics["total"] == 5 and run.metrics["headline_metric"] == "accuracy"


def test_perplexity_of_the_adapted_and_the_pretrained_model(tiny_causal_lm_dir, tmp_path):
    from transformers import AutoTokenizer

    from balora.evaluation.perplexity import sliding_window_perplexity

    corpus = tmp_path / "tales.txt"
    corpus.write_text("Once upon a time a miller had three sons and a cat. " * 12)
    config = _config(tiny_causal_lm_dir, tmp_path, method="pissa", steps=2, **{
        "eval.perplexity_corpus": str(corpus), "eval.perplexity_stride": 32})
    metrics = train_run(config, progress=False).metrics
    pretrained = sliding_window_perplexity(AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir),
                                           AutoTokenizer.from_pretrained(tiny_causal_lm_dir),
                                           [corpus.read_text()], stride=32, progress=False)
    # a PiSSA model's base holds W_res: the pre-trained model is measured through the run's teacher
    assert metrics["pretrained_perplexity"] == pytest.approx(pretrained.perplexity, rel=1e-4)
    assert abs(metrics["perplexity"] - metrics["pretrained_perplexity"]) > 1e-3
    assert metrics["perplexity_corpus"] == str(corpus) and metrics["perplexity_stride"] == 32


def test_gradient_checkpointing_and_length_grouping_train_the_same_adapter(tiny_causal_lm_dir, tmp_path, monkeypatch):
    import balora.runs as runs

    checkpointing = []

    def note(model, *args):
        checkpointing.append(model.base_model.model.is_activation_checkpointing)
        return save_final(model, *args)

    save_final = runs.save_final
    monkeypatch.setattr(runs, "save_final", note)
    grouped = {"train.group_by_length": "true"}  # both runs batch by length (SFT rows have input_ids)
    plain = train_run(_config(tiny_causal_lm_dir, tmp_path / "a", steps=2, **grouped), progress=False)
    checkpointed = train_run(_config(tiny_causal_lm_dir, tmp_path / "b", steps=2, **grouped,
                                     **{"train.gradient_checkpointing": "true"}), progress=False)
    assert checkpointing == [False, True]
    a = load_file(str(plain.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(checkpointed.run_dir / "adapter" / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)
