"""Argument checks of the zoo's model builders (the integer checks, shared with the rest of the
package, live in :mod:`hesslens.checks` and are re-exported here).

Each check raises :class:`hesslens.errors.HesslensInputError` with a message that names the
argument, what was given, and what is expected.

Example:
    >>> from hesslens.zoo._checks import check_input_shape
    >>> check_input_shape([1, 8, 8], "lenet", ndims=(3,))
    (1, 8, 8)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from hesslens.checks import check_int, check_positive_int
from hesslens.errors import HesslensInputError

__all__ = ["check_input_shape", "check_int", "check_int_tuple", "check_positive_int"]


def check_input_shape(
    shape: Sequence[int], model: str, ndims: tuple[int, ...] = (1, 2, 3)
) -> tuple[int, ...]:
    """Return ``shape`` (one example's shape, no batch dimension) as a tuple of ints.

    ``ndims`` lists the lengths the model accepts; anything else raises, naming ``model``.

    >>> check_input_shape((1, 40), "cnn1d", ndims=(1, 2))
    (1, 40)
    """
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, Sequence) or isinstance(shape, str):
        raise HesslensInputError(
            f"{model}: input_shape must be a tuple of positive ints without the batch dimension, "
            f"e.g. (1, 28, 28); got {shape!r}"
        )
    dims = tuple(shape)
    if not dims or any(
        isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1 for d in dims
    ):
        raise HesslensInputError(
            f"{model}: input_shape must be a tuple of positive ints without the batch dimension, "
            f"e.g. (1, 28, 28); got {shape!r}"
        )
    if len(dims) not in ndims:
        wanted = " or ".join(f"{n}-D" for n in ndims)
        hint = {
            (3,): "(channels, height, width), e.g. (1, 28, 28) or (3, 32, 32)",
            (1, 2): "(length,) or (channels, length), e.g. (40,) or (1, 40)",
        }.get(ndims, "")
        raise HesslensInputError(
            f"{model}: input_shape must be {wanted}"
            + (f": {hint}" if hint else "")
            + f"; got {dims} ({len(dims)}-D)"
        )
    return tuple(int(d) for d in dims)


def check_int_tuple(values: object, what: str, allow_empty: bool = False) -> tuple[int, ...]:
    """Return ``values`` as a tuple of positive ints (non-empty unless ``allow_empty``), else raise.

    >>> check_int_tuple([64, 64], "hidden")
    (64, 64)
    """
    if isinstance(values, int) and not isinstance(values, bool):
        values = (values,)
    kind = "tuple" if allow_empty else "non-empty tuple"
    if (
        not isinstance(values, Sequence)
        or isinstance(values, str)
        or (not values and not allow_empty)
    ):
        raise HesslensInputError(f"{what} must be a {kind} of positive ints, got {values!r}")
    return tuple(check_positive_int(v, f"each entry of {what}") for v in values)
