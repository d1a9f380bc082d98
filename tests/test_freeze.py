"""Freeze: frozen parameters bitwise unchanged, depth and head selection, freeze-after, lr
multipliers, BatchNorm kept in eval mode, and bad settings."""

from __future__ import annotations

import pytest
import torch
from helpers import blob_stream
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cl.errors import UsageError
from cl.models import build_mlp
from cl.runner import TrainConfig, run
from cl.spec import parse_config
from strategies import Freeze, FreezeConfig

NAMES = ["body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias", "head.weight",
         "head.bias"]


def mlp(stream, seed=0):
    torch.manual_seed(seed)
    return build_mlp(stream.input_shape, stream.num_classes, (8, 8))


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@settings(max_examples=12, deadline=None)
@given(frozen=st.sets(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES) - 1))
def test_frozen_parameters_stay_bitwise_unchanged_and_the_rest_train(frozen):
    stream = blob_stream(num_tasks=2)
    model = mlp(stream)
    before = snapshot(model)
    config = TrainConfig(batch_size=4, epochs=1, lr=0.1, momentum=0.9, weight_decay=0.01)
    run(model, stream, Freeze(FreezeConfig(patterns=tuple(sorted(frozen)))), config)
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, before[name]), name
        else:
            assert not torch.equal(parameter, before[name]), name


def test_depth_freezes_the_first_layers_with_parameters():
    stream = blob_stream()
    model = mlp(stream)
    before = snapshot(model)
    run(model, stream, Freeze(FreezeConfig(depth=2)), TrainConfig(batch_size=4, epochs=1))
    unchanged = {n for n, p in model.named_parameters() if torch.equal(p, before[n])}
    assert unchanged == {"body.1.weight", "body.1.bias", "body.3.weight", "body.3.bias"}


def test_head_only_trains_the_head_alone():
    stream = blob_stream()
    model = mlp(stream)
    before = snapshot(model)
    run(model, stream, Freeze(FreezeConfig(head_only=True)), TrainConfig(batch_size=4, epochs=1))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"head.weight", "head.bias"}


def test_after_task_trains_everything_first_then_freezes():
    stream = blob_stream(num_tasks=3)
    model = mlp(stream)
    states = []

    class Spy(Freeze):
        def before_task(self, model, task):
            super().before_task(model, task)
            states.append(snapshot(model))

    run(model, stream, Spy(FreezeConfig(patterns=("body.*",), after_task=1)),
        TrainConfig(batch_size=4, epochs=1))
    # Task 0 moved the body; from task 1 on it is fixed.
    assert not torch.equal(states[0]["body.1.weight"], states[1]["body.1.weight"])
    assert torch.equal(states[1]["body.1.weight"], states[2]["body.1.weight"])
    assert torch.equal(states[2]["body.1.weight"], model.body[1].weight)


def test_lr_multipliers_split_groups_and_scale_the_rate():
    stream = blob_stream()
    model = mlp(stream)
    strategy = Freeze(FreezeConfig(lr_mult=("head.*=10", "body.3.*=0.5")))
    strategy.before_run(model, stream, 0)
    groups = strategy.param_groups(model, [{"params": list(model.parameters()), "lr": 0.01}])
    by_lr = {round(group["lr"], 6): len(group["params"]) for group in groups}
    assert by_lr == {0.1: 2, 0.005: 2, 0.01: 2}


def test_head_at_ten_times_moves_further_than_at_one():
    stream = blob_stream()
    steps = {}
    for factor in ("1", "10"):
        model = mlp(stream)
        start = model.head.weight.detach().clone()
        run(model, stream, Freeze(FreezeConfig(lr_mult=(f"head.*={factor}",))),
            TrainConfig(batch_size=4, epochs=1, lr=0.01))
        steps[factor] = (model.head.weight - start).norm().item()
    assert steps["10"] > 3 * steps["1"]


def test_bn_eval_keeps_frozen_batchnorm_statistics():
    stream = blob_stream()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    stats = model[1].running_mean.clone()
    run(model, stream, Freeze(FreezeConfig(patterns=("0.*", "1.*"), bn_eval=True)),
        TrainConfig(batch_size=4, epochs=1))
    assert torch.equal(model[1].running_mean, stats)
    assert not model[1].training and model[0].training  # only the frozen BatchNorm is in eval
    model2 = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    run(model2, stream, Freeze(FreezeConfig(patterns=("0.*", "1.*"))),
        TrainConfig(batch_size=4, epochs=1))
    assert not torch.equal(model2[1].running_mean, torch.zeros(8))


@pytest.mark.parametrize("params, word", [
    ({"depth": "-1"}, "depth"), ({"lr_mult": "head.*"}, "lr_mult"),
    ({"lr_mult": "head.*=x"}, "'x'"), ({"lr_mult": "head.*=-2"}, "positive"),
    ({"after_task": "-1"}, "after_task")])
def test_bad_settings_are_named(params, word):
    with pytest.raises(UsageError, match=word):
        parse_config(FreezeConfig, params, owner="strategy 'freeze'")


def test_freeze_without_settings_means_the_head_alone_in_the_cli_and_the_library():
    from_cli = parse_config(FreezeConfig, {}, owner="strategy 'freeze'")
    assert from_cli == Freeze().config == FreezeConfig(head_only=True)
    stream = blob_stream()
    model = mlp(stream)
    strategy = Freeze(from_cli)
    strategy.before_task(model, stream.tasks[0])
    assert {name for name, p in model.named_parameters() if p.requires_grad} == \
        {"head.weight", "head.bias"}


def test_a_pattern_matching_nothing_is_an_error_naming_it():
    stream = blob_stream()
    with pytest.raises(UsageError, match="'encoder.*'"):
        Freeze(FreezeConfig(patterns=("encoder.*",))).check(mlp(stream), stream, False)
