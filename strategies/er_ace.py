"""ER-ACE (Caccia et al., "New Insights on Reducing Abrupt Representation Change in Online
Continual Learning", ICLR 2022): experience replay with an asymmetric cross-entropy. From the
second task on, the incoming rows are scored only over the classes present in the incoming batch
and the classes not seen yet, so new classes stop pushing down the logits of old ones; buffer
rows get a cross-entropy of their own over every class.

As the reference code does (aimagelab/mammoth, models/er_ace.py): the buffer is a reservoir of
incoming rows; each step forwards one buffer draw of its own and adds its mean cross-entropy,
unweighted, to the incoming rows' mean. The reference takes "not seen yet" as every class from
the highest class id seen so far up, which in natural class order is the unseen classes plus the
highest seen one; here it is the classes no incoming row has had, which stays right when class
ids do not rise task by task (`--class-order shuffle`).

`alpha` > 0 also keeps each row's logits and pulls the draw's logits toward them (DER's squared
error on the same draw): ER-ACE with stored logits, as DER++ is ER with them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.models import device_of, logits_of
from cl.strategy import Strategy
from cl.types import Batch, Stream, Task, check_hook_arguments
from strategies.der import check_weight
from strategies.distill import logit_mse
from strategies.replay import (
    Buffer,
    buffer_report,
    check_buffer_settings,
    check_started,
    fresh_rows,
)

# replay's policies, spelled here so that `cl list` reads them from this file's source.
Policy = Literal["reservoir", "class_balanced"]


@dataclass(frozen=True)
class ERACEConfig:
    """Settings of `er_ace:key=value,...`."""

    capacity: int = 500  # rows the buffer holds at most
    batch_size: int | None = None  # rows per buffer draw; None: as many as the incoming batch
    policy: Policy = "reservoir"  # which rows stay: reservoir sampling (the paper's), or CBRS
    alpha: float = 0.0  # weight of the squared error toward stored logits (0: none kept)

    def __post_init__(self) -> None:
        check_buffer_settings(self.capacity, self.policy, self.batch_size)
        check_weight("alpha", self.alpha)


def present_classes(labels: Tensor, fresh: Tensor | None, num_classes: int) -> Tensor:
    """bool [classes]: the labels of the incoming rows (`fresh`; None: every row), found
    without boolean indexing (no wait for the device)."""
    counts = torch.zeros(num_classes, dtype=torch.int64, device=labels.device)
    rows = torch.ones_like(labels) if fresh is None else fresh.to(torch.int64)
    return counts.index_put_((labels,), rows, accumulate=True) > 0


def asymmetric_mask(present: Tensor, seen: Tensor) -> Tensor:
    """The classes the incoming rows are scored over: those present in the incoming batch and
    those not seen yet (`seen`: every class of an incoming row so far, these included), as one
    [classes] boolean row, the same for every incoming row."""
    return present | ~seen


class ERACE(Strategy):
    """ER with an asymmetric cross-entropy: new rows over present and unseen classes only.

    A separate buffer draw is scored over every class."""

    name: ClassVar[str] = "er_ace"
    config_class: ClassVar[type] = ERACEConfig
    # Its loss terms forward the model on buffer draws (what distill:on=features must not read).
    forwards_in_loss_terms: ClassVar[bool] = True

    def __init__(self, config: ERACEConfig | None = None) -> None:
        self.config = config if config is not None else ERACEConfig()
        self.buffer: Buffer | None = None
        self.seen: Tensor | None = None  # bool, classes: the labels of every incoming row so far
        self.scenario: str | None = None
        self.class_mask: Tensor | None = None

    def __repr__(self) -> str:
        settings = ", ".join(f"{field.name}={getattr(self.config, field.name)!r}"
                             for field in dataclasses.fields(self.config))
        return f"ERACE({settings})"

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("er_ace.before_run", model=model, stream=stream, seed=seed)
        # Its own generator (apart from replay's and DER's): draws never shift the global RNG.
        generator = torch.Generator().manual_seed(seed + 3_000_017)
        device = device_of(model)
        self.buffer = Buffer(self.config.capacity, self.config.policy, generator, device)
        self.seen = torch.zeros(stream.num_classes, dtype=torch.bool, device=device)
        self.scenario = stream.scenario
        self.class_mask = stream.class_mask().to(device)

    def cross_entropy_mask(self, batch: Batch, task: Task) -> Tensor | None:
        self._check_started("cross_entropy_mask")
        fresh = batch.fresh() if batch.replayed is not None else None
        present = present_classes(batch.y, fresh, len(self.seen))
        self.seen |= present
        if task.index == 0:
            return None  # the first task has no old classes to protect (the reference's rule)
        allowed = asymmetric_mask(present, self.seen).unsqueeze(0).expand(len(batch), -1)
        if fresh is not None:  # rows another strategy replayed keep every class
            allowed = allowed | ~fresh.unsqueeze(1)
        return allowed

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        check_hook_arguments("er_ace.loss_terms", model=model, batch=batch, logits=logits,
                             task=task)
        self._check_started("loss_terms")
        if not len(self.buffer) or task.index == 0:
            return {}
        x, y, task_ids, stored = self.buffer.sample(self.config.batch_size or len(batch))
        replayed = logits_of(model, x)
        terms = {}
        if self.config.alpha > 0:
            everything = torch.ones(1, stored.shape[1], dtype=torch.bool, device=stored.device)
            terms["mse"] = logit_mse(stored, replayed, everything, self.config.alpha)
        if self.scenario == "task":
            replayed = replayed.masked_fill(~self.class_mask[task_ids],
                                            torch.finfo(replayed.dtype).min)
        terms["ce"] = F.cross_entropy(replayed, y)
        return terms

    def after_step(self, model: nn.Module, batch: Batch, logits: Tensor, task: Task) -> None:
        check_hook_arguments("er_ace.after_step", model=model, batch=batch, logits=logits,
                             task=task)
        self._check_started("after_step")
        x, y, task_ids, row_logits = fresh_rows(batch, logits.detach())
        self.buffer.insert(x, y, task_ids, row_logits if self.config.alpha > 0 else None)

    def _check_started(self, hook: str) -> None:
        check_started(self.buffer, f"er_ace.{hook}")

    def report(self) -> dict[str, Any]:
        return buffer_report(self.buffer)

    def state_dict(self) -> dict[str, Any]:
        if self.buffer is None:
            return {}
        return {"buffer": self.buffer.state_dict(), "seen_classes": self.seen.cpu().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.buffer is None:
            raise ValueError("load_state_dict needs before_run to have created the buffer")
        if state:
            self.buffer.load_state_dict(state["buffer"])
            self.seen = state["seen_classes"].to(self.seen.device, dtype=torch.bool)
