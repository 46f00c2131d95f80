"""Run directories: one per training run, never overwritten.

A run directory holds ``config.yaml`` (what was asked), ``checkpoints/`` (resumable state),
``adapter/`` (the final adapter in PEFT format), ``metrics.json``, ``log_history.json`` and
``loss_curve.png``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
PREDICTIONS_FILE = "predictions.jsonl"
CALIBRATION_FILE = "calibration.json"  # regularizers.lambdas: auto: what was measured and proposed
#: What a complete transformers checkpoint holds (the mark that it was saved to the end).
TRAINER_STATE_FILE = "trainer_state.json"

logger = logging.getLogger("balora")


def create_run_dir(root: str | os.PathLike, name: str) -> Path:
    """Create ``root/<name>-<YYYYmmdd-HHMMSS>`` (with ``-2``, ``-3``, ... on collision) and return it."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"
    stem = f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        path = root / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a new run directory under {root}")


def write_new(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a file that must not exist yet (results are never silently overwritten)."""
    path = Path(path)
    with open(path, "x") as handle:
        handle.write(text)
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_new(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]]) -> Path:
    """One JSON object per line; never overwrites."""
    return write_new(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


def write_yaml(path: str | os.PathLike, data: Any) -> Path:
    return write_new(path, yaml.safe_dump(data, sort_keys=False))


def last_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoints/checkpoint-N`` of a run, or None.

    A checkpoint without ``trainer_state.json`` (a save that was interrupted) is incomplete: it is
    skipped, with a warning naming it, for the next older one.
    """
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, path in sorted(steps, reverse=True):
        if (path / TRAINER_STATE_FILE).is_file():
            return path
        logger.warning("skipping incomplete checkpoint %s (no %s)", path, TRAINER_STATE_FILE)
    return None
