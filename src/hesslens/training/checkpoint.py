"""Random-number states and checkpoints that ``torch.load(weights_only=True)`` reads, each with
a checksum of its content and checked in full before anything uses it.

Every file is written to a temporary file in the same folder and moved into place with
``os.replace``, so a run killed at any moment leaves either the old file or the new one, never a
torn one. Random-number states are stored as tensors, ints and lists (no numpy arrays, no
pickled objects) so that the safe loader accepts them.

Integrity. :func:`save_checkpoint` stores under ``"checksum"`` the SHA-256 of a canonical
encoding of everything else in the file (:func:`content_digest`: every key, number, string and
tensor, with its dtype, shape and bytes, in order), so a flipped byte in a weight or a momentum
buffer, or a value edited after the run wrote it, is found. The checksum is of the content, not
of the zip file, so it does not depend on how ``torch.save`` lays the file out, and the file
stays an ordinary dictionary (``torch.load(path)["model"]`` works). Before loading, the zip
archive is also checked against the CRC-32 of each of its members, which ``torch.load`` skips:
a changed byte in bytes torch does not read back as content is found too.

Checks (:mod:`hesslens.training.checkpoint_checks`, re-exported here). :func:`load_checkpoint`
is the one way hesslens reads a checkpoint (``hesslens train --resume``, ``hesslens analyze
--checkpoint``, the trainer). It refuses, with a
:class:`~hesslens.errors.CheckpointError` of one line naming the file and what is wrong, a file
that is missing, a folder, unreadable or not loadable with ``weights_only=True``; one whose
checksum does not match; a hesslens training checkpoint (one with a ``"format"``) without a
checksum (written by hesslens before checksums, or edited; its content cannot be vouched for,
so a run is never continued from it); a training checkpoint of the wrong structure
(:func:`check_training_checkpoint`: types of every part, epoch within the configuration, metric
records that match the epoch, random-number states that the generators accept, optimizer state
of the parameters' shapes); and weights that do not fit the model (:func:`check_state_dict`:
names, shapes, dtypes, finite values), before ``load_state_dict`` is called. A plain state dict
or a dictionary without ``"format"`` (a file hesslens did not write) is read without a
checksum: only its fit to the model can be checked.

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
    >>> ckpt["model"]["w"][0] = 1.0  # edited after it was written
    >>> torch.save(ckpt, os.path.join(d, "c.pt"))
    >>> load_checkpoint(os.path.join(d, "c.pt"))
    Traceback (most recent call last):
    ...
    hesslens.errors.CheckpointError: checkpoint .../c.pt is corrupted: its content does not ...
"""

from __future__ import annotations

import hashlib
import io
import numbers
import os
import random
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hesslens.errors import CheckpointError
from hesslens.files import write_bytes
from hesslens.provenance import bit_exactness
from hesslens.training.checkpoint_checks import (
    _FIX,
    CHECKPOINT_FORMAT,
    TRAINING_KEYS,
    check_fit,
    check_rng_state,
    check_state_dict,
    check_training_checkpoint,
    fit_problem,
    state_dict_problem,
    training_checkpoint_problem,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKSUM_KEY",
    "CHECKSUM_SCHEME",
    "TRAINING_KEYS",
    "ResumeDiffersWarning",
    "capture_rng_state",
    "check_bit_exactness",
    "check_fit",
    "check_rng_state",
    "check_state_dict",
    "check_training_checkpoint",
    "content_digest",
    "fit_problem",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "state_dict_problem",
]

#: Where a checkpoint keeps its checksum: ``{"scheme": CHECKSUM_SCHEME, "sha256": hex}``.
CHECKSUM_KEY = "checksum"
#: The canonical encoding :func:`content_digest` hashes (versioned, should it ever change).
CHECKSUM_SCHEME = "hesslens.content-sha256/1"

PathLike = str | os.PathLike[str]


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


# ---------------------------------------------------------------------- checksums
class _Encoder:
    """A canonical, unambiguous byte encoding of plain data and tensors, fed to a hash: every
    item is a type tag and its length-prefixed bytes; tensors add dtype and shape."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def item(self, tag: bytes, data: bytes | memoryview) -> None:
        self.hash.update(tag + len(data).to_bytes(8, "little"))
        self.hash.update(data)

    def feed(self, obj: Any) -> None:
        if obj is None:
            self.item(b"n", b"")
        elif isinstance(obj, bool):
            self.item(b"b", b"1" if obj else b"0")
        elif isinstance(obj, numbers.Integral):
            self.item(b"i", str(int(obj)).encode())
        elif isinstance(obj, float):
            self.item(b"f", float(obj).hex().encode())
        elif isinstance(obj, str):
            self.item(b"s", obj.encode("utf-8", "surrogatepass"))
        elif isinstance(obj, (bytes, bytearray)):
            self.item(b"y", bytes(obj))
        elif isinstance(obj, torch.Tensor):
            self.tensor(obj)
        elif isinstance(obj, Mapping):
            self.item(b"d", str(len(obj)).encode())
            for k, v in obj.items():
                self.feed(k)
                self.feed(v)
        elif isinstance(obj, (list, tuple)):
            self.item(b"l" if isinstance(obj, list) else b"t", str(len(obj)).encode())
            for v in obj:
                self.feed(v)
        elif isinstance(obj, (set, frozenset)):
            self.item(b"e", repr(sorted(map(repr, obj))).encode())
        else:  # dtypes, devices, slices, complex numbers: their text
            self.item(b"o", f"{type(obj).__name__}:{obj}".encode())

    def tensor(self, t: torch.Tensor) -> None:
        t = t.detach().cpu()
        if t.layout != torch.strided:
            t = t.to_dense()
        self.item(b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        t = t.resolve_conj().resolve_neg().contiguous().reshape(-1)
        try:
            data = memoryview(t.view(torch.uint8).numpy())
        except (RuntimeError, TypeError):  # a dtype numpy cannot view: its pickled bytes
            buf = io.BytesIO()
            torch.save(t.clone(), buf)
            data = memoryview(buf.getvalue())
        self.item(b"B", data)


def content_digest(payload: Mapping[str, Any]) -> str:
    """The SHA-256 (hex) of the canonical encoding of ``payload`` without its ``"checksum"``:
    keys in order, numbers exactly (floats by ``float.hex``), tensors with dtype, shape and
    bytes. Equal for a payload and the same payload saved and loaded again.

    >>> a = content_digest({"w": torch.ones(2), "epoch": 1})
    >>> a == content_digest({"w": torch.ones(2), "epoch": 1}), a == content_digest(
    ...     {"w": torch.tensor([1.0, 1.0000001]), "epoch": 1})
    (True, False)
    """
    enc = _Encoder()
    enc.feed({k: v for k, v in payload.items() if k != CHECKSUM_KEY})
    return enc.hash.hexdigest()


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


def save_checkpoint(path: PathLike, payload: dict[str, Any]) -> None:
    """``torch.save`` to memory, then an atomic write. Adds ``payload["bit_exactness"]``
    (:func:`hesslens.provenance.bit_exactness` of this process, on the device of the model's
    tensors) unless the payload has one, and the checksum of the whole content
    (:func:`content_digest`) under ``"checksum"``."""
    if "bit_exactness" not in payload:
        payload = {**payload, "bit_exactness": bit_exactness(_device_type(payload))}
    payload = {k: v for k, v in payload.items() if k != CHECKSUM_KEY}
    payload[CHECKSUM_KEY] = {"scheme": CHECKSUM_SCHEME, "sha256": content_digest(payload)}
    buf = io.BytesIO()
    torch.save(payload, buf)
    write_bytes(path, buf.getvalue())


def check_bit_exactness(
    checkpoint: Mapping[str, Any], path: PathLike | None = None,
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


def _read(path: Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, or a named error."""
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a folder, not a file: give the checkpoint file "
            "(a training run keeps it as checkpoint.pt)")
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if not path.is_file():  # a pipe or a device would block the reader or feed it anything
        raise CheckpointError(f"checkpoint {path} is not a regular file (a pipe, a device?)")
    _check_zip(path)
    try:
        with open(path, "rb") as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except PermissionError:
        raise CheckpointError(
            f"cannot read checkpoint {path}: permission denied; make it readable") from None
    except Exception as err:  # unpickling and zip errors come in many types
        raise CheckpointError(
            f"cannot read checkpoint {path} ({type(err).__name__}): not a file that "
            "torch.load(weights_only=True) can read (truncated, or holding other objects than "
            "tensors and plain data)"
        ) from None


def _check_zip(path: Path) -> None:
    """``torch.save``'s zip archive checked against the CRC-32 of every member (torch's reader
    does not check them): a changed byte anywhere in the stored data or the archive's headers
    is named, even where the content checksum would not see it (bytes torch skips)."""
    try:
        if not zipfile.is_zipfile(path):
            return  # torch's legacy format, or not a checkpoint: torch.load says which
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except PermissionError:
        raise CheckpointError(
            f"cannot read checkpoint {path}: permission denied; make it readable") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError,
            NotImplementedError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: its zip archive is broken ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:120]}); {_FIX}") from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupted: the bytes of {bad} do not match their CRC-32 "
            f"checksum; {_FIX}")


def _checksum_problem(obj: Mapping[str, Any]) -> str | None:
    """What is wrong with ``obj``'s checksum, or ``None`` (it matches, or there is none)."""
    saved = obj.get(CHECKSUM_KEY)
    if saved is None:
        return None
    if not (isinstance(saved, Mapping) and saved.get("scheme") == CHECKSUM_SCHEME
            and isinstance(saved.get("sha256"), str)):
        return (f"its checksum entry is not a {CHECKSUM_SCHEME} checksum (written by a newer "
                "hesslens, or edited)")
    if saved["sha256"] != content_digest(obj):
        return ("its content does not match its SHA-256 checksum (a changed byte, or edited "
                "after it was written)")
    return None


def load_checkpoint(
    path: PathLike, *, model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None, epochs: int | None = None,
    training: bool | None = None,
) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` (no code runs; tensors on the
    CPU) and check it; return it. Anything wrong is a
    :class:`~hesslens.errors.CheckpointError` naming the file and the problem.

    Args:
        path: the file.
        model: check the weights (``ckpt["model"]``, or the file itself if it is a plain state
            dict) against this model's state dict (:func:`check_state_dict`).
        optimizer: check the optimizer state against this one's parameters.
        epochs: the run's number of epochs; the saved epoch must lie in ``[0, epochs]``
            (default: the saved configuration's).
        training: ``True``: it must be a hesslens training checkpoint (a run continues from
            it); ``None``: checked as one if it has a ``"format"``; ``False``: never.
    """
    path = Path(path)
    obj = _read(path)
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint (a dictionary "
            "of a model's state_dict, or one with a 'model' state_dict)")
    bad_sum = _checksum_problem(obj)
    as_training = training if training is not None else "format" in obj
    problem = None
    try:
        if as_training:
            problem = training_checkpoint_problem(obj, epochs, optimizer, model)
        if problem is None and model is not None:
            problem = fit_problem(obj, model, optimizer)
    except Exception as err:  # a check tripped over something stranger than it checks for
        problem = f"its content is malformed ({type(err).__name__}: {err})"
    if problem is None and bad_sum is None and as_training and CHECKSUM_KEY not in obj:
        problem = ("it carries no checksum (written by a hesslens before checksums, or edited), "
                   "so its content cannot be vouched for")
    if problem is not None:
        also = "; its checksum does not match either" if bad_sum and "checksum" not in problem \
            else ""
        raise CheckpointError(f"checkpoint {path}: {problem}{also}; {_FIX}")
    if bad_sum is not None:
        raise CheckpointError(f"checkpoint {path} is corrupted: {bad_sum}; {_FIX}")
    return dict(obj)


