"""Every shipped experiment spec (both scales) loads and resolves every cell's config."""

from __future__ import annotations

from pathlib import Path

import pytest

from balora.experiments.spec import load_spec

SPECS = sorted((Path(__file__).resolve().parents[1] / "configs" / "experiments").rglob("*.yaml"))


def test_specs_are_shipped_at_both_scales():
    names = {p.parent.name for p in SPECS}
    assert {"local", "paper"} <= names


@pytest.mark.parametrize("path", SPECS, ids=[str(p.relative_to(p.parents[1])) for p in SPECS])
def test_every_cell_of_a_shipped_spec_resolves(path):
    spec = load_spec(path)
    assert spec.cells, path
    ids = [c.id for c in spec.cells]
    assert len(ids) == len(set(ids))
    seeds = {c.seed for c in spec.cells}
    assert seeds <= {42, 1024, 2024} or path.name.startswith("smoke")
