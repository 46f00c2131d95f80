"""Validated run configuration.

A run is described by :class:`RunConfig`, a tree of small dataclasses that check their own values
in ``__post_init__``; ``RunConfig`` then cross-checks the sections against each other and against
the task family, so that every inconsistent combination (a generation-only key in a
classification run, a setting that the chosen method or loss never reads, ...) fails when the
config is loaded, with one line naming the key. Every float must be finite (NaN or inf is an
error), and a schedule given as a mapping must hold a kind name and numbers.

YAML files and ``key=value`` command-line overrides are thin layers over the dataclasses:
``load_config("run.yaml", ["train.learning_rate=1e-4", "adapter.method=pissa"])``. Every field
has a help text (``metadata["help"]``); :func:`describe_config` lists them (``balora config``).
A field whose metadata names a ``family`` is read by runs of that family only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from balora.objectives.lambdas import LambdaSchedule, parse_schedule
from balora.regularizers.common import (
    CONSISTENCY_KINDS,
    DIVERSITY_KINDS,
    SVD_K_POLICIES,
    SVD_NORMALIZATIONS,
    SVD_SOLVERS,
    check_choice,
)

TASK_FAMILIES = ("classification", "generation")
CLASSIFICATION, GENERATION = TASK_FAMILIES
GENERATION_BENCHMARKS = ("gsm8k", "math")
PRECISIONS = ("fp32", "bf16", "fp16")
TRAIN_ON = ("last", "all_assistant")
#: The offline generation task: template-split GSM8K variants, evaluated with the gsm8k check.
GSM_SYMBOLIC_TASK = "gsm-symbolic"


logger = logging.getLogger("balora")

class ConfigError(ValueError):
    """A configuration value is missing, unknown, out of range or inconsistent with another."""


def option(default: Any = None, *, help: str, family: str | None = None,
           factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its help text (and the only family that reads it, if any)."""
    metadata = {"help": help, **({"family": family} if family else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> None:
    try:
        check_choice(value, name, choices)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _check_finite(section: Any, prefix: str) -> None:
    """Every float field of ``section`` is finite: NaN or inf is an error naming the key."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}.{f.name} must be a finite number, got {value}")


def _check_schedule(value: Any, name: str) -> None:
    """A schedule is a kind name or a mapping of a kind name and numeric ratios (a one-line error)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{name} has the key {key!r}; schedule fields are names (kind, warmup_ratio, ...)")
            if key == "kind":
                if not isinstance(item, str):
                    raise ConfigError(f"{name}.kind must be a schedule name, got {item!r}")
            elif isinstance(item, bool) or not isinstance(item, (int, float)):
                raise ConfigError(f"{name}.{key} must be a number, got {item!r}")
    try:
        parse_schedule(value)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{name}: {err}") from None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _is_set(section: Any, name: str) -> bool:
    """True when ``section.name`` differs from the field's default."""
    f = next(f for f in dataclasses.fields(section) if f.name == name)
    return getattr(section, name) != _default(f)


#: The paper's settings (section 3.1, B.4) of the regulariser fields that default to None.
PAPER_DEFAULTS: dict[str, dict[str, Any]] = {
    CLASSIFICATION: dict(lambda_consistency=0.15, lambda_diversity=0.03, lambda_svd=0.03, svd_k=5,
                         diversity_kind="covariance", svd_normalize="nuclear",
                         consistency_schedule="constant", focus_schedule="constant"),
    GENERATION: dict(lambda_consistency=0.025, lambda_diversity=0.005, lambda_svd=0.005, svd_k=10,
                     diversity_kind="entropy", svd_normalize="frobenius",
                     consistency_schedule="cosine", focus_schedule="two_phase"),
}


def _paper(key: str) -> str:
    """The help text's note on a None default: the paper's value in each family."""
    values = ", ".join(f"{PAPER_DEFAULTS[family][key]} {family}" for family in TASK_FAMILIES)
    return f"None = paper default ({values})"


@dataclass
class RegularizerConfig:
    """Weights and settings of the three BA-LoRA regularisers (paper eq. 8 and 13).

    Read only by methods with ``+reg`` (``balora`` = ``pissa+reg``). ``None`` fields take the
    paper's default for the task family (see :meth:`paper_defaults`).
    """

    lambda_consistency: float | None = option(
        help=f"λ1, weight of the consistency term (eq. 4 / 9); {_paper('lambda_consistency')}")
    lambda_diversity: float | None = option(
        help=f"λ2, weight of the diversity term (eq. 5-6 / 10-11); {_paper('lambda_diversity')}")
    lambda_svd: float | None = option(help=f"λ3, weight of the SVD term (eq. 7 / 12); {_paper('lambda_svd')}")
    svd_k: int | None = option(help=f"k, number of top singular values in eq. 7 / 12; {_paper('svd_k')}")
    temperature: float = option(
        2.0, help="T, softmax temperature of the KL consistency (eq. 4 / 9; paper: 2); "
                  "read with consistency_kind=kl only")
    top_k: int = option(
        20, help="K, top probabilities in the entropy diversity (eq. 10-11; paper: 20); "
                 "read with diversity_kind=entropy only")
    consistency_kind: str = option(
        "kl", help="consistency loss: kl (paper, eq. 4 / 9) | cosine | mse | mse_normalized (ablations)")
    diversity_kind: str | None = option(
        help="diversity loss: covariance (eq. 5-6; classification only) | entropy (eq. 10-11); "
             f"{_paper('diversity_kind')}")
    svd_normalize: str | None = option(
        help="SVD term normalisation: nuclear (eq. 7; classification only) | frobenius (eq. 12); "
             f"{_paper('svd_normalize')}")
    consistency_schedule: Any = option(
        help=f"schedule of λ1: constant | linear_warmup | cosine | two_phase | {{kind: ..., options}}; "
             f"{_paper('consistency_schedule')}")
    focus_schedule: Any = option(
        help=f"schedule of λ2 and λ3 (forms of consistency_schedule); {_paper('focus_schedule')}")
    teacher_cache: bool = option(
        False, family=CLASSIFICATION,
        help="cache the frozen teacher's pooled head input per training example (one teacher "
             "forward per example instead of one per step); needs a head on pooled features")
    teacher: str = option(
        "exact", family=GENERATION,
        help="the frozen teacher of the consistency term: exact (the snapshot teacher, a forward per step) | "
             "precomputed (top-K log-probabilities stored by `balora teacher precompute`, no teacher forward; "
             "consistency_kind kl only)")
    teacher_path: str | None = option(
        family=GENERATION, help="teacher: precomputed: the directory `balora teacher precompute` wrote")
    svd_k_policy: str = option(
        "clamp", family=CLASSIFICATION,
        help="SVD term with svd_k >= number of classes D: clamp (k = D-1, logged once, so the "
             "term keeps a gradient) | literal (the paper's k as given; k >= D makes it the constant -1)")
    svd_solver: str = option(
        "auto", family=GENERATION,
        help="how the SVD term gets the top singular values: auto (exact via a QR of a frozen "
             "output head, randomized otherwise) | exact (error if the head is not a frozen "
             "linear map) | randomized")
    svd_oversample: int = option(
        10, family=GENERATION, help="randomized SVD: basis columns beyond svd_k")
    svd_niter: int = option(2, family=GENERATION, help="randomized SVD: power iterations")
    global_batch: bool = option(
        False, help="several processes (accelerate launch): compute the batch-level terms (covariance eq. 5-6, "
                    "SVD eq. 7 / 12) on the rows of all processes, gathered with their gradients, so they equal "
                    "the one-process value on the global batch | false: on each process's micro-batch")
    lambdas: str = option(
        "fixed", help="fixed (λ1-3 as set, or the paper's) | auto (calibrated at the start of the run by "
                      "gradient shares, paper D.1; see balora calibrate)")
    calibration_mode: str = option(
        "scale", help="lambdas=auto: scale (one factor on the λs, keeping their ratios) | shares (each "
                      "term its own λ for its part of the share)")
    calibration_share: float = option(
        0.1, help="lambdas=auto: gradient norm of the regularisers together, as a fraction of the task "
                  "loss's")
    calibration_terms: list[str] | None = option(
        help="lambdas=auto: the terms whose λ is calibrated (consistency, diversity, svd), e.g. [consistency] "
             "to give only λ1 the share and keep λ2, λ3 as set; None = every term with λ > 0")

    def __post_init__(self) -> None:
        _check_finite(self, "regularizers")
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
        _choice(self.consistency_kind, "regularizers.consistency_kind", CONSISTENCY_KINDS)
        if self.diversity_kind is not None:
            _choice(self.diversity_kind, "regularizers.diversity_kind", DIVERSITY_KINDS)
        if self.svd_normalize is not None:
            _choice(self.svd_normalize, "regularizers.svd_normalize", SVD_NORMALIZATIONS)
        _choice(self.svd_k_policy, "regularizers.svd_k_policy", SVD_K_POLICIES)
        _choice(self.svd_solver, "regularizers.svd_solver", SVD_SOLVERS)
        _choice(self.teacher, "regularizers.teacher", ("exact", "precomputed"))
        if self.teacher == "precomputed":
            if not self.teacher_path:
                raise ConfigError("regularizers.teacher=precomputed needs regularizers.teacher_path "
                                  "(the directory of `balora teacher precompute CONFIG --output DIR`)")
            if self.consistency_kind != "kl":
                raise ConfigError("regularizers.teacher=precomputed stores the teacher's top-K log-probabilities: "
                                  f"consistency_kind must be kl, got {self.consistency_kind}")
        _choice(self.lambdas, "regularizers.lambdas", ("fixed", "auto"))
        _choice(self.calibration_mode, "regularizers.calibration_mode", ("scale", "shares"))
        if self.calibration_share <= 0:
            raise ConfigError(f"regularizers.calibration_share must be > 0, got {self.calibration_share}")
        if self.calibration_terms is not None:
            unknown = [t for t in self.calibration_terms if t not in ("consistency", "diversity", "svd")]
            if not self.calibration_terms or unknown or len(set(self.calibration_terms)) != len(self.calibration_terms):
                raise ConfigError("regularizers.calibration_terms must name consistency, diversity and/or svd, "
                                  f"each once, got {self.calibration_terms}")
        for name in ("svd_oversample", "svd_niter"):
            if getattr(self, name) < 0:
                raise ConfigError(f"regularizers.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("consistency_schedule", "focus_schedule"):
            value = getattr(self, name)
            if value is not None:
                _check_schedule(value, f"regularizers.{name}")

    @staticmethod
    def paper_defaults(family: str) -> dict[str, Any]:
        """The paper's settings (section 3.1, B.4) for 'classification' or 'generation'."""
        _choice(family, "task family", TASK_FAMILIES)
        return dict(PAPER_DEFAULTS[family])

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

    name: str = option("minilm", help="short asset name (balora.assets), hub id, or local path")
    max_length: int = option(128, help="tokens per example; longer examples are truncated")

    def __post_init__(self) -> None:
        _check_finite(self, "model")
        if not self.name:
            raise ConfigError("model.name is empty")
        if self.max_length < 8:
            raise ConfigError(f"model.max_length must be >= 8, got {self.max_length}")


@dataclass
class AdapterConfig:
    """The fine-tuning method and its low-rank adapter.

    ``method``: one of the names in :mod:`balora.methods` (``full``, ``lora``, ``gaussian``,
    ``dora``, ``adalora``, ``loraplus``, ``lorafa``, ``lora_ga``, ``pissa``, ``pissa_niter_N``,
    ``corda``, ``milora``, ``olora``); add ``+reg`` to any of them for the three regularisers.
    ``balora`` is ``pissa+reg``. The ``adalora_*``, ``loraplus_*``, ``lora_ga_*`` and ``corda_*``
    keys and ``init_examples`` are read by their method only: setting one for another method is
    an error.
    """

    method: str = option(
        "balora", help="full | lora | gaussian | dora | adalora | loraplus | lorafa | lora_ga | pissa | "
                       "pissa_niter_N | corda | milora | olora, each optionally +reg (the three "
                       "regularisers); balora = pissa+reg")
    rank: int = option(8, help="adapter rank r (adalora: the average rank it prunes down to)")
    alpha: float | None = option(
        help="LoRA alpha (scaling alpha / r); None = rank (scaling 1; adalora: its initial rank, scaling 1)")
    dropout: float = option(0.0, help="dropout on the adapter's input, in [0, 1)")
    target_modules: list[str] | str | None = option(
        help="module names that get an adapter; None = PEFT's default for the architecture")
    loraplus_lr_ratio: float = option(
        16.0, help="loraplus: learning rate of B over that of A (ηB/ηA; 16, the LoRA+ paper's and "
                   "PEFT's recommendation); A trains at train.learning_rate")
    adalora_init_r: int | None = option(
        help="adalora: initial rank of every adapted matrix; None = rank + rank // 2 (at least rank + 1; "
             "12 for rank 8, PEFT's defaults)")
    adalora_target_r: int | None = option(
        help="adalora: average rank the budget is pruned down to; None = rank")
    adalora_tinit: float = option(
        0.1, help="adalora: fraction of the training steps before pruning starts (AdaLoRA's t_i)")
    adalora_tfinal: float = option(
        0.2, help="adalora: fraction of the training steps at the end that train the final budget "
                  "(AdaLoRA's t_f; at least one step, so the saved ranks are those trained)")
    adalora_delta_t: int = option(10, help="adalora: steps between two budget reallocations (AdaLoRA's ΔT)")
    adalora_orth_reg_weight: float = option(
        0.5, help="adalora: weight of the orthogonality penalty on P and Q (PEFT's default)")
    init_examples: int = option(
        64, help="lora_ga | corda: training examples that estimate the task gradient (LoRA-GA) or "
                 "the input covariance (CorDA) before the adapter is built")
    lora_ga_direction: str = option(
        "ArB2r", help="lora_ga: which gradient singular vectors go to A and B: ArB2r (PEFT's "
                      "recommendation) | A2rBr | ArBr | random")
    lora_ga_scale: str = option(
        "stable", help="lora_ga: scaling of the init: stable (LoRA-GA's) | weight_svd | gd_scale | unit")
    lora_ga_stable_gamma: int = option(16, help="lora_ga: γ of the stable scaling (LoRA-GA: 16)")
    corda_mode: str = option(
        "ipm", help="corda: ipm (instruction-previewed: the r largest components of W·C, the mode of "
                    "the paper's Table 1) | kpm (knowledge-preserved: the r smallest)")

    def __post_init__(self) -> None:
        from balora.methods import parse_method  # local import: methods imports nothing of ours

        try:
            spec = parse_method(self.method)
        except ValueError as err:
            raise ConfigError(f"adapter.method: {err}") from None
        _check_finite(self, "adapter")
        if self.rank < 1:
            raise ConfigError(f"adapter.rank must be >= 1, got {self.rank}")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"adapter.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"adapter.dropout must be in [0, 1), got {self.dropout}")
        for key, (used, when) in _ADAPTER_USES.items():
            if _is_set(self, key) and not used(spec):
                raise ConfigError(f"adapter.{key} has no effect with adapter.method={self.method}: "
                                  f"it is read only with {when}")
        if self.loraplus_lr_ratio <= 0:
            raise ConfigError(f"adapter.loraplus_lr_ratio must be > 0, got {self.loraplus_lr_ratio}")
        for key in ("adalora_init_r", "adalora_target_r"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ConfigError(f"adapter.{key} must be >= 1, got {getattr(self, key)}")
        init_r, target_r = self.adalora_ranks()
        if init_r <= target_r:
            raise ConfigError(f"adapter.adalora_init_r ({init_r}) must be > adapter.adalora_target_r ({target_r}): "
                              "AdaLoRA prunes the initial rank down to the target")
        for key in ("adalora_tinit", "adalora_tfinal"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"adapter.{key} must be in [0, 1), got {getattr(self, key)}")
        if self.adalora_tinit + self.adalora_tfinal >= 1.0:
            raise ConfigError("adapter.adalora_tinit + adapter.adalora_tfinal must be < 1: "
                              "no step would be left for pruning the budget")
        for key in ("adalora_delta_t", "init_examples", "lora_ga_stable_gamma"):
            if getattr(self, key) < 1:
                raise ConfigError(f"adapter.{key} must be >= 1, got {getattr(self, key)}")
        if self.adalora_orth_reg_weight < 0:
            raise ConfigError(f"adapter.adalora_orth_reg_weight must be >= 0, got {self.adalora_orth_reg_weight}")
        _choice(self.lora_ga_direction, "adapter.lora_ga_direction", LORA_GA_DIRECTIONS)
        _choice(self.lora_ga_scale, "adapter.lora_ga_scale", LORA_GA_SCALES)
        _choice(self.corda_mode, "adapter.corda_mode", CORDA_MODES)

    def adalora_ranks(self) -> tuple[int, int]:
        """(initial rank, target rank) of AdaLoRA, the ``None`` defaults resolved from ``rank``."""
        target_r = self.adalora_target_r if self.adalora_target_r is not None else self.rank
        init_r = self.adalora_init_r if self.adalora_init_r is not None else target_r + max(1, target_r // 2)
        return init_r, target_r


LORA_GA_DIRECTIONS = ("ArB2r", "A2rBr", "ArBr", "random")
LORA_GA_SCALES = ("stable", "weight_svd", "gd_scale", "unit")
CORDA_MODES = ("ipm", "kpm")

#: adapter.<key> -> (is it read by this method?, which methods read it)
_ADAPTER_USES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "loraplus_lr_ratio": (lambda s: s.base == "loraplus", "adapter.method=loraplus"),
    **{key: (lambda s: s.adalora, "adapter.method=adalora")
       for key in ("adalora_init_r", "adalora_target_r", "adalora_tinit", "adalora_tfinal", "adalora_delta_t",
                   "adalora_orth_reg_weight")},
    "init_examples": (lambda s: s.needs_init_data, "adapter.method=lora_ga or corda"),
    **{key: (lambda s: s.base == "lora_ga", "adapter.method=lora_ga")
       for key in ("lora_ga_direction", "lora_ga_scale", "lora_ga_stable_gamma")},
    "corda_mode": (lambda s: s.base == "corda", "adapter.method=corda"),
}


#: The metrics of the validation split (``data.validation_fraction``) are named ``validation/<metric>``;
#: the test metrics keep their plain names.
VALIDATION_PREFIX = "validation/"
#: Metrics of the out-of-distribution evaluation (data.ood_tasks): ``ood/<task>/<metric>``.
OOD_PREFIX = "ood/"


def ood_name(entry: str) -> str | None:
    """The name a ``data.ood_tasks`` entry is reported under (``ood/<name>/...``): a data file
    (by its suffix, see :mod:`balora.data.files`) by its stem, ``glue-x/yelp.tsv`` -> ``yelp``; a
    task name as it is; None for a name with a ``/`` that is not a data file."""
    from balora.data.files import data_file_stem  # local import: the data layer is heavy

    if (stem := data_file_stem(entry)) is not None:
        return stem
    return None if "/" in entry or "\\" in entry else entry


@dataclass
class DataConfig:
    """Which task to train on (balora.data.load_task for classification, SFT data for generation)."""

    task: str = option(
        "reuters-r8", help="classification: a GLUE task, reuters-r8 | reuters-r52 | election-tweets, "
                           "or files; generation: gsm-symbolic (offline), metamathqa | codefeedback | "
                           "wizardlm-evol-instruct, a hub id or a local JSONL/JSON/Parquet file")
    train_file: str | None = option(
        help="local training file (classification: CSV/TSV/JSON lines; generation: replaces data.task "
             "as the source of the training rows)")
    eval_file: str | None = option(
        help="local evaluation file (classification: test rows; generation: the eval.benchmark problems)")
    text_column: str | None = option(
        family=CLASSIFICATION, help="column of the text in the data files; None = text (or the GLUE task's own)")
    text_pair_column: str | None = option(
        family=CLASSIFICATION, help="column of the second text of a pair task; None = no pair")
    label_column: str | None = option(
        family=CLASSIFICATION, help="column of the label in the data files; None = label")
    max_train_examples: int | None = option(
        help="keep a seeded random subset of N training examples; None = all")
    max_eval_examples: int | None = option(
        family=CLASSIFICATION,
        help="keep a seeded random subset of N evaluation examples; None = all (generation: eval.max_examples)")
    validation_fraction: float | None = option(
        help="carve a seeded validation split of this fraction (0-1) out of the TRAINING data, before "
             "max_train_examples (classification: stratified by class; gsm-symbolic: by template); the run "
             "then reports validation/<metric> beside the test metrics; None = no validation split")
    class_counts: list[int] | None = option(
        family=CLASSIFICATION,
        help="imbalance study (paper Table 12): keep exactly these numbers of TRAINING examples of data.classes, "
             "e.g. [1000, 100, 10] for 100:10:1, seeded, after the validation carve; other classes are dropped "
             "from every split, the test split is not subsampled; the run adds silhouette, minority_silhouette, "
             "minority_recall and the eval features (features.npy); None = the data as it is")
    classes: list[str] | None = option(
        family=CLASSIFICATION,
        help="the class names data.class_counts applies to, one per count; None = the most frequent "
             "training classes, most frequent first")
    ood_tasks: list[str] | None = option(
        family=CLASSIFICATION,
        help="out-of-distribution evaluation: classification tasks with the same class names (any data.task "
             "name, e.g. rotten-tomatoes, sst2-validation, or a local CSV/TSV/JSON(L)/Parquet file of "
             "labelled rows, e.g. a GLUE-X test set, named by its file stem) whose evaluation splits the "
             "trained model is also scored on (max_eval_examples applies), as ood/<task>/<metric>; "
             "None = none")
    format: str = option(
        "auto", family=GENERATION,
        help="layout of the SFT rows: auto (detected from the columns) | alpaca | metamath | "
             "codefeedback | prompt_response | chat | sharegpt")
    train_on: str = option(
        "last", family=GENERATION, help="which assistant turns are targets: last | all_assistant")

    def __post_init__(self) -> None:
        _check_finite(self, "data")
        _choice(self.train_on, "data.train_on", TRAIN_ON)
        if self.format != "auto":
            from balora.data.sft.formats import FORMATS  # local import: the data layer is heavy

            _choice(self.format, "data.format", ("auto", *FORMATS))
        for name in ("max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {value}")
        if self.validation_fraction is not None and not 0.0 < self.validation_fraction < 1.0:
            raise ConfigError(f"data.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if self.class_counts is not None:
            if len(self.class_counts) < 2 or min(self.class_counts) < 1 or any(
                    isinstance(n, bool) for n in self.class_counts):
                raise ConfigError(f"data.class_counts must be 2 or more counts >= 1, got {self.class_counts}")
            if self.max_train_examples is not None:
                raise ConfigError("data.max_train_examples cannot be combined with data.class_counts "
                                  "(which sets the training examples per class)")
        if self.ood_tasks is not None:
            if not self.ood_tasks or any(not isinstance(t, str) or not t.strip() or ood_name(t) is None
                                         for t in self.ood_tasks):
                raise ConfigError("data.ood_tasks must be a list of task names (no '/') or data files "
                                  f"(.csv, .tsv, .json, .jsonl, .parquet), got {self.ood_tasks}")
            names = [ood_name(t) for t in self.ood_tasks]
            if len(set(names)) != len(names):
                raise ConfigError(f"data.ood_tasks names a task twice (a file is named by its stem): {self.ood_tasks}")
            if self.task in names:
                raise ConfigError(f"data.ood_tasks names the training task {self.task!r} itself; its "
                                  "evaluation split is already the test split")
        if self.classes is not None:
            if self.class_counts is None:
                raise ConfigError("data.classes is read only with data.class_counts")
            if len(self.classes) != len(self.class_counts):
                raise ConfigError(f"data.classes has {len(self.classes)} names for the "
                                  f"{len(self.class_counts)} data.class_counts")
            if len(set(self.classes)) != len(self.classes):
                raise ConfigError(f"data.classes names a class twice: {self.classes}")


#: transformers schedules a run cannot use: they need ``lr_scheduler_kwargs`` (min_lr, num_decay_steps)
#: or an evaluation strategy, and would fail only when training starts.
_SCHEDULERS_NOT_RUNNABLE = ("cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay",
                            "reduce_lr_on_plateau")


@dataclass
class TrainConfig:
    """Optimisation settings, passed on to transformers.TrainingArguments."""

    epochs: float = option(1.0, help="passes over the training data (ignored when max_steps > 0: set one of them)")
    max_steps: int = option(-1, help="optimiser steps; > 0 replaces epochs")
    batch_size: int = option(16, help="training examples per device and micro-batch")
    eval_batch_size: int = option(
        64, family=CLASSIFICATION, help="evaluation examples per batch (generation: eval.batch_size)")
    gradient_accumulation_steps: int = option(
        1, help="micro-batches per optimiser step; the batch-level regulariser terms (covariance, SVD) "
                "are computed per micro-batch")
    learning_rate: float = option(5e-4, help="peak learning rate of AdamW")
    head_learning_rate: float | None = option(
        family=CLASSIFICATION,
        help="peak learning rate of the classification head (PEFT's modules_to_save), on the same "
             "schedule; None = train.learning_rate")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    warmup_ratio: float = option(0.06, help="fraction of the steps with a linear learning-rate warm-up, in [0, 1)")
    lr_scheduler: str = option("linear", help="transformers learning-rate schedule (linear, cosine, constant, ...)")
    logging_steps: int = option(10, help="log losses, regularisers and λs every N steps")
    save_steps: int = option(200, help="checkpoint every N steps (what --resume continues from)")
    save_total_limit: int = option(2, help="checkpoints kept (older ones are deleted)")
    seed: int = option(42, help="seed of the model initialisation, data order, subsets and splits")
    report_to: list[str] = option(
        factory=lambda: ["tensorboard"],
        help="logging integrations; tensorboard writes into the run directory's tensorboard/")
    loss_chunk_size: int = option(
        512, family=GENERATION,
        help="valid tokens per chunk of the output-head losses (memory ~ chunk x vocabulary)")
    group_by_length: bool = option(False, help="batch examples of similar length together (less padding)")
    precision: str = option(
        "fp32", help="fp32 | bf16 (autocast; works on CPU) | fp16 (autocast with loss scaling; needs CUDA)")
    gradient_checkpointing: bool = option(
        False, family=GENERATION,
        help="recompute activations in the backward pass (less memory, about a third more compute)")

    def __post_init__(self) -> None:
        _check_finite(self, "train")
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
        if self.head_learning_rate is not None and self.head_learning_rate <= 0:
            raise ConfigError(f"train.head_learning_rate must be > 0, got {self.head_learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        _choice(self.precision, "train.precision", PRECISIONS)
        from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK  # local imports:
        from transformers.trainer_utils import SchedulerType  # transformers is heavy

        _choice(self.lr_scheduler, "train.lr_scheduler",
                tuple(s.value for s in SchedulerType if s.value not in _SCHEDULERS_NOT_RUNNABLE))
        for name in self.report_to:
            if name not in ("all", "none", *INTEGRATION_TO_CALLBACK):
                raise ConfigError(f"train.report_to: unknown integration {name!r}; known: "
                                  f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}")


@dataclass
class GenerationEvalConfig:
    """How a generation run is evaluated after training (a generation-only section)."""

    benchmark: str | None = option(
        family=GENERATION,
        help="gsm8k (answer check) | math (\\boxed{} answers); None = gsm8k for data.task=gsm-symbolic, "
             "else no benchmark")
    max_new_tokens: int = option(256, family=GENERATION, help="tokens generated per answer (greedy)")
    batch_size: int = option(16, family=GENERATION, help="prompts generated together")
    max_examples: int | None = option(family=GENERATION, help="evaluate the first N test problems; None = all")
    perplexity_corpus: str | None = option(
        family=GENERATION,
        help="a text corpus (e.g. grimm-tales): also report the perplexity of the adapted and the "
             "pre-trained model (paper Table 13)")
    perplexity_stride: int = option(512, family=GENERATION, help="sliding-window stride of the perplexity")
    perplexity_max_tokens: int | None = option(
        family=GENERATION,
        help="score only the first N tokens of the perplexity corpus (e.g. 100000 of wiki-summaries' 1.07M); "
             "None = all of it")

    def __post_init__(self) -> None:
        _check_finite(self, "eval")
        if self.benchmark is not None:
            _choice(self.benchmark, "eval.benchmark", GENERATION_BENCHMARKS)
        for name in ("max_new_tokens", "batch_size", "perplexity_stride"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"eval.max_examples must be >= 1, got {self.max_examples}")
        if self.perplexity_max_tokens is not None and self.perplexity_max_tokens < 2:
            raise ConfigError(f"eval.perplexity_max_tokens must be >= 2, got {self.perplexity_max_tokens}")


#: Suffixes of the local files routing.general_data may name.
GENERAL_FILE_SUFFIXES = (".txt", ".jsonl")


@dataclass
class RoutingConfig:
    """I-LoRA routing tuning: a KL to the pre-trained model and the LoRA outputs' L2 on general data.

    Off unless ``general_data`` is set; then the loss of every task batch gets
    ε_kl·KL(p_base ‖ p_adapted) + ε_l2·‖s·B·A·x‖² on ``general_ratio`` batches of general data
    (:mod:`balora.objectives.routing`). Neither ε comes from a publication (the method's reviews
    give no values): the defaults of 1 are unit weights, not tuned.
    """

    general_data: str | None = option(
        help="general (non-task) data of the routing terms: a text corpus (grimm-tales, grimm-tales-selected, "
             "book-excerpts, wiki-summaries; e.g. grimm-tales offline), a classification task (its training "
             "texts) or a local .txt file / .jsonl file (a 'text' field per line); None = routing tuning off")
    epsilon_kl: float = option(
        1.0, help="ε_kl, weight of KL(p_base ‖ p_adapted) at temperature 1 on the general batches (classifier: "
                  "over the head's classes per example; causal LM: over the vocabulary per non-pad token); "
                  "0 = the KL ablation; default 1, a unit weight (no published value, not tuned)")
    epsilon_l2: float = option(
        1.0, help="ε_l2, weight of the squared norm of every adapted layer's LoRA output s·B·A·x on the "
                  "general batches (per token, averaged over the non-pad tokens, summed over the layers); "
                  "0 = the symmetric ablation; default 1, a unit weight (no published value, not tuned)")
    general_ratio: int = option(
        1, help="general batches per task batch (an integer >= 1); the routing terms are averaged over them")
    general_batch_size: int | None = option(help="examples per general batch; None = train.batch_size")
    general_max_length: int | None = option(
        help="tokens per general example (a longer text is cut into several examples); None = model.max_length")
    general_max_examples: int | None = option(
        help="keep a seeded random subset of N general texts (before they are cut); None = all")

    def __post_init__(self) -> None:
        _check_finite(self, "routing")
        if self.general_data is not None and not self.general_data.strip():
            raise ConfigError("routing.general_data is empty; name a corpus, a task or a file (or leave it unset)")
        for name in ("epsilon_kl", "epsilon_l2"):
            if getattr(self, name) < 0:
                raise ConfigError(f"routing.{name} must be >= 0, got {getattr(self, name)}")
        if self.general_ratio < 1:
            raise ConfigError(f"routing.general_ratio must be >= 1, got {self.general_ratio}")
        for name, least in (("general_batch_size", 1), ("general_max_length", 8), ("general_max_examples", 1)):
            value = getattr(self, name)
            if value is not None and value < least:
                raise ConfigError(f"routing.{name} must be >= {least}, got {value}")
        if self.general_data is None:
            changed = [f.name for f in dataclasses.fields(self) if _is_set(self, f.name)]
            if changed:
                raise ConfigError(f"routing.{changed[0]} is read only with routing.general_data "
                                  "(routing tuning is off without it)")


#: The sections of a RunConfig, in the order ``balora config`` lists them.
SECTIONS = ("model", "adapter", "data", "regularizers", "train", "eval", "routing")


@dataclass
class RunConfig:
    """Everything one training run needs; the sections are cross-checked against the family."""

    name: str | None = option(help='run directory name prefix; None = "<data.task>-<adapter.method>"')
    output_dir: str = option("runs", help="folder that receives the new run directory")
    family: str = option("classification", help="classification (sequence classifier) | generation (causal LM)")
    model: ModelConfig = option(factory=ModelConfig, help="the pre-trained model")
    adapter: AdapterConfig = option(factory=AdapterConfig, help="the fine-tuning method")
    data: DataConfig = option(factory=DataConfig, help="the training (and evaluation) data")
    regularizers: RegularizerConfig = option(factory=RegularizerConfig, help="the BA-LoRA regularisers")
    train: TrainConfig = option(factory=TrainConfig, help="optimisation")
    eval: GenerationEvalConfig = option(factory=GenerationEvalConfig, help="evaluation of a generation run")
    routing: RoutingConfig = option(factory=RoutingConfig, help="I-LoRA routing tuning on general data")

    def __post_init__(self) -> None:
        _choice(self.family, "family", TASK_FAMILIES)
        _check_family_keys(self)
        _check_regularizers(self)
        _check_adapter(self.adapter)
        _check_train(self.train, self.adapter)
        _check_routing(self)
        if self.family == GENERATION:
            _check_generation_data(self)
        else:
            _check_classification_data(self.data)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.data.task}-{self.adapter.method}".replace("+", "-")

    @property
    def benchmark(self) -> str | None:
        """The benchmark a generation run is scored on (``eval.benchmark`` or the task's own), or None."""
        if self.eval.benchmark is not None:
            return self.eval.benchmark
        return "gsm8k" if self.data.task == GSM_SYMBOLIC_TASK else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- cross-checks


def _check_family_keys(config: RunConfig) -> None:
    """A key that only the other family reads must keep its default."""
    for section_name in SECTIONS:
        section = getattr(config, section_name)
        for f in dataclasses.fields(section):
            family = f.metadata.get("family")
            if family and family != config.family and _is_set(section, f.name):
                raise ConfigError(
                    f"{section_name}.{f.name} is a {family} setting; this run has family: {config.family}"
                )


#: regularizers.<key> -> (is it read, given the resolved settings?, when it is read)
_REGULARIZER_USES: dict[str, tuple[Callable[[RegularizerConfig], bool], str]] = {
    "consistency_kind": (lambda r: r.lambda_consistency > 0, "lambda_consistency > 0"),
    "temperature": (lambda r: r.lambda_consistency > 0 and r.consistency_kind == "kl",
                    "consistency_kind=kl and lambda_consistency > 0"),
    "consistency_schedule": (lambda r: r.lambda_consistency > 0, "lambda_consistency > 0"),
    "teacher_cache": (lambda r: r.lambda_consistency > 0, "lambda_consistency > 0"),
    "teacher": (lambda r: r.lambda_consistency > 0, "lambda_consistency > 0"),
    "teacher_path": (lambda r: r.lambda_consistency > 0, "lambda_consistency > 0"),
    "diversity_kind": (lambda r: r.lambda_diversity > 0, "lambda_diversity > 0"),
    "top_k": (lambda r: r.lambda_diversity > 0 and r.diversity_kind == "entropy",
              "diversity_kind=entropy and lambda_diversity > 0"),
    "focus_schedule": (lambda r: r.lambda_diversity > 0 or r.lambda_svd > 0,
                       "lambda_diversity > 0 or lambda_svd > 0"),
    "svd_k": (lambda r: r.lambda_svd > 0, "lambda_svd > 0"),
    "calibration_mode": (lambda r: r.lambdas == "auto", "lambdas=auto"),
    "calibration_share": (lambda r: r.lambdas == "auto", "lambdas=auto"),
    "calibration_terms": (lambda r: r.lambdas == "auto", "lambdas=auto"),
    "svd_normalize": (lambda r: r.lambda_svd > 0, "lambda_svd > 0"),
    "svd_k_policy": (lambda r: r.lambda_svd > 0, "lambda_svd > 0"),
    "svd_solver": (lambda r: r.lambda_svd > 0, "lambda_svd > 0"),
    "svd_oversample": (lambda r: r.lambda_svd > 0 and r.svd_solver != "exact",
                       "lambda_svd > 0 and svd_solver auto or randomized"),
    "svd_niter": (lambda r: r.lambda_svd > 0 and r.svd_solver != "exact",
                  "lambda_svd > 0 and svd_solver auto or randomized"),
}


def _check_regularizers(config: RunConfig) -> None:
    """Every regulariser key that is set is read by this method, family and loss."""
    from balora.methods import parse_method  # local import, as in AdapterConfig

    r = config.regularizers
    changed = [f.name for f in dataclasses.fields(r) if _is_set(r, f.name)]
    if changed and not parse_method(config.adapter.method).regularized:
        # not an error: one config is typically shared by every method of a comparison
        logger.warning("regularizers.%s is not used: adapter.method=%s has no +reg (the regularisers are off)",
                       ", regularizers.".join(changed), config.adapter.method)
        return
    if config.family == GENERATION:
        if r.diversity_kind == "covariance":
            raise ConfigError("regularizers.diversity_kind=covariance is for classification; generation uses entropy")
        if r.svd_normalize == "nuclear":
            raise ConfigError("regularizers.svd_normalize=nuclear is for classification; generation uses frobenius")
    resolved = r.resolved(config.family)
    for key in changed:
        if key in _REGULARIZER_USES:
            used, when = _REGULARIZER_USES[key]
            if not used(resolved):
                raise ConfigError(f"regularizers.{key} has no effect here: it is read only with {when}")


def _check_adapter(adapter: AdapterConfig) -> None:
    from balora.methods import parse_method  # local import, as in AdapterConfig

    if parse_method(adapter.method).full:
        for key in ("rank", "alpha", "dropout", "target_modules"):
            if _is_set(adapter, key):
                raise ConfigError(f"adapter.{key} has no effect with adapter.method={adapter.method} (no adapter)")


def _check_train(train: TrainConfig, adapter: AdapterConfig) -> None:
    from balora.methods import parse_method  # local import, as in AdapterConfig

    if train.max_steps > 0 and _is_set(train, "epochs"):
        raise ConfigError("train.epochs is ignored when train.max_steps > 0: set only one of them")
    if train.head_learning_rate is not None:
        spec = parse_method(adapter.method)
        if spec.full:
            raise ConfigError("train.head_learning_rate needs an adapter (the head is PEFT's modules_to_save); "
                              "adapter.method=full trains every weight at train.learning_rate")
        if spec.optimizer is not None:
            raise ConfigError(f"train.head_learning_rate cannot be combined with adapter.method={adapter.method}: "
                              f"its optimizer ({spec.optimizer}) sets its own learning rates")


def _training_source(name: str) -> str:
    """The data a task name trains on: the first task of a transfer pair ``<A>-to-<B>``, else the name."""
    from balora.data.packaged import parse_transfer_name  # local import: the data layer is heavy

    pair = parse_transfer_name(name)
    return (pair[0] if pair else name).lower()


def _check_routing(config: RunConfig) -> None:
    """routing.general_data names known data that is not the task's; ε_l2 needs plain LoRA layers."""
    r = config.routing
    if r.general_data is None:
        return
    from balora.data import is_classification_task  # local import: the data layer is heavy
    from balora.data.texts import TEXT_CORPORA

    source = r.general_data
    is_file = "\0" not in source and Path(source).suffix.lower() in GENERAL_FILE_SUFFIXES
    if source not in TEXT_CORPORA and not is_classification_task(source) and not is_file:
        raise ConfigError(f"routing.general_data={_shown(source)}: not a text corpus ({', '.join(TEXT_CORPORA)}), "
                          "a classification task or a .txt / .jsonl file")
    d = config.data
    if is_file:
        where = Path(source).expanduser().resolve()
        same = any(f is not None and "\0" not in f and Path(f).expanduser().resolve() == where
                   for f in (d.train_file, d.task))
    else:
        same = _training_source(source) == _training_source(d.task)
    if same:
        raise ConfigError(f"routing.general_data={_shown(source)} is the training data itself; general data must be "
                          "other text (e.g. grimm-tales)")
    from balora.methods import parse_method  # local import, as in AdapterConfig

    method = config.adapter.method
    spec = parse_method(method)
    if r.epsilon_l2 > 0 and (spec.full or spec.use_dora or spec.adalora):
        raise ConfigError(f"routing.epsilon_l2 needs LoRA layers that add s·B·A·x; adapter.method={method} "
                          "has none: set routing.epsilon_l2=0")


def _generation_task_names() -> set[str]:
    from balora.data.sft import SFT_DATASETS  # local import: the data layer is heavy

    return {GSM_SYMBOLIC_TASK, *SFT_DATASETS}


def _check_classification_data(data: DataConfig) -> None:
    if data.task.lower() in _generation_task_names():
        raise ConfigError(f"data.task={data.task} is a generation task; set family: generation")
    if data.train_file is None and data.eval_file is None:
        for key in ("text_column", "text_pair_column", "label_column"):
            if _is_set(data, key):
                raise ConfigError(f"data.{key} is read only from data files (data.train_file, data.eval_file)")


def _check_generation_data(config: RunConfig) -> None:
    from balora.data import is_classification_task  # local import: the data layer is heavy

    d, e = config.data, config.eval
    if is_classification_task(d.task):
        raise ConfigError(f"data.task={d.task} is a classification task; set family: classification")
    if d.task == GSM_SYMBOLIC_TASK:
        for key in ("train_file", "eval_file"):
            if getattr(d, key) is not None:
                raise ConfigError(f"data.{key} is not read with data.task={GSM_SYMBOLIC_TASK} (generated problems)")
        if e.benchmark not in (None, "gsm8k"):
            raise ConfigError(f"eval.benchmark={e.benchmark}: data.task={GSM_SYMBOLIC_TASK} is scored with gsm8k")
    elif d.validation_fraction is not None:
        raise ConfigError(f"data.validation_fraction is supported for generation only with data.task={GSM_SYMBOLIC_TASK} "
                          "(validation problems from held-out training templates, scored with the gsm8k check)")
    if config.benchmark is None:
        if d.eval_file is not None:
            raise ConfigError("data.eval_file is read only with eval.benchmark (gsm8k or math)")
        for key in ("max_new_tokens", "batch_size", "max_examples"):
            if _is_set(e, key):
                raise ConfigError(f"eval.{key} is read only with a benchmark: set eval.benchmark (gsm8k or math)")
    for key in ("perplexity_stride", "perplexity_max_tokens"):
        if e.perplexity_corpus is None and _is_set(e, key):
            raise ConfigError(f"eval.{key} is read only with eval.perplexity_corpus")


# --------------------------------------------------------------------------- listing


def describe_config(section: str | None = None) -> str:
    """Every field (key, type, default, help) grouped by section; ``section`` limits it to one."""
    groups = [("run", RunConfig)] + [(name, _section_class(name)) for name in SECTIONS]
    if section is not None:
        _choice(section, "config section", tuple(name for name, _ in groups))
        groups = [g for g in groups if g[0] == section]
    blocks = []
    for name, cls in groups:
        lines = [f"{name}:  {cls.__doc__.strip().splitlines()[0]}"]
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(_default(f)):
                continue
            key = f.name if name == "run" else f"{name}.{f.name}"
            only = f"  [{f.metadata['family']} only]" if "family" in f.metadata else ""
            lines.append(f"  {key} ({f.type}, default {_default(f)!r}){only}")
            lines.append(f"      {f.metadata['help']}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _section_class(name: str) -> type:
    return typing.get_type_hints(RunConfig)[name]


# --------------------------------------------------------------------------- loading


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((key for key in data if key not in names), key=str)  # YAML keys may be numbers or null
    if unknown:
        printable = lambda k: isinstance(k, str) and k.isprintable() and k.strip() == k and k  # noqa: E731
        shown = (f"{where}{k}" if printable(k) else f"{where}{k!r}" for k in unknown)
        raise ConfigError(f"unknown key(s) {', '.join(shown)}; known: {', '.join(sorted(names))}")
    values = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = from_dict(hint, {} if value is None else value, f"{where}{key}.")
        else:
            values[key] = _coerce(value, hint, where + key)
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Coerce YAML scalars to a field's type (int for float fields, etc.) or fail clearly."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, type(int | None)) else (hint,)
    if value is None and (type(None) in options or Any in options):
        return None
    for option_type in options:
        if option_type is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond the float range
                raise ConfigError(f"{where} must be a finite number, got an integer beyond the float range") from None
        if option_type is float and isinstance(value, str):  # PyYAML reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option_type is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option_type is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if option_type is bool and isinstance(value, bool):
            return value
        if option_type is str and isinstance(value, str):
            return value
        if typing.get_origin(option_type) is list and isinstance(value, list):
            (item_type,) = typing.get_args(option_type)
            wrong = [item for item in value if not isinstance(item, item_type)]
            if wrong:
                raise ConfigError(f"{where} must be a list of {item_type.__name__}, got the item {wrong[0]!r}")
            return value
        if option_type is Any:
            return value
    expected = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"{where} must be {expected}, got {_shown(value)}")


def _shown(value: Any, width: int = 80) -> str:
    """``repr(value)``, cut to ``width`` characters for an error line."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested mapping."""
    if overrides and not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.epochs=2)")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the YAML file
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _yaml(raw, f"override {_shown(item)}") if raw.strip() else None
    return data


def _yaml(text: str, what: str) -> Any:
    """``text`` parsed as YAML, or a one-line ConfigError naming ``what`` (and the line and column)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or " ".join(str(err).split())
        raise ConfigError(f"{what} is not valid YAML{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply to be a config") from None
    except ValueError as err:  # a scalar PyYAML's constructors refuse: 2024-02-30, an int of > 4300 digits
        reason = " ".join(str(err).split(";")[0].split())
        raise ConfigError(f"{what} is not valid YAML: {reason}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or start from defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"config file {path} is a folder, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise ConfigError(f"config file {path} is not UTF-8 text (line {line}, byte {err.start})") from None
        data = _yaml(text, str(path))
        data = {} if data is None else data
    data = apply_overrides(data, list(overrides or []))
    return from_dict(RunConfig, data)
