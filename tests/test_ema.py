"""EMA: the averaging math, the warmup, the evaluation swap, buffers, state and a full run."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import blob_stream, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cl.runner import TrainConfig, run
from cl.spec import parse_config
from cl.strategy import Chain
from cl.types import Batch
from strategies.ema import EMA, EMAConfig, effective_decay

STREAM = blob_stream()
TASK0, TASK1 = STREAM.tasks
# after_step's batch and logits: EMA reads neither, but its hooks take only the real objects.
BATCH = Batch.of(TASK0.train.x[:4], TASK0.train.y[:4], TASK0)
LOGITS = torch.zeros(4, STREAM.num_classes)


def step(ema: EMA, model: nn.Module) -> None:
    """One after_step."""
    ema.after_step(model, BATCH, LOGITS, TASK0)


def shadow(ema: EMA) -> dict[str, torch.Tensor]:
    return ema.state_dict()["shadow"]


def set_weights(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)


def nudge(model: nn.Module, seed: int) -> None:
    """A deterministic stand-in for an optimizer step: add seeded noise to every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator,
                                       dtype=parameter.dtype))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_bitwise(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    assert current.keys() == saved.keys()
    for name, tensor in saved.items():
        assert torch.equal(current[name], tensor), name


@settings(max_examples=30, deadline=None)
@given(decay=st.floats(0.5, 0.999), k=st.integers(1, 50))
def test_shadow_follows_the_closed_form_for_a_constant_weight(decay, k):
    model = nn.Linear(3, 2, dtype=torch.float64)
    ema = EMA(EMAConfig(decay=decay))
    set_weights(model, -2.0)
    ema.before_run(model, STREAM, 0)
    set_weights(model, 5.0)
    for _ in range(k):
        step(ema, model)
    expected = decay**k * -2.0 + (1 - decay**k) * 5.0
    for tensor in shadow(ema).values():
        torch.testing.assert_close(tensor, torch.full_like(tensor, expected),
                                   rtol=1e-12, atol=1e-12)
    assert ema.state_dict()["updates"] == k


@settings(max_examples=30, deadline=None)
@given(decay=st.floats(0.0, 0.999), updates=st.integers(0, 10_000))
def test_effective_decay_is_the_warmup_minimum(decay, updates):
    assert effective_decay(decay, updates, warmup=False) == decay
    assert effective_decay(decay, updates, warmup=True) == min(decay,
                                                               (1 + updates) / (10 + updates))


@settings(max_examples=20, deadline=None)
@given(decay=st.floats(0.5, 0.999), k=st.integers(1, 40))
def test_shadow_follows_the_warmup_schedule(decay, k):
    model = nn.Linear(2, 2, dtype=torch.float64)
    ema = EMA(EMAConfig(decay=decay, warmup=True))
    set_weights(model, 1.0)
    ema.before_run(model, STREAM, 0)
    set_weights(model, 3.0)
    kept = 1.0  # the weight left on the starting value: the product of the decays so far
    for t in range(k):
        kept *= min(decay, (1 + t) / (10 + t))
        step(ema, model)
    for tensor in shadow(ema).values():
        torch.testing.assert_close(tensor, torch.full_like(tensor, kept * 1.0 + (1 - kept) * 3.0),
                                   rtol=1e-12, atol=1e-12)
    # The first update uses decay 0.1 whatever the configured decay, so warmup matters.
    assert kept < decay**k


def test_update_after_step_copies_then_averages_from_t_zero():
    model = nn.Linear(2, 2, dtype=torch.float64)
    ema = EMA(EMAConfig(decay=0.9, warmup=True, update_after_step=3))
    ema.before_run(model, STREAM, 0)
    for seed in range(3):
        nudge(model, seed)
        step(ema, model)
        for name, tensor in model.named_parameters():
            assert torch.equal(shadow(ema)[name], tensor)
    assert ema.state_dict()["updates"] == 0 and ema.state_dict()["steps"] == 3
    before = {name: tensor.clone() for name, tensor in shadow(ema).items()}
    nudge(model, 3)
    step(ema, model)
    decay = effective_decay(0.9, 0, warmup=True)  # 0.1: t restarts at the first average
    for name, tensor in model.named_parameters():
        torch.testing.assert_close(shadow(ema)[name],
                                   decay * before[name] + (1 - decay) * tensor.detach())


def trained_ema(model: nn.Module, config: EMAConfig, steps: int = 3) -> EMA:
    ema = EMA(config)
    ema.before_run(model, STREAM, 0)
    ema.before_task(model, TASK0)
    for seed in range(steps):
        nudge(model, seed)
        step(ema, model)
    return ema


def test_eval_context_swaps_in_the_shadow_and_restores_the_live_weights_bitwise():
    model = tiny_model(STREAM)
    ema = trained_ema(model, EMAConfig(decay=0.5))
    live = snapshot(model)
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(shadow(ema))
    x = TASK0.test.x
    assert not torch.equal(averaged(x), model(x))  # else the swap would go unnoticed
    with ema.eval_context(model, TASK0):
        assert torch.equal(model(x), averaged(x))
        # Nested entry (a second evaluation inside) must not overwrite the saved live weights.
        with ema.eval_context(model, TASK1):
            assert torch.equal(model(x), averaged(x))
    assert_bitwise(model, live)
    with pytest.raises(RuntimeError, match="inside"):
        with ema.eval_context(model, TASK0):
            raise RuntimeError("failure inside the evaluation")
    assert_bitwise(model, live)
    with ema.eval_context(model, TASK0), torch.inference_mode():  # as the runner nests them
        assert torch.equal(model(x), averaged(x))
    assert_bitwise(model, live)


def test_eval_before_any_training_sees_the_live_weights():
    model = tiny_model(STREAM)
    ema = EMA()
    ema.before_run(model, STREAM, 0)
    live = snapshot(model)
    with ema.eval_context(model, TASK0):
        assert_bitwise(model, live)


def test_eval_with_live_is_a_null_context():
    model = tiny_model(STREAM)
    ema = trained_ema(model, EMAConfig(decay=0.5, eval_with="live"))
    live = snapshot(model)
    with ema.eval_context(model, TASK0):
        assert_bitwise(model, live)
    assert ema.eval_variants() == ()


def test_batchnorm_float_buffers_are_averaged_and_counters_copied():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = EMA(EMAConfig(decay=0.75))
    ema.before_run(model, STREAM, 0)
    start = {name: tensor.clone() for name, tensor in shadow(ema).items()}
    model.train()
    model(torch.randn(8, 4, generator=torch.Generator().manual_seed(0)) * 3 + 1)
    step(ema, model)
    buffers = dict(model.named_buffers())
    for name in ("1.running_mean", "1.running_var"):
        assert not torch.equal(buffers[name], start[name])
        torch.testing.assert_close(shadow(ema)[name],
                                   0.75 * start[name] + 0.25 * buffers[name])
    counter = shadow(ema)["1.num_batches_tracked"]
    assert counter.dtype == torch.long and counter.item() == 1


def test_eval_with_both_records_the_live_variant():
    model = tiny_model(STREAM)
    ema = trained_ema(model, EMAConfig(decay=0.5, eval_with="both"))
    assert ema.eval_variants() == ("live",)
    live = snapshot(model)
    with ema.eval_variant("live"), ema.eval_context(model, TASK0):
        assert_bitwise(model, live)
    with ema.eval_variant("something-else"), ema.eval_context(model, TASK0):
        assert torch.equal(model[0].weight, shadow(ema)["0.weight"])
    with ema.eval_context(model, TASK0):  # outside the variant the shadow is back in charge
        assert torch.equal(model[0].weight, shadow(ema)["0.weight"])
    assert_bitwise(model, live)


@pytest.mark.parametrize("reset", [False, True])
def test_reset_restarts_the_shadow_at_each_task(reset):
    model = tiny_model(STREAM)
    ema = trained_ema(model, EMAConfig(decay=0.5, reset=reset))
    carried = {name: tensor.clone() for name, tensor in shadow(ema).items()}
    ema.before_task(model, TASK1)
    for name, tensor in model.named_parameters():
        assert torch.equal(shadow(ema)[name], tensor) == reset
        assert torch.equal(shadow(ema)[name], carried[name]) == (not reset)
    assert ema.state_dict()["updates"] == (0 if reset else 3)


@settings(max_examples=10, deadline=None)
@given(decay=st.floats(0.5, 0.999), warmup=st.booleans(), after=st.integers(0, 4))
def test_state_dict_round_trip_continues_bitwise(decay, warmup, after):
    config = EMAConfig(decay=decay, warmup=warmup, update_after_step=after)
    model = tiny_model(STREAM)
    ema = trained_ema(model, config, steps=3)
    buffer = io.BytesIO()
    torch.save({"ema": ema.state_dict(), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    fresh_model = tiny_model(STREAM, seed=1)  # same architecture, other weights
    resumed = EMA(config)
    resumed.before_run(fresh_model, STREAM, 0)
    resumed.load_state_dict(saved["ema"])
    fresh_model.load_state_dict(saved["model"])
    for strategy, net in ((ema, model), (resumed, fresh_model)):
        strategy.before_task(net, TASK1)
        for seed in range(10, 14):
            nudge(net, seed)
            step(strategy, net)
    assert resumed.state_dict()["updates"] == ema.state_dict()["updates"]
    assert resumed.state_dict()["steps"] == ema.state_dict()["steps"]
    assert shadow(resumed).keys() == shadow(ema).keys()
    for name, tensor in shadow(ema).items():
        assert torch.equal(shadow(resumed)[name], tensor), name


def test_load_state_dict_rejects_a_state_without_the_shadow():
    with pytest.raises(ValueError, match="shadow"):
        EMA().load_state_dict({"updates": 0, "steps": 0})


def test_parameters_added_between_tasks_are_shadowed_from_their_live_value():
    model = nn.Sequential(nn.Linear(6, 4))
    ema = trained_ema(model, EMAConfig(decay=0.5))
    model.add_module("adapter", nn.Linear(4, 4))
    nudge(model, 99)
    ema.before_task(model, TASK1)
    for name in ("adapter.weight", "adapter.bias"):
        assert torch.equal(shadow(ema)[name], dict(model.named_parameters())[name])
    old_shadow = shadow(ema)["0.weight"].clone()
    step(ema, model)  # the cached lists include the new tensors
    assert not torch.equal(shadow(ema)["0.weight"], old_shadow)
    del model.adapter
    ema.before_task(model, TASK1)
    assert set(shadow(ema)) == {"0.weight", "0.bias"}


def test_frozen_parameters_are_not_shadowed_but_stay_shadowed_once_they_were():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    ema = trained_ema(model, EMAConfig(decay=0.5))
    assert set(shadow(ema)) == {"1.weight", "1.bias"}
    assert ema.report()["shadowed_tensors"] == 2
    assert ema.report()["shadow_bytes"] == (4 * 2 + 2) * 4
    model[1].requires_grad_(False)
    ema.before_task(model, TASK1)
    assert set(shadow(ema)) == {"1.weight", "1.bias"}


@pytest.mark.parametrize(("key", "value"), [("decay", 1.5), ("decay", -0.1), ("decay", 1.0),
                                            ("update_after_step", -1), ("device", "nonsense")])
def test_bad_config_values_name_their_key(key, value):
    with pytest.raises(ValueError, match=key):
        EMAConfig(**{key: value})


def test_config_parses_from_cli_strings():
    config = parse_config(EMAConfig, {"decay": "0.99", "warmup": "yes", "device": "none",
                                      "eval_with": "both", "update_after_step": "5"}, "ema")
    assert config == EMAConfig(decay=0.99, warmup=True, device=None, eval_with="both",
                               update_after_step=5)
    assert "decay=0.99" in repr(EMA(config))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_shadow_on_cpu_beside_a_cuda_model():
    model = tiny_model(STREAM).cuda()
    ema = trained_ema(model, EMAConfig(decay=0.5, device="cpu"))
    reference = trained_ema(tiny_model(STREAM), EMAConfig(decay=0.5))
    for name, tensor in shadow(ema).items():
        assert tensor.device.type == "cpu"
        torch.testing.assert_close(tensor, shadow(reference)[name])
    live = snapshot(model)
    with ema.eval_context(model, TASK0):
        assert torch.equal(model[0].weight.cpu(), shadow(ema)["0.weight"])
    assert_bitwise(model, live)


def test_end_to_end_run_trains_like_naive_and_evaluates_the_shadow():
    config = TrainConfig(batch_size=4, epochs=1, lr=0.1)
    naive_model = tiny_model(STREAM)
    naive = run(naive_model, STREAM, None, config)
    model = tiny_model(STREAM)
    ema = EMA(EMAConfig(decay=0.9))
    result = run(model, STREAM, Chain(ema), config)
    assert result.accuracy.shape == (2, 2)
    assert ema.state_dict()["steps"] == result.steps == 8
    # EMA never changes training, and every evaluation put the live weights back bitwise.
    assert_bitwise(model, snapshot(naive_model))
    for name, tensor in model.named_parameters():
        assert not torch.equal(shadow(ema)[name], tensor), name
    live_only = run(tiny_model(STREAM), STREAM, EMA(EMAConfig(decay=0.9, eval_with="live")),
                    config)
    assert (live_only.accuracy == naive.accuracy).all()


def test_ema_before_lora_is_refused_since_it_would_not_shadow_the_adapters():
    from strategies import LoRA, LoRAConfig

    with pytest.raises(ValueError, match="ema must come after lora in the chain"):
        Chain(EMA(EMAConfig()), LoRA(LoRAConfig()))
    Chain(LoRA(LoRAConfig()), EMA(EMAConfig()))  # the documented order


def test_every_view_of_a_run_is_measured_at_the_same_points(tmp_path):
    # With decay 0 the shadow is the live weights after every step: both views must agree on
    # every figure, the curve-based ones (min-ACC, WC-ACC) included, task-IL as well.
    import numpy as np

    from cl import metrics as measures
    from cl.experiment import execute, make_config

    config = make_config({"epochs": 2, "eval_every": 1, "lr": 0.5,
                          "strategy": ["ema:decay=0,eval_with=both"]})
    _, metrics = execute(config, tmp_path / "run", checkpoint=False)
    live, curve = metrics["variants"]["live"], metrics["curve"]
    for key in ("acc", "bwt", "min_acc", "wc_acc", "forgetting"):
        assert live[key] == metrics[key], key
        assert live["task_il"][key] == metrics["task_il"][key], key
    # Task-IL min-ACC comes from the task-IL curve, like the class-IL one from its curve: here
    # it dips between task ends below anything the after-task rows show.
    ends = curve["task_end_steps"]
    assert len(curve["steps"]) > len(ends)
    task_il = metrics["task_il"]
    assert task_il["min_acc"] == measures.min_accuracy(curve["steps"], curve["task_accuracy"],
                                                       ends)
    assert task_il["min_acc"] < measures.min_accuracy(
        ends, np.array(task_il["accuracy_matrix"]), ends)
