"""The run directory on disk: atomic file writes, and the files a finished run holds.

A run directory is complete only when its `metrics.json` exists, and that file is written last;
every file goes through a temporary file and a rename, so no reader ever sees half a file.
"""

from __future__ import annotations

import csv
import errno
import fcntl
import functools
import io
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cl.errors import ClError, UsageError, one_line

CONFIG = "config.json"
METRICS = "metrics.json"
ERROR = "error.json"  # a failed run's record: its error line and traceback
MANIFEST = "ablation.json"  # in an ablation's directory: the spec and the runs it expanded to
MATRIX = "matrix.csv"
EVENTS = "events.jsonl"
CHECKPOINT = "checkpoint"
MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
# The mark of a directory cl made, and the file a process holds a lock on while it owns the run.
MARKER = ".cl-run"
NAME_MAX = 255  # the longest file name (in bytes) of Linux's and macOS's filesystems
CHECKPOINT_FORMAT = 2  # 2: the run's config is saved with the progress (resume checks it)


class RunDirBusy(ClError):
    """Another process holds the run directory (a second `cl run --out` on the same folder)."""


class RunFinished(UsageError):
    """The run directory already holds a finished run: it is kept, never overwritten."""


@functools.cache
def _umask() -> int:
    """The process's umask (read once: setting it back at once is the only portable way)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """What `open()` would give a new file: rw for whom the umask allows."""
    return 0o666 & ~_umask()


def atomic_write(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same directory and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory and a rename."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; results are meant to be shared as the umask says.
        os.fchmod(handle, file_mode())
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
    """The accuracy matrix as CSV: one row per evaluation point, one column per task; a task
    not evaluated there (`--eval-on seen|final`) is an empty cell."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["after", *column_names])
    for name, row in zip(row_names, rows, strict=True):
        writer.writerow([name, *("" if math.isnan(value) else f"{value:.6f}" for value in row)])
    atomic_write(path, buffer.getvalue())


class RunLock:
    """This process's hold on a run directory: an exclusive `flock` on its marker file.

    The kernel drops the lock when the process ends, however it ends, so a killed run never
    leaves a stale lock behind; `release` drops it earlier."""

    def __init__(self, path: Path, handle: int) -> None:
        self.path = path
        self._handle: int | None = handle

    def release(self) -> None:
        if self._handle is not None:
            os.close(self._handle)
            self._handle = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _holder(marker: Path) -> str:
    """Who holds a run directory, for the error line: the pid its marker records."""
    try:
        pid = marker.read_text(encoding="utf-8").strip()
    except OSError:
        return "another process"
    return f"process {pid}" if pid.isdigit() else "another process"


def output_directory(given: str | Path, flag: str) -> Path:
    """`given` (an --out value as typed) as a directory cl may make or write into, checked
    before any work: an empty name, a name the filesystem cannot hold, or a path through or
    onto a file is one UsageError naming it, rather than an OSError after the run."""
    if str(given) == "":
        raise UsageError(f"{flag} is empty: name a directory")
    path = Path(given)
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UsageError(f"{flag}: the name {part[:24]}... is longer than "
                             f"{NAME_MAX} bytes")
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                where = "" if ancestor == path else f": {ancestor}"
                raise UsageError(f"{flag} {path}{where} is a file, not a directory")
            break
    return path


def lock_run_dir(path: Path, resume: bool = False) -> RunLock:
    """Take `path` as this process's run directory: made by cl (its marker) or new or empty.

    A folder cl did not make is never written into: it may hold the user's own files (a
    `config.json`, a `checkpoint/`) that a run would overwrite or delete. The returned lock is
    held until released or until the process ends; a second process gets RunDirBusy.
    """
    path = Path(path)
    marker = path / MARKER
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory")
    if path.is_dir() and not marker.is_file():
        if resume:
            raise UsageError(f"{path} is not a run directory cl made (it has no {MARKER})")
        entries = sorted(entry.name for entry in path.iterdir())
        if entries:
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UsageError(f"--out {path} holds files cl did not write ({shown}); "
                             "choose a new or empty directory")
    path.mkdir(parents=True, exist_ok=True)
    handle = os.open(marker, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(handle)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RunDirBusy(f"{path} is in use by {_holder(marker)}: one run directory, one "
                             "process at a time") from None
        raise
    os.ftruncate(handle, 0)
    os.write(handle, f"{os.getpid()}\n".encode())
    return RunLock(path, handle)


def is_locked(path: Path) -> bool:
    """Whether another process holds the run directory `path` now."""
    try:
        handle = os.open(Path(path) / MARKER, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(handle)
    return False


def clear_unfinished(path: Path) -> None:
    """Remove what an unfinished run left in its directory, so a fresh start is clean; refuse a
    finished run (it is kept, never overwritten)."""
    path = Path(path)
    if (path / METRICS).exists():
        raise RunFinished(f"{path} already holds a finished run ({METRICS}); choose another --out")
    for name in (CONFIG, MATRIX, EVENTS, ERROR):
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / CHECKPOINT, ignore_errors=True)
    shutil.rmtree(path / ".checkpoint-previous", ignore_errors=True)


def write_checkpoint(run_dir: Path, state: dict, artifacts: dict[str, dict]) -> Path:
    """Write `run_dir/checkpoint/`: the model as safetensors, the strategies' state, the RNG
    states and the progress as a torch file that loads with `weights_only=True`, and each
    artifact as `<name>.safetensors`.

    The new checkpoint is written whole into a temporary directory and swapped in by renames,
    so a kill at any moment leaves either the previous checkpoint or the new one, never half.
    A write that fails (a full disk) is one error line naming the directory, whichever library
    wrote the file (safetensors reports its I/O errors as its own exception type).
    """
    import torch
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    final = run_dir / CHECKPOINT
    partial = Path(tempfile.mkdtemp(prefix=".checkpoint-", dir=run_dir))
    try:
        os.chmod(partial, 0o777 & ~_umask())  # mkdtemp makes it 0700
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
        # Libraries may write through their own temporary files (mode 0600): results are
        # meant to be shared as the umask says.
        for written in partial.rglob("*"):
            os.chmod(written, file_mode() if written.is_file() else 0o777 & ~_umask())
        previous = run_dir / ".checkpoint-previous"
        if final.exists():
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
        os.replace(partial, final)
        shutil.rmtree(previous, ignore_errors=True)
    except BaseException as error:
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(error, Exception) and not isinstance(error, (OSError, ClError)):
            raise ClError(f"cannot write the checkpoint in {run_dir}: "
                          f"{one_line(error)}") from error
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
        previous = run_dir / ".checkpoint-previous"
        if (previous / STATE_FILE).is_file():
            directory = previous
        elif directory.exists():  # write_checkpoint swaps in only whole ones: this was edited
            raise UsageError(f"checkpoint {directory} is incomplete (no {STATE_FILE}): "
                             f"delete it to start the run again from its first task")
        else:
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
    """"done" (metrics.json), "running" (another process holds it), "failed" (error.json),
    "partial" (started), or "new"."""
    run_dir = Path(run_dir)
    if is_complete(run_dir):
        return "done"
    if is_locked(run_dir):
        return "running"
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
