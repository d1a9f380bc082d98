"""A model's features of whole splits, for classifiers fitted on them (prototypes, ridge), and a
cache that computes them once per split while the model does not change."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from cl.errors import UsageError
from cl.models import eval_mode, find_head, logits_of, model_input, trim_padding
from cl.types import Inputs, Split, num_rows, take

# head: the input of the model's head (the built-in MLP and CNN, a ViT's class token);
# mean_tokens: the mean of a transformers model's last hidden states over the row's tokens (how
# sentence encoders such as all-MiniLM-L6-v2 were trained to be read; their BERT pooler, which
# feeds the sequence classifier's head, was not); auto: mean_tokens for tokenized text, else head.
FEATURES = ("auto", "head", "mean_tokens")
Features = Literal["auto", "head", "mean_tokens"]


def check_features(features: str) -> None:
    if features not in FEATURES:
        raise ValueError(f"features must be one of {', '.join(FEATURES)}, got {features!r}")


def resolve(features: str, x: Inputs) -> str:
    """`auto` made concrete for inputs like `x`; mean_tokens refused where there are no tokens."""
    text = isinstance(x, dict) and "attention_mask" in x
    if features == "auto":
        return "mean_tokens" if text else "head"
    if features == "mean_tokens" and not text:
        raise UsageError("features=mean_tokens needs a transformers model on tokenized text; "
                         "use features=head")
    return features


def mean_tokens(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Each row's mean hidden state over its tokens (the mask's ones), padding left out."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def batch_features(model: nn.Module, x: Inputs, features: str) -> Tensor:
    """The features of one batch of rows, float32, [rows, dim] (no grad is taken here)."""
    if resolve(features, x) == "mean_tokens":
        x = trim_padding(x)
        output = model(**x, output_hidden_states=True)
        return mean_tokens(output.hidden_states[-1], x["attention_mask"]).float()
    kept: list[Tensor] = []
    head = model.get_submodule(find_head(model))
    # The head's input; a head that reads a sequence (RoBERTa's) takes its first position.
    handle = head.register_forward_pre_hook(
        lambda module, inputs: kept.append(inputs[0] if inputs[0].dim() == 2
                                           else inputs[0][:, 0]))
    try:
        if isinstance(x, dict):
            model(**trim_padding(x))
        else:
            model(model_input(x))
    finally:
        handle.remove()
    return kept[-1].float()


def in_evaluation_batches(x: Inputs, outputs: Callable[[slice | Tensor], Tensor]) -> Tensor:
    """`outputs(rows)` for every batch of rows of `x`, put back in row order: the evaluation's
    batches (`cl.runner.evaluation_batches`: text rows sorted by length, as many as fit in its
    token budget), so short rows do not pay for long ones' padding."""
    from cl.runner import TrainConfig, evaluation_batches

    parts: list[Tensor] = []
    index: list[Tensor] = []
    for rows in evaluation_batches(x, TrainConfig.eval_batch_size, TrainConfig.eval_tokens):
        parts.append(outputs(rows))
        index.append(torch.arange(num_rows(x))[rows] if isinstance(rows, slice) else rows)
    if not parts:
        raise ValueError("no rows to forward")
    result = parts[0].new_empty((num_rows(x), parts[0].shape[1]))
    result[torch.cat(index).to(result.device)] = torch.cat(parts)
    return result


def split_features(model: nn.Module, split: Split, features: str) -> Tensor:
    """The features of every row of `split`, in row order, with the model in eval mode."""
    with eval_mode(model), torch.inference_mode():
        computed = in_evaluation_batches(
            split.x, lambda rows: batch_features(model, split.rows(rows), features))
    # A copy made outside inference mode: the features then serve in ordinary arithmetic.
    return computed.clone()


def logits_in_batches(model: nn.Module, x: Inputs) -> Tensor:
    """The model's logits for every row of `x`, in row order, in the evaluation's batches; the
    caller sets eval and inference mode."""
    return in_evaluation_batches(x, lambda rows: logits_of(model, take(x, rows)))


class FeatureCache:
    """Features of whole splits, each computed once, until `clear()` (the model changed).

    Keyed by the split object: a run's splits live as long as the run, and the cache holds them
    so that their ids stay theirs."""

    def __init__(self, features: str) -> None:
        check_features(features)
        self.features = features
        self._entries: dict[int, tuple[Split, Tensor]] = {}
        self.rows_computed = 0  # rows forwarded for features over the cache's life

    def of(self, model: nn.Module, split: Split) -> Tensor:
        entry = self._entries.get(id(split))
        if entry is None:
            entry = (split, split_features(model, split, self.features))
            self._entries[id(split)] = entry
            self.rows_computed += len(split)
        return entry[1]

    def clear(self) -> None:
        self._entries.clear()

    def nbytes(self) -> int:
        return sum(value.numel() * value.element_size() for _, value in self._entries.values())


ADAPT = ("none", "first")
# What may compose with a classifier on frozen features: freeze picks what trains in the
# first-task adaptation; anything that trains later, swaps weights at evaluation or scores rows
# itself would contradict the frozen features or the classifier.
COMPOSES_WITH = ("freeze",)


class FrozenFeatures:
    """The part a classifier on a frozen model's features shares (prototypes, ridge): which
    tasks take gradient steps (none, or the first, to adapt the model, `adapt=first`), freezing
    the model from then on, and the features of each split, computed once after that."""

    def __init__(self, adapt: str, features: str, concat: bool = False) -> None:
        if adapt not in ADAPT:
            raise ValueError(f"adapt must be one of {', '.join(ADAPT)}, got {adapt!r}")
        if not isinstance(concat, bool):
            raise ValueError(f"concat must be true or false, got {concat!r}")
        if concat and adapt != "first":
            raise ValueError("concat puts the pretrained model's features beside the adapted "
                             "model's: it needs adapt=first")
        self.adapt = adapt
        self.concat = concat
        self.cache = FeatureCache(features)
        # concat (APER's aggregation): a frozen copy of the model as built, and its features.
        self.pretrained: nn.Module | None = None
        self.pretrained_cache = FeatureCache(features)
        self._joined: dict[int, tuple[Split, Tensor]] = {}  # id(split) -> both, side by side

    def start(self, model: nn.Module) -> None:
        """Before the run (before any weight of `model` changes, and before a checkpoint's
        weights are loaded into it): with concat, keep a frozen copy of the model as built."""
        if self.concat and self.pretrained is None:
            self.pretrained = copy.deepcopy(model).requires_grad_(False)

    def check_composition(self, name: str, chain: tuple) -> None:
        others = [s.name for s in chain if s.name != name and s.name not in COMPOSES_WITH]
        if others:
            raise ValueError(f"{name} classifies from the features of a frozen model; it does "
                             f"not compose with {others[0]} (only with "
                             f"{', '.join(COMPOSES_WITH)}, to choose what adapt=first trains)")

    def trains(self, task) -> bool:
        return self.adapt == "first" and task.index == 0

    def before_task(self, model: nn.Module, task) -> None:
        if not self.trains(task):
            # Nothing trains any more: the trainable-parameter count says so, and nothing can
            # change the features the cache holds.
            model.requires_grad_(False)

    def task_features(self, model: nn.Module, task) -> Tensor:
        """After `task`: its training rows' features (a task that trained invalidates every
        feature computed before, the evaluation's before training among them)."""
        if self.trains(task):
            self.cache.clear()
            self._joined.clear()
            model.requires_grad_(False)
        return self.of(model, task.train)

    def rows(self, model: nn.Module, split: Split, rows: slice | Tensor) -> Tensor:
        return self.of(model, split)[rows]

    def of(self, model: nn.Module, split: Split) -> Tensor:
        """The features of every row of `split`: the model's, or with concat the pretrained
        model's and the adapted model's side by side (each computed once)."""
        adapted = self.cache.of(model, split)
        if self.pretrained is None:
            return adapted
        entry = self._joined.get(id(split))
        if entry is None:
            pretrained = self.pretrained_cache.of(self.pretrained, split)
            entry = (split, torch.cat([pretrained, adapted.to(pretrained.device)], dim=1))
            self._joined[id(split)] = entry
        return entry[1]

    def unchanged_keys(self, model: nn.Module) -> frozenset[str]:
        """Without adaptation the model stays as built: a checkpoint need not hold any of it."""
        return frozenset(model.state_dict()) if self.adapt == "none" else frozenset()

    def report(self) -> dict:
        joined = sum(value.numel() * value.element_size() for _, value in self._joined.values())
        return {"feature_rows_computed": self.cache.rows_computed
                + self.pretrained_cache.rows_computed,
                "feature_cache_bytes": self.cache.nbytes() + self.pretrained_cache.nbytes()
                + joined}


def mask_unseen(scores: Tensor, seen: Tensor) -> Tensor:
    """`scores` with the classes not seen yet (`seen`: bool per class) at the lowest finite
    value: a classifier over the classes seen so far, in the stream's class space."""
    return scores.masked_fill(~seen, torch.finfo(scores.dtype).min)
