"""Generic stream builders over in-memory arrays: class splits, pixel permutations, rotations.

Each builder takes a train and a test set (numpy arrays or tensors), checks them, and returns a
`Stream` of tensors: x as float32 (or uint8 pixels) with the input's per-row shape, y as int64
global class ids. Permuted and rotated streams store the data once and give each task a
transform its batches pass through (`cl.types.Split.rows`).
Labels are first mapped to 0..C-1 by sorted unique value, so any integer labels work.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from cl.errors import DataError, UsageError
from cl.models import model_input
from cl.types import SCENARIOS, RowTransform, Split, Stream, Task

logger = logging.getLogger(__name__)

DEFAULT_CLASSES_PER_TASK = 2


def check_arrays(x_train: Any, y_train: Any, x_test: Any, y_test: Any
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Train and test arrays as tensors (x float32, or uint8 pixels when both splits are uint8;
    y int64), or a DataError on what is wrong."""
    xs = {"x_train": x_train, "x_test": x_test}
    ys = {"y_train": y_train, "y_test": y_test}
    tensors: dict[str, Tensor] = {}
    for key, value in {**xs, **ys}.items():
        try:
            tensors[key] = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as error:
            raise DataError(f"{key} is not a numeric array: {error}") from None
    for key in ys:
        y = tensors[key]
        if y.ndim != 1 or y.dtype == torch.bool or y.dtype.is_floating_point or y.is_complex():
            raise DataError(f"{key} must be 1-D integer class ids, "
                            f"got shape {tuple(y.shape)} of {y.dtype}")
        tensors[key] = y.to(torch.int64)
    # uint8 images stay pixels when both splits hold them: a quarter of float32's memory,
    # scaled to [0, 1] one batch at a time (cl.models.model_input).
    pixels = all(tensors[key].dtype == torch.uint8 for key in xs)
    if not pixels and any(tensors[key].dtype == torch.uint8 for key in xs):
        raise DataError(f"x_train is {tensors['x_train'].dtype} but x_test is "
                        f"{tensors['x_test'].dtype}: give both as uint8 pixels or both as float "
                        "features (e.g. pixels / 255)")
    for key in xs:
        x = tensors[key]
        if x.ndim < 2:
            raise DataError(f"{key} must have one row per example (N, ...), "
                            f"got shape {tuple(x.shape)}")
        if not (pixels or x.dtype.is_floating_point):
            raise DataError(f"{key} has dtype {x.dtype}; pass float features "
                            "(e.g. pixels / 255) or uint8 pixels")
        if not pixels:
            tensors[key] = x.to(torch.float32)
    for split in ("train", "test"):
        x, y = tensors[f"x_{split}"], tensors[f"y_{split}"]
        if len(x) != len(y):
            raise DataError(f"x_{split} has {len(x)} rows but y_{split} has {len(y)}")
        if len(x) == 0:
            raise DataError(f"the {split} set is empty")
    if tensors["x_train"].shape[1:] != tensors["x_test"].shape[1:]:
        raise DataError(f"x_train rows have shape {tuple(tensors['x_train'].shape[1:])} "
                        f"but x_test rows have shape {tuple(tensors['x_test'].shape[1:])}")
    unseen = set(tensors["y_test"].unique().tolist()) - set(tensors["y_train"].unique().tolist())
    if unseen:
        raise DataError(f"y_test has classes absent from y_train: "
                        f"{', '.join(map(str, sorted(unseen)))}")
    return tensors["x_train"], tensors["y_train"], tensors["x_test"], tensors["y_test"]


def _map_labels(y_train: Tensor, y_test: Tensor) -> tuple[Tensor, Tensor, int]:
    """Labels mapped to 0..C-1 by sorted unique value (test classes are a subset of train's)."""
    values = torch.unique(y_train)  # sorted
    return (torch.searchsorted(values, y_train), torch.searchsorted(values, y_test),
            len(values))


def check_scenario(scenario: str) -> None:
    """A UsageError unless `scenario` is one of cl's scenarios."""
    if scenario not in SCENARIOS:
        raise UsageError(f"unknown scenario {scenario!r} (known: {', '.join(SCENARIOS)})")


def check_positive(value: int, what: str) -> None:
    """A UsageError naming `value` unless it is an integer of at least 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what} must be positive, got {value!r}")


def class_order_of(class_order: str, num_classes: int, seed: int) -> list[int]:
    """The order classes are dealt into tasks: "natural", "shuffle" (seeded) or explicit ids."""
    if class_order == "natural":
        return list(range(num_classes))
    if class_order == "shuffle":
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(num_classes, generator=generator).tolist()
    try:
        order = [int(part) for part in class_order.split(",")]
    except ValueError:
        raise UsageError(f"class order {class_order!r} is not 'natural', 'shuffle' or a "
                         "comma-separated list of class ids") from None
    if sorted(order) != list(range(num_classes)):
        raise UsageError(f"class order {class_order!r} is not a permutation of the "
                         f"{num_classes} class ids 0..{num_classes - 1}")
    return order


def _classes_per_task(num_classes: int, num_tasks: int | None,
                      classes_per_task: int | None) -> int:
    if num_tasks is not None and classes_per_task is not None:
        raise UsageError("give num_tasks or classes_per_task, not both")
    if num_tasks is not None:
        check_positive(num_tasks, "num_tasks")
        if num_classes % num_tasks:
            raise UsageError(f"the {num_classes} classes do not split evenly into "
                             f"{num_tasks} tasks")
        return num_classes // num_tasks
    per_task = DEFAULT_CLASSES_PER_TASK if classes_per_task is None else classes_per_task
    check_positive(per_task, "classes_per_task")
    if num_classes % per_task:
        raise UsageError(f"classes per task {per_task} does not divide the "
                         f"{num_classes} classes")
    return per_task


def split_stream(name: str, x_train: Any, y_train: Any, x_test: Any, y_test: Any, *,
                 scenario: str = "class", num_tasks: int | None = None,
                 classes_per_task: int | None = None, class_order: str = "natural",
                 seed: int = 0) -> Stream:
    """A stream whose tasks hold disjoint groups of classes (split MNIST and the like).

    Classes are dealt in `class_order` into tasks of `classes_per_task` (default 2) or into
    `num_tasks` equal groups. `class_order` lists the mapped ids 0..C-1. In the `class` and
    `task` scenarios labels stay global ids (num_classes = C); in `domain` each task's labels
    become the position within its task, 0..k-1 (num_classes = k).
    """
    check_scenario(scenario)
    x_train, y_train, x_test, y_test = check_arrays(x_train, y_train, x_test, y_test)
    y_train, y_test, num_classes = _map_labels(y_train, y_test)
    per_task = _classes_per_task(num_classes, num_tasks, classes_per_task)
    order = class_order_of(class_order, num_classes, seed)
    # A class's position within its task: the domain scenario's label for it.
    position = torch.empty(num_classes, dtype=torch.int64)
    position[torch.tensor(order)] = torch.arange(num_classes) % per_task
    tasks = []
    for index in range(num_classes // per_task):
        group = order[index * per_task:(index + 1) * per_task]
        group_tensor = torch.tensor(group)
        splits = []
        for x, y in ((x_train, y_train), (x_test, y_test)):
            rows = torch.isin(y, group_tensor)
            labels = y[rows]
            splits.append(Split(x[rows], position[labels] if scenario == "domain" else labels))
        if len(splits[1]) == 0:
            logger.warning("task %d (classes %s) of %s has no test rows", index, group, name)
        classes = tuple(range(per_task)) if scenario == "domain" else tuple(sorted(group))
        tasks.append(Task(name=f"classes {','.join(map(str, group))}", index=index,
                          train=splits[0], test=splits[1], classes=classes))
    return Stream(name=name, tasks=tuple(tasks), scenario=scenario,
                  num_classes=per_task if scenario == "domain" else num_classes,
                  input_shape=tuple(x_train.shape[1:]))


def _transformed_stream(name: str, arrays: tuple[Tensor, Tensor, Tensor, Tensor], *,
                        scenario: str, transforms: Sequence[RowTransform | None],
                        task_names: Sequence[str]) -> Stream:
    """A stream of one task per transform: every task holds the same stored rows (one copy in
    memory, whatever the number of tasks) and passes each batch through its own transform.

    Domain: labels shared (num_classes = C). Class and task: task t's labels are offset by
    t*C (num_classes = T*C), so task-IL masks each task to its own C outputs.
    """
    x_train, y_train, x_test, y_test = arrays
    y_train, y_test, num_classes = _map_labels(y_train, y_test)
    num_tasks = len(transforms)
    tasks = []
    for index, transform in enumerate(transforms):
        offset = 0 if scenario == "domain" else index * num_classes
        tasks.append(Task(name=task_names[index], index=index,
                          train=Split(x_train, y_train + offset, transform),
                          test=Split(x_test, y_test + offset, transform),
                          classes=tuple(range(offset, offset + num_classes))))
    return Stream(name=name, tasks=tuple(tasks), scenario=scenario,
                  num_classes=num_classes if scenario == "domain" else num_tasks * num_classes,
                  input_shape=tuple(x_train.shape[1:]))


@dataclass(frozen=True, eq=False)
class PermuteFeatures:
    """A permuted task's inputs: each row's flattened features (C*H*W for images) reordered by
    one fixed permutation. Exact on any dtype, so uint8 pixels stay pixels."""

    permutation: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        # A gather along the features, one index row broadcast to every row: three to four
        # times faster than indexing the columns (`flat[:, permutation]`), the same values.
        flat = x.reshape(len(x), -1)
        return flat.gather(1, self.permutation.expand(len(x), -1)).reshape(x.shape)

    def to(self, device: torch.device | str) -> PermuteFeatures:
        return PermuteFeatures(self.permutation.to(device))


def permuted_stream(name: str, x_train: Any, y_train: Any, x_test: Any, y_test: Any, *,
                    num_tasks: int, scenario: str = "domain", seed: int = 0,
                    transform_first: bool = False) -> Stream:
    """Task 0 is the data as given; task t > 0 applies a seeded random permutation of features
    (`transform_first`: task 0 too, as the DER table's code permutes every task).

    The permutation acts on the flattened per-row features (C*H*W for images) and is the same
    for train and test. The data is stored once; each task permutes its batches as they are
    taken (`PermuteFeatures`).
    """
    check_scenario(scenario)
    check_positive(num_tasks, "num_tasks")
    arrays = check_arrays(x_train, y_train, x_test, y_test)
    generator = torch.Generator().manual_seed(seed)
    num_features = math.prod(arrays[0].shape[1:])
    kept = 0 if transform_first else 1  # task 0 as given, unless it is permuted too
    transforms = [None] * kept + [
        PermuteFeatures(torch.randperm(num_features, generator=generator))
        for _ in range(num_tasks - kept)]
    names = ["original"] * kept + [f"permutation {index}" for index in range(kept, num_tasks)]
    return _transformed_stream(name, arrays, scenario=scenario, transforms=transforms,
                               task_names=names)


def rotate(x: Tensor, degrees: float) -> Tensor:
    """Images (N, C, H, W) rotated counterclockwise (as displayed) about their centre.

    Bilinear sampling with zero fill; 90 degrees matches `torch.rot90(x, 1, dims=(-2, -1))`.
    One grid_sample call over the whole tensor.
    """
    if degrees % 360 == 0:
        return x
    height, width = x.shape[-2:]
    radians = math.radians(degrees)
    cos, sin = math.cos(radians), math.sin(radians)
    # affine_grid maps each output location to the input location it samples, in coordinates
    # normalised to [-1, 1] per axis; the aspect ratio terms keep the rotation rigid on
    # non-square images. With y pointing down, sampling at (cos x - sin y, sin x + cos y)
    # turns the picture counterclockwise as displayed.
    theta = torch.tensor([[[cos, -sin * height / width, 0.0],
                           [sin * width / height, cos, 0.0]]], dtype=x.dtype, device=x.device)
    # Every image shares one grid: computing it once and expanding it (a view, no copy) is
    # several times faster than affine_grid per image, and its memory does not grow with N.
    grid = F.affine_grid(theta, [1, *x.shape[1:]], align_corners=False)
    return F.grid_sample(x, grid.expand(len(x), -1, -1, -1), mode="bilinear",
                         padding_mode="zeros", align_corners=False)


def rotated_stream(name: str, x_train: Any, y_train: Any, x_test: Any, y_test: Any, *,
                   num_tasks: int | None = None, scenario: str = "domain", seed: int = 0,
                   angles: Sequence[float] | None = None, transform_first: bool = False
                   ) -> Stream:
    """Task t is the images rotated counterclockwise by a fixed angle in degrees.

    Default angles: task 0 at 0 degrees, the others drawn uniformly in [0, 180) with `seed`
    (`transform_first`: task 0's too, as the DER table's code rotates every task).
    Given `angles` set the number of tasks (and must agree with `num_tasks` if both are given).
    Labels as in `permuted_stream`.
    """
    check_scenario(scenario)
    if angles is not None:
        angles = [float(angle) for angle in angles]
        if not angles:
            raise UsageError("rotation angles: give at least one angle")
        if num_tasks is not None and num_tasks != len(angles):
            raise UsageError(f"{len(angles)} rotation angles given for {num_tasks} tasks")
        num_tasks = len(angles)
    if num_tasks is None:
        raise UsageError("rotated streams need a number of tasks or a list of angles")
    check_positive(num_tasks, "num_tasks")
    arrays = check_arrays(x_train, y_train, x_test, y_test)
    if arrays[0].ndim != 4:
        raise DataError(f"rotation needs images of shape (N, C, H, W), "
                        f"got rows of shape {tuple(arrays[0].shape[1:])}")
    if angles is None:
        generator = torch.Generator().manual_seed(seed)
        kept = 0 if transform_first else 1  # task 0 upright, unless it is rotated too
        angles = [0.0] * kept + (torch.rand(num_tasks - kept, generator=generator,
                                            dtype=torch.float64) * 180).tolist()
    logger.debug("rotation angles for %s: %s", name, angles)
    names = [f"rotated {angle:.1f} degrees" for angle in angles]
    return _transformed_stream(name, arrays, scenario=scenario,
                               transforms=[Rotate(angle) for angle in angles], task_names=names)


@dataclass(frozen=True)
class Rotate:
    """A rotated task's inputs: the batch's images (uint8 pixels scaled first) rotated by
    `degrees` (`rotate`); the same values as rotating every image at once."""

    degrees: float

    def __call__(self, x: Tensor) -> Tensor:
        return rotate(model_input(x), self.degrees)

    def to(self, device: torch.device | str) -> Rotate:
        return self


# Per-channel statistics of the usual datasets, by name (`normalize=mnist`): those of the
# training set, as the most used frameworks and papers normalise with them.
Statistics = tuple[tuple[float, ...], tuple[float, ...]]  # (means, standard deviations)
NORMALIZATIONS: dict[str, Statistics] = {
    "mnist": ((0.1307,), (0.3081,)),
}


@dataclass(frozen=True, eq=False)
class Normalize:
    """Inputs scaled to [0, 1] (uint8 pixels first, `model_input`), then per channel
    `(x - mean) / std`; one value applies to every feature."""

    mean: Tensor  # (C,) float32
    std: Tensor

    def __call__(self, x: Tensor) -> Tensor:
        x = model_input(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - self.mean.view(shape)) / self.std.view(shape)

    def to(self, device: torch.device | str) -> Normalize:
        return Normalize(self.mean.to(device), self.std.to(device))


@dataclass(frozen=True, eq=False)
class Then:
    """`first`, then `second`: a task's own transform, then the stream's normalisation."""

    first: RowTransform
    second: RowTransform

    def __call__(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def to(self, device: torch.device | str) -> Then:
        return Then(self.first.to(device), self.second.to(device))


def parse_normalization(stream: str, text: str) -> Statistics | None:
    """`normalize=none`, a name (`mnist`), or per-channel `means/stds` such as
    `0.485|0.456|0.406/0.229|0.224|0.225`: None, or (means, stds)."""
    if text == "none":
        return None
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    usage = (f"normalize={text!r} for stream {stream!r} is not none, "
             f"{', '.join(NORMALIZATIONS)} or means/stds (e.g. 0.1307/0.3081, one value per "
             "channel separated by '|')")
    parts = text.split("/")
    if len(parts) != 2:
        raise UsageError(usage)
    try:
        means, stds = ([float(value) for value in part.split("|")] for part in parts)
    except ValueError:
        raise UsageError(usage) from None
    if len(means) != len(stds):
        raise UsageError(f"normalize={text!r} for stream {stream!r}: {len(means)} means but "
                         f"{len(stds)} standard deviations")
    if not all(math.isfinite(value) for value in means) or not all(
            math.isfinite(value) and value > 0 for value in stds):
        raise UsageError(f"normalize={text!r} for stream {stream!r}: means must be finite and "
                         "standard deviations positive")
    return tuple(means), tuple(stds)


def normalized(stream: Stream, means: Sequence[float], stds: Sequence[float]) -> Stream:
    """`stream` with every split's inputs normalised per channel after the task's own transform
    (a permutation, a rotation), one batch at a time: the stored rows are not copied."""
    channels = stream.input_shape[0] if len(stream.input_shape) > 1 else 1
    if len(means) not in (1, channels):
        raise UsageError(f"{len(means)} normalisation values for inputs of {channels} "
                         f"channels (shape {stream.input_shape}): give one, or one per channel")
    normalize = Normalize(torch.tensor(means, dtype=torch.float32),
                          torch.tensor(stds, dtype=torch.float32))

    def split(part: Split) -> Split:
        transform = normalize if part.transform is None else Then(part.transform, normalize)
        return Split(part.x, part.y, transform)

    tasks = tuple(Task(task.name, task.index, split(task.train), split(task.test), task.classes)
                  for task in stream.tasks)
    return Stream(stream.name, tasks, stream.scenario, stream.num_classes, stream.input_shape)
