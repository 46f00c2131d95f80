"""Feature-space measures of the imbalance study (paper 3.2.3, Figure 3, Appendix C.6 Table 12).

* :func:`silhouette_metrics`: the global and the minority-class silhouette score of the logits
  with cosine distance (``sklearn.metrics.silhouette_score`` / ``silhouette_samples``, labels =
  the true classes), computed in the full logit space, before any projection (C.6).
* :func:`imbalance_metrics`: those two plus the minority class's recall, read from
  :func:`balora.evaluation.classification.classification_metrics` (the one home of per-class
  recall and F1).
* :func:`final_layer_features`: the first-token ([CLS]) vector of the last hidden layer of a
  sequence classifier, the features the paper projects with t-SNE (B, "t-SNE Visualization");
  :func:`classifier_logits`: its logits, the same batched pass (scoring saved or merged adapters).
* :func:`plot_tsne`: 2-D t-SNE (``sklearn.manifold.TSNE``, perplexity 30, seed 42) of such
  features, one panel per method, points coloured by class, saved as PNG.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "FEATURES_FILE",
    "TSNE_PERPLEXITY",
    "classifier_logits",
    "TSNE_SEED",
    "final_layer_features",
    "imbalance_metrics",
    "plot_tsne",
    "silhouette_metrics",
    "tsne_embedding",
]

#: The run directory's file of the evaluation split's final-layer features, (N, d) float32, in order.
FEATURES_FILE = "features.npy"
#: The paper's t-SNE settings (Appendix B): perplexity 30, seed 42.
TSNE_PERPLEXITY = 30.0
TSNE_SEED = 42


def _silhouette_defined(labels: np.ndarray) -> bool:
    """sklearn's condition: 2 <= number of distinct labels <= number of samples - 1."""
    return 2 <= np.unique(labels).size <= labels.size - 1


def silhouette_metrics(logits: np.ndarray, labels: Sequence[int], minority: int | None = None) -> dict[str, float]:
    """Silhouette scores of ``logits`` (N, D) grouped by the true ``labels`` (N,), cosine distance.

    ``silhouette``: the mean silhouette over all N points; ``minority_silhouette`` (when
    ``minority`` is a class id): the mean silhouette of that class's points, i.e. how well its
    cluster is isolated from the nearest other class. A score that is undefined (fewer than 2
    classes present, or as many classes as points, or no point of the minority class) is
    ``nan``; a point whose logit vector is all zeros has no cosine distance (sklearn gives nan).
    """
    from sklearn.metrics import silhouette_samples

    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).ravel()
    if x.ndim != 2 or x.shape[0] != y.size:
        raise ValueError(f"logits must be (N, D) with N = len(labels) = {y.size}, got shape {x.shape}")
    per_point = silhouette_samples(x, y, metric="cosine") if _silhouette_defined(y) else np.full(y.size, np.nan)
    out = {"silhouette": float(per_point.mean()) if y.size else float("nan")}
    if minority is not None:
        mask = y == minority
        out["minority_silhouette"] = float(per_point[mask].mean()) if mask.any() else float("nan")
    return out


def imbalance_metrics(logits: np.ndarray, labels: Sequence[int], label_names: Sequence[str], minority: str,
                      scores: Mapping[str, float]) -> dict:
    """Table 12's numbers for one evaluation split: ``silhouette``, ``minority_silhouette``,
    ``minority_recall`` and ``minority_class`` (its name).

    ``logits`` (N, D) and ``labels`` (N,) as in :func:`silhouette_metrics`; ``minority`` the name
    of the class with the fewest TRAINING examples; ``scores`` the split's
    :func:`~balora.evaluation.classification.classification_metrics` (its ``recall/<minority>``).
    """
    names = list(label_names)
    if minority not in names:
        raise ValueError(f"minority class {minority!r} is not one of the classes: {', '.join(names)}")
    out: dict = silhouette_metrics(logits, labels, names.index(minority))
    out["minority_recall"] = float(scores[f"recall/{minority}"])
    out["minority_class"] = minority
    return out


@torch.no_grad()
def _per_row(model, dataset, collator, batch_size: int, take) -> np.ndarray:
    """``take(model outputs)`` (B, k) of every batch of an encoded ``dataset``, in order, in eval
    mode: (N, k) float32. ``dataset``: rows with ``input_ids``, ``attention_mask`` (and
    ``token_type_ids``), padded per batch by ``collator``."""
    inputs = [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in dataset.column_names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = []
    try:
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset)))).select_columns(inputs)
            batch = {k: v.to(device) for k, v in collator(list(rows)).items() if k in inputs}
            chunks.append(take(model, batch).float().cpu().numpy())  # (B, k)
    finally:
        model.train(was_training)
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)


def final_layer_features(model, dataset, collator, batch_size: int = 64) -> np.ndarray:
    """The last hidden layer's first-token vector ([CLS]) of every row of an encoded ``dataset``.

    ``model``: a (PEFT-wrapped) sequence classifier; ``dataset``: rows with ``input_ids``,
    ``attention_mask`` (and ``token_type_ids``), padded per batch by ``collator``.
    Returns (N, d) float32 in the dataset's order, d = the model's hidden size.
    """
    return _per_row(model, dataset, collator, batch_size,
                    lambda m, batch: m(**batch, output_hidden_states=True).hidden_states[-1][:, 0])  # (B, d)


def classifier_logits(model, dataset, collator, batch_size: int = 64) -> np.ndarray:
    """The logits (N, D) of a (PEFT-wrapped) sequence classifier for every row of an encoded
    ``dataset`` (as in :func:`final_layer_features`), in order, in eval mode."""
    return _per_row(model, dataset, collator, batch_size, lambda m, batch: m(**batch).logits)  # (B, D)


def tsne_embedding(features: np.ndarray, perplexity: float = TSNE_PERPLEXITY, seed: int = TSNE_SEED) -> np.ndarray:
    """2-D t-SNE of ``features`` (N, d) -> (N, 2), N >= 2.

    sklearn requires perplexity < N, so with few points it is lowered to ``(N - 1) / 3`` (at
    least 1), as small as the points need; otherwise the paper's 30. sklearn's Barnes-Hut
    gradient runs on ONE OpenMP thread: with torch's own OpenMP runtime in the same process its
    threads can stall for a minute on a busy CPU (31 points: 33 s on 2 threads, 0.1 s on one).
    """
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"t-SNE needs features of shape (N, d) with N >= 2, got {x.shape}")
    p = min(perplexity, max(1.0, (x.shape[0] - 1) / 3))
    with threadpool_limits(1, user_api="openmp"):
        return TSNE(n_components=2, perplexity=p, random_state=seed, init="pca",
                    learning_rate="auto").fit_transform(x)  # (N, 2)


def plot_tsne(features: Mapping[str, np.ndarray], labels: Mapping[str, Sequence[int]] | Sequence[int],
              class_names: Sequence[str], path: str | os.PathLike, title: str = "",
              perplexity: float = TSNE_PERPLEXITY, seed: int = TSNE_SEED) -> Path:
    """One t-SNE panel per method, points coloured by true class; saved as PNG at ``path``.

    ``features``: method name -> (N_m, d_m) array; ``labels``: the class ids (N,) shared by every
    method (the same evaluation split), or method name -> (N_m,) ids; ``class_names``: the name
    of each class id, for the legend.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from balora.plots import save_figure

    if not features:
        raise ValueError("plot_tsne needs the features of at least one method")
    names = list(class_names)
    colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    columns = min(len(features), 3)
    rows = math.ceil(len(features) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.9 * rows), squeeze=False)
    for ax in axes.ravel()[len(features):]:
        ax.set_visible(False)
    for ax, (method, x) in zip(axes.ravel(), features.items()):
        y = np.asarray(labels[method] if isinstance(labels, Mapping) else labels).astype(np.int64)
        if len(y) != len(x):
            raise ValueError(f"{method}: {len(x)} feature rows but {len(y)} labels")
        points = tsne_embedding(x, perplexity, seed)
        for c, name in enumerate(names):
            mask = y == c
            if mask.any():
                ax.scatter(points[mask, 0], points[mask, 1], s=9, alpha=0.75, color=colours(c % colours.N),
                           label=f"{name} ({int(mask.sum())})")
        ax.set_title(method, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7, markerscale=1.5, loc="best")
    return save_figure(fig, path, title, title_size=11)
