"""Experiment specs: a YAML grid of runs, every cell resolved and validated when the spec is loaded.

A spec names a base run config and the axes that vary around it::

    name: init-ablation               # the store directory's name
    base: ../reuters-r8-balora.yaml   # a run config (path relative to the spec) or an inline mapping
    set: {train.max_steps: 200}       # optional: key=value overrides for every cell (mapping or list)
    grid:
      method: [lora, lora+reg, pissa, balora]      # adapter.method (default: the base's)
      task: [reuters-r8, election-tweets]          # data.task values, or named data variants:
      # data: {r8: {data.task: reuters-r8}, tweets: [data.task=election-tweets]}
      seed: [42, 1024, 2024]                       # train.seed (default: the paper's three)
      overrides:                                   # optional named variants of key=value sets
        kl: {regularizers.consistency_kind: kl}
        cosine: [regularizers.consistency_kind=cosine]
    select:                           # optional: a hyper-parameter chosen on the VALIDATION split
      key: train.learning_rate        # any config key, or lambda_scale (multiplies λ1, λ2, λ3)
      values: [5.0e-4, 1.0e-3, 2.0e-3]
      metric: accuracy                # compared as validation/<metric> (headline = each task's own)
      goal: max                       # max | min (default: min for losses and perplexities)
      seeds: [42]                     # seeds the candidates run on (default: the first seed)
    report:
      metrics: [headline, macro_f1]   # table columns per task (default: headline)
      baseline: balora                # paired comparisons against this row (default: balora)
      split: test                     # test | validation (default: test)
      lower_is_better: []             # metric names where lower is better, beyond the built-in ones
      loss_threshold: 0.5             # convergence speed: steps to this training task loss (default:
                                      # the level every cell of the data set reaches)
      sweep:                          # optional: the variants are values of one setting; adds sweep.png
        name: rank                    # the x axis
        values: {r8: 8, r32: 32}      # variant -> value
        log: true                     # log2 x axis
    merge:                            # optional (classification): merge the task adapters, see below
      score: accuracy                 # the task metric remaining performance is computed on
      general: mrpc-validation        # optional: a pair task, the encoder's zero-shot general ability
      reference: iterative-0.8        # the merge every variant is compared on (default: the first)
      incremental: true               # also merge the first k data sets, k = 2 .. n-1 (reference only)
      normalize_by: plain             # the variant whose single adapters normalise (default: the first)
      methods:                        # named merges: balora merge's options, and optionally variants
        iterative-0.8: {method: iterative, retain: 0.8}
        ties: {method: ties, density: 0.5, variants: [routing]}
      sweep: {name: retain, values: {iterative-0.7: 0.7, iterative-0.8: 0.8}}

A cell's config is the base, then ``set``, the data variant, the method, the override variant,
the selected value and the seed, in that order, read by the project's config loader
(:func:`balora.config.from_dict` over :func:`~balora.config.apply_overrides`, as
:func:`~balora.config.load_config` does): a bad cell fails at load time with one line naming the cell
and the key. The keys an axis sets (``adapter.method`` with a method axis, ``train.seed``, the
select key) may not be set by another layer, and ``output_dir`` / ``name`` belong to the store.

Cell ids are made of the axis values, ``<data>__<method>[__<variant>][__<key>=<value>]__s<seed>``
(e.g. ``reuters-r8__balora__s42``), so they are stable across runs and a grid resumes by id. With
``select``, each group (data × method × variant) first runs every candidate value on the select
seeds; the value with the best mean validation metric (ties: the first listed) then runs on the
other seeds, and the cells at the chosen value are the group's results. The candidates are
cells of their own (their ids carry the value), so a chosen candidate's runs are reused.
``select.key: lambda_scale`` scales the λs the cell would otherwise use (the paper's defaults
unless set); a method without ``+reg`` has no λ, so its group has a single candidate.

The validation split is ``data.validation_fraction`` of the TRAINING data (see
:class:`balora.config.DataConfig`); ``select`` requires it in every cell.

``merge`` (:mod:`balora.experiments.merges`): after the cells, the adapters of the cells that differ
only in their data set (same method, variant and seed) are merged by every ``merge.methods`` entry
(:func:`balora.merging.merge_adapters`; ``variants`` limits an entry to some override variants) and
each data set is scored with the merged adapter and its own head. It needs two or more data sets,
classification cells and no ``select``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from balora.config import ConfigError, RunConfig, apply_overrides, from_dict

__all__ = [
    "LAMBDA_KEYS",
    "LAMBDA_SCALE",
    "MERGE_OPTION_KEYS",
    "PAPER_SEEDS",
    "Cell",
    "ExperimentSpec",
    "MergeMethod",
    "MergeSettings",
    "ReportSettings",
    "Selection",
    "SpecError",
    "config_hash",
    "load_spec",
    "lower_is_better",
]

#: The paper's seeds (section 4).
PAPER_SEEDS = (42, 1024, 2024)
#: The select key that multiplies the three λs of a +reg method.
LAMBDA_SCALE = "lambda_scale"
LAMBDA_KEYS = ("lambda_consistency", "lambda_diversity", "lambda_svd")
#: Keys of a run config that the store sets (where a cell's run directory goes).
RUN_LOCATION_KEYS = ("output_dir", "name")
#: Metric names where lower is better (plus every ``*_loss`` and ``*perplexity*``).
LOWER_IS_BETTER = frozenset({"mse", "loss", "no_answer"})

_SPEC_KEYS = ("name", "description", "base", "set", "grid", "select", "report", "merge")
_GRID_KEYS = ("method", "task", "data", "seed", "overrides")
_SELECT_KEYS = ("key", "values", "metric", "goal", "seeds")
_REPORT_KEYS = ("metrics", "baseline", "split", "lower_is_better", "loss_threshold", "sweep")
_SWEEP_KEYS = ("name", "values", "log")
_MERGE_KEYS = ("score", "general", "reference", "methods", "sweep", "incremental", "normalize_by")
#: The ``balora merge`` options a ``merge.methods`` entry may set (beside ``variants``).
MERGE_OPTION_KEYS = ("method", "retain", "retain_by", "merge_fn", "rank", "density", "weight", "seed")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=-]*$")
SEPARATOR = "__"


class SpecError(ConfigError):
    """An experiment spec is malformed, or one of its cells is not a valid run config."""


def lower_is_better(metric: str, extra: tuple[str, ...] = ()) -> bool:
    """True for metrics where a smaller value is better (losses, perplexities, MSE, ...)."""
    name = metric.rsplit("/", 1)[-1]
    return name in LOWER_IS_BETTER or name in extra or name.endswith("_loss") or "perplexity" in name


def config_hash(config: RunConfig) -> str:
    """A short hash of what a cell's run depends on: every setting that differs from its default.

    ``output_dir`` and ``name`` (where the run goes) are left out, and so is every setting at
    its default, so a new setting added to the project with a default does not change the hash.
    """
    delta = _delta(config.to_dict(), RunConfig().to_dict())
    for key in RUN_LOCATION_KEYS:
        delta.pop(key, None)
    text = json.dumps(delta, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _delta(values: dict, defaults: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        default = defaults.get(key, dataclasses.MISSING)
        if isinstance(value, dict) and isinstance(default, dict):
            out.update(_delta(value, default, f"{prefix}{key}."))
        elif value != default:
            out[prefix + key] = value
    return out


@dataclass(frozen=True)
class Cell:
    """One run of the grid: its axis values, the overrides on top of the base, its validated config."""

    id: str
    data: str
    method: str
    variant: str | None
    value: Any  # the select value (None without select, or when the key does not apply)
    seed: int
    overrides: tuple[str, ...]
    config: RunConfig = field(compare=False, repr=False)
    config_hash: str = ""
    method_axis: bool = True  # False: the spec has no grid.method (its variants may set the method)

    @property
    def group(self) -> tuple[str, str, str | None]:
        """(data, method, variant): the cells that differ only in seed and select value."""
        return self.data, self.method, self.variant

    @property
    def row(self) -> str:
        """The row label in report tables: the method, with the variant when there is one; without a
        method axis the variant alone (the variants then name what differs, the method included)."""
        if self.variant is None:
            return self.method
        return f"{self.method} · {self.variant}" if self.method_axis else self.variant

    def axes(self) -> dict[str, Any]:
        return {"data": self.data, "method": self.method, "variant": self.variant,
                "value": self.value, "seed": self.seed}


@dataclass(frozen=True)
class Selection:
    """A hyper-parameter chosen per group on the validation split."""

    key: str
    values: tuple[Any, ...]
    metric: str
    goal: str
    seeds: tuple[int, ...]

    @property
    def short(self) -> str:
        return self.key.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Sweep:
    """A numeric setting behind the override variants, for the sweep figure (e.g. the rank)."""

    name: str
    values: tuple[tuple[str, float], ...]  # (variant, value) in the spec's order
    log: bool = False


@dataclass(frozen=True)
class ReportSettings:
    metrics: tuple[str, ...] = ("headline",)
    baseline: str = "balora"
    split: str = "test"
    lower_is_better: tuple[str, ...] = ()
    loss_threshold: float | None = None
    sweep: Sweep | None = None


@dataclass(frozen=True)
class MergeMethod:
    """One named merge of ``merge.methods``: ``balora merge``'s options and the variants it merges
    (None: every variant of the grid)."""

    name: str
    options: tuple[tuple[str, Any], ...]
    variants: tuple[str, ...] | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class MergeSettings:
    """The ``merge`` section: what is merged, how, and how it is scored."""

    methods: tuple[MergeMethod, ...]
    score: str = "accuracy"
    general: str | None = None
    reference: str = ""
    incremental: bool = False
    sweep: Sweep | None = None
    normalize_by: str | None = None  # the variant whose single adapters normalise the merged scores

    @property
    def by_name(self) -> dict[str, MergeMethod]:
        return {m.name: m for m in self.methods}


@dataclass
class ExperimentSpec:
    """A loaded spec: its axes and every cell (with ``select``: every candidate value at every seed)."""

    name: str
    source: Path | None
    raw: dict[str, Any]  # the spec as a mapping with the base inlined (what the store keeps)
    description: str
    data: tuple[str, ...]
    methods: tuple[str, ...]
    variants: tuple[str, ...] | None
    seeds: tuple[int, ...]
    select: Selection | None
    report: ReportSettings
    cells: list[Cell]
    merge: MergeSettings | None = None

    @property
    def by_id(self) -> dict[str, Cell]:
        return {c.id: c for c in self.cells}

    def groups(self) -> list[tuple[str, str, str | None]]:
        """Every (data, method, variant), in grid order."""
        return list(dict.fromkeys(c.group for c in self.cells))

    def cells_of(self, group, *, value: Any = ..., seeds=None) -> list[Cell]:
        """The cells of ``group`` (at ``value`` when given, on ``seeds`` when given), in seed order."""
        return [c for c in self.cells if c.group == group and (value is ... or c.value == value)
                and (seeds is None or c.seed in seeds)]

    def candidates(self, group) -> list[Any]:
        """The select values of ``group`` ([None] without select or when the key does not apply)."""
        return list(dict.fromkeys(c.value for c in self.cells if c.group == group))

    def selection_cells(self) -> list[Cell]:
        """The cells that choose the selected value: every candidate on the select seeds."""
        if self.select is None:
            return []
        return [c for c in self.cells if c.seed in self.select.seeds]

    def planned_count(self) -> int:
        """Cells the grid runs in all: with select, the candidates plus the chosen value's other seeds."""
        if self.select is None:
            return len(self.cells)
        rest = len([s for s in self.seeds if s not in self.select.seeds])
        return sum(len(self.candidates(g)) * len(self.select.seeds) + rest for g in self.groups())


# --------------------------------------------------------------------------- loading


def load_spec(source: str | Path | dict, *, where: str | None = None) -> ExperimentSpec:
    """Read and validate a spec (a YAML file or a mapping); every cell's config is resolved.

    Raises :class:`SpecError` (a ConfigError) with one line naming the spec, and the cell and
    key when a cell's config is invalid.
    """
    path = None
    if isinstance(source, dict):
        raw = copy.deepcopy(source)
        where = where or "spec"
    else:
        path = Path(source)
        where = where or str(path)
        if not path.is_file():
            raise SpecError(f"experiment spec not found: {path}")
        raw = _read_yaml(path, where)
    return _Parser(raw, path, where).parse()


def _read_yaml(path: Path, where: str) -> Any:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise SpecError(f"{where} is not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    return data


def _as_number(value: Any) -> Any:
    """YAML reads ``1e-3`` as a string: numbers in strings become numbers (for ids and comparisons)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() and re.fullmatch(r"[+-]?\d+", value.strip()) else number
    return value


def _yaml_value(value: Any) -> str:
    """``value`` as the right-hand side of a ``key=value`` override (read back as YAML)."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value and "\n" not in value:
                return value
        except yaml.YAMLError:
            pass
    return json.dumps(value)  # JSON is YAML


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return format(value, "g")
    return str(value)


class _Parser:
    def __init__(self, raw: Any, path: Path | None, where: str):
        self.path, self.where = path, where
        if not isinstance(raw, dict):
            self.fail(f"must be a mapping with name, base and grid, got {type(raw).__name__}")
        self.raw = raw

    def fail(self, message: str):
        raise SpecError(f"{self.where}: {message}")

    def check_keys(self, mapping: Any, known: tuple[str, ...], name: str) -> dict:
        if mapping is None:
            return {}
        if not isinstance(mapping, dict):
            self.fail(f"{name} must be a mapping, got {mapping!r}")
        unknown = sorted(set(mapping) - set(known))
        if unknown:
            self.fail(f"unknown key(s) {', '.join(f'{name}.{k}' if name else k for k in unknown)}; "
                      f"known: {', '.join(known)}")
        return mapping

    def names(self, value: Any, name: str, kind=str) -> list:
        """A non-empty list of distinct values (a scalar is a list of one)."""
        values = value if isinstance(value, list) else [value]
        if not values:
            self.fail(f"{name} is an empty list")
        for v in values:
            if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
                self.fail(f"{name} must be a list of integers, got {v!r}")
            if kind is str and not (isinstance(v, str) and v.strip()):
                self.fail(f"{name} must be a list of names, got {v!r}")
        for v in values:
            if values.count(v) > 1:
                self.fail(f"{name} lists {v!r} twice")
        return values

    def safe(self, label: str, name: str) -> str:
        if not _SAFE_NAME.match(label):
            self.fail(f"{name}: {label!r} cannot be part of a cell id (letters, digits and . _ + = - only)")
        return label

    def overrides(self, value: Any, name: str) -> list[str]:
        """key=value strings from a mapping {key: value} or a list of "key=value"."""
        if value is None:
            return []
        if isinstance(value, dict):
            return [f"{k}={_yaml_value(v)}" for k, v in value.items()]
        if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
            return list(value)
        self.fail(f"{name} must be a mapping of key: value or a list of key=value, got {value!r}")

    def variants(self, value: Any, name: str) -> dict[str, list[str]]:
        if not isinstance(value, dict) or not value:
            self.fail(f"{name} must be a mapping of variant name to key=value settings, got {value!r}")
        return {self.safe(str(k), name): self.overrides(v, f"{name}.{k}") for k, v in value.items()}

    def parse(self) -> ExperimentSpec:
        raw = self.check_keys(self.raw, _SPEC_KEYS, "")
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            self.fail("name is missing (the store directory's name)")
        self.safe(name, "name")
        base = self.base(raw.get("base"))
        common = self.overrides(raw.get("set"), "set")
        grid = self.check_keys(raw.get("grid"), _GRID_KEYS, "grid")

        if "task" in grid and "data" in grid:
            self.fail("grid.task and grid.data both vary the data: use one of them")
        if "task" in grid:
            tasks = self.names(grid["task"], "grid.task")
            data = {self.safe(Path(t).stem if Path(t).suffix else t, "grid.task"): [f"data.task={_yaml_value(t)}"]
                    for t in tasks}
            if len(data) < len(tasks):
                self.fail("grid.task: two tasks give the same cell-id label")
        elif "data" in grid:
            data = self.variants(grid["data"], "grid.data")
        else:
            data = None  # the base's own data: labelled from its data.task below
        method_axis = "method" in grid
        methods = [self.safe(m, "grid.method") for m in self.names(grid["method"], "grid.method")] \
            if method_axis else None
        seeds = self.names(grid.get("seed", list(PAPER_SEEDS)), "grid.seed", int)
        variants = self.variants(grid["overrides"], "grid.overrides") if "overrides" in grid else None
        select = self.selection(raw.get("select"), seeds)
        report = self.report_settings(raw.get("report"), variants)

        reserved = {"train.seed": "grid.seed", **{k: "the store" for k in RUN_LOCATION_KEYS}}
        if method_axis:
            reserved["adapter.method"] = "grid.method"
        if select is not None and select.key != LAMBDA_SCALE:
            reserved[select.key] = "select.key"
        layers = [("set", common), *((f"grid.data.{k}", v) for k, v in (data or {}).items() if "data" in grid),
                  *((f"grid.overrides.{k}", v) for k, v in (variants or {}).items())]
        for layer, items in layers:
            for item in items:
                key = item.split("=", 1)[0].strip()
                if key in reserved:
                    self.fail(f"{layer} sets {key}, which {reserved[key]} sets")

        resolver = _Resolver(self, base, method_axis)
        if data is None:
            probe = resolver.config(common, "base")
            data = {self.safe(Path(probe.data.task).stem if Path(probe.data.task).suffix else probe.data.task,
                              "data.task"): []}
        if methods is None:
            methods = [resolver.config(common, "base").adapter.method]
        cells = []
        for seed in seeds:
            for data_name, data_overrides in data.items():
                for variant in (variants or {None: []}):
                    for method in methods:
                        layers = [*common, *data_overrides,
                                  *([f"adapter.method={_yaml_value(method)}"] if method_axis else []),
                                  *(variants[variant] if variant else [])]
                        cells += resolver.cells(data_name, method, variant, seed, layers, select)
        rows = list(dict.fromkeys(c.row for c in cells))
        named = isinstance(raw.get("report"), dict) and "baseline" in raw["report"]  # the default may be absent
        if named and report.baseline not in rows and not any(_same_method(c.method, report.baseline) for c in cells):
            self.fail(f"report.baseline {report.baseline!r} is neither a row of the grid ({', '.join(rows)}) nor "
                      "one of its methods")
        merge = self.merge_settings(raw.get("merge"), data, variants, select, cells)
        return ExperimentSpec(
            name=name, source=self.path, raw=dict(raw, base=base), description=str(raw.get("description") or ""),
            data=tuple(data), methods=tuple(methods), variants=tuple(variants) if variants else None,
            seeds=tuple(seeds), select=select, report=report, cells=cells, merge=merge,
        )

    def base(self, value: Any) -> dict:
        """The base run config as a mapping (a file is read relative to the spec)."""
        if value is None:
            self.fail("base is missing: a run config file (relative to the spec) or an inline mapping")
        if isinstance(value, dict):
            return copy.deepcopy(value)
        if not isinstance(value, str):
            self.fail(f"base must be a file name or a mapping, got {value!r}")
        path = Path(value)
        if not path.is_absolute() and self.path is not None:
            path = self.path.parent / path
        if not path.is_file():
            self.fail(f"base config not found: {path}")
        data = _read_yaml(path, str(path)) or {}
        if not isinstance(data, dict):
            self.fail(f"base config {path} must be a mapping")
        return data

    def selection(self, value: Any, seeds: list[int]) -> Selection | None:
        if value is None:
            return None
        sel = self.check_keys(value, _SELECT_KEYS, "select")
        key = sel.get("key")
        if not isinstance(key, str) or not key.strip():
            self.fail("select.key is missing (a config key such as train.learning_rate, or lambda_scale)")
        values = [_as_number(v) for v in self.names(sel.get("values"), "select.values", kind=object)]
        if len(values) < 2:
            self.fail("select.values needs at least two candidates")
        metric = sel.get("metric", "headline")
        if not isinstance(metric, str):
            self.fail(f"select.metric must be a metric name, got {metric!r}")
        goal = sel.get("goal", "min" if lower_is_better(metric) else "max")
        if goal not in ("max", "min"):
            self.fail(f"select.goal must be max or min, got {goal!r}")
        select_seeds = self.names(sel.get("seeds", seeds[:1]), "select.seeds", int)
        missing = [s for s in select_seeds if s not in seeds]
        if missing:
            self.fail(f"select.seeds {missing} are not in grid.seed {seeds}")
        if key == LAMBDA_SCALE and any(not isinstance(v, (int, float)) or v < 0 for v in values):
            self.fail("select.values of lambda_scale must be numbers >= 0")
        return Selection(key=key, values=tuple(values), metric=metric, goal=goal, seeds=tuple(select_seeds))

    def sweep(self, value: Any, variants: dict | None, *, where: str = "report.sweep",
              axis: str = "grid.overrides") -> Sweep:
        sweep = self.check_keys(value, _SWEEP_KEYS, where)
        name, values, log = sweep.get("name"), sweep.get("values"), sweep.get("log", False)
        if not isinstance(name, str) or not name:
            self.fail(f"{where}.name must name the swept setting (the figure's x axis), e.g. rank")
        if not isinstance(values, dict) or not values:
            self.fail(f"{where}.values must map {axis} names to numbers, e.g. {{r8: 8}}")
        unknown = [k for k in values if k not in (variants or {})]
        if unknown:
            self.fail(f"{where}.values names {', '.join(map(str, unknown))}, which {axis} does not "
                      f"have ({', '.join(variants or {}) or 'no variants'})")
        for k, v in values.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (log and v <= 0):
                self.fail(f"{where}.values.{k} must be a {'positive ' if log else ''}number, got {v!r}")
        if not isinstance(log, bool):
            self.fail(f"{where}.log must be true or false, got {log!r}")
        return Sweep(name=name, values=tuple((str(k), float(v)) for k, v in values.items()), log=log)

    def merge_settings(self, value: Any, data: dict, variants: dict | None, select: Selection | None,
                       cells: list[Cell]) -> MergeSettings | None:
        if value is None:
            return None
        section = self.check_keys(value, _MERGE_KEYS, "merge")
        if select is not None:
            self.fail("merge does not combine with select (the merged adapters would mix candidate values)")
        if len(data) < 2:
            self.fail(f"merge needs two or more data sets in the grid (grid.task or grid.data), got {len(data)}")
        families = {c.config.family for c in cells}
        if families != {"classification"}:
            self.fail("merge scores merged classifiers only (each data set with its own head); the grid has "
                      f"{', '.join(sorted(families))} cells")
        from balora.merging import check_merge_options

        raw_methods = section.get("methods")
        if not isinstance(raw_methods, dict) or not raw_methods:
            self.fail("merge.methods must map merge names to balora merge options, e.g. "
                      "{iterative-0.8: {method: iterative, retain: 0.8}}")
        methods = []
        for name, options in raw_methods.items():
            label = self.safe(str(name), "merge.methods")
            options = self.check_keys(options if options is not None else {}, (*MERGE_OPTION_KEYS, "variants"),
                                      f"merge.methods.{label}")
            only = None
            if "variants" in options:
                only = tuple(self.names(options["variants"], f"merge.methods.{label}.variants"))
                unknown = [v for v in only if v not in (variants or {})]
                if unknown:
                    self.fail(f"merge.methods.{label}.variants names {', '.join(unknown)}, which grid.overrides "
                              f"does not have ({', '.join(variants or {}) or 'no variants'})")
            kwargs = tuple((k, _as_number(v)) for k, v in options.items() if k != "variants")
            try:
                check_merge_options(**dict(kwargs))
            except ValueError as err:
                self.fail(f"merge.methods.{label}: {err}")
            methods.append(MergeMethod(name=label, options=kwargs, variants=only))
        score = section.get("score", "accuracy")
        if not isinstance(score, str) or not score.strip():
            self.fail(f"merge.score must be a metric name, got {score!r}")
        if lower_is_better(score):
            self.fail(f"merge.score {score!r} is lower-is-better; remaining performance needs a higher-is-better "
                      "score (accuracy, macro_f1, matthews_corrcoef)")
        general = section.get("general")
        if general is not None and not (isinstance(general, str) and general.strip()):
            self.fail(f"merge.general must name a pair task (e.g. mrpc-validation), got {general!r}")
        reference = section.get("reference", methods[0].name)
        by_name = {m.name: m for m in methods}
        if reference not in by_name:
            self.fail(f"merge.reference {reference!r} is not one of merge.methods ({', '.join(by_name)})")
        if by_name[reference].variants is not None and variants and set(by_name[reference].variants) != set(variants):
            self.fail(f"merge.reference {reference!r} must merge every variant (it compares them); "
                      "drop its variants list")
        incremental = section.get("incremental", False)
        if not isinstance(incremental, bool):
            self.fail(f"merge.incremental must be true or false, got {incremental!r}")
        sweep = None
        if section.get("sweep") is not None:
            sweep = self.sweep(section["sweep"], by_name, where="merge.sweep", axis="merge.methods")
        normalize_by = section.get("normalize_by", next(iter(variants)) if variants else None)
        if normalize_by is not None and normalize_by not in (variants or {}):
            self.fail(f"merge.normalize_by {normalize_by!r} is not a variant of grid.overrides "
                      f"({', '.join(variants or {}) or 'no variants'})")
        return MergeSettings(methods=tuple(methods), score=score.strip(), general=general, reference=reference,
                             incremental=incremental, sweep=sweep, normalize_by=normalize_by)

    def report_settings(self, value: Any, variants: dict | None = None) -> ReportSettings:
        rep = self.check_keys(value, _REPORT_KEYS, "report")
        metrics = tuple(self.names(rep.get("metrics", ["headline"]), "report.metrics"))
        baseline = rep.get("baseline", "balora")
        if not isinstance(baseline, str):
            self.fail(f"report.baseline must be a row name (a method, or 'method · variant'), got {baseline!r}")
        split = rep.get("split", "test")
        if split not in ("test", "validation"):
            self.fail(f"report.split must be test or validation, got {split!r}")
        lower = tuple(self.names(rep["lower_is_better"], "report.lower_is_better")) \
            if rep.get("lower_is_better") else ()
        threshold = rep.get("loss_threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not math.isfinite(threshold)):
            self.fail(f"report.loss_threshold must be a number (a training task loss), got {threshold!r}")
        sweep = self.sweep(rep["sweep"], variants) if rep.get("sweep") is not None else None
        return ReportSettings(metrics=metrics, baseline=baseline, split=split, lower_is_better=lower,
                              loss_threshold=None if threshold is None else float(threshold), sweep=sweep)


class _Resolver:
    """Builds and validates cell configs with the project's loader."""

    def __init__(self, parser: _Parser, base: dict, method_axis: bool = True):
        self.parser, self.base, self.method_axis = parser, base, method_axis

    def config(self, overrides: list[str], label: str) -> RunConfig:
        try:
            return from_dict(RunConfig, apply_overrides(copy.deepcopy(self.base), list(overrides)))
        except ConfigError as err:
            self.parser.fail(f"cell {label}: {err}")

    def cells(self, data: str, method: str, variant: str | None, seed: int, layers: list[str],
              select: Selection | None) -> list[Cell]:
        stem = [data, method, *([variant] if variant else [])]
        label = SEPARATOR.join([*stem, f"s{seed}"])
        config = self.config([*layers, f"train.seed={seed}"], label)
        if select is None:
            return [self.cell(stem, None, seed, layers, config, select)]
        if select.key == LAMBDA_SCALE and not _regularized(config):
            return [self.cell(stem, None, seed, layers, config, select)]
        if config.data.validation_fraction is None:
            self.parser.fail(f"cell {label}: select needs data.validation_fraction (choices are made on a "
                             "validation split carved from the training data, never on test)")
        out = []
        for value in select.values:
            extra = self.lambda_overrides(config, value) if select.key == LAMBDA_SCALE \
                else [f"{select.key}={_yaml_value(value)}"]
            value_label = SEPARATOR.join([*stem, f"{select.short}={_format_value(value)}", f"s{seed}"])
            out.append(self.cell(stem, value, seed, [*layers, *extra],
                                 self.config([*layers, *extra, f"train.seed={seed}"], value_label), select))
        return out

    @staticmethod
    def lambda_overrides(config: RunConfig, scale: float) -> list[str]:
        resolved = config.regularizers.resolved(config.family)
        return [f"regularizers.{k}={_yaml_value(scale * getattr(resolved, k))}" for k in LAMBDA_KEYS]

    def cell(self, stem: list[str], value: Any, seed: int, layers: list[str], config: RunConfig,
             select: Selection | None) -> Cell:
        parts = [*stem, *([f"{select.short}={_format_value(value)}"] if value is not None else []), f"s{seed}"]
        data, variant = stem[0], stem[2] if len(stem) > 2 else None
        # the method is the cell's own (a variant may set it when there is no method axis); the id
        # keeps the stem's, so ids stay stable
        return Cell(id=SEPARATOR.join(parts), data=data, method=config.adapter.method, variant=variant, value=value,
                    seed=seed, overrides=(*layers, f"train.seed={seed}"), config=config,
                    config_hash=config_hash(config), method_axis=self.method_axis)


def _same_method(a: str, b: str) -> bool:
    """True when two method names are the same method (``balora`` and ``pissa+reg`` are)."""
    from balora.methods import parse_method

    try:
        return parse_method(a).name == parse_method(b).name
    except ValueError:
        return a == b


def _regularized(config: RunConfig) -> bool:
    from balora.methods import parse_method

    return parse_method(config.adapter.method).regularized
