"""`cl list`: every strategy's settings as its config dataclass declares them, read from source
without importing torch; an entry point whose source cannot settle it still lists, by import."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import py_compile
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cl import registry
from cl.registry import Setting

if sys.version_info >= (3, 11):
    import tomllib
else:  # the `tomli` dependency of Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(sys.executable).with_name("cl")  # the console script of this environment


def cl_list(extra_path: Path | None = None) -> str:
    """`cl list` in a fresh process, wide enough that no row wraps."""
    env = {**os.environ, "COLUMNS": "1000"}
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path),
                                                          env.get("PYTHONPATH")]))
    result = subprocess.run([str(SCRIPT), "list"], capture_output=True, text=True, env=env,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def strategy_rows(output: str) -> dict[str, tuple[str, list[str]]]:
    """Strategy name -> (description, its setting lines), from the printed table."""
    section = output.split("Strategies (", 1)[1].split("\nModels (", 1)[0]
    rows: dict[str, tuple[str, list[str]]] = {}
    current: list[str] = []
    for line in section.splitlines()[1:]:
        if not line.strip():
            continue
        if line[1] != " ":  # a name (the table pads its first column by one space)
            name, _, description = line.strip().partition(" ")
            current = []
            rows[name] = (description.strip(), current)
        else:
            current.append(line.strip())
    return rows


def registered_strategies() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"]["cl.strategies"]


def init_fields(config_class: type) -> list[dataclasses.Field]:
    if not dataclasses.is_dataclass(config_class):
        return []  # NoConfig: no settings
    return [field for field in dataclasses.fields(config_class) if field.init]


def test_list_shows_every_setting_of_every_strategy_with_its_real_default():
    rows = strategy_rows(cl_list())
    for name, value in registered_strategies().items():
        module, _, attr = value.partition(":")
        strategy = getattr(importlib.import_module(module), attr)
        assert name in rows, f"strategy {name} is not listed"
        description, lines = rows[name]
        assert description == registry.describe(strategy)
        fields = init_fields(strategy.config_class)
        assert [line.split(" ", 1)[0] for line in lines] == [f.name for f in fields], name
        for field, line in zip(fields, lines, strict=True):
            default = re.escape(repr(field.default))
            assert re.fullmatch(rf"{field.name} \(.+, default {default}\)(: .+)?", line), line


def test_settings_read_from_source_match_the_imported_dataclasses():
    for name, value in registered_strategies().items():
        module, _, attr = value.partition(":")
        strategy = getattr(importlib.import_module(module), attr)
        from_source = registry.strategy_settings(name)
        from_import = registry.config_settings(strategy.config_class)
        assert [(s.name, s.type, s.default) for s in from_source] == [
            (s.name, s.type, s.default) for s in from_import], name


def test_list_does_not_import_torch():
    code = textwrap.dedent("""
        import json, sys, cli
        try:
            cli.main(["list"])
        except SystemExit as stop:
            assert not stop.code, stop.code
        heavy = ["torch", "numpy", "strategies", "tasks.builtin", "cl.models"]
        print(json.dumps([name for name in heavy if name in sys.modules]), file=sys.stderr)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stderr.strip().splitlines()[-1]) == []


# A third party's strategies: one read from source (its module raises if imported), one whose
# config class is built at import time, one shipped as bytecode only, one that fails to load.
READ_PLUGIN = '''
"""A third-party strategy that cl list reads without importing."""
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from cl.strategy import Strategy

Mode = Literal["fast", "slow"]


@dataclass(frozen=True)
class ThingConfig:
    """Settings of `thing`.

    The `mode` picks the speed. Nothing else.
    """

    size: int = 3  # how many
    # the learning-rate scale,
    # over two lines
    scale: float = -0.5
    mode: Mode = "fast"
    names: tuple[str, ...] = field(default=("a", "b"))
    cache: dict = field(default_factory=dict, init=False)
    kind: ClassVar[str] = "x"


class Thing(Strategy):
    """Thing: a test strategy.

    More text."""

    config_class: ClassVar[type] = ThingConfig


class Plain(Strategy):
    """Plain: no settings of its own (the base class's NoConfig)."""


raise RuntimeError("cl list read this module's source; it must not import it")
'''

COMPUTED_PLUGIN = '''
"""A strategy whose config class only exists once the module runs."""
import dataclasses

from cl.strategy import Strategy


class Computed(Strategy):
    """Computed: its config class is built at import time."""

    config_class = dataclasses.make_dataclass("ComputedConfig", [("rate", float, 0.1)])
'''

COMPILED_PLUGIN = '''
"""A strategy shipped as bytecode, without source."""
from dataclasses import dataclass

from cl.strategy import Strategy


@dataclass(frozen=True)
class CompiledConfig:
    """Settings.

    Attributes:
        depth: how deep it goes
    """

    depth: int = 2  # comments do not survive compilation


class Compiled(Strategy):
    """Compiled: shipped as bytecode only."""

    config_class = CompiledConfig
'''

PLUGIN_MODULES = ("read_plugin", "computed_plugin", "compiled_plugin")


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A directory holding an installed-looking third-party package, put on sys.path."""
    (tmp_path / "read_plugin.py").write_text(READ_PLUGIN)
    (tmp_path / "computed_plugin.py").write_text(COMPUTED_PLUGIN)
    source = tmp_path / "compiled_plugin.py"
    source.write_text(COMPILED_PLUGIN)
    py_compile.compile(str(source), cfile=str(tmp_path / "compiled_plugin.pyc"), doraise=True)
    source.unlink()
    dist_info = tmp_path / "cl_test_plugins-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: cl-test-plugins\n"
                                        "Version: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[cl.strategies]\nthing = read_plugin:Thing\nplain = read_plugin:Plain\n"
        "computed = computed_plugin:Computed\ncompiled = compiled_plugin:Compiled\n"
        "broken = missing_plugin_module:Nothing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry._entry_points.cache_clear()
    yield tmp_path
    registry._entry_points.cache_clear()
    registry._read_source.cache_clear()
    for module in PLUGIN_MODULES:
        sys.modules.pop(module, None)


def test_a_third_party_strategy_is_read_from_source_without_importing_it(plugins):
    assert registry.describe_entry("strategy", "thing") == "Thing: a test strategy."
    assert registry.strategy_settings("thing") == (
        Setting("size", "int", "3", "how many"),
        Setting("scale", "float", "-0.5", "the learning-rate scale, over two lines"),
        Setting("mode", "Literal['fast', 'slow']", "'fast'", "The `mode` picks the speed."),
        Setting("names", "tuple[str, ...]", "('a', 'b')", ""),
    )
    assert registry.strategy_settings("plain") == ()
    assert "read_plugin" not in sys.modules


def test_a_strategy_the_source_cannot_settle_lists_by_importing_it(plugins):
    assert registry.describe_entry("strategy", "computed") == (
        "Computed: its config class is built at import time.")
    assert registry.strategy_settings("computed") == (Setting("rate", "float", "0.1", ""),)
    assert registry.describe_entry("strategy", "compiled") == "Compiled: shipped as bytecode only."
    assert registry.strategy_settings("compiled") == (
        Setting("depth", "int", "2", "how deep it goes"),)
    assert {"computed_plugin", "compiled_plugin"} <= set(sys.modules)


def test_list_shows_third_party_strategies_and_survives_a_broken_one(plugins):
    rows = strategy_rows(cl_list(extra_path=plugins))
    assert rows["thing"] == ("Thing: a test strategy.", [
        "size (int, default 3): how many",
        "scale (float, default -0.5): the learning-rate scale, over two lines",
        "mode (Literal['fast', 'slow'], default 'fast'): The `mode` picks the speed.",
        "names (tuple[str, ...], default ('a', 'b'))"])
    assert rows["computed"][1] == ["rate (float, default 0.1)"]
    assert rows["compiled"][1] == ["depth (int, default 2): how deep it goes"]
    assert rows["broken"][0].startswith("(not loadable: strategy 'broken' could not be loaded")
    assert "naive" in rows
