"""Online EWC: the Fisher against a row-by-row hand computation, the penalty (zero at the
anchor), the decayed running Fisher, and the CLI form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import blob_stream, tiny_model
from test_cli import FAST, cl

from cl.runner import TrainConfig, run
from cl.types import Split
from strategies import EWC, EWCConfig
from strategies.ewc import (
    ewc_penalty,
    fisher_diagonal,
    linear_fisher,
    linear_layers,
    per_row_fisher,
)


def fisher_by_hand(model, split, allowed=None):
    """p(y|x) * (d log p(y|x) / dw)^2, one row at a time with backward(), averaged."""
    total = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for row in range(len(split)):
        model.zero_grad()
        logits = model(split.x[row:row + 1])
        if allowed is not None:
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        log_p = F.log_softmax(logits, 1)[0, split.y[row]]
        log_p.backward()
        for name, p in model.named_parameters():
            if p.grad is not None:  # frozen: no gradient, and no Fisher either
                total[name] += log_p.exp().detach() * p.grad ** 2
    return {name: value / len(split) for name, value in total.items()}


def normed_model(stream):
    """A model with a trainable parameter outside linear layers (LayerNorm's): the per-row
    path."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(stream.input_shape[0], 16), torch.nn.LayerNorm(16),
                               torch.nn.ReLU(), torch.nn.Linear(16, stream.num_classes))


@pytest.mark.parametrize("scenario, chunk", [("class", 3), ("task", 100)])
@pytest.mark.parametrize("make, path", [(tiny_model, "linear"), (normed_model, "per row")])
def test_the_fisher_is_the_weighted_squared_gradient_of_each_row(scenario, chunk, make, path):
    stream = blob_stream(num_tasks=2, scenario=scenario)
    model = make(stream)
    assert (linear_layers(model) is not None) == (path == "linear")
    task = stream.tasks[1]
    allowed = stream.class_mask()[1] if scenario == "task" else None
    fisher = fisher_diagonal(model, task.train, allowed, chunk)
    expected = fisher_by_hand(model, task.train, allowed)
    assert set(fisher) == set(expected)
    assert all(torch.allclose(fisher[name], expected[name], atol=1e-7) for name in fisher)
    assert all((value >= 0).all() for value in fisher.values())
    if path == "linear":  # both paths give the same Fisher
        per_row = per_row_fisher(model, task.train, allowed, chunk)
        assert all(torch.allclose(fisher[name], per_row[name], atol=1e-7) for name in fisher)


def test_the_linear_path_leaves_frozen_layers_out_and_falls_back_for_a_reused_layer():
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    model[0].requires_grad_(False)
    fisher = fisher_diagonal(model, stream.tasks[0].train, None, 5)
    assert sorted(fisher) == ["2.bias", "2.weight"]
    expected = fisher_by_hand(model, stream.tasks[0].train)
    assert all(torch.allclose(fisher[name], expected[name], atol=1e-7) for name in fisher)

    class Twice(torch.nn.Module):  # one linear layer applied twice: per-row squares differ
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.layer(torch.relu(self.layer(x)))

    twice = Twice()
    rows = Split(torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1]))
    assert linear_fisher(twice, linear_layers(twice), rows, None, 4) is None
    fisher = fisher_diagonal(twice, rows, None, 4)
    expected = fisher_by_hand(twice, rows)
    assert all(torch.allclose(fisher[name], expected[name], atol=1e-7) for name in fisher)


def test_the_penalty_is_zero_at_the_anchor_and_the_weighted_squared_distance_elsewhere():
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    fisher = {name: torch.rand_like(p) for name, p in model.named_parameters()}
    anchor = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert float(ewc_penalty(model, fisher, anchor).detach()) == 0.0
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    expected = sum(float((fisher[name] * 0.25).sum()) for name in fisher)
    assert abs(float(ewc_penalty(model, fisher, anchor).detach()) - expected) < 1e-4


def test_the_running_fisher_decays_by_gamma_and_anchors_on_the_last_task():
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    ewc = EWC(EWCConfig(strength=2.0, gamma=0.5))
    ewc.before_run(model, stream, 0)
    batch_x = stream.tasks[0].train.x[:2]
    from cl.types import Batch

    batch = Batch.of(batch_x, stream.tasks[0].train.y[:2], 0)
    assert ewc.loss_terms(model, batch, model(batch_x), stream.tasks[0]) == {}
    ewc.after_task(model, stream.tasks[0])
    first = {name: value.clone() for name, value in ewc.fisher.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    second = fisher_diagonal(model, stream.tasks[1].train, None, 256)
    ewc.after_task(model, stream.tasks[1])
    assert all(torch.allclose(ewc.fisher[name], 0.5 * first[name] + second[name], atol=1e-7)
               for name in first)
    assert all(torch.equal(ewc.anchor[name], p) for name, p in model.named_parameters())
    terms = ewc.loss_terms(model, batch, model(batch_x), stream.tasks[1])
    assert float(terms["penalty"].detach()) == 0.0  # at the anchor


@pytest.mark.parametrize("settings, message", [
    ({"strength": -1.0}, "strength must be a non-negative number"),
    ({"gamma": 1.5}, "gamma must be at most 1"),
    ({"chunk": 0}, "chunk must be a positive integer"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        EWCConfig(**settings)


def test_same_seed_same_matrix_and_the_cli_form(tmp_path, capsys):
    stream = blob_stream(num_tasks=3)
    config = TrainConfig(batch_size=4, epochs=1, lr=0.1)
    results = [run(tiny_model(stream), stream, EWC(EWCConfig(strength=5.0)), config).accuracy
               for _ in range(2)]
    assert np.array_equal(results[0], results[1])
    assert cl("run", "--out", tmp_path / "ewc", "--strategy", "ewc:strength=10,gamma=0.9",
              *FAST) == 0
    assert cl("run", "--out", tmp_path / "bad", "--strategy", "ewc:gamma=2", *FAST) == 2
    assert "gamma must be at most 1" in capsys.readouterr().err


def test_compositions_ewc_cannot_be_in_and_text_inputs_are_refused_before_training():
    from cl.errors import UsageError
    from cl.strategy import Chain
    from cl.types import Stream, Task
    from strategies import DER, Distill, DistillConfig, LoRA, LoRAConfig

    with pytest.raises(ValueError, match="ewc must come after lora"):
        Chain(EWC(), LoRA(LoRAConfig(rank=2)))
    Chain(LoRA(LoRAConfig(rank=2)), EWC())  # adapters first: EWC anchors what they made
    with pytest.raises(ValueError, match="distill:on=features must come before der"):
        Chain(DER(), Distill(DistillConfig(on="features", teacher="initial")))
    tokens = {"input_ids": torch.ones(4, 3, dtype=torch.long),
              "attention_mask": torch.ones(4, 3, dtype=torch.long)}
    text = Stream.from_tasks([Task.from_tensors(tokens, torch.tensor([0, 1, 0, 1]))])
    with pytest.raises(UsageError, match="ewc computes its Fisher from tensor inputs"):
        EWC().check(torch.nn.Linear(3, 2), text, False)


def test_a_checkpoint_loads_where_the_model_is():
    """Checkpoints load on the CPU; the Fisher and anchor go to the model's device (meta here,
    a device with no memory, standing for a GPU)."""
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    ewc = EWC()
    ewc.before_run(model, stream, 0)
    ewc.after_task(model, stream.tasks[0])
    state = ewc.state_dict()
    elsewhere = EWC()
    elsewhere.before_run(tiny_model(stream).to("meta"), stream, 0)
    elsewhere.load_state_dict(state)
    assert all(t.device.type == "meta" for t in [*elsewhere.fisher.values(),
                                                 *elsewhere.anchor.values()])
    empty = EWC()
    empty.before_run(model, stream, 0)
    empty.load_state_dict({})  # a checkpoint of a strategy that had nothing yet
    assert empty.fisher is None
