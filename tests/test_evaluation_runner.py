"""``balora evaluate``: model + adapter loading, the per-benchmark runners and the CLI layer."""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM

from balora import models
from balora.evaluation import chat_backends, generate, runner
from balora.evaluation import code as code_eval
from balora.evaluation import math as math_eval
from balora.evaluation.chat_backends import JudgeError
from balora.evaluation.cli import add_evaluate_parser, evaluate_options, format_metrics, run_evaluate
from balora.evaluation.code import CodeExecutionNotAllowed, CodeProblem
from balora.evaluation.mt_bench import eval_mt_bench
from balora.evaluation.perplexity import eval_perplexity, sliding_window_perplexity
from balora.data.sft.formats import render_messages, render_prompt

posix_only = pytest.mark.skipif(os.name != "posix", reason="the sandbox needs POSIX")

GSM_ROWS = [
    {"question": "Tom has 2 apples and buys 1 more. How many apples does he have?",
     "answer": "He has 2 + 1 = 3 apples.\n#### 3"},
    {"question": "A box holds 4 pens. How many pens are in 2 boxes?", "answer": "4 * 2 = 8\n#### 8"},
    {"question": "Sara had 10 sweets and ate 4. How many are left?", "answer": "10 - 4 = 6\n#### 6"},
]

HUMANEVAL_ROWS = [
    {"task_id": "Toy/0", "entry_point": "add",
     "prompt": 'def add(a, b):\n    """Return a + b."""\n',
     "canonical_solution": "    return a + b\n",
     "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"},
    {"task_id": "Toy/1", "entry_point": "double",
     "prompt": 'def double(xs):\n    """Every element times two."""\n',
     "canonical_solution": "    return [2 * x for x in xs]\n",
     "test": "def check(candidate):\n    assert candidate([1, 2]) == [2, 4]\n    assert candidate([]) == []\n"},
]

MT_BENCH_ROWS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it sad."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2 + 2?"], "reference": ["4"]},
]

TALE = (
    "Once upon a time there lived a king and a queen who had no children. Every day they said: "
    "ah, if only we had a child! But they never had one. It happened that once when the queen "
    "was bathing, a frog crept out of the water and said to her: your wish shall be fulfilled."
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and do not suffer when the CPU cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _lora(model_dir, init_b: float | None):
    """The tiny Llama with a rank-2 LoRA on q/v; B = 0 (PEFT's default) or N(0, init_b)."""
    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(model_dir)
    peft = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                           task_type="CAUSAL_LM"))
    if init_b is not None:
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, init_b, generator=gen)
    return peft.eval()


@pytest.fixture(scope="module")
def zero_b_adapter(tiny_causal_lm_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("zero-b-adapter")
    _lora(tiny_causal_lm_dir, None).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def trained_adapter(tiny_causal_lm_dir, tmp_path_factory):
    """(in-memory PeftModel, its saved adapter directory) with a non-zero B."""
    path = tmp_path_factory.mktemp("trained-adapter")
    peft = _lora(tiny_causal_lm_dir, 0.5)
    peft.save_pretrained(str(path))
    return peft, path


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "tale.txt"
    path.write_text(TALE, encoding="utf-8")
    return path


def _tiny_ids(tokenizer):
    return tokenizer(["Hello there, how are you?"], return_tensors="pt")["input_ids"]


# ----------------------------------------------------------------------------- loading


def test_adapter_directory_round_trip(tiny_causal_lm_dir, trained_adapter):
    peft, path = trained_adapter
    model, tokenizer = models.load_model_for_eval(tiny_causal_lm_dir, str(path))
    assert isinstance(model, PeftModel) and not model.training
    ids = _tiny_ids(tokenizer)
    with torch.no_grad():
        expected = peft(input_ids=ids).logits
        got = model(input_ids=ids).logits
        base = LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()(input_ids=ids).logits
    torch.testing.assert_close(got, expected)
    assert (got - base).abs().max() > 1e-4  # the adapter really changes the outputs


def test_run_directory_as_adapter(tiny_causal_lm_dir, trained_adapter, tmp_path):
    peft, path = trained_adapter
    run_dir = tmp_path / "math-balora-20250101-000000"
    (run_dir / "adapter").mkdir(parents=True)
    for f in path.iterdir():
        (run_dir / "adapter" / f.name).write_bytes(f.read_bytes())
    (run_dir / "config.yaml").write_text(yaml.safe_dump(
        {"family": "generation", "model": {"name": tiny_causal_lm_dir, "max_length": 64}}))
    source = models.resolve_model_source(None, run_dir)  # base model read from config.yaml
    assert source.base == tiny_causal_lm_dir and source.adapter_dir == run_dir / "adapter"
    model, tokenizer = models.load_model_for_eval(None, str(run_dir))
    ids = _tiny_ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft(input_ids=ids).logits)


def test_loading_user_errors(tmp_path, tiny_causal_lm_dir):
    with pytest.raises(ValueError, match="adapter directory not found"):
        models.resolve_model_source("smollm2", tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a PEFT adapter directory"):
        models.resolve_model_source("smollm2", tmp_path)
    run_dir = tmp_path / "r8-lora"
    (run_dir / "adapter").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"family": "classification", "model": {"name": "minilm"}}))
    with pytest.raises(ValueError, match="classification run"):
        models.resolve_model_source(None, run_dir)
    assert models.resolve_model_source(None, None).base == "smollm2"
    with pytest.raises(ValueError, match="unknown benchmark 'gsm9k'"):
        runner.run_evaluation(tiny_causal_lm_dir, None, "gsm9k", tmp_path)


# ----------------------------------------------------------------------------- math


def test_gsm8k_on_local_jsonl(tiny_causal_lm_dir, tmp_path):
    data = _write_jsonl(tmp_path / "gsm8k.jsonl", GSM_ROWS)
    metrics, out_dir = runner.run_evaluation(tiny_causal_lm_dir, None, "gsm8k", tmp_path / "runs", path=str(data),
                                             max_new_tokens=6, batch_size=2, progress=False)
    assert out_dir.parent == tmp_path / "runs" and out_dir.name.startswith("eval-gsm8k-")
    assert {"accuracy", "correct", "total", "no_answer", "benchmark", "model", "seconds"} <= set(metrics)
    assert metrics["total"] == 3 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["accuracy"] == pytest.approx(metrics["correct"] / 3)
    assert json.loads((out_dir / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    records = [json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()]
    assert [r["question"] for r in records] == [r["question"] for r in GSM_ROWS]
    assert all({"generated", "extracted", "gold", "correct"} <= set(r) for r in records)


def test_gsm8k_prompts_and_scoring(tiny_causal_lm_dir, tmp_path, monkeypatch):
    """The prompts are training's render_prompt; right / wrong / missing answers are counted."""
    data = _write_jsonl(tmp_path / "gsm8k.jsonl", GSM_ROWS)
    model, tokenizer = models.load_model_for_eval(tiny_causal_lm_dir, None)
    seen = {}

    def fake_generate(model, tokenizer, prompts, *, sampling, **kwargs):
        seen.update(prompts=prompts, sampling=sampling, kwargs=kwargs)
        return [["The answer is 3."], ["2 boxes hold 9 pens."], ["I do not know."]]

    monkeypatch.setattr(math_eval, "generate_texts", fake_generate)
    records = tmp_path / "records.jsonl"
    metrics = math_eval.eval_math(model, tokenizer, "gsm8k", path=data, max_new_tokens=7, progress=False,
                               records_path=records)
    assert seen["prompts"] == [render_prompt(tokenizer, r["question"]) for r in GSM_ROWS]
    assert seen["sampling"].do_sample is False and seen["sampling"].max_new_tokens == 7
    assert "add_special_tokens" not in seen["kwargs"]  # generate_texts applies training's rule
    assert (metrics["correct"], metrics["total"], metrics["no_answer"]) == (1, 3, 1)
    assert metrics["accuracy"] == pytest.approx(1 / 3)
    rows = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False]
    with pytest.raises(FileExistsError):  # records are never overwritten
        math_eval.eval_math(model, tokenizer, "gsm8k", path=data, progress=False, records_path=records)


def test_evaluate_math_scores_given_rows(tiny_causal_lm_dir, tmp_path, monkeypatch):
    """The one scorer takes rows (question, final_answer) from any source, e.g. a training run."""
    model, tokenizer = models.load_model_for_eval(tiny_causal_lm_dir, None)
    monkeypatch.setattr(math_eval, "generate_texts", lambda *a, **k: [["so 8"], ["it is 5"]])
    rows = [{"question": "4 * 2?", "final_answer": "8"}, {"question": "3 + 3?", "final_answer": "6"}]
    metrics = math_eval.evaluate_math(model, tokenizer, rows, "gsm8k", progress=False,
                                      records_path=tmp_path / "predictions.jsonl")
    assert metrics == {"benchmark": "gsm8k", "accuracy": 0.5, "correct": 1, "total": 2, "no_answer": 0}
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(r["question"], r["generated"], r["correct"]) for r in records] == [
        ("4 * 2?", "so 8", True), ("3 + 3?", "it is 5", False)]
    with pytest.raises(ValueError, match="unknown math benchmark"):
        math_eval.evaluate_math(model, tokenizer, rows, "gsm9k")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        math_eval.evaluate_math(model, tokenizer, rows, batch_size=0)


# ----------------------------------------------------------------------------- code


def test_code_refuses_without_opt_in_before_anything(tiny_causal_lm_dir, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("nothing may be generated or loaded without --allow-code-execution")

    monkeypatch.setattr(code_eval, "generate_texts", boom)
    monkeypatch.setattr(runner, "load_source", boom)
    monkeypatch.setattr(code_eval, "load_humaneval", boom)
    for benchmark in ("humaneval", "mbpp"):
        with pytest.raises(CodeExecutionNotAllowed, match="--allow-code-execution"):
            runner.run_evaluation(tiny_causal_lm_dir, None, benchmark, tmp_path / "runs")
        with pytest.raises(CodeExecutionNotAllowed):
            code_eval.eval_code(None, None, benchmark, allow_code_execution=False)
    assert not (tmp_path / "runs").exists()


@posix_only
def test_humaneval_random_model_fails_every_sample(tiny_causal_lm_dir, tmp_path):
    data = _write_jsonl(tmp_path / "toy.jsonl", HUMANEVAL_ROWS)
    metrics, out_dir = runner.run_evaluation(
        tiny_causal_lm_dir, None, "humaneval", tmp_path, path=str(data), samples=2, ks=(1, 2),
        allow_code_execution=True, max_new_tokens=8, timeout_s=5, progress=False)
    assert metrics["pass@1"] == 0.0 and metrics["pass@2"] == 0.0
    assert (metrics["n_problems"], metrics["n_samples"]) == (2, 4)
    assert sum(metrics["statuses"].values()) == 4 and "passed" not in metrics["statuses"]
    records = [json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["sample"]) for r in records] == [("Toy/0", 0), ("Toy/0", 1), ("Toy/1", 0), ("Toy/1", 1)]
    assert all(r["status"] != "passed" and r["error"] for r in records)


@posix_only
def test_humaneval_chat_replies_are_extracted_and_scored(tiny_causal_lm_dir, tmp_path, monkeypatch):
    """A fenced whole-function reply passes, a wrong one fails: pass@1 = 1/2."""
    data = _write_jsonl(tmp_path / "toy.jsonl", HUMANEVAL_ROWS)
    model, tokenizer = models.load_model_for_eval(tiny_causal_lm_dir, None)
    seen = {}

    def fake_generate(model, tokenizer, prompts, *, sampling, **kwargs):
        seen.update(prompts=prompts, sampling=sampling)
        good = "Sure!\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
        bad = "```python\ndef double(xs):\n    return xs\n```"
        return [[good], [bad]]

    monkeypatch.setattr(code_eval, "generate_texts", fake_generate)
    metrics = code_eval.eval_code(model, tokenizer, "humaneval", path=data, allow_code_execution=True,
                               timeout_s=5, progress=False, records_path=tmp_path / "r.jsonl")
    assert metrics["pass@1"] == pytest.approx(0.5)
    assert seen["sampling"].do_sample is False and seen["sampling"].stop_strings == ()
    assert seen["prompts"][0].startswith("<|im_start|>") and HUMANEVAL_ROWS[0]["prompt"] in seen["prompts"][0]
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert rows[0]["code"] == "def add(a, b):\n    return a + b\n" and rows[0]["status"] == "passed"
    with pytest.raises(ValueError, match="between 1 and samples=1"):
        code_eval.eval_code(model, tokenizer, "humaneval", path=data, ks=(1, 10), allow_code_execution=True)


def test_code_prompts_without_chat_template(smollm2_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    problem = CodeProblem("Toy/0", HUMANEVAL_ROWS[0]["prompt"], HUMANEVAL_ROWS[0]["test"], "add")
    chat = code_eval.code_prompt(tokenizer, problem)
    assert chat == render_prompt(tokenizer, code_eval.CODE_INSTRUCTIONS["humaneval"].format(prompt=problem.prompt))
    tokenizer.chat_template = None  # a base model: the raw prompt, cut at the next top-level line
    assert code_eval.code_prompt(tokenizer, problem) == problem.prompt
    greedy = code_eval._code_sampling(tokenizer, "humaneval", 1, 0.8, 64, seed=0)
    assert not greedy.do_sample and "\ndef " in greedy.stop_strings
    sampled = code_eval._code_sampling(tokenizer, "mbpp", 5, 0.6, 64, seed=0)
    assert (sampled.do_sample, sampled.num_return_sequences, sampled.temperature) == (True, 5, 0.6)
    assert "\nassert" in sampled.stop_strings


# ----------------------------------------------------------------------------- perplexity


def test_perplexity_zero_b_adapter_equals_pretrained(tiny_causal_lm_dir, zero_b_adapter, corpus_file, tmp_path):
    metrics, out_dir = runner.run_evaluation(tiny_causal_lm_dir, str(zero_b_adapter), "perplexity", tmp_path,
                                             corpus=str(corpus_file), stride=16, max_length=32, progress=False)
    assert metrics["perplexity"] > 1 and metrics["tokens"] > 32
    assert metrics["perplexity"] == pytest.approx(metrics["pretrained_perplexity"], rel=1e-6)
    rows = [json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()]
    assert [r["model"] for r in rows] == ["evaluated", "pre-trained"]


def test_perplexity_trained_adapter_reports_both(tiny_causal_lm_dir, trained_adapter, corpus_file):
    peft, path = trained_adapter
    model, tokenizer = models.load_model_for_eval(tiny_causal_lm_dir, str(path))
    metrics = eval_perplexity(model, tokenizer, str(corpus_file), stride=16, max_length=32, progress=False)
    base = LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()
    kwargs = dict(stride=16, max_length=32, progress=False)
    expected_base = sliding_window_perplexity(base, tokenizer, [TALE], **kwargs).perplexity
    expected_adapted = sliding_window_perplexity(peft, tokenizer, [TALE], **kwargs).perplexity
    assert metrics["pretrained_perplexity"] == pytest.approx(expected_base, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(expected_adapted, rel=1e-6)
    assert abs(metrics["perplexity"] - metrics["pretrained_perplexity"]) > 1e-3
    # the adapter is enabled again afterwards
    assert eval_perplexity(model, tokenizer, str(corpus_file), **kwargs)["perplexity"] == pytest.approx(
        expected_adapted, rel=1e-6)


class SwapTeacher:
    """A stand-in teacher whose pre-trained view is another model."""

    def __init__(self, pretrained):
        self.pretrained, self.entered = pretrained, 0

    @contextlib.contextmanager
    def active(self, model):
        self.entered += 1
        yield self.pretrained


def test_perplexity_measures_the_teacher_view(tiny_causal_lm_dir, trained_adapter, corpus_file):
    peft, _ = trained_adapter
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    other = LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(50.0)
    kwargs = dict(stride=16, max_length=32, progress=False)
    teacher = SwapTeacher(other.eval())
    metrics = eval_perplexity(peft, tokenizer, str(corpus_file), teacher=teacher, **kwargs)
    assert teacher.entered == 1
    assert metrics["pretrained_perplexity"] == pytest.approx(
        sliding_window_perplexity(other, tokenizer, [TALE], **kwargs).perplexity, rel=1e-6)
    without = eval_perplexity(peft, tokenizer, str(corpus_file), **kwargs)  # disable_adapter() instead
    assert abs(metrics["pretrained_perplexity"] - without["pretrained_perplexity"]) > 1e-3
    assert metrics["perplexity"] == pytest.approx(without["perplexity"], rel=1e-6)


def test_perplexity_of_an_in_memory_pissa_model_needs_the_teacher(tiny_causal_lm_dir, corpus_file):
    """PiSSA's base holds W_res = W - A0 B0: disabling the adapter is not the pre-trained model,
    the snapshot teacher is."""
    from balora.teacher import SnapshotTeacher

    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    kwargs = dict(stride=16, max_length=32, progress=False)
    original = sliding_window_perplexity(LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir).eval(), tokenizer,
                                         [TALE], **kwargs).perplexity
    pissa = get_peft_model(LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir), LoraConfig(
        r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa", task_type="CAUSAL_LM"))
    teacher = SnapshotTeacher(pissa)
    with torch.no_grad():  # a training step's worth of change to the adapter
        for name, param in pissa.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    with_teacher = eval_perplexity(pissa, tokenizer, str(corpus_file), teacher=teacher, **kwargs)
    assert with_teacher["pretrained_perplexity"] == pytest.approx(original, rel=1e-4)
    disabled = eval_perplexity(pissa, tokenizer, str(corpus_file), **kwargs)["pretrained_perplexity"]
    assert abs(disabled - original) > 1e-3 * original  # W_res alone is another model


# ----------------------------------------------------------------------------- MT-Bench


class FakeJudge:
    """Rates 7 when the judged answer is in the prompt, else 2."""

    def __init__(self):
        self.calls = []

    def complete(self, messages, *, max_tokens, temperature):
        self.calls.append(messages)
        return "Fine. Rating: [[7]]" if "[The Start of Assistant" in messages[1]["content"] else "Rating: [[2]]"


def test_mt_bench_with_a_judge_backend(tiny_causal_lm_dir, tmp_path, monkeypatch):
    questions = _write_jsonl(tmp_path / "question.jsonl", MT_BENCH_ROWS)
    model, tokenizer = models.load_model_for_eval(tiny_causal_lm_dir, None)
    prompts = []
    real = generate.generate_texts

    def spy(model, tokenizer, batch, **kwargs):
        prompts.extend(batch)
        return real(model, tokenizer, batch, **kwargs)

    monkeypatch.setattr(generate, "generate_texts", spy)
    judge = FakeJudge()
    metrics = eval_mt_bench(model, tokenizer, judge, path=questions, max_new_tokens=4, progress=False,
                                   records_path=tmp_path / "r.jsonl")
    assert len(judge.calls) == 3 and metrics["judged_turns"] == 3 and metrics["n_questions"] == 2
    assert metrics["per_turn"] == {"1": 7.0, "2": 2.0}
    assert metrics["mean_score"] == pytest.approx((7 + 2 + 7) / 3)
    assert prompts[0] == render_messages(tokenizer, [{"role": "user", "content": MT_BENCH_ROWS[0]["turns"][0]}],
                                         add_generation_prompt=True)
    assert MT_BENCH_ROWS[0]["turns"][0] in prompts[1] and MT_BENCH_ROWS[0]["turns"][1] in prompts[1]
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["question_id"], r["turn"]) for r in rows] == [(81, 1), (81, 2), (111, 1)]
    assert rows[2]["question"] == "What is 2 + 2?" and rows[2]["prompt"] == "single-ref"


class ScriptedJudge(FakeJudge):
    """FakeJudge whose n-th call (1-based) raises what ``failures[n]`` holds."""

    def __init__(self, failures):
        super().__init__()
        self.failures = failures

    def complete(self, messages, *, max_tokens, temperature):
        reply = super().complete(messages, max_tokens=max_tokens, temperature=temperature)
        if len(self.calls) in self.failures:
            raise self.failures[len(self.calls)]
        return reply


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_mt_bench_records_a_failed_judgment_and_goes_on(tiny_causal_lm_dir, tmp_path):
    questions = _write_jsonl(tmp_path / "question.jsonl", MT_BENCH_ROWS)
    judge = ScriptedJudge({2: JudgeError("http://judge/v1/chat/completions: HTTP 400: bad request")})
    metrics, out_dir = runner.run_evaluation(tiny_causal_lm_dir, None, "mt-bench", tmp_path / "runs", judge=judge,
                                             path=str(questions), max_new_tokens=4, progress=False)
    assert len(judge.calls) == 3  # the failure on call 2 did not stop the run
    assert (metrics["judged_turns"], metrics["failed"], metrics["unparsed"]) == (3, 1, 0)
    assert metrics["mean_score"] == pytest.approx(7.0) and metrics["per_turn"] == {"1": 7.0}
    judgments = _jsonl(out_dir / "judgments.jsonl")
    assert [(j["question_id"], j["turn"], j["status"]) for j in judgments] == [
        (81, 1, "rated"), (81, 2, "failed"), (111, 1, "rated")]
    assert judgments[1]["error"].endswith("HTTP 400: bad request") and judgments[1]["score"] is None
    answers = _jsonl(out_dir / "answers.jsonl")
    assert [(a["question_id"], len(a["answers"])) for a in answers] == [(81, 2), (111, 1)]
    records = _jsonl(out_dir / runner.RECORDS_FILE)
    assert [r["status"] for r in records] == ["rated", "failed", "rated"]


def test_mt_bench_resumes_a_stopped_run(tiny_causal_lm_dir, tmp_path, monkeypatch):
    questions = _write_jsonl(tmp_path / "question.jsonl", MT_BENCH_ROWS)
    opts = dict(path=str(questions), max_new_tokens=4, progress=False)
    judge = ScriptedJudge({1: JudgeError("judge: HTTP 503"), 3: RuntimeError("judge crashed")})
    with pytest.raises(RuntimeError, match="judge crashed"):
        runner.run_evaluation(tiny_causal_lm_dir, None, "mt-bench", tmp_path / "runs", judge=judge, **opts)
    (out_dir,) = (tmp_path / "runs").glob("eval-mt-bench-*")  # kept: it holds the saved records
    assert not (out_dir / "metrics.json").exists()
    answers_before = _jsonl(out_dir / "answers.jsonl")
    assert len(answers_before) == 2
    assert [j["status"] for j in _jsonl(out_dir / "judgments.jsonl")] == ["failed", "rated"]

    monkeypatch.setattr(generate, "generate_texts", lambda *a, **k: pytest.fail("saved answers are not redone"))
    judge = FakeJudge()
    metrics, resumed = runner.run_evaluation(tiny_causal_lm_dir, None, "mt-bench", tmp_path / "other",
                                             resume=out_dir, judge=judge, **opts)
    assert resumed == out_dir and not (tmp_path / "other").exists()
    assert len(judge.calls) == 2  # 81 turn 1 (failed before) and 111 turn 1 (never judged)
    assert (metrics["resumed_answers"], metrics["resumed_judgments"]) == (2, 1)
    assert (metrics["judged_turns"], metrics["failed"]) == (3, 0)
    assert metrics["mean_score"] == pytest.approx((7 + 2 + 7) / 3)
    assert _jsonl(out_dir / "answers.jsonl") == answers_before
    assert [(j["question_id"], j["turn"], j["status"]) for j in _jsonl(out_dir / "judgments.jsonl")] == [
        (81, 1, "failed"), (81, 2, "rated"), (81, 1, "rated"), (111, 1, "rated")]
    assert json.loads((out_dir / "metrics.json").read_text())["judged_turns"] == 3

    with pytest.raises(ValueError, match="finished run"):
        runner.run_evaluation(tiny_causal_lm_dir, None, "mt-bench", tmp_path, resume=out_dir, judge=judge, **opts)
    with pytest.raises(ValueError, match="mt-bench only"):
        runner.run_evaluation(tiny_causal_lm_dir, None, "perplexity", tmp_path, resume=out_dir)
    with pytest.raises(ValueError, match="no saved MT-Bench"):
        runner.run_evaluation(tiny_causal_lm_dir, None, "mt-bench", tmp_path, resume=tmp_path / "runs", judge=judge)
    other_questions = _write_jsonl(tmp_path / "q2.jsonl", [dict(MT_BENCH_ROWS[0], turns=["Other?", "More?"])])
    (out_dir / "metrics.json").unlink()
    with pytest.raises(ValueError, match="does not match the questions"):
        runner.run_evaluation(tiny_causal_lm_dir, None, "mt-bench", tmp_path, resume=out_dir, judge=judge,
                              **dict(opts, path=str(other_questions)))
    assert _parse(["evaluate", "mt-bench", "--resume", str(out_dir)]).resume == str(out_dir)


def test_openai_judge_without_key_fails_before_loading(tiny_causal_lm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(runner, "load_source", lambda source: pytest.fail("the model must not be loaded"))
    with pytest.raises(JudgeError, match="OPENAI_API_KEY"):
        runner.run_evaluation(tiny_causal_lm_dir, None, "mt-bench", tmp_path)
    with pytest.raises(ValueError, match="--judge-model"):
        chat_backends.make_judge("local")
    assert "localhost" in chat_backends.backend_name(chat_backends.make_judge("openai", "m", "http://localhost:8000/v1"))


# ----------------------------------------------------------------------------- run dirs and CLI


def test_output_directories_are_never_overwritten(tiny_causal_lm_dir, corpus_file, tmp_path):
    opts = dict(corpus=str(corpus_file), stride=32, max_length=32, progress=False)
    first, dir1 = runner.run_evaluation(tiny_causal_lm_dir, None, "perplexity", tmp_path, **opts)
    before = (dir1 / "metrics.json").read_text()
    second, dir2 = runner.run_evaluation(tiny_causal_lm_dir, None, "perplexity", tmp_path, **opts)
    assert dir1 != dir2 and dir1.parent == dir2.parent == tmp_path
    assert (dir1 / "metrics.json").read_text() == before
    assert first["perplexity"] == second["perplexity"] == first["pretrained_perplexity"]  # no adapter
    with pytest.raises(ValueError, match="option not valid for perplexity"):
        runner.run_evaluation(tiny_causal_lm_dir, None, "perplexity", tmp_path, samples=3, **opts)
    with pytest.raises(ValueError, match="unknown perplexity corpus"):  # fails after the directory exists
        runner.run_evaluation(tiny_causal_lm_dir, None, "perplexity", tmp_path, **dict(opts, corpus="nope"))
    assert sorted(tmp_path.glob("eval-perplexity-*")) == sorted([dir1, dir2])  # failed runs leave no directory


def _parse(argv):
    parser = argparse.ArgumentParser(prog="balora")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_run_evaluate_prints_table_and_directory(tiny_causal_lm_dir, zero_b_adapter, corpus_file, tmp_path,
                                                 capsys):
    args = _parse(["evaluate", "perplexity", "--model", tiny_causal_lm_dir, "--adapter", str(zero_b_adapter),
                   "--data", str(corpus_file), "--stride", "64", "--output-dir", str(tmp_path), "--no-progress"])
    assert run_evaluate(args) == 0
    out = capsys.readouterr().out
    (out_dir,) = tmp_path.glob("eval-perplexity-*")
    assert f"results: {out_dir}" in out
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert f"pretrained_perplexity  {metrics['pretrained_perplexity']:.4f}" in out
    assert metrics["options"]["stride"] == 64 and metrics["adapter"] == str(zero_b_adapter)


def test_cli_options_per_benchmark(tiny_causal_lm_dir):
    code = evaluate_options(_parse(["evaluate", "humaneval", "--samples", "10", "--allow-code-execution",
                                    "--timeout", "3", "--max-new-tokens", "99"]))
    assert code["ks"] == (1, 10) and code["allow_code_execution"] and code["timeout_s"] == 3.0
    assert code["max_new_tokens"] == 99 and code["samples"] == 10
    math = evaluate_options(_parse(["evaluate", "gsm8k", "--max-examples", "5", "--data", "x.jsonl"]))
    assert math == dict(path="x.jsonl", max_examples=5, batch_size=8, progress=True)
    judge = evaluate_options(_parse(["evaluate", "mt-bench", "--judge", "local", "--judge-model", "smollm2"]))
    assert (judge["judge"], judge["judge_model"], judge["max_questions"]) == ("local", "smollm2", None)
    with pytest.raises(ValueError, match="--corpus or --data"):
        evaluate_options(_parse(["evaluate", "perplexity", "--corpus", "wikitext-2", "--data", "a.txt"]))
    with pytest.raises(SystemExit):
        _parse(["evaluate", "gsm9k"])
    help_text = _parse_help()
    assert "--allow-code-execution" in help_text and "sandbox" in help_text
    assert format_metrics({"a": 0.5, "b": {"x": 1}, "options": {"z": 1}}) == "a    0.5000\nb.x  1"


def _parse_help() -> str:
    parser = argparse.ArgumentParser(prog="balora")
    sub = add_evaluate_parser(parser.add_subparsers(dest="command"))
    return " ".join(sub.format_help().split())


def test_full_fine_tuning_run_compares_with_its_base(tiny_causal_lm_dir, corpus_file, tmp_path):
    """A run of method ``full`` saves a whole model in adapter/; the base of config.yaml is the
    pre-trained model it is compared with."""
    run_dir = tmp_path / "math-full"
    tuned = LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir)
    with torch.no_grad():
        tuned.model.layers[0].mlp.down_proj.weight.mul_(50.0)
    tuned.save_pretrained(str(run_dir / "adapter"))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"family": "generation", "model": {"name": tiny_causal_lm_dir}}))
    source = models.resolve_model_source(None, run_dir)
    assert (source.base, source.adapter_dir, source.full_model_dir) == (tiny_causal_lm_dir, None, run_dir / "adapter")
    kwargs = dict(stride=16, max_length=32, progress=False)
    metrics, _ = runner.run_evaluation(None, run_dir, "perplexity", tmp_path / "runs", corpus=str(corpus_file),
                                       **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    base = LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()
    assert metrics["pretrained_perplexity"] == pytest.approx(
        sliding_window_perplexity(base, tokenizer, [TALE], **kwargs).perplexity, rel=1e-6)
    assert metrics["perplexity"] == pytest.approx(
        sliding_window_perplexity(tuned.eval(), tokenizer, [TALE], **kwargs).perplexity, rel=1e-6)
    assert abs(metrics["perplexity"] - metrics["pretrained_perplexity"]) > 1e-3


# ----------------------------------------------------------------------------- flags checked first


@pytest.mark.parametrize("flags, message", [
    (["--timeout", "nan"], "--timeout must be a finite number > 0"),
    (["--timeout", "inf"], "--timeout must be a finite number > 0"),
    (["--timeout", "0"], "--timeout must be a finite number > 0"),
    (["--temperature", "-0.5"], "--temperature must be a finite number > 0"),
    (["--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["--max-examples", "0"], "--max-examples must be an integer >= 1"),
    (["--max-new-tokens", "-3"], "--max-new-tokens must be an integer >= 1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--samples", "0"], "--samples must be an integer >= 1"),
    (["--stride", "0"], "--stride must be an integer >= 1"),
    (["--max-tokens", "1"], "--max-tokens must be an integer >= 2"),
    (["--data", "no/such/file.jsonl"], "--data no/such/file.jsonl: no such file"),
])
def test_cli_checks_every_flag_before_loading_anything(tmp_path, monkeypatch, flags, message):
    def boom(*args, **kwargs):
        raise AssertionError("a bad flag must be refused before any model is loaded")

    monkeypatch.setattr(runner, "load_source", boom)
    monkeypatch.setattr(runner, "resolve_model_source", boom)
    args = _parse(["evaluate", "humaneval", "--allow-code-execution", "--output-dir", str(tmp_path / "runs"), *flags])
    with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
        run_evaluate(args)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_cli_bad_flag_is_one_line_on_stderr(tmp_path, capsys):
    from balora.cli import main

    assert main(["evaluate", "gsm8k", "--timeout", "nan", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "balora: error: --timeout must be a finite number > 0, got nan"


def test_cli_refuses_root_without_isolation_before_loading(tmp_path, monkeypatch, capsys):
    from balora.evaluation import cli as eval_cli
    from balora.evaluation import sandbox

    if os.geteuid() != 0:
        pytest.skip("only root is refused")
    monkeypatch.setattr(sandbox, "_probe", lambda namespaced: (None, {"notes": ["simulated: no unshare"]}))
    seen = {}

    def fake_run_evaluation(model, adapter, benchmark, output_dir, **options):
        seen.update(options)
        summary = {**dict.fromkeys(sandbox.ISOLATION_KEYS, False), "unsafe_allow_root": True, "notes": ["simulated"]}
        return {"benchmark": benchmark, "pass@1": 0.0, "sandbox": summary}, tmp_path / "out"

    monkeypatch.setattr(eval_cli, "run_evaluation", fake_run_evaluation)
    args = ["evaluate", "humaneval", "--allow-code-execution", "--output-dir", str(tmp_path)]
    with pytest.raises(sandbox.IsolationUnavailable, match="--unsafe-allow-root"):
        run_evaluate(_parse(args))
    assert seen == {}  # nothing was loaded or run
    assert run_evaluate(_parse([*args, "--unsafe-allow-root"])) == 0
    assert seen["unsafe_allow_root"] is True
    out = capsys.readouterr().out
    assert "sandbox: pid_namespace=no read_only_fs=no unprivileged=no network_isolated=no seccomp=no " \
           "unsafe_allow_root=yes (simulated)" in out


@posix_only
def test_humaneval_cli_records_and_prints_the_isolation(tiny_causal_lm_dir, tmp_path, capsys):
    from balora.evaluation.sandbox import ISOLATION_KEYS, check_isolation

    data = _write_jsonl(tmp_path / "toy.jsonl", HUMANEVAL_ROWS)
    args = _parse(["evaluate", "humaneval", "--model", tiny_causal_lm_dir, "--data", str(data),
                   "--allow-code-execution", "--max-new-tokens", "8", "--timeout", "5",
                   "--output-dir", str(tmp_path / "runs"), "--no-progress"])
    assert run_evaluate(args) == 0
    (out_dir,) = (tmp_path / "runs").glob("eval-humaneval-*")
    metrics = json.loads((out_dir / "metrics.json").read_text())
    expected = check_isolation()
    assert {k: metrics["sandbox"][k] for k in ISOLATION_KEYS} == {k: expected[k] for k in ISOLATION_KEYS}
    records = [json.loads(line) for line in (out_dir / "records.jsonl").read_text().splitlines()]
    assert all(r["sandbox"]["pid_namespace"] == expected["pid_namespace"] for r in records) and len(records) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sandbox: ")]
    assert len(lines) == 1
    if os.uname().sysname == "Linux":  # the isolation this machine must give
        assert lines[0] == "sandbox: " + " ".join(f"{k}=yes" for k in ISOLATION_KEYS)
