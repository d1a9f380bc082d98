"""The run directory on disk: atomic file writes, and the files a finished run holds.

A run directory is complete only when its `metrics.json` exists, and that file is written last;
every file goes through a temporary file and a rename, so no reader ever sees half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from cl.errors import UsageError

CONFIG = "config.json"
METRICS = "metrics.json"
MATRIX = "matrix.csv"
EVENTS = "events.jsonl"


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _json_ready(value: Any) -> Any:
    """NaN and infinities become null: JSON has no spelling for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    return value


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, json.dumps(_json_ready(data), indent=2) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(_json_ready(row)) + "\n" for row in rows))


def write_matrix_csv(path: Path, row_names: list[str], column_names: list[str],
                     rows: list[list[float]]) -> None:
    """The accuracy matrix as CSV: one row per evaluation point, one column per task."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["after", *column_names])
    for name, row in zip(row_names, rows, strict=True):
        writer.writerow([name, *(f"{value:.6f}" for value in row)])
    atomic_write(path, buffer.getvalue())


def prepare_run_dir(path: Path) -> Path:
    """Create the run directory; refuse one that holds a finished run, clear an unfinished one."""
    path = Path(path)
    if (path / METRICS).exists():
        raise UsageError(f"{path} already holds a finished run ({METRICS}); choose another --out")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, MATRIX, EVENTS):
        (path / name).unlink(missing_ok=True)
    return path


def is_complete(path: Path) -> bool:
    return (Path(path) / METRICS).is_file()
