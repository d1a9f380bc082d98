"""Spec grammar, typed config parsing, config files, atomic writes and the models."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cl import store
from cl.errors import UsageError
from cl.experiment import RunConfig, make_config, read_config_file
from cl.models import build_cnn, build_mlp, build_seeded
from cl.spec import format_spec, parse_config, parse_spec


def test_parse_spec_forms():
    assert parse_spec("naive") == ("naive", {})
    assert parse_spec("replay:capacity=200,policy=reservoir") == (
        "replay", {"capacity": "200", "policy": "reservoir"})
    # The key ends at the first '=': values may hold more.
    assert parse_spec("freeze:lr_mult=head=10") == ("freeze", {"lr_mult": "head=10"})
    for bad in ("", ":a=1", "replay:capacity", "replay:=3", "replay:a=1,a=2"):
        with pytest.raises(UsageError):
            parse_spec(bad)


keys = st.from_regex(r"[a-z_]{1,8}", fullmatch=True)
values = st.from_regex(r"[a-z0-9.|=]{0,8}", fullmatch=True)


@given(st.from_regex(r"[a-z][a-z-]{0,10}", fullmatch=True), st.dictionaries(keys, values))
def test_format_then_parse_round_trips(name, params):
    assert parse_spec(format_spec(name, params)) == (name, params)


@dataclass(frozen=True)
class Example:
    capacity: int = 10
    decay: float = 0.9
    policy: Literal["reservoir", "class_balanced"] = "reservoir"
    store_logits: bool = False
    patterns: tuple[str, ...] = ()
    limit: int | None = None

    def __post_init__(self):
        if self.capacity <= 0:
            raise ValueError(f"capacity must be positive, got {self.capacity}")


def test_parse_config_converts_by_field_type():
    config = parse_config(Example, {"capacity": "5", "decay": "0.5", "policy": "class_balanced",
                                    "store_logits": "true", "patterns": "head.*|body.0.*",
                                    "limit": "none"}, owner="strategy 'x'")
    assert config == Example(5, 0.5, "class_balanced", True, ("head.*", "body.0.*"), None)
    assert parse_config(Example, {"limit": "3"}, owner="x").limit == 3


@pytest.mark.parametrize("params, message", [
    ({"capcity": "5"}, "unknown setting 'capcity' for strategy 'x' (known: capacity, decay"),
    ({"capacity": "many"}, "bad value 'many' for strategy 'x' setting 'capacity'"),
    ({"capacity": "1.5"}, "expected an integer"),
    ({"policy": "fifo"}, "bad value 'fifo' for strategy 'x' setting 'policy' (choose from"),
    ({"store_logits": "maybe"}, "expected true or false"),
    ({"capacity": "0"}, "strategy 'x': capacity must be positive, got 0"),
])
def test_parse_config_errors_name_the_bad_value(params, message):
    with pytest.raises(UsageError) as error:
        parse_config(Example, params, owner="strategy 'x'")
    assert message in str(error.value)


def test_config_files_toml_and_json(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('tasks = "split-digits"\nbatch-size = 8\nhidden = [32, 16]\n'
                    'strategy = ["naive"]\nlr = 0.1\n')
    config = make_config(read_config_file(toml))
    assert (config.batch_size, config.hidden, config.strategy, config.lr) == \
        (8, (32, 16), ("naive",), 0.1)
    as_json = tmp_path / "run.json"
    as_json.write_text(json.dumps(config.to_dict()))
    assert make_config(read_config_file(as_json)) == config


@pytest.mark.parametrize("name, text, message", [
    ("a.toml", "epochz = 3\n", "unknown key 'epochz' in config file"),
    ("b.toml", "epochs = [\n", "is not valid TOML"),
    ("c.json", "{\"epochs\": ", "is not valid JSON"),
    ("d.json", "[1, 2]", "must hold a table of settings"),
    ("e.yaml", "epochs: 3", "must end in .toml or .json"),
])
def test_bad_config_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace("[", r"\[")):
        read_config_file(path)
    with pytest.raises(UsageError, match="does not exist"):
        read_config_file(tmp_path / "missing.toml")


def test_make_config_checks_types_and_scenario():
    assert make_config({"hidden": "400,400"}).hidden == (400, 400)
    with pytest.raises(UsageError, match="bad value 'x' for cl run setting 'epochs'"):
        make_config({"epochs": "x"}, source="cl run")
    with pytest.raises(UsageError, match="unknown scenario 'classy'"):
        make_config({"scenario": "classy"})
    assert RunConfig().tasks == "split-digits"


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    store.write_json(target, {"a": float("nan"), "b": [1.0, float("inf")]})
    assert json.loads(target.read_text()) == {"a": None, "b": [1.0, None]}

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        store.write_json(tmp_path / "other.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_run_dir_refuses_a_finished_run(tmp_path):
    run_dir = tmp_path / "run"
    with store.lock_run_dir(run_dir):
        store.write_json(run_dir / store.CONFIG, {})
    assert not store.is_complete(run_dir)
    with store.lock_run_dir(run_dir):  # an unfinished run of cl's is cleared and reused
        store.clear_unfinished(run_dir)
    assert not (run_dir / store.CONFIG).exists()
    store.write_json(run_dir / store.METRICS, {})
    with store.lock_run_dir(run_dir), pytest.raises(UsageError,
                                                    match="already holds a finished run"):
        store.clear_unfinished(run_dir)


def test_models_shapes_init_and_seeding():
    mlp = build_mlp((1, 28, 28), 10, (400, 400), "xavier")
    assert mlp(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert all(torch.count_nonzero(m.bias) == 0 for m in mlp.modules()
               if isinstance(m, torch.nn.Linear))
    assert sum(p.numel() for p in build_mlp((784,), 10).parameters()) == \
        784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
    cnn = build_cnn((1, 8, 8), 10, (32,))
    assert cnn(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    first = build_seeded(build_mlp, (4,), 3, (5,), "default", seed=3)
    again = build_seeded(build_mlp, (4,), 3, (5,), "default", seed=3)
    other = build_seeded(build_mlp, (4,), 3, (5,), "default", seed=4)
    pairs = zip(first.parameters(), again.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    assert not torch.equal(first.head.weight, other.head.weight)
    with pytest.raises(UsageError, match="hidden sizes must be positive, got 0"):
        build_mlp((4,), 3, (5, 0))
    with pytest.raises(UsageError, match="unknown init 'he'"):
        build_mlp((4,), 3, (5,), "he")
    with pytest.raises(UsageError, match="the cnn needs image inputs"):
        build_cnn((64,), 3)
