"""LoRA per task: a fresh low-rank adapter (peft) per task on chosen layers of any model, the base
and earlier adapters frozen, and the evaluated task's adapter active at test time, or, without
task ids, the adapter each test row is routed to (by the nearest task prototype in the base
model's features, or by the adapter whose prediction is surest), or every adapter at once: with
the penalties of O-LoRA (Wang et al. 2023), which keep each task's update orthogonal to the
earlier ones', their sum serves every task."""

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
from cl.routing import (  # noqa: F401 (the routing functions, where LoRA users look for them)
    Router,
    masked_entropy,
    route_by_entropy,
    route_by_prototype,
    within_routed_task,
)
from cl.strategy import Strategy
from cl.types import Batch, Split, Stream, Task

log = logging.getLogger(__name__)

ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
ROUTES = ("none", "prototype", "entropy", "sum")


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
    # Which adapter scores a test row. none: the evaluated task's (its id is known); without
    # task ids, prototype: the task whose mean base-model feature is nearest (cosine); entropy:
    # the adapter whose softmax over its task's classes has the lowest entropy; sum: all of them
    # at once, in training too (O-LoRA; the earlier adapters frozen, one shared head).
    route: Literal["none", "prototype", "entropy", "sum"] = "none"
    # O-LoRA's terms on the adapter being trained: lambda_orth times sum |A_old A_new^T| over
    # the earlier adapters' A matrices, lambda_l2 times the L2 norms of its matrices.
    lambda_orth: float = 0.0
    lambda_l2: float = 0.0

    def __post_init__(self) -> None:
        if self.head is None:
            shared = self.merge or self.route == "sum"
            object.__setattr__(self, "head", "shared" if shared else "per_task")
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
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {self.route!r}")
        if self.route != "none" and self.merge:
            raise ValueError("route picks one of the task adapters, but merge folds them all "
                             "into the model: use one or the other")
        if self.route == "sum" and self.head == "per_task":
            raise ValueError("route=sum runs every adapter at once, so it needs head=shared")
        for name in ("lambda_orth", "lambda_l2"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if (self.lambda_orth or self.lambda_l2) and self.merge:
            raise ValueError("lambda_orth and lambda_l2 act on each task's own adapter, which "
                             "merge folds away: use route=sum for O-LoRA")


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
            train_head_copy(layer, name)


def train_head_copy(wrapper: nn.Module, name: str) -> None:
    """Only head copy `name` of peft's ModulesToSaveWrapper trainable: peft's switches only
    unfreeze, so a copy injected beside an active one would stay trainable otherwise."""
    for key, head in wrapper.modules_to_save.items():
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


def orthogonality_penalty(new: Tensor, earlier: list[Tensor]) -> Tensor:
    """O-LoRA's: sum over the earlier adapters of the absolute entries of A_old A_new^T (A:
    rank x inputs). Zero exactly when every row of the new A is orthogonal to every row of
    every earlier A."""
    if not earlier:
        return new.new_zeros(())
    return sum((old @ new.T).abs().sum() for old in earlier)


def adapter_matrices(model: nn.Module, name: str) -> list[tuple[Tensor, Tensor]]:
    """Adapter `name`'s (A, B) pair in every adapted layer, each as a matrix (rank x inputs,
    outputs x rank; a conv's kernel flattened into its inputs)."""
    from peft.tuners.lora import LoraLayer

    pairs = []
    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        if name in layer.lora_A:
            pairs.append((layer.lora_A[name].weight.flatten(1),
                          layer.lora_B[name].weight.flatten(1)))
        elif name in layer.lora_embedding_A:
            pairs.append((layer.lora_embedding_A[name], layer.lora_embedding_B[name]))
    return pairs


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
        # Routing (route prototype|entropy): the evaluated rows are scored here, not by the runner.
        self.predicts = self.config.route in ("prototype", "entropy")
        self.router = Router(self.config.route) if self.predicts else None

    def __repr__(self) -> str:
        return f"LoRA({self.config})"

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        if stream.scenario == "class" and not self.config.merge and self.config.route == "none":
            raise UsageError("lora picks each task's adapter by task id, which the class "
                             "scenario hides at test time: use lora:route=prototype|entropy "
                             "(the adapter inferred per row), lora:route=sum (every adapter at "
                             "once, O-LoRA), lora:merge=true, or --scenario task or domain")
        if stream.scenario == "task" and self.predicts:
            raise UsageError(f"lora:route={self.config.route} infers each test row's task, "
                             "which the task scenario gives: drop route, or use --scenario class")
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
        if self.router is not None:
            self.router.start(stream)

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
        if self.config.route == "sum":
            # Every adapter runs (their updates sum), only the newest trains.
            for layer in tuner_layers(model):
                layer.enable_adapters(True)
                layer.set_adapter(self.adapters)
            earlier = [f".{old}." for old in self.adapters if old != name]
            for parameter_name, parameter in model.named_parameters():
                if any(old in f".{parameter_name}." for old in earlier):
                    parameter.requires_grad_(False)
        else:
            set_adapter(model, name)
        # peft freezes every base parameter; a shared head keeps learning.
        if self.config.head == "shared":
            for parameter_name, parameter in model.named_parameters():
                if under(parameter_name, self.head) and ".original_module." not in parameter_name:
                    parameter.requires_grad_(True)
        self.current = name

    def before_task(self, model: nn.Module, task: Task) -> None:
        if self.router is not None:
            self.router.task_started()
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
        if self.router is not None:
            self.router.task_ended(model, task, lambda: self.base_model(model))

    def eval_context(self, model: nn.Module, task: Task) -> AbstractContextManager[None]:
        if self.router is not None:
            return self.router.scoring_pass()
        if self.config.merge or self.config.route == "sum" or not self.adapters:
            return contextlib.nullcontext()
        return self.task_adapter(model, task)

    @contextlib.contextmanager
    def base_model(self, model: nn.Module) -> Iterator[None]:
        """The model with every adapter off (the base and its own head), as routing reads it."""
        disable_adapters(model)
        try:
            yield
        finally:
            if self.adapters:
                self.activate_for_training(model, self.current or self.adapters[-1])

    def loss_terms(self, model: nn.Module, batch: Batch, logits: Tensor,
                   task: Task) -> dict[str, Tensor]:
        config = self.config
        if not (config.lambda_orth or config.lambda_l2) or self.current is None:
            return {}
        new = adapter_matrices(model, self.current)
        terms = {}
        if config.lambda_orth:
            earlier = [adapter_matrices(model, old) for old in self.adapters
                       if old != self.current]
            terms["orthogonal"] = config.lambda_orth * sum(
                orthogonality_penalty(a, [pairs[layer][0] for pairs in earlier])
                for layer, (a, _) in enumerate(new))
        if config.lambda_l2:
            terms["l2"] = config.lambda_l2 * sum(a.norm() + b.norm() for a, b in new)
        return terms

    def eval_logits(self, model: nn.Module, split: Split, rows: slice | Tensor
                    ) -> Tensor | None:
        if not self.adapters:
            return None  # before the first task: the base model, forwarded by the runner
        tasks = [int(name.removeprefix("task")) for name in self.adapters]
        return self.router.logits(model, split, rows, tasks,
                                  lambda task: self.task_adapter(model, task),
                                  lambda: self.base_model(model))

    @contextlib.contextmanager
    def task_adapter(self, model: nn.Module, task: Task | int) -> Iterator[None]:
        """Task `task`'s adapter active, or the base alone for a task not trained yet."""
        name = adapter_name(task if isinstance(task, int) else task.index)
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
        report = {"adapters": len(self.adapters), "targets": self.targets,
                  "trainable_parameters_per_task": list(self.trainable_per_task)}
        if self.router is not None:
            report.update(self.router.report())
        return report

    def artifacts(self) -> dict[str, dict[str, Tensor]]:
        if self.config.merge:
            return dict(self.merged)
        return {name: adapter_state(self.model, name) for name in self.adapters}

    def unchanged_keys(self, model: nn.Module) -> frozenset[str]:
        """The base: every weight but the adapters' (and a shared head); none after a merge."""
        if self.config.merge or not self.adapters:
            return frozenset()
        return frozenset(key for key in model.state_dict() if not any(
            f".{name}." in f".{key}." for name in self.adapters)
            and not (self.config.head == "shared" and under(key, self.head)))

    def state_dict(self) -> dict[str, Any]:
        # The adapters' weights live in the model's state dict; this is what rebuilds the model's
        # shape around them on resume.
        return {"adapters": len(self.adapters), "trainable_per_task": list(self.trainable_per_task),
                "merged": dict(self.merged),
                **(self.router.state_dict() if self.router is not None else {})}

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
        if self.router is not None:
            self.router.load_state_dict(state)
