"""The frozen pre-trained teacher, without a second copy of the model.

The teacher of the consistency regulariser (eq. 4, 9) is the ORIGINAL pre-trained model. With
PiSSA the base weights hold W_res = W - A0 B0, so ``disable_adapter()`` is not the teacher.
But ``W_res + A0 B0 = W``: swapping the adapter's INITIAL parameters back in recovers the
original model exactly, for LoRA (B0 = 0), PiSSA, OLoRA and DoRA (initial magnitudes) alike.

:class:`SnapshotTeacher` keeps a copy of the initial trainable parameters (the adapter's size,
not the model's) and, for a teacher forward, points each parameter at its snapshot, runs the
model in eval mode under ``torch.no_grad()``, and points it back. No tensor is copied per step.

Modules listed in ``shared_modules`` are NOT swapped: teacher and student share the CURRENT
head (paper B.3). By default they are derived from the model (:func:`shared_head_modules`): a
PEFT model's ``modules_to_save`` (the classification head of a sequence classifier; nothing for
a causal LM), or the ``classifier``/``score`` head of a plain sequence classifier. For ``full``
fine-tuning every weight is trainable, so the snapshot is a full copy: unavoidable, and
reported by :attr:`nbytes`.

Mixed precision: under autocast, casts of weights are cached per parameter object for the
whole autocast region, and the swap keeps the parameter object (it assigns ``param.data``), so
a teacher forward inside the student's region would reuse the STUDENT's cached casts. The swap
clears the autocast cache on the way in and on the way out, so the teacher runs in the
student's precision on its own weights.

:class:`TeacherFeatureCache` (classification) stores, per training example, the input of the
head in the teacher forward (the pooled features). The teacher is frozen and runs without
dropout, so those features never change: from the second epoch on the teacher's logits cost
one head application instead of a forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

CLASSIFICATION_HEADS = ("classifier", "score")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP/FSDP-style ``.module`` wrappers (PEFT wrappers are kept)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def shared_head_modules(model: nn.Module) -> tuple[str, ...]:
    """The module names teacher and student share, derived from the model.

    A PEFT model: the union of its adapters' ``modules_to_save`` (PEFT puts the classification
    head there for sequence classification; a causal LM has none). A plain model: its
    ``classifier``/``score`` attribute if it has one (a sequence classifier under full
    fine-tuning), else nothing.
    """
    model = unwrap_model(model)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, Mapping):
        names = {name for config in configs.values() for name in (getattr(config, "modules_to_save", None) or ())}
        return tuple(sorted(names))
    return tuple(name for name in CLASSIFICATION_HEADS if isinstance(getattr(model, name, None), nn.Module))


def in_modules(name: str, modules: tuple[str, ...]) -> bool:
    """True when the parameter ``name`` lies inside one of the modules named ``modules`` (a
    component of its dotted path), e.g. a head parameter for :func:`shared_head_modules`."""
    return any(part in modules for part in name.split("."))


class SnapshotTeacher:
    """The pre-trained model, recovered by swapping the initial adapter parameters in.

    Build it right after the adapter is initialised and before any optimiser step.
    """

    def __init__(self, model: nn.Module, shared_modules: tuple[str, ...] | None = None):
        model = unwrap_model(model)
        self.shared_modules = shared_head_modules(model) if shared_modules is None else tuple(shared_modules)
        self.snapshot: dict[str, torch.Tensor] = {
            name: param.detach().clone()
            for name, param in model.named_parameters()
            if param.requires_grad and not in_modules(name, self.shared_modules)
        }
        if not self.snapshot:
            raise ValueError("the model has no trainable parameters outside the shared head to snapshot")

    @property
    def nbytes(self) -> int:
        """Memory held by the snapshot."""
        return sum(t.numel() * t.element_size() for t in self.snapshot.values())

    @contextlib.contextmanager
    def active(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside this context ``model`` IS the frozen teacher (eval mode, no grad).

        ``model`` may be wrapped (DDP); the swap runs on the module inside. On exit every
        parameter and every submodule's own train/eval mode is as it was.
        """
        model = unwrap_model(model)
        params = dict(model.named_parameters())
        current: dict[str, torch.Tensor] = {}
        modes = [(module, module.training) for module in model.modules()]
        try:
            for name, initial in self.snapshot.items():
                param = params[name]
                current[name] = param.data
                param.data = initial
            torch.clear_autocast_cache()  # casts cached for the student's weights must not serve the teacher
            model.eval()
            with torch.no_grad():
                yield model
        finally:
            for name, data in current.items():
                params[name].data = data
            torch.clear_autocast_cache()  # nor the teacher's casts the student
            for module, training in modes:
                module.training = training

    def logits(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Teacher logits for a batch; ``inputs`` are the model's inputs (labels are dropped)."""
        batch = {k: v for k, v in inputs.items() if k != "labels"}
        with self.active(model):
            return model(**batch).logits.detach()


def find_head(model: nn.Module, shared_modules: tuple[str, ...] = CLASSIFICATION_HEADS) -> nn.Module:
    """The outermost module whose name ends with one of ``shared_modules``."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in shared_modules:
            return module
    raise ValueError(f"no classification head named one of {shared_modules} in the model")


class TeacherFeatureCache:
    """Per-example cache of the teacher's head input, for classification.

    ``logits(model, inputs, example_ids)`` returns teacher logits; examples seen before cost one
    head application on cached features; the rest run the teacher forward once and are stored.
    Requires a head that takes pooled features of shape (B, H) (BERT, DeBERTa, MiniLM); a head
    that takes the whole sequence (RoBERTa's) raises a clear error.
    """

    def __init__(self, teacher: SnapshotTeacher, model: nn.Module):
        self.teacher = teacher
        self.head = find_head(model, teacher.shared_modules)
        self.features: dict[int, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def _teacher_features(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def grab(_module, args):
            captured.append(args[0].detach())

        handle = self.head.register_forward_pre_hook(grab)
        try:
            self.teacher.logits(model, inputs)
        finally:
            handle.remove()
        features = captured[-1]
        if features.dim() != 2:
            raise ValueError(
                "regularizers.teacher_cache needs a head that takes pooled (batch, hidden) features; "
                f"this model's head takes shape {tuple(features.shape)}: turn the cache off"
            )
        return features

    def logits(self, model: nn.Module, inputs: Mapping[str, torch.Tensor], example_ids: torch.Tensor) -> torch.Tensor:
        """Teacher logits (B, D) for a batch whose rows are the examples ``example_ids`` (B,)."""
        ids = [int(i) for i in example_ids.tolist()]
        missing = [row for row, i in enumerate(ids) if i not in self.features]
        if missing:
            self.misses += len(missing)
            rows = torch.tensor(missing, device=example_ids.device)
            sub = {k: v.index_select(0, rows.to(v.device)) for k, v in inputs.items()
                   if k != "labels" and isinstance(v, torch.Tensor)}
            feats = self._teacher_features(model, sub)
            for row, feat in zip(missing, feats):
                self.features[ids[row]] = feat
        self.hits += len(ids) - len(missing)
        features = torch.stack([self.features[i] for i in ids])
        was_training = self.head.training
        self.head.eval()
        try:
            with torch.no_grad():
                return self.head(features).detach()
        finally:
            self.head.train(was_training)
