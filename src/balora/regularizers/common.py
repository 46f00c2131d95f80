"""Constants and argument checks shared by every regulariser, the objectives and the config.

One home for the names of the regulariser variants (``config.py`` imports them from here), the
label value that marks a token as "not a target", the numerical floor of the SVD ratios, the
compute dtype rule, and the one-line ``ValueError`` checks for user-facing arguments.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

#: Label of a token that is not a target (prompt, padding): Hugging Face's convention.
IGNORE_INDEX = -100

#: Consistency losses (eq. 4 / 9 and the requested ablation); see ``formulas.consistency_loss_sum``.
CONSISTENCY_KINDS = ("kl", "cosine", "mse", "mse_normalized")
#: Diversity losses: covariance (eq. 5-6, classification), top-K entropy (eq. 10-11).
DIVERSITY_KINDS = ("covariance", "entropy")
#: Normalisations of the SVD term: nuclear (eq. 7), Frobenius (eq. 12).
SVD_NORMALIZATIONS = ("nuclear", "frobenius")
#: How the generation objective gets the top singular values (eq. 12).
SVD_SOLVERS = ("auto", "exact", "randomized")
#: What the classification SVD term does with k >= D (see ``ClassificationObjective``).
SVD_K_POLICIES = ("clamp", "literal")

#: Denominators at or below this (an all-zero matrix) make a ratio 0 with zero gradient.
EPS = 1e-8


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: every regulariser sums in at least fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@contextlib.contextmanager
def no_autocast() -> Iterator[None]:
    """Autocast off inside (CPU and CUDA): the regularisers compute in fp32 in any precision.

    Under a bf16 autocast region a matmul would run in bf16 and a log-softmax in fp32, which
    breaks identities such as "the consistency term is 0 when student == teacher". Usable as a
    decorator: ``@no_autocast()``.
    """
    with contextlib.ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        yield


def check_finite(values: torch.Tensor, name: str = "logits") -> None:
    """A one-line ``ValueError`` when ``values`` holds a NaN or an inf (one device sync).

    The error every objective raises for non-finite logits; a loss computed from the logits can
    be passed instead of them (a cheap check of one number).
    """
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf values")


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a one-line ``ValueError`` naming ``name``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``, else a one-line ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value
