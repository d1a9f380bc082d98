"""The Strategy protocol (the runner's hooks) and Chain, which composes strategies in written order.

Every hook takes explicit arguments and returns a value instead of mutating shared state: a
strategy never sees the runner, the optimizer or another strategy. The runner calls, per run:

    before_run(model, stream, seed)
    per task:  before_task -> param_groups -> [per step: transform_batch -> loss_terms ->
               (backward, optimizer step) -> after_step] -> after_task
    per evaluated task: eval_context(model, task) around the forward passes
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from cl.types import Batch, Stream, Task


@dataclass(frozen=True)
class NoConfig:
    """The config of a strategy that takes no settings."""


class Strategy:
    """Base class: every hook is a no-op, so a strategy overrides only what it needs.

    `name` is the registry key, the CLI word, and the prefix of the strategy's loss terms.
    `config_class` is the frozen dataclass its CLI settings (`name:key=value,...`) are parsed into;
    a strategy is constructed as `cls(config)`.
    """

    name: ClassVar[str] = "strategy"
    config_class: ClassVar[type] = NoConfig

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        """Once before any training; `seed` seeds any randomness the strategy owns."""

    def before_task(self, model: nn.Module, task: Task) -> None:
        """Before training on `task`, before the optimizer is built: freeze, add adapters."""

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        """Return the optimizer's parameter groups, e.g. with a learning-rate multiplier."""
        return groups

    def transform_batch(self, batch: Batch, task: Task) -> Batch:
        """Return the batch to train on, e.g. with replayed rows appended."""
        return batch

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        """Extra loss terms, already weighted; they are added to the cross-entropy."""
        return {}

    def after_step(self, model: nn.Module, batch: Batch, task: Task) -> None:
        """After each optimizer step: EMA update, buffer insertion."""

    def after_task(self, model: nn.Module, task: Task) -> None:
        """After the last step on `task`, before the evaluation that fills row `task.index`."""

    def eval_context(self, model: nn.Module, task: Task) -> AbstractContextManager[None]:
        """Context the model is evaluated on `task` in: EMA weights, the task's adapter."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state but was given {sorted(state)}")


class Chain(Strategy):
    """Several strategies as one: hooks run in the order written, like `optax.chain`.

    Batches and parameter groups thread through the strategies in order; loss terms are merged
    under `name/key`; evaluation contexts nest, the first outermost; state is keyed by name.
    """

    name: ClassVar[str] = "chain"

    def __init__(self, *strategies: Strategy) -> None:
        names = [strategy.name for strategy in strategies]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"strategy {repeated[0]!r} appears more than once in the chain")
        self.strategies = tuple(strategies)

    def __repr__(self) -> str:
        return f"Chain({', '.join(repr(strategy) for strategy in self.strategies)})"

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        for strategy in self.strategies:
            strategy.before_run(model, stream, seed)

    def before_task(self, model: nn.Module, task: Task) -> None:
        for strategy in self.strategies:
            strategy.before_task(model, task)

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        for strategy in self.strategies:
            groups = strategy.param_groups(model, groups)
        return groups

    def transform_batch(self, batch: Batch, task: Task) -> Batch:
        for strategy in self.strategies:
            batch = strategy.transform_batch(batch, task)
        return batch

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for strategy in self.strategies:
            for key, value in strategy.loss_terms(model, batch, logits, task).items():
                terms[f"{strategy.name}/{key}"] = value
        return terms

    def after_step(self, model: nn.Module, batch: Batch, task: Task) -> None:
        for strategy in self.strategies:
            strategy.after_step(model, batch, task)

    def after_task(self, model: nn.Module, task: Task) -> None:
        for strategy in self.strategies:
            strategy.after_task(model, task)

    @contextlib.contextmanager
    def eval_context(self, model: nn.Module, task: Task):
        with contextlib.ExitStack() as stack:
            for strategy in self.strategies:
                stack.enter_context(strategy.eval_context(model, task))
            yield

    def state_dict(self) -> dict[str, Any]:
        return {strategy.name: strategy.state_dict() for strategy in self.strategies}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state) - {strategy.name for strategy in self.strategies})
        if unknown:
            raise ValueError(f"state for strategies not in the chain: {', '.join(unknown)}")
        for strategy in self.strategies:
            strategy.load_state_dict(state.get(strategy.name, {}))
