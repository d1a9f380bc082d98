"""The naive baseline: plain sequential fine-tuning, no defence against forgetting."""

from __future__ import annotations

from typing import ClassVar

from cl.strategy import NoConfig, Strategy


class Naive(Strategy):
    """Naive fine-tuning: train on each task in turn, nothing else (the lower bound)."""

    name: ClassVar[str] = "naive"
    config_class: ClassVar[type] = NoConfig

    def __init__(self, config: NoConfig | None = None) -> None:
        self.config = config if config is not None else NoConfig()

    def __repr__(self) -> str:
        return "Naive()"
