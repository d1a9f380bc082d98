"""A-GEM (Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019): an episodic
memory of earlier tasks' rows; when the step's gradient g conflicts with the gradient g_ref of
the loss on a memory draw (g . g_ref < 0), the step applies g - (g . g_ref / g_ref . g_ref) g_ref
instead, the closest gradient that does not increase that loss to first order.

The memory as in the DER table's code (aimagelab/mammoth, models/agem.py): after each task,
`capacity // num_tasks` of its training rows drawn at random (`memory=per_task`); A-GEM-R's
reservoir of every incoming row is `memory=reservoir`. The projection acts in
`adjust_gradients`, between backward and the optimizer step, on every parameter with a gradient
seen as one vector.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.errors import UsageError
from cl.models import device_of, logits_of
from cl.strategy import Strategy
from cl.types import Batch, Stream, Task, check_hook_arguments
from strategies.replay import (
    Buffer,
    buffer_report,
    buffer_state,
    check_buffer_settings,
    check_started,
    fresh_rows,
    load_buffer_state,
)

Memory = Literal["per_task", "reservoir"]
MEMORIES = ("per_task", "reservoir")


@dataclass(frozen=True)
class AGEMConfig:
    """Settings of `agem:key=value,...`."""

    capacity: int = 500  # rows the memory holds at most
    batch_size: int | None = None  # rows per memory draw; None: as many as the incoming batch
    memory: Memory = "per_task"  # capacity // num_tasks rows after each task, or a reservoir

    def __post_init__(self) -> None:
        check_buffer_settings(self.capacity, "reservoir", self.batch_size)
        if self.memory not in MEMORIES:
            raise ValueError(f"memory must be one of {', '.join(MEMORIES)}, got {self.memory!r}")


def dot(left: list[Tensor], right: list[Tensor]) -> Tensor:
    """The dot product of two gradients given as lists of tensors (one vector)."""
    return torch.stack([(a * b).sum() for a, b in zip(left, right, strict=True)]).sum()


def project(gradient: list[Tensor], reference: list[Tensor]) -> list[Tensor]:
    """A-GEM's projection: `gradient` unchanged when it does not conflict with `reference`
    (dot product >= 0), else minus its component along `reference`. New tensors; no read of
    the dot product on the host (no wait for a device)."""
    product = dot(gradient, reference)
    norm = dot(reference, reference)
    # A zero reference gives a zero product: nothing to remove, and no division by zero.
    coefficient = torch.where(product < 0, product / norm.clamp_min(torch.finfo(norm.dtype).tiny),
                              torch.zeros_like(product))
    return [g - (coefficient * r).to(g.dtype) for g, r in zip(gradient, reference, strict=True)]


class AGEM(Strategy):
    """Averaged gradient episodic memory: no step raises the memory's loss, to first order."""

    name: ClassVar[str] = "agem"
    config_class: ClassVar[type] = AGEMConfig
    adjusts_gradients: ClassVar[bool] = True

    def __init__(self, config: AGEMConfig | None = None) -> None:
        self.config = config if config is not None else AGEMConfig()
        self.buffer: Buffer | None = None
        self.generator: torch.Generator | None = None
        self.num_tasks: int | None = None
        self.scenario: str | None = None
        self.class_mask: Tensor | None = None

    def __repr__(self) -> str:
        settings = ", ".join(f"{field.name}={getattr(self.config, field.name)!r}"
                             for field in dataclasses.fields(self.config))
        return f"AGEM({settings})"

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        if self.config.memory == "per_task" and self.config.capacity < len(stream.tasks):
            raise UsageError(f"agem:memory=per_task keeps capacity // num_tasks rows per task: "
                             f"capacity {self.config.capacity} is less than the stream's "
                             f"{len(stream.tasks)} tasks")

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("agem.before_run", model=model, stream=stream, seed=seed)
        # Its own generator: memory draws and per-task picks never shift the global RNG.
        self.generator = torch.Generator().manual_seed(seed + 4_000_037)
        self.buffer = Buffer(self.config.capacity, "reservoir", self.generator, device_of(model))
        self.num_tasks = len(stream.tasks)
        self.scenario = stream.scenario
        self.class_mask = stream.class_mask().to(device_of(model))

    def adjust_gradients(self, model: nn.Module, batch: Batch, task: Task,
                         gradients: dict[str, Tensor]) -> dict[str, Tensor]:
        check_hook_arguments("agem.adjust_gradients", model=model, batch=batch, task=task,
                             gradients=gradients)
        self._check_started("adjust_gradients")
        if not len(self.buffer) or not gradients:
            return gradients
        x, y, task_ids, _ = self.buffer.sample(self.config.batch_size or len(batch))
        logits = logits_of(model, x)
        if self.scenario == "task":
            logits = logits.masked_fill(~self.class_mask[task_ids],
                                        torch.finfo(logits.dtype).min)
        parameters = dict(model.named_parameters())
        names = list(gradients)
        reference = torch.autograd.grad(F.cross_entropy(logits, y),
                                        [parameters[name] for name in names], allow_unused=True)
        reference = [torch.zeros_like(gradients[name]) if r is None else r
                     for name, r in zip(names, reference, strict=True)]
        projected = project([gradients[name] for name in names], reference)
        return dict(zip(names, projected, strict=True))

    def after_step(self, model: nn.Module, batch: Batch, logits: Tensor, task: Task) -> None:
        check_hook_arguments("agem.after_step", model=model, batch=batch, logits=logits,
                             task=task)
        self._check_started("after_step")
        if self.config.memory == "reservoir":
            x, y, task_ids, _ = fresh_rows(batch, logits)
            self.buffer.insert(x, y, task_ids)

    def after_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("agem.after_task", model=model, task=task)
        self._check_started("after_task")
        if self.config.memory != "per_task":
            return
        rows = min(self.config.capacity // self.num_tasks, len(task.train))
        index = torch.randperm(len(task.train), generator=self.generator)[:rows]
        index = index.to(task.train.y.device)
        task_ids = torch.full((rows,), task.index, dtype=torch.int64, device=index.device)
        # The memory is never full before the last task: every offered row is kept.
        self.buffer.insert(task.train.rows(index), task.train.y[index], task_ids)

    def _check_started(self, hook: str) -> None:
        check_started(self.buffer, f"agem.{hook}")

    def report(self) -> dict[str, Any]:
        return buffer_report(self.buffer)

    def state_dict(self) -> dict[str, Any]:
        return buffer_state(self.buffer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_buffer_state(self.buffer, state)
