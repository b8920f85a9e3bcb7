"""Errors that hesslens raises for bad input.

Every error raised for something the user gave (a loss that is not a scalar, an unknown layer
name, a missing data folder, ...) is a :class:`HesslensInputError`. It is a ``ValueError``, so
code that already catches ``ValueError`` keeps working, and the command line turns it into one
line on stderr and exit code 2.

Example:
    >>> from hesslens.errors import HesslensInputError
    >>> issubclass(HesslensInputError, ValueError)
    True
"""

from __future__ import annotations


class HesslensError(Exception):
    """Base class of every error hesslens raises on purpose."""


class HesslensInputError(HesslensError, ValueError):
    """Bad input: the message names the problem and what to do about it."""


class DataChangedError(HesslensInputError):
    """The data differed between two passes (a shuffling or augmenting loader, batch sizes that
    change): the operator would mix several matrices into one."""


class OutputLockedError(HesslensInputError):
    """The output folder is in use: another run (or another writer in this process) holds its
    lock (:mod:`hesslens.locks`); two writers in one folder would overwrite each other."""


class CheckpointError(HesslensInputError):
    """A checkpoint that cannot be used as it is: unreadable, corrupted (its checksum does not
    match), of the wrong structure, or not fitting the model or the configuration. Nothing is
    trained on it (:mod:`hesslens.training.checkpoint`)."""


class TrackingCallbackError(HesslensInputError):
    """A training configuration asks for curvature tracking (``track_every > 0``) that none of
    the trainer's callbacks does: pass the tracking callback, or set ``track_every=0``
    (:mod:`hesslens.training.callbacks`)."""


class NonFiniteCurvatureError(HesslensError, ArithmeticError):
    """A curvature product came out NaN or infinite, though the loss itself may be finite."""


class BudgetWarning(UserWarning):
    """An estimator stopped on its product budget before reaching the accuracy asked for."""


class PrecisionWarning(UserWarning):
    """An estimate could not reach the accuracy asked for because the products are computed in
    too coarse a precision (bfloat16, float16): the values are as good as that precision allows
    and are reported ``converged=False``; analyse a float32 or float64 copy instead."""


class CurvatureUnderflowError(HesslensInputError):
    """The curvature lies below the normal range of the dtype its products are computed in
    (subnormal numbers, e.g. a float32 loss scaled by 1e-40): its products have lost their
    precision. Rescale the loss, or analyse a float64 copy."""


class StaleLockWarning(UserWarning):
    """An output folder's lock was left by a process that no longer runs (killed); the new run
    takes it over."""
