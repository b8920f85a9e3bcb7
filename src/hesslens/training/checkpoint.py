"""Random-number states and checkpoints that ``torch.load(weights_only=True)`` reads.

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a run killed at any moment leaves either the old file or the new one, never a
torn one. Random-number states are stored as tensors, ints and lists (no numpy arrays, no
pickled objects) so that the safe loader accepts them.

Example:
    >>> import tempfile, random, os
    >>> d = tempfile.mkdtemp()
    >>> state = capture_rng_state()
    >>> a = random.random()
    >>> restore_rng_state(state)
    >>> random.random() == a
    True
"""

from __future__ import annotations

import io
import os
import random
from typing import Any

import numpy as np
import torch

from hesslens.errors import HesslensInputError
from hesslens.files import write_bytes

__all__ = [
    "capture_rng_state",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]


# ---------------------------------------------------------------------- RNG states
def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, numpy's and torch's (CPU and CUDA) global generators."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(py[0]), "state": [int(v) for v in py[1]],
                   "gauss_next": py[2]},
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64).copy()),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """``torch.save`` to memory, then an atomic write."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load with ``weights_only=True`` (no arbitrary code), tensors on the CPU; a file that is
    not such a checkpoint (truncated, foreign) is a :class:`HesslensInputError`."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling and zip errors come in many types
        raise HesslensInputError(
            f"cannot read checkpoint {path} ({type(err).__name__}): not a file that "
            "torch.load(weights_only=True) can read (truncated, or holding other objects than "
            "tensors and plain data)"
        ) from None
