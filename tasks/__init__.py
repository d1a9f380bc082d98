"""Task streams: generic class splits, permutations, rotations, and the data loaders behind them.

The built-in named streams live in tasks.builtin and are found through cl.tasks entry points.

Importing `tasks` does not import `datasets`; that happens only when a dataset is loaded.
"""

from tasks.digits import load_digits
from tasks.hf import load_image_classification
from tasks.mnist import load_mnist
from tasks.npz import load_npz
from tasks.split import permuted_stream, rotate, rotated_stream, split_stream

__all__ = ["load_digits", "load_image_classification", "load_mnist", "load_npz",
           "permuted_stream", "rotate", "rotated_stream", "split_stream"]
