"""The choice of a hyper-parameter per group on the VALIDATION split, and the cells it leads to.

With ``select`` in a spec, each group (data × method × variant) runs every candidate value on
the select seeds; :func:`choose` takes the value whose mean ``validation/<metric>`` over those
seeds is best (``goal`` max or min; ties: the first listed value), among the candidates with at
least one finished cell. The test split is never read here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from balora.experiments.spec import Cell, ExperimentSpec
from balora.experiments.store import FINISHED, record_metric

__all__ = ["Choice", "choose", "result_cells"]


@dataclass
class Choice:
    """The value chosen for a group (None when no candidate finished) and every candidate's score."""

    group: tuple[str, str, str | None]
    value: Any
    #: (value, mean validation metric or None, finished cells, planned cells) per candidate, in spec order
    scores: list[tuple[Any, float | None, int, int]] = field(default_factory=list)
    #: candidate cells that did not finish (failed or not run): the choice was made without them
    missing: list[str] = field(default_factory=list)
    metric: str | None = None  # the metric's name (the headline resolved)


def choose(spec: ExperimentSpec, group, records: dict[str, dict]) -> Choice:
    """The select value of ``group`` from the finished candidate cells' validation metric."""
    sel = spec.select
    candidates = spec.candidates(group)
    if sel is None or candidates == [None]:  # nothing to choose: the group's only value
        return Choice(group, None, [(None, None, 1, 1)])
    choice = Choice(group, None)
    best = None
    for value in candidates:
        scores = []
        cells = spec.cells_of(group, value=value, seeds=sel.seeds)
        for cell in cells:
            record = records.get(cell.id)
            name, score = record_metric(record, sel.metric, "validation") if record and \
                record.get("status") == FINISHED and record.get("config_hash") == cell.config_hash else (None, None)
            if score is None:
                choice.missing.append(cell.id)
            else:
                scores.append(score)
                choice.metric = name
        mean = float(np.mean(scores)) if scores else None
        choice.scores.append((value, mean, len(scores), len(cells)))
        if mean is not None and (best is None or (mean > best if sel.goal == "max" else mean < best)):
            best, choice.value = mean, value
    return choice


def result_cells(spec: ExperimentSpec, records: dict[str, dict]) -> tuple[list[Cell], dict, list]:
    """``(cells, choices, waiting)``: the cells whose results a group reports (every seed at its
    chosen value), the :class:`Choice` per group, and the groups still without a choice."""
    cells, choices, waiting = [], {}, []
    for group in spec.groups():
        choice = choose(spec, group, records)
        choices[group] = choice
        if spec.select is not None and spec.candidates(group) != [None] and choice.value is None:
            waiting.append(group)
            continue
        cells += spec.cells_of(group, value=choice.value)
    return cells, choices, waiting
