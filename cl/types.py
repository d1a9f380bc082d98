"""Core data types: a Split of in-memory tensors, a Task, a Stream of tasks, and a training Batch.

Inputs are a tensor, or a dict of tensors (a tokenized batch for a transformers model); the few
helpers here index, concatenate and move both forms so nothing else needs to care which it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor

Inputs = Union[Tensor, dict[str, Tensor]]  # noqa: UP007 (a runtime alias on Python 3.10)

SCENARIOS = ("class", "task", "domain")


def take(x: Inputs, index: Tensor) -> Inputs:
    """Rows `index` of a tensor or of every tensor of a dict (one gather, no per-sample work)."""
    if isinstance(x, dict):
        return {key: value[index] for key, value in x.items()}
    return x[index]


def concat(parts: list[Inputs]) -> Inputs:
    """Concatenate inputs along the batch dimension."""
    if isinstance(parts[0], dict):
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}
    return torch.cat(parts)


def to_device(x: Inputs, device: torch.device | str) -> Inputs:
    if isinstance(x, dict):
        return {key: value.to(device, non_blocking=True) for key, value in x.items()}
    return x.to(device, non_blocking=True)


def num_rows(x: Inputs) -> int:
    if isinstance(x, dict):
        return len(next(iter(x.values())))
    return len(x)


@dataclass(frozen=True, eq=False)
class Split:
    """One split (train or test) of a task: inputs `x` and global class ids `y` (int64)."""

    x: Inputs
    y: Tensor

    def __post_init__(self) -> None:
        if num_rows(self.x) != len(self.y):
            raise ValueError(f"x has {num_rows(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a stream: its data and the global class ids it uses."""

    name: str
    index: int
    train: Split
    test: Split
    classes: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Stream:
    """An ordered sequence of tasks and the scenario they are learned in.

    `num_classes` is the width of the single output head: every class id of every task is below
    it. In the `task` scenario logits are masked to the task's classes; in `class` and `domain`
    they are not (domain streams share one label space across tasks).
    """

    name: str
    tasks: tuple[Task, ...]
    scenario: str
    num_classes: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r} (known: {', '.join(SCENARIOS)})")
        if not self.tasks:
            raise ValueError("a stream needs at least one task")
        for position, task in enumerate(self.tasks):
            if task.index != position:
                raise ValueError(f"task {task.name!r} has index {task.index}, expected {position}")
            if max(task.classes) >= self.num_classes:
                raise ValueError(f"task {task.name!r} uses class {max(task.classes)} "
                                 f">= num_classes {self.num_classes}")

    def __len__(self) -> int:
        return len(self.tasks)

    def class_mask(self) -> Tensor:
        """Boolean (num_tasks, num_classes): row t marks the classes of task t."""
        mask = torch.zeros(len(self.tasks), self.num_classes, dtype=torch.bool)
        for task in self.tasks:
            mask[task.index, list(task.classes)] = True
        return mask


@dataclass(frozen=True, eq=False)
class Batch:
    """A training batch: inputs, global class ids, and the task index of every row.

    Replay appends rows from earlier tasks, so `task` is per row, not per batch. `replayed` marks
    the rows that came from a buffer (None: no row did); `stored_logits` holds, for replayed rows
    whose buffer kept them, the logits recorded when the row was inserted (NaN rows elsewhere;
    None when no row has any), which DER-style distillation uses as targets.
    """

    x: Inputs
    y: Tensor
    task: Tensor
    replayed: Tensor | None = None
    stored_logits: Tensor | None = None

    def __len__(self) -> int:
        return len(self.y)

    def fresh(self) -> Tensor:
        """Boolean mask of the rows that are new data, not replayed."""
        if self.replayed is None:
            return torch.ones(len(self.y), dtype=torch.bool, device=self.y.device)
        return ~self.replayed

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        replayed = None
        if any(b.replayed is not None for b in batches):
            replayed = torch.cat([b.replayed if b.replayed is not None
                                  else torch.zeros(len(b), dtype=torch.bool, device=b.y.device)
                                  for b in batches])
        stored = None
        with_logits = [b.stored_logits for b in batches if b.stored_logits is not None]
        if with_logits:
            width, like = with_logits[0].shape[1], with_logits[0]
            stored = torch.cat([b.stored_logits if b.stored_logits is not None
                                else like.new_full((len(b), width), float("nan"))
                                for b in batches])
        return Batch(concat([b.x for b in batches]), torch.cat([b.y for b in batches]),
                     torch.cat([b.task for b in batches]), replayed, stored)


@dataclass(frozen=True)
class StreamOptions:
    """What a stream builder is asked for; `None` means the stream's own default.

    A registered stream is a function `build(options: StreamOptions) -> Stream` whose docstring's
    first line describes it. `params` holds the stream's own `key=value` settings (from
    `--tasks name:key=value,...`); a builder rejects keys it does not know.
    """

    scenario: str | None = None
    num_tasks: int | None = None
    classes_per_task: int | None = None
    class_order: str = "natural"  # "natural", "shuffle" (seeded), or explicit ids "3,1,2,..."
    seed: int = 0
    data: str | None = None  # a local path, or a Hugging Face hub name
    params: tuple[tuple[str, str], ...] = ()
    # Seeded stratified caps on each task's rows; a builder that can cap before loading
    # everything (text) does, and the caller caps every stream again (a no-op when done).
    train_per_task: int | None = None
    test_per_task: int | None = None
    tokenizer: Any = None  # the text model's fast tokenizer; None for image models
