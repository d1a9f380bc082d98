"""Synaptic Intelligence (Zenke et al., "Continual Learning Through Synaptic Intelligence", ICML
2017): each weight's importance is the path integral of the loss along its training
trajectory, omega_i = sum over steps of -g_i * (w_i after - w_i before); after each task
Omega_i += omega_i / ((w_i - w*_i)^2 + xi), w* moves to the trained weights and omega restarts;
while training, `strength` times sum_i Omega_i (w_i - w*_i)^2 joins the loss.

As the DER table's code does (aimagelab/mammoth, models/si.py): g is the gradient the step
applied (the whole loss's, penalty included); with plain SGD the path integral is then their
`lr * g^2`. Their SI also clips every gradient entry to [-1, 1] before the step:
`clip_value=1` does that here (None by default, as in the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from cl.models import device_of
from cl.strategy import Strategy, after_module_changes
from cl.types import Batch, Stream, Task, check_hook_arguments, to_device


def _check_non_negative(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


@dataclass(frozen=True)
class SIConfig:
    """Settings of `si:key=value,...`."""

    strength: float = 1.0  # c: weight of the penalty sum_i Omega_i (w_i - w*_i)^2
    damping: float = 0.1  # xi: keeps Omega finite for weights that barely moved
    clip_value: float | None = None  # clip each gradient entry to [-v, v] before the step

    def __post_init__(self) -> None:
        _check_non_negative("strength", self.strength)
        _check_non_negative("damping", self.damping)
        if self.damping == 0:
            raise ValueError("damping must be positive (it divides by the squared distance "
                             "moved plus damping), got 0")
        if self.clip_value is not None:
            _check_non_negative("clip_value", self.clip_value)
            if self.clip_value == 0:
                raise ValueError("clip_value must be positive or None, got 0")


def path_integral_step(gradient: Tensor, before: Tensor, after: Tensor) -> Tensor:
    """One step's contribution to a weight's importance: -g * (w after - w before)."""
    return -gradient * (after - before)


def consolidate(importance: Tensor, path: Tensor, weights: Tensor, anchor: Tensor,
                damping: float) -> Tensor:
    """Omega after a task: the old one plus the task's path integral over its squared
    distance moved (plus `damping`)."""
    return importance + path / ((weights - anchor).pow(2) + damping)


def si_penalty(model: nn.Module, importance: dict[str, Tensor], anchor: dict[str, Tensor]
               ) -> Tensor:
    """sum_i Omega_i (w_i - w*_i)^2 over the weights with an importance: zero at the anchor.

    A weight under another name for now (a layer LoRA wraps during a task, frozen there) is
    left out."""
    parameters = dict(model.named_parameters())
    terms = [(importance[name] * (parameters[name] - anchor[name]).pow(2)).sum()
             for name in importance if name in parameters]
    if not terms:
        return torch.zeros((), device=next(iter(importance.values())).device)
    return torch.stack(terms).sum()


class SI(Strategy):
    """Synaptic intelligence: a pull toward the last task's weights, by path-integral importance.

    Each weight is held by the loss decrease it caused while it moved."""

    name: ClassVar[str] = "si"
    config_class: ClassVar[type] = SIConfig

    def __init__(self, config: SIConfig | None = None) -> None:
        self.config = config if config is not None else SIConfig()
        # Clipping is the only thing done between backward and the optimizer step.
        self.adjusts_gradients = self.config.clip_value is not None
        self.importance: dict[str, Tensor] | None = None  # Omega: None before the first task ends
        self.anchor: dict[str, Tensor] | None = None  # w*: the weights at the last task's end
        self.path: dict[str, Tensor] | None = None  # omega: this task's path integral so far
        self.previous: dict[str, Tensor] | None = None  # the weights before this step
        self.device: torch.device | None = None

    def __repr__(self) -> str:
        return f"SI({self.config})"

    def check_composition(self, chain: tuple[Strategy, ...]) -> None:
        after_module_changes(self, chain, "si follows the weights by name from the start of the "
                             "run, and a module added or merged after it would rename them")

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("si.before_run", model=model, stream=stream, seed=seed)
        self.device = device_of(model)
        # The reference anchors the first task at the initial weights too (it has no penalty
        # then, as Omega is still zero, but its first Omega divides by the distance from them).
        self.anchor = self._weights(model)

    def before_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("si.before_task", model=model, task=task)
        self._check_started("before_task")
        self.previous = self._weights(model)
        if self.path is None:
            self.path = {}
        for name, value in self.previous.items():  # weights new since (LoRA's adapters)
            if name not in self.anchor:
                self.anchor[name] = value.clone()
            if name not in self.path:
                self.path[name] = torch.zeros_like(value)

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        check_hook_arguments("si.loss_terms", model=model, batch=batch, logits=logits, task=task)
        if self.importance is None:
            return {}  # the first task: nothing to keep yet
        return {"penalty": self.config.strength * si_penalty(model, self.importance,
                                                             self.anchor)}

    def adjust_gradients(self, model: nn.Module, batch: Batch, task: Task,
                         gradients: dict[str, Tensor]) -> dict[str, Tensor]:
        limit = self.config.clip_value
        return {name: gradient.clamp(-limit, limit) for name, gradient in gradients.items()}

    def after_step(self, model: nn.Module, batch: Batch, logits: Tensor, task: Task) -> None:
        check_hook_arguments("si.after_step", model=model, batch=batch, logits=logits, task=task)
        if self.previous is None:
            raise RuntimeError("si.after_step: call before_task(model, task) first")
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name not in self.previous:
                    continue
                if parameter.grad is not None:  # the gradient this step applied
                    self.path[name] += path_integral_step(parameter.grad, self.previous[name],
                                                          parameter)
                self.previous[name].copy_(parameter)

    def after_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("si.after_task", model=model, task=task)
        self._check_started("after_task")
        weights = self._weights(model)
        importance = self.importance or {}
        # A weight the task renamed (lora:merge folds its adapter back into the layer) has no
        # path under its new name: it gets no importance for this task.
        self.importance = {name: consolidate(importance.get(name, torch.zeros_like(weight)),
                                             self.path.get(name, torch.zeros_like(weight)),
                                             weight, self.anchor.get(name, weight),
                                             self.config.damping)
                           for name, weight in weights.items()}
        self.anchor = weights
        self.path = {name: torch.zeros_like(value) for name, value in weights.items()}

    def _weights(self, model: nn.Module) -> dict[str, Tensor]:
        # Every parameter, frozen ones too: one that never moves gets zero importance, and the
        # names stay the same when a freeze strategy changes what trains between tasks.
        return {name: p.detach().clone() for name, p in model.named_parameters()}

    def _check_started(self, hook: str) -> None:
        if self.anchor is None:
            raise RuntimeError(f"si.{hook}: call before_run(model, stream, seed) first")

    def report(self) -> dict[str, Any]:
        if self.importance is None:
            return {}
        return {"importance_mean": float(torch.cat([o.flatten() for o in
                                                    self.importance.values()]).mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance, "anchor": self.anchor, "path": self.path}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A checkpoint loads on the CPU: the penalty needs its tensors where the model is.
        device = self.device or torch.device("cpu")
        self.importance, self.anchor, self.path = (
            None if state.get(key) is None else to_device(state[key], device)
            for key in ("importance", "anchor", "path"))
