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
import time
from pathlib import Path
from typing import Any

from cl.errors import UsageError, one_line

CONFIG = "config.json"
METRICS = "metrics.json"
ERROR = "error.json"  # a failed run's record: its error line and traceback
MANIFEST = "ablation.json"  # in an ablation's directory: the spec and the runs it expanded to
MATRIX = "matrix.csv"
EVENTS = "events.jsonl"
CHECKPOINT = "checkpoint"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CHECKPOINT_FORMAT = 1


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
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


def write_checkpoint(run_dir: Path, state: dict, artifacts: dict[str, dict]) -> Path:
    """Write `run_dir/checkpoint/`: the model as safetensors, the strategies' state, the RNG
    states and the progress as a torch file that loads with `weights_only=True`, and each
    artifact as `<name>.safetensors`.

    The new checkpoint is written whole into a temporary directory and swapped in by renames,
    so a kill at any moment leaves either the previous checkpoint or the new one, never half.
    """
    import shutil

    import torch
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT
    partial = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
    try:
        # Clones break storage sharing (tied weights), which safetensors refuses to write.
        model = {key: value.detach().cpu().clone().contiguous()
                 for key, value in state["model"].items()}
        save_file(model, str(partial / MODEL_FILE))
        rest = {key: value for key, value in state.items() if key != "model"}
        with open(partial / STATE_FILE, "wb") as file:
            torch.save({"format": CHECKPOINT_FORMAT, **rest}, file)
            file.flush()
            os.fsync(file.fileno())
        for name, tensors in artifacts.items():
            target = partial / f"{name}.safetensors"
            target.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(target))
        previous = run_dir / ".checkpoint-previous"
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(partial, final)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final


def read_checkpoint(run_dir: Path) -> dict | None:
    """The state `write_checkpoint` wrote, or None when the run never finished a task."""
    import torch
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    directory = run_dir / CHECKPOINT
    if not (directory / STATE_FILE).is_file():
        # A kill between the two renames of `write_checkpoint` leaves only the previous one.
        directory = run_dir / ".checkpoint-previous"
        if not (directory / STATE_FILE).is_file():
            return None
    try:
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        state["model"] = load_file(str(directory / MODEL_FILE))
    except Exception as error:  # a truncated or foreign file: say which, no traceback
        raise UsageError(f"cannot read checkpoint {directory}: {one_line(error)}") from None
    if state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"checkpoint {directory} has format {state.get('format')!r}, "
                         f"expected {CHECKPOINT_FORMAT}")
    return state


def is_complete(path: Path) -> bool:
    return (Path(path) / METRICS).is_file()


def run_status(run_dir: Path) -> str:
    """"done" (metrics.json), "failed" (error.json), "partial" (started), or "new"."""
    run_dir = Path(run_dir)
    if is_complete(run_dir):
        return "done"
    if (run_dir / ERROR).is_file():
        return "failed"
    if (run_dir / CONFIG).is_file():
        return "partial"
    return "new"


def write_error(run_dir: Path, name: str, error: str, details: str = "") -> None:
    """Record a failed run: `error.json` with its error line and, when known, its traceback."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / ERROR, {"run": name, "error": error, "traceback": details,
                                 "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def read_error(run_dir: Path) -> str:
    """The error line of a failed run's `error.json` (a note when it cannot be read)."""
    try:
        return json.loads((Path(run_dir) / ERROR).read_text(encoding="utf-8"))["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {Path(run_dir) / ERROR}"
