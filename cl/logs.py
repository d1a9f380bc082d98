"""Optional training logs of a run: a CSV file and TensorBoard scalars, both off by default.

Both are listeners on the runner's events (losses every `log_every` steps, evaluations, task
ends), written while the run trains so a long run can be watched. `events.jsonl` stays the
record of the run; these are views of the same events for other tools. A resumed run replays
its past events first, so each log is rewritten whole rather than appended to.
"""

from __future__ import annotations

import csv
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from cl.errors import UsageError

LOG_FORMATS = ("csv", "tensorboard")
CSV_LOG = "log.csv"
TENSORBOARD_DIR = "tensorboard"


def check_log_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The formats asked for, checked: known names, and TensorBoard installed when asked."""
    formats = tuple(dict.fromkeys(formats))  # the order given, without repeats
    for name in formats:
        if name not in LOG_FORMATS:
            raise UsageError(f"unknown log format {name!r} (known: {', '.join(LOG_FORMATS)})")
    if "tensorboard" in formats:
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            raise UsageError("--log tensorboard needs the tensorboard package: "
                             "pip install -e '.[tensorboard]'") from None
    return formats


def scalars(event: dict) -> list[tuple[str, float]]:
    """The (name, value) scalars one runner event carries; none for progress ticks."""
    kind = event["event"]
    if kind == "loss":
        return [("loss/total" if key == "loss" else f"loss/{key}", float(value))
                for key, value in event.items()
                if key not in ("event", "step", "task", "epoch") and value is not None]
    if kind not in ("eval", "task_end"):
        return []
    values = [(f"accuracy/task{index}", float(value))
              for index, value in enumerate(event["accuracy"])
              if value is not None and not math.isnan(value)]
    if event["task"] is not None:
        # The tasks trained so far: the curve whose dips are the stability gap.
        seen = [value for name, value in values
                if int(name.removeprefix("accuracy/task")) <= event["task"]]
        if seen:  # none under --eval-on final before the last task
            values.append(("accuracy/seen_mean", sum(seen) / len(seen)))
    return values


class CsvLog:
    """`log.csv`: one row per scalar, `step,task,event,name,value` (long form, any columns)."""

    def __init__(self, run_dir: Path) -> None:
        self._file = open(Path(run_dir) / CSV_LOG, "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(["step", "task", "event", "name", "value"])

    def __call__(self, event: dict) -> None:
        rows = scalars(event)
        task = "" if event.get("task") is None else event["task"]
        for name, value in rows:
            self._writer.writerow([event["step"], task, event["event"], name, repr(value)])
        if rows:
            self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLog:
    """`tensorboard/`: the same scalars as event files for `tensorboard --logdir`."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        directory = Path(run_dir) / TENSORBOARD_DIR
        shutil.rmtree(directory, ignore_errors=True)  # a resumed run replays its events
        self._writer = SummaryWriter(log_dir=str(directory))

    def __call__(self, event: dict) -> None:
        for name, value in scalars(event):
            self._writer.add_scalar(name, value, global_step=event["step"])

    def close(self) -> None:
        self._writer.close()


class Logs:
    """The logs of one run as one listener; `close()` flushes them. Empty formats: a no-op."""

    def __init__(self, formats: Sequence[str], run_dir: Path) -> None:
        makers = {"csv": CsvLog, "tensorboard": TensorBoardLog}
        self._logs = [makers[name](run_dir) for name in check_log_formats(formats)]

    def __call__(self, event: dict) -> None:
        if event["event"] == "step":  # progress ticks, every optimizer step
            return
        for log in self._logs:
            log(event)

    def close(self) -> None:
        for log in self._logs:
            log.close()


def chain_listeners(*listeners: Callable[[dict], None] | None) -> Callable[[dict], None] | None:
    """One listener calling each given one in order; None when none is given."""
    present = [listener for listener in listeners if listener is not None]
    if not present:
        return None

    def listener(event: dict) -> None:
        for each in present:
            each(event)

    return listener
