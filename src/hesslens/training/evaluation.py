"""The evaluation of a run after every epoch (and at initialisation): mean cross-entropy and
accuracy on the validation and test sets, in eval mode, each rank on its piece under
torch.distributed.

Example:
    >>> from torch import nn
    >>> model = nn.Linear(3, 2)
    >>> _ = nn.init.zeros_(model.weight), nn.init.zeros_(model.bias)
    >>> x, y = torch.ones(4, 3), torch.tensor([0, 1, 0, 1])
    >>> loss, acc = evaluate(model, x, y)   # equal logits: log 2, and argmax picks class 0
    >>> round(loss, 6), acc
    (0.693147, 0.5)
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor, nn

from hesslens.parallel import Ranks, shard, sum_across
from hesslens.training.setup import RunSetup

__all__ = ["evaluate", "evaluate_held_out", "evaluate_shared"]


@torch.no_grad()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024
) -> tuple[float | None, float | None]:
    """Mean cross-entropy and accuracy of ``model`` in eval mode (``(None, None)`` if empty)."""
    if len(y) == 0:
        return None, None
    was = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    try:
        for s in range(0, len(y), batch_size):
            out = model(x[s : s + batch_size])
            yb = y[s : s + batch_size]
            total_loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
    finally:
        model.train(was)
    return total_loss / len(y), correct / len(y)


def evaluate_shared(model: nn.Module, x: Tensor, y: Tensor,
                    ranks: Ranks) -> tuple[float | None, float | None]:
    """:func:`evaluate` alone; under torch.distributed each rank evaluates its piece and the
    sums are all-reduced (the same numbers on every rank)."""
    if not ranks.distributed:
        return evaluate(model, x, y)
    xs, ys = shard(x, ranks), shard(y, ranks)
    loss, acc = evaluate(model, xs, ys)
    n = len(ys)
    total_loss, correct, count = sum_across(
        [0.0 if loss is None else loss * n, 0.0 if acc is None else round(acc * n), n], ranks,
        device=y.device)
    if count == 0:
        return None, None
    return total_loss / count, correct / count


def evaluate_held_out(setup: RunSetup) -> tuple[dict[str, Any], float]:
    """``{"val_loss", "val_acc", "test_loss", "test_acc"}`` of the run's model now, and the
    seconds they took."""
    t0 = time.perf_counter()
    s = setup.splits
    val_loss, val_acc = evaluate_shared(setup.model, s.x_val, s.y_val, setup.ranks)
    test_loss, test_acc = evaluate_shared(setup.model, s.x_test, s.y_test, setup.ranks)
    numbers = {"val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss,
               "test_acc": test_acc}
    return numbers, time.perf_counter() - t0
