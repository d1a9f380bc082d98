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
from cl.models import eval_mode, logits_of, state_dict_mismatch
from cl.strategy import Chain, Strategy
from cl.types import Batch, Inputs, Split, Stream, Task, concat, take, to_device

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")

MAIN = "main"  # the view of R itself, beside the variants strategies ask for (EMA's "live")

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

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            known = ", ".join(OPTIMIZERS)
            raise UsageError(f"unknown optimizer {self.optimizer!r} (known: {known})")
        for name in ("batch_size", "epochs", "eval_batch_size", "log_every"):
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
    inputs = x.values() if isinstance(x, dict) else [x]
    if any(value.is_floating_point() and not torch.isfinite(value).all() for value in inputs):
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
    rows: int  # test rows forwarded (what evaluation samples/s counts)


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
    with eval_mode(model):
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
                    prediction = (masked_prediction if stream.scenario == "task"
                                  else logits.argmax(1))
                    correct += (prediction == y).sum()
                    correct_masked += (masked_prediction == y).sum()
                    if keep_predictions:
                        task_predictions.append(prediction)
            accuracy[task.index] = correct.item() / len(task.test)
            task_accuracy[task.index] = correct_masked.item() / len(task.test)
            if keep_predictions:
                targets.append(task.test.y.cpu().numpy())
                predictions.append(torch.cat(task_predictions).cpu().numpy())
    return Evaluation(accuracy, task_accuracy, targets, predictions,
                      sum(len(task.test) for task in tasks))


def stream_to_device(stream: Stream, device: torch.device) -> Stream:
    if device.type == "cpu":
        return stream
    tasks = tuple(Task(task.name, task.index,
                       Split(to_device(task.train.x, device), task.train.y.to(device)),
                       Split(to_device(task.test.x, device), task.test.y.to(device)),
                       task.classes) for task in stream.tasks)
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


def run(model: nn.Module, stream: Stream, strategy: Strategy | None = None,
        config: TrainConfig = TrainConfig(), listener: Listener | None = None,
        checkpoint: Checkpointer | None = None, resume: dict | None = None) -> RunResult:
    """Train `model` on the tasks of `stream` in order and return the accuracy matrix and curves.

    Every evaluation (before training, every `eval_every` steps, after each task) measures R's
    model and each variant a strategy asks for, class-IL and task-IL from the same logits, so
    every figure derived from them comes from the same points of the run.

    `listener`, when given, receives every event dict (losses, evaluations, task ends) and
    `{"event": "step", "step": k, "total_steps": n, "task": t}` after each optimizer step (for
    progress bars).
    `checkpoint`, when given, receives after each task's evaluation the run state: the model's
    and the strategy's state dicts, every RNG state, and the progress so far (plain values and
    tensors only). Passing such a state back as `resume` continues the run right there, with
    the same model and strategy built afresh: the result equals an uninterrupted run's, bit for
    bit on the CPU.
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
    strategy.check(model, stream, config.joint)
    variants = strategy.eval_variants()
    # Everything measured so far: what a checkpoint carries so a resumed run can go on. Each
    # view (R's model, then each variant) keeps its after-task rows and its whole curve.
    progress: dict = {"next_phase": 0, "step": 0, "curve_steps": [], "task_end_steps": [],
                      "train_seconds": 0.0, "eval_seconds": 0.0, "events": [],
                      "train_rows": 0, "eval_rows": 0,
                      "views": {view: {"rows": [], "task_rows": [], "curve_rows": [],
                                       "curve_task_rows": []} for view in (MAIN, *variants)}}

    def emit(event: dict) -> None:
        progress["events"].append(event)
        if listener is not None:
            listener(event)

    def evaluate_views(tasks: list[Task], keep_predictions: bool = False
                       ) -> dict[str, Evaluation]:
        """`tasks` evaluated as R's model, then as each variant."""
        evaluations = {MAIN: evaluate(model, stream, strategy, tasks, class_mask,
                                      config.eval_batch_size, device, keep_predictions)}
        for name in variants:
            with strategy.eval_variant(name):
                evaluations[name] = evaluate(model, stream, strategy, tasks, class_mask,
                                             config.eval_batch_size, device)
        progress["eval_rows"] += sum(evaluation.rows for evaluation in evaluations.values())
        return evaluations

    def record(evaluations: dict[str, Evaluation], task_end: bool) -> None:
        """One point of the curve for every view; after a task, also a row of its matrix."""
        for name, evaluation in evaluations.items():
            view = progress["views"][name]
            view["curve_rows"].append(evaluation.accuracy.tolist())
            view["curve_task_rows"].append(evaluation.task_accuracy.tolist())
            if task_end:
                view["rows"].append(evaluation.accuracy.tolist())
                view["task_rows"].append(evaluation.task_accuracy.tolist())

    # Data order comes from this generator alone; the global RNG (dropout, say) is seeded too.
    order_generator = torch.Generator().manual_seed(config.seed)
    fork_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(config.seed)
        strategy.before_run(model, stream, config.seed)

        if resume is None:
            started = time.perf_counter()
            before = evaluate_views(list(stream.tasks))
            for name, evaluation in before.items():
                progress["views"][name]["initial"] = evaluation.accuracy.tolist()
                progress["views"][name]["initial_task"] = evaluation.task_accuracy.tolist()
            progress["eval_seconds"] += time.perf_counter() - started
            emit({"event": "eval", "step": 0, "task": None,
                  "accuracy": before[MAIN].accuracy.tolist()})
        else:
            # The strategy first (LoRA rebuilds its adapters), then the weights, then the RNGs.
            strategy.load_state_dict(resume["strategy"])
            problem = state_dict_mismatch(model.state_dict(), resume["model"])
            if problem is not None:  # a model file copied in from another run
                raise UsageError(f"the checkpoint's model does not fit this run's model: "
                                 f"{problem}")
            model.load_state_dict(resume["model"])
            progress = resume["progress"]
            if sorted(progress["views"]) != sorted((MAIN, *variants)):
                raise UsageError("the checkpoint was written by a run with other strategies")
            set_rng_state(resume["rng"], order_generator, device)
            for event in progress["events"]:
                if listener is not None and event["event"] != "step":
                    listener(event)
            log.info("resuming after task %d of %d", progress["next_phase"], len(phases))
        resumed_from = progress["next_phase"] if resume is not None else None
        final = None
        step = progress["step"]
        # torch's first optimizer of a process imports torch._dynamo (about 1.3 s): paid here,
        # outside the timed training, so that train_seconds measures training.
        make_optimizer(config, [{"params": [torch.zeros(1, requires_grad=True)]}])

        for phase in range(progress["next_phase"], len(phases)):
            task, task_ids = phases[phase]
            started = time.perf_counter()
            model.train()
            strategy.before_task(model, task)
            # The optimizer is rebuilt per task, after before_task has frozen or added parameters.
            trainable = [p for p in model.parameters() if p.requires_grad]
            if not trainable:
                raise UsageError(f"no trainable parameters left for task {task.name!r}")
            groups = strategy.param_groups(model, [{"params": trainable, "lr": config.lr}])
            optimizer = make_optimizer(config, groups)
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
                    # Task-IL trains each row against its own task's classes; strategies see
                    # the raw logits.
                    masked = mask_logits(logits, class_mask[batch.task]) \
                        if stream.scenario == "task" else logits
                    loss = F.cross_entropy(masked, batch.y)
                    terms = strategy.loss_terms(model, batch, logits, task)
                    for term in terms.values():
                        loss = loss + term
                    loss_value = loss.item()
                    progress["train_rows"] += len(batch)
                    task_step += 1
                    step += 1
                    if not math.isfinite(loss_value):
                        raise DivergenceError(
                            f"loss is {loss_value} on task {task.index} ({task.name}) at step "
                            f"{task_step} of that task (epoch {epoch + 1}); "
                            f"{divergence_cause(batch.x, logits, terms)}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    strategy.after_step(model, batch, logits.detach(), task)

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
                        progress["train_seconds"] += time.perf_counter() - started
                        started = time.perf_counter()
                        seen = list(stream.tasks[:task.index + 1]) if not config.joint \
                            else list(stream.tasks)
                        during = evaluate_views(seen)
                        progress["curve_steps"].append(step)
                        record(during, task_end=False)
                        emit({"event": "eval", "step": step, "task": task.index,
                              "accuracy": [None if math.isnan(a) else a
                                           for a in during[MAIN].accuracy.tolist()]})
                        progress["eval_seconds"] += time.perf_counter() - started
                        started = time.perf_counter()
                    if listener is not None:
                        listener({"event": "step", "step": step, "total_steps": total_steps,
                                  "task": task.index})
            if window_steps:
                emit({"event": "loss", "step": step, "task": task.index, "epoch": epoch,
                      "loss": window_loss / window_steps,
                      **{k: v / window_steps for k, v in window_terms.items()}})
            strategy.after_task(model, task)
            progress["train_seconds"] += time.perf_counter() - started

            started = time.perf_counter()
            evaluations = evaluate_views(list(stream.tasks),
                                         keep_predictions=phase == len(phases) - 1)
            final = after = evaluations[MAIN]
            progress["eval_seconds"] += time.perf_counter() - started
            record(evaluations, task_end=True)
            progress["task_end_steps"].append(step)
            progress["curve_steps"].append(step)
            progress["step"] = step
            progress["next_phase"] = phase + 1
            emit({"event": "task_end", "step": step, "task": task.index, "name": task.name,
                  "accuracy": after.accuracy.tolist()})
            log.info("task %d/%d (%s): mean accuracy over the stream %.4f", phase + 1,
                     len(phases), task.name, float(after.accuracy.mean()))
            if checkpoint is not None:
                checkpoint({"model": model.state_dict(), "strategy": strategy.state_dict(),
                            "rng": rng_state(order_generator, device), "progress": progress})

        if final is None:
            # Resumed after the last task: the final predictions (confusion matrix, F1) come
            # from one more pass over the restored model.
            final = evaluate(model, stream, strategy, list(stream.tasks), class_mask,
                             config.eval_batch_size, device, keep_predictions=True)
            progress["eval_rows"] += final.rows

    class_il = stream.scenario == "class"

    def matrix(rows: list) -> np.ndarray:
        return np.asarray(rows, dtype=np.float64).reshape(len(rows), num_tasks)

    def measured(view: dict) -> dict[str, np.ndarray | None]:
        """A view's matrices; the task-IL ones only where they differ in meaning (class-IL)."""
        return {"accuracy": matrix(view["rows"]),
                "initial_accuracy": np.asarray(view["initial"], dtype=np.float64),
                "task_accuracy": matrix(view["task_rows"]) if class_il else None,
                "initial_task_accuracy": np.asarray(view["initial_task"], dtype=np.float64)
                if class_il else None,
                "curve_accuracy": matrix(view["curve_rows"]),
                "curve_task_accuracy": matrix(view["curve_task_rows"]) if class_il else None}

    views = {name: measured(view) for name, view in progress["views"].items()}
    return RunResult(
        **views.pop(MAIN),
        curve_steps=np.asarray(progress["curve_steps"], dtype=np.int64),
        task_end_steps=list(progress["task_end_steps"]),
        final_targets=final.targets,
        final_predictions=final.predictions,
        train_seconds=progress["train_seconds"],
        eval_seconds=progress["eval_seconds"],
        steps=progress["step"],
        train_rows=progress["train_rows"],
        eval_rows=progress["eval_rows"],
        events=progress["events"],
        variants=views,
        resumed_from=resumed_from,
    )
