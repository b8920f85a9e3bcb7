"""Writing results: JSON-safe conversion and atomic writers (temporary file + ``os.replace``,
so a reader never sees a half-written file and an interrupted run leaves the old one).

A process killed in the middle of a write leaves its temporary file behind
(``.NAME.PID-TOKEN.XXXXXXXX.tmp``); :func:`remove_stale_temporaries`, called when a run starts
in a folder, deletes those whose writer is gone.

Example:
    >>> import numpy as np, torch, tempfile, os, json
    >>> to_jsonable({"a": torch.tensor([1.0, 2.0]), "b": np.float32(0.5), "c": float("nan")})
    {'a': [1.0, 2.0], 'b': 0.5, 'c': None}
    >>> d = tempfile.mkdtemp()
    >>> p = write_json(os.path.join(d, "r.json"), {"x": np.arange(3)})
    >>> json.load(open(p))
    {'x': [0, 1, 2]}
    >>> _ = open(os.path.join(d, ".r.json.999999999-dead.abcd1234.tmp"), "w").close()
    >>> [q.name for q in remove_stale_temporaries(d)], sorted(os.listdir(d))
    (['.r.json.999999999-dead.abcd1234.tmp'], ['r.json'])
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hesslens.errors import HesslensInputError

__all__ = [
    "remove_stale_temporaries",
    "to_jsonable",
    "write_bytes",
    "write_csv",
    "write_json",
    "write_text",
]

PathLike = str | os.PathLike[str]


def to_jsonable(obj: Any) -> Any:
    """Turn ``obj`` into plain JSON data.

    Tensors and numpy arrays become (nested) lists, numpy scalars Python numbers, objects with
    a ``to_dict()`` method and dataclasses dictionaries, paths and dtypes strings, tuples and
    sets lists; NaN becomes ``None`` and infinities the strings ``"inf"`` / ``"-inf"`` (strict
    JSON has neither).
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return float(obj)  # numpy.float64 is a float subclass: make it a plain float
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):  # torch.Tensor
        return to_jsonable(obj.detach().cpu().tolist())
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if type(obj).__module__ == "torch" and type(obj).__name__ in ("dtype", "device"):
        return str(obj).replace("torch.", "")
    raise HesslensInputError(f"cannot write a {type(obj).__name__} as JSON")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: Marks this process's temporary files: a file with our pid but another token was left by an
#: earlier process that had the same pid (containers reuse pids), so it is stale.
_TOKEN = secrets.token_hex(4)
# .NAME.PID-TOKEN.RANDOM.tmp (this version) or .NAME.RANDOM.tmp (before owners were recorded)
_TMP_OWNED = re.compile(r"^\..+\.(\d+)-([0-9a-z]+)\.[0-9a-z_]{8}\.tmp$")
_TMP_LEGACY = re.compile(r"^\..+\.[0-9a-z_]{8}\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def remove_stale_temporaries(folder: PathLike) -> list[Path]:
    """Delete the temporary files that interrupted atomic writes left in ``folder`` (not its
    sub-folders): those whose writing process no longer runs. Files of live writers, and
    everything that is not such a temporary file, are kept. Returns the paths removed; a
    missing folder removes nothing.

    >>> import tempfile
    >>> remove_stale_temporaries(tempfile.mkdtemp())
    []
    """
    folder = Path(folder)
    removed: list[Path] = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        owned = _TMP_OWNED.match(name)
        if owned:
            pid, token = int(owned.group(1)), owned.group(2)
            if pid == os.getpid():
                stale = token != _TOKEN
            else:
                stale = not _alive(pid)
        else:
            stale = bool(_TMP_LEGACY.match(name))
        if stale and entry.is_file() and not entry.is_symlink():
            with contextlib.suppress(OSError):
                entry.unlink()
                removed.append(entry)
    return removed


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders are created); returns the path."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise HesslensInputError(
            f"cannot write {path}: a parent of it is a file, not a folder") from None
    except PermissionError:
        raise HesslensInputError(
            f"cannot write {path}: no permission to create its folder") from None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-{_TOKEN}.",
                                   suffix=".tmp")
    except OSError as err:
        raise HesslensInputError(
            f"cannot write {path}: {err.strerror or err} (is the folder writable?)") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, indent: int | None = 1) -> Path:
    """Write ``to_jsonable(obj)`` as strict JSON (no NaN), atomically."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    return write_text(path, text + "\n")


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    if isinstance(value, (list, tuple)):
        return " ".join(str(_cell(v)) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_csv(
    path: PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> Path:
    """Write rows (mappings) as CSV with a header, atomically. ``columns`` default to the
    keys of the rows in first-seen order; missing values and NaN are written empty, lists
    space-separated."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _cell(row.get(c)) for c in columns})
    return write_text(path, buf.getvalue())
