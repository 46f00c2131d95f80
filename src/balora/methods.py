"""Fine-tuning methods by name.

``lora``   PEFT's default LoRA init (A Kaiming-uniform, B = 0);
``pissa``  PiSSA (PEFT ``init_lora_weights="pissa"``; ``pissa_niter_N`` for the fast randomized SVD);
``dora``   DoRA (LoRA init plus a learned magnitude vector);
``full``   full fine-tuning, no adapter;
any other PEFT ``init_lora_weights`` value (``gaussian``, ``olora``, ``corda``, ...) is passed through.
``+reg`` after any of them adds the three BA-LoRA regularisers; ``balora`` is ``pissa+reg``.
The requested initialisation ablation (random vs SVD init under the same regularisers) is
``lora+reg`` against ``balora``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ALIASES = {"balora": "pissa+reg", "ba-lora": "pissa+reg"}
# PEFT init_lora_weights values that need extra PEFT configuration we do not expose (yet).
_NEEDS_EXTRA_CONFIG = {"loftq", "eva", "corda", "lora_ga"}
# Inits that change the base weights: the saved adapter is converted to plain LoRA
# (PEFT's path_initial_model_for_weight_conversion) so it loads on the ORIGINAL base model.
_MUTATES_BASE = re.compile(r"^(pissa(_niter_\d+)?|olora)$")
_KNOWN_INITS = re.compile(r"^(gaussian|pissa(_niter_\d+)?|olora|orthogonal)$")


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name."""

    name: str  # canonical name, e.g. "pissa+reg"
    base: str  # "lora", "pissa", "pissa_niter_4", "dora", "full", "gaussian", ...
    regularized: bool

    @property
    def full(self) -> bool:
        return self.base == "full"

    @property
    def use_dora(self) -> bool:
        return self.base == "dora"

    @property
    def init_lora_weights(self) -> bool | str:
        """The value for PEFT's ``LoraConfig.init_lora_weights``."""
        return True if self.base in ("lora", "dora") else self.base

    @property
    def mutates_base(self) -> bool:
        """True when PEFT rewrites the base weights at init (PiSSA's W_res, OLoRA)."""
        return bool(_MUTATES_BASE.match(self.base))


def parse_method(name: str) -> MethodSpec:
    """Parse ``"balora"``, ``"lora+reg"``, ``"pissa_niter_16"``, ... into a MethodSpec."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("method must be a non-empty string such as 'lora', 'pissa' or 'balora'")
    canonical = ALIASES.get(name.strip().lower(), name.strip().lower())
    parts = canonical.split("+")
    base, extras = parts[0], parts[1:]
    if any(extra != "reg" for extra in extras) or len(extras) > 1:
        raise ValueError(f"unknown method suffix in {name!r}: only '+reg' is supported")
    if base in _NEEDS_EXTRA_CONFIG:
        raise ValueError(f"method {base!r} needs PEFT options balora does not expose yet")
    if base not in ("lora", "dora", "full") and not _KNOWN_INITS.match(base):
        raise ValueError(
            f"unknown method {name!r}: use lora, pissa, pissa_niter_N, dora, full, gaussian, olora "
            "or balora, optionally with '+reg'"
        )
    return MethodSpec(name=canonical, base=base, regularized=bool(extras))
