"""Batched generation: padding, ordering, stop strings, sampling, state restored, PEFT models."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from balora.data.sft import prompt_token_ids, render_messages, render_prompt
from balora.evaluation.generate import SamplingConfig, chat_reply, generate_texts, truncate_at_stop

# Prompt lengths differ a lot, and the input order is not the length order.
PROMPTS = [
    "Once upon a time",
    "hi",
    "The quick brown fox jumps over the lazy dog and then",
    "x y z",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY = SamplingConfig(max_new_tokens=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_causal_lm_dir)


@pytest.fixture(scope="module")
def model(tiny_causal_lm_dir):
    """The tiny Llama with large random layer weights.

    With its small initial weights the residual stream is dominated by the last token's
    embedding and the model mostly repeats the last prompt token, which would hide padding
    mistakes; large weights make the output depend on the whole prompt.
    """
    lm = LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lm.model.layers.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.5, generator=gen)
    return lm.eval()


@pytest.fixture(scope="module")
def one_by_one(model, tokenizer):
    """Greedy completions of PROMPTS generated one prompt at a time (no padding at all)."""
    return [generate_texts(model, tokenizer, [p], sampling=GREEDY, progress=False)[0] for p in PROMPTS]


def test_batched_greedy_equals_one_by_one(model, tokenizer, one_by_one):
    assert all(len(c) == 1 and c[0] for c in one_by_one)
    for batch_size in (len(PROMPTS), 2):  # one padded batch; several batches with a short last one
        batched = generate_texts(model, tokenizer, PROMPTS, sampling=GREEDY, batch_size=batch_size, progress=False)
        assert batched == one_by_one


def test_the_model_is_sensitive_to_wrong_padding(model, tokenizer, one_by_one):
    """Sanity check of the test model: right padding would change some greedy outputs."""
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="right")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    wrong = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert wrong != [c[0] for c in one_by_one]


def test_order_preserved_with_duplicates_and_reversed_input(model, tokenizer, one_by_one):
    prompts = PROMPTS[::-1] + [PROMPTS[1]]
    out = generate_texts(model, tokenizer, prompts, sampling=GREEDY, batch_size=3, progress=False)
    assert out == one_by_one[::-1] + [one_by_one[1]]
    assert generate_texts(model, tokenizer, [], progress=False) == []


def test_only_new_text_is_returned(model, tokenizer):
    prompt = PROMPTS[0]
    enc = tokenizer([prompt], return_tensors="pt", add_special_tokens=False)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    full = tokenizer.decode(out[0], skip_special_tokens=True)
    [[completion]] = generate_texts(model, tokenizer, [prompt], sampling=GREEDY, progress=False)
    assert full == prompt + completion and prompt not in completion


def test_stop_string_truncates_and_stops_early(model, tokenizer, one_by_one, monkeypatch):
    long_cfg = SamplingConfig(max_new_tokens=16)
    [[full]] = generate_texts(model, tokenizer, [PROMPTS[0]], sampling=long_cfg, progress=False)
    stop = full[len(full) // 3 : len(full) // 3 + 3]  # a piece from the middle of the completion
    assert stop.strip() and full.find(stop) > 0

    shapes = []
    real_generate = model.generate

    def spy(*args, **kwargs):
        assert kwargs["stop_strings"][0] == stop and kwargs["tokenizer"] is tokenizer
        out = real_generate(*args, **kwargs)
        shapes.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(model, "generate", spy)
    cfg = SamplingConfig(max_new_tokens=16, stop_strings=(stop, "text that never appears"))
    [[cut]] = generate_texts(model, tokenizer, [PROMPTS[0]], sampling=cfg, progress=False)
    assert cut == full[: full.find(stop)]
    assert shapes and shapes[0] < 16  # generate itself stopped early


def _prompt_ids(model, monkeypatch) -> list[list[int]]:
    """Spy on ``model.generate``: the unpadded prompt ids of every row it is given."""
    seen: list[list[int]] = []
    real_generate = model.generate

    def spy(*args, **kwargs):
        for ids, mask in zip(kwargs["input_ids"], kwargs["attention_mask"]):
            seen.append(ids[mask.bool()].tolist())
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    return seen


def test_default_tokenization_is_trainings(model, tiny_causal_lm_dir, monkeypatch):
    """Without a chat template the prompt gets the tokenizer's BOS, with one no extra special
    token: exactly the ids training put before each answer (``prompt_token_ids``)."""
    tok = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    tok.add_bos_token = True  # a tokenizer that adds a BOS (SmolLM2's does not)
    question = "What is 2 + 2?"
    seen = _prompt_ids(model, monkeypatch)

    chat = render_prompt(tok, question)
    generate_texts(model, tok, [chat], sampling=SamplingConfig(max_new_tokens=1), progress=False)
    assert seen[-1] == prompt_token_ids(tok, question) == tok(chat, add_special_tokens=False)["input_ids"]
    assert seen[-1][:2] != [tok.bos_token_id] * 2  # the template's <|im_start|> is not doubled

    tok.chat_template = None  # a base model: the Alpaca prompt, with the BOS training added
    alpaca = render_prompt(tok, question)
    generate_texts(model, tok, [alpaca], sampling=SamplingConfig(max_new_tokens=1), progress=False)
    assert seen[-1] == prompt_token_ids(tok, question)
    assert seen[-1] == [tok.bos_token_id] + tok(alpaca, add_special_tokens=False)["input_ids"]


def test_chat_reply_renders_like_training_and_is_greedy(model, tokenizer, monkeypatch):
    messages = [{"role": "user", "content": "Name a colour."}]
    prompt = render_messages(tokenizer, messages, add_generation_prompt=True)
    [[expected]] = generate_texts(model, tokenizer, [prompt], sampling=SamplingConfig(max_new_tokens=5),
                                  progress=False)
    seen = _prompt_ids(model, monkeypatch)
    assert chat_reply(model, tokenizer, messages, max_new_tokens=5) == expected.strip()
    assert seen == [tokenizer(prompt, add_special_tokens=False)["input_ids"]]


def test_truncate_at_stop_takes_the_earliest_stop():
    assert truncate_at_stop("a\nb END c", ["END", "\n"]) == "a"
    assert truncate_at_stop("a b", ["END"]) == "a b"
    assert truncate_at_stop("ENDx", ("END",)) == ""


def test_sampling_shape_and_seed_reproducible(model, tokenizer):
    prompts = PROMPTS[:3]
    cfg = SamplingConfig(max_new_tokens=4, do_sample=True, num_return_sequences=3, seed=7, top_k=50, top_p=0.9)
    rng_before = torch.get_rng_state()
    first = generate_texts(model, tokenizer, prompts, sampling=cfg, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random state is untouched
    assert len(first) == len(prompts) and all(len(c) == 3 for c in first)
    assert all(isinstance(t, str) for c in first for t in c)
    assert any(len(set(c)) > 1 for c in first)  # samples of one prompt differ
    again = generate_texts(model, tokenizer, prompts, sampling=cfg, batch_size=2, progress=False)
    assert again == first
    other = generate_texts(model, tokenizer, prompts, sampling=dataclasses.replace(cfg, seed=8),
                           batch_size=2, progress=False)
    assert other != first


def test_tokenizer_and_training_mode_restored(model, tokenizer, tiny_causal_lm_dir):
    tok = AutoTokenizer.from_pretrained(tiny_causal_lm_dir)
    tok.padding_side = "right"
    tok.pad_token = None  # a tokenizer without pad token: eos is borrowed for the call only
    assert tok.pad_token is None
    model.train()
    try:
        out = generate_texts(model, tok, PROMPTS[:3], sampling=GREEDY, progress=False)
        assert model.training and all(m.training for m in model.modules())
    finally:
        model.eval()
    assert tok.padding_side == "right" and tok.pad_token is None
    assert out == generate_texts(model, tokenizer, PROMPTS[:3], sampling=GREEDY, progress=False)
    generate_texts(model, tokenizer, PROMPTS[:2], sampling=GREEDY, progress=False)
    assert not model.training and tokenizer.padding_side == "right"


def test_peft_model_batched_equals_one_by_one(model, tokenizer, one_by_one):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(task_type="CAUSAL_LM", r=4))
    peft_model.train()
    batched = generate_texts(peft_model, tokenizer, PROMPTS, sampling=GREEDY, batch_size=3, progress=False)
    assert peft_model.training
    assert batched == one_by_one  # LoRA starts as the identity (B = 0)
    with torch.no_grad():  # a non-zero adapter changes the output, and batching still matches
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(1))
    batched = generate_texts(peft_model, tokenizer, PROMPTS, sampling=GREEDY, batch_size=3, progress=False)
    single = [generate_texts(peft_model, tokenizer, [p], sampling=GREEDY, progress=False)[0] for p in PROMPTS]
    assert batched == single and batched != one_by_one


def test_progress_bar(model, tokenizer, capsys):
    generate_texts(model, tokenizer, PROMPTS[:2], sampling=SamplingConfig(max_new_tokens=2), desc="answers")
    assert "answers" in capsys.readouterr().err
    generate_texts(model, tokenizer, PROMPTS[:2], sampling=SamplingConfig(max_new_tokens=2), progress=False)
    assert "answers" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(max_new_tokens=2.5), "max_new_tokens"),
        (dict(temperature=0.0, do_sample=True), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(num_return_sequences=0), "num_return_sequences"),
        (dict(num_return_sequences=2), "do_sample=True"),
        (dict(stop_strings=("",)), "stop_strings"),
        (dict(do_sample="yes"), "do_sample"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        SamplingConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_normalises_stop_strings():
    assert SamplingConfig(stop_strings="\n\n").stop_strings == ("\n\n",)
    assert SamplingConfig(stop_strings=["a", "b"]).stop_strings == ("a", "b")
    greedy = SamplingConfig(top_k=5, temperature=0.3).generate_kwargs()
    assert greedy["do_sample"] is False and "temperature" not in greedy and greedy["use_cache"] is True
    sample = SamplingConfig(do_sample=True, top_k=0, num_return_sequences=2).generate_kwargs()
    assert sample["top_k"] == 0 and sample["num_return_sequences"] == 2  # 0 = no top-k (not transformers' 50)


def test_bad_arguments(model, tokenizer):
    with pytest.raises(ValueError, match="single string"):
        generate_texts(model, tokenizer, "hello", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        generate_texts(model, tokenizer, ["hello"], batch_size=0, progress=False)
    with pytest.raises(ValueError, match="strings"):
        generate_texts(model, tokenizer, [["hello"]], progress=False)
