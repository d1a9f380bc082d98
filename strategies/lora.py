"""LoRA per task: a fresh low-rank adapter (peft) per task on chosen layers of any model, the base
and earlier adapters frozen, and the evaluated task's adapter active at test time."""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from torch import Tensor, nn

from cl.errors import UsageError
from cl.models import find_head, repeated_blocks, trainable_parameters, under
from cl.strategy import Strategy
from cl.types import Stream, Task

log = logging.getLogger(__name__)

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8  # the rank of each adapter's update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input, in training
    # Globs on module names; empty: the linear layers of the repeated blocks (attention and
    # feed-forward of a transformer), else every linear/conv layer but the head.
    targets: tuple[str, ...] = ()
    # None: per_task, or shared with merge (a merged model has one head for every task).
    head: Literal["shared", "per_task"] | None = None
    merge: bool = False  # fold each adapter into the base after its task: no task id needed

    def __post_init__(self) -> None:
        if self.head is None:
            object.__setattr__(self, "head", "shared" if self.merge else "per_task")
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a positive number, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.head not in ("shared", "per_task"):
            raise ValueError(f"head must be shared or per_task, got {self.head!r}")
        if self.merge and self.head == "per_task":
            raise ValueError("merge folds every adapter into one model, so it needs head=shared")


def adapter_name(task_index: int) -> str:
    return f"task{task_index}"


def target_modules(model: nn.Module, patterns: tuple[str, ...], head: str) -> list[str]:
    """Full names of the layers to adapt: those matching `patterns`; without patterns, the
    linear layers of the model's repeated blocks (a transformer's attention and feed-forward
    layers), or every linear and conv layer outside the head for a model without blocks."""
    blocks = repeated_blocks(model) if not patterns else []
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, ADAPTABLE) or under(name, head):
            continue
        if patterns and not any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        if blocks and not (isinstance(module, nn.Linear)
                           and any(under(name, block) for block in blocks)):
            continue
        if not patterns and isinstance(module, nn.Embedding):
            continue
        names.append(name)
    return names


def layer_width(module: nn.Module) -> int:
    """The largest rank an update of `module`'s weight can have: the smaller side of the weight
    as a matrix (a conv's input side is its channels times its kernel, what its adapter's first
    conv reads)."""
    if isinstance(module, nn.Embedding):
        return min(module.num_embeddings, module.embedding_dim)
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    return min(module.in_channels * math.prod(module.kernel_size), module.out_channels)


def describe_layer(module: nn.Module) -> str:
    """A layer's type and sizes, as a message shows them: `Linear 64 -> 16`."""
    if isinstance(module, nn.Embedding):
        return f"Embedding {module.num_embeddings} x {module.embedding_dim}"
    if isinstance(module, nn.Linear):
        return f"Linear {module.in_features} -> {module.out_features}"
    kernel = "x".join(map(str, module.kernel_size))
    return (f"{type(module).__name__} {module.in_channels} -> {module.out_channels} channels, "
            f"kernel {kernel}")


def tuner_layers(model: nn.Module) -> list[nn.Module]:
    """peft's adapter-holding modules: LoRA layers and the per-adapter head copies."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the active one; peft marks it trainable and every other one frozen."""
    from peft.utils import ModulesToSaveWrapper

    for layer in tuner_layers(model):
        layer.enable_adapters(True)
        layer.set_adapter(name)
        if isinstance(layer, ModulesToSaveWrapper):
            # peft only unfreezes here; a head copy injected beside an active one stays
            # trainable unless told otherwise.
            for key, head in layer.modules_to_save.items():
                head.requires_grad_(key == name)


def disable_adapters(model: nn.Module) -> None:
    for layer in tuner_layers(model):
        layer.enable_adapters(False)


def adapter_state(model: nn.Module, name: str) -> dict[str, Tensor]:
    """The weights of adapter `name` alone (LoRA matrices and its head copy), detached copies."""
    return {key: value.detach().clone() for key, value in model.state_dict().items()
            if f".{name}." in f".{key}."}


def unwrap_merged(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights and put the plain base layers back."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, BaseTunerLayer):
                child.merge(adapter_names=[name])
                setattr(parent, child_name, child.get_base_layer())


class LoRA(Strategy):
    """One LoRA adapter per task through peft's `inject_adapter_in_model`, on any nn.Module.

    Each task gets adapter `task<k>` (B = 0, so it starts as the identity); only it (and, with
    `head=per_task`, its own copy of the head) trains. Evaluating task j activates adapter j;
    tasks not trained yet are evaluated on the base model alone. With `merge=true` each adapter
    is folded into the base after its task, which needs no task id at test time.
    """

    name: ClassVar[str] = "lora"
    config_class: ClassVar[type] = LoRAConfig
    adds_modules: ClassVar[bool] = True  # an adapter (and a head copy) per task, in before_task

    def __init__(self, config: LoRAConfig | None = None) -> None:
        self.config = config if config is not None else LoRAConfig()
        self.adapters: list[str] = []  # adapters injected so far, in task order
        self.trainable_per_task: list[int] = []
        self.merged: dict[str, dict[str, Tensor]] = {}  # merge=true keeps each adapter's weights
        self.current: str | None = None

    def __repr__(self) -> str:
        return f"LoRA({self.config})"

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        if stream.scenario == "class" and not self.config.merge:
            raise UsageError("lora picks each task's adapter by task id, which the class "
                             "scenario hides at test time: use --scenario task or domain, "
                             "or lora:merge=true")
        if joint and not self.config.merge:
            raise UsageError("lora trains one adapter per task, but --joint trains all tasks "
                             "as one: train sequentially, or use lora:merge=true (one adapter "
                             "over all tasks, folded into the model)")
        targets = target_modules(model, self.config.targets, find_head(model))
        if not targets:
            patterns = "|".join(self.config.targets) or "(every linear or conv layer)"
            raise UsageError(f"lora targets {patterns} match no adaptable layer of the model")
        # A rank above a layer's width adds parameters and no capacity: the update B @ A cannot
        # have a higher rank than the weight's smaller side. The narrowest layer bounds them all.
        width, name = min((layer_width(model.get_submodule(name)), name) for name in targets)
        if self.config.rank > width:
            raise UsageError(f"lora rank {self.config.rank} exceeds the width {width} of layer "
                             f"{name!r} ({describe_layer(model.get_submodule(name))}): use "
                             f"lora:rank={width} or less, or targets that leave it out")

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        self.model = model
        self.head = find_head(model)
        self.targets = target_modules(model, self.config.targets, self.head)

    def add_adapter(self, model: nn.Module, task_index: int) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        name = adapter_name(task_index)
        peft_config = LoraConfig(
            r=self.config.rank, lora_alpha=self.config.alpha, lora_dropout=self.config.dropout,
            target_modules=self.targets, init_lora_weights=True,
            modules_to_save=[self.head] if self.config.head == "per_task" else None)
        with warnings.catch_warnings():
            # peft warns that a second adapter joins the first: one per task is the point.
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            inject_adapter_in_model(peft_config, model, adapter_name=name)
        self.adapters.append(name)
        self.activate_for_training(model, name)

    def activate_for_training(self, model: nn.Module, name: str) -> None:
        set_adapter(model, name)
        # peft freezes every base parameter; a shared head keeps learning.
        if self.config.head == "shared":
            for parameter_name, parameter in model.named_parameters():
                if under(parameter_name, self.head) and ".original_module." not in parameter_name:
                    parameter.requires_grad_(True)
        self.current = name

    def before_task(self, model: nn.Module, task: Task) -> None:
        self.add_adapter(model, task.index)
        trainable = trainable_parameters(model)
        self.trainable_per_task.append(trainable)
        log.info("lora: adapter %s, %d trainable parameters", self.current, trainable)

    def after_task(self, model: nn.Module, task: Task) -> None:
        if self.config.merge:
            name = adapter_name(task.index)
            self.merged[name] = adapter_state(model, name)
            unwrap_merged(model, name)
            self.current = None

    def eval_context(self, model: nn.Module, task: Task) -> AbstractContextManager[None]:
        if self.config.merge or not self.adapters:
            return contextlib.nullcontext()
        return self.task_adapter(model, task)

    @contextlib.contextmanager
    def task_adapter(self, model: nn.Module, task: Task) -> Iterator[None]:
        """Task `task`'s adapter active, or the base alone for a task not trained yet."""
        name = adapter_name(task.index)
        if name in self.adapters:
            set_adapter(model, name)
        else:
            disable_adapters(model)
        try:
            yield
        finally:
            # Back to the adapter being trained, with peft's trainable flags as they were.
            self.activate_for_training(model, self.current or self.adapters[-1])

    def report(self) -> dict[str, Any]:
        return {"adapters": len(self.adapters), "targets": self.targets,
                "trainable_parameters_per_task": list(self.trainable_per_task)}

    def artifacts(self) -> dict[str, dict[str, Tensor]]:
        if self.config.merge:
            return dict(self.merged)
        return {name: adapter_state(self.model, name) for name in self.adapters}

    def state_dict(self) -> dict[str, Any]:
        # The adapters' weights live in the model's state dict; this is what rebuilds the model's
        # shape around them on resume.
        return {"adapters": len(self.adapters), "trainable_per_task": list(self.trainable_per_task),
                "merged": dict(self.merged)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        count = int(state["adapters"])
        self.adapters = []
        self.merged = dict(state.get("merged", {}))
        if not self.config.merge:
            # Fresh adapters of the right shape; the runner then loads their trained weights.
            for index in range(count):
                self.add_adapter(self.model, index)
        else:
            self.adapters = [adapter_name(index) for index in range(count)]
        self.trainable_per_task = [int(n) for n in state["trainable_per_task"]]
