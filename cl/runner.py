"""The runner: train one model over a stream of tasks, evaluating every task after each one.

`run` reads top to bottom: per task the strategy hooks, a fresh optimizer over the trainable
parameters, epochs of batches sliced from in-memory tensors in a seeded order, then an evaluation
of every task of the stream that fills one row of the accuracy matrix R.
"""

from __future__ import annotations

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
from cl.models import logits_of
from cl.strategy import Chain, Strategy
from cl.types import Batch, Split, Stream, Task, concat, take, to_device

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")

Listener = Callable[[dict], None]


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

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            known = ", ".join(OPTIMIZERS)
            raise UsageError(f"unknown optimizer {self.optimizer!r} (known: {known})")
        for name in ("batch_size", "epochs", "eval_batch_size", "log_every"):
            if getattr(self, name) <= 0:
                raise UsageError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise UsageError(f"lr must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay", "eval_every"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must not be negative, got {getattr(self, name)}")


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
    task_end_steps: list[int]
    final_targets: list[np.ndarray]
    final_predictions: list[np.ndarray]
    train_seconds: float
    eval_seconds: float
    steps: int
    events: list[dict] = field(default_factory=list)


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
    """All tasks' training data as one task, with the original task index of every row."""
    train = Split(concat([task.train.x for task in stream.tasks]),
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


def evaluate(model: nn.Module, stream: Stream, strategy: Strategy, tasks: list[Task],
             class_mask: Tensor, batch_size: int, device: torch.device,
             keep_predictions: bool = False) -> Evaluation:
    """Evaluate `tasks` (others are NaN), each inside the strategy's eval context.

    Predictions are argmax over all classes, or over the task's classes in the `task` scenario;
    the task-masked accuracy is computed from the same logits in every scenario."""
    num_tasks = len(stream.tasks)
    accuracy = np.full(num_tasks, np.nan)
    task_accuracy = np.full(num_tasks, np.nan)
    targets, predictions = [], []
    was_training = model.training
    model.eval()
    for task in tasks:
        allowed = class_mask[task.index]
        correct = torch.zeros((), dtype=torch.long, device=device)
        correct_masked = torch.zeros((), dtype=torch.long, device=device)
        task_predictions = []
        with strategy.eval_context(model, task), torch.inference_mode():
            for start in range(0, len(task.test), batch_size):
                x = task.test.x
                x = ({k: v[start:start + batch_size] for k, v in x.items()}
                     if isinstance(x, dict) else x[start:start + batch_size])
                y = task.test.y[start:start + batch_size]
                logits = logits_of(model, x)
                masked_prediction = mask_logits(logits, allowed).argmax(1)
                prediction = masked_prediction if stream.scenario == "task" else logits.argmax(1)
                correct += (prediction == y).sum()
                correct_masked += (masked_prediction == y).sum()
                if keep_predictions:
                    task_predictions.append(prediction)
        accuracy[task.index] = correct.item() / len(task.test)
        task_accuracy[task.index] = correct_masked.item() / len(task.test)
        if keep_predictions:
            targets.append(task.test.y.cpu().numpy())
            predictions.append(torch.cat(task_predictions).cpu().numpy())
    model.train(was_training)
    return Evaluation(accuracy, task_accuracy, targets, predictions)


def stream_to_device(stream: Stream, device: torch.device) -> Stream:
    if device.type == "cpu":
        return stream
    tasks = tuple(Task(task.name, task.index,
                       Split(to_device(task.train.x, device), task.train.y.to(device)),
                       Split(to_device(task.test.x, device), task.test.y.to(device)),
                       task.classes) for task in stream.tasks)
    return Stream(stream.name, tasks, stream.scenario, stream.num_classes, stream.input_shape)


def run(model: nn.Module, stream: Stream, strategy: Strategy | None = None,
        config: TrainConfig = TrainConfig(), listener: Listener | None = None) -> RunResult:
    """Train `model` on the tasks of `stream` in order and return the accuracy matrix and curves.

    `listener`, when given, receives every event dict (losses, evaluations, task ends) and
    `{"event": "step", "step": k, "total_steps": n, "task": t}` after each optimizer step (for
    progress bars).
    The global RNG is seeded for the run and restored afterwards, so runs are reproducible and
    leave the caller's random state alone.
    """
    strategy = strategy if strategy is not None else Chain()
    device = torch.device(config.device)
    model.to(device)
    stream = stream_to_device(stream, device)
    class_mask = stream.class_mask().to(device)
    num_tasks = len(stream.tasks)
    if config.joint:
        joint, joint_task_ids = joint_task(stream)
        phases = [(joint, joint_task_ids)]
    else:
        phases = [(task, torch.full((len(task.train),), task.index)) for task in stream.tasks]
    steps_per_epoch = [math.ceil(len(task.train) / config.batch_size) for task, _ in phases]
    total_steps = config.epochs * sum(steps_per_epoch)
    events: list[dict] = []

    def emit(event: dict) -> None:
        events.append(event)
        if listener is not None:
            listener(event)

    curve_steps: list[int] = []
    curve_rows: list[np.ndarray] = []
    rows, task_rows, task_end_steps = [], [], []
    train_seconds = eval_seconds = 0.0
    step = 0

    # Data order comes from this generator alone; the global RNG (dropout, say) is seeded too.
    order_generator = torch.Generator().manual_seed(config.seed)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        strategy.before_run(model, stream, config.seed)

        started = time.perf_counter()
        before = evaluate(model, stream, strategy, list(stream.tasks), class_mask,
                          config.eval_batch_size, device)
        eval_seconds += time.perf_counter() - started
        emit({"event": "eval", "step": 0, "task": None, "accuracy": before.accuracy.tolist()})

        for phase, (task, task_ids) in enumerate(phases):
            started = time.perf_counter()
            strategy.before_task(model, task)
            # The optimizer is rebuilt per task, after before_task has frozen or added parameters.
            trainable = [p for p in model.parameters() if p.requires_grad]
            if not trainable:
                raise UsageError(f"no trainable parameters left for task {task.name!r}")
            groups = strategy.param_groups(model, [{"params": trainable}])
            optimizer = make_optimizer(config, groups)
            model.train()
            task_ids = task_ids.to(device)
            window_loss, window_terms, window_steps = 0.0, {}, 0
            task_step = 0
            for epoch in range(config.epochs):
                order = torch.randperm(len(task.train), generator=order_generator).to(device)
                for start in range(0, len(task.train), config.batch_size):
                    index = order[start:start + config.batch_size]
                    batch = Batch(take(task.train.x, index), task.train.y[index], task_ids[index])
                    batch = strategy.transform_batch(batch, task)
                    logits = logits_of(model, batch.x)
                    if stream.scenario == "task":
                        logits = mask_logits(logits, class_mask[batch.task])
                    loss = F.cross_entropy(logits, batch.y)
                    terms = strategy.loss_terms(model, batch, logits, task)
                    for term in terms.values():
                        loss = loss + term
                    loss_value = loss.item()
                    task_step += 1
                    step += 1
                    if not math.isfinite(loss_value):
                        raise DivergenceError(
                            f"loss is {loss_value} on task {task.index} ({task.name}) at step "
                            f"{task_step} of that task (epoch {epoch + 1}); try a lower --lr")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    strategy.after_step(model, batch, task)

                    window_loss += loss_value
                    for key, value in terms.items():
                        window_terms[key] = window_terms.get(key, 0.0) + value.item()
                    window_steps += 1
                    if window_steps == config.log_every:
                        emit({"event": "loss", "step": step, "task": task.index, "epoch": epoch,
                              "loss": window_loss / window_steps,
                              **{k: v / window_steps for k, v in window_terms.items()}})
                        window_loss, window_terms, window_steps = 0.0, {}, 0
                    # A task's last step is followed by the full evaluation anyway.
                    last_step = task_step == config.epochs * steps_per_epoch[phase]
                    if config.eval_every and step % config.eval_every == 0 and not last_step:
                        train_seconds += time.perf_counter() - started
                        started = time.perf_counter()
                        seen = list(stream.tasks[:task.index + 1]) if not config.joint \
                            else list(stream.tasks)
                        during = evaluate(model, stream, strategy, seen, class_mask,
                                          config.eval_batch_size, device)
                        curve_steps.append(step)
                        curve_rows.append(during.accuracy)
                        emit({"event": "eval", "step": step, "task": task.index,
                              "accuracy": [None if np.isnan(a) else a for a in during.accuracy]})
                        eval_seconds += time.perf_counter() - started
                        started = time.perf_counter()
                    if listener is not None:
                        listener({"event": "step", "step": step, "total_steps": total_steps,
                                  "task": task.index})
            if window_steps:
                emit({"event": "loss", "step": step, "task": task.index, "epoch": epoch,
                      "loss": window_loss / window_steps,
                      **{k: v / window_steps for k, v in window_terms.items()}})
            strategy.after_task(model, task)
            train_seconds += time.perf_counter() - started

            started = time.perf_counter()
            last = phase == len(phases) - 1
            after = evaluate(model, stream, strategy, list(stream.tasks), class_mask,
                             config.eval_batch_size, device, keep_predictions=last)
            eval_seconds += time.perf_counter() - started
            rows.append(after.accuracy)
            task_rows.append(after.task_accuracy)
            task_end_steps.append(step)
            curve_steps.append(step)
            curve_rows.append(after.accuracy)
            emit({"event": "task_end", "step": step, "task": task.index, "name": task.name,
                  "accuracy": after.accuracy.tolist()})
            log.info("task %d/%d (%s): mean accuracy over the stream %.4f", phase + 1,
                     len(phases), task.name, float(after.accuracy.mean()))

    class_il = stream.scenario == "class"
    return RunResult(
        accuracy=np.stack(rows),
        initial_accuracy=before.accuracy,
        task_accuracy=np.stack(task_rows) if class_il else None,
        initial_task_accuracy=before.task_accuracy if class_il else None,
        curve_steps=np.asarray(curve_steps, dtype=np.int64),
        curve_accuracy=np.stack(curve_rows).reshape(len(curve_rows), num_tasks),
        task_end_steps=task_end_steps,
        final_targets=after.targets,
        final_predictions=after.predictions,
        train_seconds=train_seconds,
        eval_seconds=eval_seconds,
        steps=step,
        events=events,
    )
