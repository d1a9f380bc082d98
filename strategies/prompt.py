"""Prompt tuning per task: a fresh soft prompt (peft's PromptEmbedding, `num_tokens` trained
input embeddings) per task, prepended to a frozen transformers text model's input, with its own
copy of the head; the evaluated task's prompt is used when task ids are given, and without them
each test row is routed to a task's prompt as routed LoRA does (`route=prototype|entropy`)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from cl.errors import UsageError
from cl.models import find_head, trainable_parameters, under
from cl.routing import Router
from cl.strategy import Strategy
from cl.types import Split, Stream, Task

log = logging.getLogger(__name__)

INITS = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM"}  # our word: peft's PromptTuningInit
ROUTES = ("none", "prototype", "entropy")
PROMPTS = "cl_prompts"  # the ModuleDict of prompts, as the model's child (its state-dict prefix)
SEED_OFFSET = 7_000_003  # keeps the prompts' draws apart from other seeded draws of the run


@dataclass(frozen=True)
class PromptConfig:
    num_tokens: int = 20  # virtual tokens per task's prompt (peft's num_virtual_tokens)
    # vocab: each virtual token starts as the embedding of a random vocabulary word (peft's
    # SAMPLE_VOCAB, on the scale the model was trained on); random: nn.Embedding's N(0, 1).
    init: Literal["vocab", "random"] = "vocab"
    # per_task: each task trains its own copy of the head beside its prompt; shared: one head
    # trained by every task (with its own classes only where `train_mask` says so).
    head: Literal["shared", "per_task"] = "per_task"
    # Which prompt scores a test row: none, the evaluated task's (its id is known); without task
    # ids, prototype: the task whose mean base-model feature is nearest (cosine); entropy: the
    # prompt whose softmax over its task's classes has the lowest entropy.
    route: Literal["none", "prototype", "entropy"] = "none"

    def __post_init__(self) -> None:
        if isinstance(self.num_tokens, bool) or not isinstance(self.num_tokens, int) \
                or self.num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive integer, got {self.num_tokens!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.head not in ("shared", "per_task"):
            raise ValueError(f"head must be shared or per_task, got {self.head!r}")
        if self.route not in ROUTES:
            raise ValueError(f"route must be one of {', '.join(ROUTES)}, got {self.route!r}")


def prompt_name(task_index: int) -> str:
    return f"task{task_index}"


def with_prompt(prompt: Tensor, kwargs: dict[str, Any], embeddings: nn.Module
                ) -> dict[str, Any]:
    """A transformers forward call's keyword arguments with `prompt` (tokens x dim) in front of
    every row's token embeddings, as peft's PeftModelForSequenceClassification does it: the
    attention mask gains ones, token type ids gain zeros, and position ids are left to the
    model (the prompt takes the first positions)."""
    kwargs = dict(kwargs)
    tokens = embeddings(kwargs.pop("input_ids"))
    rows, length = tokens.shape[0], prompt.shape[0]
    front = prompt.to(tokens.dtype).unsqueeze(0).expand(rows, -1, -1)
    kwargs["inputs_embeds"] = torch.cat([front, tokens], dim=1)
    mask = kwargs.get("attention_mask")
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([mask.new_ones((rows, length)), mask], dim=1)
    types = kwargs.get("token_type_ids")
    if types is not None:
        kwargs["token_type_ids"] = torch.cat([types.new_zeros((rows, length)), types], dim=1)
    kwargs.pop("position_ids", None)
    return kwargs


class Prompt(Strategy):
    """One soft prompt per task on a frozen transformers text model.

    peft's prompt tuning wraps the model in a PeftModel, which would replace the model the
    runner holds; here peft's PromptEmbedding modules live in the model (`cl_prompts.task<k>`)
    and a forward pre-hook prepends the active one, so the runner's model stays the same
    object and every other strategy sees it as before. The base never trains; a task trains
    its prompt and its head (with `head=per_task`, peft's ModulesToSaveWrapper keeps a copy of
    the head per task, as LoRA's per-task heads do).
    """

    name: ClassVar[str] = "prompt"
    config_class: ClassVar[type] = PromptConfig
    adds_modules: ClassVar[bool] = True  # a prompt (and a head copy) per task, in before_task

    def __init__(self, config: PromptConfig | None = None) -> None:
        self.config = config if config is not None else PromptConfig()
        self.prompts: list[str] = []  # prompts added so far, in task order
        self.trainable_per_task: list[int] = []
        self.active: str | None = None  # the prompt the model's forward prepends (None: none)
        self.current: str | None = None  # the prompt being trained (the newest)
        self.predicts = self.config.route != "none"
        self.router = Router(self.config.route) if self.predicts else None
        self.seed = 0
        self.hook: Any = None

    def __repr__(self) -> str:
        return f"Prompt({self.config})"

    def check(self, model: nn.Module, stream: Stream, joint: bool) -> None:
        inputs = stream.tasks[0].train.x
        if not (isinstance(inputs, dict) and "input_ids" in inputs
                and callable(getattr(model, "get_input_embeddings", None))):
            raise UsageError("prompt prepends trained embeddings to a transformers model's "
                             "token embeddings: use a text stream with --model minilm or "
                             "--model hf:<name-or-path>")
        if stream.scenario == "class" and not self.predicts:
            raise UsageError("prompt picks each task's prompt by task id, which the class "
                             "scenario hides at test time: use prompt:route=prototype|entropy "
                             "(the prompt inferred per row), or --scenario task or domain")
        if stream.scenario == "task" and self.predicts:
            raise UsageError(f"prompt:route={self.config.route} infers each test row's task, "
                             "which the task scenario gives: drop route, or use --scenario class")
        if joint:
            raise UsageError("prompt trains one prompt per task, but --joint trains all tasks "
                             "as one: train sequentially")
        # The prompt takes positions of their own: rows plus prompt must fit the model.
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        width = inputs["input_ids"].shape[1]
        if isinstance(positions, int) and width + self.config.num_tokens > positions:
            raise UsageError(f"prompt:num_tokens={self.config.num_tokens} and rows of "
                             f"{width} tokens exceed the model's {positions} positions: use "
                             f"prompt:num_tokens={max(positions - width, 0)} or less, or a "
                             "shorter max_length")

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        self.model = model
        self.seed = seed
        self.head = find_head(model)
        model.requires_grad_(False)  # the base never trains
        if not hasattr(model, PROMPTS):
            model.add_module(PROMPTS, nn.ModuleDict())
        if self.hook is not None:
            self.hook.remove()
        self.hook = model.register_forward_pre_hook(self.prepend, with_kwargs=True)
        if self.router is not None:
            self.router.start(stream)

    def prepend(self, model: nn.Module, args: tuple, kwargs: dict[str, Any]
                ) -> tuple[tuple, dict[str, Any]] | None:
        """The forward pre-hook: the active prompt in front of the rows' token embeddings."""
        if self.active is None or "input_ids" not in kwargs:
            return None
        prompt = getattr(model, PROMPTS)[self.active]
        indices = torch.arange(self.config.num_tokens, device=prompt.embedding.weight.device)
        return args, with_prompt(prompt(indices), kwargs, model.get_input_embeddings())

    def add_prompt(self, model: nn.Module, task_index: int) -> None:
        from peft import PromptTuningConfig
        from peft.tuners.prompt_tuning import PromptEmbedding
        from peft.utils import ModulesToSaveWrapper

        name = prompt_name(task_index)
        embeddings = model.get_input_embeddings()
        peft_config = PromptTuningConfig(
            task_type="SEQ_CLS", num_virtual_tokens=self.config.num_tokens,
            token_dim=embeddings.embedding_dim, num_transformer_submodules=1,
            prompt_tuning_init=INITS[self.config.init])
        # peft draws the initial prompt from torch's global generator: seeded here, per task,
        # and the global state put back after.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + SEED_OFFSET + task_index)
            prompt = PromptEmbedding(peft_config, embeddings)
        getattr(model, PROMPTS)[name] = prompt.to(embeddings.weight.device)
        if self.config.head == "per_task":
            head = model.get_submodule(self.head)
            if isinstance(head, ModulesToSaveWrapper):
                head.update(name)
            else:
                parent, _, attribute = self.head.rpartition(".")
                setattr(model.get_submodule(parent), attribute, ModulesToSaveWrapper(head, name))
        self.prompts.append(name)
        self.activate_for_training(model, name)

    def activate_for_training(self, model: nn.Module, name: str) -> None:
        """Prompt `name` (the newest) in front of every row, it and its head trainable only."""
        from peft.utils import ModulesToSaveWrapper

        from strategies.lora import train_head_copy

        self.use(model, name)
        for key, prompt in getattr(model, PROMPTS).items():
            prompt.requires_grad_(key == name)
        head = model.get_submodule(self.head)
        if isinstance(head, ModulesToSaveWrapper):  # per task: its own copy trains
            train_head_copy(head, name)
        if self.config.head == "shared":
            for parameter_name, parameter in model.named_parameters():
                if under(parameter_name, self.head):
                    parameter.requires_grad_(True)
        self.current = name

    def use(self, model: nn.Module, name: str | None) -> None:
        """Prompt `name` active, with its head copy; None: the base model and its own head.
        Which parameters train is left as it was."""
        from peft.utils import ModulesToSaveWrapper

        self.active = name
        head = model.get_submodule(self.head)
        if isinstance(head, ModulesToSaveWrapper):
            flags = {key: p.requires_grad for key, p in head.named_parameters()}
            if name is None:
                head.enable_adapters(False)
            else:
                head.enable_adapters(True)
                head.set_adapter(name)
            for key, parameter in head.named_parameters():  # peft's switches unfreeze
                parameter.requires_grad_(flags[key])

    def before_task(self, model: nn.Module, task: Task) -> None:
        if self.router is not None:
            self.router.task_started()
        self.add_prompt(model, task.index)
        trainable = trainable_parameters(model)
        self.trainable_per_task.append(trainable)
        log.info("prompt: %s, %d trainable parameters", self.current, trainable)

    def after_task(self, model: nn.Module, task: Task) -> None:
        if self.router is not None:
            self.router.task_ended(model, task, lambda: self.task_prompt(model, None))

    @contextlib.contextmanager
    def task_prompt(self, model: nn.Module, task: Task | int | None) -> Iterator[None]:
        """Task `task`'s prompt active; the base alone for None or a task not trained yet."""
        index = task.index if isinstance(task, Task) else task
        name = None if index is None else prompt_name(index)
        self.use(model, name if name in self.prompts else None)
        try:
            yield
        finally:
            self.use(model, self.current)

    def eval_context(self, model: nn.Module, task: Task) -> AbstractContextManager[None]:
        if self.router is not None:
            return self.router.scoring_pass()
        return self.task_prompt(model, task)

    def eval_logits(self, model: nn.Module, split: Split, rows: slice | Tensor
                    ) -> Tensor | None:
        if not self.prompts:
            return None  # before the first task: the base model, forwarded by the runner
        tasks = [int(name.removeprefix("task")) for name in self.prompts]
        return self.router.logits(model, split, rows, tasks,
                                  lambda task: self.task_prompt(model, task),
                                  lambda: self.task_prompt(model, None))

    def report(self) -> dict[str, Any]:
        report: dict[str, Any] = {"prompts": len(self.prompts),
                                  "num_tokens": self.config.num_tokens,
                                  "trainable_parameters_per_task": list(self.trainable_per_task)}
        if self.router is not None:
            report.update(self.router.report())
        return report

    def artifacts(self) -> dict[str, dict[str, Tensor]]:
        """Per task, its prompt and its head copy; a shared head as `head`: the base never."""
        from strategies.lora import adapter_state  # a task's tensors: keys with `.task<k>.`

        artifacts = {name: adapter_state(self.model, name) for name in self.prompts}
        if self.config.head == "shared" and self.prompts:
            artifacts["head"] = {key: value.detach().clone() for key, value
                                 in self.model.state_dict().items() if under(key, self.head)}
        return artifacts

    def unchanged_keys(self, model: nn.Module) -> frozenset[str]:
        """The base: every weight but the prompts, the head copies (or the shared head)."""
        if not self.prompts:
            return frozenset()
        return frozenset(key for key in model.state_dict() if not under(key, PROMPTS)
                         and not any(f".{name}." in f".{key}." for name in self.prompts)
                         and not (self.config.head == "shared" and under(key, self.head)))

    def state_dict(self) -> dict[str, Any]:
        # The prompts' weights live in the model's state dict; this rebuilds their modules.
        return {"prompts": len(self.prompts),
                "trainable_per_task": list(self.trainable_per_task),
                **(self.router.state_dict() if self.router is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts = []
        for index in range(int(state["prompts"])):
            self.add_prompt(self.model, index)  # fresh; the runner then loads their weights
        self.trainable_per_task = [int(n) for n in state["trainable_per_task"]]
        if self.router is not None:
            self.router.load_state_dict(state)
