"""Freeze: fix chosen parameters (by name pattern, by depth, or all but the head) and scale the
learning rate of others (the fine-tuning recipe's head at 10x)."""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from cl.errors import UsageError
from cl.models import find_head, repeated_blocks, under
from cl.strategy import Strategy
from cl.types import Stream, Task

log = logging.getLogger(__name__)


def parse_lr_mult(items: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """`("head.*=10", "body.*=0.5")` -> `(("head.*", 10.0), ("body.*", 0.5))`; the factor
    follows the last `=` so a pattern may not hold one."""
    pairs = []
    for item in items:
        pattern, sep, factor = item.rpartition("=")
        if not sep or not pattern:
            raise ValueError(f"lr_mult entry {item!r} must be pattern=factor, e.g. head.*=10")
        try:
            value = float(factor)
        except ValueError:
            raise ValueError(f"lr_mult factor {factor!r} in {item!r} is not a number") from None
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"lr_mult factor in {item!r} must be a positive number")
        pairs.append((pattern, value))
    return tuple(pairs)


@dataclass(frozen=True)
class FreezeConfig:
    """What to freeze; with none of patterns, depth, blocks, lr_mult: everything but the head."""

    patterns: tuple[str, ...] = ()  # globs on parameter names, e.g. "body.0.*|body.2.*"
    depth: int = 0  # freeze the first `depth` layers (modules holding parameters), input first
    head_only: bool = False  # train the head alone
    # Freeze what comes before the model's repeated blocks (a transformer's embeddings) and the
    # first `blocks` blocks (its lower layers).
    blocks: int = 0
    after_task: int = 0  # start freezing at this task index (FACIL's freeze-after)
    lr_mult: tuple[str, ...] = ()  # "pattern=factor": learning-rate multipliers, first match wins
    bn_eval: bool = False  # keep frozen BatchNorm layers in eval mode: their statistics stay too

    def __post_init__(self) -> None:
        if self.blocks < 0:
            raise ValueError(f"blocks must not be negative, got {self.blocks}")
        if self.depth < 0:
            raise ValueError(f"depth must not be negative, got {self.depth}")
        if self.after_task < 0:
            raise ValueError(f"after_task must not be negative, got {self.after_task}")
        parse_lr_mult(self.lr_mult)
        if not (self.patterns or self.depth or self.blocks or self.head_only or self.lr_mult):
            # `freeze` alone, on the CLI as in the library: the linear-probe recipe.
            object.__setattr__(self, "head_only", True)


def layers_with_parameters(model: nn.Module) -> list[str]:
    """Names of the modules that hold parameters of their own, in registration order."""
    return [name for name, module in model.named_modules()
            if next(module.parameters(recurse=False), None) is not None]


def frozen_names(model: nn.Module, config: FreezeConfig) -> set[str]:
    """The parameter names `config` freezes in `model`."""
    names = [name for name, _ in model.named_parameters()]
    frozen = {name for name in names
              if any(fnmatch.fnmatchcase(name, pattern) for pattern in config.patterns)}
    if config.depth:
        layers = layers_with_parameters(model)[:config.depth]
        frozen |= {name for name in names if any(under(name, layer) for layer in layers)}
    if config.blocks:
        blocks = repeated_blocks(model)
        first = blocks[0]
        # Parameters registered before the first block: the embeddings.
        start = next(index for index, name in enumerate(names) if under(name, first))
        frozen |= set(names[:start])
        frozen |= {name for name in names
                   if any(under(name, block) for block in blocks[:config.blocks])}
    if config.head_only:
        head = find_head(model)
        frozen |= {name for name in names if not under(name, head)}
    return frozen


class Freeze(Strategy):
    """Freeze parameters from task `after_task` on; multiply learning rates by pattern.

    Frozen parameters get `requires_grad=False` before the optimizer is built, so the optimizer
    never holds them and they stay bitwise unchanged (no weight decay, no momentum)."""

    name: ClassVar[str] = "freeze"
    config_class: ClassVar[type] = FreezeConfig

    def __init__(self, config: FreezeConfig | None = None) -> None:
        self.config = config if config is not None else FreezeConfig()
        self.multipliers = parse_lr_mult(self.config.lr_mult)
        self.frozen: set[str] = set()

    def __repr__(self) -> str:
        return f"Freeze({self.config})"

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        phases = 1 if joint else len(stream.tasks)
        if self.config.after_task >= phases:
            raise UsageError(f"freeze after_task={self.config.after_task} would never act: the "
                             f"run trains {phases} phase(s)" + (" (--joint)" if joint else ""))
        names = [name for name, _ in model.named_parameters()]
        checks = [("pattern", p) for p in self.config.patterns]
        checks += [("lr_mult pattern", p) for p, _ in self.multipliers]
        for what, pattern in checks:
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise UsageError(f"freeze {what} {pattern!r} matches no parameter "
                                 f"(names look like {', '.join(names[:4])})")
        if self.config.blocks:
            blocks = repeated_blocks(model)
            if not blocks:
                raise UsageError(f"freeze blocks={self.config.blocks}: {type(model).__name__} "
                                 "has no repeated blocks (use depth or patterns)")
            if self.config.blocks > len(blocks):
                raise UsageError(f"freeze blocks={self.config.blocks} is more than the "
                                 f"{len(blocks)} blocks of the model")
        if self.config.depth > len(layers_with_parameters(model)):
            raise UsageError(f"freeze depth {self.config.depth} is more than the "
                             f"{len(layers_with_parameters(model))} layers of the model")

    def before_task(self, model: nn.Module, task: Task) -> None:
        if task.index < self.config.after_task:
            return
        self.frozen = frozen_names(model, self.config)
        for name, parameter in model.named_parameters():
            if name in self.frozen:
                parameter.requires_grad_(False)
        if self.config.bn_eval:
            for name, module in model.named_modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
                        under(parameter, name) for parameter in self.frozen):
                    module.eval()
        log.info("freeze: %d parameter tensors frozen from task %d", len(self.frozen), task.index)

    def param_groups(self, model: nn.Module, groups: list[dict]) -> list[dict]:
        if not self.multipliers:
            return groups
        names = {id(parameter): name for name, parameter in model.named_parameters()}
        result = []
        for group in groups:
            # One group per multiplier (and one for the rest), each keeping the group's settings.
            buckets: dict[float, list] = {}
            for parameter in group["params"]:
                name = names.get(id(parameter), "")
                factor = next((f for p, f in self.multipliers if fnmatch.fnmatchcase(name, p)),
                              1.0)
                buckets.setdefault(factor, []).append(parameter)
            for factor, parameters in buckets.items():
                result.append({**group, "params": parameters, "lr": group["lr"] * factor})
        return result

    def report(self) -> dict[str, Any]:
        return {"frozen_tensors": len(self.frozen)}
