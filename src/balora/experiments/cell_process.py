"""One cell in its own child process: ``python -m balora.experiments.cell JOB.json``, waited for.

:func:`run_cell_process` is what both executors run per cell (the local one in a thread of the
runner, the Ray one inside a Ray task): it writes the job file, starts the child with its output
appended to the cell's log, waits, and returns the outcome the child wrote, or a failed outcome
that says how the child ended (a signal, e.g. an out-of-memory kill, or an exit code) with the
tail of its log. Only the standard library is imported here, so a Ray worker that runs it does not
pay for importing torch (the child does, once).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["JOB_FILE", "LOG_FILE", "OUTCOME_FILE", "exit_message", "log_tail", "run_cell_process"]

JOB_FILE, OUTCOME_FILE, LOG_FILE = "job.json", "outcome.json", "cell.log"
#: Lines of a crashed child's log kept in the cell's record.
LOG_TAIL_LINES = 40
FAILED = "failed"


def exit_message(code: int) -> str:
    """How a child process that left no outcome ended, in words."""
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else f"signal {-code}"
        hint = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
        return f"the cell's process was ended by {name}{hint}"
    return f"the cell's process ended with exit code {code} without an outcome (see its cell.log)"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:])
    except OSError:
        return ""


def run_cell_process(job: dict[str, Any], cell_dir: str | Path, isolation: str = "process") -> dict[str, Any]:
    """Run ``job`` in a child process (module docstring); its outcome, with ``isolation`` and the
    child's wall time including its start-up as ``timings.process_seconds``."""
    cell_dir = Path(cell_dir)
    job_path = cell_dir / JOB_FILE
    job_path.write_text(json.dumps(job, indent=2) + "\n")
    started = time.perf_counter()
    with open(cell_dir / LOG_FILE, "a") as log:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} cell {job['id']}\n")
        log.flush()
        child = subprocess.Popen([sys.executable, "-m", "balora.experiments.cell", str(job_path)],
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            code = child.wait()
        except BaseException:  # Ctrl-C, the runner being stopped or a cancelled task: no orphan child
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
            raise
    outcome_path = cell_dir / OUTCOME_FILE
    elapsed = time.perf_counter() - started
    if code == 0 and outcome_path.is_file():
        outcome = json.loads(outcome_path.read_text())
        outcome["timings"] = dict(outcome.get("timings") or {}, process_seconds=elapsed)
        return dict(outcome, isolation=isolation)
    return {"id": job["id"], "status": FAILED, "error": exit_message(code), "isolation": isolation,
            "traceback": log_tail(cell_dir / LOG_FILE), "run_dir": None,
            "timings": {"wall_seconds": elapsed, "process_seconds": elapsed}}
