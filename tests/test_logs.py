"""Optional training logs: `--log csv` and `--log tensorboard` hold the run's own events."""

from __future__ import annotations

import csv
import json

import pytest
from test_cli import FAST, cl

from cl.logs import scalars


def events(run_dir):
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_csv_and_tensorboard_logs_hold_the_losses_and_evaluations(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert cl("run", "--out", out, "--eval-every", "10", "--strategy", "ema:decay=0.9",
              "--log", "csv", "--log", "tensorboard", *FAST) == 0
    recorded = events(out)
    losses = [event for event in recorded if event["event"] == "loss"]
    rows = list(csv.DictReader((out / "log.csv").open()))
    logged = [row for row in rows if row["name"] == "loss/total"]
    assert [int(row["step"]) for row in logged] == [event["step"] for event in losses]
    assert [float(row["value"]) for row in logged] == [event["loss"] for event in losses]
    ends = [event for event in recorded if event["event"] == "task_end"]
    last = [row for row in rows if row["event"] == "task_end" and row["name"] == "accuracy/task4"]
    assert float(last[-1]["value"]) == ends[-1]["accuracy"][4]

    accumulator = EventAccumulator(str(out / "tensorboard"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    assert {"loss/total", "accuracy/task0", "accuracy/seen_mean"} <= tags
    board = accumulator.Scalars("loss/total")
    assert [scalar.step for scalar in board] == [event["step"] for event in losses]
    assert [scalar.value for scalar in board] == pytest.approx([e["loss"] for e in losses])


def test_logs_are_off_by_default_and_unknown_formats_are_refused(tmp_path, capsys):
    assert cl("run", "--out", tmp_path / "run", *FAST) == 0
    assert not (tmp_path / "run" / "log.csv").exists()
    assert not (tmp_path / "run" / "tensorboard").exists()
    assert cl("run", "--out", tmp_path / "other", "--log", "wandb", *FAST) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown log format 'wandb'" in error
    assert not (tmp_path / "other").exists()


def test_scalars_of_each_event_kind():
    assert scalars({"event": "step", "step": 3, "total_steps": 9, "task": 0}) == []
    assert scalars({"event": "loss", "step": 5, "task": 1, "epoch": 0, "loss": 2.0,
                    "distill": 0.5}) == [("loss/total", 2.0), ("loss/distill", 0.5)]
    during = scalars({"event": "eval", "step": 7, "task": 1, "accuracy": [0.5, 1.0, None]})
    assert during == [("accuracy/task0", 0.5), ("accuracy/task1", 1.0),
                      ("accuracy/seen_mean", 0.75)]
    # The evaluation before training has no task: no seen-task mean.
    assert scalars({"event": "eval", "step": 0, "task": None, "accuracy": [0.1, 0.2]}) == [
        ("accuracy/task0", 0.1), ("accuracy/task1", 0.2)]
