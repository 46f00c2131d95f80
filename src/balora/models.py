"""Loading pre-trained models and tokenizers by short asset name, hub id or path."""

from __future__ import annotations

import logging

from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from balora.assets import resolve_model

logger = logging.getLogger("balora")


class ModelLoadError(RuntimeError):
    """The model could not be loaded; the message says why and what to do."""


def load_tokenizer(name: str):
    """The tokenizer of a model (short asset name, hub id or local path)."""
    path = resolve_model(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise ModelLoadError(_explain(name, path, err)) from None


def load_sequence_classifier(
    name: str,
    num_labels: int,
    label_names: list[str] | None = None,
    problem_type: str = "single_label_classification",
) -> PreTrainedModel:
    """A pre-trained encoder with a fresh classification head of ``num_labels`` outputs.

    ``problem_type`` "regression" (``num_labels == 1``) makes the model use MSE as task loss.
    """
    path = resolve_model(name)
    # A checkpoint that already has a head of another size (e.g. an MNLI model reused for R8)
    # gets a fresh head instead of a size-mismatch error.
    kwargs = dict(num_labels=num_labels, problem_type=problem_type, ignore_mismatched_sizes=True)
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {label: i for i, label in enumerate(label_names)}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except OSError as err:
        raise ModelLoadError(_explain(name, path, err)) from None
    model.config.name_or_path = name if path == name else path
    return model


def _explain(name: str, path: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if path == name:
        return (
            f"could not load model {name!r}: {first}. Use a local directory, a hub id with the "
            "internet, or a short offline name such as 'minilm'"
        )
    return f"could not load model {name!r} from {path}: {first}"
