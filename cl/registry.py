"""Name -> object lookup for task streams, strategies and models, through package entry points.

cl's own built-ins are declared in its `pyproject.toml` under the same groups a third-party
package uses (`cl.tasks`, `cl.strategies`, `cl.models`), so the CLI and the ablation engine find
every one the same way. Nothing registers on import; a name's module loads only when it is used.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from cl.errors import ClError, UsageError

GROUPS = {"stream": "cl.tasks", "strategy": "cl.strategies", "model": "cl.models"}


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    return {entry.name: entry for entry in entry_points(group=group)}


def names(kind: str) -> list[str]:
    """The registered names of a kind (`stream`, `strategy` or `model`), sorted."""
    return sorted(_entry_points(GROUPS[kind]))


def load(kind: str, name: str) -> Any:
    """The object registered as `name`; an unknown name is a UsageError listing the known ones."""
    found = _entry_points(GROUPS[kind]).get(name)
    if found is None:
        known = ", ".join(names(kind)) or "none installed"
        raise UsageError(f"unknown {kind} {name!r} (known: {known})")
    try:
        return found.load()
    except (ImportError, AttributeError) as error:  # a broken plugin, not the user's mistake
        raise ClError(f"{kind} {name!r} could not be loaded from {found.value}: {error}") from None


def describe(obj: Any) -> str:
    """The first line of an object's docstring: what `cl list` shows."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""
