"""cl's strategies as a library inside one's own training loop: the README's example runs as
written and does what it says, the one-call constructors build valid objects from plain tensors,
and a hook given anything but the objects its signature names fails with a clear TypeError."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import blob_stream, tiny_model

from cl.types import Batch, Split, Stream, Task
from strategies import EMA, Distill, DistillConfig, EMAConfig, Replay, ReplayConfig

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- example: own-loop"


def readme_example() -> str:
    """The python block that follows the README's own-loop marker."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(re.escape(MARKER) + r"[^\n]*\n```python\n(.*?)```", readme, re.S)
    assert found, "README.md has no python block after the own-loop marker"
    return found.group(1)


@pytest.fixture(scope="module")
def example() -> dict:
    """The namespace the README's example leaves behind, run once for the tests below; the
    global RNG it seeds is the test process's own again afterwards."""
    namespace: dict = {"__name__": "readme_example"}
    with torch.random.fork_rng(devices=[]):
        exec(compile(readme_example(), "README.md:own-loop", "exec"), namespace)
    return namespace


def test_the_example_is_a_short_loop_over_plain_tensors():
    code = readme_example()
    assert "Task.from_tensors(" in code and "Stream.from_tasks(" in code and "Batch.of(" in code
    assert "None" not in code  # every hook gets the real objects
    assert len(code.splitlines()) <= 45


def test_the_example_replays_rows_of_earlier_tasks(example):
    replay, batch, stream = example["replay"], example["batch"], example["stream"]
    assert len(replay.buffer) == replay.config.capacity == 60
    # Rows of every task are offered online, so all three are in the buffer at the end.
    assert set(replay.buffer.task[:len(replay.buffer)].tolist()) == {0, 1, 2}
    # The last batch of the last task: its fresh rows, then as many replayed ones.
    fresh = int((~batch.replayed).sum())
    assert fresh > 0 and int(batch.replayed.sum()) == fresh
    assert bool((batch.task[~batch.replayed] == stream.tasks[-1].index).all())
    assert torch.equal(batch.replayed, torch.arange(len(batch)) >= fresh)


def test_the_example_distils_after_the_first_task(example):
    terms, distill = example["terms"], example["distill"]
    assert list(terms) == ["distill/kl"]  # the last step of the last task
    kl = terms["distill/kl"].item()
    assert math.isfinite(kl) and kl > 0
    assert distill.seen_tasks == 3 and distill.teacher is not None


def test_the_example_evaluates_with_the_ema_and_keeps_the_live_weights(example):
    model, ema, strategy, stream = (example["model"], example["ema"], example["strategy"],
                                    example["stream"])
    live = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    shadow = ema.state_dict()["shadow"]
    assert set(shadow) == set(live)
    assert any(not torch.equal(shadow[name], live[name]) for name in live)
    averaged = copy.deepcopy(model)
    averaged.load_state_dict(shadow)
    x = stream.tasks[0].test.x
    with torch.no_grad():
        live_logits = model(x)
        with strategy.eval_context(model, stream.tasks[0]):
            inside = model(x)
        after = model(x)
        expected = averaged(x)
    assert torch.equal(inside, expected) and not torch.equal(inside, live_logits)
    assert torch.equal(after, live_logits)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in live.items())


def test_the_example_fills_the_lower_triangle_of_its_accuracy_matrix(example):
    accuracy = example["accuracy"]
    seen = torch.ones(3, 3).tril().bool()
    assert bool(accuracy[~seen].isnan().all())
    assert bool(((accuracy[seen] >= 0) & (accuracy[seen] <= 1)).all())
    assert accuracy[0, 0] > 0.8  # it learned the first task


# -- the constructors ---------------------------------------------------------------------------

def test_task_from_tensors_infers_classes_and_stores_int64_labels():
    x = torch.randn(6, 3)
    task = Task.from_tensors(x, torch.tensor([5, 2, 5, 2, 2, 5], dtype=torch.int32),
                             x[:2], torch.tensor([7, 2]), index=1)
    assert task.classes == (2, 5, 7) and task.index == 1 and task.name == "task 1"
    assert task.train.y.dtype == torch.int64 and task.test.y.dtype == torch.int64
    assert task.train.x is x and len(task.test) == 2


def test_task_from_tensors_without_test_tensors_has_an_empty_test_split():
    task = Task.from_tensors(torch.randn(4, 2, 3), torch.tensor([0, 1, 0, 1]), name="mine")
    assert len(task.test) == 0 and task.test.x.shape == (0, 2, 3) and task.name == "mine"


def test_task_from_tensors_takes_dict_inputs():
    ids = torch.randint(0, 9, (4, 5))
    task = Task.from_tensors({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                             torch.tensor([0, 1, 1, 0]))
    assert set(task.test.x) == {"input_ids", "attention_mask"} and len(task.test) == 0
    assert Stream.from_tasks([task]).input_shape == (5,)


def test_task_from_tensors_checks_what_it_is_given():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match=r"labels \[1\] are not among its classes \(0, 2\)"):
        Task.from_tensors(x, y, classes=[0, 2])
    with pytest.raises(ValueError, match="both x_test and y_test"):
        Task.from_tensors(x, y, x_test=x)
    with pytest.raises(TypeError, match="torch.from_numpy"):
        Task.from_tensors(np.zeros((4, 3)), y)
    with pytest.raises(TypeError, match="y_train must be a 1-D integer tensor"):
        Task.from_tensors(x, y.float())
    with pytest.raises(ValueError, match="x has 4 rows but y has 3"):
        Task.from_tensors(x, y[:3])


def test_task_validates_its_fields():
    split = Split(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="non-empty tuple"):
        Task("t", 0, split, split, [0, 1])
    with pytest.raises(ValueError, match="repeat"):
        Task("t", 0, split, split, (1, 1))
    with pytest.raises(ValueError, match="index must be a non-negative integer"):
        Task("t", -1, split, split, (0, 1))
    with pytest.raises(TypeError, match="train must be a cl.types.Split"):
        Task("t", 0, (split.x, split.y), split, (0, 1))


def test_stream_from_tasks_infers_the_head_and_the_input_shape():
    tasks = [Task.from_tensors(torch.randn(4, 2, 3), torch.tensor([2 * t, 2 * t + 1] * 2),
                               index=t) for t in range(3)]
    stream = Stream.from_tasks(tasks)
    assert stream.num_classes == 6 and stream.input_shape == (2, 3)
    assert stream.scenario == "class" and stream.tasks == tuple(tasks)
    assert stream.class_mask().sum(1).tolist() == [2, 2, 2]
    wide = Stream.from_tasks(tasks, scenario="task", num_classes=10, name="mine")
    assert (wide.num_classes, wide.scenario, wide.name) == (10, "task", "mine")
    with pytest.raises(ValueError, match="uses class 5 >= num_classes 4"):
        Stream.from_tasks(tasks, num_classes=4)


def test_stream_from_tasks_checks_the_order_and_the_items():
    first = Task.from_tensors(torch.randn(2, 3), torch.tensor([0, 1]))
    second = Task.from_tensors(torch.randn(2, 3), torch.tensor([2, 3]))  # index 0 left as is
    with pytest.raises(ValueError, match="has index 0, expected 1"):
        Stream.from_tasks([first, second])
    with pytest.raises(TypeError, match="Task.from_tensors"):
        Stream.from_tasks([])
    with pytest.raises(TypeError, match="Task.from_tensors"):
        Stream.from_tasks([(torch.randn(2, 3), torch.tensor([0, 1]))])


def test_batch_of_marks_every_row_with_its_task():
    stream = blob_stream(num_tasks=2)
    x, y = torch.randn(3, 6), torch.tensor([2, 3, 2], dtype=torch.int16)
    for task in (stream.tasks[1], 1):
        batch = Batch.of(x, y, task)
        assert batch.task.tolist() == [1, 1, 1] and batch.y.dtype == torch.int64
        assert batch.replayed is None and batch.fresh().all()
    assert Batch.of(x, y, torch.tensor([0, 1, 1])).task.tolist() == [0, 1, 1]
    with pytest.raises(TypeError, match="Batch.of: task must be"):
        Batch.of(x, y, "t1")
    with pytest.raises(TypeError, match="Batch.of: y must be a 1-D integer tensor"):
        Batch.of(x, y.float(), 0)
    with pytest.raises(ValueError, match="as many rows: 3, 2 and 2"):
        Batch.of(x, y[:2], 0)


def test_batch_validates_its_fields():
    x, y, task = torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, 0])
    with pytest.raises(TypeError, match="replayed must be None or a boolean tensor"):
        Batch(x, y, task, replayed=torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="stored_logits"):
        Batch(x, y, task, stored_logits=torch.zeros(3, 4))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        Batch([[0.0]] * 2, y, task)


# -- hooks given the wrong thing ----------------------------------------------------------------

def test_hooks_given_none_or_tensors_say_what_to_pass():
    stream = blob_stream(num_tasks=2)
    task = stream.tasks[0]
    model = tiny_model(stream)
    x, y = task.train.x[:4], task.train.y[:4]
    for strategy in (EMA(), Replay(), Distill()):
        with pytest.raises(TypeError, match=rf"{strategy.name}.before_run: stream must be a "
                                            r"cl.types.Stream \(Stream.from_tasks"):
            strategy.before_run(model, None, 0)
        strategy.before_run(model, stream, 0)
    replay = Replay(ReplayConfig(capacity=8))
    replay.before_run(model, stream, 0)
    with pytest.raises(TypeError, match=r"replay.transform_batch: batch must be a cl.types.Batch "
                                        r"\(Batch.of\(x, y, task\)"):
        replay.transform_batch(x, task)
    with pytest.raises(TypeError, match="replay.after_step: task must be a cl.types.Task"):
        replay.after_step(model, Batch.of(x, y, task), model(x), None)
    ema = EMA(EMAConfig(decay=0.5))
    ema.before_run(model, stream, 0)
    with pytest.raises(TypeError, match="ema.after_step: batch must be"):
        ema.after_step(model, None, None, task)
    with pytest.raises(TypeError, match="ema.eval_context: task must be"):
        ema.eval_context(model, 0)
    with pytest.raises(TypeError, match="ema.before_run: seed must be an integer"):
        ema.before_run(model, stream, None)
    distill = Distill(DistillConfig())
    distill.before_run(model, stream, 0)
    with pytest.raises(TypeError, match="distill.loss_terms: logits must be a tensor"):
        distill.loss_terms(model, Batch.of(x, y, task), None, task)
    with pytest.raises(TypeError, match="distill.after_task: model must be a torch.nn.Module"):
        distill.after_task(stream, task)


def test_hooks_before_before_run_say_so():
    stream = blob_stream(num_tasks=2)
    task, model = stream.tasks[0], tiny_model(stream)
    batch = Batch.of(task.train.x[:4], task.train.y[:4], task)
    with pytest.raises(RuntimeError, match="replay.transform_batch: call before_run"):
        Replay().transform_batch(batch, task)
    with pytest.raises(RuntimeError, match="distill.loss_terms: call before_run"):
        Distill().loss_terms(model, batch, model(batch.x), task)


def test_a_stream_from_tensors_trains_distill_from_a_hand_written_loop():
    """Distill's before_run from a stream made by the helpers, then LwF's term after task 0."""
    made = blob_stream(num_tasks=2)
    stream = Stream.from_tasks([Task.from_tensors(t.train.x, t.train.y, t.test.x, t.test.y,
                                                  index=t.index) for t in made.tasks])
    model = tiny_model(stream)
    distill = Distill(DistillConfig(alpha=2.0))
    distill.before_run(model, stream, seed=0)
    terms = []
    for task in stream.tasks:
        distill.before_task(model, task)
        batch = Batch.of(task.train.x, task.train.y, task)
        terms.append(distill.loss_terms(model, batch, model(batch.x), task))
        distill.after_task(model, task)
    assert terms[0] == {}
    # The teacher is the model itself here (no training in between): the KL is zero.
    assert terms[1]["kl"].item() == pytest.approx(0.0, abs=1e-6)
