"""Strategies against forgetting, one file each; import them as `from strategies import Naive`."""

from strategies.naive import Naive

__all__ = ["Naive"]
