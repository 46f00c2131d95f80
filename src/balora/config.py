"""Validated run configuration.

A run is described by :class:`RunConfig`, a tree of small dataclasses that check their values in
``__post_init__``. YAML files and ``key=value`` command-line overrides are thin layers over them:
``load_config("run.yaml", ["train.learning_rate=1e-4", "adapter.method=pissa"])``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balora.objectives.lambdas import LambdaSchedule, parse_schedule

TASK_FAMILIES = ("classification", "generation")
CONSISTENCY_KINDS = ("kl", "mse", "cosine")
DIVERSITY_KINDS = ("covariance", "entropy")
SVD_NORMALIZATIONS = ("nuclear", "frobenius")
SVD_SOLVERS = ("auto", "exact", "randomized")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class RegularizerConfig:
    """Weights and settings of the three BA-LoRA regularisers (paper eq. 8 and 13).

    Used only by methods with ``+reg`` (``balora`` = ``pissa+reg``). ``None`` fields take the
    paper's default for the task family (see :meth:`paper_defaults`).
    """

    lambda_consistency: float | None = None  # λ1
    lambda_diversity: float | None = None  # λ2
    lambda_svd: float | None = None  # λ3
    svd_k: int | None = None  # k in eq. 7 / 12
    temperature: float = 2.0  # T in eq. 4 / 9
    top_k: int = 20  # K in eq. 10-11 (generation, or diversity_kind="entropy")
    consistency_kind: str = "kl"  # kl (paper) | mse | cosine (requested ablation)
    diversity_kind: str | None = None  # covariance (classification) | entropy (generation)
    svd_normalize: str | None = None  # nuclear (eq. 7) | frobenius (eq. 12)
    consistency_schedule: Any = None  # constant | linear_warmup | cosine | two_phase | {kind: .., ..}
    focus_schedule: Any = None  # schedule of λ2 and λ3
    teacher_cache: bool = False  # classification: cache the frozen teacher's pooled features
    svd_solver: str = "auto"  # generation: auto (exact via QR of a frozen head) | exact | randomized
    svd_oversample: int = 10  # randomized SVD: basis columns beyond svd_k
    svd_niter: int = 2  # randomized SVD: power iterations

    def __post_init__(self) -> None:
        for name in ("lambda_consistency", "lambda_diversity", "lambda_svd"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"regularizers.{name} must be >= 0, got {value}")
        if self.svd_k is not None and self.svd_k < 1:
            raise ConfigError(f"regularizers.svd_k must be >= 1, got {self.svd_k}")
        if self.temperature <= 0:
            raise ConfigError(f"regularizers.temperature must be > 0, got {self.temperature}")
        if self.top_k < 1:
            raise ConfigError(f"regularizers.top_k must be >= 1, got {self.top_k}")
        _check_choice("regularizers.consistency_kind", self.consistency_kind, CONSISTENCY_KINDS)
        if self.diversity_kind is not None:
            _check_choice("regularizers.diversity_kind", self.diversity_kind, DIVERSITY_KINDS)
        if self.svd_normalize is not None:
            _check_choice("regularizers.svd_normalize", self.svd_normalize, SVD_NORMALIZATIONS)
        _check_choice("regularizers.svd_solver", self.svd_solver, SVD_SOLVERS)
        if self.svd_oversample < 0 or self.svd_niter < 0:
            raise ConfigError("regularizers.svd_oversample and svd_niter must be >= 0")
        for name in ("consistency_schedule", "focus_schedule"):
            value = getattr(self, name)
            if value is not None:
                try:
                    parse_schedule(value)
                except ValueError as err:
                    raise ConfigError(f"regularizers.{name}: {err}") from None

    @staticmethod
    def paper_defaults(family: str) -> dict[str, Any]:
        """The paper's settings (section 3.1, B.4) for 'classification' or 'generation'."""
        _check_choice("task family", family, TASK_FAMILIES)
        if family == "classification":
            return dict(lambda_consistency=0.15, lambda_diversity=0.03, lambda_svd=0.03, svd_k=5,
                        diversity_kind="covariance", svd_normalize="nuclear",
                        consistency_schedule="constant", focus_schedule="constant")
        return dict(lambda_consistency=0.025, lambda_diversity=0.005, lambda_svd=0.005, svd_k=10,
                    diversity_kind="entropy", svd_normalize="frobenius",
                    consistency_schedule="cosine", focus_schedule="two_phase")

    def resolved(self, family: str) -> "RegularizerConfig":
        """A copy with every ``None`` replaced by the paper's default for ``family``."""
        defaults = self.paper_defaults(family)
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key, default in defaults.items():
            if values[key] is None:
                values[key] = default
        return RegularizerConfig(**values)

    def schedules(self) -> tuple[LambdaSchedule, LambdaSchedule]:
        """(schedule of λ1, schedule of λ2 and λ3)."""
        return parse_schedule(self.consistency_schedule), parse_schedule(self.focus_schedule)


@dataclass
class ModelConfig:
    """Which pre-trained model to adapt."""

    name: str = "minilm"  # short asset name (balora.assets), hub id, or local path
    max_length: int = 128

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name is empty")
        if self.max_length < 8:
            raise ConfigError(f"model.max_length must be >= 8, got {self.max_length}")


@dataclass
class AdapterConfig:
    """The fine-tuning method and its low-rank adapter.

    ``method``: ``lora`` | ``pissa`` | ``pissa_niter_N`` | ``dora`` | ``full`` | any other PEFT
    ``init_lora_weights`` value (``gaussian``, ``olora``, ...); add ``+reg`` to any of them for the
    three regularisers. ``balora`` is ``pissa+reg``.
    """

    method: str = "balora"
    rank: int = 8
    alpha: float | None = None  # None = rank (scaling 1)
    dropout: float = 0.0
    target_modules: list[str] | str | None = None  # None = PEFT's default for the architecture

    def __post_init__(self) -> None:
        from balora.methods import parse_method  # local import: methods imports nothing of ours

        try:
            parse_method(self.method)
        except ValueError as err:
            raise ConfigError(f"adapter.method: {err}") from None
        if self.rank < 1:
            raise ConfigError(f"adapter.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"adapter.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class DataConfig:
    """Which task to train on (see balora.data.load_task)."""

    task: str = "reuters-r8"
    train_file: str | None = None
    eval_file: str | None = None
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    format: str = "auto"  # generation: alpaca | metamath | codefeedback | prompt_response | chat | sharegpt
    train_on: str = "last"  # generation: last | all_assistant (which assistant turns are targets)

    def __post_init__(self) -> None:
        _check_choice("data.train_on", self.train_on, ("last", "all_assistant"))
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")


@dataclass
class TrainConfig:
    """Optimisation settings, passed on to transformers.TrainingArguments."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    batch_size: int = 16
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    lr_scheduler: str = "linear"
    logging_steps: int = 10
    save_steps: int = 200  # checkpoint every N steps (resumable runs)
    save_total_limit: int = 2
    seed: int = 42
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    loss_chunk_size: int = 512  # generation: valid tokens per chunk of the output-head losses (memory ~ chunk x vocab)
    group_by_length: bool = False  # batch examples of similar length together (less padding)

    def __post_init__(self) -> None:
        if self.loss_chunk_size < 1:
            raise ConfigError(f"train.loss_chunk_size must be >= 1, got {self.loss_chunk_size}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("train.epochs must be > 0 (or set train.max_steps > 0)")
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "logging_steps",
                     "save_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]


@dataclass
class GenerationEvalConfig:
    """How a generation run is evaluated after training (ignored by classification runs)."""

    benchmark: str | None = None  # gsm8k (answer check) | math | None = chosen by data.task
    max_new_tokens: int = 256
    batch_size: int = 16
    max_examples: int | None = None  # evaluate on the first N test problems
    perplexity_corpus: str | None = None  # e.g. grimm-tales: also report perplexity (adapted vs pre-trained)
    perplexity_stride: int = 512

    def __post_init__(self) -> None:
        if self.benchmark is not None:
            _check_choice("eval.benchmark", self.benchmark, GENERATION_BENCHMARKS)
        for name in ("max_new_tokens", "batch_size", "perplexity_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"eval.max_examples must be >= 1, got {self.max_examples}")


GENERATION_BENCHMARKS = ("gsm8k", "math")


@dataclass
class RunConfig:
    """Everything one training run needs."""

    name: str | None = None  # run directory name prefix; default: "<task>-<method>"
    output_dir: str = "runs"
    family: str = "classification"
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    regularizers: RegularizerConfig = field(default_factory=RegularizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: GenerationEvalConfig = field(default_factory=lambda: GenerationEvalConfig())

    def __post_init__(self) -> None:
        _check_choice("family", self.family, TASK_FAMILIES)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.data.task}-{self.adapter.method}".replace("+", "-")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; known: {', '.join(sorted(names))}"
        )
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = from_dict(hint, value or {}, f"{where}{key}.")
        else:
            values[key] = _coerce(value, hint, where + key)
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce YAML scalars to a field's type (int for float fields, etc.) or fail clearly."""
    if value is None:
        return None
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
    for option in options:
        if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # PyYAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if option is bool and isinstance(value, bool):
            return value
        if option is str and isinstance(value, str):
            return value
        if typing.get_origin(option) is list and isinstance(value, list):
            return value
        if option is Any:
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{where} must be {expected}, got {value!r}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=2)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    data = apply_overrides(data, list(overrides or []))
    return from_dict(RunConfig, data)
