"""Command-line helpers every ``hesslens`` subcommand shares.

* :func:`add_common_arguments` -- ``--out``, ``--seed``, ``--device``, ``--dtype``,
  ``--threads``, ``--quiet``;
* :func:`resolve_device` (:func:`hesslens.parallel.resolve_device`, which the trainer uses
  too), :func:`resolve_dtype`, :func:`apply_threads` -- turn them into torch objects, with one
  clear error for what cannot work here (CUDA asked for but absent, ...);
* :func:`check_out_dir`, :func:`prepare_out_dir`, :func:`versions`, :func:`load_state_dict` --
  output folder, versions for the records (from :mod:`hesslens.provenance`), and checkpoint
  loading (``weights_only=True``, checked: :mod:`hesslens.training.checkpoint`);
* :func:`out_dir_lock` -- the output folder's lock for the length of a command
  (:mod:`hesslens.locks`), so that two commands never write into one folder at once;
* :func:`seed_int` -- ``--seed``, in the range every seeded library takes.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_common_arguments(p, default_out="hesslens-out/demo")
    >>> a = p.parse_args(["--seed", "3", "--quiet"])
    >>> a.out, a.seed, a.device, a.dtype, a.quiet
    ('hesslens-out/demo', 3, 'cpu', None, True)
    >>> resolve_device("cpu"), resolve_dtype("float64")
    (device(type='cpu'), torch.float64)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from hesslens.checks import (
    SEED_LIMIT,
    check_nonnegative_int,
    check_nonnegative_number,
    check_positive_int,
    check_positive_number,
    check_seed,
)
from hesslens.errors import HesslensInputError
from hesslens.files import remove_stale_temporaries
from hesslens.parallel import folder_lock, resolve_device
from hesslens.provenance import versions as _versions
from hesslens.training.checkpoint import load_checkpoint

__all__ = [
    "DTYPES",
    "SMALL_MODEL",
    "add_common_arguments",
    "apply_threads",
    "check_out_dir",
    "load_state_dict",
    "nonnegative_float",
    "nonnegative_int",
    "out_dir_lock",
    "positive_float",
    "positive_int",
    "prepare_out_dir",
    "resolve_device",
    "resolve_dtype",
    "seed_int",
    "show_progress",
    "versions",
]

#: The dtypes ``--dtype`` accepts.
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _argument(text: str, parse: Callable[[str], Any], check: Callable[[Any, str], Any],
              expected: str, unparsable: str | None = None) -> Any:
    """An argparse type's work: ``text`` parsed with ``parse`` (not parsable: "expected
    ``unparsable``", by default ``expected``), then checked with one of :mod:`hesslens.checks`
    (refused: "expected ``expected``")."""
    try:
        value = parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected {unparsable or expected}, got {text!r}") from None
    try:
        return check(value, "the value")
    except HesslensInputError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (:func:`hesslens.checks.check_positive_int`)."""
    return _argument(text, int, check_positive_int, "a positive integer")


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0 (:func:`hesslens.checks.check_nonnegative_int`)."""
    return _argument(text, int, check_nonnegative_int, "a non-negative integer")


def seed_int(text: str) -> int:
    """argparse type: a seed, an integer in ``[0, 2**32)`` (:func:`hesslens.checks.check_seed`:
    the range numpy and scikit-learn take)."""
    nonnegative_int(text)
    return _argument(
        text, int, check_seed,
        f"an integer below 2**32 = {SEED_LIMIT} (numpy and scikit-learn take 32-bit seeds)")


def nonnegative_float(text: str) -> float:
    """argparse type: a finite number >= 0 (:func:`hesslens.checks.check_nonnegative_number`)."""
    return _argument(text, float, check_nonnegative_number, "a non-negative number",
                     unparsable="a number")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (:func:`hesslens.checks.check_positive_number`)."""
    return _argument(text, float, check_positive_number, "a positive number")


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Add ``--out DIR``, ``--seed S``, ``--device``, ``--dtype``, ``--threads`` and
    ``--quiet`` (in a group "run") to ``parser``."""
    g = parser.add_argument_group("run")
    g.add_argument("--out", default=default_out, metavar="DIR",
                   help=f"output folder, created if needed (default {default_out})")
    g.add_argument("--seed", type=seed_int, default=0, metavar="S",
                   help="seed of everything random: model initialisation, data subset, "
                        "probes (default 0)")
    g.add_argument("--device", default="cpu", metavar="DEV",
                   help="cpu, cuda, cuda:N or mps (default cpu)")
    g.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="compute in this precision (default: the model's own, float32)")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: 1 for models under "
                        f"{SMALL_MODEL // 10**6}M parameters, else torch's choice)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def resolve_dtype(name: str | None) -> torch.dtype | None:
    """``"float32"``/``"float64"`` -> the torch dtype; ``None`` stays ``None``."""
    if name is None:
        return None
    if name not in DTYPES:
        raise HesslensInputError(
            f"unknown dtype {name!r}; choose one of: {', '.join(sorted(DTYPES))}")
    return DTYPES[name]


#: Models with fewer parameters than this run on one CPU thread unless ``--threads`` says
#: otherwise: their products are sequences of tiny operations, which intra-op threads speed up
#: by well under 2x on an idle machine and slow down several-fold when the cores are shared
#: (measured: LeNet on 100 digits, 2 cores with other work: 53 s on 1 thread, 269 s on 2).
SMALL_MODEL = 1_000_000


def apply_threads(threads: int | None, n_params: int | None = None) -> int:
    """Set torch's CPU thread count: ``threads`` when given, else 1 for a model with fewer than
    :data:`SMALL_MODEL` parameters (``n_params``), else leave torch's default. Returns the
    count in use."""
    if threads is not None:
        torch.set_num_threads(int(threads))
    elif n_params is not None and n_params < SMALL_MODEL:
        torch.set_num_threads(1)
    return torch.get_num_threads()


def show_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars: not with ``--quiet``, and only on a terminal."""
    if getattr(args, "quiet", False):
        return False
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def check_out_dir(path: str | os.PathLike[str] | None, option: str = "--out") -> Path:
    """``path`` as a ``Path``, refusing an empty one (``--out ''`` would write into the current
    folder) and one that exists as a file; creates nothing."""
    if path is None or not str(os.fspath(path)).strip():
        raise HesslensInputError(
            f"{option} is empty: give the folder the results go to, e.g. {option} runs/x")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise HesslensInputError(f"{option} {out} is a file, not a folder")
    return out


def prepare_out_dir(path: str | os.PathLike[str]) -> Path:
    """Create the output folder (and its parents); a clear error if it cannot be (empty, a
    file, not creatable, not writable). Removes the temporary files that a run killed during
    a write left there (:func:`hesslens.files.remove_stale_temporaries`)."""
    out = check_out_dir(path)
    if out.exists() and not out.is_dir():
        raise HesslensInputError(f"--out {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HesslensInputError(f"cannot create the output folder {out}: {err.strerror}") \
            from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise HesslensInputError(f"the output folder {out} is not writable")
    remove_stale_temporaries(out)
    return out


@contextlib.contextmanager
def out_dir_lock(path: str | os.PathLike[str], command: str,
                 ranks: Any = None) -> Iterator[Path]:
    """Hold the lock of the output folder ``path`` while ``hesslens COMMAND`` runs in the block
    (:func:`hesslens.parallel.folder_lock`: rank 0 under torchrun; the folder is
    created, and removed again if the command fails leaving it empty). A second command into
    the same folder gets :class:`~hesslens.errors.OutputLockedError` at once. Yields the
    folder.

    >>> import tempfile
    >>> with out_dir_lock(tempfile.mkdtemp(), "demo") as out:
    ...     out.is_dir()
    True
    """
    out = check_out_dir(path)
    with folder_lock(out, f"hesslens {command}", ranks):
        yield out


def versions(device: Any = None) -> dict[str, Any]:
    """Versions of hesslens, Python, torch, numpy, scipy and matplotlib, the platform and the
    device: :func:`hesslens.provenance.versions` (the one place that knows them)."""
    return _versions(device)


def load_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a checkpoint with ``torch.load(..., weights_only=True)`` (no code is run).

    Accepts a plain ``state_dict`` or a dictionary with a ``"model"`` key holding one (what
    ``hesslens train`` writes). Returns ``(state_dict, rest)`` where ``rest`` holds the other
    top-level entries (e.g. ``"config"``) or is empty.
    """
    path = Path(path)

    obj = load_checkpoint(path)
    rest: dict[str, Any] = {}
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        rest = {k: v for k, v in obj.items() if k != "model"}
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise HesslensInputError(
            f"checkpoint {path} holds neither a state_dict (names -> tensors) nor a dictionary "
            "with a 'model' state_dict")
    return dict(obj), rest
