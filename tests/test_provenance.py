"""The git state a record carries: its commit, and whether the code (not the results) had changes."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from balora.experiments.provenance import git_commit

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _git(folder, *args):
    subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True)


def test_dirty_counts_the_code_folder_only(tmp_path):
    code, results = tmp_path / "src" / "pkg", tmp_path / "docs" / "results"
    code.mkdir(parents=True)
    results.mkdir(parents=True)
    (code / "module.py").write_text("x = 1\n")
    (results / "cell.json").write_text("{}\n")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "start")
    state = git_commit(code)
    assert len(state["commit"]) == 40 and state["dirty"] is False
    (results / "cell.json").write_text('{"status": "finished"}\n')  # a grid rewriting its committed store
    (results / "new.json").write_text("{}\n")
    assert git_commit(code)["dirty"] is False
    (code / "module.py").write_text("x = 2\n")
    assert git_commit(code)["dirty"] is True
    assert git_commit(tmp_path)["dirty"] is True  # the whole checkout: both
    assert git_commit(tmp_path.parent / "nowhere") is None
