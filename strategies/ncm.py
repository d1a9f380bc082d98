"""NCM: the nearest class mean of a frozen model's features (SimpleCIL, Zhou et al. 2023; with
`adapt=first`, APER's first-task adaptation): each class is the mean feature of its training
rows, and a row goes to the most similar mean among the classes seen so far. No gradient step
after the first task (none at all by default); features are computed once per row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl.features import FrozenFeatures, check_features, mask_unseen
from cl.strategy import Strategy
from cl.types import Split, Stream, Task, check_hook_arguments

METRICS = ("cosine", "euclidean")


@dataclass(frozen=True)
class NCMConfig:
    """Settings of `ncm:key=value,...`."""

    metric: Literal["cosine", "euclidean"] = "cosine"  # similarity of a row to a class mean
    adapt: Literal["none", "first"] = "none"  # first: train on task 0 as configured, then freeze
    features: Literal["auto", "head", "mean_tokens"] = "auto"  # see cl.features.FEATURES
    # With adapt=first: the pretrained model's features beside the adapted model's (APER's
    # aggregation, Zhou et al. 2023: what the first task taught, and what it may have lost).
    concat: bool = False

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        check_features(self.features)
        FrozenFeatures(self.adapt, self.features, self.concat)  # checks adapt and concat


def class_means(sums: Tensor, counts: Tensor) -> Tensor:
    """Each class's mean feature (a class without rows: zeros)."""
    return sums / counts.clamp(min=1).unsqueeze(1)


def ncm_scores(features: Tensor, means: Tensor, metric: str) -> Tensor:
    """Similarity of every row to every class mean: cosine, or minus the Euclidean distance."""
    if metric == "cosine":
        return F.normalize(features, dim=1) @ F.normalize(means, dim=1).T
    return -torch.cdist(features, means)


class NCM(Strategy):
    """Nearest class mean on the features of a model that no longer trains."""

    name: ClassVar[str] = "ncm"
    config_class: ClassVar[type] = NCMConfig
    predicts: ClassVar[bool] = True

    def __init__(self, config: NCMConfig | None = None) -> None:
        self.config = config if config is not None else NCMConfig()
        self.frozen = FrozenFeatures(self.config.adapt, self.config.features,
                                     self.config.concat)
        self.num_classes: int | None = None
        self.sums: Tensor | None = None  # float64 [classes, dim]: sums of each class's features
        self.counts: Tensor | None = None  # rows seen per class

    def __repr__(self) -> str:
        return f"NCM({self.config})"

    def check_composition(self, chain: tuple[Strategy, ...]) -> None:
        self.frozen.check_composition(self.name, chain)

    def trains(self, task: Task) -> bool:
        return self.frozen.trains(task)

    def before_run(self, model: nn.Module, stream: Stream, seed: int) -> None:
        check_hook_arguments("ncm.before_run", model=model, stream=stream, seed=seed)
        self.frozen.start(model)
        self.num_classes = stream.num_classes
        self.counts = torch.zeros(stream.num_classes, dtype=torch.int64)

    def before_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("ncm.before_task", model=model, task=task)
        self.frozen.before_task(model, task)

    def after_task(self, model: nn.Module, task: Task) -> None:
        check_hook_arguments("ncm.after_task", model=model, task=task)
        if self.counts is None:
            raise RuntimeError("ncm.after_task: call before_run(model, stream, seed) first")
        features = self.frozen.task_features(model, task).double()
        labels = task.train.y.to(features.device)
        if self.sums is None:
            self.sums = torch.zeros((self.num_classes, features.shape[1]), dtype=torch.float64)
        # Where the features are (a checkpoint loads on the CPU).
        self.sums, self.counts = self.sums.to(features.device), self.counts.to(features.device)
        self.sums.index_add_(0, labels, features)
        self.counts.index_add_(0, labels, torch.ones_like(labels))

    def eval_logits(self, model: nn.Module, split: Split, rows: slice | Tensor) -> Tensor:
        count = len(split.y[rows])
        if self.sums is None:  # before the first task: no class to choose, every score equal
            return torch.zeros((count, self.num_classes), device=split.y.device)
        features = self.frozen.rows(model, split, rows)
        means = class_means(self.sums, self.counts).to(features.device, features.dtype)
        seen = (self.counts > 0).to(features.device)
        return mask_unseen(ncm_scores(features, means, self.config.metric), seen)

    def unchanged_keys(self, model: nn.Module) -> frozenset[str]:
        return self.frozen.unchanged_keys(model)

    def report(self) -> dict[str, Any]:
        if self.sums is None:
            return {}
        return {**self.frozen.report(), "classes_seen": int((self.counts > 0).sum()),
                "prototype_bytes": self.sums.numel() * self.sums.element_size()}

    def state_dict(self) -> dict[str, Any]:
        return {"sums": self.sums, "counts": self.counts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums, self.counts = state.get("sums"), state.get("counts")
