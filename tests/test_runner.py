"""The runner: exact hook order, Chain composition, masking per scenario, determinism, NaN stops."""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import pytest
import torch
from helpers import blob_stream, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from cl.errors import DivergenceError
from cl.runner import TrainConfig, run
from cl.strategy import Chain, Strategy


class Recorder(Strategy):
    """Records every hook call as (strategy name, hook, task index)."""

    adjusts_gradients = True  # so that the runner calls adjust_gradients

    def __init__(self, name: str, calls: list) -> None:
        self.name = name
        self.calls = calls

    def before_run(self, model, stream, seed):
        self.calls.append((self.name, "before_run", None))

    def before_task(self, model, task):
        self.calls.append((self.name, "before_task", task.index))

    def param_groups(self, model, groups):
        self.calls.append((self.name, "param_groups", None))
        return groups

    def transform_batch(self, batch, task):
        self.calls.append((self.name, "transform_batch", task.index))
        return batch

    def cross_entropy_mask(self, batch, task):
        self.calls.append((self.name, "cross_entropy_mask", task.index))
        return None

    def loss_terms(self, model, batch, logits, task):
        self.calls.append((self.name, "loss_terms", task.index))
        return {"zero": logits.sum() * 0.0}

    def adjust_gradients(self, model, batch, task, gradients):
        # Between backward (every parameter has its gradient) and the step (not yet taken).
        assert set(gradients) == {name for name, _ in model.named_parameters()}
        self.calls.append((self.name, "adjust_gradients", task.index))
        return gradients

    def after_step(self, model, batch, logits, task):
        self.calls.append((self.name, "after_step", task.index))

    def after_task(self, model, task):
        self.calls.append((self.name, "after_task", task.index))

    @contextlib.contextmanager
    def eval_context(self, model, task):
        self.calls.append((self.name, "eval_enter", task.index))
        yield
        self.calls.append((self.name, "eval_exit", task.index))


def two_by_two():
    """2 tasks of 4 training rows; batch 2 and 1 epoch give exactly 2 steps per task."""
    stream = blob_stream(num_tasks=2, classes_per_task=2, train_per_class=2, test_per_class=2)
    return stream, tiny_model(stream), TrainConfig(batch_size=2, epochs=1, lr=0.1)


def test_exact_hook_order():
    stream, model, config = two_by_two()
    calls: list = []
    run(model, stream, Recorder("rec", calls), config)
    hooks = [(hook, task) for _, hook, task in calls]
    evaluate_all = [("eval_enter", 0), ("eval_exit", 0), ("eval_enter", 1), ("eval_exit", 1)]
    step = lambda t: [("transform_batch", t), ("cross_entropy_mask", t),  # noqa: E731
                      ("loss_terms", t), ("adjust_gradients", t), ("after_step", t)]
    expected = [("before_run", None), *evaluate_all]
    for t in (0, 1):
        expected += [("before_task", t), ("param_groups", None), *step(t), *step(t),
                     ("after_task", t), *evaluate_all]
    assert hooks == expected


def test_chain_runs_hooks_in_written_order_and_nests_eval_contexts():
    stream, model, config = two_by_two()
    calls: list = []
    run(model, stream, Chain(Recorder("a", calls), Recorder("b", calls)), config)
    # Every hook runs a then b, except eval exits, which unwind b then a (nested contexts).
    assert calls[:3] == [("a", "before_run", None), ("b", "before_run", None),
                         ("a", "eval_enter", 0)]
    assert calls[3:6] == [("b", "eval_enter", 0), ("b", "eval_exit", 0), ("a", "eval_exit", 0)]
    per_step = ("transform_batch", "cross_entropy_mask", "loss_terms", "adjust_gradients",
                "after_step")
    first_step = [c for c in calls if c[1] in per_step][:10]
    assert first_step == [(name, hook, 0) for hook in per_step for name in ("a", "b")]


def test_chain_merges_loss_terms_under_names_and_rejects_duplicates():
    stream, model, _ = two_by_two()
    chain = Chain(Recorder("a", []), Recorder("b", []))
    task = stream.tasks[0]
    logits = model(task.train.x)
    assert sorted(chain.loss_terms(model, None, logits, task)) == ["a/zero", "b/zero"]
    with pytest.raises(ValueError, match="'a' appears more than once"):
        Chain(Recorder("a", []), Recorder("a", []))


class Scaled(Strategy):
    """Adds `weight * sum of squared head weights` and halves the head's learning rate."""

    name = "scaled"

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def loss_terms(self, model, batch, logits, task):
        return {"l2": self.weight * model[2].weight.pow(2).sum()}


class HeadLrZero(Strategy):
    name = "head_lr_zero"

    def param_groups(self, model, groups):
        head = {id(p) for p in model[2].parameters()}
        rest = [p for g in groups for p in g["params"] if id(p) not in head]
        return [{"params": rest}, {"params": list(model[2].parameters()), "lr": 0.0}]


def test_chain_equals_the_strategies_applied_by_hand():
    """A Chain of two strategies trains exactly like one strategy doing both things."""

    class ByHand(Strategy):
        name = "by_hand"
        loss_terms = Scaled.loss_terms
        param_groups = HeadLrZero.param_groups

        def __init__(self):
            self.weight = 0.5

    stream, _, config = two_by_two()
    chained, by_hand = tiny_model(stream), tiny_model(stream)
    result_chain = run(chained, stream, Chain(Scaled(0.5), HeadLrZero()), config)
    result_hand = run(by_hand, stream, ByHand(), config)
    np.testing.assert_array_equal(result_chain.accuracy, result_hand.accuracy)
    for p, q in zip(chained.parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(p, q)


def test_param_groups_and_loss_terms_take_effect():
    stream, model, config = two_by_two()
    head_before = [p.detach().clone() for p in model[2].parameters()]
    first_before = model[0].weight.detach().clone()
    run(model, stream, HeadLrZero(), config)
    for before, after in zip(head_before, model[2].parameters(), strict=True):
        assert torch.equal(before, after)  # lr 0 group: bitwise unchanged
    assert not torch.equal(first_before, model[0].weight)

    plain, penalised = tiny_model(stream), tiny_model(stream)
    run(plain, stream, None, config)
    run(penalised, stream, Scaled(1.0), config)  # each step shrinks the head by 20%
    assert penalised[2].weight.norm() < plain[2].weight.norm()


def test_task_scenario_masks_training_to_the_task_classes():
    """In task-IL, a row's loss never reaches the logits of other tasks' classes."""
    stream = blob_stream(num_tasks=2, scenario="task")
    model = tiny_model(stream)
    head_before = model[2].weight.detach().clone()
    one_task = type(stream)(stream.name, stream.tasks[:1], "task", stream.num_classes,
                            stream.input_shape)
    run(model, one_task, None, TrainConfig(batch_size=4, lr=0.1))
    # Classes 2 and 3 belong to task 1 only: their head rows got no gradient from task 0.
    assert torch.equal(model[2].weight[2:], head_before[2:])
    assert not torch.equal(model[2].weight[:2], head_before[:2])


def test_task_scenario_masks_evaluation_and_class_scenario_reports_task_il():
    stream = blob_stream(num_tasks=2, scenario="class")
    model = tiny_model(stream)
    with torch.no_grad():  # a head that always prefers class 3 (task 1)
        model[2].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1e4]))
    config = TrainConfig(lr=1e-9, batch_size=64)  # training leaves the bias as it is
    class_il = run(model, stream, None, config)
    # Unmasked, task 0 is never right; masked to its classes the bias is irrelevant.
    assert class_il.accuracy[0, 0] == 0.0
    assert class_il.task_accuracy is not None and class_il.task_accuracy[0, 0] > 0.5
    task_stream = type(stream)(stream.name, stream.tasks, "task", stream.num_classes,
                               stream.input_shape)
    task_il = run(model, task_stream, None, config)
    assert task_il.accuracy[0, 0] > 0.5
    assert task_il.task_accuracy is None


def test_same_seed_same_matrix_bit_for_bit_and_other_seed_differs():
    stream = blob_stream(num_tasks=3, train_per_class=16)
    config = TrainConfig(batch_size=4, epochs=2, lr=0.05, eval_every=3)
    first = run(tiny_model(stream), stream, None, config)
    second = run(tiny_model(stream), stream, None, config)
    assert np.array_equal(first.accuracy, second.accuracy)
    assert np.array_equal(first.curve_accuracy, second.curve_accuracy, equal_nan=True)
    assert [e for e in first.events] == [e for e in second.events]
    other = run(tiny_model(stream), stream, None, TrainConfig(batch_size=4, epochs=2, lr=0.05,
                                                              eval_every=3, seed=1))
    assert [e["loss"] for e in other.events if e["event"] == "loss"] != \
        [e["loss"] for e in first.events if e["event"] == "loss"]


def test_run_leaves_the_global_rng_alone():
    stream = blob_stream()
    state = torch.get_rng_state()
    run(tiny_model(stream), stream, None, TrainConfig())
    assert torch.equal(state, torch.get_rng_state())


def test_matrix_shapes_curve_and_initial_row():
    stream = blob_stream(num_tasks=3, train_per_class=8)
    result = run(tiny_model(stream), stream, None, TrainConfig(batch_size=4, eval_every=2))
    assert result.accuracy.shape == (3, 3)
    assert result.initial_accuracy.shape == (3,)
    # 16 rows per task, batch 4: 4 steps a task; evaluations at steps 2, 4 (end), 6, 8, ...;
    # a continual evaluation that falls on a task's end is the full one, not a second one.
    assert result.task_end_steps == [4, 8, 12]
    assert result.steps == 12
    assert list(result.curve_steps) == [2, 4, 6, 8, 10, 12]
    # During task 0 only task 0 is evaluated; the end-of-task rows cover every task.
    assert np.isnan(result.curve_accuracy[0, 1]) and not np.isnan(result.curve_accuracy[0, 0])
    assert not np.isnan(result.curve_accuracy[1]).any()
    np.testing.assert_array_equal(result.curve_accuracy[[1, 3, 5]], result.accuracy)
    assert len(result.final_predictions) == 3
    assert all(0 <= a <= 1 for a in result.accuracy.ravel())


def test_joint_training_is_one_phase_over_all_tasks():
    stream = blob_stream(num_tasks=3)
    config = TrainConfig(joint=True, batch_size=4, epochs=3, lr=0.1)
    result = run(tiny_model(stream), stream, None, config)
    assert result.accuracy.shape == (1, 3)
    assert result.steps == 3 * 12  # 3 tasks of 16 rows, batch 4, 3 epochs
    assert result.accuracy.min() > 0.5  # blobs are easy once all classes are seen together


class NanLoss(Strategy):
    name = "nan"

    def __init__(self, at_step: int) -> None:
        self.at_step, self.seen = at_step, 0

    def loss_terms(self, model, batch, logits, task):
        self.seen += 1
        return {"bad": torch.tensor(float("nan") if self.seen == self.at_step else 0.0)}


def test_nan_loss_stops_naming_task_and_step():
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    # 16 rows, batch 4: 4 steps per task, so the 6th step is step 2 of task 1.
    with pytest.raises(DivergenceError, match=r"loss is nan on task 1 \(t1\) at step 2 of "
                       r"that task \(epoch 1\); the strategy term 'bad' is nan: check its "
                       r"settings$"):
        run(model, stream, NanLoss(at_step=6), TrainConfig(batch_size=4))


def test_a_nan_loss_names_its_cause_the_data_or_the_learning_rate():
    # The advice must point where the fault is: a lower --lr cannot mend NaN inputs.
    stream = blob_stream(num_tasks=2)
    poisoned = stream.tasks[1].train.x.clone()
    poisoned[3, 0] = float("nan")
    tasks = list(stream.tasks)
    tasks[1] = dataclasses.replace(tasks[1], train=dataclasses.replace(tasks[1].train,
                                                                         x=poisoned))
    with pytest.raises(DivergenceError, match="inputs hold NaN or infinite values: check the "
                                              "data$"):
        run(tiny_model(stream), dataclasses.replace(stream, tasks=tuple(tasks)), None,
            TrainConfig(batch_size=16))
    with pytest.raises(DivergenceError, match="diverged: try a lower --lr$"):
        run(tiny_model(stream), stream, None, TrainConfig(batch_size=4, lr=1e30))


def test_strategy_state_round_trips_through_chain():
    chain = Chain(Recorder("a", []), Recorder("b", []))
    assert chain.state_dict() == {"a": {}, "b": {}}
    chain.load_state_dict({"a": {}})
    with pytest.raises(ValueError, match="not in the chain: zzz"):
        chain.load_state_dict({"zzz": {}})


def test_torchs_one_time_optimizer_import_is_paid_before_the_timed_training():
    # The first optimizer of a process imports torch._dynamo (about 1.3 s); inside task 0's
    # train_seconds it made the reported training time of short runs misleading. Checked in a
    # fresh process (this one imported it long ago): it is loaded before the first task starts.
    code = """
import sys
from helpers import blob_stream, tiny_model
from cl.runner import TrainConfig, run
from cl.strategy import Strategy

class Probe(Strategy):
    name = "probe"
    def __init__(self):
        self.loaded = []
    def before_task(self, model, task):
        self.loaded.append("torch._dynamo" in sys.modules)

probe = Probe()
stream = blob_stream(num_tasks=2)
run(tiny_model(stream), stream, probe, TrainConfig(batch_size=4))
print(probe.loaded)
"""
    import os
    import subprocess
    import sys

    tests = os.path.dirname(__file__)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": tests}, cwd=tests)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[True, True]"


# ---- what is evaluated, the loss window, precision -----------------------------------------

def test_eval_on_seen_and_final_leave_the_rest_of_R_unevaluated():
    """`seen` evaluates the tasks trained so far after each task (nothing before training);
    `final` evaluates every task once, after the last. What they do evaluate equals the full
    run's R bit for bit: evaluating never changes the training."""
    stream = blob_stream(num_tasks=3)
    results = {}
    for eval_on in ("all", "seen", "final"):
        config = TrainConfig(batch_size=4, epochs=1, lr=0.1, eval_on=eval_on)
        results[eval_on] = run(tiny_model(stream), stream, config=config)
    full, seen, final = results["all"].accuracy, results["seen"].accuracy, results["final"].accuracy
    lower = np.tril(np.ones((3, 3), dtype=bool))
    assert np.array_equal(seen[lower], full[lower]) and np.isnan(seen[~lower]).all()
    assert np.isnan(final[:2]).all() and np.array_equal(final[2], full[2])
    for result in (results["seen"], results["final"]):
        assert np.isnan(result.initial_accuracy).all()
        assert len(result.final_predictions) == 3  # the confusion matrix still covers them all
    tests = sum(len(task.test) for task in stream.tasks)
    assert results["all"].eval_rows == 4 * tests
    assert results["final"].eval_rows == tests
    assert results["seen"].eval_rows == sum(len(task.test) for i in range(3)
                                            for task in stream.tasks[:i + 1])


def test_an_unknown_eval_on_or_precision_is_a_usage_error():
    from cl.errors import UsageError

    with pytest.raises(UsageError, match="unknown eval_on 'some'"):
        TrainConfig(eval_on="some")
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(UsageError, match="eval_tokens must be positive"):
        TrainConfig(eval_tokens=0)


@settings(max_examples=50, deadline=None)
@given(losses=st.lists(st.floats(0, 1e6, width=32), min_size=1, max_size=30),
       terms=st.lists(st.floats(-10, 10, width=32), min_size=1, max_size=30))
def test_the_loss_window_means_what_reading_every_step_would(losses, terms):
    """The window adds on the device what the runner used to add as Python floats, one read
    at its end: the logged means are the same to the bit."""
    from cl.runner import LossWindow

    window = LossWindow(torch.device("cpu"))
    expected_loss, expected_term = 0.0, 0.0
    for step, (loss, term) in enumerate(zip(losses, terms, strict=False), start=1):
        loss_tensor = torch.tensor(loss, dtype=torch.float32)
        term_tensor = torch.tensor(term, dtype=torch.float32)
        window.add(step, loss_tensor, {"distill": term_tensor})
        expected_loss += loss_tensor.item()
        expected_term += term_tensor.item()
    means = window.means()
    steps = min(len(losses), len(terms))
    assert means == {"loss": expected_loss / steps, "distill": expected_term / steps}
    window.reset()
    assert window.steps == 0 and not window.sums


def test_a_non_finite_window_names_its_steps_and_stops_the_run():
    """On an accelerator the loss is read once a window: a NaN found then names the window's
    steps and where to look (checked here on the CPU by closing a window by hand)."""
    from cl.runner import LossWindow, Progress, close_window

    stream = blob_stream(num_tasks=1)
    window = LossWindow(torch.device("cpu"))
    for step in range(1, 6):
        window.add(step, torch.tensor(float("nan") if step == 4 else 1.0), {})
    progress = Progress(("main",), None)
    with pytest.raises(DivergenceError, match=r"loss is nan on task 0 .* within steps 1-5 of "
                                              r"that task \(read once every 5 steps on cuda\)"):
        close_window(progress, window, stream.tasks[0], 5, 0, torch.device("cuda"))
    assert progress.state["events"] == []  # nothing logged from the bad window


def test_bf16_autocast_trains_on_the_cpu_and_fp32_is_unchanged():
    """bf16 runs the forward passes and losses in bfloat16 (a different R from fp32, still
    learning); fp32 is what a run without the setting gives."""
    stream = blob_stream(num_tasks=2, train_per_class=16)
    config = TrainConfig(batch_size=4, epochs=2, lr=0.1)
    default = run(tiny_model(stream), stream, config=config).accuracy
    fp32 = run(tiny_model(stream), stream, config=dataclasses.replace(
        config, precision="fp32")).accuracy
    bf16 = run(tiny_model(stream), stream, config=dataclasses.replace(
        config, precision="bf16")).accuracy
    assert np.array_equal(default, fp32)
    assert np.isfinite(bf16).all() and bf16[0, 0] > 0.5


def test_the_loss_window_takes_any_one_element_term():
    """A strategy's term of shape (1,) was fine for `.item()`; the window takes it too."""
    from cl.runner import LossWindow

    window = LossWindow(torch.device("cpu"))
    window.add(1, torch.tensor(2.0), {"extra": torch.tensor([0.5])})
    window.add(2, torch.tensor(4.0), {"extra": torch.tensor([1.5])})
    assert window.means() == {"loss": 3.0, "extra": 1.0}


def test_replay_keeps_float32_targets_under_bf16():
    """DER targets recorded from a bfloat16 forward pass are stored as float32, as with
    targets recorded at a task's end outside autocast."""
    from strategies.replay import Replay, ReplayConfig

    stream = blob_stream(num_tasks=2)
    replay = Replay(ReplayConfig(capacity=8, store_logits=True))
    run(tiny_model(stream), stream, replay,
        TrainConfig(batch_size=4, epochs=1, lr=0.1, precision="bf16"))
    assert replay.buffer.logits.dtype == torch.float32
    assert torch.isfinite(replay.buffer.logits[:len(replay.buffer)]).all()


class Mask(Strategy):
    """Lets the cross-entropy see only the classes in `allowed` (every row alike)."""

    name = "mask"

    def __init__(self, allowed: list[int], num_classes: int) -> None:
        self.allowed = torch.zeros(num_classes, dtype=torch.bool)
        self.allowed[allowed] = True

    def cross_entropy_mask(self, batch, task):
        return self.allowed.expand(len(batch), -1)


class Halve(Strategy):
    """Halves every gradient before the step."""

    name = "halve"
    adjusts_gradients = True

    def adjust_gradients(self, model, batch, task, gradients):
        return {name: gradient / 2 for name, gradient in gradients.items()}


def test_a_cross_entropy_mask_trains_like_the_masked_loss_by_hand():
    """Masking the logits in the runner is training on masked logits: the task scenario's
    masking of a class stream, written by hand, gives the same weights."""
    stream, _, config = two_by_two()
    masked, by_task = tiny_model(stream), tiny_model(stream)
    classes = list(stream.tasks[0].classes) + list(stream.tasks[1].classes)
    # Every class allowed by the mask: the same as no mask at all, bit for bit.
    run(masked, stream, Mask(classes, stream.num_classes), config)
    run(by_task, stream, Strategy(), config)
    for p, q in zip(masked.parameters(), by_task.parameters(), strict=True):
        assert torch.equal(p, q)
    # Only task 0's classes: task 1's rows (labels outside the mask) give an infinite loss.
    with pytest.raises(DivergenceError, match="on task 1"):
        run(tiny_model(stream), stream, Mask(list(stream.tasks[0].classes),
                                             stream.num_classes), config)


def test_adjusted_gradients_are_what_the_optimizer_applies():
    """Halving the gradients under plain SGD is halving the learning rate."""
    stream, _, config = two_by_two()
    halved, slower = tiny_model(stream), tiny_model(stream)
    run(halved, stream, Halve(), config)
    run(slower, stream, Strategy(), TrainConfig(batch_size=2, epochs=1, lr=0.05))
    for p, q in zip(halved.parameters(), slower.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-7)


def test_adjusted_gradients_must_name_every_parameter_with_a_gradient():
    class Drops(Strategy):
        name = "drops"
        adjusts_gradients = True

        def adjust_gradients(self, model, batch, task, gradients):
            return dict(list(gradients.items())[1:])

    stream, model, config = two_by_two()
    with pytest.raises(ValueError, match="returned no gradient for"):
        run(model, stream, Drops(), config)
