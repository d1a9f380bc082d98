"""Tiny seeded streams and models for tests: no files, no network, milliseconds to train."""

from __future__ import annotations

import torch
from torch import nn

from cl.types import Split, Stream, Task


def blob_stream(num_tasks: int = 2, classes_per_task: int = 2, train_per_class: int = 8,
                test_per_class: int = 4, features: int = 6, scenario: str = "class",
                seed: int = 0) -> Stream:
    """Gaussian blobs, one per class, split into tasks of consecutive classes."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = num_tasks * classes_per_task
    centres = 3 * torch.randn(num_classes, features, generator=generator)

    def sample(per_class: int, classes: range) -> Split:
        y = torch.tensor(classes).repeat_interleave(per_class)
        x = centres[y] + torch.randn(len(y), features, generator=generator)
        return Split(x, y)

    tasks = []
    for index in range(num_tasks):
        classes = range(index * classes_per_task, (index + 1) * classes_per_task)
        tasks.append(Task(f"t{index}", index, sample(train_per_class, classes),
                          sample(test_per_class, classes), tuple(classes)))
    return Stream("blobs", tuple(tasks), scenario, num_classes, (features,))


def tiny_model(stream: Stream, seed: int = 0) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(stream.input_shape[0], 16), nn.ReLU(),
                             nn.Linear(16, stream.num_classes))
