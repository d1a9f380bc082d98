"""Online EWC (Schwarz et al. 2018, "Progress & Compress"; Kirkpatrick et al. 2017): after each
task, the diagonal of the Fisher information at the trained weights, added to the running one
decayed by `gamma`; while training, `strength` times sum_i F_i (w_i - w*_i)^2, with w* the weights
after the last task.

The Fisher is the one of mammoth's `ewc_on` (the DER table's): per training row, the squared
gradient of log p(y | x) at the row's true label, weighted by p(y | x), averaged over the rows.
Per-row gradients come from `torch.func` (`vmap` of `grad`), a chunk of rows at a time, with
the model in eval mode (the weights the evaluation would see).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from cl.errors import UsageError
from cl.models import device_of, eval_mode, logits_of, model_input
from cl.strategy import Strategy, after_module_changes
from cl.types import Batch, Split, Stream, Task, check_hook_arguments, to_device


@dataclass(frozen=True)
class EWCConfig:
    """Settings of `ewc:key=value,...`."""

    strength: float = 1.0  # lambda: weight of the penalty sum_i F_i (w_i - w*_i)^2
    gamma: float = 1.0  # decay of the running Fisher at each new task (1: every task counts)
    chunk: int = 256  # rows whose per-row gradients are taken at once (memory, not results)

    def __post_init__(self) -> None:
        for name in ("strength", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if self.gamma > 1:
            raise ValueError(f"gamma must be at most 1 (a decay), got {self.gamma}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk <= 0:
            raise ValueError(f"chunk must be a positive integer, got {self.chunk!r}")


def ewc_penalty(model: nn.Module, fisher: dict[str, Tensor], anchor: dict[str, Tensor]
                ) -> Tensor:
    """sum_i F_i (w_i - w*_i)^2 over the parameters the Fisher covers: zero at the anchor."""
    parameters = dict(model.named_parameters())
    terms = [(fisher[name] * (parameters[name] - anchor[name]).pow(2)).sum() for name in fisher]
    return torch.stack(terms).sum()



def linear_layers(model: nn.Module) -> dict[str, nn.Linear] | None:
    """The model's linear layers by name when every trainable parameter is one of their weights
    or biases (an MLP), else None."""
    layers = {name: module for name, module in model.named_modules()
              if isinstance(module, nn.Linear)}
    covered = {f"{name}.{kind}" for name in layers for kind in ("weight", "bias")}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    return layers if trainable <= covered else None


def linear_fisher(model: nn.Module, layers: dict[str, nn.Linear], split: Split,
                  allowed: Tensor | None, chunk: int) -> dict[str, Tensor] | None:
    """`fisher_diagonal` for a model whose trainable parameters are all in linear layers, in
    one forward and backward pass per chunk instead of a gradient per row.

    Row i's gradient of a layer's weight is the outer product of d log p_i / d output_i and the
    layer's input a_i (rows do not interact in eval mode), so sum_i p_i g_i^2 is
    (p * delta^2)^T (a^2), and for the bias the sum of p * delta^2 (Goodfellow 2015, "Efficient
    per-example gradient computations"). None, for the general path to take over, when a layer
    runs more than once per forward or sees inputs that are not [rows, features]."""
    inputs: dict[str, list[Tensor]] = {name: [] for name in layers}
    outputs: dict[str, list[Tensor]] = {name: [] for name in layers}

    def keep(name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            inputs[name].append(args[0].detach())
            outputs[name].append(output)
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in trainable.items()}
    try:
        with eval_mode(model):
            for start in range(0, len(split), chunk):
                rows = slice(start, start + chunk)
                for kept in (*inputs.values(), *outputs.values()):
                    kept.clear()
                logits = logits_of(model, split.rows(rows))
                if any(len(kept) != 1 or kept[0].dim() != 2 for kept in inputs.values()):
                    return None
                if allowed is not None:
                    logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
                log_p = F.log_softmax(logits, 1).gather(1, split.y[rows].unsqueeze(1))[:, 0]
                names = [name for name in layers if outputs[name][0].requires_grad]
                deltas = torch.autograd.grad(log_p.sum(), [outputs[n][0] for n in names],
                                             allow_unused=True)
                weight = log_p.detach().exp().unsqueeze(1)
                for name, delta in zip(names, deltas, strict=True):
                    if delta is None:
                        continue
                    weighted = weight * delta.pow(2)  # [rows, out]
                    if f"{name}.weight" in total:
                        total[f"{name}.weight"] += weighted.T @ inputs[name][0].pow(2)
                    if f"{name}.bias" in total:
                        total[f"{name}.bias"] += weighted.sum(0)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value / max(len(split), 1) for name, value in total.items()}


def fisher_diagonal(model: nn.Module, split: Split, allowed: Tensor | None,
                    chunk: int) -> dict[str, Tensor]:
    """The mean over `split`'s rows of p(y|x) * (d log p(y|x) / dw)^2, per trainable parameter;
    `allowed` (bool, classes) restricts the softmax to a task's classes (the task scenario).

    A model whose trainable parameters are all in linear layers takes `linear_fisher`; others
    take a gradient per row (`torch.func`, `chunk` rows at a time)."""
    if not isinstance(split.x, dict) and (layers := linear_layers(model)) is not None:
        fisher = linear_fisher(model, layers, split, allowed, chunk)
        if fisher is not None:
            return fisher
    return per_row_fisher(model, split, allowed, chunk)


def per_row_fisher(model: nn.Module, split: Split, allowed: Tensor | None,
                   chunk: int) -> dict[str, Tensor]:
    """`fisher_diagonal` from a gradient per row, for any model."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    parameters = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def log_likelihood(weights: dict[str, Tensor], x: Tensor, y: Tensor
                       ) -> tuple[Tensor, Tensor]:
        logits = functional_call(model, (weights, frozen, buffers), (x.unsqueeze(0),))[0]
        if allowed is not None:
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        value = F.log_softmax(logits, 0).gather(0, y.unsqueeze(0))[0]  # vmap: no indexing
        return value, value.detach()

    per_row = vmap(grad(log_likelihood, has_aux=True), in_dims=(None, 0, 0))
    total = {name: torch.zeros_like(parameters[name]) for name in names}
    with eval_mode(model):
        for start in range(0, len(split), chunk):
            rows = slice(start, start + chunk)
            x = split.rows(rows)
            if isinstance(x, dict):
                raise ValueError("ewc computes its Fisher for tensor inputs; a tokenized "
                                 "text stream is not supported yet")
            gradients, log_p = per_row(parameters, model_input(x), split.y[rows])
            weight = log_p.exp()
            for name in names:
                shape = (-1,) + (1,) * (gradients[name].dim() - 1)
                total[name] += (weight.view(shape) * gradients[name].pow(2)).sum(0)
    return {name: value / max(len(split), 1) for name, value in total.items()}


class EWC(Strategy):
    """Online elastic weight consolidation: a pull toward the last task's weights, by Fisher.

    Each weight is held by its (decayed, accumulated) Fisher information."""

    name: ClassVar[str] = "ewc"
    config_class: ClassVar[type] = EWCConfig

    def __init__(self, config: EWCConfig | None = None) -> None:
        self.config = config if config is not None else EWCConfig()
        self.fisher: dict[str, Tensor] | None = None
        self.anchor: dict[str, Tensor] | None = None
        self.scenario: str | None = None
        self.class_mask: Tensor | None = None
        self.device: torch.device | None = None

    def __repr__(self) -> str:
        return f"EWC({self.config})"

    def check_composition(self, chain: tuple[Strategy, ...]) -> None:
        after_module_changes(self, chain, "ewc anchors the weights by name after each task, and "
                             "a module added or merged after it would rename them")

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        if isinstance(stream.tasks[0].train.x, dict):
            raise UsageError("ewc computes its Fisher from tensor inputs; a tokenized text "
                             f"stream ({stream.name!r}) is not supported")

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("ewc.before_run", model=model, stream=stream, seed=seed)
        self.scenario = stream.scenario
        self.device = device_of(model)
        self.class_mask = stream.class_mask().to(self.device)

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        check_hook_arguments("ewc.loss_terms", model=model, batch=batch, logits=logits,
                             task=task)
        if self.fisher is None:
            return {}  # the first task: nothing to keep yet
        return {"penalty": self.config.strength * ewc_penalty(model, self.fisher, self.anchor)}

    def after_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("ewc.after_task", model=model, task=task)
        allowed = self.class_mask[task.index] if self.scenario == "task" else None
        fisher = fisher_diagonal(model, task.train, allowed, self.config.chunk)
        if self.fisher is not None:
            fisher = {name: self.config.gamma * self.fisher[name] + value
                      if name in self.fisher else value for name, value in fisher.items()}
        self.fisher = fisher
        self.anchor = {name: p.detach().clone() for name, p in model.named_parameters()
                       if name in fisher}

    def report(self) -> dict[str, Any]:
        if self.fisher is None:
            return {}
        return {"fisher_mean": float(torch.cat([f.flatten() for f in self.fisher.values()])
                                     .mean())}

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # A checkpoint loads on the CPU: the penalty needs both where the model is.
        device = self.device or torch.device("cpu")
        self.fisher, self.anchor = (None if state.get(key) is None
                                    else to_device(state[key], device)
                                    for key in ("fisher", "anchor"))
