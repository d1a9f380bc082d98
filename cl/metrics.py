"""Continual-learning metrics: functions of the accuracy matrix R and of the evaluation curve.

`R` has shape (T, T): row i is the model after training through task i, column j the task it is
evaluated on, entries are accuracies in [0, 1]. A joint run (one training phase over all tasks)
gives a single row, shape (1, T); only `average_accuracy` and `summarize` accept that form.

NaN means "not evaluated", in R, in the `initial` accuracies and in the curve: a run may evaluate
only the tasks seen so far (then R[i, j] is NaN for j > i and `initial` is all NaN) or only after
the last task (then rows 0..T-2 and `initial` are all NaN). A metric whose entries were not all
evaluated is None, never NaN and never an error; each function says which entries it needs.
Forgetting is the exception: it takes its max over the earlier rows that were evaluated. On a
matrix without NaN every metric is exactly what it was before NaN were allowed.

The continual-evaluation curve (De Lange et al. 2023) is three arrays: `steps` (N,), the global
training iteration of each evaluation, non-decreasing; `accuracy` (N, T), NaN where a task was
not evaluated; and `task_end_steps` (T_trained,), the global step at which training on each task
ended. The curve holds an evaluation at exactly each task end step, of at least every task seen
so far.

Pure numpy, imported at the end of every run: no scikit-learn (its import alone cost a run 1.3 s of
CPU and 120 MB), no torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike


def _matrix(R: ArrayLike) -> np.ndarray:
    """R as a float 2-D array with at least one row and one column."""
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] == 0 or R.shape[1] == 0:
        raise ValueError(f"the accuracy matrix R must be a non-empty 2-D array, "
                         f"got shape {R.shape}")
    return R


def _square(R: ArrayLike) -> np.ndarray:
    """R as a float (T, T) array."""
    R = _matrix(R)
    if R.shape[0] != R.shape[1]:
        raise ValueError(f"the accuracy matrix R must be square (T, T), got shape {R.shape}")
    return R


def _initial(initial: ArrayLike, num_tasks: int) -> np.ndarray:
    initial = np.asarray(initial, dtype=float)
    if initial.shape != (num_tasks,):
        raise ValueError(f"initial accuracies must have shape ({num_tasks},), got {initial.shape}")
    return initial


def _evaluated(values: np.ndarray) -> bool:
    """Whether every entry of `values` was evaluated (none is NaN)."""
    return not np.isnan(values).any()


def average_accuracy(R: ArrayLike) -> float | None:
    """ACC = (1/T) * sum_j R[T-1, j]: mean accuracy over all tasks after training on the last.

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
    Accepts a square (T, T) matrix or the single row (1, T) of a joint run.
    Needs the last row (every evaluation mode fills it); None if any of it is NaN.
    """
    last = _matrix(R)[-1]
    if not _evaluated(last):
        return None
    return float(np.mean(last))


def backward_transfer(R: ArrayLike) -> float | None:
    """BWT = 1/(T-1) * sum_{j<T-1} (R[T-1, j] - R[j, j]); negative means forgetting.

    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
    None when T == 1 (no earlier task to transfer back to), and when any R[j, j] or
    R[T-1, j] with j < T-1 is NaN (not evaluated; e.g. a run evaluated only after the last task).
    """
    R = _square(R)
    T = R.shape[0]
    if T == 1:
        return None
    last, diagonal = R[T - 1, : T - 1], np.diag(R)[: T - 1]
    if not (_evaluated(last) and _evaluated(diagonal)):
        return None
    return float(np.mean(last - diagonal))


def forward_transfer(R: ArrayLike, initial: ArrayLike) -> float | None:
    """FWT = 1/(T-1) * sum_{j>=1} (R[j-1, j] - initial[j]).

    `initial[j]` is the accuracy on task j of the model before any training (the paper's b_j,
    the accuracy of a randomly initialised model), so FWT measures how much learning tasks
    0..j-1 helps task j before it is seen.
    Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017.
    None when T == 1, and when any R[j-1, j] or initial[j] with j >= 1 is NaN (not evaluated:
    a run that evaluates only seen tasks, or only after the last one, never measures either).
    """
    R = _square(R)
    T = R.shape[0]
    initial = _initial(initial, T)
    if T == 1:
        return None
    before, untrained = np.diag(R, k=1), initial[1:]
    if not (_evaluated(before) and _evaluated(untrained)):
        return None
    return float(np.mean(before - untrained))


def forgetting_per_task(R: ArrayLike) -> np.ndarray:
    """f_j = max_{l in 0..T-2} R[l, j] - R[T-1, j] for each j < T-1; shape (T-1,).

    Chaudhry et al., "Riemannian Walk for Incremental Learning: Understanding Forgetting and
    Intransigence", ECCV 2018. As in the paper the max runs over every earlier row, including
    rows l < j from before task j was trained, so f_j can be negative when the final model is
    better on task j than any earlier one.

    The max runs over the earlier rows that evaluated task j (NaN entries are skipped): with
    only seen tasks evaluated it is max_{l in j..T-2} R[l, j]. f_j is NaN (an array of floats
    holds no None; `summarize` writes None) when no earlier row evaluated task j, or when
    R[T-1, j] is NaN.
    """
    R = _square(R)
    T = R.shape[0]
    if T == 1:
        return np.zeros(0)
    earlier, last = R[: T - 1, : T - 1], R[T - 1, : T - 1]
    if _evaluated(earlier):
        return earlier.max(axis=0) - last
    missing = np.isnan(earlier)
    best = np.where(missing, -np.inf, earlier).max(axis=0)  # a max selects, so it is exact
    best[missing.all(axis=0)] = np.nan
    return best - last


def forgetting(R: ArrayLike) -> float | None:
    """Average forgetting F = 1/(T-1) * sum_{j<T-1} f_j, with f_j from `forgetting_per_task`.

    Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018. None when T == 1.
    Since the max in f_j includes l = j, f_j >= R[j, j] - R[T-1, j], hence F >= -BWT.
    With entries not evaluated, the mean runs over the tasks whose f_j is defined (not NaN);
    None when there is none (a run evaluated only after the last task).
    """
    per_task = forgetting_per_task(R)
    if per_task.size == 0:
        return None
    if not _evaluated(per_task):
        per_task = per_task[~np.isnan(per_task)]
        if per_task.size == 0:
            return None
    return float(np.mean(per_task))


def learning_accuracy(R: ArrayLike) -> float:
    """LA = (1/T) * sum_j R[j, j]: mean accuracy on each task just after learning it.

    Riemer et al., "Learning to Learn without Forgetting by Maximizing Transfer and Minimizing
    Interference", ICLR 2019. Needs the whole diagonal; None if any R[j, j] is NaN.
    """
    diagonal = np.diag(_square(R))
    if not _evaluated(diagonal):
        return None
    return float(np.mean(diagonal))


def _curve(steps: ArrayLike, accuracy: ArrayLike,
           task_end_steps: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The three curve arrays, checked for shape and order."""
    steps = np.asarray(steps)
    accuracy = np.asarray(accuracy, dtype=float)
    task_end_steps = np.asarray(task_end_steps)
    if steps.ndim != 1:
        raise ValueError(f"steps must be 1-D, got shape {steps.shape}")
    if accuracy.ndim != 2 or accuracy.shape[0] != steps.shape[0]:
        raise ValueError(f"accuracy must have shape ({steps.shape[0]}, T) to match steps, "
                         f"got {accuracy.shape}")
    if task_end_steps.ndim != 1 or task_end_steps.size == 0:
        raise ValueError(f"task_end_steps must be a non-empty 1-D array, "
                         f"got shape {task_end_steps.shape}")
    if task_end_steps.size > accuracy.shape[1]:
        raise ValueError(f"{task_end_steps.size} trained tasks but accuracy has only "
                         f"{accuracy.shape[1]} task columns")
    if np.any(np.diff(steps) < 0):
        raise ValueError("steps must be non-decreasing")
    if np.any(np.diff(task_end_steps) < 0):
        raise ValueError("task_end_steps must be non-decreasing")
    return steps, accuracy, task_end_steps


def _at_task_end(steps: np.ndarray, accuracy: np.ndarray, task_end_steps: np.ndarray,
                 task: int) -> float | None:
    """Accuracy on `task` at its own task end step (the last such evaluation, if repeated);
    None if it was not evaluated there."""
    values = accuracy[steps == task_end_steps[task], task]
    values = values[~np.isnan(values)]
    return float(values[-1]) if values.size else None


def _evaluated_at_task_ends(steps: np.ndarray, accuracy: np.ndarray,
                            task_end_steps: np.ndarray, task: int, until: int) -> bool:
    """Whether `task` was evaluated at every task end step after its own, up to task `until`'s.

    A run that evaluates after each task (all tasks, or the ones seen so far) does so; one that
    evaluates only after the last task does not, and then a minimum over the window
    (task_end_steps[task], task_end_steps[until]] would only see what little was evaluated."""
    for end in task_end_steps[task + 1: until + 1]:
        if end > task_end_steps[task] and np.isnan(accuracy[steps == end, task]).all():
            return False
    return True


def _window_min(steps: np.ndarray, accuracy: np.ndarray, task: int, after: int,
                until: int) -> float | None:
    """Min accuracy on `task` over evaluations with after < step <= until; None if there is none."""
    values = accuracy[(steps > after) & (steps <= until), task]
    values = values[~np.isnan(values)]
    return float(values.min()) if values.size else None


def min_accuracy(steps: ArrayLike, accuracy: ArrayLike,
                 task_end_steps: ArrayLike) -> float | None:
    """min-ACC after the last trained task k = T_trained - 1.

    min-ACC = 1/k * sum_{i<k} min_{task_end_steps[i] < step <= task_end_steps[k]} accuracy[step, i]:
    the mean over earlier tasks of the worst accuracy seen on each from the end of its training
    up to now (NaN entries, tasks not evaluated at a step, are ignored). A lower bound on what a
    user stopping at any evaluated step would have got, where ACC only looks at task ends.
    De Lange, van de Ven & Tuytelaars, "Continual evaluation for lifelong learning: identifying
    the stability gap", ICLR 2023. None when k == 0.

    Not evaluated: the minima are taken over the evaluations made, as the paper's are over its
    evaluation period, but only where each earlier task i was evaluated at every task end step
    after its own (task_end_steps[i+1..k]), as a run that evaluates after each task does,
    whether it evaluates all tasks or the ones seen so far. Otherwise (a run evaluated only after
    the last task) the "worst case" would be little more than the final accuracy, so min-ACC is
    None.
    """
    steps, accuracy, task_end_steps = _curve(steps, accuracy, task_end_steps)
    k = task_end_steps.size - 1
    if k == 0:
        return None
    if not all(_evaluated_at_task_ends(steps, accuracy, task_end_steps, i, k)
               for i in range(k)):
        return None
    minima = []
    for i in range(k):
        if task_end_steps[i] == task_end_steps[k]:
            # No step since task i ended (tasks fitted without gradient steps, a prototype
            # classifier's): the evaluations after it are the last k - i at that step, the
            # task ends i+1..k, since the runner evaluates nothing else there.
            values = accuracy[steps == task_end_steps[k], i][-(k - i):]
            values = values[~np.isnan(values)]
            worst = float(values.min()) if values.size == k - i else None
        else:
            worst = _window_min(steps, accuracy, i, task_end_steps[i], task_end_steps[k])
        if worst is None:
            raise ValueError(f"the curve has no evaluation of task {i} after its task end step "
                             f"{task_end_steps[i]} (up to step {task_end_steps[k]})")
        minima.append(worst)
    return float(np.mean(minima))


def worst_case_accuracy(steps: ArrayLike, accuracy: ArrayLike,
                        task_end_steps: ArrayLike) -> float | None:
    """WC-ACC = 1/(k+1) * a_k + (1 - 1/(k+1)) * min-ACC, with k = T_trained - 1.

    a_k is the accuracy on the last trained task k at its own task end step; min-ACC is
    `min_accuracy`. It trades the current task's accuracy against the worst case on earlier
    ones, weighting each task equally. With k == 0 it is a_0.
    De Lange, van de Ven & Tuytelaars, "Continual evaluation for lifelong learning: identifying
    the stability gap", ICLR 2023 (their k counts from 1, hence k+1 here).
    None when either part is: a_k not evaluated, or min-ACC None (see `min_accuracy`; a run
    evaluated only after the last task has a_k but no min-ACC).
    """
    steps, accuracy, task_end_steps = _curve(steps, accuracy, task_end_steps)
    k = task_end_steps.size - 1
    current = _at_task_end(steps, accuracy, task_end_steps, k)
    if k == 0 or current is None:
        return current
    earlier = min_accuracy(steps, accuracy, task_end_steps)
    if earlier is None:
        return None
    return float(current / (k + 1) + (1 - 1 / (k + 1)) * earlier)


def stability_gap(steps: ArrayLike, accuracy: ArrayLike, task_end_steps: ArrayLike) -> np.ndarray:
    """Per task i < k: the largest drop of its accuracy during training of the next task.

    gap_i = max(0, a_i - min_{task_end_steps[i] < step <= task_end_steps[i+1]} accuracy[step, i]),
    where a_i is the accuracy on task i at its own task end step; shape (k,) with
    k = T_trained - 1. The "stability gap" of De Lange, van de Ven & Tuytelaars (ICLR 2023) is
    the transient dip at the start of a new task that task-end evaluation never sees: a task
    whose accuracy falls from 0.9 to 0.3 and recovers to 0.8 has gap 0.6, not the 0.1 forgetting
    R shows. Clipped at 0 (a curve that never falls below a_i has gap 0), and 0 when no
    evaluation of task i lies in the window (the next task took no steps). Meant for plots and
    tables, not a metric from the paper's summary.
    NaN (not evaluated) for a task i that was not evaluated at its own task end step, or, when
    the next task took steps, not at the next task's end step (a run evaluated only after the
    last task): there is no a_i, or no window, to compare.
    """
    steps, accuracy, task_end_steps = _curve(steps, accuracy, task_end_steps)
    k = task_end_steps.size - 1
    gaps = np.zeros(k)
    for i in range(k):
        current = _at_task_end(steps, accuracy, task_end_steps, i)
        if current is None or not _evaluated_at_task_ends(steps, accuracy, task_end_steps,
                                                          i, i + 1):
            gaps[i] = np.nan
            continue
        worst = _window_min(steps, accuracy, i, task_end_steps[i], task_end_steps[i + 1])
        if worst is not None:
            gaps[i] = max(0.0, current - worst)
    return gaps


def macro_f1_per_task(y_true: list[np.ndarray], y_pred: list[np.ndarray],
                      classes: list[Sequence[int]]) -> list[float]:
    """Macro-averaged F1 of each task over that task's own classes.

    F1_t is the mean over the task's classes c of 2 TP_c / (2 TP_c + FP_c + FN_c) (0 when the
    class is neither true nor predicted): scikit-learn's `f1_score(average="macro",
    labels=classes[t], zero_division=0)`. A prediction outside the task's classes counts as a
    miss, never as a class of its own.
    """
    if not len(y_true) == len(y_pred) == len(classes):
        raise ValueError(f"y_true, y_pred and classes must have one entry per task, "
                         f"got {len(y_true)}, {len(y_pred)} and {len(classes)}")
    scores = []
    for task, (truth, predicted, labels) in enumerate(zip(y_true, y_pred, classes, strict=True)):
        truth, predicted = np.asarray(truth).ravel(), np.asarray(predicted).ravel()
        if len(truth) == 0:
            raise ValueError(f"task {task} has no test samples to score")
        if len(predicted) != len(truth):
            raise ValueError(f"task {task}: {len(truth)} labels but {len(predicted)} predictions")
        labels = np.asarray(list(labels))
        is_true = truth[None, :] == labels[:, None]  # (classes, rows)
        is_predicted = predicted[None, :] == labels[:, None]
        hits = (is_true & is_predicted).sum(axis=1)
        wrong = is_true.sum(axis=1) + is_predicted.sum(axis=1)  # 2 TP + FP + FN
        f1 = np.divide(2.0 * hits, wrong, out=np.zeros(len(labels)), where=wrong > 0)
        scores.append(float(f1.mean()))
    return scores


def confusion(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """Confusion matrix (num_classes, num_classes): entry [a, b] counts true class a predicted b."""
    truth, predicted = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} labels but {len(predicted)} predictions")
    for name, values in (("label", truth), ("prediction", predicted)):
        outside = values[(values < 0) | (values >= num_classes)]
        if outside.size:
            raise ValueError(f"{name} {outside[0]} is not a class id below {num_classes}")
    counts = np.bincount(truth.astype(np.int64) * num_classes + predicted.astype(np.int64),
                         minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def summarize(R: ArrayLike, initial: ArrayLike, steps: ArrayLike, accuracy: ArrayLike,
              task_end_steps: ArrayLike) -> dict[str, float | None | list]:
    """Every summary metric of a run as plain Python values, ready for JSON.

    Keys: "acc", "bwt", "fwt", "forgetting", "forgetting_per_task", "learning_accuracy",
    "min_acc", "wc_acc". R is (T, T) for a sequential run, or (1, T) for a joint run (one
    training phase over all tasks): then only "acc" is defined, the rest are None (and
    "forgetting_per_task" is empty), since they compare states across tasks a joint run never has.
    A metric whose entries were not evaluated (NaN) is None, as is an entry of
    "forgetting_per_task" with no f_j; see each metric for the entries it needs.
    """
    R = _matrix(R)
    T = R.shape[1]
    initial = _initial(initial, T)
    if R.shape[0] == 1 and T > 1:
        return {"acc": average_accuracy(R), "bwt": None, "fwt": None, "forgetting": None,
                "forgetting_per_task": [], "learning_accuracy": None, "min_acc": None,
                "wc_acc": None}
    R = _square(R)
    steps, accuracy, task_end_steps = _curve(steps, accuracy, task_end_steps)
    if accuracy.shape[1] != T or task_end_steps.size != T:
        raise ValueError(f"the curve must cover the {T} tasks of R: accuracy has "
                         f"{accuracy.shape[1]} task columns and task_end_steps "
                         f"{task_end_steps.size} entries")
    return {
        "acc": average_accuracy(R),
        "bwt": backward_transfer(R),
        "fwt": forward_transfer(R, initial),
        "forgetting": forgetting(R),
        "forgetting_per_task": [None if np.isnan(f) else float(f)
                                for f in forgetting_per_task(R)],
        "learning_accuracy": learning_accuracy(R),
        "min_acc": min_accuracy(steps, accuracy, task_end_steps),
        "wc_acc": worst_case_accuracy(steps, accuracy, task_end_steps),
    }
