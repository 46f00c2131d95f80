"""SFT data formats -> chat messages, format detection, prompt rendering, and dataset sources."""

import json

import datasets
import pytest

from balora.data.hub import HubLoadError
from balora.data.sft import (
    ALPACA_PREAMBLE,
    SFT_DATASETS,
    ChatTemplateError,
    detect_format,
    load_sft_dataset,
    render_messages,
    render_prompt,
    to_messages,
)

CHATML_HEAD = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def chat_tokenizer(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(smollm2_tokenizer_dir):
    """The same tokenizer without a chat template (-> Alpaca fallback)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tok.chat_template = None
    return tok


# ------------------------------------------------------------------ to_messages


@pytest.mark.parametrize(
    ("record", "fmt", "expected"),
    [
        ({"instruction": "Add 2 and 3.", "input": "", "output": "5"}, "alpaca", [_u("Add 2 and 3."), _a("5")]),
        ({"instruction": "Add.", "input": None, "output": "5"}, "alpaca", [_u("Add."), _a("5")]),
        ({"instruction": "Add.", "input": "2 and 3", "output": "5"}, "alpaca", [_u("Add.\n\n2 and 3"), _a("5")]),
        ({"query": "What is 2+3?", "response": "2+3=5", "type": "GSM_AnsAug"}, "metamath",
         [_u("What is 2+3?"), _a("2+3=5")]),
        ({"query": "Write hi", "answer": "print('hi')", "lang": "python"}, "codefeedback",
         [_u("Write hi"), _a("print('hi')")]),
        ({"prompt": "P", "response": "R"}, "prompt_response", [_u("P"), _a("R")]),
        ({"question": "Q", "answer": "A"}, "prompt_response", [_u("Q"), _a("A")]),
        ({"messages": [{"role": "system", "content": "S"}, _u("U"), _a("A")]}, "chat",
         [{"role": "system", "content": "S"}, _u("U"), _a("A")]),
        ({"idx": "x1", "conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "U1"},
                                         {"from": "gpt", "value": "A1"}, {"from": "human", "value": "U2"},
                                         {"from": "gpt", "value": "A2"}]}, "sharegpt",
         [{"role": "system", "content": "S"}, _u("U1"), _a("A1"), _u("U2"), _a("A2")]),
    ],
)
def test_to_messages_each_format_explicit_and_auto(record, fmt, expected):
    assert to_messages(record, fmt) == expected
    assert to_messages(record) == expected  # "auto" detects the same format from the keys
    assert detect_format(record.keys()) == fmt


def test_single_turn_formats_put_a_system_field_first():
    record = {"query": "Q", "response": "R", "system": "Be terse."}
    assert to_messages(record) == [{"role": "system", "content": "Be terse."}, _u("Q"), _a("R")]
    assert to_messages({"query": "Q", "response": "R", "system": ""})[0] == _u("Q")


def test_none_values_become_empty_strings():
    assert to_messages({"query": "Q", "response": None}, "metamath") == [_u("Q"), _a("")]
    chat = {"messages": [_u("U"), {"role": "assistant", "content": None}]}
    assert to_messages(chat)[-1] == _a("")


def test_sharegpt_dict_of_lists_as_datasets_returns_legacy_sequences():
    record = {"conversations": {"from": ["human", "gpt"], "value": ["hi", "hello"]}}
    assert to_messages(record) == [_u("hi"), _a("hello")]


def test_sharegpt_rows_read_back_from_a_dataset():
    rows = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]
    ds = datasets.Dataset.from_list(rows)
    assert to_messages(ds[0]) == [_u("hi"), _a("hello")]


@pytest.mark.parametrize(
    ("record", "fmt", "match"),
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, "chat", "role must be one of"),
        ({"messages": []}, "chat", "non-empty list"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt", "speaker"),
        ({"conversations": "not a list"}, "sharegpt", "non-empty list"),
        ({"instruction": "x"}, "alpaca", "no field 'output'"),
        ({"query": "x", "response": "y"}, "codefeedback", "no field 'answer'"),
        ({"query": "x", "response": "y"}, "yaml", "unknown SFT format"),
    ],
)
def test_malformed_records_raise_one_line_value_errors(record, fmt, match):
    with pytest.raises(ValueError, match=match) as info:
        to_messages(record, fmt)
    assert "\n" not in str(info.value)


def test_detect_format_priority_and_error_lists_column_sets():
    # a MetaMathQA row also has 'original_question'; a chat row may carry other columns
    assert detect_format(["query", "response", "type", "original_question"]) == "metamath"
    assert detect_format(["messages", "prompt", "response"]) == "chat"
    with pytest.raises(ValueError) as info:
        detect_format(["text", "label"])
    message = str(info.value)
    assert "\n" not in message and "['label', 'text']" in message
    for fragment in ("instruction + output (alpaca)", "query + response (metamath)", "query + answer (codefeedback)",
                     "question + answer (prompt_response)", "conversations (sharegpt)", "messages (chat)"):
        assert fragment in message


# ------------------------------------------------------------------ rendering


def test_render_prompt_with_chatml_template(chat_tokenizer):
    text = render_prompt(chat_tokenizer, "What is 2+3?")
    assert text == CHATML_HEAD + "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    with_system = render_prompt(chat_tokenizer, "Hi", system="Be terse.")
    assert with_system == (
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_prompt_is_a_prefix_of_the_training_text(chat_tokenizer, plain_tokenizer):
    for tok in (chat_tokenizer, plain_tokenizer):
        for system in (None, "Answer in French."):
            prompt = render_prompt(tok, "Name a colour.", system=system)
            messages = ([{"role": "system", "content": system}] if system else []) + [_u("Name a colour."), _a("Rouge.")]
            full = render_messages(tok, messages)
            assert full.startswith(prompt) and full[len(prompt):].startswith("Rouge.")


def test_alpaca_fallback_text(plain_tokenizer):
    assert render_prompt(plain_tokenizer, "Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert render_prompt(plain_tokenizer, "Hi", system="You are a poet.") == (
        "You are a poet.\n\n### Instruction:\nHi\n\n### Response:\n"
    )
    full = render_messages(plain_tokenizer, [_u("Hi"), _a("Hello"), _u("Bye"), _a("Ciao")])
    assert full == (
        ALPACA_PREAMBLE + "\n\n### Instruction:\nHi\n\n### Response:\nHello<|im_end|>\n\n"
        "### Instruction:\nBye\n\n### Response:\nCiao<|im_end|>\n\n"
    )


def test_alpaca_fallback_needs_an_eos_token(plain_tokenizer):
    import copy

    tok = copy.deepcopy(plain_tokenizer)
    tok.eos_token = None
    with pytest.raises(ValueError, match="neither a chat template nor an eos token"):
        render_messages(tok, [_u("Hi"), _a("Hello")])


def test_template_errors_become_chat_template_errors(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ m['content'] }}{% endfor %}"
    )
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        render_prompt(tok, "Hi", system="S")


# ------------------------------------------------------------------ sources


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


ROWS = [{"query": f"q{i}", "response": f"r{i}"} for i in range(10)]


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def fake_load_dataset(path, *args, **kwargs):
        calls.append((path, kwargs.get("split")))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


@pytest.mark.parametrize(("alias", "hub_id"), sorted(SFT_DATASETS.items()))
def test_aliases_load_the_papers_hub_sets(fake_hub, alias, hub_id):
    ds = load_sft_dataset(alias.upper(), split="train")
    assert fake_hub == [(hub_id, "train")]
    assert len(ds) == len(ROWS)


def test_paper_hub_ids():
    assert SFT_DATASETS == {
        "metamathqa": "meta-math/MetaMathQA",
        "codefeedback": "m-a-p/CodeFeedback-Filtered-Instruction",
        "wizardlm-evol-instruct": "WizardLMTeam/WizardLM_evol_instruct_V2_196k",
    }


def test_other_hub_ids_pass_through_with_split(fake_hub):
    load_sft_dataset("someone/my-sft-set", split="validation")
    assert fake_hub == [("someone/my-sft-set", "validation")]


def test_max_examples_is_a_seeded_random_subset(fake_hub):
    a = load_sft_dataset("metamathqa", max_examples=4, seed=1)
    b = load_sft_dataset("metamathqa", max_examples=4, seed=1)
    c = load_sft_dataset("metamathqa", max_examples=4, seed=2)
    assert len(a) == 4 and a["query"] == b["query"]
    assert set(a["query"]) <= {r["query"] for r in ROWS}
    assert a["query"] != c["query"]
    assert a["query"] != [r["query"] for r in ROWS[:4]] or c["query"] != [r["query"] for r in ROWS[:4]]
    assert len(load_sft_dataset("metamathqa", max_examples=100)) == len(ROWS)
    with pytest.raises(ValueError, match="max_examples"):
        load_sft_dataset("metamathqa", max_examples=0)


def test_hub_failures_are_one_line_value_errors(monkeypatch):
    def failing(*args, **kwargs):
        raise FileNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(HubLoadError, match="nobody/nothing.*doesn't exist.*data.train_file") as info:
        load_sft_dataset("nobody/nothing")
    assert "\n" not in str(info.value)


def test_local_jsonl_json_parquet_and_csv(tmp_path):
    cache = str(tmp_path / "cache")
    jsonl = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    js = tmp_path / "d.json"
    js.write_text(json.dumps(ROWS), encoding="utf-8")
    parquet = tmp_path / "d.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(parquet))
    csv = tmp_path / "d.csv"
    datasets.Dataset.from_list(ROWS).to_csv(str(csv), index=False)
    for path in (jsonl, js, parquet, csv):
        ds = load_sft_dataset(str(path), cache_dir=cache)
        assert ds["query"] == [r["query"] for r in ROWS] and ds["response"] == [r["response"] for r in ROWS]
    sub = load_sft_dataset(str(jsonl), max_examples=3, seed=0, cache_dir=cache)
    assert len(sub) == 3 and set(sub["query"]) <= {r["query"] for r in ROWS}


def test_local_sharegpt_file_round_trips_to_messages(tmp_path):
    rows = [{"idx": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    ds = load_sft_dataset(str(_write_jsonl(tmp_path / "w.jsonl", rows)), cache_dir=str(tmp_path / "c"))
    assert to_messages(ds[0]) == [_u("hi"), _a("yo")]


@pytest.mark.parametrize(
    ("name", "content", "error", "match"),
    [
        ("missing.jsonl", None, FileNotFoundError, "SFT data file not found"),
        ("table.xlsx", "a,b\n1,2\n", ValueError, "unsupported SFT data file 'table.xlsx'"),
        ("broken.jsonl", '{"query": "q", "response": \n', ValueError, "cannot read SFT data"),
    ],
)
def test_bad_local_files_raise_one_line_errors(tmp_path, name, content, error, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=match) as info:
        load_sft_dataset(str(path), cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(info.value)


def test_unknown_bare_name_lists_the_aliases(fake_hub):
    with pytest.raises(ValueError, match="unknown SFT dataset 'metamath-qa'.*metamathqa") as info:
        load_sft_dataset("metamath-qa")
    assert "\n" not in str(info.value) and fake_hub == []
