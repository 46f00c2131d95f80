"""The few collective operations balora needs when a run is launched on several processes.

A run is *launched* when ``accelerate launch`` (or ``torchrun``) started it with ``WORLD_SIZE``
> 1; :func:`init_launched_run` then joins the process group (gloo on CPU, NCCL on GPUs, through
accelerate's ``PartialState``, the same one the ``Trainer`` uses). Every helper here is a no-op
in a single process, so the code that calls them reads the same in both cases.

* :func:`gather_rows` -- a gradient-carrying all-gather of row blocks of different sizes, for
  the batch-level regularisers (covariance eq. 5-6, SVD eq. 7 / 12) computed on the global batch
  (``regularizers.global_batch``);
* :func:`sum_across_processes`, :func:`mean_logs_across_processes` -- counts and logged values;
* :func:`broadcast_from_main`, :func:`barrier`, :func:`is_main_process`;
* :func:`check_teacher_supported` -- the snapshot teacher needs every parameter in full on every
  process, so sharded modes (FSDP, DeepSpeed ZeRO-3) are refused with one line.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "SUPPORTED_TEACHER_MODES",
    "barrier",
    "broadcast_from_main",
    "check_teacher_supported",
    "gather_rows",
    "init_launched_run",
    "is_main_process",
    "launched_world_size",
    "mean_logs_across_processes",
    "sharded_mode",
    "sum_across_processes",
    "world_size",
]

#: The ways of running in which the snapshot teacher is exact (full parameters on every process).
SUPPORTED_TEACHER_MODES = "one process, DDP (accelerate multi-GPU / multi-CPU), DeepSpeed ZeRO-1 or ZeRO-2"


def launched_world_size() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``, 1 when not launched)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def init_launched_run():
    """Join the process group of a launched run (accelerate's ``PartialState``); None in one process.

    Called before anything is written, so that only the main process creates the run directory.
    The backend is gloo without CUDA, NCCL with it (accelerate's choice).
    """
    if launched_world_size() <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the current process group (1 without one)."""
    return dist.get_world_size() if _active() else 1


def is_main_process() -> bool:
    """True in a single process and on rank 0 of a process group."""
    return not _active() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every process (nothing in a single process)."""
    if _active():
        dist.barrier()


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object) on every process; ``value`` itself in one process."""
    if not _active():
        return value
    box = [value if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _device_for_collectives() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across_processes(value: float | int | torch.Tensor) -> torch.Tensor:
    """The sum of a number over all processes, as a float64 0-dim tensor (the value in one process)."""
    total = torch.as_tensor(value, dtype=torch.float64).detach().reshape(())
    if not _active():
        return total
    total = total.to(_device_for_collectives())
    dist.all_reduce(total)
    return total.cpu()


def mean_logs_across_processes(logs: Mapping[str, float]) -> dict[str, float]:
    """Each logged value averaged over the processes that logged it (``logs`` itself in one process)."""
    if not _active():
        return dict(logs)
    every: list[dict[str, float]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(every, dict(logs))
    keys = sorted({k for d in every for k in d})
    return {k: sum(d[k] for d in every if k in d) / sum(k in d for d in every) for k in keys}


class _GatherRows(torch.autograd.Function):
    """All-gather of (n_r, ...) blocks whose n_r differ per rank; the backward pass returns to each
    rank the SUM over ranks of the gradient each rank's copy received for its own rows."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]))
        padded[: rows.shape[0]] = rows
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded.contiguous())
        return torch.cat([block[:n] for block, n in zip(blocks, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every rank's term depends on every row
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """The rows of every process, concatenated in rank order, with gradients flowing back.

    ``rows``: (n_r, ...) on rank r (n_r may differ, even be 0; the trailing dims must agree).
    Returns (Σ n_r, ...). Every rank then computes the same batch-level term T on the global rows;
    the backward pass sums the gradients of all ranks' copies of T for each rank's own rows, so
    after DDP's gradient average the update is that of T itself (∂T/∂θ), as in one process on
    the whole batch. In a single process ``rows`` is returned unchanged.
    """
    if not _active():
        return rows
    size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return _GatherRows.apply(rows, [int(s) for s in sizes], dist.get_rank())


def sharded_mode(accelerator=None) -> str | None:
    """"FSDP" or "DeepSpeed ZeRO-3" when parameters are sharded over the processes, else None.

    Read from ``accelerator`` (a ``Trainer``'s) when given, else from the environment that
    ``accelerate launch`` sets (``ACCELERATE_USE_FSDP``, ``ACCELERATE_USE_DEEPSPEED`` with
    ``ACCELERATE_DEEPSPEED_ZERO_STAGE``), so a run can be refused before anything is loaded.
    """
    if accelerator is not None:
        from accelerate.utils import DistributedType

        kind = getattr(accelerator, "distributed_type", DistributedType.NO)
        plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
        if kind == DistributedType.FSDP:
            return "FSDP"
        if kind == DistributedType.DEEPSPEED and getattr(plugin, "zero_stage", None) == 3:
            return "DeepSpeed ZeRO-3"
        return None
    flag = lambda name: os.environ.get(name, "").strip().lower() in ("1", "true", "yes")  # noqa: E731
    if flag("ACCELERATE_USE_FSDP"):
        return "FSDP"
    if flag("ACCELERATE_USE_DEEPSPEED") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "").strip() == "3":
        return "DeepSpeed ZeRO-3"
    return None


def check_teacher_supported(accelerator=None) -> None:
    """Refuse, in one line, a sharded mode in which the snapshot teacher cannot be exact.

    The teacher swaps the adapter's initial values into the module (:mod:`balora.teacher`), which
    needs the full parameters on every process: FSDP and DeepSpeed ZeRO-3 shard them.
    """
    mode = sharded_mode(accelerator)
    if mode is not None:
        raise ValueError(f"the frozen teacher (consistency regulariser, pre-trained model's perplexity) cannot run "
                         f"under {mode}, which shards the parameters; supported: {SUPPORTED_TEACHER_MODES}")
