"""Text classification streams through `datasets`: one task per dataset (a hub name or a local
directory of jsonl/csv/parquet files), labels mapped to global class ids, seeded stratified caps,
and one tokenization per split with the model's fast tokenizer, cached on disk.

Every split of a stream is padded to the stream's longest row, so batches (and replayed rows)
concatenate; `cl.models.logits_of` trims the all-padding columns of each batch before the forward
pass, and test rows are sorted by length so evaluation batches carry little padding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from cl.errors import DataError, UsageError, one_line
from cl.sampling import cap_seed, stratified_indices
from cl.sources import HubUnreachable, load_dataset
from cl.types import Split, Stream, Task

logger = logging.getLogger(__name__)

LABELS_FILE = "labels.json"  # a list of label names, in class-id order, beside the data files
DEFAULT_MAX_LENGTH = 128
_TOKENIZE_CHUNK = 1024  # texts per tokenizer call: batched in Rust, bounded in memory


@dataclass(frozen=True)
class TextSource:
    """One task of a text stream: where its data are and which columns hold what.

    `source` is a local directory (train and test files that `datasets` reads: .jsonl, .json,
    .csv, .parquet; an optional labels.json) or a Hugging Face hub name. Several text columns are
    joined with a newline (dbpedia's title and content). `label_names`, when given, fixes the
    names and order of integer labels (a hub dataset whose labels are bare ids)."""

    name: str
    source: str
    text_columns: tuple[str, ...] = ("text",)
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    label_names: tuple[str, ...] | None = None


@dataclass
class RawTask:
    """A task's texts and local label ids (0..k-1 into `label_names`), before tokenization."""

    source: TextSource
    label_names: list[str]
    train_texts: list[str]
    train_labels: np.ndarray
    test_texts: list[str]
    test_labels: np.ndarray



def load_splits(source: TextSource) -> Any:
    """The `datasets.DatasetDict` of a source, or a one-line DataError."""
    import datasets  # slow to import: only when a dataset is actually loaded

    path = Path(source.source).expanduser()
    if path.is_file():
        raise DataError(f"{source.name}: {path} is a file; give a directory holding train and "
                        "test files (.jsonl, .csv or .parquet)")
    try:
        dataset = load_dataset(source.source)
    except HubUnreachable as error:
        raise HubUnreachable(f"{source.name}: {error}; give local copies with --data") from None
    except DataError as error:
        raise DataError(f"{source.name}: {error}") from None
    if not isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"{source.name}: dataset {source.source!r} did not load as named splits")
    for split in (source.train_split, source.test_split):
        if split not in dataset:
            raise DataError(f"{source.name}: no split {split!r} in {source.source} "
                            f"(splits: {', '.join(dataset) or 'none'})")
        columns = dataset[split].column_names
        for column in (*source.text_columns, source.label_column):
            if column not in columns:
                raise DataError(f"{source.name}: split {split!r} has no column {column!r} "
                                f"(columns: {', '.join(columns)})")
    return dataset


def _label_names(source: TextSource, dataset: Any) -> list[str] | None:
    """Label names in class-id order from the source, labels.json or a ClassLabel feature."""
    if source.label_names is not None:
        return list(source.label_names)
    labels_file = Path(source.source).expanduser() / LABELS_FILE
    if labels_file.is_file():
        try:
            names = json.loads(labels_file.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise DataError(f"{labels_file} is not valid JSON: {one_line(error)}") from None
        if (not isinstance(names, list) or not names
                or not all(isinstance(name, str) for name in names)
                or len(set(names)) != len(names)):
            raise DataError(f"{labels_file} must hold a list of distinct label names")
        return names
    feature = dataset[source.train_split].features[source.label_column]
    names = getattr(feature, "names", None)
    return list(names) if names else None


def _local_ids(values: list, names: list[str], where: str) -> np.ndarray:
    """Label values (names, or integer ids into `names`) as ids 0..len(names)-1."""
    position = {name: index for index, name in enumerate(names)}
    ids = np.empty(len(values), dtype=np.int64)
    for row, value in enumerate(values):
        if isinstance(value, str):
            if value not in position:
                raise DataError(f"{where}: label {value!r} is not one of the label names "
                                f"({', '.join(names)})")
            ids[row] = position[value]
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            if not 0 <= value < len(names):
                raise DataError(f"{where}: label id {value} is outside 0..{len(names) - 1} "
                                f"({len(names)} label names)")
            ids[row] = value
        else:
            raise DataError(f"{where}: label {value!r} is neither a name nor an integer id")
    return ids


def load_raw_task(source: TextSource, train_cap: int | None, test_cap: int | None,
                  seed: int, index: int) -> RawTask:
    """A source's texts and labels, capped per split (stratified, seeded) before any text is
    read, so a cap on a large hub dataset reads only the rows it keeps."""
    dataset = load_splits(source)
    names = _label_names(source, dataset)
    values = {split: list(dataset[split][source.label_column])
              for split in (source.train_split, source.test_split)}
    if names is None:
        # No names anywhere: the sorted distinct values of both splits are the classes.
        for split, rows in values.items():
            odd = next((value for value in rows if value is not None and (
                isinstance(value, bool) or not isinstance(value, (str, int)))), None)
            if odd is not None:
                raise DataError(f"{source.name} ({split}): label {odd!r} is neither a name nor "
                                "an integer id")
        distinct = {value for split in values.values() for value in split}
        if any(value is None for value in distinct):
            raise DataError(f"{source.name}: column {source.label_column!r} has empty labels")
        names = [str(value) for value in sorted(distinct)]
        values = {split: [str(value) for value in rows] for split, rows in values.items()}
    kept = {}
    for split, cap, kind in ((source.train_split, train_cap, "train"),
                             (source.test_split, test_cap, "test")):
        ids = _local_ids(values[split], names, f"{source.name} ({split})")
        if len(ids) == 0:
            raise DataError(f"{source.name}: split {split!r} is empty")
        rows = stratified_indices(ids, cap, cap_seed(seed, index, kind))
        selected = dataset[split].select(rows)
        columns = [list(selected[column]) for column in source.text_columns]
        texts = ["\n".join("" if part is None else str(part) for part in parts)
                 for parts in zip(*columns, strict=True)]
        kept[kind] = (texts, ids[rows])
    return RawTask(source, names, kept["train"][0], kept["train"][1], kept["test"][0],
                   kept["test"][1])


def cache_root() -> Path:
    """Where tokenized splits are cached: $CL_CACHE_DIR, else ~/.cache/cl."""
    root = os.environ.get("CL_CACHE_DIR") or Path.home() / ".cache" / "cl"
    return Path(root) / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of everything that decides the token ids: the tokenizer's full definition."""
    definition = tokenizer.backend_tokenizer.to_str()
    extra = json.dumps({"class": type(tokenizer).__name__,
                        "inputs": list(tokenizer.model_input_names),
                        "pad": tokenizer.pad_token_id}, sort_keys=True)
    return hashlib.sha256((definition + extra).encode()).hexdigest()


def _texts_hash(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def _encode(tokenizer: Any, texts: list[str], max_length: int) -> dict[str, Tensor]:
    """Token ids of `texts`, right-padded to their own longest row, int64 tensors."""
    names = [name for name in tokenizer.model_input_names
             if name in ("input_ids", "attention_mask", "token_type_ids")]
    rows: dict[str, list[list[int]]] = {name: [] for name in names}
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        encoded = tokenizer(texts[start:start + _TOKENIZE_CHUNK], truncation=True,
                            max_length=max_length, padding=False)
        for name in names:
            rows[name].extend(encoded[name])
    width = max((len(row) for row in rows["input_ids"]), default=1)
    tensors = {}
    for name in names:
        fill = tokenizer.pad_token_id if name == "input_ids" else 0
        array = np.full((len(texts), width), fill, dtype=np.int64)
        for position, row in enumerate(rows[name]):
            array[position, :len(row)] = row
        tensors[name] = torch.from_numpy(array)
    return tensors


def tokenize(tokenizer: Any, texts: list[str], max_length: int,
             fingerprint: str | None = None) -> dict[str, Tensor]:
    """`_encode` through an on-disk cache keyed by the tokenizer, the length and the texts.

    A cache that cannot be read or written is skipped with a log line: it only saves time."""
    from safetensors.torch import load_file, save_file

    fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
    key = hashlib.sha256(f"{fingerprint}:{max_length}:{_texts_hash(texts)}".encode()).hexdigest()
    path = cache_root() / f"{key[:32]}.safetensors"
    if path.is_file():
        try:
            cached = load_file(path)
            if len(cached["input_ids"]) == len(texts):
                logger.debug("tokenized %d texts from the cache %s", len(texts), path)
                return cached
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            logger.warning("ignoring unreadable tokenizer cache %s: %s", path, error)
    tensors = _encode(tokenizer, texts, max_length)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_file(tensors, partial)
        os.replace(partial, path)  # whole or absent: never half a cache file
    except OSError as error:
        logger.warning("could not cache tokenized texts in %s: %s", path.parent, error)
    return tensors


def _pad_to(tensors: dict[str, Tensor], width: int, pad_id: int) -> dict[str, Tensor]:
    padded = {}
    for name, tensor in tensors.items():
        fill = pad_id if name == "input_ids" else 0
        extra = tensor.new_full((len(tensor), width - tensor.shape[1]), fill)
        padded[name] = torch.cat([tensor, extra], dim=1)
    return padded


def check_tokenizer(tokenizer: Any, stream: str) -> None:
    if tokenizer is None:
        raise UsageError(f"stream {stream!r} holds text: give a text model "
                         "(--model minilm or --model hf:<name-or-path>)")
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError(f"stream {stream!r} needs a fast tokenizer; "
                         f"{type(tokenizer).__name__} is not one")
    if tokenizer.pad_token_id is None:
        raise UsageError(f"the tokenizer of stream {stream!r} has no padding token")


def class_ids(tasks: list[RawTask], scenario: str, share_labels: bool
              ) -> tuple[list[list[int]], int]:
    """Global class ids of each task's label names, and the head's width.

    Shared labels: one id per distinct name across the stream (amazon and yelp's star ratings
    are the same five classes). Otherwise each task has its own ids, one block per task, except
    in the domain scenario, where every task's labels are 0..k-1 of one shared head."""
    if share_labels:
        ids: dict[str, int] = {}
        for task in tasks:
            for name in task.label_names:
                ids.setdefault(name, len(ids))
        return [[ids[name] for name in task.label_names] for task in tasks], len(ids)
    if scenario == "domain":
        return ([list(range(len(task.label_names))) for task in tasks],
                max(len(task.label_names) for task in tasks))
    blocks, offset = [], 0
    for task in tasks:
        blocks.append(list(range(offset, offset + len(task.label_names))))
        offset += len(task.label_names)
    return blocks, offset


def text_stream(name: str, sources: Sequence[TextSource], tokenizer: Any, *,
                scenario: str = "class", share_labels: bool = False,
                max_length: int = DEFAULT_MAX_LENGTH, train_per_task: int | None = None,
                test_per_task: int | None = None, seed: int = 0) -> Stream:
    """A stream with one task per source, tokenized with `tokenizer` (a fast tokenizer)."""
    check_tokenizer(tokenizer, name)
    if max_length < 2:
        raise UsageError(f"max_length must be at least 2, got {max_length}")
    names = [source.name for source in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"stream {name!r} names a task twice: {', '.join(names)}")
    raw = [load_raw_task(source, train_per_task, test_per_task, seed, index)
           for index, source in enumerate(sources)]
    blocks, num_classes = class_ids(raw, scenario, share_labels)
    fingerprint = tokenizer_fingerprint(tokenizer)
    encoded = []
    for task in raw:
        train = tokenize(tokenizer, task.train_texts, max_length, fingerprint)
        test = tokenize(tokenizer, task.test_texts, max_length, fingerprint)
        # Test rows by length: evaluation batches then carry almost no padding.
        lengths = test["attention_mask"].sum(1)
        order = torch.from_numpy(np.argsort(-lengths.numpy(), kind="stable"))
        test = {key: value[order] for key, value in test.items()}
        encoded.append((train, test, task.test_labels[order.numpy()]))
    width = max(split["input_ids"].shape[1]
                for train, test, _ in encoded for split in (train, test))
    tasks = []
    for index, (task, block, (train, test, test_labels)) in enumerate(
            zip(raw, blocks, encoded, strict=True)):
        lookup = torch.tensor(block, dtype=torch.int64)
        tasks.append(Task(
            task.source.name, index,
            Split(_pad_to(train, width, tokenizer.pad_token_id),
                  lookup[torch.from_numpy(task.train_labels)]),
            Split(_pad_to(test, width, tokenizer.pad_token_id),
                  lookup[torch.from_numpy(test_labels)]),
            tuple(sorted(set(block)))))
        logger.info("task %d %s: %d train, %d test rows, %d classes", index, task.source.name,
                    len(task.train_labels), len(test_labels), len(block))
    return Stream(name, tuple(tasks), scenario, num_classes, (width,))
