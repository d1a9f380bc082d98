"""DER and DER++ (Buzzega et al., "Dark Experience for General Continual Learning", NeurIPS
2020): a reservoir buffer of past rows with the logits the model gave them when they arrived;
`alpha` times the mean squared error pulling the model's logits on a buffer draw toward the
stored ones, and for DER++ `beta` times the cross-entropy of a second, independent draw.

Made of what `replay` and `distill` are made of: one `strategies.replay.Buffer` (two draws from
it, not two buffers) and `strategies.distill.logit_mse`. Unlike `replay`, buffer rows do not join
the incoming batch's cross-entropy: each term forwards its own draw, as the paper's code does
(aimagelab/mammoth, models/der.py and models/derpp.py).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.models import device_of, logits_of
from cl.strategy import Strategy
from cl.types import Batch, Stream, Task, check_hook_arguments
from strategies.distill import logit_mse
from strategies.replay import (
    Buffer,
    buffer_report,
    buffer_state,
    check_buffer_settings,
    check_started,
    fresh_rows,
    load_buffer_state,
)

# replay's policies, spelled here so that `cl list` reads them from this file's source.
Policy = Literal["reservoir", "class_balanced"]


def check_weight(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


@dataclass(frozen=True)
class DERConfig:
    """Settings of `der:key=value,...`. The defaults are the published Seq-MNIST settings at a
    buffer of 500 (mammoth's utils/best_args.py), apart from the draw size, which defaults to the
    incoming batch's."""

    capacity: int = 500  # rows the buffer holds at most
    alpha: float = 1.0  # weight of the squared error toward the stored logits
    batch_size: int | None = None  # rows per buffer draw; None: as many as the incoming batch
    policy: Policy = "reservoir"  # which rows stay: reservoir sampling (the paper's), or CBRS

    def __post_init__(self) -> None:
        check_buffer_settings(self.capacity, self.policy, self.batch_size)
        check_weight("alpha", self.alpha)


@dataclass(frozen=True)
class DERPPConfig:
    """Settings of `derpp:key=value,...`: DER's, and `beta`. The defaults are the published
    Seq-MNIST settings at a buffer of 500 (alpha 1, beta 0.5)."""

    capacity: int = 500  # rows the buffer holds at most
    alpha: float = 1.0  # weight of the squared error toward the stored logits
    beta: float = 0.5  # weight of the cross-entropy on a second, independent buffer draw
    batch_size: int | None = None  # rows per buffer draw (each); None: as many as the batch
    policy: Policy = "reservoir"  # which rows stay: reservoir sampling (the paper's), or CBRS

    def __post_init__(self) -> None:
        check_buffer_settings(self.capacity, self.policy, self.batch_size)
        check_weight("alpha", self.alpha)
        check_weight("beta", self.beta)


class DER(Strategy):
    """Dark Experience Replay: logits stored with the rows, matched by a squared error."""

    name: ClassVar[str] = "der"
    config_class: ClassVar[type] = DERConfig
    # Its loss terms forward the model on buffer draws (what distill:on=features must not read).
    forwards_in_loss_terms: ClassVar[bool] = True

    def __init__(self, config: DERConfig | None = None) -> None:
        self.config = config if config is not None else self.config_class()
        self.buffer: Buffer | None = None
        self.scenario: str | None = None
        self.class_mask: Tensor | None = None

    def __repr__(self) -> str:
        settings = ", ".join(f"{field.name}={getattr(self.config, field.name)!r}"
                             for field in dataclasses.fields(self.config))
        return f"{type(self).__name__}({settings})"

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments(f"{self.name}.before_run", model=model, stream=stream, seed=seed)
        # Its own generator (apart from replay's): draws never shift the global RNG.
        generator = torch.Generator().manual_seed(seed + 2_000_003)
        self.buffer = Buffer(self.config.capacity, self.config.policy, generator,
                             device_of(model))
        self.scenario = stream.scenario
        self.class_mask = stream.class_mask().to(device_of(model))

    def draw(self, rows: int) -> tuple[Any, Tensor, Tensor, Tensor]:
        """`rows` distinct buffer rows (fewer while the buffer holds fewer): x, y, task, logits."""
        return self.buffer.sample(self.config.batch_size or rows)

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        check_hook_arguments(f"{self.name}.loss_terms", model=model, batch=batch,
                             logits=logits, task=task)
        self._check_started("loss_terms")
        if not len(self.buffer):
            return {}
        x, _, _, stored = self.draw(len(batch))
        everything = torch.ones(1, stored.shape[1], dtype=torch.bool, device=stored.device)
        return {"mse": logit_mse(stored, logits_of(model, x), everything, self.config.alpha)}

    def after_step(self, model: nn.Module, batch: Batch, logits: Tensor, task: Task) -> None:
        check_hook_arguments(f"{self.name}.after_step", model=model, batch=batch,
                             logits=logits, task=task)
        self._check_started("after_step")
        # The raw logits of this step's forward pass, before the update: the paper's targets.
        x, y, task_ids, row_logits = fresh_rows(batch, logits.detach())
        self.buffer.insert(x, y, task_ids, row_logits)

    def _check_started(self, hook: str) -> None:
        check_started(self.buffer, f"{self.name}.{hook}")

    def report(self) -> dict[str, Any]:
        return buffer_report(self.buffer)

    def state_dict(self) -> dict[str, Any]:
        return buffer_state(self.buffer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_buffer_state(self.buffer, state)


class DERPP(DER):
    """DER++: DER's squared error, plus the cross-entropy of a second, independent draw.

    The second draw's labels are matched over all classes, or in the task scenario over each
    row's own task's classes, as the runner's cross-entropy is."""

    name: ClassVar[str] = "derpp"
    config_class: ClassVar[type] = DERPPConfig

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        terms = super().loss_terms(model, batch, logits, task)
        if not terms:
            return terms
        x, y, task_ids, _ = self.draw(len(batch))
        replayed = logits_of(model, x)
        if self.scenario == "task":
            replayed = replayed.masked_fill(~self.class_mask[task_ids],
                                            torch.finfo(replayed.dtype).min)
        terms["ce"] = self.config.beta * F.cross_entropy(replayed, y)
        return terms
