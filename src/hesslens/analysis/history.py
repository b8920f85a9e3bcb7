"""Measurements over training (the curvature tracker's, the sharpness monitor's): the loop
they share (:class:`HistoryRecorder`: record every ``every`` calls, file each record under its
step, replace the records a resumed run measures again, hold the output folder's lock) and
their files (:class:`HistoryFiles`: a JSON history of schema, settings and records and a CSV of
one flat row a record, written atomically; read back to continue a history, refusing a file of
another kind by name).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> files = HistoryFiles("demo.json", "demo.csv", "hesslens.demo/1", "demo", dict)
    >>> folder = Path(tempfile.mkdtemp())
    >>> files.write(folder, [{"step": 0, "value": 1.5}], {"k": 1})
    >>> files.read(folder)
    [{'step': 0, 'value': 1.5}]
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from hesslens.checks import check_positive_int
from hesslens.errors import HesslensInputError
from hesslens.files import write_csv, write_json
from hesslens.locks import OutputLock
from hesslens.parallel import acquire_folder_lock, current

__all__ = ["HistoryFiles", "HistoryRecorder"]


@dataclass(frozen=True)
class HistoryFiles:
    """Where and how one kind of history is kept: the JSON and CSV file names, the schema
    that marks its JSON, what to call it in errors and the flattening of a record to a row."""

    json_name: str
    csv_name: str
    schema: str
    what: str
    flatten: Callable[[Mapping[str, Any]], dict[str, Any]]

    def read(self, folder: Path) -> list[dict[str, Any]]:
        """The records kept in ``folder`` (none when there is no file)."""
        path = Path(folder) / self.json_name
        if not path.exists():
            return []
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise HesslensInputError(
                f"{path} exists but cannot be read as a {self.what} history ({err}); move it "
                "away or choose another out folder") from None
        if not isinstance(saved, dict) or saved.get("schema") != self.schema or not isinstance(
                saved.get("records"), list):
            raise HesslensInputError(
                f"{path} is not a hesslens {self.what} history (schema {self.schema}); move it "
                "away or choose another out folder")
        return list(saved["records"])

    def write(self, folder: Path, records: Sequence[Mapping[str, Any]],
              settings: Mapping[str, Any] | None = None) -> None:
        """The JSON history and the CSV rows in ``folder``, atomically."""
        folder = Path(folder)
        write_json(folder / self.json_name, {"schema": self.schema,
                                             "settings": dict(settings or {}),
                                             "records": list(records)})
        write_csv(folder / self.csv_name, [self.flatten(r) for r in records])


class HistoryRecorder:
    """The recording loop of a measurement over training; a subclass says what one record
    measures (:meth:`measure`), with which settings (:meth:`settings`), in which files
    (``files``) and which keys a caller's ``info`` may not set (``measured_keys``).

    ``out`` (a folder or ``None``) is held with its lock (:mod:`hesslens.locks`) from
    construction until :meth:`close`; a folder that holds a history continues it. Under
    ``torch.distributed`` rank 0 alone holds the lock and writes the files.
    """

    files: ClassVar[HistoryFiles]
    measured_keys: ClassVar[frozenset[str]]

    def __init__(self, out: str | Path | None, every: int) -> None:
        self.every = check_positive_int(every, "every")
        self.calls = 0
        self.history: list[dict[str, Any]] = []
        self.out = None if out is None else Path(out)
        self._lock: OutputLock | None = None
        if self.out is not None:
            if self.out.exists() and not self.out.is_dir():
                raise HesslensInputError(
                    f"out={str(self.out)!r} is a file; give a folder for "
                    f"{self.files.json_name}")
            self._lock = acquire_folder_lock(self.out, f"a {type(self).__name__}")
            try:
                self.history = self.files.read(self.out)
            except BaseException:
                if self._lock is not None:
                    self._lock.release(failed=True)
                raise

    def measure(self) -> dict[str, Any]:
        """The measurement at the model's current weights, without filing it."""
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What each record measured, as stored in the JSON history."""
        raise NotImplementedError

    def close(self) -> None:
        """Give back the lock of ``out`` (the records stay in :attr:`history`; a new recorder
        on the folder continues them). Recording into ``out`` afterwards is an error."""
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> HistoryRecorder:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def due(self) -> bool:
        """Whether the next :meth:`update` call records."""
        return self.calls % self.every == 0

    def update(self, step: int | float | None = None) -> dict[str, Any] | None:
        """Record now if this call is due (records on calls ``1, every + 1, ...``); return the
        record, or ``None``.

        Args:
            step: the training step (or epoch) to file the record under; default one after
                the last recorded step (0 for the first).
        """
        due = self.due()
        self.calls += 1
        return self.record(step) if due else None

    def record(self, step: int | float | None = None,
               info: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Record now, whatever ``every`` says; append to the history (and the files). A
        record whose step is not after the last one replaces the records from that step on (a
        run resumed from a checkpoint measures those steps again).

        Args:
            step: as for :meth:`update`.
            info: more keys for the record (e.g. ``{"epoch": 2}``); they cannot replace the
                measured ones.
        """
        if step is None:
            step = self.history[-1]["step"] + 1 if self.history else 0
        if isinstance(step, bool) or not isinstance(step, (int, float)) or not math.isfinite(
                step):
            raise HesslensInputError(f"step must be a number, got {step!r}")
        extra = dict(info or {})
        clash = sorted(set(extra) & (self.measured_keys | {"step"}))
        if clash:
            raise HesslensInputError(f"info may not set the measured keys {clash}")
        if self._lock is not None and not self._lock.held:
            raise HesslensInputError(
                f"this {type(self).__name__} was closed and no longer holds {self.out}: make "
                "a new one on the folder to go on recording there")
        rec = {"step": step, **extra, **self.measure()}
        while self.history and self.history[-1]["step"] >= step:
            self.history.pop()
        self.history.append(rec)
        if self.out is not None and current().is_main:
            self.write_history(self.out)
        return rec

    def write_history(self, folder: str | Path) -> None:
        """The JSON history (settings and records) and the CSV rows into ``folder``,
        atomically."""
        self.files.write(Path(folder), self.history, self.settings())
