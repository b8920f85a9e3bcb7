"""torch.distributed for every layer of hesslens: the process group, each rank's share of the data,
the gradient sum the penalised steps do themselves, and the checked all-reduce that makes one
rank's failure every rank's.

Under ``torchrun --nproc-per-node W`` every process runs the same command. The pieces here:

* :func:`process_group_from_env` initialises ``torch.distributed`` from the environment torchrun
  sets (``env://``; ``gloo`` on the CPU, ``nccl`` on CUDA) when ``WORLD_SIZE > 1`` and destroys
  it at the end; alone it does nothing. :func:`current` says which rank this process is.
* :func:`resolve_device` turns a device name into this rank's ``torch.device`` (a bare
  ``"cuda"`` is ``cuda:LOCAL_RANK``), refusing by name what this machine lacks; the commands
  and the trainer both resolve devices here.
* :func:`shard_range` splits ``n`` items into ``W`` contiguous pieces whose sizes differ by at
  most one (the first ``n mod W`` ranks take one more). The trainer draws the same seeded
  permutation of the training set on every rank and gives rank ``r`` its piece of each global
  batch, so a step with ``W`` ranks is the single-process step on the same global batch.
* :func:`sync_gradients` all-reduces (sums) the gradients of a list of parameters in one
  collective. Each rank scales its local mean loss by ``n_local / n_global`` first, so the sum is
  the gradient of the global batch's mean loss, even for uneven pieces.

* :func:`all_reduce_checked` sums a buffer whose last :data:`STATUS_SLOTS` entries are failure
  flags: every rank runs the same estimators on its own shard, so an error raised by the data
  of one rank only (a :class:`~hesslens.errors.DataChangedError`, a loss that is not finite on
  its shard, running out of memory) would leave the other ranks waiting forever in the next
  all-reduce. A rank that fails fills its slot instead of skipping the collective, and after
  the all-reduce every rank raises the same named error (the failing rank its own).

Why the penalised steps sum gradients themselves: DDP's reducer hooks the first-order backward;
the Hessian-trace penalty differentiates with ``torch.autograd.grad(create_graph=True)``, which
DDP does not see (pytorch/pytorch#47562). The trainer computes those steps on the unwrapped
module and calls :func:`sync_gradients`. The penalty of the global batch is exact this way: for
the global mean loss ``L = sum_r (n_r / N) L_r`` the Hessian is ``H = sum_r (n_r / N) H_r``, so
with the same probe ``v`` on every rank (the probe generator is seeded alike),
``v^T H v = sum_r (n_r / N) v^T H_r v``; the finite-difference form is linear in the loss too.

Example:
    >>> import torch
    >>> ranks = current()
    >>> ranks.world, ranks.rank, ranks.is_main
    (1, 0, True)
    >>> [shard_range(7, r, 3) for r in range(3)]
    [(0, 3), (3, 5), (5, 7)]
    >>> buf = torch.zeros(3 + STATUS_SLOTS)
    >>> mark_failure(buf, None) is None, buf[-STATUS_SLOTS:].tolist()
    (True, [0.0, 0.0, 0.0, 0.0])
    >>> remote_failure([0.0, 2.0, 0.0, 0.0])
    NonFiniteCurvatureError('2 other ranks stopped with a NonFiniteCurvatureError (their own \
message says why); every rank stops here instead of waiting for them in a collective')
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from hesslens.errors import (
    DataChangedError,
    HesslensInputError,
    NonFiniteCurvatureError,
    OutputLockedError,
)
from hesslens.locks import OutputLock, output_lock

__all__ = [
    "KINDS",
    "STATUS_SLOTS",
    "WORLD",
    "Ranks",
    "acquire_folder_lock",
    "all_gather_objects",
    "all_reduce_checked",
    "all_reduce_int",
    "barrier",
    "broadcast_buffers",
    "current",
    "env_world_size",
    "folder_lock",
    "initialized",
    "local_device",
    "mark_failure",
    "process_group_from_env",
    "quiet_other_ranks",
    "remote_failure",
    "resolve_device",
    "resolve_group",
    "shard",
    "shard_range",
    "sum_across",
    "sync_gradients",
    "torch_group",
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


class _World:
    """The default process group, by name: operators and :class:`Ranks` keep this rather than
    the group object, so that ``torch.distributed.destroy_process_group()`` really destroys it
    (joining its gloo threads while the interpreter is alive). A group object kept past that
    call lives on into interpreter shutdown, where a gloo thread still releasing the last
    collective's tensors takes the exiting interpreter's lock and aborts the process
    (``terminate called without an active exception``)."""

    def __repr__(self) -> str:
        return "WORLD"


#: The default process group (see :class:`_World`); :func:`torch_group` turns it into the
#: ``group=`` argument torch.distributed takes.
WORLD = _World()


def torch_group(group: Any) -> Any:
    """``group`` as torch.distributed's ``group=`` argument: ``None`` (its default group) for
    :data:`WORLD`, any other group as it is."""
    return None if group is WORLD else group


def _load_dynamo_before_the_group() -> None:
    """Under torchrun, load ``torch._dynamo`` now, before any process group exists. The first
    ``torch.func`` transform loads it otherwise, and loaded while a group exists it keeps
    references to that group, so that ``destroy_process_group()`` no longer ends it (see
    :class:`_World` for what that costs at exit). Alone (no torchrun) nothing is loaded."""
    if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1") and dist.is_available() \
            and not dist.is_initialized():
        import torch._dynamo  # noqa: F401


_load_dynamo_before_the_group()


def initialized() -> bool:
    """Whether ``torch.distributed`` is available and initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def resolve_group(distributed: bool | None, group: Any = None) -> Any:
    """The process group a curvature operator sums over, or ``None`` for a rank-local one:
    ``distributed=False`` is rank-local; ``None`` follows whether torch.distributed is
    initialised; ``True`` requires it. ``group`` defaults to the world (:data:`WORLD`)."""
    if distributed is False:
        return None
    if not initialized():
        if distributed:
            raise HesslensInputError(
                "distributed=True but torch.distributed is not initialised: call "
                "torch.distributed.init_process_group (torchrun does the environment) first")
        return None
    return group if group is not None else WORLD


def current() -> Ranks:
    """This process's :class:`Ranks` in the default group (world 1 when not initialised)."""
    if not initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), WORLD,
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


def resolve_device(device: str | torch.device | None,
                   ranks: Ranks | None = None) -> torch.device:
    """The ``torch.device`` this rank computes on (:func:`local_device`: a bare ``"cuda"`` is
    ``cuda:LOCAL_RANK`` under torchrun; ``None`` or ``""`` is the CPU), or a
    :class:`~hesslens.errors.HesslensInputError` naming what cannot work here: an unknown
    device, CUDA or MPS asked for but absent, a CUDA index beyond the devices present. The one
    place where the commands and the trainer turn a device name into a device.

    Example:
        >>> resolve_device("cpu"), resolve_device(None)
        (device(type='cpu'), device(type='cpu'))
        >>> resolve_device("tpu:0")
        Traceback (most recent call last):
        ...
        hesslens.errors.HesslensInputError: unknown device 'tpu:0': use cpu, cuda, cuda:N or mps
    """
    name = "cpu" if device is None or str(device).strip() == "" else str(device).strip()
    name = local_device(name, ranks)
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise HesslensInputError(
            f"unknown device {name!r}: use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise HesslensInputError(
                f"device {name!r} asked for, but CUDA is not available here; use --device cpu")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise HesslensInputError(
                f"device {name!r} asked for, but there are only {count} CUDA device(s)")
    elif dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise HesslensInputError(
                f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise HesslensInputError(f"unsupported device {name!r}: use cpu, cuda, cuda:N or mps")
    return dev


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
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=torch_group(ranks.group))
        sizes = [p.numel() for p in same]
        n = sum(sizes)
        for p, piece, flag in zip(same, flat[:n].split(sizes), flat[n:].tolist()):
            p.grad = None if flag == 0 else piece.view_as(p)


def sum_across(values: Sequence[float], ranks: Ranks, device: Any = "cpu") -> list[float]:
    """The sums over the ranks of a few numbers (float64; one all-reduce)."""
    if not ranks.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=torch_group(ranks.group))
    return t.tolist()


def all_gather_objects(obj: Any, ranks: Ranks) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` alone)."""
    if not ranks.distributed:
        return [obj]
    out: list[Any] = [None] * ranks.world
    dist.all_gather_object(out, obj, group=torch_group(ranks.group))
    return out


def broadcast_buffers(module: torch.nn.Module, ranks: Ranks) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, which each rank updates
    with its own piece of the batch), so evaluation, tracking and the checkpoint see one model."""
    if not ranks.distributed:
        return
    for b in module.buffers():
        dist.broadcast(b, src=0, group=torch_group(ranks.group))


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
    lock = acquire_folder_lock(folder, what, ranks)
    if lock is None:
        yield None
        return
    with lock:
        yield lock


def acquire_folder_lock(folder: str | os.PathLike[str], what: str,
                        ranks: Ranks | None = None) -> OutputLock | None:
    """Take the output lock of ``folder`` on rank 0 and return it (``None`` on the other ranks),
    for an object that holds it until it is closed (a tracker, a monitor); every rank raises
    the same error if rank 0 could not take it (:func:`folder_lock` for a block)."""
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
    return lock


def barrier(ranks: Ranks) -> None:
    """Wait for every rank (nothing alone)."""
    if ranks.distributed:
        dist.barrier(group=torch_group(ranks.group))


# ---------------------------------------------------------------------- checked collectives
#: The kinds of failure a rank reports, most specific first (any other error is the last).
KINDS: tuple[type[BaseException], ...] = (DataChangedError, NonFiniteCurvatureError,
                                          HesslensInputError, Exception)
STATUS_SLOTS = len(KINDS)


def mark_failure(buf: Tensor, failure: BaseException | None) -> None:
    """Zero the status slots at the end of ``buf`` (1-D) and set the one of ``failure``."""
    status = buf[-STATUS_SLOTS:]
    status.zero_()
    if failure is not None:
        status[next(i for i, kind in enumerate(KINDS) if isinstance(failure, kind))] = 1


def remote_failure(flags: Sequence[float]) -> BaseException | None:
    """The error this rank raises for the failures the other ranks reported, or None."""
    for kind, count in zip(KINDS, flags):
        if count > 0:
            n = round(count)
            cls = kind if kind is not Exception else RuntimeError
            return cls(f"{n} other rank{'s' if n > 1 else ''} stopped with a "
                       f"{kind.__name__ if kind is not Exception else 'error'} (their own "
                       "message says why); every rank stops here instead of waiting for them "
                       "in a collective")
    return None


def all_reduce_checked(buf: Tensor, failure: BaseException | None, group: Any) -> Tensor:
    """Sum the 1-D ``buf`` (its last :data:`STATUS_SLOTS` entries the status) over ``group``
    in place, then raise on every rank if any rank failed: ``failure`` itself on the rank that
    had it, the same kind of error (:func:`remote_failure`) on the others."""
    mark_failure(buf, failure)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=torch_group(group))
    if failure is not None:
        raise failure
    error = remote_failure(buf[-STATUS_SLOTS:].tolist())
    if error is not None:
        raise error
    return buf


def all_reduce_int(value: int, group: Any, failure: BaseException | None = None) -> int:
    """The sum of ``value`` over the ranks of ``group``; every rank raises if one has a
    ``failure`` (:func:`all_reduce_checked`)."""
    t = torch.zeros(1 + STATUS_SLOTS, dtype=torch.int64)
    t[0] = value
    if dist.get_backend(torch_group(group)) == "nccl":
        t = t.cuda()
    all_reduce_checked(t, failure, group)
    return int(t[0].item())
