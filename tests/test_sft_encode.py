"""SFT encoding: exactly the response tokens are targets; truncation, drops, collation."""

import logging

import datasets
import pytest
import torch

from balora.data.sft import (
    ChatTemplateError,
    SFTCollator,
    encode_messages,
    encode_sft,
    prompt_token_ids,
    render_messages,
    render_prompt,
    to_messages,
)

IM_END = 2  # <|im_end|> = eos = pad of SmolLM2's tokenizer


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def plain_tok(smollm2_tokenizer_dir):
    """The same tokenizer with ``chat_template = None`` (Alpaca fallback)."""
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    t.chat_template = None
    return t


def _target_runs(tokenizer, enc):
    """Decoded text of each maximal run of consecutive target positions."""
    runs, current = [], []
    for token, label in zip(enc["input_ids"], enc["labels"]):
        if label != -100:
            assert label == token  # unshifted: a target carries its own token id
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(r) for r in runs]


def _first_target(enc):
    return next(t for t, label in enumerate(enc["labels"]) if label != -100)


# ------------------------------------------------------------------ masking, hand-made


def test_hand_made_single_turn_targets(tok):
    enc = encode_messages(tok, [_u("What is 2+3?"), _a("2+3 equals 5.")])
    ids, labels = enc["input_ids"], enc["labels"]
    assert enc["attention_mask"] == [1] * len(ids) and len(labels) == len(ids)
    # the sequence is the rendered conversation up to and including the response's <|im_end|>
    expected_text = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n2+3 equals 5.<|im_end|>"
    )
    assert ids == tok(expected_text, add_special_tokens=False)["input_ids"]
    assert _target_runs(tok, enc) == ["2+3 equals 5.<|im_end|>"]
    first = _first_target(enc)
    assert tok.decode(ids[first - 1]) == "\n"
    assert tok.decode(ids[first - 4 : first]) == "<|im_start|>assistant\n"
    assert all(label == -100 for label in labels[:first])
    assert ids[-1] == IM_END and labels[-1] == IM_END


def test_labels_match_a_naive_prompt_masked_reference(tok):
    """Reference: tokenize the prompt alone, mask that many tokens of the full text."""
    cases = [
        ("Solve 12*7.", "12*7 = 84. The answer is 84."),
        ("def add(a, b):", "def add(a, b):\n    return a + b\n"),
        ("Translate 'chat' to English.", " cat"),
        ("Multi\nline\nquestion?", "Line one.\n\nLine two: ```x = [1, 2]```"),
    ]
    for question, answer in cases:
        enc = encode_messages(tok, [_u(question), _a(answer)])
        prompt_ids = tok(render_prompt(tok, question), add_special_tokens=False)["input_ids"]
        full_ids = tok(render_prompt(tok, question) + answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids  # the naive reference is valid here
        assert enc["input_ids"] == full_ids
        assert enc["labels"] == [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
        assert prompt_token_ids(tok, question) == prompt_ids


def test_a_token_straddling_the_prompt_boundary_is_not_a_target(tok):
    """Leading whitespace of a response can merge with the header's newline into one token;
    that token starts in the prompt, so (as with prompt-length masking) it is not a target."""
    enc = encode_messages(tok, [_u("def add(a, b):"), _a("    return a + b")])
    first = _first_target(enc)
    assert tok.decode(enc["input_ids"][first - 1]) == "\n   "
    assert _target_runs(tok, enc) == [" return a + b<|im_end|>"]


def test_system_prompt_tokens_are_masked(tok):
    messages = [{"role": "system", "content": "You are a pirate."}, _u("Greet me."), _a("Ahoy!")]
    enc = encode_messages(tok, messages)
    assert _target_runs(tok, enc) == ["Ahoy!<|im_end|>"]
    text = tok.decode(enc["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")  # replaces the default one
    first = _first_target(enc)
    system_ids = tok("You are a pirate.", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"][3 : 3 + len(system_ids)] == system_ids and first > 3 + len(system_ids)
    assert enc["input_ids"][:first] == prompt_token_ids(tok, "Greet me.", system="You are a pirate.")


def test_multi_turn_last_vs_all_assistant(tok):
    messages = [_u("Hi there"), _a("Hello!"), _u("What is 2+2?"), _a("4"), _u("And 3+3?"), _a("6, of course.")]
    last = encode_messages(tok, messages, train_on="last")
    every = encode_messages(tok, messages, train_on="all_assistant")
    assert last["input_ids"] == every["input_ids"]
    assert _target_runs(tok, last) == ["6, of course.<|im_end|>"]
    assert _target_runs(tok, every) == ["Hello!<|im_end|>", "4<|im_end|>", "6, of course.<|im_end|>"]
    # each run starts right after the assistant header and the newline after <|im_end|> is not a target
    ids, labels = every["input_ids"], every["labels"]
    starts = [t for t in range(len(ids)) if labels[t] != -100 and labels[t - 1] == -100]
    assert [tok.decode(ids[s - 4 : s]) for s in starts] == ["<|im_start|>assistant\n"] * 3
    ends = [t for t in range(len(ids)) if labels[t] != -100 and (t + 1 == len(ids) or labels[t + 1] == -100)]
    assert [ids[e] for e in ends] == [IM_END] * 3
    assert [tok.decode(ids[e + 1]) for e in ends[:-1]] == ["\n", "\n"]


def test_text_after_the_last_response_is_dropped(tok):
    enc = encode_messages(tok, [_u("Q1"), _a("A1"), _u("dangling question")])
    assert _target_runs(tok, enc) == ["A1<|im_end|>"]
    assert enc["input_ids"][-1] == IM_END and "dangling" not in tok.decode(enc["input_ids"])


def test_no_assistant_message_and_bad_arguments(tok):
    with pytest.raises(ValueError, match="no assistant message"):
        encode_messages(tok, [_u("only a question")])
    with pytest.raises(ValueError, match="train_on"):
        encode_messages(tok, [_u("q"), _a("a")], train_on="everything")
    with pytest.raises(ValueError, match="max_length"):
        encode_messages(tok, [_u("q"), _a("a")], max_length=0)


def test_prefix_unstable_template_raises(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    # the generation prompt says "assistant" but finished assistant turns say "bot"
    t.chat_template = (
        "{% for m in messages %}{% set role = 'bot' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<|im_start|>' + role + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="prefix-stable"):
        encode_messages(t, [_u("q"), _a("a")])


def test_label_assignment_matches_a_naive_loop():
    """The binary-search labelling equals the obvious per-token loop on random layouts."""
    import random

    from balora.data.sft.encode import response_labels

    rng = random.Random(0)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, 60), 8))
        offsets = [(a, b) for a, b in zip([0] + cuts, cuts + [60])]
        offsets.insert(rng.randrange(len(offsets)), (0, 0))  # a zero-width added token
        ids = [rng.randrange(1000) for _ in offsets]
        points = sorted(rng.sample(range(61), 4))
        spans = [(points[0], points[1]), (points[2], points[3])]
        naive = [t if e > s0 and any(a <= s0 < b for a, b in spans) else -100 for t, (s0, e) in zip(ids, offsets)]
        assert response_labels(ids, offsets, spans) == naive


# ------------------------------------------------------------------ truncation


def test_truncation_cuts_the_end(tok):
    messages = [_u("Count."), _a("one two three four five six seven")]
    full = encode_messages(tok, messages)
    first = _first_target(full)
    cut = encode_messages(tok, messages, max_length=first + 2)
    assert cut["input_ids"] == full["input_ids"][: first + 2]
    assert cut["labels"] == full["labels"][: first + 2]
    assert len(cut["attention_mask"]) == first + 2
    assert tok.decode(cut["input_ids"][first:]) == "one two"
    assert encode_messages(tok, messages, max_length=first) is None  # only prompt tokens left


def test_all_assistant_keeps_an_example_while_any_response_token_survives(tok):
    messages = [_u("a"), _a("first answer"), _u("b " * 200), _a("second answer")]
    first_end = len(encode_messages(tok, messages[:2])["input_ids"])
    assert encode_messages(tok, messages, max_length=first_end, train_on="last") is None
    kept = encode_messages(tok, messages, max_length=first_end, train_on="all_assistant")
    assert _target_runs(tok, kept) == ["first answer<|im_end|>"]


# ------------------------------------------------------------------ Alpaca fallback


def test_alpaca_fallback_without_chat_template(plain_tok):
    enc = encode_messages(plain_tok, [_u("Add 2 and 3."), _a("The sum is 5.")])
    assert _target_runs(plain_tok, enc) == ["The sum is 5." + plain_tok.eos_token]
    first = _first_target(enc)
    prompt = render_prompt(plain_tok, "Add 2 and 3.")
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    assert plain_tok.decode(enc["input_ids"][:first]) == prompt
    assert enc["input_ids"][:first] == prompt_token_ids(plain_tok, "Add 2 and 3.")
    assert enc["input_ids"][-1] == plain_tok.eos_token_id


def test_alpaca_fallback_multi_turn_all_assistant(plain_tok):
    messages = [_u("Hi"), _a("Hello"), _u("Bye"), _a("Ciao")]
    enc = encode_messages(plain_tok, messages, train_on="all_assistant")
    eos = plain_tok.eos_token
    assert _target_runs(plain_tok, enc) == [f"Hello{eos}", f"Ciao{eos}"]
    assert plain_tok.decode(enc["input_ids"]) == render_messages(plain_tok, messages).rstrip()


# ------------------------------------------------------------------ encode_sft


def _warnings(caplog):
    return [r for r in caplog.records if r.name == "balora" and r.levelno == logging.WARNING]


def test_encode_sft_columns_ids_lengths_and_drops(tok, caplog):
    rows = [
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
        {"instruction": "Say nothing.", "input": "", "output": "   "},
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
        {"instruction": "Nothing here.", "input": None, "output": None},
        {"instruction": "Long. " + "please " * 60, "input": "", "output": "ok"},
    ]
    ds = datasets.Dataset.from_list(rows)
    prompt_len = len(prompt_token_ids(tok, rows[4]["instruction"]))
    with caplog.at_level(logging.WARNING, logger="balora"):
        enc, dropped = encode_sft(ds, tok, max_length=prompt_len, progress=False)
    assert dropped == {"empty response": 2, "no response token within max_length": 1}
    assert enc.column_names == ["input_ids", "attention_mask", "labels", "length", "example_id"]
    assert enc["example_id"] == [0, 2]
    assert enc["length"] == [len(x) for x in enc["input_ids"]]
    for row, example_id in zip(enc, enc["example_id"]):
        expected = encode_messages(tok, to_messages(rows[example_id]), max_length=prompt_len)
        assert {k: row[k] for k in expected} == expected
    (warning,) = _warnings(caplog)
    assert "dropped 3 of 5 rows" in warning.getMessage() and "2 empty response" in warning.getMessage()


def test_encode_sft_multi_turn_sharegpt_and_no_assistant(tok):
    rows = [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                           {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Ciao"}]},
        {"conversations": [{"from": "human", "value": "Anyone?"}]},
        {"conversations": [{"from": "robot", "value": "beep"}]},
    ]
    ds = datasets.Dataset.from_list(rows)
    enc, dropped = encode_sft(ds, tok, train_on="all_assistant", progress=False)
    assert dropped == {"no assistant message": 1, "malformed record": 1}
    assert _target_runs(tok, enc[0]) == ["Hello<|im_end|>", "Ciao<|im_end|>"]
    enc_last, _ = encode_sft(ds, tok, train_on="last", progress=False)
    assert _target_runs(tok, enc_last[0]) == ["Ciao<|im_end|>"]


def test_encode_sft_errors(tok):
    ds = datasets.Dataset.from_list([{"query": "q", "response": ""}])
    with pytest.raises(ValueError, match="no usable SFT examples"):
        encode_sft(ds, tok, progress=False)
    with pytest.raises(ValueError, match="cannot detect the SFT data format"):
        encode_sft(datasets.Dataset.from_list([{"text": "x"}]), tok, progress=False)
    with pytest.raises(ValueError, match="unknown SFT format"):
        encode_sft(ds, tok, format="jsonl", progress=False)


def test_encode_sft_progress_false_restores_progress_bars(tok):
    ds = datasets.Dataset.from_list([{"query": "q", "response": "r"}])
    initial = datasets.is_progress_bar_enabled()
    try:
        for state in (True, False):
            datasets.enable_progress_bars() if state else datasets.disable_progress_bars()
            encode_sft(ds, tok, progress=False)
            assert datasets.is_progress_bar_enabled() == state
    finally:
        datasets.enable_progress_bars() if initial else datasets.disable_progress_bars()


# ------------------------------------------------------------------ collator


def test_collator_right_pads_with_the_right_values():
    features = [
        {"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1], "labels": [-100, 6, 7], "length": 3, "example_id": 4},
        {"input_ids": [8], "attention_mask": [1], "labels": [8], "length": 1, "example_id": 9},
    ]
    batch = SFTCollator(pad_token_id=2)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "example_id"}
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["example_id"].tolist() == [4, 9]
    assert all(t.dtype == torch.long for t in batch.values())

    padded = SFTCollator(0, pad_to_multiple_of=4, label_pad_id=-1)(features)
    assert padded["input_ids"].shape == (2, 4) and padded["labels"].shape == (2, 4)
    assert padded["input_ids"][1].tolist() == [8, 0, 0, 0] and padded["labels"][1].tolist() == [8, -1, -1, -1]
    exact = SFTCollator(0, pad_to_multiple_of=3)(features)
    assert exact["input_ids"].shape == (2, 3)


def test_collator_without_example_id_or_mask_and_errors():
    batch = SFTCollator(0)([{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3], "labels": [-100]}])
    assert "example_id" not in batch
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]
    with pytest.raises(ValueError, match="same length"):
        SFTCollator(0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="pad token id"):
        SFTCollator(None)
    with pytest.raises(ValueError, match="empty batch"):
        SFTCollator(0)([])


def test_collated_batch_gives_response_only_causal_lm_loss(tok, tiny_causal_lm_dir):
    """HF's shifted loss on the collated batch == manual cross-entropy over response tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_causal_lm_dir).eval()
    rows = [{"query": "What is 2+3?", "response": "5"}, {"query": "Name a fruit.", "response": "An apple, a pear."}]
    enc, _ = encode_sft(datasets.Dataset.from_list(rows), tok, progress=False)
    batch = SFTCollator(tok.pad_token_id, pad_to_multiple_of=8)([enc[i] for i in range(len(enc))])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    scored = labels != -100
    manual = torch.nn.functional.cross_entropy(logits[scored], labels[scored])
    assert scored.sum().item() == sum(sum(1 for x in r if x != -100) for r in enc["labels"])
    assert torch.allclose(out.loss, manual, atol=1e-5)
