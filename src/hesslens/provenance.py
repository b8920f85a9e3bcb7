"""Where a number came from: the data it was computed on, the software and the machine.

One place for what every ``results.json`` / ``metrics.json`` records and what a checkpoint
needs to repeat a run bit for bit:

* :func:`sha256_arrays` -- a SHA-256 over named arrays (dtype, shape and bytes of each), the
  same for a NumPy array and a CPU/GPU tensor holding the same values;
* :func:`data_fingerprint` -- ``{"name", "sizes", "sha256"}`` of the arrays a result used;
* :func:`versions` -- hesslens, Python, torch, numpy, scipy, matplotlib, platform and device;
* :func:`bit_exactness` -- what a resumed run must share with the first leg to repeat it bit
  for bit (torch's thread count, deterministic-algorithms flag, version and the device type).

This module sits beside ``files.py`` and ``errors.py`` at the bottom of the package: every layer
may import it, and it imports nothing of hesslens but the version.

Example:
    >>> import numpy as np, torch
    >>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> sha256_arrays({"x": a}) == sha256_arrays({"x": torch.from_numpy(a)})
    True
    >>> fp = data_fingerprint("toy", {"x": a, "y": np.array([0, 1])})
    >>> fp["name"], fp["sizes"], len(fp["sha256"])
    ('toy', {'x': [2, 3], 'y': [2]}, 64)
    >>> sorted(bit_exactness("cpu"))
    ['deterministic_algorithms', 'device_type', 'threads', 'torch']
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

import numpy as np
import scipy
import torch

from hesslens.version import __version__

__all__ = [
    "bit_exactness",
    "data_fingerprint",
    "dataset_fingerprint",
    "sha256_arrays",
    "versions",
]


def _as_numpy(array: Any) -> np.ndarray:
    if hasattr(array, "detach") and hasattr(array, "cpu"):  # torch.Tensor, without importing it
        array = array.detach().cpu().numpy()
    a = np.ascontiguousarray(np.asarray(array))
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def sha256_arrays(arrays: Mapping[str, Any]) -> str:
    """SHA-256 (hex) over ``arrays`` in the given order: each one's name, dtype, shape and its
    bytes (C order, little-endian). Tensors and NumPy arrays with equal values, dtype and shape
    hash alike.

    >>> import numpy as np
    >>> sha256_arrays({"y": np.array([1, 2], dtype=np.int64)})[:12]
    'ab37a128b694'
    """
    h = hashlib.sha256()
    for name, array in arrays.items():
        a = _as_numpy(array)
        h.update(f"{name}|{a.dtype.str.lstrip('<|=')}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def data_fingerprint(name: str, arrays: Mapping[str, Any]) -> dict[str, Any]:
    """``{"name", "sizes" {array: shape}, "sha256"}`` of the arrays a result was computed on.

    >>> import numpy as np
    >>> data_fingerprint("d", {"y": np.zeros(3, dtype=np.int64)})["sizes"]
    {'y': [3]}
    """
    return {
        "name": str(name),
        "sizes": {k: [int(d) for d in np.shape(v)] for k, v in arrays.items()},
        "sha256": sha256_arrays(arrays),
    }


def dataset_fingerprint(dataset: Any, name: str | None = None) -> dict[str, Any]:
    """:func:`data_fingerprint` of a data set's ``x_train, y_train, x_test, y_test`` (as the
    tensors a run uses: after normalisation), named by its ``name`` attribute.

    >>> import torch
    >>> from hesslens.zoo.dataset import Dataset
    >>> ds = Dataset("toy", torch.zeros(4, 2), torch.tensor([0, 1, 0, 1]),
    ...              torch.zeros(2, 2), torch.tensor([1, 0]), (2,), 2)
    >>> dataset_fingerprint(ds)["sizes"]["x_train"]
    [4, 2]
    """
    arrays = {k: getattr(dataset, k) for k in ("x_train", "y_train", "x_test", "y_test")}
    return data_fingerprint(name or str(getattr(dataset, "name", "data")), arrays)


def _device_name(device: Any) -> str | None:

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    if dev.type == "cpu":
        return platform.processor() or platform.machine() or None
    return None


def versions(device: Any = None) -> dict[str, Any]:
    """Versions of hesslens, Python, torch, numpy, scipy and matplotlib, the platform, and the
    device (``device``: what the computation ran on; default cpu) with its name.

    >>> v = versions("cpu")
    >>> v["device"], sorted(v)[:3]
    ('cpu', ['device', 'device_name', 'hesslens'])
    """
    out: dict[str, Any] = {
        "hesslens": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "platform": platform.platform(),
        "device": str(torch.device("cpu" if device in (None, "") else device)),
    }
    out["device_name"] = _device_name(out["device"])
    out["matplotlib"] = metadata.version("matplotlib")  # without importing it
    return out


def bit_exactness(device: Any = None) -> dict[str, Any]:
    """What a run must keep to repeat its float results bit for bit: torch's CPU thread count
    (reductions split differently), ``torch.are_deterministic_algorithms_enabled()``, the torch
    version and the device type (``device``, default cpu).

    >>> import torch
    >>> bit_exactness()["threads"] == torch.get_num_threads()
    True
    """

    return {
        "threads": int(torch.get_num_threads()),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "torch": str(torch.__version__),
        "device_type": torch.device("cpu" if device in (None, "") else device).type,
    }
