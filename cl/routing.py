"""Routing without task ids, for strategies with one module per task (a LoRA adapter, a soft
prompt): which task's module scores each test row (the nearest task prototype in the base
model's features, or the module surest of its own task's classes), each row classified within
the routed task's classes, and the share of each task's rows routed right after every task."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.features import FeatureCache, logits_in_batches
from cl.types import Split, Stream, Task

ROUTES = ("prototype", "entropy")
# Given a trained task's index: the model with that task's module active, inside the context.
WithTask = Callable[[int], AbstractContextManager[None]]
# The model with every task module off: the base alone, as prototypes are computed on.
BaseOnly = Callable[[], AbstractContextManager[None]]


def route_by_prototype(features: Tensor, prototypes: Tensor) -> Tensor:
    """Each row's task: the prototype (a task's mean feature, one per row of `prototypes`) with
    the highest cosine similarity to the row's feature."""
    return (F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T).argmax(1)


def masked_entropy(logits: Tensor, allowed: Tensor) -> Tensor:
    """Per row, the entropy of the softmax over the classes `allowed` marks (bool, classes)."""
    log_p = torch.log_softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=1)
    p = log_p.exp()
    return -(p * log_p.masked_fill(~allowed, 0.0)).sum(1)


def route_by_entropy(logits: Tensor, allowed: Tensor) -> Tensor:
    """Each row's task: of the task modules' logits (tasks x rows x classes), the one whose
    softmax over its own task's classes (`allowed`: tasks x classes) is surest (lowest
    entropy)."""
    entropy = torch.stack([masked_entropy(task_logits, mask)
                           for task_logits, mask in zip(logits, allowed, strict=True)])
    return entropy.argmin(0)


def within_routed_task(logits: Tensor, routes: Tensor, allowed: Tensor) -> Tensor:
    """Rows' logits (each from the module it was routed to) with the classes outside the routed
    task's (`allowed`: tasks x classes) at the lowest finite value: each row is classified
    within the task the router chose."""
    return logits.masked_fill(~allowed[routes], torch.finfo(logits.dtype).min)


class Router:
    """The routing of one run: the task prototypes, the routing matrix, and the logits of the
    evaluation pass in progress.

    The owning strategy calls `start` in before_run, `task_started` / `task_ended` around each
    task, wraps each evaluation pass in `scoring_pass`, and answers `eval_logits` with
    `logits`; it says how to activate one task's module (`with_task`) and how to switch every
    module off (`base_only`)."""

    def __init__(self, route: str) -> None:
        if route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {route!r}")
        self.route = route
        self.base_features = FeatureCache("auto")  # the base model's, which never trains
        self.prototypes: dict[int, Tensor] = {}  # task index -> mean base feature (prototype)
        self.class_mask: Tensor | None = None  # tasks x classes
        self.task_of_split: dict[int, int] = {}  # id of a task's test split -> its index
        self.routing: list[list[float | None]] = []  # [after task i][task j]: rows routed right
        self.at_task_end = False  # between a task's end and the next task's start
        self._scored: dict[int, Tensor] = {}  # this evaluation pass's logits per split

    def start(self, stream: Stream) -> None:
        self.class_mask = stream.class_mask()
        self.task_of_split = {id(task.test): task.index for task in stream.tasks}
        if not self.routing:  # a resumed run has its matrix back from load_state_dict
            self.routing = [[None] * len(stream.tasks) for _ in stream.tasks]

    def task_started(self) -> None:
        self.at_task_end = False

    def task_ended(self, model: nn.Module, task: Task, base_only: BaseOnly) -> None:
        if self.route == "prototype":
            with base_only():
                features = self.base_features.of(model, task.train)
            self.prototypes[task.index] = features.double().mean(0)
        self.at_task_end = True

    @contextlib.contextmanager
    def scoring_pass(self) -> Iterator[None]:
        """One pass over an evaluated task's rows: they are scored once, on its first batch,
        and what the pass computed is dropped after (the next pass may see other weights: the
        next step's, or EMA's average)."""
        self._scored.clear()
        try:
            yield
        finally:
            self._scored.clear()

    def logits(self, model: nn.Module, split: Split, rows: slice | Tensor, tasks: list[int],
               with_task: WithTask, base_only: BaseOnly) -> Tensor:
        """The routed logits of `rows` of `split`, given the trained tasks (`tasks`, in order)."""
        if id(split) not in self._scored:
            self._scored[id(split)] = self.score_split(model, split, tasks, with_task,
                                                       base_only)
        return self._scored[id(split)][rows]

    def score_split(self, model: nn.Module, split: Split, tasks: list[int],
                    with_task: WithTask, base_only: BaseOnly) -> Tensor:
        """Every row of `split` routed to a trained task's module and classified within that
        task's classes; the routing accuracy recorded when `split` is a task's test rows."""
        allowed = self.class_mask.to(split.y.device)[tasks]
        everything = torch.arange(len(split), device=split.y.device)
        if self.route == "prototype":
            known = [task for task in tasks if task in self.prototypes]
            if known:
                with base_only():
                    features = self.base_features.of(model, split)
                prototypes = torch.stack([self.prototypes[t] for t in known]).to(features)
                positions = torch.tensor([tasks.index(t) for t in known], device=features.device)
                routes = positions[route_by_prototype(features, prototypes)]
            else:  # during the first task, before it has a prototype: its module
                routes = torch.full((len(split),), len(tasks) - 1, device=split.y.device)
            logits = None
            for position, task in enumerate(tasks):  # each module forwards its rows only
                index = (routes == position).nonzero().squeeze(1)
                if not len(index):
                    continue
                with with_task(task):
                    scores = logits_in_batches(model, split.rows(index))
                if logits is None:
                    logits = scores.new_zeros((len(split), scores.shape[1]))
                logits[index] = scores
        else:
            every_module = []
            for task in tasks:
                with with_task(task):
                    every_module.append(logits_in_batches(model, split.rows(everything)))
            stacked = torch.stack(every_module)
            routes = route_by_entropy(stacked, allowed)
            logits = stacked[routes, everything]
        task = self.task_of_split.get(id(split))
        # After a task, its module is the newest: row len(tasks) - 1 of the routing matrix.
        row = self.routing[len(tasks) - 1]
        if task in tasks and self.at_task_end and row[task] is None:  # R's view: evaluated first
            chosen = torch.tensor(tasks, device=routes.device)[routes]
            row[task] = float((chosen == task).float().mean())
        return within_routed_task(logits, routes, allowed)

    def report(self) -> dict[str, Any]:
        # Row i: after training task i; column j: the share of task j's test rows routed to
        # task j's module (None: not evaluated, or before a task had a module).
        return {"routing_accuracy": [list(row) for row in self.routing],
                "feature_rows_computed": self.base_features.rows_computed}

    def state_dict(self) -> dict[str, Any]:
        return {"prototypes": dict(self.prototypes),
                "routing": [list(row) for row in self.routing]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prototypes = {int(k): v for k, v in state.get("prototypes", {}).items()}
        self.routing = [list(row) for row in state.get("routing", [])]
