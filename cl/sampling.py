"""Seeded stratified subsets: the per-task caps on train and test rows (`--train-per-task`),
and the validation rows held out of each task's training rows (`--val-fraction`).

A cap keeps each class's share of the rows (largest remainders get the spare slots), draws the
rows of every class from one generator seeded per task and split, and keeps the chosen rows in
their original order: a capped split is a plain subset of the full one, the same for one seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cl.errors import UsageError
from cl.types import Split, Stream, take

SPLIT_KEYS = {"train": 0, "test": 1, "validation": 2}


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
    tasks = tuple(dataclasses.replace(
        task, train=cap_split(task.train, train_per_task, cap_seed(seed, task.index, "train")),
        test=cap_split(task.test, test_per_task, cap_seed(seed, task.index, "test")))
        for task in stream.tasks)
    return Stream(stream.name, tasks, stream.scenario, stream.num_classes, stream.input_shape)


def hold_out(stream: Stream, fraction: float, seed: int) -> Stream:
    """`stream` with `fraction` of each task's training rows moved to its validation split:
    class-stratified, seeded per task (apart from the caps' draws), both parts in their
    original order. The held-out rows are copied; a transformed split keeps its transform."""
    if not fraction:
        return stream
    tasks = []
    for task in stream.tasks:
        rows = len(task.train)
        held = round(rows * fraction)
        if not 0 < held < rows:
            raise UsageError(f"--val-fraction {fraction} holds out {held} of task "
                             f"{task.index}'s {rows} training rows: it must leave at least one "
                             "row on each side")
        chosen = stratified_indices(task.train.y.numpy(), held,
                                    cap_seed(seed, task.index, "validation"))
        keep = np.ones(rows, dtype=bool)
        keep[chosen] = False
        parts = [torch.from_numpy(index) for index in (np.flatnonzero(keep), chosen)]
        train, validation = (Split(take(task.train.x, index), task.train.y[index],
                                   task.train.transform) for index in parts)
        tasks.append(dataclasses.replace(task, train=train, validation=validation))
    return Stream(stream.name, tuple(tasks), stream.scenario, stream.num_classes,
                  stream.input_shape)
