"""MNIST as tensors, from a Keras-layout .npz file or through Hugging Face `datasets`."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor

from cl.errors import DataError
from tasks.hf import load_image_classification
from tasks.npz import read_npz

HUB_NAME = "ylecun/mnist"
_HINT = "to use a local copy pass --data path/to/mnist.npz"


def _is_npz_path(data: str) -> bool:
    return data.endswith(".npz") or os.path.isfile(data)


def load_mnist(data: str | os.PathLike | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x_train, y_train, x_test, y_test: (N, 1, 28, 28) images, uint8 pixels as the file holds
    them (or float32 in [0, 1]), and int64 labels 0..9.

    `data` is a Keras-layout .npz file (x_train (N, 28, 28) uint8, y_train (N,), x_test,
    y_test); None loads the hub dataset "ylecun/mnist"; any other string (a local directory,
    another hub name) goes to `datasets.load_dataset` as it is.
    """
    if data is not None and _is_npz_path(os.fspath(data)):
        return _load_npz(os.fspath(data))
    source = HUB_NAME if data is None else os.fspath(data)
    try:
        x_train, y_train, x_test, y_test = load_image_classification(source)
    except DataError as error:
        raise DataError(f"{error}; {_HINT}") from None
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if tuple(x.shape[1:]) != (1, 28, 28):
            raise DataError(f"{source}: {split} images have shape {tuple(x.shape[1:])}, "
                            "expected 28x28 grayscale")
        _check_labels(source, f"{split} labels", y.numpy())
    return x_train, y_train, x_test, y_test


def _check_labels(where: str, what: str, y: np.ndarray) -> None:
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{where}: {what} outside 0..9 (min {y.min()}, max {y.max()})")


def _load_npz(path: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    arrays = read_npz(path)
    tensors = []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"{path}: x_{split} has shape {x.shape}, expected (N, 28, 28)")
        if x.dtype == np.uint8:  # kept as pixels: scaled per batch (cl.models.model_input)
            images = torch.from_numpy(x)
        elif x.dtype.kind == "f":
            if len(x) and (x.min() < 0 or x.max() > 1):
                raise DataError(f"{path}: x_{split} holds floats outside [0, 1]; "
                                "expected uint8 pixels or floats in [0, 1]")
            images = torch.from_numpy(x.astype(np.float32))
        else:
            raise DataError(f"{path}: x_{split} has dtype {x.dtype}, expected uint8 pixels")
        _check_labels(path, f"y_{split} holds labels", y)
        tensors += [images.unsqueeze(1), torch.from_numpy(y.astype(np.int64))]
    return tuple(tensors)
