"""Core data types: a Split of in-memory tensors, a Task, a Stream of tasks, and a training Batch.

Inputs are a tensor, or a dict of tensors (a tokenized batch for a transformers model); the few
helpers here index, concatenate and move both forms so nothing else needs to care which it is.

Outside the runner (a strategy used from one's own training loop), `Task.from_tensors`,
`Stream.from_tasks` and `Batch.of` make these objects from plain tensors in one call each, and
`check_hook_arguments` is what the strategies call so that anything else handed to a hook is one
clear TypeError saying how to make the right object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Protocol, Union

import torch
from torch import Tensor, nn

Inputs = Union[Tensor, dict[str, Tensor]]  # noqa: UP007 (a runtime alias on Python 3.10)

SCENARIOS = ("class", "task", "domain")


def take(x: Inputs, index: Tensor | slice) -> Inputs:
    """Rows `index` of a tensor or of every tensor of a dict (one gather, or a view for a
    slice; no per-sample work)."""
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


class RowTransform(Protocol):
    """What a split applies to a batch of its stored rows to make the model's inputs (a pixel
    permutation, a rotation): a pure function of the rows, the same for every call."""

    def __call__(self, x: Tensor) -> Tensor: ...

    def to(self, device: torch.device | str) -> RowTransform: ...


@dataclass(frozen=True, eq=False)
class Split:
    """One split (train or test) of a task: stored inputs `x` and global class ids `y` (int64).

    With a `transform`, the model's inputs are `transform(x[rows])`, made one batch at a time:
    the tasks of a permuted or rotated stream share one stored copy of the data, so memory does
    not grow with the number of tasks. Read inputs through `rows(index)` (or `inputs()` for
    all of them), which apply it; `x` alone is the stored data."""

    x: Inputs
    y: Tensor
    transform: RowTransform | None = None

    def __post_init__(self) -> None:
        if num_rows(self.x) != len(self.y):
            raise ValueError(f"x has {num_rows(self.x)} rows but y has {len(self.y)}")
        if self.transform is not None and (isinstance(self.x, dict)
                                           or not callable(self.transform)):
            raise TypeError("a split's transform must be callable and applies to tensor "
                            "inputs only")

    def __len__(self) -> int:
        return len(self.y)

    def rows(self, index: Tensor | slice) -> Inputs:
        """The model's inputs for rows `index` (an index tensor or a slice)."""
        x = take(self.x, index)
        return self.transform(x) if self.transform is not None else x

    def inputs(self) -> Inputs:
        """The model's inputs for every row, all at once (the transform's output in full)."""
        return self.transform(self.x) if self.transform is not None else self.x

    def to(self, device: torch.device | str, moved: dict[int, Inputs] | None = None) -> Split:
        """This split with its rows, labels and transform on `device`. Splits that share stored
        rows (a permuted stream's tasks) keep sharing one copy when they pass the same `moved`
        dict, which remembers what was moved by the identity of the stored rows."""
        moved = moved if moved is not None else {}
        if id(self.x) not in moved:
            moved[id(self.x)] = to_device(self.x, device)
        transform = self.transform.to(device) if self.transform is not None else None
        return Split(moved[id(self.x)], self.y.to(device), transform)


def is_index(value: Any) -> bool:
    """An integer (Python's or numpy's), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_integer_tensor(tensor: Tensor) -> bool:
    return not (tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool)


def check_inputs(x: Any, what: str) -> None:
    """Raise TypeError unless `x` is a tensor or a dict of tensors (the two forms of Inputs)."""
    if isinstance(x, Tensor) or (
            isinstance(x, dict) and x and all(isinstance(v, Tensor) for v in x.values())):
        return
    hint = " (torch.from_numpy makes a tensor of an array)" if hasattr(x, "__array__") else ""
    raise TypeError(f"{what} must be a torch.Tensor or a dict of tensors, "
                    f"got {type(x).__name__}{hint}")


def as_labels(y: Any, what: str) -> Tensor:
    """`y` as the int64 class ids every Split and Batch holds (no copy when it already is)."""
    if not isinstance(y, Tensor) or y.dim() != 1 or not is_integer_tensor(y):
        got = (f"a {y.dtype} tensor of shape {tuple(y.shape)}" if isinstance(y, Tensor)
               else type(y).__name__)
        raise TypeError(f"{what} must be a 1-D integer tensor of class ids, got {got}")
    return y.to(torch.int64)


@dataclass(frozen=True, eq=False)
class Task:
    """One task of a stream: its data and the global class ids it uses."""

    name: str
    index: int
    train: Split
    test: Split
    classes: tuple[int, ...]
    # Rows held out of `train` to choose settings on (`--val-fraction`); None: none held out.
    validation: Split | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"a task's name must be a string, got {type(self.name).__name__}")
        if not is_index(self.index) or self.index < 0:
            raise ValueError(f"task {self.name!r}: index must be a non-negative integer, "
                             f"got {self.index!r}")
        for split in ("train", "test", "validation"):
            if split == "validation" and self.validation is None:
                continue
            if not isinstance(getattr(self, split), Split):
                raise TypeError(f"task {self.name!r}: {split} must be a cl.types.Split, "
                                f"got {type(getattr(self, split)).__name__}")
        if not isinstance(self.classes, tuple) or not self.classes or not all(
                is_index(c) and c >= 0 for c in self.classes):
            raise ValueError(f"task {self.name!r}: classes must be a non-empty tuple of "
                             f"non-negative class ids, got {self.classes!r}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"task {self.name!r}: classes {self.classes} repeat an id")

    @classmethod
    def from_tensors(cls, x_train: Inputs, y_train: Tensor, x_test: Inputs | None = None,
                     y_test: Tensor | None = None, *, index: int = 0, name: str | None = None,
                     classes: Sequence[int] | None = None) -> Task:
        """A task made of one's own tensors: `x` a tensor (or a dict of tensors), `y` 1-D
        integer class ids (stored as int64).

        Without test tensors the test split is empty (no rows). `index` is the task's position
        in its stream. `classes` defaults to the distinct labels of both splits; when given,
        every label must be one of them. `name` defaults to "task <index>"."""
        name = name if name is not None else f"task {index}"
        check_inputs(x_train, f"task {name!r}: x_train")
        y_train = as_labels(y_train, f"task {name!r}: y_train")
        if (x_test is None) != (y_test is None):
            raise ValueError(f"task {name!r}: give both x_test and y_test, or neither")
        if x_test is None:
            # Zero rows of the training inputs' shape and dtype, so evaluation code sees no
            # special case.
            x_test, y_test = take(x_train, torch.arange(0)), y_train[:0]
        check_inputs(x_test, f"task {name!r}: x_test")
        y_test = as_labels(y_test, f"task {name!r}: y_test")
        labels = torch.cat([y_train, y_test.to(y_train.device)]).unique().tolist()
        if classes is None:
            classes = labels
        else:
            classes = [int(c) for c in classes]
            unknown = sorted(set(labels) - set(classes))
            if unknown:
                raise ValueError(f"task {name!r}: labels {unknown} are not among its "
                                 f"classes {tuple(classes)}")
        return cls(name, index, Split(x_train, y_train), Split(x_test, y_test),
                   tuple(sorted(classes)))


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
        if not isinstance(self.tasks, tuple) or not all(isinstance(t, Task) for t in self.tasks):
            raise TypeError("a stream's tasks must be a tuple of cl.types.Task")
        if not self.tasks:
            raise ValueError("a stream needs at least one task")
        if not is_index(self.num_classes) or self.num_classes <= 0:
            raise ValueError(f"num_classes must be a positive integer, got {self.num_classes!r}")
        if not isinstance(self.input_shape, tuple):
            raise TypeError(f"input_shape must be a tuple, got {self.input_shape!r}")
        for position, task in enumerate(self.tasks):
            if task.index != position:
                raise ValueError(f"task {task.name!r} has index {task.index}, expected {position}")
            if max(task.classes) >= self.num_classes:
                raise ValueError(f"task {task.name!r} uses class {max(task.classes)} "
                                 f">= num_classes {self.num_classes}")

    def __len__(self) -> int:
        return len(self.tasks)

    @classmethod
    def from_tasks(cls, tasks: Sequence[Task], *, scenario: str = "class",
                   num_classes: int | None = None, name: str = "tensors") -> Stream:
        """A stream of `tasks` in the order given (each task's `index` must be its position).

        `num_classes`, the width of the head, defaults to one more than the largest class id
        of any task; `input_shape` is the shape of one training row of the first task (of its
        first tensor, for dict inputs)."""
        tasks = tuple(tasks)
        if not tasks or not all(isinstance(task, Task) for task in tasks):
            raise TypeError("Stream.from_tasks needs a non-empty sequence of cl.types.Task "
                            "(make each with Task.from_tensors)")
        if num_classes is None:
            num_classes = 1 + max(max(task.classes) for task in tasks)
        x = tasks[0].train.x
        row = next(iter(x.values())) if isinstance(x, dict) else x
        return cls(name, tasks, scenario, num_classes, tuple(row.shape[1:]))

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

    def __post_init__(self) -> None:
        # Cheap checks only (types, lengths, dtypes): the runner builds several batches a step.
        check_inputs(self.x, "a batch's x")
        for name in ("y", "task"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dim() != 1 or not is_integer_tensor(value):
                raise TypeError(f"a batch's {name} must be a 1-D integer tensor "
                                "(Batch.of(x, y, task) makes one from a minibatch)")
        rows = len(self.y)
        if num_rows(self.x) != rows or len(self.task) != rows:
            raise ValueError(f"a batch's x, y and task must have as many rows: "
                             f"{num_rows(self.x)}, {rows} and {len(self.task)}")
        if self.replayed is not None and (not isinstance(self.replayed, Tensor)
                                          or self.replayed.dtype != torch.bool
                                          or self.replayed.shape != (rows,)):
            raise TypeError("a batch's replayed must be None or a boolean tensor, one per row")
        if self.stored_logits is not None and (not isinstance(self.stored_logits, Tensor)
                                               or self.stored_logits.dim() != 2
                                               or len(self.stored_logits) != rows):
            raise TypeError("a batch's stored_logits must be None or a (rows, classes) tensor")

    @classmethod
    def of(cls, x: Inputs, y: Tensor, task: Task | int | Tensor) -> Batch:
        """A training batch of one's own minibatch: inputs `x`, integer labels `y` (stored as
        int64), every row from `task` (a Task or its index; or a tensor of one index per row)."""
        y = as_labels(y, "Batch.of: y")
        if isinstance(task, Task):
            task = task.index
        if is_index(task):
            task_ids = torch.full((len(y),), int(task), dtype=torch.int64, device=y.device)
        elif isinstance(task, Tensor):
            task_ids = as_labels(task, "Batch.of: task")
        else:
            raise TypeError(f"Batch.of: task must be a cl.types.Task, its index, or a tensor "
                            f"of one index per row, got {type(task).__name__}")
        return cls(x, y, task_ids)

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


# What each hook argument must be, and how a caller outside the runner makes one.
HOOK_ARGUMENTS: dict[str, tuple[type, str]] = {
    "model": (nn.Module, "a torch.nn.Module"),
    "stream": (Stream, "a cl.types.Stream (Stream.from_tasks([Task.from_tensors(x, y), ...]) "
                       "makes one from tensors)"),
    "task": (Task, "a cl.types.Task (Task.from_tensors(x_train, y_train, x_test, y_test, "
                   "index=i) makes one from tensors)"),
    "batch": (Batch, "a cl.types.Batch (Batch.of(x, y, task) wraps a minibatch)"),
    "logits": (Tensor, "a tensor of the model's outputs"),
    "seed": (Integral, "an integer"),
    "gradients": (dict, "a dict of gradient tensors by parameter name (name -> parameter.grad)"),
}


def check_hook_arguments(hook: str, **arguments: Any) -> None:
    """Raise TypeError when an argument of strategy hook `hook` is not what the hook's signature
    says (None included), naming it and how to make the right object.

    The runner always passes the real objects; this is for a strategy called from one's own
    training loop, where a plain tensor or None would otherwise fail deep inside the strategy
    (or, worse, be accepted by one strategy and not by the next)."""
    for name, value in arguments.items():
        kind, description = HOOK_ARGUMENTS[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TypeError(f"{hook}: {name} must be {description}, got {type(value).__name__}")


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
