"""Data parallelism for training and analysis under ``torchrun``: the process group, each rank's
share of a batch, and the gradient sum the penalised steps do themselves.

Under ``torchrun --nproc-per-node W`` every process runs the same command. The pieces here:

* :func:`process_group_from_env` initialises ``torch.distributed`` from the environment torchrun
  sets (``env://``; ``gloo`` on the CPU, ``nccl`` on CUDA) when ``WORLD_SIZE > 1`` and destroys
  it at the end; alone it does nothing. :func:`current` says which rank this process is.
* :func:`shard_range` splits ``n`` items into ``W`` contiguous pieces whose sizes differ by at
  most one (the first ``n mod W`` ranks take one more). The trainer draws the same seeded
  permutation of the training set on every rank and gives rank ``r`` its piece of each global
  batch, so a step with ``W`` ranks is the single-process step on the same global batch.
* :func:`sync_gradients` all-reduces (sums) the gradients of a list of parameters in one
  collective. Each rank scales its local mean loss by ``n_local / n_global`` first, so the sum is
  the gradient of the global batch's mean loss, even for uneven pieces.

Why the penalised steps sum gradients themselves: DDP's reducer hooks the first-order backward;
the Hessian-trace penalty differentiates with ``torch.autograd.grad(create_graph=True)``, which
DDP does not see (pytorch/pytorch#47562). The trainer computes those steps on the unwrapped
module and calls :func:`sync_gradients`. The penalty of the global batch is exact this way: for
the global mean loss ``L = sum_r (n_r / N) L_r`` the Hessian is ``H = sum_r (n_r / N) H_r``, so
with the same probe ``v`` on every rank (the probe generator is seeded alike),
``v^T H v = sum_r (n_r / N) v^T H_r v``; the finite-difference form is linear in the loss too.

Example:
    >>> ranks = current()
    >>> ranks.world, ranks.rank, ranks.is_main
    (1, 0, True)
    >>> [shard_range(7, r, 3) for r in range(3)]
    [(0, 3), (3, 5), (5, 7)]
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from hesslens.errors import HesslensInputError, OutputLockedError
from hesslens.locks import OutputLock, output_lock

__all__ = [
    "Ranks",
    "all_gather_objects",
    "barrier",
    "broadcast_buffers",
    "current",
    "env_world_size",
    "folder_lock",
    "local_device",
    "process_group_from_env",
    "quiet_other_ranks",
    "shard",
    "shard_range",
    "sum_across",
    "sync_gradients",
]


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: ``rank`` of ``world`` processes in ``group`` (``None`` when
    alone), over ``backend``."""

    rank: int = 0
    world: int = 1
    group: Any = None
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world > 1

    def record(self) -> dict[str, Any]:
        """What the result files record: ``{"world_size", "backend"}``."""
        return {"world_size": self.world, "backend": self.backend}


def current() -> Ranks:
    """This process's :class:`Ranks` in the default group (world 1 when not initialised)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), dist.group.WORLD,
                 str(dist.get_backend()))


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun set it for this process (1 when not started by torchrun)."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(text)
    except ValueError:
        raise HesslensInputError(f"WORLD_SIZE={text!r} is not an integer") from None


@contextlib.contextmanager
def process_group_from_env(device: str | torch.device = "cpu") -> Iterator[Ranks]:
    """Within the block, ``torch.distributed`` is initialised when torchrun started this process
    (``WORLD_SIZE > 1``): ``nccl`` for a CUDA ``device`` (this rank on ``cuda:LOCAL_RANK``),
    ``gloo`` otherwise. A group that is already initialised is used and left alone; one made here
    is destroyed on exit. Yields :func:`current`.

    Example:
        >>> with process_group_from_env("cpu") as ranks:
        ...     ranks.world
        1
    """
    import torch.distributed as dist

    made = False
    if env_world_size() > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise HesslensInputError(
                "WORLD_SIZE > 1 (started by torchrun) but this torch has no torch.distributed")
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        made = True
    try:
        yield current()
    finally:
        if made and dist.is_initialized():
            dist.destroy_process_group()


def quiet_other_ranks(ranks: Ranks) -> None:
    """Silence warnings on every rank but 0: the ranks compute the same results, so their
    warnings are rank 0's repeated (errors still stop the run and are shown)."""
    if not ranks.is_main:
        import warnings

        warnings.simplefilter("ignore")


def local_device(device: str | torch.device, ranks: Ranks | None = None) -> str:
    """``device`` for this rank: a bare ``"cuda"`` becomes ``cuda:LOCAL_RANK`` under torchrun
    (one GPU per process); anything else is unchanged.

    Example:
        >>> local_device("cpu"), local_device("cuda:1")
        ('cpu', 'cuda:1')
    """
    name = str(device)
    ranks = current() if ranks is None else ranks
    if ranks.distributed and name == "cuda":
        return f"cuda:{int(os.environ.get('LOCAL_RANK', ranks.rank))}"
    return name


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """``(start, stop)`` of rank ``rank``'s contiguous piece of ``n`` items split ``world``
    ways (sizes differ by at most one; the first ``n mod world`` ranks take one more)."""
    base, extra = divmod(int(n), int(world))
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(x: Tensor, ranks: Ranks) -> Tensor:
    """This rank's contiguous piece of ``x`` along its first dimension (:func:`shard_range`)."""
    start, stop = shard_range(len(x), ranks.rank, ranks.world)
    return x[start:stop]


def sync_gradients(params: Sequence[Tensor], ranks: Ranks) -> None:
    """Replace every ``p.grad`` by its sum over the ranks (one all-reduce per parameter dtype,
    the gradients then views of its buffer). A parameter without
    a gradient on this rank contributes zeros; one without a gradient on every rank keeps
    ``grad=None`` (as alone, so optimizers skip it)."""
    if not ranks.distributed:
        return
    import torch.distributed as dist

    params = list(params)
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for p in params:
        by_dtype.setdefault(p.dtype, []).append(p)
    for same in by_dtype.values():  # one all-reduce per dtype (usually one in all)
        parts = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                 for p in same]
        has = torch.tensor([p.grad is not None for p in same], dtype=same[0].dtype,
                           device=same[0].device)
        flat = torch.cat([*parts, has])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=ranks.group)
        sizes = [p.numel() for p in same]
        n = sum(sizes)
        for p, piece, flag in zip(same, flat[:n].split(sizes), flat[n:].tolist()):
            p.grad = None if flag == 0 else piece.view_as(p)


def sum_across(values: Sequence[float], ranks: Ranks, device: Any = "cpu") -> list[float]:
    """The sums over the ranks of a few numbers (float64; one all-reduce)."""
    if not ranks.distributed:
        return [float(v) for v in values]
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=ranks.group)
    return t.tolist()


def all_gather_objects(obj: Any, ranks: Ranks) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` alone)."""
    if not ranks.distributed:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj, group=ranks.group)
    return out


def broadcast_buffers(module: torch.nn.Module, ranks: Ranks) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, which each rank updates
    with its own piece of the batch), so evaluation, tracking and the checkpoint see one model."""
    if not ranks.distributed:
        return
    import torch.distributed as dist

    for b in module.buffers():
        dist.broadcast(b, src=0, group=ranks.group)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], what: str,
                ranks: Ranks | None = None) -> Iterator[OutputLock | None]:
    """Hold the output lock of ``folder`` (:func:`hesslens.locks.output_lock`: it creates the
    folder, and removes it again if the block fails leaving it empty) on rank 0, the process
    that writes, for the block. Under torch.distributed every rank learns whether rank 0 got
    it and raises the same error if not, so that all stop alike instead of waiting for each
    other. Yields rank 0's lock (``None`` on the other ranks).

    Example:
        >>> import tempfile
        >>> with folder_lock(tempfile.mkdtemp(), "a demo") as lock:
        ...     lock.held
        True
    """
    ranks = current() if ranks is None else ranks
    lock, error = None, None
    if ranks.is_main:
        try:
            lock = output_lock(folder, what)
        except HesslensInputError as err:
            error = err
    if ranks.distributed:
        got = all_gather_objects(None if error is None else (type(error).__name__, str(error)),
                                 ranks)[0]
        if got is not None and error is None:
            error = (OutputLockedError if got[0] == "OutputLockedError"
                     else HesslensInputError)(got[1])
    if error is not None:
        raise error
    if lock is None:
        yield None
        return
    with lock:
        yield lock


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (nothing alone)."""
    if ranks.distributed:
        import torch.distributed as dist

        dist.barrier(group=ranks.group)
