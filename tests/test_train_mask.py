"""`train_mask`: each row's cross-entropy over its own task's classes; other tasks' head rows get
no gradient from it, and evaluation needs no task id."""

from __future__ import annotations

import torch
from helpers import blob_stream, tiny_model

from cl.runner import TrainConfig, run
from cl.strategy import Chain
from cl.types import Batch
from strategies import Replay, ReplayConfig, TrainMask


def test_training_a_task_leaves_other_tasks_head_rows_bitwise_unchanged():
    stream = blob_stream(num_tasks=3)
    model = tiny_model(stream)
    states = []
    run(model, stream, TrainMask(), TrainConfig(batch_size=4, epochs=2, lr=0.1),
        checkpoint=lambda state: states.append({k: v.clone() for k, v in state["model"].items()}))
    initial = tiny_model(stream).state_dict()
    before = [initial, *states[:-1]]
    for task, after in zip(stream.tasks, states, strict=True):
        others = [c for c in range(stream.num_classes) if c not in task.classes]
        own = list(task.classes)
        previous = before[task.index]
        assert torch.equal(after["2.weight"][others], previous["2.weight"][others])
        assert torch.equal(after["2.bias"][others], previous["2.bias"][others])
        assert not torch.equal(after["2.weight"][own], previous["2.weight"][own])


def test_replayed_rows_keep_their_own_tasks_classes():
    stream = blob_stream(num_tasks=2)
    chain = Chain(Replay(ReplayConfig(capacity=8, batch_size=4)), TrainMask())
    model = tiny_model(stream)
    chain.before_run(model, stream, 0)
    first, second = stream.tasks
    old = Batch(first.train.x[:4], first.train.y[:4], torch.zeros(4, dtype=torch.long))
    chain.after_step(model, chain.transform_batch(old, first),
                     torch.zeros(4, stream.num_classes), first)
    fresh = Batch(second.train.x[:2], second.train.y[:2], torch.ones(2, dtype=torch.long))
    batch = chain.transform_batch(fresh, second)
    assert len(batch) == 6
    mask = chain.cross_entropy_mask(batch, second)
    for row in range(len(batch)):
        assert mask[row, batch.y[row]]  # every row keeps its own label
        assert torch.equal(mask[row], stream.class_mask()[batch.task[row]])
