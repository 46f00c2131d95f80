"""The BA-LoRA objective for causal language models (paper eq. 8 with eq. 9, 10-11, 12).

:class:`GenerationObjective` turns one supervised fine-tuning batch (``input_ids``,
``attention_mask``, unshifted ``labels`` with -100 on prompt and padding tokens) into

    L = CE + λ1·L_CR + λ2·L_DR + λ3·L_SVD

averaged over the M valid tokens -- the positions whose NEXT token is a response token
(:func:`balora.regularizers.tokens.next_token_targets`): the same mask for the task loss and all three
regularisers.

The model runs once for the student (through its wrapper, so DDP still synchronises gradients)
and, when λ1 > 0, once more as the frozen teacher (:class:`~balora.teacher.SnapshotTeacher`) --
or not at all with ``regularizers.teacher: precomputed``, whose top-K log-probabilities are read
per ``example_id`` from a store (:mod:`balora.precomputed_teacher`).
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

from balora.distributed import gather_rows
from balora.objectives.lambdas import LambdaWeights
from balora.regularizers.common import IGNORE_INDEX, check_finite
from balora.regularizers.tokens import (
    LinearHead,
    QRFactorCache,
    exact_head_svd_loss,
    head_objective,
    next_token_targets,
    randomized_svd_loss,
)
from balora.teacher import SnapshotTeacher, unwrap_model

logger = logging.getLogger("balora")

def model_inputs(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys of a batch that the student and the teacher forward both take.

    ``input_ids`` (B, T), ``attention_mask`` (B, T) when given, and ``position_ids`` (B, T) when
    given: a packed (padding-free) batch separates its documents by position ids restarting at 0,
    from which transformers builds the block-diagonal causal mask (and the flash-attention
    sequence lengths, so hints such as ``cu_seq_lens_q`` need not be passed on).
    """
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: inputs[k] for k in keys if inputs.get(k) is not None}


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT / DDP wrappers."""
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    return "logits_to_keep" in inspect.signature(base_model(model).forward).parameters


def final_hidden_states(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` and return its final hidden states (B, T, d) and the logits it computed.

    The logits are (B, 1, V) when the model supports ``logits_to_keep`` (the head then runs on
    one position per row), else (B, T, V).
    """
    kwargs = {**model_inputs(inputs), "output_hidden_states": True, "use_cache": False}
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
    return decoder(**model_inputs(inputs), use_cache=False).last_hidden_state


def valid_targets(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The next-token target of every position (B, T), -100 where no response token is predicted.

    From the unshifted ``labels`` (B, T); padding (``attention_mask`` 0) and, in a packed batch,
    the last token of each document (``position_ids`` restart at 0 after it) predict nothing.
    """
    if "labels" not in inputs:
        raise ValueError("generation batches need 'labels' (-100 on prompt and padding tokens)")
    targets = next_token_targets(inputs["labels"])
    if inputs.get("attention_mask") is not None:
        targets = targets.masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    if inputs.get("position_ids") is not None:  # packed: the last token of a document predicts nothing
        targets[:, :-1] = targets[:, :-1].masked_fill(inputs["position_ids"][:, 1:] == 0, IGNORE_INDEX)
    return targets


class GenerationObjective:
    """Task cross-entropy plus BA-LoRA's generation regularisers, over the valid tokens.

    Args:
        regularizers: a ``RegularizerConfig`` (``None`` fields take the paper's generation
            defaults), or None for plain cross-entropy (``lora``, ``pissa``...). Its
            ``svd_solver`` is ``auto`` (exact via QR of a frozen head, randomized otherwise),
            ``exact`` (error if the head is not a frozen linear map) or ``randomized``, with
            ``svd_oversample`` extra columns and ``svd_niter`` power iterations.
        teacher: the frozen pre-trained model (needed when λ1 > 0); may be set later through the
            attribute (``BALoRATrainer(teacher=...)`` does).
        chunk_size: valid tokens per chunk of the head computation (memory ~ chunk × |V|).
    """

    def __init__(self, regularizers=None, *, teacher: SnapshotTeacher | None = None, chunk_size: int = 512):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
        self.config = None if regularizers is None else regularizers.resolved("generation")
        self.weights = LambdaWeights() if self.config is None else LambdaWeights.from_config(self.config)
        if self.config is not None and (self.config.diversity_kind != "entropy" or self.config.svd_normalize != "frobenius"):
            raise ValueError("generation uses diversity_kind='entropy' (eq. 10-11) and svd_normalize='frobenius' (eq. 12)")
        self.teacher = teacher
        #: the precomputed sparse teacher (``regularizers.teacher: precomputed``): no teacher forward
        self.precomputed = None
        if self.config is not None and self.config.teacher == "precomputed" and self.weights.consistency > 0:
            from balora.precomputed_teacher import PrecomputedTeacher

            self.precomputed = PrecomputedTeacher(self.config.teacher_path)
        self.chunk_size = chunk_size
        self._r_cache = QRFactorCache()
        self._checked_head = False
        self._said_fallback = False
        #: set by the trainer when it runs on several processes: the SVD term then gathers the
        #: valid-token hidden states of all processes when ``regularizers.global_batch`` is on
        self.across_processes = False

    @property
    def needs_teacher(self) -> bool:
        """A snapshot teacher is needed: λ1 > 0 and no precomputed teacher."""
        return self.weights.consistency > 0 and self.precomputed is None

    @property
    def batch_level_terms(self) -> tuple[str, ...]:
        """Terms computed on the whole (micro-)batch rather than per token."""
        return ("svd",) if self.weights.svd else ()

    @staticmethod
    def count_items(inputs: Mapping[str, torch.Tensor]) -> int:
        """The valid tokens of a batch (M): what the cross-entropy and the token-level terms average over."""
        return int((valid_targets(inputs) != IGNORE_INDEX).sum())

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
            check_finite(theirs, "logits")
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
                why, self.config.svd_oversample, self.config.svd_niter,
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
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss (0-dim) and the values to log for one batch.

        Args:
            model: the (possibly wrapped) model being trained; the student forward runs on it,
                the teacher swap on the module inside the wrapper.
            inputs: ``input_ids`` (B, T), ``attention_mask`` (B, T), ``labels`` (B, T) unshifted.
            step, total_steps: position in training, for the λ schedules.
        """
        lam = self.weights.at(step, total_steps)
        targets = valid_targets(inputs)
        valid = targets != IGNORE_INDEX  # (B, T)
        m = int(valid.sum())

        hidden, logits = final_hidden_states(model, inputs)
        head_module, linear = self._head(model)
        self._check_head(head_module, hidden, logits)
        h = hidden[valid]  # (M, d)
        tgt = targets[valid]  # (M,)

        teacher_hidden = teacher_logits = teacher_topk = None
        if lam.consistency > 0 and self.precomputed is not None:
            if inputs.get("example_id") is None:
                raise ValueError("the precomputed teacher needs the batches' 'example_id' (from encode_sft)")
            teacher_topk = self.precomputed.rows(inputs["example_id"], valid.sum(1), device=h.device)
        elif lam.consistency > 0:
            if self.teacher is None:
                raise ValueError("the consistency regulariser needs a teacher (SnapshotTeacher)")
            with self.teacher.active(model) as pretrained:
                t_hidden = teacher_hidden_states(pretrained, inputs)[valid]
                if linear is not None and linear.frozen:
                    teacher_hidden = t_hidden
                else:  # the teacher's own head (trainable/adapted heads): M × V, fallback only
                    teacher_logits = head_module(t_hidden).float()

        c = self.config
        scale = 1.0 / max(m, 1)
        fused = linear if (linear is not None and linear.frozen) else head_module
        loss, sums = head_objective(
            h, tgt, fused, teacher_hidden=teacher_hidden, teacher_logits=teacher_logits, teacher_topk=teacher_topk,
            weights=(scale, lam.consistency * scale, lam.diversity * scale),
            temperature=c.temperature if c else 2.0, top_k=c.top_k if c else 20,
            consistency_kind=c.consistency_kind if c else "kl", chunk_size=self.chunk_size,
        )
        # the loss is a sum over the chunked logits: a NaN/inf among them shows here, without a pass
        # over the M x V logits; same one-line error as the classification objective's
        check_finite(loss.detach(), "logits")
        logs = {"task_loss": sums.cross_entropy * scale, "valid_tokens": float(m)}
        if c is not None:
            logs.update(lam.logs())
            if lam.consistency > 0:
                logs["reg_consistency"] = sums.consistency * scale
            if lam.diversity > 0:
                logs["reg_diversity"] = sums.neg_entropy * scale
        if lam.svd > 0:
            svd_term = self._svd_term(h, head_module, linear)
            loss = loss + lam.svd * svd_term.to(loss.dtype)
            logs["reg_svd"] = float(svd_term.detach())
        return loss, logs

    def _svd_term(self, h: torch.Tensor, head_module: nn.Module, linear: LinearHead | None) -> torch.Tensor:
        """Eq. 12 on the valid-token hidden states ``h`` (M, d): of this process, or of all
        processes (gathered with their gradients) under ``regularizers.global_batch``."""
        c = self.config
        if c.global_batch and self.across_processes:
            h = gather_rows(h)  # (M_global, d): the head is applied after the gather
        exact_ok = linear is not None and linear.frozen
        if c.svd_solver == "exact" and not exact_ok:
            raise ValueError("regularizers svd_solver='exact' needs a frozen, un-adapted linear output head")
        if exact_ok and c.svd_solver != "randomized":
            return exact_head_svd_loss(h, linear, k=c.svd_k, r_cache=self._r_cache)
        if c.svd_solver == "auto":
            self._say_fallback_once("the output head is trained or adapted")
        z = head_module(h).float() if h.shape[0] else h.new_zeros(0, 1)
        return randomized_svd_loss(z, k=c.svd_k, oversample=c.svd_oversample, niter=c.svd_niter)
