"""A-GEM: the projection against its definition, the memory of capacity // num_tasks rows per
task, the step it makes against a hand-written A-GEM step, and the CLI form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import blob_stream, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import FAST, cl

from cl.errors import UsageError
from cl.runner import TrainConfig, run
from cl.types import Batch
from strategies import AGEM, AGEMConfig
from strategies.agem import dot, project

vectors = st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=6, max_size=6)


def as_gradient(values):
    """Six numbers as a gradient of two tensors (shapes 2x2 and 2)."""
    flat = torch.tensor(values, dtype=torch.float64)
    return [flat[:4].reshape(2, 2), flat[4:]]


@settings(max_examples=200, deadline=None)
@given(g=vectors, r=vectors)
def test_the_projection_keeps_a_gradient_that_agrees_and_removes_the_conflict_exactly(g, r):
    gradient, reference = as_gradient(g), as_gradient(r)
    projected = project(gradient, reference)
    product = float(dot(gradient, reference))
    if product >= 0:
        assert all(torch.equal(p, q) for p, q in zip(projected, gradient, strict=True))
        return
    # What is left does not conflict (is orthogonal to the reference) ...
    norm = float(dot(reference, reference))
    assert abs(float(dot(projected, reference))) <= 1e-9 * max(1.0, norm) * max(
        1.0, float(dot(gradient, gradient)) ** 0.5)
    # ... and what was removed is a multiple of the reference: g - p = (g.r / r.r) r.
    removed = [a - b for a, b in zip(gradient, projected, strict=True)]
    expected = [product / norm * t for t in reference]
    assert all(torch.allclose(a, b, atol=1e-9) for a, b in zip(removed, expected, strict=True))


def test_a_zero_reference_leaves_the_gradient_alone():
    gradient = [torch.tensor([1.0, -2.0])]
    assert torch.equal(project(gradient, [torch.zeros(2)])[0], gradient[0])


def test_the_memory_keeps_capacity_over_num_tasks_rows_of_each_task():
    stream = blob_stream(num_tasks=3, train_per_class=10)
    model = tiny_model(stream)
    agem = AGEM(AGEMConfig(capacity=13))
    agem.before_run(model, stream, 0)
    for task in stream.tasks:
        agem.after_task(model, task)
    assert len(agem.buffer) == 12  # 13 // 3 = 4 rows of each task
    assert agem.buffer.task[:12].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for index, task in enumerate(stream.tasks):
        rows = agem.buffer.x[4 * index:4 * index + 4]
        assert all((task.train.x == row).all(1).any() for row in rows)
    with pytest.raises(UsageError, match="capacity 2 is less than the stream's 3 tasks"):
        AGEM(AGEMConfig(capacity=2)).check(model, stream, False)


def test_the_step_is_a_hand_written_agem_step():
    """One step on task 1 with the memory holding task 0's rows: the gradient the strategy
    returns is the hand-projected one."""
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    agem = AGEM(AGEMConfig(capacity=8, batch_size=8))
    agem.before_run(model, stream, 0)
    agem.after_task(model, stream.tasks[0])  # 4 rows of task 0, the whole memory
    memory_x, memory_y = agem.buffer.x[:4].clone(), agem.buffer.y[:4].clone()
    task = stream.tasks[1]
    batch = Batch.of(task.train.x[:4], task.train.y[:4], task)
    model.zero_grad()
    F.cross_entropy(model(batch.x), batch.y).backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    adjusted = agem.adjust_gradients(model, batch, task, dict(gradients))
    reference = torch.autograd.grad(F.cross_entropy(model(memory_x), memory_y),
                                    list(model.parameters()))
    g = torch.cat([gradients[name].flatten() for name, _ in model.named_parameters()])
    r = torch.cat([t.flatten() for t in reference])
    expected = g - (g @ r) / (r @ r) * r if g @ r < 0 else g
    got = torch.cat([adjusted[name].flatten() for name, _ in model.named_parameters()])
    assert torch.allclose(got, expected, atol=1e-6)
    # The gradients it was given are not changed in place.
    assert all(torch.equal(p.grad, gradients[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("settings, message", [
    ({"capacity": 0}, "capacity must be a positive integer"),
    ({"memory": "ring"}, "memory must be one of per_task, reservoir"),
    ({"batch_size": 0}, "batch_size must be a positive integer"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        AGEMConfig(**settings)


def test_same_seed_same_matrix_and_the_cli_form(tmp_path, capsys):
    stream = blob_stream(num_tasks=3)
    config = TrainConfig(batch_size=4, epochs=1, lr=0.1)
    results = [run(tiny_model(stream), stream, AGEM(AGEMConfig(capacity=12)), config).accuracy
               for _ in range(2)]
    assert np.array_equal(results[0], results[1])
    assert cl("run", "--out", tmp_path / "agem", "--strategy",
              "agem:capacity=50,memory=reservoir", *FAST) == 0
    assert cl("run", "--out", tmp_path / "few", "--strategy", "agem:capacity=3", *FAST) == 2
    assert "capacity 3 is less than the stream's 5 tasks" in capsys.readouterr().err


def test_it_composes_with_a_freeze_that_starts_later():
    """A layer frozen after task 0 keeps its last gradient (no optimizer clears it any more):
    the projection acts on the trainable parameters only."""
    from cl.strategy import Chain
    from strategies import Freeze, FreezeConfig

    stream = blob_stream(num_tasks=3)
    model = tiny_model(stream)
    before = model[0].weight.detach().clone()
    chain = Chain(Freeze(FreezeConfig(patterns=("0.*",), after_task=1)),
                  AGEM(AGEMConfig(capacity=12)))
    result = run(model, stream, chain, TrainConfig(batch_size=4, epochs=1, lr=0.1))
    assert np.isfinite(result.accuracy).all()
    assert not torch.equal(model[0].weight, before)  # it trained on task 0 ...
