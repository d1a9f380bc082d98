"""Reading train and test arrays from an .npz file in the Keras layout (x_train, y_train, ...)."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from cl.errors import DataError, one_line
from tasks.images import to_images

KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_npz(path: str | os.PathLike, keys: Sequence[str] = KEYS) -> dict[str, np.ndarray]:
    """The arrays `keys` of the .npz file `path`; a DataError naming the file on any problem.

    Also checks that each y is 1-D integer labels with as many rows as its x.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected an .npz file")
    try:
        with open(path, "rb") as file:
            magic = file.read(6)
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror or error})") from None
    if magic.startswith(b"\x93NUMPY"):
        raise DataError(f"{path}: a single .npy array, expected an .npz archive "
                        f"of {', '.join(keys)}")
    if not magic.startswith(b"PK"):
        raise DataError(f"{path}: not an .npz archive (not a zip file)")
    try:
        # allow_pickle=False: a data file must never be able to run code.
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in keys if key not in archive.files]
            if missing:
                raise DataError(f"{path}: missing key {missing[0]!r} "
                                f"(found: {', '.join(archive.files) or 'nothing'})")
            arrays = {key: archive[key] for key in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise DataError(f"{path}: not a readable .npz archive ({one_line(error)})") from None
    for split in ("train", "test"):
        x_key, y_key = f"x_{split}", f"y_{split}"
        if y_key not in arrays:
            continue
        y = arrays[y_key]
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise DataError(f"{path}: {y_key} has shape {y.shape} of {y.dtype}, "
                            "expected 1-D integer labels (N,)")
        if x_key in arrays and len(arrays[x_key]) != len(y):
            raise DataError(f"{path}: {x_key} has {len(arrays[x_key])} rows "
                            f"but {y_key} has {len(y)}")
    return arrays


def load_npz(path: str | os.PathLike, layout: str = "auto"
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x_train, y_train, x_test, y_test of an .npz file as tensors.

    Images of shape (N, H, W), (N, H, W, C) or (N, C, H, W) become float32 (N, C, H, W); flat
    (N, D) features stay flat. uint8 values are scaled by 1/255, floats are kept as they are.
    """
    arrays = read_npz(path)
    x_train = to_images(arrays["x_train"], f"{os.fspath(path)}: x_train", layout)
    x_test = to_images(arrays["x_test"], f"{os.fspath(path)}: x_test", layout)
    return (x_train, torch.from_numpy(arrays["y_train"].astype(np.int64)),
            x_test, torch.from_numpy(arrays["y_test"].astype(np.int64)))
