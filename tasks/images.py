"""Conversion of image arrays of any common layout and dtype to float32 (N, C, H, W) tensors."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from cl.errors import DataError

LAYOUTS = ("auto", "nchw", "nhwc")
_CHANNEL_COUNTS = (1, 3, 4)


def to_float(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 scaled by 1/255 (uint16 by 1/65535), bool to 0/1, floats kept, all as float32."""
    # order="C" makes the one copy also the contiguous one, even from a transposed view.
    if array.dtype in (np.uint8, np.uint16):
        scaled = array.astype(np.float32, order="C")
        scaled /= np.float32(np.iinfo(array.dtype).max)
        return scaled
    if array.dtype.kind in "biuf":
        # Floats are kept as they are; integer features (counts, ids) are not rescaled.
        return array.astype(np.float32, order="C", copy=False)
    raise DataError(f"{what} has dtype {array.dtype}, expected numbers")


def to_images(array: np.ndarray, what: str, layout: str = "auto") -> Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) images, or flat (N, D) features, as float32.

    Images come back as (N, C, H, W); flat features stay (N, D). In the "auto" layout a 4-D
    array is channels-last when its last axis is 1, 3 or 4 and its second is not.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown image layout {layout!r} (known: {', '.join(LAYOUTS)})")
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4:
        channels_last = (layout == "nhwc" or layout == "auto" and array.shape[-1]
                         in _CHANNEL_COUNTS and array.shape[1] not in _CHANNEL_COUNTS)
        if channels_last:
            array = array.transpose(0, 3, 1, 2)
    elif array.ndim != 2:
        raise DataError(f"{what} has shape {array.shape}; expected (N, D) features or "
                        "(N, H, W), (N, H, W, C), (N, C, H, W) images")
    return torch.from_numpy(to_float(array, what))
