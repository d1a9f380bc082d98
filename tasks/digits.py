"""scikit-learn's embedded 8x8 digits as tensors, with a fixed train/test split."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

TEST_FRACTION = 0.25
# The split never depends on a run's seed, so test sets are the same across seeds.
SPLIT_SEED = 0


def load_digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x_train, y_train, x_test, y_test: float32 (N, 1, 8, 8) in [0, 1] and int64 labels 0..9.

    1797 images, split stratified by class: 1347 train, 450 test.
    """
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, stratify=y, random_state=SPLIT_SEED)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train),
            torch.from_numpy(x_test), torch.from_numpy(y_test))
