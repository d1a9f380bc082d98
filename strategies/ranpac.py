"""RanPAC (McDonnell et al., NeurIPS 2023): a fixed random projection of a frozen model's
features with a ReLU, and a ridge-regression classifier on it, fitted in closed form from the
Gram matrix and the feature-target products accumulated over the tasks so far. With
`adapt=first`, the model trains on the first task as configured before it is frozen (the
paper's first-session adaptation). No gradient step after that; features are computed once.

The ridge is chosen per task on held-out rows, as the paper's code does (the grid 1e-8 to 1e13,
the squared error of one-hot targets), with one difference: the candidates are fitted on the
statistics of the earlier tasks plus the rest of this task's rows, not on this task's rows
alone, so the choice is made for the classifier that will be used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.features import FrozenFeatures, check_features, mask_unseen
from cl.strategy import Strategy
from cl.types import Split, Stream, Task, check_hook_arguments

RIDGES = tuple(10.0 ** power for power in range(-8, 14))
SEED_OFFSET = 2_000_003  # the projection's generator: apart from replay's and the data order's


@dataclass(frozen=True)
class RanPACConfig:
    """Settings of `ranpac:key=value,...`."""

    projection: int = 2000  # M, the random projection's width; 0: ridge on the features
    held_out: float = 0.2  # fraction of each task's training rows the ridge is chosen on
    adapt: Literal["none", "first"] = "none"  # first: train on task 0 as configured, then freeze
    features: Literal["auto", "head", "mean_tokens"] = "auto"  # see cl.features.FEATURES
    # With adapt=first: the pretrained model's features beside the adapted model's (APER's
    # aggregation, Zhou et al. 2023: what the first task taught, and what it may have lost).
    concat: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.projection, bool) or not isinstance(self.projection, int) \
                or self.projection < 0:
            raise ValueError(f"projection must be a non-negative integer, got "
                             f"{self.projection!r}")
        if not (isinstance(self.held_out, (int, float)) and 0 < self.held_out < 1):
            raise ValueError(f"held_out must be in (0, 1), got {self.held_out!r}")
        check_features(self.features)
        FrozenFeatures(self.adapt, self.features, self.concat)  # checks adapt and concat


def random_projection(dim: int, width: int, generator: torch.Generator) -> Tensor:
    """RanPAC's W: `dim x width`, standard normal entries, drawn once and never trained."""
    return torch.randn((dim, width), generator=generator)


def expand(features: Tensor, projection: Tensor | None) -> Tensor:
    """h = ReLU(features @ W), in float64 (the ridge's statistics are sums of many rows)."""
    features = features.double()
    if projection is None:
        return features
    return F.relu(features @ projection.to(features.device, torch.float64))


def statistics(expanded: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """One batch of rows' share of the Gram matrix, h^T h, and of h^T Y (Y one-hot)."""
    targets = F.one_hot(labels, num_classes).to(expanded.dtype)
    return expanded.T @ expanded, expanded.T @ targets


def ridge_weights(gram: Tensor, products: Tensor, ridge: float) -> Tensor:
    """The ridge-regression classifier: (G + ridge I)^-1 (h^T Y)."""
    identity = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + ridge * identity, products)


def choose_ridge(gram: Tensor, products: Tensor, held: Tensor, held_labels: Tensor,
                 ridges: tuple[float, ...] = RIDGES) -> tuple[float, list[float]]:
    """The ridge whose classifier, fitted on (gram, products), has the least mean squared error
    of one-hot targets on the held-out rows `held` (expanded); with every ridge's error.

    One eigendecomposition of the Gram matrix serves every candidate."""
    eigenvalues, vectors = torch.linalg.eigh(gram)
    rotated_products = vectors.T @ products
    rotated_held = held @ vectors
    targets = F.one_hot(held_labels, products.shape[1]).to(held.dtype)
    errors = []
    for ridge in ridges:
        predicted = (rotated_held / (eigenvalues + ridge)) @ rotated_products
        errors.append(float((predicted - targets).pow(2).mean()))
    best = min(range(len(ridges)), key=lambda i: errors[i])  # the first of equals
    return ridges[best], errors


class RanPAC(Strategy):
    """Ridge regression on randomly projected features of a model that no longer trains."""

    name: ClassVar[str] = "ranpac"
    config_class: ClassVar[type] = RanPACConfig
    predicts: ClassVar[bool] = True

    def __init__(self, config: RanPACConfig | None = None) -> None:
        self.config = config if config is not None else RanPACConfig()
        self.frozen = FrozenFeatures(self.config.adapt, self.config.features,
                                     self.config.concat)
        self.num_classes: int | None = None
        self.generator: torch.Generator | None = None
        self.projection: Tensor | None = None
        self.gram: Tensor | None = None
        self.products: Tensor | None = None
        self.weights: Tensor | None = None  # the classifier: [width, classes]
        self.seen: Tensor | None = None  # bool per class
        self.ridges: list[float] = []  # the ridge chosen after each task

    def __repr__(self) -> str:
        return f"RanPAC({self.config})"

    def check_composition(self, chain: tuple[Strategy, ...]) -> None:
        self.frozen.check_composition(self.name, chain)

    def trains(self, task: Task) -> bool:
        return self.frozen.trains(task)

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("ranpac.before_run", model=model, stream=stream, seed=seed)
        self.frozen.start(model)
        self.num_classes = stream.num_classes
        self.generator = torch.Generator().manual_seed(seed + SEED_OFFSET)
        self.seen = torch.zeros(stream.num_classes, dtype=torch.bool)

    def before_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("ranpac.before_task", model=model, task=task)
        self.frozen.before_task(model, task)

    def after_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("ranpac.after_task", model=model, task=task)
        if self.generator is None:
            raise RuntimeError("ranpac.after_task: call before_run(model, stream, seed) first")
        features = self.frozen.task_features(model, task)
        rows = len(features)
        if rows < 2:
            raise ValueError(f"ranpac needs at least 2 training rows in task {task.name!r} "
                             f"(some to fit, some to choose the ridge on), got {rows}")
        if self.projection is None and self.config.projection:
            self.projection = random_projection(features.shape[1], self.config.projection,
                                                self.generator)
        expanded = expand(features, self.projection)
        labels = task.train.y.to(expanded.device)
        width = expanded.shape[1]
        if self.gram is None:
            self.gram = torch.zeros((width, width), dtype=torch.float64)
            self.products = torch.zeros((width, self.num_classes), dtype=torch.float64)
        self.gram = self.gram.to(expanded.device)
        self.products = self.products.to(expanded.device)

        order = torch.randperm(rows, generator=self.generator).to(expanded.device)
        held = order[:min(rows - 1, max(1, math.floor(rows * self.config.held_out)))]
        fit = order[len(held):]
        gram, products = statistics(expanded[fit], labels[fit], self.num_classes)
        ridge, _ = choose_ridge(self.gram + gram, self.products + products, expanded[held],
                                labels[held])
        gram, products = statistics(expanded, labels, self.num_classes)
        self.gram += gram
        self.products += products
        self.weights = ridge_weights(self.gram, self.products, ridge)
        self.ridges.append(ridge)
        self.seen = self.seen.to(labels.device)
        self.seen[labels] = True

    def eval_logits(self, model: nn.Module, split: Split, rows: slice | Tensor) -> Tensor:
        count = len(split.y[rows])
        if self.weights is None:  # before the first task: no class to choose, every score equal
            return torch.zeros((count, self.num_classes), device=split.y.device)
        expanded = expand(self.frozen.rows(model, split, rows), self.projection)
        scores = (expanded @ self.weights.to(expanded.device)).float()
        return mask_unseen(scores, self.seen.to(scores.device))

    def unchanged_keys(self, model: nn.Module) -> frozenset[str]:
        return self.frozen.unchanged_keys(model)

    def report(self) -> dict[str, Any]:
        if self.weights is None:
            return {}
        held = [self.gram, self.products, self.weights]
        if self.projection is not None:
            held.append(self.projection)
        return {**self.frozen.report(), "ridges": list(self.ridges),
                "width": int(self.weights.shape[0]),
                "classifier_bytes": sum(t.numel() * t.element_size() for t in held)}

    def state_dict(self) -> dict[str, Any]:
        return {"projection": self.projection, "gram": self.gram, "products": self.products,
                "weights": self.weights, "seen": self.seen, "ridges": list(self.ridges),
                "generator": None if self.generator is None else self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        for key in ("projection", "gram", "products", "weights", "seen"):
            setattr(self, key, state[key])
        self.ridges = list(state["ridges"])
        if state["generator"] is not None:
            if self.generator is None:
                self.generator = torch.Generator()
            self.generator.set_state(state["generator"])
