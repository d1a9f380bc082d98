"""DER and DER++: the squared error toward stored logits and the second draw's cross-entropy
against hand computations, the buffer filled with each step's raw logits, and the CLI forms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import blob_stream, tiny_model
from test_cli import FAST, cl

from cl.runner import TrainConfig, run
from cl.types import Batch
from strategies import DER, DERPP, DERConfig, DERPPConfig


def filled(strategy: DER, scenario: str = "class", rows: int = 6):
    """A strategy whose buffer holds exactly `rows` rows of task 0 (capacity = rows), each with
    the logits the model gave it, and the model and stream it was filled with."""
    stream = blob_stream(num_tasks=2, scenario=scenario)
    model = tiny_model(stream)
    strategy.before_run(model, stream, 0)
    task = stream.tasks[0]
    batch = Batch.of(task.train.x[:rows], task.train.y[:rows], task)
    with torch.no_grad():
        logits = model(batch.x)
    strategy.after_step(model, batch, logits, task)
    return stream, model, batch, logits


def test_no_term_before_the_buffer_holds_a_row():
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    der = DER(DERConfig(capacity=4))
    der.before_run(model, stream, 0)
    batch = Batch.of(stream.tasks[0].train.x[:2], stream.tasks[0].train.y[:2], 0)
    assert der.loss_terms(model, batch, model(batch.x), stream.tasks[0]) == {}
    assert der.transform_batch(batch, stream.tasks[0]) is batch  # no rows join the batch


def test_der_term_is_alpha_times_the_mse_toward_the_logits_stored_at_insertion():
    der = DER(DERConfig(capacity=6, alpha=0.7, batch_size=6))
    stream, model, batch, stored = filled(der)
    assert torch.equal(der.buffer.logits[:6], stored)  # the step's raw logits, as inserted
    with torch.no_grad():  # the model moves on: the term pulls it back toward `stored`
        for parameter in model.parameters():
            parameter.add_(0.1)
    task = stream.tasks[1]
    terms = der.loss_terms(model, batch, model(batch.x), task)
    # A draw of the whole buffer: the mean over rows does not depend on their order.
    expected = 0.7 * F.mse_loss(model(batch.x), stored)
    assert set(terms) == {"mse"} and torch.allclose(terms["mse"], expected, atol=1e-6)
    assert float(terms["mse"].detach()) > 0


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_derpp_adds_beta_times_the_cross_entropy_of_a_second_draw(scenario):
    derpp = DERPP(DERPPConfig(capacity=6, alpha=0.5, beta=0.3, batch_size=6))
    stream, model, batch, stored = filled(derpp, scenario)
    terms = derpp.loss_terms(model, batch, model(batch.x), stream.tasks[1])
    logits = model(batch.x)
    if scenario == "task":  # each row against its own task's classes, as the runner trains
        logits = logits.masked_fill(~stream.class_mask()[batch.task],
                                    torch.finfo(logits.dtype).min)
    assert set(terms) == {"mse", "ce"}
    assert torch.allclose(terms["ce"], 0.3 * F.cross_entropy(logits, batch.y), atol=1e-6)
    assert torch.allclose(terms["mse"], torch.zeros(()), atol=1e-12)  # unchanged model


def test_the_two_draws_are_independent_and_seeded():
    derpp = DERPP(DERPPConfig(capacity=30, batch_size=5))
    stream, model, batch, _ = filled(derpp, rows=30)
    first = derpp.buffer.sample_index(5).tolist()
    second = derpp.buffer.sample_index(5).tolist()
    assert first != second
    again = DERPP(DERPPConfig(capacity=30, batch_size=5))
    filled(again, rows=30)
    assert again.buffer.sample_index(5).tolist() == first


@pytest.mark.parametrize("settings, message", [
    ({"capacity": 0}, "capacity must be a positive integer"),
    ({"alpha": -1.0}, "alpha must be a non-negative number"),
    ({"beta": float("nan")}, "beta must be a non-negative number"),
    ({"batch_size": 0}, "batch_size must be a positive integer or None"),
    ({"policy": "fifo"}, "policy must be one of reservoir, class_balanced"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        DERPPConfig(**settings)


def test_same_seed_same_matrix_and_the_terms_are_logged(tmp_path):
    stream = blob_stream(num_tasks=3)
    config = TrainConfig(batch_size=4, epochs=1, lr=0.1)
    results = [run(tiny_model(stream), stream, DERPP(DERPPConfig(capacity=10)), config)
               for _ in range(2)]
    assert np.array_equal(results[0].accuracy, results[1].accuracy)
    logged = [event for event in results[0].events if event["event"] == "loss"]
    assert any("mse" in event and "ce" in event for event in logged)


def test_the_cli_names_and_a_bad_value_is_one_line(tmp_path, capsys):
    out = tmp_path / "derpp"
    assert cl("run", "--out", out, "--strategy", "derpp:capacity=50,alpha=1,beta=0.5",
              *FAST) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["strategies"]["derpp"]["buffer_rows"] == 50
    assert cl("run", "--out", tmp_path / "der", "--strategy", "der:capacity=20", *FAST) == 0
    assert cl("run", "--out", tmp_path / "bad", "--strategy", "derpp:beta=-1", *FAST) == 2
    err = capsys.readouterr().err
    assert "beta must be a non-negative number" in err and "Traceback" not in err


def test_the_policies_are_replays():
    import typing

    from strategies import der, replay

    assert typing.get_args(der.Policy) == replay.POLICIES
