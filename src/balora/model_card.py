"""The model card of a trained run: the adapter folder's ``README.md``, filled from the run.

PEFT saves a template card ("More Information Needed") with every adapter;
:func:`write_model_card` replaces it with one that says what the adapter is and how it was made:
YAML front matter in the hub's style (``base_model``, ``library_name``, ``pipeline_tag``,
``tags``), then the method and its settings (the regularisers' RESOLVED values: paper defaults
filled in), the base model, the data, the training budget, the run's evaluation metrics, the
library versions, the command that reproduces the run and how to load the adapter. The run's
``config.yaml`` is copied beside the card as ``balora_config.yaml``, so that command works from
the adapter folder alone.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from balora.assets import packaged_model, portable_name
from balora.config import CLASSIFICATION, RegularizerConfig, RunConfig
from balora.methods import MethodSpec, parse_method
from balora.objectives.lambdas import LambdaSchedule

__all__ = ["CARD_FILE", "CONFIG_COPY", "LIBRARIES", "write_model_card"]

CARD_FILE = "README.md"
#: The run's config.yaml, copied into the adapter folder (the card's reproduce command reads it).
CONFIG_COPY = "balora_config.yaml"
#: The distributions whose versions the card records.
LIBRARIES = ("balora", "torch", "transformers", "peft", "datasets", "accelerate")

#: Entries of metrics.json that describe the data, with their label on the card.
_DATA_FACTS = {
    "train_examples": "training examples",
    "eval_examples": "evaluation examples",
    "train_source": "training rows from",
    "split": "split",
    "train_templates": "training templates",
    "test_templates": "test templates",
}


def write_model_card(
    adapter_dir: str | os.PathLike,
    config: RunConfig,
    metrics: Mapping[str, Any],
    *,
    evaluation: Mapping[str, Any],
    saved_config: str | os.PathLike,
    data_name: str,
) -> Path:
    """Write ``adapter_dir/README.md`` (replacing PEFT's template) and ``adapter_dir/balora_config.yaml``.

    ``metrics``: the run's ``metrics.json`` entries (steps, data sizes, skipped rows, times);
    ``evaluation``: the evaluation's own metrics, tabulated on the card; ``saved_config``: the
    run's ``config.yaml``; ``data_name``: how the card's title names the data. Returns the card's path.
    """
    folder = Path(adapter_dir)
    shutil.copyfile(saved_config, folder / CONFIG_COPY)
    spec = parse_method(config.adapter.method)
    base = portable_name(config.model.name)
    labels = _labels(folder)
    sections = [
        _front_matter(config, spec, base),
        f"# {spec.name} on {data_name}\n\n{_summary(config, spec, base)}",
        _method_section(config, spec, len(labels) if labels else None),
        _base_model_section(config, base),
        _data_section(config, metrics, labels),
        _budget_section(config, metrics),
        _evaluation_section(evaluation, metrics),
        _versions_section(),
        _reproduce_section(config),
        _loading_section(config, spec, base),
    ]
    path = folder / CARD_FILE
    path.write_text("\n\n".join(sections) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- sections


def _front_matter(config: RunConfig, spec: MethodSpec, base: str) -> str:
    classification = config.family == CLASSIFICATION
    tags = ["balora"]
    if spec.full:
        tags.append(f"base_model:finetune:{base}")
    else:
        tags += [f"base_model:adapter:{base}", "lora"]
        init = spec.base.split("_niter_")[0]
        if init != "lora":
            tags.append(init)
    if spec.regularized:
        tags.append("ba-lora")
    tags += ["transformers", "text-classification" if classification else "text-generation"]
    data = {
        "base_model": base,
        "library_name": "transformers" if spec.full else "peft",
        "pipeline_tag": "text-classification" if classification else "text-generation",
        "tags": tags,
    }
    return "---\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True) + "---"


def _summary(config: RunConfig, spec: MethodSpec, base: str) -> str:
    what = "sequence classifier" if config.family == CLASSIFICATION else "causal language model"
    if spec.full:
        made = f"The {what} `{base}`, every weight fine-tuned"
    else:
        made = f"A PEFT adapter (method `{spec.name}`) for the {what} `{base}`"
    return (f"{made}, trained with balora {_version('balora')} (BA-LoRA and its baselines on PEFT and "
            "transformers).")


def _method_section(config: RunConfig, spec: MethodSpec, num_classes: int | None) -> str:
    a = config.adapter
    rows = [("method", f"`{spec.name}`" + (f" (asked as `{a.method}`)" if a.method != spec.name else ""))]
    if spec.full:
        rows.append(("adapter", "none: every weight trained"))
    else:
        rows += [("initialisation", _init_text(spec)), ("rank r", a.rank),
                 ("alpha", a.alpha if a.alpha is not None else f"{a.rank} (= r)"), ("dropout", a.dropout),
                 ("target modules", ", ".join(a.target_modules) if isinstance(a.target_modules, list)
                  else a.target_modules or "PEFT's default for the architecture")]
        if spec.base == "loraplus":
            rows.append(("optimiser", f"LoRA+ (PEFT create_loraplus_optimizer): B at {a.loraplus_lr_ratio}× "
                                      "the learning rate of A"))
        elif spec.base == "lorafa":
            rows.append(("optimiser", "LoRA-FA (PEFT create_lorafa_optimizer): A frozen at its init, B trained"))
        if spec.base == "adalora":
            rows.append(("saved as", "AdaLoRA adapter at the ranks its budget schedule kept"))
        elif spec.mutates_base:
            rows.append(("saved as", f"plain LoRA of rank {2 * a.rank} (PEFT's conversion), for the ORIGINAL "
                                     "base model"))
    text = "## Method and settings\n\n" + _table(("setting", "value"), rows) + _routing_text(config)
    if not spec.regularized:
        return text + ("\n\nNo BA-LoRA regulariser." if config.routing.general_data else
                       "\n\nNo regulariser: the task loss alone.")
    r = config.regularizers.resolved(config.family)
    return (text + "\n\nBA-LoRA regularisers, L = L_task + λ1·L_CR + λ2·L_DR + λ3·L_SVD (resolved: the paper's "
            f"{config.family} defaults where the config left a value unset):\n\n"
            + _table(("setting", "value"), _regularizer_rows(r, config.family, num_classes)))


def _routing_text(config: RunConfig) -> str:
    """The I-LoRA routing terms of the loss, when ``routing.general_data`` is set ("" otherwise)."""
    g = config.routing
    if not g.general_data:
        return ""
    return ("\n\nI-LoRA routing tuning: every task batch also draws "
            f"{g.general_ratio} batch(es) of general data (`{g.general_data}`), and the loss adds "
            f"ε_kl·KL(p_base ‖ p_adapted) + ε_l2·‖s·B·A·x‖² on them, with ε_kl = {g.epsilon_kl}, "
            f"ε_l2 = {g.epsilon_l2}.")


def _init_text(spec: MethodSpec) -> str:
    return spec.description


def _regularizer_rows(r: RegularizerConfig, family: str, num_classes: int | None) -> list[tuple[str, Any]]:
    consistency, focus = r.schedules()
    rows = [("λ1 consistency", r.lambda_consistency), ("λ1 schedule", _schedule_text(consistency)),
            ("consistency kind", r.consistency_kind)]
    if r.consistency_kind == "kl":
        rows.append(("temperature T", r.temperature))
    rows += [("λ2 diversity", r.lambda_diversity), ("λ3 SVD", r.lambda_svd),
             ("λ2, λ3 schedule", _schedule_text(focus)), ("diversity kind", r.diversity_kind)]
    if r.diversity_kind == "entropy":
        rows.append(("top-K of the entropy", r.top_k))
    rows += [("SVD k", r.svd_k), ("SVD normalisation", r.svd_normalize)]
    if family == CLASSIFICATION:
        policy = r.svd_k_policy
        if policy == "clamp":
            policy += " (k = min(N, D) - 1 for a batch of N rows when k >= D classes"
            policy += f"; D = {num_classes} here)" if num_classes else ")"
        rows += [("SVD k policy", policy), ("teacher feature cache", r.teacher_cache)]
    else:
        rows.append(("SVD solver", r.svd_solver))
        if r.svd_solver != "exact":
            rows.append(("randomized SVD oversampling, power iterations", f"{r.svd_oversample}, {r.svd_niter}"))
    return rows


def _schedule_text(schedule: LambdaSchedule) -> str:
    if schedule.kind == "linear_warmup":
        return f"linear_warmup (0 to 1 over the first {schedule.warmup_ratio:g} of the steps)"
    if schedule.kind == "cosine":
        return f"cosine (from 1 down to {schedule.floor:g} of the base value)"
    if schedule.kind == "two_phase":
        return (f"two_phase (off for the first {schedule.warmup_ratio:g} of the steps, then a linear ramp over "
                f"{schedule.ramp_ratio:g})")
    return schedule.kind


def _base_model_section(config: RunConfig, base: str) -> str:
    sentences = [f"`{base}`."]
    asset = packaged_model(config.model.name)
    if asset is not None:
        sentences.append(f"Trained on the copy shipped in the PyPI package `{asset.package}` "
                         f"{asset.installed_version()} (`model.name: {config.model.name}`); balora resolves the "
                         "hub id to that copy offline.")
        if asset.gguf_file:
            sentences.append(f"That copy is the GGUF file `{asset.gguf_file}` dequantised to float32: its weights "
                             "carry the quantisation's rounding, so on the hub model this adapter sees slightly "
                             "different base weights.")
    sentences.append(f"Inputs are truncated to {config.model.max_length} tokens.")
    return "## Base model\n\n" + " ".join(sentences)


def _data_section(config: RunConfig, metrics: Mapping[str, Any], labels: list[str] | None) -> str:
    d = config.data
    rows: list[tuple[str, Any]] = [("task", d.task)]
    if d.train_file:
        rows.append(("training file", Path(d.train_file).name))
    if d.eval_file:
        rows.append(("evaluation file", Path(d.eval_file).name))
    rows += [(label, metrics[key]) for key, label in _DATA_FACTS.items() if key in metrics]
    if "total" in metrics:
        rows.append(("evaluation problems", metrics["total"]))
    skipped = metrics.get("skipped_rows") or {}
    rows.append(("skipped rows", "; ".join(f"{reason}: {n}" for reason, n in skipped.items()) or "none"))
    if labels:
        rows.append(("classes (id: name)", ", ".join(f"{i}: {name}" for i, name in enumerate(labels))))
    return "## Data\n\n" + _table(("item", "value"), rows)


def _budget_section(config: RunConfig, metrics: Mapping[str, Any]) -> str:
    t = config.train
    steps = metrics.get("global_steps")
    planned = f"max_steps {t.max_steps}" if t.max_steps > 0 else f"{t.epochs:g} epoch(s)"
    rows = [("optimiser steps", f"{steps} ({planned})" if steps is not None else planned),
            ("batch size", f"{t.batch_size} × {t.gradient_accumulation_steps} accumulation step(s)"),
            ("learning rate", f"{t.learning_rate:g} (AdamW, {t.lr_scheduler} schedule, "
                              f"warm-up ratio {t.warmup_ratio:g})"),
            ("weight decay", t.weight_decay), ("precision", t.precision), ("seed", t.seed)]
    if t.head_learning_rate is not None:
        rows.insert(3, ("head learning rate", f"{t.head_learning_rate:g} (same schedule)"))
    if "trainable_parameters" in metrics:
        rows.append(("trainable parameters", f"{metrics['trainable_parameters']:,}"))
    if "train_seconds" in metrics:
        rows.append(("training time (s)", f"{metrics['train_seconds']:.0f}"))
    return "## Training budget\n\n" + _table(("item", "value"), rows)


def _evaluation_section(evaluation: Mapping[str, Any], metrics: Mapping[str, Any]) -> str:
    rows = [(key, _value(value)) for key, value in evaluation.items()]
    head = f"Headline metric: `{metrics['headline_metric']}`.\n\n" if metrics.get("headline_metric") else ""
    body = _table(("metric", "value"), rows) if rows else "The run evaluated nothing."
    return "## Evaluation of the run\n\n" + head + body


def _versions_section() -> str:
    rows = [("python", platform.python_version())] + [(name, _version(name)) for name in LIBRARIES]
    return "## Library versions\n\n" + _table(("library", "version"), rows)


def _reproduce_section(config: RunConfig) -> str:
    text = ("## Reproduce\n\n`balora_config.yaml` beside this card is the run's config; in this folder:\n\n"
            "```bash\nbalora train balora_config.yaml\n```")
    if config.data.train_file or config.data.eval_file:
        text += ("\n\nThe config names the data files by the paths the run read them from: put the files there, "
                 "or point to them with `data.train_file=... data.eval_file=...` after the file name.")
    return text


def _loading_section(config: RunConfig, spec: MethodSpec, base: str) -> str:
    classification = config.family == CLASSIFICATION
    auto = "AutoModelForSequenceClassification" if classification else "AutoModelForCausalLM"
    if spec.full:
        lines = [f"from transformers import AutoTokenizer, {auto}", "",
                 'model = {}.from_pretrained(".").eval()  # this folder'.format(auto),
                 'tokenizer = AutoTokenizer.from_pretrained(".")']
    elif classification:
        lines = ["from peft import PeftModel",
                 f"from transformers import AutoConfig, AutoTokenizer, {auto}", "",
                 'config = AutoConfig.from_pretrained(".")  # this folder: the labels are config.id2label',
                 f"base = {auto}.from_pretrained({base!r}, config=config)",
                 'model = PeftModel.from_pretrained(base, ".").eval()',
                 'tokenizer = AutoTokenizer.from_pretrained(".")']
    else:
        lines = ["from peft import PeftModel", f"from transformers import AutoTokenizer, {auto}", "",
                 f"base = {auto}.from_pretrained({base!r})",
                 'model = PeftModel.from_pretrained(base, ".").eval()  # this folder',
                 'tokenizer = AutoTokenizer.from_pretrained(".")']
    if classification:
        lines += ['batch = tokenizer(["a text to classify"], return_tensors="pt")',
                  "print(model.config.id2label[model(**batch).logits.argmax(-1).item()])"]
    return "## How to load\n\n```python\n" + "\n".join(lines) + "\n```"


# ----------------------------------------------------------------------------- helpers


def _labels(folder: Path) -> list[str] | None:
    """The class names saved in ``folder/config.json`` (a classifier), in id order, else None."""
    path = folder / "config.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("problem_type") == "regression" or not data.get("id2label"):
        return None
    return [name for _, name in sorted((int(i), name) for i, name in data["id2label"].items())]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(header: tuple[str, str], rows: list[tuple[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {cell(key)} | {cell(value)} |" for key, value in rows]
    return "\n".join(lines)
