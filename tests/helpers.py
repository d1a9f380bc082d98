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


def token_stream(num_tasks: int = 2, scenario: str = "task", train_rows: int = 16,
                 test_rows: int = 8) -> Stream:
    """Token-id inputs for a transformers model (vocabulary 50, 8 tokens a row, [CLS]-like id 1
    first): each class has its own token at position 1, the rest is random ids 5..39."""
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for index in range(num_tasks):
        classes = (2 * index, 2 * index + 1)

        def split(rows: int, classes: tuple[int, int] = classes) -> Split:
            y = torch.tensor(classes).repeat(rows // 2)
            ids = torch.randint(5, 40, (len(y), 8), generator=generator)
            ids[:, 1] = 40 + y  # the class's own token
            ids[:, 0] = 1
            return Split({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                          "token_type_ids": torch.zeros_like(ids)}, y)
        tasks.append(Task(f"t{index}", index, split(train_rows), split(test_rows), classes))
    return Stream("tokens", tuple(tasks), scenario, 2 * num_tasks, (8,))


def tiny_bert(num_classes: int, seed: int = 0, positions: int = 32) -> nn.Module:
    """A random 1-layer BERT classifier (hidden 16) over token_stream's vocabulary."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=positions, num_labels=num_classes))
