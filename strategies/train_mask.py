"""Train mask: each row's training cross-entropy sees only its own task's classes (L2P's train
mask), so training a task never pushes down the logits of other tasks' classes in a shared head.
Evaluation is left alone: no task id is needed at test time."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor, nn

from cl.strategy import NoConfig, Strategy
from cl.types import Batch, Stream, Task, check_hook_arguments


class TrainMask(Strategy):
    """Per row, the cross-entropy over its own task's classes (replayed rows: theirs)."""

    name: ClassVar[str] = "train_mask"
    config_class: ClassVar[type] = NoConfig

    def __init__(self, config: NoConfig | None = None) -> None:
        self.config = config if config is not None else NoConfig()
        self.class_mask: Tensor | None = None  # tasks x classes

    def __repr__(self) -> str:
        return "TrainMask()"

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("train_mask.before_run", model=model, stream=stream, seed=seed)
        self.class_mask = stream.class_mask()

    def cross_entropy_mask(self, batch: Batch, task: Task) -> Tensor:
        if self.class_mask is None:
            raise RuntimeError("train_mask.cross_entropy_mask: call before_run(model, stream, "
                               "seed) first")
        self.class_mask = self.class_mask.to(batch.task.device)
        return self.class_mask[batch.task]
