"""Load a balora classification adapter WITH its labels, with plain transformers + PEFT (no balora).

balora saves a classification adapter with a ``config.json`` beside ``adapter_config.json``: the
model's transformers config, whose ``id2label`` names the classes the run was trained on (in
the run's order, which need not be the order the names first appear in the data). Give that
config to ``from_pretrained`` and the head has the right size and the names; the adapter's
``base_model_name_or_path`` is the base model (a hub id for balora's packaged models)::

    python examples/load_adapter.py --adapter runs/<run>/adapter "the bank raised its rate" "rain tonight"
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftConfig, PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer


def load(adapter: str, base: str | None = None):
    """``(model, tokenizer)``: the base model with the adapter on top and the run's labels."""
    config = AutoConfig.from_pretrained(adapter)  # id2label, label2id, num_labels, problem_type
    base = base or PeftConfig.from_pretrained(adapter).base_model_name_or_path
    model = AutoModelForSequenceClassification.from_pretrained(base, config=config)
    model = PeftModel.from_pretrained(model, adapter).eval()
    saved_tokenizer = (Path(adapter) / "tokenizer_config.json").is_file()  # balora runs save the one they used
    return model, AutoTokenizer.from_pretrained(adapter if saved_tokenizer else base)


def predict(model, tokenizer, texts: list[str]) -> list[str]:
    """The predicted label name of each text."""
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**batch).logits.argmax(-1).tolist()
    return [model.config.id2label[i] for i in ids]


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description="predict label names with a balora classification adapter")
    parser.add_argument("--adapter", required=True, help="the adapter directory (runs/<run>/adapter)")
    parser.add_argument("--base", help="base model: hub id or local directory (default: the adapter's base model)")
    parser.add_argument("texts", nargs="+", help="texts to classify")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.adapter, args.base)
    names = predict(model, tokenizer, args.texts)
    for name, text in zip(names, args.texts):
        print(f"{name}\t{text}")
    return names


if __name__ == "__main__":
    main()
