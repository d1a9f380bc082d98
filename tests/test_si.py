"""SI: the importance against a hand-summed path integral on a quadratic, the penalty (zero at
the anchor), clipping, frozen weights, and the CLI form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import blob_stream, tiny_model
from test_cli import FAST, cl

from cl.runner import TrainConfig, run
from cl.types import Batch, Stream, Task
from strategies import SI, SIConfig
from strategies.si import si_penalty


class Weights(torch.nn.Module):
    """Two weights; the loss is the quadratic sum_i a_i (w_i - c_i)^2, the logits unused."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def forward(self, x):
        return x @ torch.zeros(2, 2) + self.w.sum() * 0


def quadratic_stream():
    x, y = torch.zeros(4, 2), torch.tensor([0, 1, 0, 1])
    return Stream.from_tasks([Task.from_tensors(x, y, x, y, index=i) for i in range(2)])


def test_the_importance_is_the_hand_summed_path_integral_over_the_distance_moved():
    a, c, lr, damping = torch.tensor([3.0, 0.5]), torch.tensor([0.0, 1.0]), 0.1, 0.2
    model, stream = Weights(), quadratic_stream()
    si = SI(SIConfig(strength=1.0, damping=damping))
    si.before_run(model, stream, 0)
    task = stream.tasks[0]
    batch = Batch.of(torch.zeros(1, 2), torch.tensor([0]), task)
    start = model.w.detach().clone()
    si.before_task(model, task)
    integral, squares = torch.zeros(2), torch.zeros(2)
    for _ in range(5):
        loss = (a * (model.w - c) ** 2).sum()
        model.zero_grad()
        loss.backward()
        gradient = model.w.grad.clone()
        before = model.w.detach().clone()
        with torch.no_grad():
            model.w -= lr * gradient
        si.after_step(model, batch, torch.zeros(1, 2), task)
        integral += -gradient * (model.w.detach() - before)  # by hand, step by step
        squares += gradient ** 2
    si.after_task(model, task)
    expected = integral / ((model.w.detach() - start) ** 2 + damping)
    assert torch.allclose(si.importance["w"], expected, rtol=1e-5)
    assert (si.importance["w"] > 0).all()  # a descent: every step lowered the loss
    # Under plain SGD the integral is the reference's lr * sum of squared gradients.
    assert torch.allclose(integral, lr * squares, rtol=1e-5)
    assert torch.equal(si.path["w"], torch.zeros(2))  # restarted for the next task
    assert torch.equal(si.anchor["w"], model.w.detach())


def test_the_penalty_is_zero_at_the_anchor_and_weighted_squared_distance_elsewhere():
    model = Weights()
    importance = {"w": torch.tensor([2.0, 3.0])}
    anchor = {"w": model.w.detach().clone()}
    assert float(si_penalty(model, importance, anchor).detach()) == 0.0
    with torch.no_grad():
        model.w += torch.tensor([1.0, -2.0])
    assert float(si_penalty(model, importance, anchor).detach()) == pytest.approx(2 * 1 + 3 * 4)


def test_clipping_bounds_every_entry_and_new_tensors_are_returned():
    si = SI(SIConfig(clip_value=0.5))
    assert si.adjusts_gradients and not SI().adjusts_gradients
    given = {"w": torch.tensor([2.0, -0.1, -3.0])}
    clipped = si.adjust_gradients(Weights(), None, None, given)
    assert clipped["w"].tolist() == pytest.approx([0.5, -0.1, -0.5])
    assert given["w"].tolist() == pytest.approx([2.0, -0.1, -3.0])


def test_a_frozen_weight_gets_no_importance_and_the_penalty_starts_after_task_one():
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    model[0].weight.requires_grad_(False)
    si = SI(SIConfig(strength=3.0))
    result = run(model, stream, si, TrainConfig(batch_size=4, epochs=1, lr=0.1))
    assert np.isfinite(result.accuracy).all()
    assert torch.equal(si.importance["0.weight"], torch.zeros_like(model[0].weight))
    assert (si.importance["2.weight"] > 0).any()


@pytest.mark.parametrize("settings, message", [
    ({"strength": -1.0}, "strength must be a non-negative number"),
    ({"damping": 0.0}, "damping must be positive"),
    ({"clip_value": 0.0}, "clip_value must be positive or None"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        SIConfig(**settings)


def test_same_seed_same_matrix_and_the_cli_form(tmp_path, capsys):
    stream = blob_stream(num_tasks=3)
    config = TrainConfig(batch_size=4, epochs=1, lr=0.1)
    results = [run(tiny_model(stream), stream, SI(SIConfig(strength=5.0, clip_value=1.0)),
                   config).accuracy for _ in range(2)]
    assert np.array_equal(results[0], results[1])
    assert cl("run", "--out", tmp_path / "si", "--strategy", "si:strength=1,damping=0.9,"
              "clip_value=1", *FAST) == 0
    assert cl("run", "--out", tmp_path / "bad", "--strategy", "si:damping=0", *FAST) == 2
    assert "damping must be positive" in capsys.readouterr().err


def test_it_follows_weights_that_lora_merge_renames():
    from cl.models import build_mlp
    from cl.strategy import Chain
    from strategies import LoRA, LoRAConfig

    stream = blob_stream(num_tasks=3)
    torch.manual_seed(0)
    model = build_mlp(stream.input_shape, stream.num_classes, (8, 8))
    si = SI(SIConfig(strength=1.0))
    result = run(model, stream, Chain(LoRA(LoRAConfig(rank=2, merge=True)), si),
                 TrainConfig(batch_size=4, epochs=1, lr=0.1))
    assert np.isfinite(result.accuracy).all()
    assert set(si.importance) == {name for name, _ in model.named_parameters()}
