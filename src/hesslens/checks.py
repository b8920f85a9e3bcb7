"""Argument checks shared across the package's layers (the zoo, the trainer, the splits).

Each check raises :class:`hesslens.errors.HesslensInputError` with a message that names the
argument, what was given and what is expected. This module imports nothing of hesslens but
the errors, so any layer may use it.

Example:
    >>> import torch
    >>> from hesslens.checks import check_positive_int, check_xy
    >>> check_positive_int(10, "num_classes")
    10
    >>> check_xy(torch.zeros(2, 3), torch.tensor([0, 1, 1]), "toy")
    Traceback (most recent call last):
    ...
    hesslens.errors.HesslensInputError: toy: inputs have 2 rows but there are 3 labels; ...
"""

from __future__ import annotations

import numbers

import torch

from hesslens.errors import HesslensInputError

__all__ = [
    "SEED_RANGE",
    "check_int",
    "check_labels",
    "check_positive_int",
    "check_seed",
    "check_xy",
]


def check_int(value: object, what: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer (Python or NumPy, not bool), else raise.

    >>> check_int(3, "seed")
    3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise HesslensInputError(f"{what} must be an integer, got {value!r}")
    return int(value)


def check_positive_int(value: object, what: str) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise.

    >>> check_positive_int(10, "num_classes")
    10
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise HesslensInputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


#: Seeds every seeded library of the package accepts: NumPy's and scikit-learn's ``random_state``
#: take ``0 <= seed < 2**32``; torch takes more, so this is the common range.
SEED_RANGE = (0, 2**32 - 1)


def check_seed(value: object, what: str = "seed") -> int:
    """Return ``value`` as an ``int`` if it is a seed every seeded library accepts
    (:data:`SEED_RANGE`), else raise naming the range.

    >>> check_seed(0)
    0
    >>> check_seed(2**32)
    Traceback (most recent call last):
    ...
    hesslens.errors.HesslensInputError: seed must be an integer from 0 to 4294967295 ...
    """
    lo, hi = SEED_RANGE
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or not lo <= value <= hi):
        raise HesslensInputError(
            f"{what} must be an integer from {lo} to {hi} (the range NumPy, scikit-learn and "
            f"torch all accept), got {value!r}")
    return int(value)


def check_labels(y: torch.Tensor, what: str = "data") -> None:
    """Raise unless ``y`` is a 1-D integer tensor of class indices.

    >>> check_labels(torch.tensor([0, 2, 1]))
    """
    if not isinstance(y, torch.Tensor):
        raise HesslensInputError(f"{what}: labels must be a torch tensor, got {type(y).__name__}")
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise HesslensInputError(
            f"{what}: labels must be a 1-D integer tensor of class indices, "
            f"got shape {tuple(y.shape)} and dtype {y.dtype}"
        )


def check_xy(x: torch.Tensor, y: torch.Tensor, what: str = "data") -> None:
    """Raise unless ``x`` is a tensor with one row per label of the 1-D integer tensor ``y``.

    >>> check_xy(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    """
    if not isinstance(x, torch.Tensor):
        raise HesslensInputError(f"{what}: inputs must be a torch tensor, got {type(x).__name__}")
    check_labels(y, what)
    if x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise HesslensInputError(
            f"{what}: inputs have {x.shape[0] if x.dim() else 0} rows but there are "
            f"{y.shape[0]} labels; give one label per example"
        )
