"""What a cell ran on: library versions, the machine, and the git commit of the code."""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["LIBRARIES", "environment", "git_commit"]

#: The distributions whose versions every record carries.
LIBRARIES = ("balora", "torch", "transformers", "peft", "accelerate", "datasets", "numpy", "scikit-learn", "scipy")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(folder: str | os.PathLike | None = None) -> dict[str, Any] | None:
    """``{"commit": sha, "dirty": bool}`` of the git checkout holding ``folder`` (default: this
    package's source), or None when it is not in one or git is not installed. ``dirty``: tracked
    files under ``folder`` differ from the commit (for the default, the code that runs; an
    experiment store or results committed elsewhere in the checkout, which a grid rewrites as it
    goes, do not count)."""
    folder = Path(folder) if folder is not None else Path(__file__).resolve().parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()

        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".")
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}
    except (OSError, subprocess.SubprocessError):
        return None


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """Library versions, Python, platform, CPU count and git commit (computed once per process)."""
    import torch

    return {
        "versions": {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}},
        "machine": {"platform": platform.platform(), "processor": platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "git": git_commit(),
    }
