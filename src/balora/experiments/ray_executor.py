"""``--executor ray``: the cells of a grid as tasks on a Ray cluster (``pip install balora[ray]``).

Every cell of a stage (the whole grid, or with ``select`` the candidates, then the chosen values) is
submitted at once as a Ray task with its own resources (``cpus_per_cell``, default 1, and
``gpus_per_cell``, default 0); Ray schedules them on the cluster's nodes, and each outcome is
recorded in the store as soon as its task ends, in whatever order they finish. A task runs the
cell as the local executor does, in a child process of the Ray worker
(:func:`balora.experiments.cell_process.run_cell_process`): the worker itself imports nothing
heavy (torch imported inside a Ray worker took 28 s against 6.5 s in a plain child process,
measured here), and an out-of-memory kill ends the cell, not the worker. The cell's run
directory, ``outcome.json`` and log are written on the node, so every node must see the store at
the same path (a shared file system). A task that dies (its node lost) is a failed cell with Ray's
error; the grid goes on. Ctrl-C cancels the tasks still queued or running.

Which cluster: ``address`` (``--ray-address``): ``auto`` (the cluster this machine belongs to,
started with ``ray start --head``), ``ray://<head>:10001`` (Ray Client), or None (the default):
``RAY_ADDRESS`` when it is set, otherwise a local Ray instance started for this grid and stopped
after it (its workers at normal priority, ``RAY_worker_niceness=0``, and a small object store).
Ray is imported only when this executor is made.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from balora.experiments.cell_process import FAILED, run_cell_process

__all__ = ["RayExecutor", "ray_cell"]

INSTALL_HINT = "pip install 'balora[ray]' (or: pip install ray)"
#: The object store of a local instance: cells pass only small outcome dicts through it.
LOCAL_OBJECT_STORE_BYTES = 128 * 1024 * 1024


def ray_cell(job: dict[str, Any], cell_dir: str) -> dict[str, Any]:
    """What a Ray task runs: one cell in a child process of the worker; its outcome, with the node."""
    return dict(run_cell_process(job, cell_dir, isolation="ray"), node=os.uname().nodename)


class RayExecutor:
    """Runs the cells of a stage as Ray tasks (module docstring)."""

    name = "ray"

    def __init__(self, address: str | None = None, cpus_per_cell: float = 1, gpus_per_cell: float = 0,
                 init_options: dict[str, Any] | None = None):
        try:
            import ray
        except ImportError:
            raise ValueError(f"--executor ray needs Ray: {INSTALL_HINT}") from None
        for name, value in (("cpus_per_cell", cpus_per_cell), ("gpus_per_cell", gpus_per_cell)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be a number >= 0, got {value!r}")
        self.ray = ray
        self.address = address if address is not None else os.environ.get("RAY_ADDRESS")
        self.cpus_per_cell, self.gpus_per_cell = cpus_per_cell, gpus_per_cell
        self.init_options = dict(init_options or {})

    @property
    def isolation(self) -> str:
        return "ray"

    def _connect(self) -> bool:
        """Connect to (or start) Ray; True when this executor started it (and stops it after)."""
        ray = self.ray
        if ray.is_initialized():
            return False
        options = {"include_dashboard": False, "log_to_driver": False, **self.init_options}
        if self.address is None:
            # a local instance for this grid: Ray runs its workers at nice 15, and a cell (the worker's
            # child) at that priority beside any other load on the machine all but stops (a tiny
            # grid did not finish in 5 minutes beside one training; at nice 0 it does)
            os.environ.setdefault("RAY_worker_niceness", "0")
            options.setdefault("object_store_memory", LOCAL_OBJECT_STORE_BYTES)
        try:
            ray.init(address=self.address, **options)
        except (ConnectionError, RuntimeError, ValueError) as err:
            where = self.address or "a local Ray instance"
            raise ValueError(f"--executor ray: cannot connect to {where}: {' '.join(str(err).split())[:300]}") \
                from None
        return True

    def execute(self, items, on_start, on_done) -> None:
        """Submit every ``(key, job, cell_dir)`` of ``items`` (``on_start(key)`` at submission), then
        call ``on_done(key, outcome)`` for each as its task ends."""
        ray = self.ray
        items = list(items)
        started = self._connect()
        remote = ray.remote(ray_cell).options(num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell,
                                              max_retries=0)
        pending: dict[Any, tuple[str, Path, float]] = {}
        try:
            for key, job, cell_dir in items:
                on_start(key)
                pending[remote.remote(job, str(cell_dir))] = (key, Path(cell_dir), time.perf_counter())
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    key, _cell_dir, submitted = pending.pop(ref)
                    try:
                        outcome = ray.get(ref)
                    except Exception as err:  # the task died (node lost, out of memory, ...)
                        elapsed = time.perf_counter() - submitted
                        outcome = {"id": key, "status": FAILED, "isolation": self.isolation, "run_dir": None,
                                   "error": f"the Ray task failed: {type(err).__name__}: "
                                            f"{' '.join(str(err).split())[:500]}",
                                   "traceback": str(err), "timings": {"wall_seconds": elapsed}}
                    on_done(key, outcome)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        finally:
            if started:
                ray.shutdown()
