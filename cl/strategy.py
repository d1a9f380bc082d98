"""The Strategy protocol (the runner's hooks) and Chain, which composes strategies in written order.

Every hook takes explicit arguments and returns a value instead of mutating shared state: a
strategy never sees the runner, the optimizer or another strategy. The runner calls, per run:

    check(model, stream, joint)          (also called by `build`, before anything is written)
    before_run(model, stream, seed)
    per task:  before_task -> param_groups -> [per step: transform_batch -> cross_entropy_mask
               -> loss_terms -> (backward) -> adjust_gradients -> (optimizer step) -> after_step]
               -> after_task      (no param_groups and no steps for a task `trains` says no to)
    per evaluated task: eval_context(model, task) around the forward passes, and per batch of
               rows eval_logits(model, split, rows), which may stand in for the forward pass
    after each task, per extra matrix a strategy asks for: eval_variant(name) around a full
               evaluation (EMA's `eval_with=both` records the live weights' matrix this way)

Besides the hooks, a strategy describes itself: `state_dict` (tensors, numbers, strings, lists
and dicts only, so a checkpoint loads with `weights_only=True`), `report` (figures for
metrics.json: bytes held, parameters trained), `artifacts` (tensor files worth keeping on
their own, such as one LoRA adapter per task) and `unchanged_keys` (the frozen base a checkpoint
need not hold).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor, nn

from cl.types import Batch, Split, Stream, Task


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
    # True for a strategy whose `before_task` adds or replaces modules of the model (LoRA's
    # adapters): a strategy that takes stock of the model's parameters in its own `before_task`
    # (EMA's shadow) must come after it in a Chain, and says so in `check_composition`.
    adds_modules: ClassVar[bool] = False
    # True for a strategy that overrides `adjust_gradients`: the runner gathers the gradients
    # into a dict each step only when some strategy of the run asks for them.
    adjusts_gradients: ClassVar[bool] = False
    # True for a strategy whose `eval_logits` scores rows in place of the model's forward pass
    # (a prototype classifier): at most one such strategy in a Chain.
    predicts: ClassVar[bool] = False

    def check_composition(self, chain: tuple[Strategy, ...]) -> None:
        """Raise ValueError if the strategies of `chain` (which holds this one) contradict it."""

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        """Raise UsageError if this strategy cannot train `model` on `stream` (`joint`: in one
        phase over all tasks). No side effects: it runs before a run directory is made, and
        an ablation runs it over every configuration before any run starts."""

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        """Once before any training; `seed` seeds any randomness the strategy owns."""

    def trains(self, task: Task) -> bool:
        """Whether the runner takes gradient steps on `task` (False: a classifier fitted in
        closed form in `after_task`, with no optimizer built). The runner asks once per task
        before the run starts, to count the steps: the answer must follow from the settings."""
        return True

    def before_task(self, model: nn.Module, task: Task) -> None:
        """Before training on `task`, before the optimizer is built: freeze, add adapters."""

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        """Return the optimizer's parameter groups, e.g. with a learning-rate multiplier."""
        return groups

    def transform_batch(self, batch: Batch, task: Task) -> Batch:
        """Return the batch to train on, e.g. with replayed rows appended."""
        return batch

    def cross_entropy_mask(self, batch: Batch, task: Task) -> Tensor | None:
        """Which logits the training cross-entropy sees, per row: a boolean [rows, classes] mask
        (ER-ACE: the incoming rows over the classes present), or None for all of them.

        It must keep every row's own label. In the task scenario the runner also masks each row to
        its task's classes; loss terms and `after_step` still see the raw logits."""
        return None

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        """Extra loss terms, already weighted; they are added to the cross-entropy.

        `logits` are the model's raw outputs on `batch` (never masked, even in the task scenario,
        where only the cross-entropy sees masked logits)."""
        return {}

    def adjust_gradients(self, model: nn.Module, batch: Batch, task: Task,
                         gradients: dict[str, Tensor]) -> dict[str, Tensor]:
        """Between backward and the optimizer step: the gradients the step is to apply, by
        parameter name (those with a gradient), as new tensors, never the given ones changed in
        place (A-GEM's projection, SI's clipping). Called only if `adjusts_gradients` is True."""
        return gradients

    def after_step(self, model: nn.Module, batch: Batch, logits: Tensor, task: Task) -> None:
        """After each optimizer step: EMA update, buffer insertion. `logits` are the raw outputs
        of this step's forward pass (before the update), detached."""

    def after_task(self, model: nn.Module, task: Task) -> None:
        """After the last step on `task`, before the evaluation that fills row `task.index`."""

    def eval_context(self, model: nn.Module, task: Task) -> AbstractContextManager[None]:
        """Context the model is evaluated on `task` in: EMA weights, the task's adapter."""
        return contextlib.nullcontext()

    def eval_logits(self, model: nn.Module, split: Split, rows: slice | Tensor
                    ) -> Tensor | None:
        """The logits of `rows` of `split` (an evaluated task's test or validation rows) in
        place of the model's forward pass, or None to let the runner forward them. Called
        inside `eval_context`, in inference mode, once per batch of rows; only strategies with
        `predicts = True` are asked."""
        return None

    def eval_variants(self) -> tuple[str, ...]:
        """Names of extra accuracy matrices to record after each task besides R."""
        return ()

    def eval_variant(self, variant: str) -> AbstractContextManager[None]:
        """Context in which `eval_context` evaluates as `variant` asks (a name it may not own)."""
        return contextlib.nullcontext()

    def report(self) -> dict[str, Any]:
        """Figures for metrics.json (JSON values): memory held, parameters trained per task."""
        return {}

    def artifacts(self) -> dict[str, dict[str, Tensor]]:
        """Named tensor dicts worth saving as files of their own (safetensors) with a checkpoint."""
        return {}

    def unchanged_keys(self, model: nn.Module) -> frozenset[str]:
        """Keys of `model.state_dict()` this strategy keeps exactly as the model was built (a
        frozen pretrained base under adapters or prompts): checkpoints leave them out, and a
        resumed run has them from the model it builds again from the same source and seed.
        Asked after each task; every parameter named must have requires_grad off."""
        return frozenset()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state but was given {sorted(state)}")


def after_module_changes(strategy: Strategy, chain: tuple[Strategy, ...], why: str) -> None:
    """Raise ValueError when a strategy that adds modules (`adds_modules`) comes after
    `strategy` in `chain`: `strategy` would take stock of the model before they act (`why`)."""
    later = [other.name for other in chain[chain.index(strategy) + 1:] if other.adds_modules]
    if later:
        raise ValueError(f"{strategy.name} must come after {later[0]} in the chain: {why} "
                         f"(write --strategy {later[0]} ... before --strategy {strategy.name})")


class Chain(Strategy):
    """Several strategies as one: hooks run in the order written, like `optax.chain`.

    Batches, parameter groups and gradients thread through the strategies in order; cross-entropy
    masks combine (a logit is seen only if every mask keeps it); loss terms are merged under
    `name/key`; evaluation contexts nest, the first outermost; state is keyed by name.
    """

    name: ClassVar[str] = "chain"

    def __init__(self, *strategies: Strategy) -> None:
        names = [strategy.name for strategy in strategies]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"strategy {repeated[0]!r} appears more than once in the chain")
        self.strategies = tuple(strategies)
        predictors = [strategy.name for strategy in self.strategies if strategy.predicts]
        if len(predictors) > 1:
            raise ValueError(f"{predictors[0]} and {predictors[1]} both score the evaluated rows "
                             "themselves; keep one")
        for strategy in self.strategies:
            strategy.check_composition(self.strategies)
        self.adjusts_gradients = any(strategy.adjusts_gradients for strategy in self.strategies)
        self.predicts = bool(predictors)

    def __repr__(self) -> str:
        return f"Chain({', '.join(repr(strategy) for strategy in self.strategies)})"

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        for strategy in self.strategies:
            strategy.check(model, stream, joint)

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        for strategy in self.strategies:
            strategy.before_run(model, stream, seed)

    def trains(self, task: Task) -> bool:
        return all(strategy.trains(task) for strategy in self.strategies)

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

    def cross_entropy_mask(self, batch: Batch, task: Task) -> Tensor | None:
        combined = None
        for strategy in self.strategies:
            mask = strategy.cross_entropy_mask(batch, task)
            if mask is not None:
                combined = mask if combined is None else combined & mask
        return combined

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        for strategy in self.strategies:
            for key, value in strategy.loss_terms(model, batch, logits, task).items():
                terms[f"{strategy.name}/{key}"] = value
        return terms

    def adjust_gradients(self, model: nn.Module, batch: Batch, task: Task,
                         gradients: dict[str, Tensor]) -> dict[str, Tensor]:
        for strategy in self.strategies:
            if strategy.adjusts_gradients:
                gradients = strategy.adjust_gradients(model, batch, task, gradients)
        return gradients

    def after_step(self, model: nn.Module, batch: Batch, logits: Tensor, task: Task) -> None:
        for strategy in self.strategies:
            strategy.after_step(model, batch, logits, task)

    def after_task(self, model: nn.Module, task: Task) -> None:
        for strategy in self.strategies:
            strategy.after_task(model, task)

    @contextlib.contextmanager
    def eval_context(self, model: nn.Module, task: Task):
        with contextlib.ExitStack() as stack:
            for strategy in self.strategies:
                stack.enter_context(strategy.eval_context(model, task))
            yield

    def eval_logits(self, model: nn.Module, split: Split, rows: slice | Tensor
                    ) -> Tensor | None:
        for strategy in self.strategies:
            if strategy.predicts:
                return strategy.eval_logits(model, split, rows)
        return None

    def eval_variants(self) -> tuple[str, ...]:
        variants: list[str] = []
        for strategy in self.strategies:
            variants += [v for v in strategy.eval_variants() if v not in variants]
        return tuple(variants)

    @contextlib.contextmanager
    def eval_variant(self, variant: str):
        with contextlib.ExitStack() as stack:
            for strategy in self.strategies:
                stack.enter_context(strategy.eval_variant(variant))
            yield

    def report(self) -> dict[str, Any]:
        return {s.name: report for s in self.strategies if (report := s.report())}

    def artifacts(self) -> dict[str, dict[str, Tensor]]:
        return {f"{strategy.name}/{key}": tensors for strategy in self.strategies
                for key, tensors in strategy.artifacts().items()}

    def unchanged_keys(self, model: nn.Module) -> frozenset[str]:
        # What one strategy keeps frozen no other can train: the runner checks requires_grad.
        return frozenset().union(*(strategy.unchanged_keys(model)
                                   for strategy in self.strategies))

    def state_dict(self) -> dict[str, Any]:
        return {strategy.name: strategy.state_dict() for strategy in self.strategies}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = sorted(set(state) - {strategy.name for strategy in self.strategies})
        if unknown:
            raise ValueError(f"state for strategies not in the chain: {', '.join(unknown)}")
        for strategy in self.strategies:
            strategy.load_state_dict(state.get(strategy.name, {}))
