"""Fine-tuning methods by name: every method of the paper's Tables 1-2 (``adapter.method``).

==================  =======================================================================
``full``            full fine-tuning, no adapter
``lora``            LoRA (Hu et al., 2021): PEFT's default init, A Kaiming-uniform, B = 0
``gaussian``        LoRA with PEFT's Gaussian init of A (B = 0)
``dora``            DoRA (Liu et al., 2024): LoRA init plus a learned magnitude vector
``adalora``         AdaLoRA (Zhang et al., 2023b): SVD-form adapter P·Λ·Q whose rank budget is
                    pruned from ``adapter.adalora_init_r`` to ``adapter.adalora_target_r`` per
                    layer by PEFT's importance schedule (``update_and_allocate`` after every
                    optimiser step, hooked into :class:`balora.trainer.BALoRATrainer`)
``loraplus``        LoRA+ (Hayou et al., 2024): plain LoRA trained by PEFT's
                    ``create_loraplus_optimizer``, B's learning rate = ``loraplus_lr_ratio`` × A's
``lorafa``          LoRA-FA (Zhang et al., 2023a): plain LoRA with A frozen at its init,
                    trained by PEFT's ``create_lorafa_optimizer``
``lora_ga``         LoRA-GA (Wang et al., 2024b): A and B from the SVD of the task gradient
                    estimated on ``adapter.init_examples`` training examples (PEFT
                    ``preprocess_loraga``); the base keeps W − s·B0·A0
``pissa``           PiSSA (Meng et al., 2024): the r principal singular components of W in the
                    adapter, the residual in the base (``pissa_niter_N``: randomized SVD)
``corda``           CorDA (Yang et al., 2024): SVD of W·C, C the covariance of each layer's
                    inputs on ``adapter.init_examples`` training examples (PEFT
                    ``preprocess_corda``), in IPM mode by default (``adapter.corda_mode``)
``milora``          MiLoRA (Wang et al., 2024a): the r MINOR (smallest) singular components of W
                    in the adapter, the residual in the base (:func:`balora.adapters.milora_init`)
``olora``           OLoRA: QR of the pre-trained weights (PEFT)
==================  =======================================================================

``+reg`` after any of them adds the three BA-LoRA regularisers; ``balora`` is ``pissa+reg``.
The requested initialisation ablation (random vs SVD init under the same regularisers) is
``lora+reg`` against ``balora``.

Every init keeps the model's function at step 0 (B = 0, Λ = 0, or the base holding
W − s·B0·A0), so the snapshot teacher is the original model. The inits that rewrite the base
weights (:attr:`MethodSpec.mutates_base`) are saved as plain LoRA of rank 2r for the ORIGINAL
base model (PEFT's conversion, see :func:`balora.adapters.save_final`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ALIASES = {"balora": "pissa+reg", "ba-lora": "pissa+reg", "lora-fa": "lorafa", "lora-ga": "lora_ga"}
#: Methods that are plain LoRA adapters trained with another optimiser (PEFT's optimizers).
OPTIMIZER_METHODS = ("loraplus", "lorafa")
#: Methods whose init needs training batches before the adapter is built (gradient / covariance).
DATA_DRIVEN_INITS = ("lora_ga", "corda")
# PEFT init_lora_weights values refused: LoftQ and EVA need PEFT options balora does not expose;
# PEFT's orthogonal init starts with B·A != 0 on an untouched base, so the model would not be the
# pre-trained one at step 0 (and the snapshot teacher not the original model).
_REFUSED = {"loftq": "needs PEFT options balora does not expose", "eva": "needs PEFT options balora does not expose",
            "orthogonal": "starts with B·A != 0 on the untouched base weights: the model (and the teacher) "
                          "would not be the pre-trained one at step 0"}
# Inits that change the base weights: the saved adapter is converted to plain LoRA
# (PEFT's path_initial_model_for_weight_conversion) so it loads on the ORIGINAL base model.
_MUTATES_BASE = re.compile(r"^(pissa(_niter_\d+)?|olora|milora|lora_ga|corda)$")
_PEFT_INITS = re.compile(r"^(gaussian|pissa(_niter_\d+)?|olora|lora_ga|corda)$")
_PLAIN_LORA = ("lora", "dora", "adalora", "milora", *OPTIMIZER_METHODS)
NAMES = ("full", "lora", "gaussian", "dora", "adalora", "loraplus", "lorafa", "lora_ga", "pissa", "pissa_niter_N",
         "corda", "milora", "olora")

_DESCRIPTIONS = {
    "full": "full fine-tuning: every weight trained",
    "lora": "LoRA: A Kaiming-uniform, B = 0",
    "gaussian": "LoRA with a Gaussian init of A, B = 0",
    "dora": "DoRA: LoRA init plus a learned magnitude vector",
    "adalora": "AdaLoRA: SVD-form adapter P·Λ·Q (Λ = 0), rank budget pruned by importance",
    "loraplus": "LoRA+: LoRA init, B trained at loraplus_lr_ratio × the learning rate of A",
    "lorafa": "LoRA-FA: LoRA init, A frozen, B trained by the LoRA-FA optimizer",
    "lora_ga": "LoRA-GA: SVD of the estimated task gradient (base holds W − s·B0·A0)",
    "pissa": "PiSSA: principal singular vectors of the pre-trained weights",
    "corda": "CorDA: SVD of the weights times the input covariance of the task's data",
    "milora": "MiLoRA: minor (smallest) singular vectors of the pre-trained weights",
    "olora": "OLoRA: QR of the pre-trained weights",
}


@dataclass(frozen=True)
class MethodSpec:
    """A parsed method name."""

    name: str  # canonical name, e.g. "pissa+reg"
    base: str  # "lora", "pissa", "pissa_niter_4", "dora", "full", "adalora", "milora", ...
    regularized: bool

    @property
    def full(self) -> bool:
        return self.base == "full"

    @property
    def use_dora(self) -> bool:
        return self.base == "dora"

    @property
    def adalora(self) -> bool:
        """True for AdaLoRA (PEFT ``AdaLoraConfig``; the trainer runs its budget schedule)."""
        return self.base == "adalora"

    @property
    def optimizer(self) -> str | None:
        """``"loraplus"`` or ``"lorafa"`` for the methods that are an optimiser on plain LoRA, else None."""
        return self.base if self.base in OPTIMIZER_METHODS else None

    @property
    def needs_init_data(self) -> bool:
        """True when the init needs training batches before the adapter is built (LoRA-GA, CorDA)."""
        return self.base in DATA_DRIVEN_INITS

    @property
    def init_lora_weights(self) -> bool | str:
        """The value for PEFT's ``LoraConfig.init_lora_weights``.

        MiLoRA is built as plain LoRA and then re-initialised (:func:`balora.adapters.milora_init`).
        """
        return True if self.base in _PLAIN_LORA else self.base

    @property
    def mutates_base(self) -> bool:
        """True when the init rewrites the base weights (W − s·B0·A0: PiSSA, MiLoRA, LoRA-GA, CorDA, OLoRA)."""
        return bool(_MUTATES_BASE.match(self.base))

    @property
    def description(self) -> str:
        """One line on the initialisation (and optimiser) of the method, for model cards and reports."""
        if self.base.startswith("pissa_niter_"):
            return f"{_DESCRIPTIONS['pissa']} (randomized SVD, {self.base.partition('_niter_')[2]} iterations)"
        if self.base == "pissa":
            return f"{_DESCRIPTIONS['pissa']} (exact SVD)"
        return _DESCRIPTIONS[self.base]


def parse_method(name: str) -> MethodSpec:
    """Parse ``"balora"``, ``"lora+reg"``, ``"pissa_niter_16"``, ``"milora+reg"``, ... into a MethodSpec."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("method must be a non-empty string such as 'lora', 'pissa' or 'balora'")
    canonical = name.strip().lower()
    canonical = ALIASES.get(canonical, canonical)
    base, plus, extras = canonical.partition("+")
    base = ALIASES.get(base, base)
    if plus and extras != "reg":
        raise ValueError(f"unknown method suffix in {name!r}: only '+reg' is supported")
    if base in _REFUSED:
        raise ValueError(f"method {base!r} is not supported: it {_REFUSED[base]}")
    if base not in ("full", *_PLAIN_LORA) and not _PEFT_INITS.match(base):
        raise ValueError(f"unknown method {name!r}: use {', '.join(NAMES)} or balora, optionally with '+reg'")
    return MethodSpec(name=base + ("+reg" if plus else ""), base=base, regularized=bool(plus))
