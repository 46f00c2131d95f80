"""I-LoRA routing tuning: the task objective plus two terms on batches of GENERAL (non-task) data.

For one task batch and ``general_ratio`` = R general batches g_1 ... g_R:

    L = L_task + (1/R) · Σ_r [ ε_kl · KL(p_base ‖ p_adapted)(g_r) + ε_l2 · L2(g_r) ]

* ``L_task`` is the run's own objective, unchanged: the plain task loss, or a ``+reg`` method's
  BA-LoRA objective (routing composes with the three regularisers);
* ``KL(p_base ‖ p_adapted)``, temperature 1, with p_base from the exact pre-trained model (the
  :class:`~balora.teacher.SnapshotTeacher` swap, so PiSSA-style adapters work too). A classifier:
  the mean over the N general examples of the KL between the softmaxes over the classes of the
  head (:func:`balora.regularizers.formulas.consistency_loss`; teacher and student share the
  current head, as for BA-LoRA's consistency term, paper B.3). A causal LM: the mean over the M
  non-pad positions of the KL between the next-token distributions over the vocabulary, through
  the one chunked token mechanism (:func:`balora.regularizers.tokens.head_objective`), so no
  M × |V| logits are formed;
* ``L2`` (:func:`lora_output_norms`): the squared norm of what every adapted layer adds to its
  base output, per position, averaged over the valid positions and summed over the layers::

      L2 = Σ_m (1/N) Σ_{b,t} v[b,t] · ‖ s_m · B_m A_m x_m[b,t] ‖²

  where, for the general batch of shape (B, T): ``v`` (B, T) is its attention mask (1 = a real
  token), N = Σ v; for layer m, ``x_m[b,t]`` (d_in,) is its input at that position after the
  LoRA dropout (exactly what the forward used), A_m (r, d_in), B_m (d_out, r) and
  s_m = ``lora_alpha / r`` its LoRA factors and scaling. A layer that sees one row per example
  (a pooler: output (B, d_out)) is averaged over the B rows instead. Computed in fp32.

Both terms are computed only when their ε is > 0 (and logged then: ``routing_kl``,
``routing_l2``, the means over the R batches); ``epsilon_kl`` and ``epsilon_l2`` are always
logged, with the task objective's own logs. With ε_kl = ε_l2 = 0 no general batch is drawn: the
loss, the gradients and the random state are those of the task objective alone.

The general batches are drawn by the objective itself from :class:`GeneralBatches`, an endless,
seeded, reshuffled pass over the general examples (so the trainer needs no change). Order per
general batch: the teacher forward (no grad, eval mode, no hooks), then the student forward with
the L2 hooks; both run on the module inside a DDP-style wrapper, so that wrapper sees one forward
(the task batch's) per backward. The hooks exist only during the student's general forward and
are removed in ``finally``. The student's general forward runs in the model's current mode (with
dropout in training, as for BA-LoRA's consistency term), the teacher's in eval mode: in training
the KL is therefore not exactly 0 at step 0. Under gradient checkpointing the general forward
runs without it (checkpointing would recompute the forward in the backward pass, after the hooks
are gone).

General data (:func:`load_general_texts`, :func:`encode_general`): a text corpus of
:mod:`balora.data.texts` (``grimm-tales``, ``book-excerpts``, ...; offline), the training texts
of a classification task (:func:`balora.data.load_task`), or a local ``.txt`` file (one text) or
``.jsonl`` file (a ``text`` field per line, :func:`balora.data.files.read_records`). Every text
is tokenised with the run's tokenizer and cut into pieces of at most ``max_length`` tokens (the
tokens a truncation would drop become further pieces); a text pair of a pair task is one
example, truncated like :func:`balora.data.encode`, for a classifier, and the two texts joined
by a newline for a causal LM. Every non-pad token of a piece is valid.

Resuming a run restarts the general batches from their seed (the objective keeps no state in
the checkpoint), so a resumed run sees another sequence of general batches than an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from balora.objectives.generation import base_model, final_hidden_states, model_inputs, teacher_hidden_states
from balora.regularizers import formulas
from balora.regularizers.common import check_finite
from balora.regularizers.tokens import LinearHead, head_objective
from balora.teacher import SnapshotTeacher, unwrap_model

__all__ = ["GeneralBatches", "GeneralTexts", "RoutingObjective", "encode_general", "general_batches",
           "load_general_texts", "lora_output_norms", "pad_general", "run_general_texts"]

logger = logging.getLogger("balora")

GENERATION = "generation"
#: The suffixes of local general-data files.
GENERAL_FILE_SUFFIXES = (".txt", ".jsonl")


# ---------------------------------------------------------------------------- general data


@dataclass
class GeneralTexts:
    """Raw general data: ``texts``, the second texts of a pair task (``pairs``) or None, and its source."""

    texts: list[str]
    pairs: list[str] | None
    source: str


def _sample(n: int, k: int | None, seed: int) -> list[int]:
    """Indices of a seeded random subset of ``k`` of ``n`` rows, in file order (all when k is None)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def _file_texts(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"routing.general_data: file not found: {path}")
    if path.suffix.lower() == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    from balora.data.files import cell_text, read_records

    records = read_records(path, what="general data file")
    if not any("text" in r for r in records):
        raise ValueError(f"general data file {path} has no 'text' field (one JSON object per line with a 'text')")
    return [cell_text(r.get("text")) for r in records]


def load_general_texts(source: str, *, seed: int = 0, max_examples: int | None = None) -> GeneralTexts:
    """The texts of ``source``: a corpus name, a classification task name, or a .txt / .jsonl file.

    ``max_examples`` keeps a seeded random subset of that many texts (rows) before they are
    cut into pieces. Empty texts are dropped; no text left is a one-line ValueError.
    """
    from balora.data import is_classification_task, load_task
    from balora.data.texts import TEXT_CORPORA, load_texts

    pairs = None
    if source in TEXT_CORPORA:
        texts = load_texts(source)
    elif is_classification_task(source):
        split = load_task(source, seed=seed, max_train_examples=max_examples, max_eval_examples=1).train
        texts = list(split["text"])
        pairs = list(split["text_pair"]) if "text_pair" in split.column_names else None
        max_examples = None  # load_task subsampled already
    elif Path(source).suffix.lower() in GENERAL_FILE_SUFFIXES:
        texts = _file_texts(Path(source).expanduser())
    else:
        raise ValueError(f"routing.general_data={source!r}: not a text corpus ({', '.join(TEXT_CORPORA)}), "
                         "a classification task or a .txt / .jsonl file")
    keep = [i for i in _sample(len(texts), max_examples, seed)
            if texts[i].strip() and (pairs is None or pairs[i].strip())]
    if not keep:
        raise ValueError(f"routing.general_data={source!r} holds no non-empty text")
    return GeneralTexts([texts[i] for i in keep], None if pairs is None else [pairs[i] for i in keep], source)


def encode_general(texts: GeneralTexts, tokenizer, max_length: int, family: str) -> list[dict[str, list[int]]]:
    """Tokenised general examples: ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when
    the tokenizer gives them), each at most ``max_length`` tokens (see the module docstring)."""
    if texts.pairs is not None and family != GENERATION:  # a pair classifier reads the pair as one example
        enc = tokenizer(texts.texts, texts.pairs, truncation=True, max_length=max_length)
    else:
        docs = texts.texts if texts.pairs is None else [f"{a}\n{b}" for a, b in zip(texts.texts, texts.pairs)]
        enc = tokenizer(docs, truncation=True, max_length=max_length, return_overflowing_tokens=True)
        if "overflow_to_sample_mapping" not in enc:
            logger.warning("routing: this tokenizer cannot cut long texts into pieces; each general text "
                           "is truncated to %d tokens", max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    examples = [{k: list(enc[k][i]) for k in keys} for i in range(len(enc["input_ids"]))]
    return [e for e in examples if e["input_ids"]]


def pad_general(rows: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (B, T) long tensors: ``input_ids`` with ``pad_token_id``, ``attention_mask``
    (built from the lengths when absent) and ``token_type_ids`` with 0."""
    length = max(len(r["input_ids"]) for r in rows)
    out = {"input_ids": torch.full((len(rows), length), pad_token_id, dtype=torch.long),
           "attention_mask": torch.zeros((len(rows), length), dtype=torch.long)}
    if all("token_type_ids" in r for r in rows):
        out["token_type_ids"] = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        out["input_ids"][i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        out["attention_mask"][i, :n] = torch.tensor(r.get("attention_mask", [1] * n), dtype=torch.long)
        if "token_type_ids" in out:
            out["token_type_ids"][i, :n] = torch.tensor(r["token_type_ids"], dtype=torch.long)
    return out


class GeneralBatches:
    """Endless batches of general examples: passes over all of them, each in a new seeded order.

    A pass that ends inside a batch continues with the next pass (a batch larger than the data
    repeats examples). The order comes from a private ``torch.Generator`` seeded with ``seed``:
    drawing batches leaves the global random state alone.
    """

    def __init__(self, examples: Sequence[Mapping[str, Sequence[int]]], batch_size: int, *, seed: int = 0,
                 pad_token_id: int = 0):
        if not examples:
            raise ValueError("routing: no general example to draw batches from")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"general batch size must be an integer >= 1, got {batch_size!r}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.pad_token_id = pad_token_id
        self._generator = torch.Generator().manual_seed(seed)
        self._order: list[int] = []

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> "GeneralBatches":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        while len(rows) < self.batch_size:
            if not self._order:
                self._order = torch.randperm(len(self.examples), generator=self._generator).tolist()[::-1]
            rows.append(self.examples[self._order.pop()])
        return pad_general(rows, self.pad_token_id)


def run_general_texts(config) -> GeneralTexts | None:
    """The general texts of a run (``RunConfig``), or None when ``routing.general_data`` is not set."""
    r = config.routing
    if r.general_data is None:
        return None
    return load_general_texts(r.general_data, seed=config.train.seed, max_examples=r.general_max_examples)


def general_batches(config, tokenizer, texts: GeneralTexts | None = None) -> GeneralBatches:
    """The general batches of a run: ``texts`` (default: :func:`run_general_texts`) tokenised with
    the run's tokenizer at ``routing.general_max_length`` (None: ``model.max_length``), in batches
    of ``routing.general_batch_size`` (None: ``train.batch_size``), seeded with ``train.seed``."""
    r = config.routing
    texts = texts if texts is not None else run_general_texts(config)
    if texts is None:
        raise ValueError("routing.general_data is not set")
    examples = encode_general(texts, tokenizer, r.general_max_length or config.model.max_length, config.family)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logger.info("routing: %d general examples from %s", len(examples), texts.source)
    return GeneralBatches(examples, r.general_batch_size or config.train.batch_size, seed=config.train.seed,
                          pad_token_id=pad)


# ---------------------------------------------------------------------------- the L2 hooks


def _adapted_layers(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(module name, LoRA layer, active adapter name) of every adapted layer; a layer whose adapter
    path is not ``lora_B(lora_A(dropout(x))) · scaling`` (DoRA, AdaLoRA, embeddings) is an error."""
    from peft.tuners.lora import LoraLayer

    found = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            plain = adapter in layer.lora_B and isinstance(layer.lora_B[adapter], nn.Module)
            if not plain or adapter in getattr(layer, "lora_variant", {}):
                raise ValueError(
                    f"routing.epsilon_l2: the adapted layer {name} ({type(layer).__name__}) does not add "
                    "s·B·A·x to its output (DoRA, AdaLoRA or an embedding adapter); set routing.epsilon_l2=0")
            found.append((name, layer, adapter))
    return found


def _mean_square(output: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{b,t} v[b,t]·‖u[b,t]‖² / Σ v for u (B, T, ...) and the mask v (B, T); the mean of ‖u[b]‖²
    over the rows for a (B, d) output."""
    u = output.to(torch.float64 if output.dtype == torch.float64 else torch.float32)
    if u.dim() >= 3 and tuple(u.shape[:2]) == tuple(mask.shape):
        squares = u.pow(2).flatten(2).sum(-1)  # (B, T)
        weights = mask.to(squares.dtype)
        return (squares * weights).sum() / weights.sum().clamp_min(1.0)
    if u.dim() == 2 and u.shape[0] == mask.shape[0]:
        return u.pow(2).sum(-1).mean()
    raise ValueError(f"routing.epsilon_l2: a LoRA output of shape {tuple(u.shape)} does not match the "
                     f"general batch {tuple(mask.shape)}")


@contextlib.contextmanager
def lora_output_norms(model: nn.Module, mask: torch.Tensor) -> Iterator[list[torch.Tensor]]:
    """Forward hooks on every adapted layer's ``lora_B[adapter]``; yields the list that receives,
    per call of such a layer, the 0-dim mean squared norm of ``lora_B(...) · scaling`` over the
    valid positions of ``mask`` (B, T). Their sum is L2 (module docstring). The hooks are removed
    on exit, also when the forward raises."""
    layers = _adapted_layers(unwrap_model(model))
    if not layers:
        raise ValueError("routing.epsilon_l2: the model has no LoRA layers")
    values: list[torch.Tensor] = []
    handles = []

    def hook_for(layer: nn.Module, adapter: str):
        def hook(_module, _args, output):
            values.append(_mean_square(output * layer.scaling[adapter], mask))
        return hook

    try:
        for _, layer, adapter in layers:
            handles.append(layer.lora_B[adapter].register_forward_hook(hook_for(layer, adapter)))
        yield values
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _without_checkpointing(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing off inside (transformers' per-layer ``gradient_checkpointing`` flags)."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    try:
        for m in flagged:
            m.gradient_checkpointing = False
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


# ---------------------------------------------------------------------------- the objective


class RoutingObjective:
    """The run's task objective plus ε_kl·KL and ε_l2·L2 on general batches (module docstring).

    Args:
        task: the task objective (:class:`~balora.objectives.ClassificationObjective` or
            :class:`~balora.objectives.GenerationObjective`, plain or ``+reg``).
        general: an iterator of general batches (``input_ids``, ``attention_mask`` (B, T), and
            ``token_type_ids`` for a classifier when its tokenizer has them), e.g. :class:`GeneralBatches`.
        family: ``classification`` or ``generation``.
        epsilon_kl, epsilon_l2: the weights (>= 0).
        general_ratio: R, general batches per task batch (an integer >= 1).
        chunk_size: valid tokens per chunk of the causal LM's KL (memory ~ chunk × |V|).
        num_labels: outputs of a classifier's head; the KL needs 2 or more (a distribution).
        teacher: the pre-trained model (needed when ε_kl > 0 or by the task objective); setting
            it sets the task objective's too.
    """

    def __init__(self, task, general: Iterator[Mapping[str, torch.Tensor]], *, family: str,
                 epsilon_kl: float = 1.0, epsilon_l2: float = 1.0, general_ratio: int = 1,
                 chunk_size: int = 512, num_labels: int | None = None, teacher: SnapshotTeacher | None = None):
        for name, value in (("epsilon_kl", epsilon_kl), ("epsilon_l2", epsilon_l2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"routing.{name} must be a number >= 0, got {value!r}")
        if isinstance(general_ratio, bool) or not isinstance(general_ratio, int) or general_ratio < 1:
            raise ValueError(f"routing.general_ratio must be an integer >= 1, got {general_ratio!r}")
        if family != GENERATION and epsilon_kl > 0 and num_labels == 1:
            raise ValueError("routing.epsilon_kl: a regression head (one output) has no distribution to compare; "
                             "set routing.epsilon_kl=0")
        self.task = task
        self.general = general
        self.family = family
        self.epsilon_kl = float(epsilon_kl)
        self.epsilon_l2 = float(epsilon_l2)
        self.general_ratio = general_ratio
        self.chunk_size = chunk_size
        self._teacher = None
        self.teacher = teacher if teacher is not None else getattr(task, "teacher", None)

    @property
    def teacher(self) -> SnapshotTeacher | None:
        return self._teacher

    @teacher.setter
    def teacher(self, value: SnapshotTeacher | None) -> None:
        self._teacher = value
        if value is not None:
            self.task.teacher = value

    @property
    def needs_teacher(self) -> bool:
        return self.epsilon_kl > 0 or self.task.needs_teacher

    @property
    def batch_level_terms(self) -> tuple[str, ...]:
        return self.task.batch_level_terms

    @property
    def across_processes(self) -> bool:
        return self.task.across_processes

    @across_processes.setter
    def across_processes(self, value: bool) -> None:
        self.task.across_processes = value

    def count_items(self, inputs: Mapping[str, torch.Tensor]) -> int:
        """The task objective's count (examples or valid tokens) of a task batch."""
        return self.task.count_items(inputs)

    @property
    def cache_hits(self) -> int | None:
        """The task objective's teacher-cache hits (classification), for the trainer's logs."""
        return getattr(self.task, "cache_hits", None)

    def __call__(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], *, step: int = 0,
                 total_steps: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
        """The task objective's loss on ``inputs`` plus the routing terms of R fresh general batches."""
        loss, logs = self.task(model, inputs, step=step, total_steps=total_steps)
        logs = {**logs, "epsilon_kl": self.epsilon_kl, "epsilon_l2": self.epsilon_l2}
        if self.epsilon_kl == 0 and self.epsilon_l2 == 0:
            return loss, logs
        module = unwrap_model(model)
        device = next(module.parameters()).device
        extra, kl_sum, l2_sum = loss.new_zeros((), dtype=torch.float32), 0.0, 0.0
        for _ in range(self.general_ratio):
            batch = {k: v.to(device) for k, v in next(self.general).items()}
            kl, l2 = self.general_terms(module, batch)
            if kl is not None:
                extra = extra + self.epsilon_kl * kl
                kl_sum += float(kl.detach())
            if l2 is not None:
                extra = extra + self.epsilon_l2 * l2
                l2_sum += float(l2.detach())
        if self.epsilon_kl > 0:
            logs["routing_kl"] = kl_sum / self.general_ratio
        if self.epsilon_l2 > 0:
            logs["routing_l2"] = l2_sum / self.general_ratio
        return loss + (extra / self.general_ratio).to(loss.dtype), logs

    def general_terms(self, model: nn.Module, batch: Mapping[str, torch.Tensor]
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(KL, L2) of one general batch, each 0-dim and differentiable, or None when its ε is 0.

        ``model`` is the module inside any DDP-style wrapper; ``batch`` is on its device.
        """
        mask = batch["attention_mask"]
        teacher_side = self._teacher_side(model, batch, mask) if self.epsilon_kl > 0 else None
        hooks = lora_output_norms(model, mask) if self.epsilon_l2 > 0 else contextlib.nullcontext([])
        with _without_checkpointing(model), hooks as norms:
            student = self._student_side(model, batch, mask)
        l2 = torch.stack(norms).sum() if self.epsilon_l2 > 0 and norms else None
        if self.epsilon_l2 > 0 and l2 is None:
            raise ValueError("routing.epsilon_l2: no LoRA layer ran in the general forward")
        kl = None if teacher_side is None else self._kl(model, student, teacher_side)
        return kl, l2

    # ------------------------------------------------------------------ pieces

    def _teacher_side(self, model: nn.Module, batch, mask):
        """The pre-trained model's logits (classifier) or hidden states at the valid tokens (causal LM)."""
        if self.teacher is None:
            raise ValueError("routing.epsilon_kl needs a teacher (SnapshotTeacher) for the pre-trained distribution")
        if self.family != GENERATION:
            return self.teacher.logits(model, batch)
        head_module, linear = self._head(model)
        with self.teacher.active(model) as pretrained:
            hidden = teacher_hidden_states(pretrained, batch)[mask.bool()]  # (M, d)
            if linear is not None and linear.frozen:
                return hidden  # the fused path applies the (shared, frozen) head chunk by chunk
            return head_module(hidden).float()  # the teacher's own head (trainable or adapted): M × V

    def _student_side(self, model: nn.Module, batch, mask):
        """The adapted model's logits (N, D) or final hidden states (M, d) at the valid tokens."""
        if self.family != GENERATION:
            logits = model(**batch).logits
            check_finite(logits.detach(), "logits")
            return logits
        hidden, _ = final_hidden_states(model, model_inputs(batch))
        return hidden[mask.bool()]

    @staticmethod
    def _head(model: nn.Module) -> tuple[nn.Module, LinearHead | None]:
        head_module = base_model(model).get_output_embeddings()
        if head_module is None:
            raise ValueError("routing: the model has no output embeddings (get_output_embeddings() is None)")
        return head_module, LinearHead.from_module(head_module)

    def _kl(self, model: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        if self.family != GENERATION:
            return formulas.consistency_loss(student, teacher, temperature=1.0, kind="kl")
        head_module, linear = self._head(model)
        frozen = linear is not None and linear.frozen
        m = student.shape[0]
        # the cross-entropy of head_objective has weight 0 here, so its targets are placeholders
        targets = torch.zeros(m, dtype=torch.long, device=student.device)
        loss, _ = head_objective(
            student, targets, linear if frozen else head_module,
            teacher_hidden=teacher if frozen else None, teacher_logits=None if frozen else teacher,
            weights=(0.0, 1.0 / max(m, 1), 0.0), temperature=1.0, consistency_kind="kl",
            chunk_size=self.chunk_size,
        )
        check_finite(loss.detach(), "logits")
        return loss
