"""The runner: train one model over a stream of tasks, evaluating every task after each one.

`run` reads top to bottom: per task the strategy hooks, a fresh optimizer over the trainable
parameters, epochs of batches sliced from in-memory tensors in a seeded order, then an evaluation
of every task of the stream that fills one row of the accuracy matrix R.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.errors import DivergenceError, UsageError
from cl.models import eval_mode, logits_of, state_dict_mismatch
from cl.strategy import Chain, Strategy
from cl.types import Batch, Inputs, Split, Stream, Task, concat, num_rows, take

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
PRECISIONS = ("fp32", "bf16")
EVAL_ON = ("all", "seen", "final")

MAIN = "main"  # the view of R itself, beside the variants strategies ask for (EMA's "live")
# The same model as R's, evaluated on the rows held out of each task's training data.
VALIDATION = "validation"

Listener = Callable[[dict], None]
Checkpointer = Callable[[dict], None]


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the optimizer, its settings, batches, epochs, evaluation cadence, seed."""

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 1
    eval_every: int = 0  # steps between continual evaluations of the seen tasks; 0: off
    eval_batch_size: int = 1024
    log_every: int = 50  # steps per logged mean loss
    seed: int = 0
    joint: bool = False  # one training phase on all tasks at once: the multi-task upper bound
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": forward passes and losses under bfloat16 autocast
    # Which tasks each after-task evaluation covers: "all" (R in full, FWT included), "seen"
    # (tasks trained so far; R's upper triangle stays NaN), "final" (only after the last task).
    eval_on: str = "all"
    # Token budget of a text evaluation batch (rows x padded width, rows sorted by length).
    eval_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            known = ", ".join(OPTIMIZERS)
            raise UsageError(f"unknown optimizer {self.optimizer!r} (known: {known})")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r} "
                             f"(known: {', '.join(PRECISIONS)})")
        if self.eval_on not in EVAL_ON:
            raise UsageError(f"unknown eval_on {self.eval_on!r} (known: {', '.join(EVAL_ON)})")
        for name in ("batch_size", "epochs", "eval_batch_size", "log_every", "eval_tokens"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        # The optimizer applies these as float32 scalars to float32 weights: a value beyond
        # float32's range fails inside its step, and one below its smallest normal number
        # rounds to nothing: the run would train without moving.
        smallest, largest = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
        if not smallest <= self.lr <= largest:  # also NaN
            raise UsageError(f"lr must be a number from {smallest:.2e} to {largest:.2e}, "
                             f"got {self.lr}")
        # A momentum of 1 or more never lets a gradient fade: the weights diverge.
        if not 0 <= self.momentum < 1:
            raise UsageError(f"momentum must be a number from 0 up to (not including) 1, "
                             f"got {self.momentum}")
        if self.momentum and self.optimizer != "sgd":  # Adam's own moments are its betas
            raise UsageError(f"momentum {self.momentum} applies to sgd only, not to "
                             f"{self.optimizer}")
        if not 0 <= self.weight_decay <= largest:
            raise UsageError(f"weight_decay must be a number from 0 to {largest:.2e}, "
                             f"got {self.weight_decay}")
        if self.eval_every < 0:
            raise UsageError(f"eval_every must not be negative, got {self.eval_every}")


def divergence_cause(x: Inputs, logits: Tensor, terms: dict[str, Tensor]) -> str:
    """Where a non-finite loss came from, as advice: the data, a strategy's term, or the
    training itself (which a lower learning rate calms)."""
    if non_finite_inputs(x):
        return "the batch's inputs hold NaN or infinite values: check the data"
    bad = [name for name, term in terms.items() if not torch.isfinite(term).all()]
    if bad:
        return f"the strategy term {bad[0]!r} is {terms[bad[0]].item()}: check its settings"
    if torch.isfinite(logits).all():
        return "the cross-entropy diverged: try a lower --lr"
    return "the model's outputs diverged: try a lower --lr"


@dataclass
class RunResult:
    """Everything a run measured; the metrics are pure functions of these arrays.

    `accuracy[i, j]` is the accuracy on task j after training phase i (one phase per task, or a
    single phase in a joint run). `task_accuracy` holds the same with logits masked to each
    task's classes (task-IL numbers from a class-IL run); it is None in the other scenarios.
    The curve holds every evaluation (the continual ones and those after each task) in order.
    """

    accuracy: np.ndarray
    initial_accuracy: np.ndarray
    task_accuracy: np.ndarray | None
    initial_task_accuracy: np.ndarray | None
    curve_steps: np.ndarray
    curve_accuracy: np.ndarray
    curve_task_accuracy: np.ndarray | None  # the task-IL numbers of the same evaluations
    task_end_steps: list[int]
    final_targets: list[np.ndarray]
    final_predictions: list[np.ndarray]
    train_seconds: float
    eval_seconds: float
    steps: int
    train_rows: int = 0  # rows forwarded in training, replayed rows included
    eval_rows: int = 0  # test rows forwarded in evaluation, every variant included
    events: list[dict] = field(default_factory=list)
    # Extra matrices a strategy asked for (EMA's live weights beside the averaged ones), by name,
    # each measured at the same points as R: {"accuracy", "initial_accuracy", "task_accuracy",
    # "initial_task_accuracy", "curve_accuracy", "curve_task_accuracy"} (task-IL ones None
    # outside the class scenario).
    variants: dict[str, dict] = field(default_factory=dict)
    resumed_from: int | None = None  # the number of tasks a resumed run found already done
    # The parameters any training phase trained (each counted once): a run that trains the
    # backbone on its first task only, or one adapter per task, is not described by what is
    # still trainable at its end.
    trained_parameters: int = 0


def make_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)


def mask_logits(logits: Tensor, allowed: Tensor) -> Tensor:
    """Logits with the classes outside `allowed` (bool, broadcastable) set to the lowest finite
    value: softmax gives them exactly 0 and, unlike -inf, KL terms stay finite."""
    return logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)


def joint_task(stream: Stream) -> tuple[Task, Tensor]:
    """All tasks' training data as one task, with the original task index of every row
    (the model's inputs of every task, made at once: a transformed stream's rows are copied)."""
    train = Split(concat([task.train.inputs() for task in stream.tasks]),
                  torch.cat([task.train.y for task in stream.tasks]))
    task_ids = torch.cat([torch.full((len(task.train),), task.index) for task in stream.tasks])
    classes = tuple(sorted({c for task in stream.tasks for c in task.classes}))
    nothing = torch.arange(0)  # the joint phase is only trained on; the real tasks are evaluated
    empty = Split(take(train.x, nothing), train.y[:0])
    joint = Task(name="joint", index=0, train=train, test=empty, classes=classes)
    return joint, task_ids


@dataclass
class Evaluation:
    """Accuracy per evaluated task, plus the task-IL accuracy and predictions when asked for."""

    accuracy: np.ndarray
    task_accuracy: np.ndarray
    targets: list[np.ndarray]
    predictions: list[np.ndarray]
    rows: int  # test rows forwarded (what evaluation samples/s counts)


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast around forward passes and losses for "bf16"; nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluation_batches(x: Inputs, batch_size: int, tokens: int) -> list[slice | Tensor]:
    """The batches of rows an evaluation forwards, as slices or index tensors.

    Arrays: consecutive slices of `batch_size` rows. Text (a tokenized dict with an attention
    mask, padded on the right): rows in order of length, each batch as many rows as fit in
    `tokens` (rows x the batch's longest row) and at most `batch_size`: short rows go in large
    batches and long rows in small ones, so no batch pays for much padding or holds the
    attention maps of 1024 long rows at once."""
    rows = num_rows(x)
    if not (isinstance(x, dict) and "attention_mask" in x):
        return [slice(start, start + batch_size) for start in range(0, rows, batch_size)]
    lengths, order = torch.sort(x["attention_mask"].sum(1), stable=True)
    lengths = lengths.tolist()
    batches: list[slice | Tensor] = []
    start = 0
    while start < rows:
        end = start + 1
        while (end < rows and end - start < batch_size
               and (end - start + 1) * lengths[end] <= tokens):
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def evaluate(model: nn.Module, stream: Stream, strategy: Strategy, tasks: list[Task],
             class_mask: Tensor, config: TrainConfig, device: torch.device,
             keep_predictions: bool = False) -> Evaluation:
    """Evaluate `tasks` (others are NaN), each inside the strategy's eval context.

    Predictions are argmax over all classes, or over the task's classes in the `task` scenario;
    the task-masked accuracy is computed from the same logits in every scenario."""
    num_tasks = len(stream.tasks)
    accuracy = np.full(num_tasks, np.nan)
    task_accuracy = np.full(num_tasks, np.nan)
    targets, predictions = [], []
    with eval_mode(model):
        for task in tasks:
            allowed = class_mask[task.index]
            correct = torch.zeros((), dtype=torch.long, device=device)
            correct_masked = torch.zeros((), dtype=torch.long, device=device)
            if keep_predictions:
                task_predictions = torch.empty(len(task.test), dtype=torch.long, device=device)
            with strategy.eval_context(model, task), torch.inference_mode():
                for rows in evaluation_batches(task.test.x, config.eval_batch_size,
                                               config.eval_tokens):
                    y = task.test.y[rows]
                    # A strategy may score the rows itself (prototypes on cached features).
                    logits = strategy.eval_logits(model, task.test, rows) \
                        if strategy.predicts else None
                    if logits is None:
                        with autocast(config.precision, device):
                            logits = logits_of(model, task.test.rows(rows))
                    masked_prediction = mask_logits(logits, allowed).argmax(1)
                    prediction = (masked_prediction if stream.scenario == "task"
                                  else logits.argmax(1))
                    correct += (prediction == y).sum()
                    correct_masked += (masked_prediction == y).sum()
                    if keep_predictions:
                        task_predictions[rows] = prediction
            accuracy[task.index] = correct.item() / len(task.test)
            task_accuracy[task.index] = correct_masked.item() / len(task.test)
            if keep_predictions:
                targets.append(task.test.y.cpu().numpy())
                predictions.append(task_predictions.cpu().numpy())
    return Evaluation(accuracy, task_accuracy, targets, predictions,
                      sum(len(task.test) for task in tasks))


def stream_to_device(stream: Stream, device: torch.device) -> Stream:
    """The stream on `device`; rows that tasks share on the host are shared there too."""
    if device.type == "cpu":
        return stream
    moved: dict[int, Inputs] = {}
    tasks = tuple(Task(task.name, task.index, task.train.to(device, moved),
                       task.test.to(device, moved), task.classes,
                       None if task.validation is None else task.validation.to(device, moved))
                  for task in stream.tasks)
    return Stream(stream.name, tasks, stream.scenario, stream.num_classes, stream.input_shape)


def rng_state(order_generator: torch.Generator, device: torch.device) -> dict:
    """Every random state a run draws from, as tensors (checkpoints load with weights_only)."""
    state = {"torch": torch.get_rng_state(), "order": order_generator.get_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, order_generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    order_generator.set_state(state["order"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def task_optimizer(model: nn.Module, strategy: Strategy, task: Task,
                   config: TrainConfig) -> torch.optim.Optimizer:
    """A fresh optimizer over the parameters that train on `task`, in the strategy's groups."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise UsageError(f"no trainable parameters left for task {task.name!r}")
    groups = strategy.param_groups(model, [{"params": trainable, "lr": config.lr}])
    return make_optimizer(config, groups)


def training_phases(stream: Stream, joint: bool) -> list[tuple[Task, Tensor]]:
    """What each training phase trains on, with the task index of every row: one phase per
    task, or one joint phase of every task's rows."""
    if joint:
        return [joint_task(stream)]
    return [(task, torch.full((len(task.train),), task.index)) for task in stream.tasks]


def checkpoint_weights(model: nn.Module, strategy: Strategy) -> dict[str, Tensor]:
    """The model's state dict without the keys the strategies keep as built (a frozen base
    under adapters: a checkpoint then holds megabytes, not the whole pretrained model)."""
    unchanged = strategy.unchanged_keys(model)
    training = sorted(name for name, parameter in model.named_parameters(remove_duplicate=False)
                      if name in unchanged and parameter.requires_grad)
    if training:  # a checkpoint that left it out would resume with the built weights
        raise RuntimeError(f"{strategy!r} says {training[0]} stays as built, but it trains")
    return {k: v for k, v in model.state_dict().items() if k not in unchanged}


def restore(resume: dict, model: nn.Module, strategy: Strategy, views: tuple[str, ...],
            listener: Listener | None, order_generator: torch.Generator,
            device: torch.device) -> Progress:
    """A checkpoint's state loaded into the freshly built model and strategy: the strategy
    first (LoRA rebuilds its adapters), then the weights, then the RNGs; its progress back."""
    strategy.load_state_dict(resume["strategy"])
    # The frozen base the strategies keep as built is not in the file: the rebuilt model has it.
    unchanged = strategy.unchanged_keys(model)
    expected = {k: v for k, v in model.state_dict().items() if k not in unchanged}
    given = {k: v for k, v in resume["model"].items() if k not in unchanged}
    problem = state_dict_mismatch(expected, given)
    if problem is not None:  # a model file copied in from another run
        raise UsageError(f"the checkpoint's model does not fit this run's model: {problem}")
    model.load_state_dict(given, strict=False)
    progress = Progress(views, listener, resume["progress"], device)
    set_rng_state(resume["rng"], order_generator, device)
    progress.replay_events()
    return progress


def training_loss(model: nn.Module, stream: Stream, strategy: Strategy, batch: Batch,
                  task: Task, class_mask: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """The step's loss (cross-entropy plus the strategy's terms), the raw logits and the terms.

    Task-IL trains each row against its own task's classes, and a strategy may mask more
    (`cross_entropy_mask`); strategies see the raw logits."""
    logits = logits_of(model, batch.x)
    allowed = strategy.cross_entropy_mask(batch, task)
    if stream.scenario == "task":
        allowed = class_mask[batch.task] if allowed is None else allowed & class_mask[batch.task]
    loss = F.cross_entropy(logits if allowed is None else mask_logits(logits, allowed), batch.y)
    terms = strategy.loss_terms(model, batch, logits, task)
    for term in terms.values():
        loss = loss + term
    return loss, logits, terms


def validation_task(task: Task) -> Task:
    """`task` with its validation rows where its test rows were (what `evaluate` reads)."""
    if task.validation is None:
        raise ValueError(f"task {task.index} ({task.name}) holds out no validation rows, but "
                         "others of its stream do")
    return dataclasses.replace(task, test=task.validation)


def gradients_of(model: nn.Module) -> dict[str, Tensor]:
    """The model's gradients by parameter name, for the trainable parameters that have one
    (a parameter frozen after it trained keeps its last gradient: the optimizer that clears
    gradients no longer holds it)."""
    return {name: parameter.grad for name, parameter in model.named_parameters()
            if parameter.requires_grad and parameter.grad is not None}


def set_gradients(model: nn.Module, given: dict[str, Tensor],
                  gradients: dict[str, Tensor]) -> None:
    """Give the parameters the gradients `adjust_gradients` returned for those it was `given`
    (by `gradients_of`): the same names, each tensor of its parameter's shape."""
    parameters = dict(model.named_parameters())
    expected = set(given)
    if missing := sorted(expected - set(gradients)):
        raise ValueError(f"adjust_gradients returned no gradient for {missing[0]}")
    if extra := sorted(set(gradients) - expected):
        raise ValueError(f"adjust_gradients returned a gradient for {extra[0]}, which is not a "
                         "parameter with a gradient")
    for name, gradient in gradients.items():
        if gradient.shape != parameters[name].shape:
            raise ValueError(f"adjust_gradients returned a gradient of shape "
                             f"{tuple(gradient.shape)} for {name} of shape "
                             f"{tuple(parameters[name].shape)}")
        parameters[name].grad = gradient


def after_task_evaluation(stream: Stream, eval_on: str, trained: int, last: bool) -> list[Task]:
    """The tasks evaluated once tasks 0..trained-1 are trained (`trained` 0: before training)."""
    if eval_on == "all" or (eval_on == "final" and last):
        return list(stream.tasks)
    if eval_on == "seen":
        return list(stream.tasks[:trained])
    return []


class LossWindow:
    """The loss and each strategy term summed over the steps since the last log line.

    The sums stay on the device, so reading them (a host synchronisation) happens once a window,
    not once a step. They add in float64, as Python floats did when each step's loss was read
    (the logged means are the same to the bit); float32 on MPS, which has no float64."""

    def __init__(self, device: torch.device) -> None:
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.sums: dict[str, Tensor] = {}
        self.steps = 0
        self.first_step = 0

    def add(self, task_step: int, loss: Tensor, terms: dict[str, Tensor]) -> None:
        if not self.steps:
            self.first_step = task_step
        for name, value in (("loss", loss), *terms.items()):
            # Any one-element term (as `.item()` took), on the loss's device.
            value = value.detach().reshape(()).to(loss.device, self.dtype)
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.steps += 1

    def means(self) -> dict[str, float]:
        """The window's mean loss and terms, in one read from the device."""
        names = list(self.sums)
        values = torch.stack([self.sums[name] for name in names]).tolist()
        return {name: value / self.steps for name, value in zip(names, values, strict=True)}

    def reset(self) -> None:
        self.sums, self.steps = {}, 0


def non_finite_inputs(x: Inputs) -> bool:
    inputs = x.values() if isinstance(x, dict) else [x]
    return any(value.is_floating_point() and not torch.isfinite(value).all() for value in inputs)


def window_divergence(task: Task, window: LossWindow, means: dict[str, float],
                      device: torch.device) -> DivergenceError:
    """A non-finite loss found when a window closed (accelerators read the loss once a window):
    the steps it lies in, and where it came from as far as can be told afterwards."""
    if non_finite_inputs(task.train.x):
        cause = "the task's training inputs hold NaN or infinite values: check the data"
    else:
        cause = "try a lower --lr, or rerun on the CPU (--device cpu), which reads the loss " \
                "every step and names its exact step and cause"
    return DivergenceError(
        f"loss is {means['loss']} on task {task.index} ({task.name}) within steps "
        f"{window.first_step}-{window.first_step + window.steps - 1} of that task (read "
        f"once every {window.steps} steps on {device.type}); {cause}")


def not_evaluated_as_none(accuracy: np.ndarray) -> list[float | None]:
    """Accuracies for an event: None for a task not evaluated (NaN), as in the JSON files."""
    return [None if math.isnan(value) else value for value in accuracy.tolist()]


class Progress:
    """What a run has measured so far, as plain values: every view's after-task rows and whole
    curve, the events, the counters and the time spent training and evaluating.

    `state` is what a checkpoint carries; a resumed run builds its Progress from it and goes on.
    Time is charged by laps: `lap("train")` charges the time since the previous lap to training,
    `lap()` charges it to nothing (checkpoints, the optimizer's one-time import)."""

    def __init__(self, views: tuple[str, ...], listener: Listener | None,
                 state: dict | None = None, device: torch.device | None = None) -> None:
        self.listener = listener
        # A CUDA device runs behind the host: a lap waits for it, so that work still queued
        # is charged to what queued it (laps come a few times a task, not every step).
        self.cuda = device if device is not None and device.type == "cuda" else None
        self.state = state if state is not None else {
            "next_phase": 0, "step": 0, "curve_steps": [], "task_end_steps": [],
            "train_seconds": 0.0, "eval_seconds": 0.0, "events": [], "train_rows": 0,
            "eval_rows": 0, "trained_parameters": {},
            "views": {view: {"rows": [], "task_rows": [], "curve_rows": [], "curve_task_rows": []}
                      for view in views}}
        if sorted(self.state["views"]) != sorted(views):
            raise UsageError("the checkpoint was written by a run with other strategies")
        self.mark = time.perf_counter()

    def lap(self, what: str | None = None) -> None:
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
        now = time.perf_counter()
        if what is not None:
            self.state[f"{what}_seconds"] += now - self.mark
        self.mark = now

    def emit(self, event: dict) -> None:
        self.state["events"].append(event)
        if self.listener is not None:
            self.listener(event)

    def replay_events(self) -> None:
        """A resumed run's listener hears what the run had said before it stopped."""
        for event in self.state["events"]:
            if self.listener is not None and event["event"] != "step":
                self.listener(event)

    def record_initial(self, evaluations: dict[str, Evaluation]) -> None:
        """The evaluation before any training: every view's initial row."""
        for name, evaluation in evaluations.items():
            self.state["views"][name]["initial"] = evaluation.accuracy.tolist()
            self.state["views"][name]["initial_task"] = evaluation.task_accuracy.tolist()
            self.state["eval_rows"] += evaluation.rows
        self.emit({"event": "eval", "step": 0, "task": None,
                   "accuracy": not_evaluated_as_none(evaluations[MAIN].accuracy)})

    def record(self, evaluations: dict[str, Evaluation], step: int, task: Task,
               task_end: bool) -> None:
        """One point of the curve for every view; after a task, also a row of its matrix."""
        accuracy = not_evaluated_as_none(evaluations[MAIN].accuracy)
        if task_end:
            self.emit({"event": "task_end", "step": step, "task": task.index, "name": task.name,
                       "accuracy": accuracy})
        else:
            self.emit({"event": "eval", "step": step, "task": task.index, "accuracy": accuracy})
        self.state["curve_steps"].append(step)
        if task_end:
            self.state["task_end_steps"].append(step)
        for name, evaluation in evaluations.items():
            view = self.state["views"][name]
            view["curve_rows"].append(evaluation.accuracy.tolist())
            view["curve_task_rows"].append(evaluation.task_accuracy.tolist())
            if task_end:
                view["rows"].append(evaluation.accuracy.tolist())
                view["task_rows"].append(evaluation.task_accuracy.tolist())
            self.state["eval_rows"] += evaluation.rows

    def result(self, num_tasks: int, class_il: bool, final: Evaluation,
               resumed_from: int | None) -> RunResult:
        def matrix(rows: list) -> np.ndarray:
            return np.asarray(rows, dtype=np.float64).reshape(len(rows), num_tasks)

        def measured(view: dict) -> dict[str, np.ndarray | None]:
            """A view's matrices; the task-IL ones only where they differ in meaning."""
            return {"accuracy": matrix(view["rows"]),
                    "initial_accuracy": np.asarray(view["initial"], dtype=np.float64),
                    "task_accuracy": matrix(view["task_rows"]) if class_il else None,
                    "initial_task_accuracy": np.asarray(view["initial_task"], dtype=np.float64)
                    if class_il else None,
                    "curve_accuracy": matrix(view["curve_rows"]),
                    "curve_task_accuracy": matrix(view["curve_task_rows"]) if class_il
                    else None}

        state = self.state
        views = {name: measured(view) for name, view in state["views"].items()}
        return RunResult(
            **views.pop(MAIN),
            curve_steps=np.asarray(state["curve_steps"], dtype=np.int64),
            task_end_steps=list(state["task_end_steps"]),
            final_targets=final.targets,
            final_predictions=final.predictions,
            train_seconds=state["train_seconds"],
            eval_seconds=state["eval_seconds"],
            steps=state["step"],
            train_rows=state["train_rows"],
            eval_rows=state["eval_rows"],
            events=state["events"],
            variants=views,
            resumed_from=resumed_from,
            # A checkpoint written before this count was kept has none.
            trained_parameters=sum(state.get("trained_parameters", {}).values()),
        )


def run(model: nn.Module, stream: Stream, strategy: Strategy | None = None,
        config: TrainConfig = TrainConfig(), listener: Listener | None = None,
        checkpoint: Checkpointer | None = None, resume: dict | None = None) -> RunResult:
    """Train `model` on the tasks of `stream` in order and return the accuracy matrix and curves.

    Every evaluation (before training, every `eval_every` steps, after each task) measures R's
    model and each variant a strategy asks for, class-IL and task-IL from the same logits;
    `config.eval_on` says which tasks those before training and after each task cover.
    `listener` receives every event dict (losses, evaluations, task ends) and a
    `{"event": "step", "step": k, "total_steps": n, "task": t}` after each optimizer step.
    `checkpoint` receives after each task's evaluation the run state (state dicts, RNG states,
    the progress: plain values and tensors); passed back as `resume`, it continues the run
    there, with the same model and strategy built afresh, bit for bit on the CPU.
    The loss is read every step on the CPU (a non-finite one stops the run at that step) and
    once every `log_every` steps on an accelerator (no host synchronisation per step).
    The global RNG is seeded for the run and restored afterwards.
    """
    strategy = strategy if strategy is not None else Chain()
    device = torch.device(config.device)
    model.to(device)
    stream = stream_to_device(stream, device)
    class_mask = stream.class_mask().to(device)
    phases = training_phases(stream, config.joint)
    # A phase a strategy fits without gradient steps (a prototype classifier) has none.
    steps_per_epoch = [math.ceil(len(task.train) / config.batch_size)
                       if strategy.trains(task) else 0 for task, _ in phases]
    total_steps = config.epochs * sum(steps_per_epoch)
    strategy.check(model, stream, config.joint)
    variants = strategy.eval_variants()
    if VALIDATION in variants:
        raise ValueError(f"a strategy's extra evaluation may not be named {VALIDATION!r}: "
                         "that is the held-out rows' matrix")
    validated = any(task.validation is not None for task in stream.tasks)
    views = (MAIN, *variants, *([VALIDATION] if validated else []))
    read_every_step = device.type == "cpu"  # reading a CPU tensor costs no synchronisation

    def evaluate_views(tasks: list[Task], keep_predictions: bool = False
                       ) -> dict[str, Evaluation]:
        """`tasks` evaluated as R's model, then as each variant, then R's model on the
        validation rows."""
        evaluations = {MAIN: evaluate(model, stream, strategy, tasks, class_mask, config,
                                      device, keep_predictions)}
        for name in variants:
            with strategy.eval_variant(name):
                evaluations[name] = evaluate(model, stream, strategy, tasks, class_mask,
                                             config, device)
        if validated:
            evaluations[VALIDATION] = evaluate(model, stream, strategy,
                                               [validation_task(task) for task in tasks],
                                               class_mask, config, device)
        return evaluations

    # Data order comes from this generator alone; the global RNG (dropout, say) is seeded too.
    order_generator = torch.Generator().manual_seed(config.seed)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        strategy.before_run(model, stream, config.seed)

        if resume is None:
            progress = Progress(views, listener, device=device)
            before = evaluate_views(after_task_evaluation(stream, config.eval_on, 0, False))
            progress.lap("eval")
            progress.record_initial(before)
        else:
            progress = restore(resume, model, strategy, views, listener,
                               order_generator, device)
            log.info("resuming after task %d of %d", progress.state["next_phase"], len(phases))
        resumed_from = progress.state["next_phase"] if resume is not None else None
        final = None
        step = progress.state["step"]
        # torch's first optimizer of a process imports torch._dynamo (about 1.3 s): paid here,
        # outside the timed training, so that train_seconds measures training.
        make_optimizer(config, [{"params": [torch.zeros(1, requires_grad=True)]}])

        for phase in range(progress.state["next_phase"], len(phases)):
            task, task_ids = phases[phase]
            progress.lap()
            model.train()
            strategy.before_task(model, task)
            # The optimizer is rebuilt per task, after before_task has frozen or added parameters.
            trains = steps_per_epoch[phase] > 0
            optimizer = task_optimizer(model, strategy, task, config) if trains else None
            if trains:
                progress.state.setdefault("trained_parameters", {}).update(
                    (name, parameter.numel()) for name, parameter in model.named_parameters()
                    if parameter.requires_grad)
            task_ids = task_ids.to(device)
            window = LossWindow(device)
            task_step = 0
            for epoch in range(config.epochs if trains else 0):
                order = torch.randperm(len(task.train), generator=order_generator).to(
                    device, non_blocking=True)
                for start in range(0, len(task.train), config.batch_size):
                    index = order[start:start + config.batch_size]
                    batch = Batch(task.train.rows(index), task.train.y[index], task_ids[index])
                    batch = strategy.transform_batch(batch, task)
                    with autocast(config.precision, device):
                        loss, logits, terms = training_loss(model, stream, strategy, batch, task,
                                                            class_mask)
                    progress.state["train_rows"] += len(batch)
                    task_step += 1
                    step += 1
                    if read_every_step and not math.isfinite(loss_value := loss.item()):
                        raise DivergenceError(
                            f"loss is {loss_value} on task {task.index} ({task.name}) at step "
                            f"{task_step} of that task (epoch {epoch + 1}); "
                            f"{divergence_cause(batch.x, logits, terms)}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if strategy.adjusts_gradients:
                        given = gradients_of(model)
                        with autocast(config.precision, device):  # A-GEM's memory pass
                            adjusted = strategy.adjust_gradients(model, batch, task, dict(given))
                        set_gradients(model, given, adjusted)
                    optimizer.step()
                    strategy.after_step(model, batch, logits.detach(), task)

                    window.add(task_step, loss, terms)
                    if window.steps == config.log_every:
                        close_window(progress, window, task, step, epoch, device)
                    # A task's last step is followed by the full evaluation anyway.
                    last_step = task_step == config.epochs * steps_per_epoch[phase]
                    if config.eval_every and step % config.eval_every == 0 and not last_step:
                        progress.lap("train")
                        seen = list(stream.tasks[:task.index + 1]) if not config.joint \
                            else list(stream.tasks)
                        progress.record(evaluate_views(seen), step, task, task_end=False)
                        progress.lap("eval")
                    if listener is not None:
                        listener({"event": "step", "step": step, "total_steps": total_steps,
                                  "task": task.index})
            if window.steps:
                close_window(progress, window, task, step, epoch, device)
            strategy.after_task(model, task)
            progress.lap("train")

            last = phase == len(phases) - 1
            trained = len(stream.tasks) if config.joint else task.index + 1
            evaluations = evaluate_views(after_task_evaluation(stream, config.eval_on, trained,
                                                               last), keep_predictions=last)
            final = evaluations[MAIN]
            progress.lap("eval")
            progress.record(evaluations, step, task, task_end=True)
            progress.state.update(step=step, next_phase=phase + 1)
            log.info("task %d/%d (%s): mean accuracy over the evaluated tasks %s", phase + 1,
                     len(phases), task.name, f"{np.nanmean(final.accuracy):.4f}"
                     if final.rows else "(none evaluated)")
            if checkpoint is not None:
                checkpoint({"model": checkpoint_weights(model, strategy),
                            "strategy": strategy.state_dict(),
                            "rng": rng_state(order_generator, device),
                            "progress": progress.state})

        if final is None:
            # Resumed after the last task: the final predictions (confusion matrix, F1) come
            # from one more pass over the restored model.
            final = evaluate(model, stream, strategy, list(stream.tasks), class_mask, config,
                             device, keep_predictions=True)
            progress.state["eval_rows"] += final.rows

    return progress.result(len(stream.tasks), stream.scenario == "class", final, resumed_from)


def close_window(progress: Progress, window: LossWindow, task: Task, step: int, epoch: int,
                 device: torch.device) -> None:
    """Log the window's mean loss and terms (one read from the device); a non-finite mean,
    which only a run on an accelerator meets here, stops the run."""
    means = window.means()
    if not math.isfinite(means["loss"]):
        raise window_divergence(task, window, means, device)
    window.reset()
    progress.emit({"event": "loss", "step": step, "task": task.index, "epoch": epoch, **means})
