"""Random-number states and checkpoints that ``torch.load(weights_only=True)`` reads.

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a run killed at any moment leaves either the old file or the new one, never a
torn one. Random-number states are stored as tensors, ints and lists (no numpy arrays, no
pickled objects) so that the safe loader accepts them.

A checkpoint also records what repeating the run bit for bit needs
(:func:`hesslens.provenance.bit_exactness`: torch's thread count, the deterministic-algorithms
flag, the torch version, the device type); :func:`check_bit_exactness` warns, naming each one,
when a resumed run differs (its results may then differ from an uninterrupted run in the last
bits).

Example:
    >>> import tempfile, random, os
    >>> d = tempfile.mkdtemp()
    >>> state = capture_rng_state()
    >>> a = random.random()
    >>> restore_rng_state(state)
    >>> random.random() == a
    True
    >>> save_checkpoint(os.path.join(d, "c.pt"), {"model": {"w": torch.zeros(2)}})
    >>> ckpt = load_checkpoint(os.path.join(d, "c.pt"))
    >>> sorted(ckpt["bit_exactness"]), check_bit_exactness(ckpt)
    (['deterministic_algorithms', 'device_type', 'threads', 'torch'], [])
"""

from __future__ import annotations

import io
import os
import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from hesslens.errors import HesslensInputError
from hesslens.files import write_bytes
from hesslens.provenance import bit_exactness

__all__ = [
    "ResumeDiffersWarning",
    "capture_rng_state",
    "check_bit_exactness",
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
class ResumeDiffersWarning(UserWarning):
    """A run resumes under other settings than those its checkpoint was written with (threads,
    deterministic algorithms, torch version, device type): it may end a few last bits away
    from the uninterrupted run."""


def _device_type(payload: Mapping[str, Any]) -> str:
    """The device type of the first tensor of ``payload["model"]`` (a state_dict), else cpu."""
    model = payload.get("model")
    if isinstance(model, Mapping):
        for value in model.values():
            if isinstance(value, torch.Tensor):
                return value.device.type
    return "cpu"


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """``torch.save`` to memory, then an atomic write. Adds ``payload["bit_exactness"]``
    (:func:`hesslens.provenance.bit_exactness` of this process, on the device of the model's
    tensors) unless the payload has one."""
    if "bit_exactness" not in payload:
        payload = {**payload, "bit_exactness": bit_exactness(_device_type(payload))}
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


def check_bit_exactness(
    checkpoint: Mapping[str, Any], path: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
) -> list[str]:
    """Compare the bit-exactness settings saved in ``checkpoint`` with this process's (on
    ``device``; default: the device type saved) and warn with a :class:`ResumeDiffersWarning`
    naming each that differs. Returns the names that differ (``[]``: same settings, or a
    checkpoint too old to hold them, which is also warned about).
    """
    where = f" {os.fspath(path)}" if path is not None else ""
    saved = checkpoint.get("bit_exactness")
    if not isinstance(saved, Mapping):
        warnings.warn(
            f"checkpoint{where} does not record the thread count, deterministic-algorithms "
            "flag, torch version and device it was written with; the resumed run may differ "
            "from an uninterrupted one in the last bits", ResumeDiffersWarning, stacklevel=2)
        return []
    now = bit_exactness(device if device is not None else saved.get("device_type", "cpu"))
    differ = [k for k in now if saved.get(k) != now[k]]
    if differ:
        detail = ", ".join(f"{k} {saved.get(k)!r} then, {now[k]!r} now" for k in differ)
        hint = " (set --threads to the saved count)" if "threads" in differ else ""
        warnings.warn(
            f"resuming checkpoint{where} with other settings than it was written with: "
            f"{detail}; results may differ from an uninterrupted run in the last bits{hint}",
            ResumeDiffersWarning, stacklevel=2)
    return differ


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
