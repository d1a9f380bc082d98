"""--val-fraction and `cl report --select-on val`: the held-out rows (stratified, seeded, never
trained on), the validation matrix beside R, resume, and choosing per method on validation."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from helpers import blob_stream, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import FAST, cl

from cl.errors import UsageError
from cl.experiment import RunConfig, execute, make_config
from cl.report import build_report
from cl.runner import TrainConfig, run
from cl.sampling import hold_out
from cl.types import Stream


@settings(max_examples=25, deadline=None)
@given(fraction=st.floats(0.1, 0.6), seed=st.integers(0, 1000))
def test_the_held_out_rows_are_a_stratified_seeded_part_of_the_training_rows(fraction, seed):
    stream = blob_stream(num_tasks=2, train_per_class=10)
    held = hold_out(stream, fraction, seed)
    assert held is not stream and hold_out(stream, 0.0, seed) is stream
    again = hold_out(stream, fraction, seed)
    for before, after, same in zip(stream.tasks, held.tasks, again.tasks, strict=True):
        rows = len(before.train)
        assert len(after.validation) == round(rows * fraction)
        assert len(after.train) + len(after.validation) == rows
        # Together they are the training rows, each once.
        joined = torch.cat([after.train.x, after.validation.x])
        assert sorted(map(tuple, joined.tolist())) == sorted(map(tuple, before.train.x.tolist()))
        # Each class's share: within one row of the exact proportion.
        for label in before.classes:
            share = int((after.validation.y == label).sum())
            assert abs(share - fraction * int((before.train.y == label).sum())) <= 1
        assert torch.equal(after.validation.x, same.validation.x)  # seeded
        assert torch.equal(after.test.x, before.test.x)  # the test rows are untouched


def test_a_fraction_that_empties_either_side_is_one_error():
    with pytest.raises(UsageError, match="must leave at least one row on each side"):
        hold_out(blob_stream(train_per_class=2), 0.05, 0)
    with pytest.raises(ValueError, match="val_fraction must be at least 0 and below 1"):
        RunConfig(val_fraction=1.0)


def test_the_run_never_trains_on_the_held_out_rows_and_records_their_matrix():
    """R with held-out rows equals R of a stream that simply lacks them; the validation matrix
    is the same model evaluated on them."""
    stream = hold_out(blob_stream(num_tasks=3, train_per_class=10), 0.3, 0)
    config = TrainConfig(batch_size=4, epochs=1, lr=0.1, eval_every=3)
    with_validation = run(tiny_model(stream), stream, None, config)
    without = Stream(stream.name, tuple(dataclasses.replace(task, validation=None)
                                        for task in stream.tasks),
                     stream.scenario, stream.num_classes, stream.input_shape)
    plain = run(tiny_model(stream), without, None, config)
    assert np.array_equal(with_validation.accuracy, plain.accuracy)
    assert "validation" not in plain.variants
    validation = with_validation.variants["validation"]
    assert validation["accuracy"].shape == plain.accuracy.shape
    # The validation rows as a test set: the same numbers.
    as_test = Stream(stream.name, tuple(dataclasses.replace(task, test=task.validation,
                                                            validation=None)
                                        for task in stream.tasks),
                     stream.scenario, stream.num_classes, stream.input_shape)
    on_validation = run(tiny_model(stream), as_test, None, config)
    assert np.array_equal(validation["accuracy"], on_validation.accuracy)


def test_a_resumed_run_has_the_same_validation_matrix():
    stream = hold_out(blob_stream(num_tasks=3), 0.25, 1)
    config = TrainConfig(batch_size=4, epochs=1, lr=0.1)
    saved = []
    whole = run(tiny_model(stream), stream, None, config, checkpoint=saved.append)
    resumed = run(tiny_model(stream), stream, None, config, resume=saved[0])
    assert np.array_equal(resumed.variants["validation"]["accuracy"],
                          whole.variants["validation"]["accuracy"])


def test_the_cli_records_it_and_refuses_a_bad_fraction(tmp_path, capsys):
    assert cl("run", "--out", tmp_path / "val", "--val-fraction", "0.2", *FAST) == 0
    metrics = json.loads((tmp_path / "val" / "metrics.json").read_text())
    config = json.loads((tmp_path / "val" / "config.json").read_text())
    assert config["val_fraction"] == 0.2
    validation = metrics["variants"]["validation"]
    assert 0 <= validation["acc"] <= 1
    # Its curve: every evaluation, as the main one's (the last is R's last row).
    assert len(validation["curve_accuracy"]) == len(metrics["curve"]["steps"])
    assert validation["curve_accuracy"][-1] == validation["accuracy_matrix"][-1]
    assert cl("run", "--out", tmp_path / "bad", "--val-fraction", "1.5", *FAST) == 2
    err = capsys.readouterr().err
    assert "val_fraction must be at least 0 and below 1, got 1.5" in err
    assert "Traceback" not in err


TINY = {"tasks": "split-digits", "epochs": 1, "hidden": [16], "train_per_task": 60,
        "test_per_task": 20, "val_fraction": 0.25}


def test_select_on_val_keeps_per_method_the_best_validation_configuration(tmp_path, capsys):
    configurations = {"slow": {"lr": 0.001}, "fast": {"lr": 0.1}, "ema": {"lr": 0.1,
                      "strategy": ["ema:decay=0.5"]}}
    for name, settings_ in configurations.items():
        for seed in (0, 1):
            execute(make_config({**TINY, **settings_, "seed": seed}),
                    tmp_path / "runs" / f"{name}-seed{seed}", checkpoint=False)
    everything = build_report([tmp_path / "runs"])
    chosen = build_report([tmp_path / "runs"], select_on="val")
    assert len(everything.groups) == 3
    by_method = {selection.method: selection for selection in chosen.selections}
    assert sorted(by_method) == ["ema", "naive"]
    naive = by_method["naive"]
    scores = dict(naive.candidates)
    assert sorted(scores) == ["fast", "slow"]
    assert naive.chosen == max(scores, key=scores.get)
    assert naive.validation_acc == max(scores.values())
    # The kept groups are the chosen ones, with their test numbers.
    assert sorted(group.name for group in chosen.groups) == sorted([naive.chosen, "ema"])
    assert cl("report", str(tmp_path / "runs"), "--out", str(tmp_path / "report"),
              "--select-on", "val") == 0
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    methods = sorted(entry["method"] for entry in written["selected_on_validation"])
    assert methods == ["ema", "naive"]
    assert "Chosen on validation" in (tmp_path / "report" / "report.md").read_text()
    # A run without validation rows cannot take part: one line naming it.
    execute(make_config({**TINY, "val_fraction": 0.0, "seed": 0}),
            tmp_path / "runs" / "plain-seed0", checkpoint=False)
    capsys.readouterr()
    assert cl("report", str(tmp_path / "runs"), "--out", str(tmp_path / "again"),
              "--select-on", "val") == 2
    assert "plain-seed0 has no validation matrix" in capsys.readouterr().err


def test_only_runs_of_the_same_data_model_and_buffer_budget_compete():
    from cl.experiment import DATA_KEYS
    from cl.report import COMPARABLE_KEYS, method_of, selection_key

    assert set(COMPARABLE_KEYS) == set(DATA_KEYS) - {"seed"}
    base = {"tasks": "split-digits", "strategy": ["replay:capacity=200,batch_size=10",
                                                  "ema:decay=0.99"], "lr": 0.1}
    assert method_of(base) == "replay(capacity=200) + ema"
    assert method_of({**base, "joint": True, "strategy": []}) == "joint naive"
    other_decay = {**base, "strategy": ["replay:capacity=200", "ema:decay=0.999"], "lr": 0.03}
    assert selection_key(base) == selection_key(other_decay)
    for changed in ({"strategy": ["replay:capacity=500", "ema:decay=0.99"]},
                    {"tasks": "split-mnist"}, {"val_fraction": 0.2}, {"hidden": [64]}):
        assert selection_key({**base, **changed}) != selection_key(base)
