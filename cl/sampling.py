"""Seeded stratified subsets: the per-task caps on train and test rows (`--train-per-task`).

A cap keeps each class's share of the rows (largest remainders get the spare slots), draws the
rows of every class from one generator seeded per task and split, and keeps the chosen rows in
their original order: a capped split is a plain subset of the full one, the same for one seed.
"""

from __future__ import annotations

import numpy as np
import torch

from cl.types import Split, Stream, Task, take

SPLIT_KEYS = {"train": 0, "test": 1}


def class_quotas(counts: np.ndarray, cap: int) -> np.ndarray:
    """Rows to keep per class: proportional to `counts`, summing to min(cap, total).

    Floors of the exact shares first; the slots left go to the largest fractional parts (ties
    to the lower class position), so no class is ever more than one row off its share."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if cap >= total:
        return counts.copy()
    shares = counts * cap / total
    quotas = np.floor(shares).astype(np.int64)
    spare = cap - int(quotas.sum())
    order = np.lexsort((np.arange(len(counts)), -(shares - quotas)))
    quotas[order[:spare]] += 1
    return quotas


def stratified_indices(labels: np.ndarray, cap: int | None, seed: int | list[int]) -> np.ndarray:
    """Sorted row indices of a seeded, class-stratified subset of at most `cap` rows."""
    labels = np.asarray(labels)
    if cap is None or cap >= len(labels):
        return np.arange(len(labels))
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    quotas = class_quotas(counts, cap)
    generator = np.random.default_rng(seed)
    chosen = [generator.choice(np.flatnonzero(inverse == position), size=int(quota),
                               replace=False)
              for position, quota in enumerate(quotas) if quota]
    return np.sort(np.concatenate(chosen)) if chosen else np.arange(0)


def cap_seed(seed: int, task_index: int, split: str) -> list[int]:
    """The generator seed of one task's split: the run seed, the task, train or test."""
    return [seed, task_index, SPLIT_KEYS[split]]


def cap_split(split: Split, cap: int | None, seed: list[int]) -> Split:
    if cap is None or cap >= len(split):
        return split
    index = torch.from_numpy(stratified_indices(split.y.numpy(), cap, seed))
    return Split(take(split.x, index), split.y[index], split.transform)


def cap_stream(stream: Stream, train_per_task: int | None, test_per_task: int | None,
               seed: int) -> Stream:
    """`stream` with each task's train and test rows capped (stratified, seeded); a split
    already within its cap is kept as it is, so capping twice changes nothing."""
    if train_per_task is None and test_per_task is None:
        return stream
    tasks = tuple(Task(task.name, task.index,
                       cap_split(task.train, train_per_task, cap_seed(seed, task.index, "train")),
                       cap_split(task.test, test_per_task, cap_seed(seed, task.index, "test")),
                       task.classes) for task in stream.tasks)
    return Stream(stream.name, tasks, stream.scenario, stream.num_classes, stream.input_shape)
