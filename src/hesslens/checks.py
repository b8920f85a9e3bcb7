"""Argument checks shared across the package's layers: the one home of every integer and seed
check (linalg, curvature, analysis, the zoo, the trainer, the splits and the commands' argparse
types all call these).

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

import math
import numbers

import torch

from hesslens.errors import HesslensInputError

__all__ = ["SEED_LIMIT", "check_int", "check_labels", "check_nonnegative_int",
           "check_nonnegative_number", "check_optional_positive_int", "check_positive_int",
           "check_positive_number", "check_seed", "check_xy"]

#: Seeds are integers in ``[0, SEED_LIMIT)``: the range every seeded library hesslens uses
#: accepts (numpy's legacy ``RandomState`` and scikit-learn's ``random_state`` take 32 bits;
#: torch takes 64).
SEED_LIMIT = 2**32


def check_int(value: object, what: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer (Python or NumPy, not bool), else raise.

    >>> check_int(3, "seed")
    3
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise HesslensInputError(f"{what} must be an integer, got {value!r}")
    return int(value)


def check_seed(value: object, what: str = "seed") -> int:
    """Return ``value`` as an ``int`` if it is a seed every seeded library accepts: an integer
    (Python or NumPy, not bool) with ``0 <= value < 2**32``; else raise, naming the range.

    >>> check_seed(7)
    7
    >>> check_seed(2**32, "--seed")
    Traceback (most recent call last):
    ...
    hesslens.errors.HesslensInputError: --seed must be an integer in [0, 4294967295] (numpy ...
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise HesslensInputError(
            f"{what} must be an integer in [0, {SEED_LIMIT - 1}], got {value!r}")
    if not 0 <= value < SEED_LIMIT:
        raise HesslensInputError(
            f"{what} must be an integer in [0, {SEED_LIMIT - 1}] (numpy and scikit-learn take "
            f"32-bit seeds), got {value}; give a smaller seed, e.g. {int(value) % SEED_LIMIT}")
    return int(value)


def check_positive_int(value: object, what: str) -> int:
    """Return ``value`` as an ``int`` if it is a positive integer, else raise.

    >>> check_positive_int(10, "num_classes")
    10
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise HesslensInputError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative_int(value: object, what: str) -> int:
    """Return ``value`` as an ``int`` if it is an integer ``>= 0``, else raise.

    >>> check_nonnegative_int(0, "sketch_rank")
    0
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise HesslensInputError(f"{what} must be a nonnegative integer, got {value!r}")
    return int(value)


def check_optional_positive_int(value: object, what: str) -> int | None:
    """Return ``None`` for ``None``, else ``value`` as an ``int`` if it is a positive integer;
    raise otherwise (for options where ``None`` means "not set").

    >>> check_optional_positive_int(None, "every_n_steps") is None
    True
    >>> check_optional_positive_int(0, "every_n_steps")
    Traceback (most recent call last):
    ...
    hesslens.errors.HesslensInputError: every_n_steps must be a positive integer or None, got 0
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise HesslensInputError(f"{what} must be a positive integer or None, got {value!r}")
    return int(value)


def _is_real(value: object) -> bool:
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and math.isfinite(value))


def check_positive_number(value: object, what: str) -> float:
    """Return ``value`` as a ``float`` if it is a finite number ``> 0``, else raise.

    >>> check_positive_number(0.5, "tol")
    0.5
    """
    if not _is_real(value) or not value > 0:
        raise HesslensInputError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def check_nonnegative_number(value: object, what: str) -> float:
    """Return ``value`` as a ``float`` if it is a finite number ``>= 0``, else raise.

    >>> check_nonnegative_number(0, "weight_decay")
    0.0
    """
    if not _is_real(value) or not value >= 0:
        raise HesslensInputError(f"{what} must be a non-negative number, got {value!r}")
    return float(value)


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
