"""The files of a measurement over training (the curvature tracker's, the sharpness monitor's):
a JSON history (schema, settings, records) and a CSV of one flat row a record, written
atomically; read back to continue a history, refusing a file of another kind by name.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hesslens.errors import HesslensInputError
from hesslens.files import write_csv, write_json

__all__ = ["HistoryFiles"]


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
