"""Test set-up: tests import their helpers from this folder, and torch uses at most 2 threads."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))
