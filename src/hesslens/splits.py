"""The seeded ways to cut labelled data into pieces: a stratified train/validation split and the
fixed k-per-class analysis subset.

One place for each, below every layer that uses them: the zoo (its test splits), the trainer
(its validation split and its tracking subset) and the experiments. Everything here is
deterministic: the same arguments and ``seed`` give the same examples in the same order, and no
function touches the global random state. ``hesslens.zoo`` re-exports these names.

Example:
    >>> import torch
    >>> from hesslens.splits import analysis_subset
    >>> x, y = torch.randn(100, 3), torch.arange(100) % 5
    >>> xs, ys = analysis_subset(x, y, per_class=2, seed=0)
    >>> torch.bincount(ys).tolist()
    [2, 2, 2, 2, 2]
"""

from __future__ import annotations

import numpy as np
import torch

from hesslens.checks import check_labels, check_positive_int, check_seed, check_xy
from hesslens.errors import HesslensInputError

__all__ = ["analysis_subset", "split_train_val", "subset_indices"]


def split_train_val(
    x: torch.Tensor, y: torch.Tensor, val_fraction: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split ``(x, y)`` into a training and a validation part, stratified by class.

    The validation part has ``ceil(val_fraction * N)`` examples (scikit-learn's rounding) drawn
    with ``seed``; each class keeps its share. When stratifying is impossible (a class with a
    single example, or fewer validation slots than classes) the split is a plain seeded random
    one. Both parts keep the original order of the examples.

    Returns:
        ``(x_train, y_train, x_val, y_val)``.

    >>> x, y = torch.arange(20.0), torch.arange(20) % 2
    >>> x_tr, y_tr, x_val, y_val = split_train_val(x, y, val_fraction=0.2, seed=0)
    >>> len(x_tr), len(x_val), torch.bincount(y_val).tolist()
    (16, 4, [2, 2])
    """
    check_xy(x, y, "split_train_val")
    seed = check_seed(seed)
    n = len(y)
    if n < 2:
        raise HesslensInputError(f"split_train_val needs at least 2 examples, got {n}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise HesslensInputError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    n_val = int(np.ceil(val_fraction * n))
    if n_val >= n:
        raise HesslensInputError(
            f"val_fraction={val_fraction} of {n} examples leaves no training examples; "
            "use a smaller fraction or more data"
        )
    labels = y.cpu().numpy()
    counts = np.bincount(labels - labels.min())
    present = counts[counts > 0]
    can_stratify = present.min() >= 2 and min(n_val, n - n_val) >= present.size
    # scikit-learn on first use: importing it takes over a second of every start-up
    from sklearn.model_selection import train_test_split

    train_idx, val_idx = train_test_split(
        np.arange(n),
        test_size=n_val,
        random_state=seed,
        stratify=labels if can_stratify else None,
    )
    train_idx = torch.as_tensor(np.sort(train_idx), device=y.device)
    val_idx = torch.as_tensor(np.sort(val_idx), device=y.device)
    return x[train_idx], y[train_idx], x[val_idx], y[val_idx]


def subset_indices(y: torch.Tensor, per_class: int = 10, seed: int = 0) -> torch.Tensor:
    """Indices of ``per_class`` seeded-random examples of every class present in ``y``.

    A class with fewer than ``per_class`` examples contributes all it has; a class absent from
    ``y`` contributes nothing. The indices come back sorted (the data's own order).

    >>> subset_indices(torch.tensor([0, 0, 0, 1, 2, 2]), per_class=2, seed=0).tolist()
    [0, 2, 3, 4, 5]
    """
    check_labels(y, "subset_indices")
    per_class = check_positive_int(per_class, "per_class")
    generator = torch.Generator().manual_seed(check_seed(seed))
    order = torch.randperm(len(y), generator=generator)
    labels = y.cpu()[order]
    chosen = [order[labels == c][:per_class] for c in torch.unique(labels)]
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=y.device)
    return torch.sort(torch.cat(chosen)).values.to(y.device)


def analysis_subset(
    x: torch.Tensor, y: torch.Tensor, per_class: int = 10, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed small set the Hessian is measured on: ``per_class`` examples of each class.

    The paper used 10 training examples per class with seed 0. Classes with fewer examples
    give all they have (so the result may hold fewer than ``per_class * num_classes``).
    Deterministic in ``seed``; see :func:`subset_indices`.

    >>> x, y = torch.randn(50, 2), torch.arange(50) % 10
    >>> xs, ys = analysis_subset(x, y, per_class=3, seed=1)
    >>> xs.shape, torch.bincount(ys).tolist() == [3] * 10
    (torch.Size([30, 2]), True)
    """
    check_xy(x, y, "analysis_subset")
    idx = subset_indices(y, per_class=per_class, seed=seed)
    return x[idx], y[idx]
