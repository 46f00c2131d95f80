"""The BA-LoRA objective for causal language models (paper eq. 8 with eq. 9, 10-11, 12).

:class:`GenerationObjective` turns one supervised fine-tuning batch (``input_ids``,
``attention_mask``, unshifted ``labels`` with -100 on prompt and padding tokens) into

    L = CE + λ1·L_CR + λ2·L_DR + λ3·L_SVD

averaged over the M valid tokens -- the positions whose NEXT token is a response token
(:func:`balora.regularizers.tokens.next_token_targets`): the same mask for the task loss and all three
regularisers.

The model runs once for the student (through its wrapper, so DDP still synchronises gradients)
and, when λ1 > 0, once more as the frozen teacher (:class:`~balora.teacher.SnapshotTeacher`).
Neither forward applies the output head to every position: the model is asked for its final
hidden states and for the logits of the last position only (``logits_to_keep=1``), and the
head is applied to the M valid rows only, chunk by chunk (:func:`balora.regularizers.tokens.head_objective`).
The first batch checks that the model's logits really are ``head(last hidden state)``; an
architecture that post-processes logits (e.g. soft-capping) is refused with a clear error.

Methods without ``+reg`` use the same objective with λ = 0 (plain cross-entropy over the
response tokens), so every method is trained by the same code and costs compare fairly.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping

import torch
from torch import nn

from balora.config import RegularizerConfig
from balora.teacher import SnapshotTeacher
from balora.regularizers.tokens import (
    IGNORE_INDEX,
    LinearHead,
    QRFactorCache,
    exact_head_svd_loss,
    head_objective,
    next_token_targets,
    randomized_svd_loss,
)

logger = logging.getLogger("balora")

SVD_METHODS = ("auto", "exact", "randomized")


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DDP wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP, FSDP
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def final_hidden_states(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` and return its final hidden states (B, T, d) and the logits it computed.

    The logits are (B, 1, V) when the model supports ``logits_to_keep`` (the head then runs on
    one position per row), else (B, T, V).
    """
    kwargs = {"input_ids": inputs["input_ids"], "output_hidden_states": True, "use_cache": False}
    if inputs.get("attention_mask") is not None:
        kwargs["attention_mask"] = inputs["attention_mask"]
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1
    out = model(**kwargs)
    return out.hidden_states[-1], out.logits


def teacher_hidden_states(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (B, T, d) for the no-grad teacher forward.

    Runs the decoder stack alone (``get_decoder()``) when the model has one, so neither the
    hidden states of every layer nor any logits are kept: the teacher's memory does not grow
    with the number of layers. Falls back to :func:`final_hidden_states` otherwise.
    """
    base = base_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is None or decoder is base:
        return final_hidden_states(model, inputs)[0]
    kwargs = {"input_ids": inputs["input_ids"], "use_cache": False}
    if inputs.get("attention_mask") is not None:
        kwargs["attention_mask"] = inputs["attention_mask"]
    return decoder(**kwargs).last_hidden_state


class GenerationObjective:
    """Task cross-entropy plus BA-LoRA's generation regularisers, over the valid tokens.

    Args:
        regularizers: the regulariser settings (``None`` -> plain cross-entropy: ``lora``,
            ``pissa``...). ``None`` fields take the paper's generation defaults.
        chunk_size: valid tokens per chunk of the head computation (memory ~ chunk × |V|).
        svd: ``auto`` (exact via QR of a frozen head, randomized otherwise), ``exact`` (error if
            the head is not a frozen linear map) or ``randomized``.
        svd_oversample, svd_niter: the randomized SVD's extra columns and power iterations.
    """

    def __init__(
        self,
        regularizers: RegularizerConfig | None = None,
        *,
        chunk_size: int = 512,
        svd: str = "auto",
        svd_oversample: int = 10,
        svd_niter: int = 2,
    ):
        if svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {', '.join(SVD_METHODS)}, got {svd!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.config = None if regularizers is None else regularizers.resolved("generation")
        if self.config is not None:
            self.consistency_schedule, self.focus_schedule = self.config.schedules()
            if self.config.consistency_kind != "kl":
                raise ValueError("generation supports consistency_kind='kl' only (eq. 9)")
            if self.config.diversity_kind != "entropy" or self.config.svd_normalize != "frobenius":
                raise ValueError("generation uses diversity_kind='entropy' (eq. 10-11) and svd_normalize='frobenius' (eq. 12)")
        self.chunk_size = chunk_size
        self.svd = svd
        self.svd_oversample = svd_oversample
        self.svd_niter = svd_niter
        self._r_cache = QRFactorCache()
        self._checked_head = False
        self._said_fallback = False

    @property
    def needs_teacher(self) -> bool:
        return self.config is not None and bool(self.config.lambda_consistency)

    def lambdas(self, step: int, total_steps: int) -> tuple[float, float, float]:
        """(λ1, λ2, λ3) at optimiser step ``step`` of ``total_steps`` (all 0 without regularisers)."""
        if self.config is None:
            return 0.0, 0.0, 0.0
        c = self.config
        focus = self.focus_schedule.factor(step, total_steps)
        return (c.lambda_consistency * self.consistency_schedule.factor(step, total_steps),
                c.lambda_diversity * focus, c.lambda_svd * focus)

    # ------------------------------------------------------------------ pieces

    def _head(self, model: nn.Module) -> tuple[nn.Module, LinearHead | None]:
        module = base_model(model).get_output_embeddings()
        if module is None:
            raise ValueError("the model has no output embeddings (get_output_embeddings() is None): not a causal LM")
        return module, LinearHead.from_module(module)

    def _check_head(self, head_module: nn.Module, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Once: the model's logits must equal head(final hidden state), or the objective would be wrong."""
        if self._checked_head:
            return
        with torch.no_grad():
            mine = head_module(hidden[:, -1:]).float()
            theirs = logits[:, -1:].float()
            scale = theirs.abs().max().clamp_min(1.0)
            if not torch.allclose(mine, theirs, atol=1e-3 * float(scale), rtol=1e-3):
                raise ValueError(
                    "this model's logits are not output_head(final hidden state) (soft-capping or "
                    "scaling?): the chunked generation objective does not support it"
                )
        self._checked_head = True

    def _say_fallback_once(self, why: str) -> None:
        if not self._said_fallback:
            logger.warning(
                "SVD regulariser: %s, so the exact QR shortcut does not apply; using a randomized SVD "
                "(torch.svd_lowrank, oversample=%d, niter=%d) of the valid-token logits",
                why, self.svd_oversample, self.svd_niter,
            )
            self._said_fallback = True

    # ------------------------------------------------------------------ the loss

    def __call__(
        self,
        model: nn.Module,
        inputs: Mapping[str, torch.Tensor],
        *,
        step: int = 0,
        total_steps: int = 1,
        teacher: SnapshotTeacher | None = None,
        teacher_model: nn.Module | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss (0-dim) and the values to log for one batch.

        Args:
            model: the (possibly wrapped) model being trained; the student forward runs on it.
            inputs: ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) unshifted.
            step, total_steps: position in training, for the λ schedules.
            teacher: swaps the pre-trained weights in for the consistency term.
            teacher_model: the unwrapped model the teacher swaps into (default: ``base`` of model).
        """
        if "labels" not in inputs:
            raise ValueError("generation batches need 'labels' (-100 on prompt and padding tokens)")
        lam_cr, lam_dr, lam_svd = self.lambdas(step, total_steps)
        targets = next_token_targets(inputs["labels"])
        if inputs.get("attention_mask") is not None:
            targets = targets.masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
        valid = targets != IGNORE_INDEX  # (B, T)
        m = int(valid.sum())

        hidden, logits = final_hidden_states(model, inputs)
        head_module, linear = self._head(model)
        self._check_head(head_module, hidden, logits)
        h = hidden[valid]  # (M, d)
        tgt = targets[valid]  # (M,)

        teacher_hidden = teacher_logits = None
        if lam_cr > 0:
            if teacher is None:
                raise ValueError("the consistency regulariser needs a teacher (SnapshotTeacher)")
            target_model = teacher_model if teacher_model is not None else model
            with teacher.active(target_model):
                t_hidden = teacher_hidden_states(target_model, inputs)[valid]
                if linear is not None and linear.frozen:
                    teacher_hidden = t_hidden
                else:  # the teacher's own head (trainable/adapted heads): M × V, fallback only
                    teacher_logits = head_module(t_hidden).float()

        scale = 1.0 / max(m, 1)
        fused = linear if (linear is not None and linear.frozen) else head_module
        loss, sums = head_objective(
            h, tgt, fused, teacher_hidden=teacher_hidden, teacher_logits=teacher_logits,
            weights=(scale, lam_cr * scale, lam_dr * scale),
            temperature=self.config.temperature if self.config else 2.0,
            top_k=self.config.top_k if self.config else 20,
            chunk_size=self.chunk_size,
        )
        logs = {"task_loss": sums.cross_entropy * scale, "valid_tokens": float(m)}
        if self.config is not None:
            logs.update(lambda_consistency=lam_cr, lambda_diversity=lam_dr, lambda_svd=lam_svd)
            if lam_cr > 0:
                logs["reg_consistency"] = sums.consistency * scale
            if lam_dr > 0:
                logs["reg_diversity"] = sums.neg_entropy * scale
        if lam_svd > 0:
            svd_term = self._svd_term(h, head_module, linear)
            loss = loss + lam_svd * svd_term.to(loss.dtype)
            logs["reg_svd"] = float(svd_term.detach())
        return loss, logs

    def _svd_term(self, h: torch.Tensor, head_module: nn.Module, linear: LinearHead | None) -> torch.Tensor:
        k = self.config.svd_k
        exact_ok = linear is not None and linear.frozen
        if self.svd == "exact" and not exact_ok:
            raise ValueError("regularizers svd='exact' needs a frozen, un-adapted linear output head")
        if exact_ok and self.svd != "randomized":
            return exact_head_svd_loss(h, linear, k=k, r_cache=self._r_cache)
        if self.svd == "auto":
            self._say_fallback_once("the output head is trained or adapted")
        z = head_module(h).float() if h.shape[0] else h.new_zeros(0, 1)
        return randomized_svd_loss(z, k=k, oversample=self.svd_oversample, niter=self.svd_niter)
