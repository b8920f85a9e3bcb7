"""One epoch of training: the data order, the steps (the arm's loss, penalty and SAM passes,
data-parallel where torch.distributed runs) and the running sums the epoch's record reports.

Example:
    >>> epoch_seed(0, 1) == epoch_seed(0, 1) != epoch_seed(0, 2)
    True
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from hesslens.parallel import Ranks, broadcast_buffers, shard_range, sum_across, sync_gradients
from hesslens.training.penalty import HessianTracePenalty
from hesslens.training.sam import SAM, bn_stats_frozen
from hesslens.training.setup import RunSetup

__all__ = ["EpochTotals", "epoch_seed", "progress_bar", "train_epoch", "train_step"]


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s data order: a hash of ``(seed, epoch)`` (63 bits)."""
    h = hashlib.blake2b(f"hesslens-data-order:{seed}:{epoch}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def progress_bar(enabled: bool, **kwargs: Any) -> Any:
    """A tqdm bar, shown only when ``enabled`` and stderr is a terminal."""
    disable = not enabled or not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(disable=disable, **kwargs)


def train_step(
    model: nn.Module, ddp: nn.Module | None, optimizer: torch.optim.Optimizer,
    loss_fn: Callable[..., Tensor], xb: Tensor, yb: Tensor, n_global: int, ranks: Ranks,
    penalty: HessianTracePenalty | None, gamma: float,
) -> tuple[Tensor | None, Tensor | None]:
    """One optimizer step (SAM: its two passes) on this rank's piece ``(xb, yb)`` of a global
    batch of ``n_global`` examples; returns the detached outputs and penalty (``None`` on a
    rank whose piece is empty).

    Alone this is ``(loss + gamma * pen).backward(); step()``. Data-parallel, every rank's
    gradient is scaled by its share ``n_local / n_global`` of the global mean and summed over
    the ranks: by DDP's reducer (which averages, hence the factor ``world``) on plain steps, by
    :func:`~hesslens.parallel.sync_gradients` on the unwrapped module where DDP
    would go wrong: the penalty's double backward (pytorch/pytorch#47562) and a global batch
    smaller than the world (some rank has nothing of it).
    """
    n_local = len(yb)
    by_hand = ranks.distributed and (penalty is not None or n_global < ranks.world)
    net = ddp if ddp is not None and not by_hand else model
    scale = 1.0
    if ranks.distributed:
        scale = n_local / n_global * (ranks.world if net is ddp else 1)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def objective() -> tuple[Tensor | None, Tensor | None]:
        if n_local == 0:
            if penalty is not None and penalty.curvature == "hessian":
                penalty.sample_probes()  # the same parameter-space probes on every rank
            return None, None
        out_b = net(xb)
        loss = loss_fn(out_b, yb)
        total, pen = loss, None
        if penalty is not None:
            pen = penalty(loss, inputs=xb, targets=yb)
            total = loss + gamma * pen
        (total * scale if scale != 1.0 else total).backward()
        return out_b.detach(), None if pen is None else pen.detach()

    def gradient() -> tuple[Tensor | None, Tensor | None]:
        if not by_hand:
            return objective()
        with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
            got = objective()
        sync_gradients(trainable, ranks)
        return got

    optimizer.zero_grad(set_to_none=True)
    out_b, pen = gradient()
    if isinstance(optimizer, SAM):
        optimizer.first_step(zero_grad=True)
        with bn_stats_frozen(model):
            gradient()
        optimizer.second_step(zero_grad=True)
    else:
        optimizer.step()
    return out_b, pen


@dataclass
class EpochTotals:
    """What an epoch's training adds up, summed over the ranks: the learning rate it ran at,
    the loss and correct predictions over all training examples, the penalty's weighted sum
    over the steps that applied it, and the training loop's wall time."""

    lr: float
    loss_sum: float
    correct: int
    penalty_sum: float
    penalty_steps: int
    seconds: float


def train_epoch(setup: RunSetup, epoch: int, global_step: int,
                progress: bool) -> tuple[EpochTotals, int]:
    """Train epoch ``epoch`` (0-based) from optimizer step ``global_step``: every global batch
    of the epoch's permutation (this rank's piece of each), the schedule's step and rank 0's
    BatchNorm statistics on every rank. Returns the epoch's totals and the next step."""
    config, ranks, model, device = setup.config, setup.ranks, setup.model, setup.device
    x_tr, y_tr = setup.splits.x_train, setup.splits.y_train
    penalty, loss_fn = setup.penalty, setup.loss_fn
    model.train()
    lr = float(setup.scheduler.get_last_lr()[0])
    n = len(y_tr)
    n_batches = math.ceil(n / config.batch_size)
    order = torch.randperm(
        n, generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
    ).to(device)
    t0 = time.perf_counter()
    sum_loss = torch.zeros((), device=device)
    sum_correct = torch.zeros((), device=device, dtype=torch.long)
    pen_sum, pen_steps = 0.0, 0
    htr_on = penalty is not None and epoch >= config.htr_start
    inner = progress_bar(progress, total=n_batches, leave=False, desc=f"epoch {epoch + 1}",
                         unit="batch")
    for b in range(n_batches):
        idx = order[b * config.batch_size : (b + 1) * config.batch_size]
        n_global = len(idx)
        if ranks.distributed:  # this rank's piece of the global batch
            idx = idx[slice(*shard_range(n_global, ranks.rank, ranks.world))]
        xb, yb = x_tr[idx], y_tr[idx]
        use_pen = htr_on and global_step % config.htr_every == 0
        out_b, pen = train_step(
            model, setup.ddp, setup.optimizer, loss_fn, xb, yb, n_global, ranks,
            penalty if use_pen else None, config.htr_gamma)
        global_step += 1
        if out_b is not None:
            with torch.no_grad():
                sum_loss += loss_fn(out_b, yb, reduction="sum")
                sum_correct += (out_b.argmax(1) == yb).sum()
        if use_pen:
            pen_sum += 0.0 if pen is None else float(pen) * len(yb) / n_global
            pen_steps += 1
        inner.update(1)
    inner.close()
    setup.scheduler.step()
    broadcast_buffers(model, ranks)  # rank 0's running statistics on every rank
    seconds = time.perf_counter() - t0
    loss_total, correct = float(sum_loss), int(sum_correct)
    if ranks.distributed:  # every rank's sums (pen_sum: each rank's weighted share)
        loss_total, correct_f, pen_sum = sum_across([loss_total, correct, pen_sum], ranks,
                                                    device=device)
        correct = round(correct_f)
    return EpochTotals(lr=lr, loss_sum=loss_total, correct=correct, penalty_sum=pen_sum,
                       penalty_steps=pen_steps, seconds=seconds), global_step
