"""Loading an image-classification dataset through Hugging Face `datasets` (hub or local)."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import Tensor

from cl.errors import DataError
from cl.sources import load_dataset
from tasks.images import to_images

logger = logging.getLogger(__name__)

# Images decoded per batch: bounds the memory of the decoded-but-not-yet-stacked lists.
_DECODE_BATCH = 8192



def _decode_split(split, source: str, split_name: str, image_column: str,
                  label_column: str) -> tuple[Tensor, Tensor]:
    """Images (N, C, H, W) float32 in [0, 1] and int64 labels of one split, decoded in batches."""
    missing = [column for column in (image_column, label_column)
               if column not in split.column_names]
    if missing:
        raise DataError(f"{source}: split {split_name!r} has no column {missing[0]!r} "
                        f"(columns: {', '.join(split.column_names)})")
    where = f"{source}: column {image_column!r} of split {split_name!r}"
    images, labels = [], []
    columns = split.select_columns([image_column, label_column]).with_format("numpy")
    for batch in columns.iter(batch_size=_DECODE_BATCH):
        block = batch[image_column]
        if block.dtype == object:
            # numpy formatting stacks only when every image has the same shape.
            shapes = sorted({tuple(np.shape(image)) for image in block})
            raise DataError(f"{where}: images differ in size or channels "
                            f"(e.g. {shapes[0]} and {shapes[-1]}); all must share one")
        if images and block.shape[1:] != images[0].shape[1:]:
            raise DataError(f"{where}: images differ in size or channels "
                            f"(e.g. {images[0].shape[1:]} and {block.shape[1:]}); "
                            "all must share one")
        images.append(block)
        labels.append(np.asarray(batch[label_column]))
    if not images:
        raise DataError(f"{source}: split {split_name!r} is empty")
    y = np.concatenate(labels)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(f"{source}: column {label_column!r} holds {y.dtype} values of shape "
                        f"{y.shape[1:]}, expected integer class ids")
    if y.min() < 0:
        # ClassLabel marks a missing label as -1.
        raise DataError(f"{source}: column {label_column!r} of split {split_name!r} has "
                        f"{int((y < 0).sum())} rows without a label (-1)")
    stacked = np.concatenate(images)
    if stacked.ndim not in (3, 4):
        raise DataError(f"{where}: images have shape {stacked.shape[1:]}, expected (H, W) "
                        "or (H, W, C)")
    # Decoded images are (H, W) or (H, W, C), channels last as PIL gives them.
    return to_images(stacked, where, layout="nhwc"), torch.from_numpy(y.astype(np.int64))


def load_image_classification(source: str, *, image_column: str = "image",
                              label_column: str = "label", train_split: str = "train",
                              test_split: str = "test", cache_dir: str | os.PathLike | None = None
                              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x_train, y_train, x_test, y_test of an image-classification dataset from `datasets`.

    `source` is a hub name ("ylecun/mnist") or a local directory `load_dataset` understands
    (e.g. train.parquet and test.parquet files). Grayscale or colour images of one shared size
    become float32 (N, C, H, W) in [0, 1]; labels int64. Every failure is a one-line DataError
    (a HubUnreachable when the hub does not answer and `source` is not cached).
    """
    import datasets  # slow to import: only when a dataset is actually loaded

    dataset = load_dataset(source, cache_dir)
    if not isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"dataset {source!r} did not load as named splits")
    arrays = []
    for split_name in (train_split, test_split):
        if split_name not in dataset:
            raise DataError(f"{source}: no split {split_name!r} "
                            f"(splits: {', '.join(dataset) or 'none'})")
        arrays.extend(_decode_split(dataset[split_name], source, split_name, image_column,
                                    label_column))
    x_train, y_train, x_test, y_test = arrays
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{source}: train images have shape {tuple(x_train.shape[1:])} but "
                        f"test images {tuple(x_test.shape[1:])}")
    logger.info("loaded %s: %d train and %d test images of shape %s", source, len(x_train),
                len(x_test), tuple(x_train.shape[1:]))
    return x_train, y_train, x_test, y_test
