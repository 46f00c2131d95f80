"""The BA-LoRA objective for classification: L_task + λ1·L_CR + λ2·L_DR + λ3·L_SVD (paper eq. 8).

:class:`ClassificationObjective` is called like every objective of balora,
``objective(model, inputs, *, step, total_steps) -> (loss, logs)``: it runs the model on a
tokenized batch (with ``labels``), takes the model's own task loss (cross-entropy, or MSE for a
regression head) and adds the three regularisers on the (N, D) batch logits, each λ taken from
its schedule at the current step. ``logs`` holds the task loss, every term and every λ.

* consistency (eq. 4): against the logits of the frozen pre-trained model (the
  :class:`~balora.teacher.SnapshotTeacher`, which shares the current head, paper B.3), or of
  its cached pooled features (:class:`~balora.teacher.TeacherFeatureCache`, ``teacher_cache``);
* diversity (eq. 5-6, or the top-K entropy with ``diversity_kind="entropy"``);
* SVD (eq. 7). With ``svd_k_policy="clamp"`` (default) k is lowered to min(N, D) − 1 when it
  would reach the rank: with k ≥ min(N, D) the nuclear-normalised ratio is the constant −1 with
  no gradient, which is what the paper's k = 5 gives on every GLUE task (D ≤ 3).
  ``svd_k_policy="literal"`` keeps the paper's k as given.

Regression (one output, STS-B-like): the three classification regularisers are undefined for
D = 1 (a softmax over one class, a 1×1 covariance, a single singular value). Consistency becomes
the MSE between teacher and student predictions; diversity and SVD are skipped (logged once).

The covariance and SVD terms are batch-level: under gradient accumulation they are computed per
micro-batch (the trainer says so once). With several processes they are computed on each
process's micro-batch, or, with ``regularizers.global_batch``, on the logits of every process
gathered with their gradients (:func:`balora.distributed.gather_rows`), which equals the
one-process value on the global batch.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from balora.distributed import gather_rows
from balora.objectives.lambdas import LambdaWeights
from balora.regularizers import formulas
from balora.regularizers.common import check_finite
from balora.teacher import SnapshotTeacher, TeacherFeatureCache, unwrap_model

logger = logging.getLogger("balora")

EXAMPLE_ID = "example_id"


class ClassificationObjective:
    """Task loss plus the regularisers on (N, D) logits (eq. 4-8).

    Args:
        regularizers: a ``RegularizerConfig`` (``None`` fields take the paper's classification
            defaults), or None for plain training (methods without ``+reg``).
        num_labels: D, the number of outputs of the head (1 = regression).
        teacher: the frozen pre-trained model (needed when λ1 > 0); may be set later through
            the attribute (``BALoRATrainer(teacher=...)`` does).
        teacher_cache: cache the teacher's pooled features per ``example_id`` (see
            :class:`~balora.teacher.TeacherFeatureCache`).
    """

    def __init__(self, regularizers=None, num_labels: int = 2, *, teacher: SnapshotTeacher | None = None,
                 teacher_cache: bool = False):
        self.config = None if regularizers is None else regularizers.resolved("classification")
        self.weights = LambdaWeights() if self.config is None else LambdaWeights.from_config(self.config)
        self.num_labels = num_labels
        self.regression = num_labels == 1
        self.teacher = teacher
        self.use_teacher_cache = teacher_cache
        self._cache: TeacherFeatureCache | None = None
        #: set by the trainer when it runs on several processes: the batch-level terms then gather
        #: the logits of all processes when ``regularizers.global_batch`` is on
        self.across_processes = False
        if self.config is None:
            return
        if self.regression:
            logger.warning(
                "regression head (one output): consistency is the MSE between teacher and student "
                "predictions; the diversity and SVD regularisers are undefined for D=1 and skipped"
            )
        elif self.config.lambda_svd and self.config.svd_k >= num_labels:
            if self.config.svd_k_policy == "clamp":
                logger.warning(
                    "svd_k=%d >= number of classes %d would make the SVD term (eq. 7) the constant -1; "
                    "using k=%d (regularizers.svd_k_policy=literal keeps the paper's k)",
                    self.config.svd_k, num_labels, max(num_labels - 1, 1),
                )
            else:
                logger.warning(
                    "svd_k=%d >= number of classes %d: the SVD term (eq. 7) is the constant -1 and has no "
                    "gradient (svd_k_policy=literal); lower regularizers.svd_k or use svd_k_policy=clamp",
                    self.config.svd_k, num_labels,
                )

    @property
    def needs_teacher(self) -> bool:
        return self.weights.consistency > 0

    @property
    def batch_level_terms(self) -> tuple[str, ...]:
        """Terms computed on the whole (micro-)batch rather than per example."""
        if self.config is None or self.regression:
            return ()
        names = []
        if self.weights.diversity and self.config.diversity_kind == "covariance":
            names.append("diversity (covariance)")
        if self.weights.svd:
            names.append("svd")
        return tuple(names)

    @staticmethod
    def count_items(inputs: Mapping[str, torch.Tensor]) -> int:
        """The examples of a batch (N): what the task loss and the per-example terms average over."""
        labels = inputs.get("labels")
        if labels is None:
            raise ValueError("classification batches need 'labels'")
        return int(labels.shape[0])

    def svd_k(self, n_rows: int) -> int:
        """k of eq. 7 for an (n_rows, D) batch under the configured policy."""
        rank = min(n_rows, self.num_labels)
        if self.config.svd_k_policy == "clamp":
            return max(min(self.config.svd_k, rank - 1), 1)
        return min(self.config.svd_k, rank)

    def __call__(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], *, step: int = 0,
                 total_steps: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss (0-dim) and the values to log for one batch.

        ``inputs``: the model's inputs with ``labels`` (N,), and ``example_id`` (N,) when the
        teacher cache is on. ``step``/``total_steps`` place the batch on the λ schedules.
        """
        example_ids = inputs.get(EXAMPLE_ID)
        batch = {k: v for k, v in inputs.items() if k != EXAMPLE_ID}
        outputs = model(**batch)
        task_loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs[0]
        if task_loss is None:
            raise ValueError("the model returned no loss: classification batches need 'labels'")
        check_finite(task_loss.detach(), "logits")  # a NaN/inf in the logits makes the task loss NaN/inf
        logs = {"task_loss": task_loss.item()}
        if self.config is None:
            return task_loss, logs
        lam = self.weights.at(step, total_steps)
        if self.regression:
            lam = type(lam)(lam.consistency, 0.0, 0.0)
        logs.update(lam.logs())
        logits = outputs.logits  # (N, D)
        total = logits.new_zeros((), dtype=torch.float32)
        c = self.config
        batch_level = lam.svd > 0 or (lam.diversity > 0 and c.diversity_kind == "covariance")
        gather = batch_level and c.global_batch and self.across_processes
        batch_logits = gather_rows(logits) if gather else logits  # (N_global, D) or (N, D)
        if lam.consistency > 0:
            teacher_logits = self._teacher_logits(model, batch, example_ids)
            if self.regression:
                cr = F.mse_loss(logits.float(), teacher_logits.float())
            else:
                cr = formulas.consistency_loss(logits, teacher_logits, temperature=c.temperature,
                                               kind=c.consistency_kind)
            total = total + lam.consistency * cr
            logs["reg_consistency"] = cr.item()
        if lam.diversity > 0:
            if c.diversity_kind == "entropy":
                dr = formulas.topk_entropy_diversity_loss(logits, top_k=c.top_k)
            else:
                dr = formulas.covariance_diversity_loss(batch_logits)
            total = total + lam.diversity * dr
            logs["reg_diversity"] = dr.item()
        if lam.svd > 0:
            sv = formulas.svd_loss(batch_logits, k=self.svd_k(batch_logits.shape[0]), normalize=c.svd_normalize)
            total = total + lam.svd * sv
            logs["reg_svd"] = sv.item()
        return task_loss + total.to(task_loss.dtype), logs

    def _teacher_logits(self, model: nn.Module, batch: Mapping[str, torch.Tensor], example_ids) -> torch.Tensor:
        if self.teacher is None:
            raise ValueError("the consistency regulariser needs a teacher (SnapshotTeacher)")
        model = unwrap_model(model)  # the snapshot is keyed by the unwrapped model's names
        if not self.use_teacher_cache:
            return self.teacher.logits(model, batch)
        if example_ids is None:
            raise ValueError("the teacher feature cache needs an 'example_id' column in the training data")
        if self._cache is None:
            self._cache = TeacherFeatureCache(self.teacher, model)
        return self._cache.logits(model, batch, example_ids)

    @property
    def cache_hits(self) -> int | None:
        """Examples whose teacher logits came from the feature cache (None without a cache)."""
        return None if self._cache is None else self._cache.hits
