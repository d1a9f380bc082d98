"""`cl run` and `cl list` end to end on split-digits, and every bad input: one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cl import store
from cli import main

FAST = ["--epochs", "1", "--batch-size", "32"]
SCRIPT = Path(sys.executable).with_name("cl")  # the console script of this environment


def cl(*args: str) -> int:
    """Run the CLI in-process; return its exit code."""
    try:
        main([str(arg) for arg in args])
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def matrix(run_dir: Path) -> np.ndarray:
    return np.array(json.loads((run_dir / "metrics.json").read_text())["accuracy_matrix"])


def test_run_prints_the_matrix_and_writes_a_complete_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert cl("run", "--out", out, *FAST) == 0
    printed = capsys.readouterr().out
    for needle in ("initial", "T4 classes 8,9", "ACC", "BWT", "Forgetting", "task-IL",
                   f"run saved in {out}"):
        assert needle in printed
    assert sorted(p.name for p in out.iterdir()) == [
        ".cl-run", "checkpoint", "config.json", "events.jsonl", "matrix.csv", "metrics.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("accuracy_matrix", "initial_accuracy", "acc", "bwt", "fwt", "forgetting",
                "learning_accuracy", "min_acc", "wc_acc", "train_seconds", "eval_seconds",
                "peak_rss_mb", "trainable_parameters", "final_macro_f1", "confusion_matrix"):
        assert key in metrics, key
    assert set(metrics["versions"]) >= {"cl", "torch", "python"}
    assert np.array(metrics["accuracy_matrix"]).shape == (5, 5)
    assert metrics["acc"] == pytest.approx(np.mean(metrics["accuracy_matrix"][-1]))
    lines = (out / "matrix.csv").read_text().splitlines()
    assert lines[0].startswith("after,") and lines[1].startswith("initial,") and len(lines) == 7
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["task"] for e in events if e["event"] == "task_end"] == [0, 1, 2, 3, 4]
    config = json.loads((out / "config.json").read_text())
    assert config["hidden"] == [100, 100] and config["scenario"] == "class"


def test_same_seed_and_rerun_from_config_give_the_same_matrix(tmp_path):
    args = ("--seed", "3", "--eval-every", "5", *FAST)
    assert cl("run", "--out", tmp_path / "a", *args) == 0
    assert cl("run", "--out", tmp_path / "b", *args) == 0
    assert cl("run", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "c") == 0
    first = matrix(tmp_path / "a")
    assert np.array_equal(first, matrix(tmp_path / "b"))
    assert np.array_equal(first, matrix(tmp_path / "c"))
    assert (tmp_path / "a" / "events.jsonl").read_text() == \
        (tmp_path / "c" / "events.jsonl").read_text()
    assert cl("run", "--out", tmp_path / "d", "--seed", "4", "--eval-every", "5", *FAST) == 0
    assert not np.array_equal(first, matrix(tmp_path / "d"))


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('epochs = 1\nbatch-size = 32\nhidden = [20]\nscenario = "task"\n')
    assert cl("run", "--config", config, "--hidden", "24,12", "--out", tmp_path / "run") == 0
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["hidden"] == [24, 12] and saved["scenario"] == "task"
    assert saved["batch_size"] == 32


def test_other_scenarios_models_and_joint(tmp_path):
    assert cl("run", "--out", tmp_path / "j", "--joint", *FAST) == 0
    assert matrix(tmp_path / "j").shape == (1, 5)
    assert cl("run", "--out", tmp_path / "d", "--scenario", "domain", "--model", "cnn",
              "--hidden", "16", *FAST) == 0
    assert matrix(tmp_path / "d").shape == (5, 5)
    assert cl("run", "--out", tmp_path / "p", "--tasks", "permuted-digits", "--num-tasks", "3",
              "--optimizer", "adam", "--lr", "0.001", *FAST) == 0
    assert matrix(tmp_path / "p").shape == (3, 3)


def test_list_shows_streams_strategies_and_models(capsys):
    assert cl("list") == 0
    printed = capsys.readouterr().out
    for name in ("split-digits", "split-mnist", "permuted-mnist", "rotated-mnist", "naive",
                 "mlp", "cnn"):
        assert name in printed


@pytest.fixture
def bad_npz(tmp_path) -> Path:
    path = tmp_path / "bad.npz"
    path.write_text("this is not a zip archive")
    return path


BAD_INPUTS = [
    (["--tasks", "split-nothing"], "unknown stream 'split-nothing'"),
    (["--strategy", "magic"], "unknown strategy 'magic'"),
    (["--strategy", "naive:decay=0.9"], "unknown setting 'decay' for strategy 'naive'"),
    (["--strategy", "naive", "--strategy", "naive"], "'naive' appears more than once"),
    (["--model", "transformer9000"], "unknown model 'transformer9000'"),
    (["--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["--scenario", "sideways"], "unknown scenario 'sideways'"),
    (["--batch-size", "0"], "batch_size must be positive, got 0"),
    (["--epochs", "-1"], "epochs must be positive, got -1"),
    (["--lr", "-0.1"], "lr must be a number from 1.18e-38 to 3.40e+38, got -0.1"),
    (["--hidden", "100,0"], "hidden sizes must be positive, got [100, 0]"),
    (["--hidden", "100,x"], "bad value 'x' for cl run setting 'hidden'"),
    (["--num-tasks", "0"], "num_tasks must be positive, got 0"),
    (["--classes-per-task", "3"], "3 does not divide"),
    (["--class-order", "1,2,3"], "1,2,3"),
    (["--tasks", "split-mnist", "--data", "{missing}"], "missing.npz"),
    (["--tasks", "split-mnist", "--data", "{bad_npz}"], "bad.npz"),
    (["--tasks", "split-npz"], "--data"),
    (["--device", "tpu9"], "tpu9"),
    (["--epochs", "abc"], "bad value 'abc' for cl run setting 'epochs': expected an integer"),
    (["--lr", "fast"], "bad value 'fast' for cl run setting 'lr': expected a number"),
    (["--epochz", "3"], "--epochz"),
    (["--device", "meta"], "device 'meta' cannot train"),
    (["--device", "mps"], "device 'mps' asked for but MPS is not available"),
    (["--lr", "1e308"], "lr must be a number from 1.18e-38 to 3.40e+38, got 1e+308"),
    (["--lr", "1e-320"], "lr must be a number from 1.18e-38 to 3.40e+38, got 1e-320"),
    (["--momentum", "5"], "momentum must be a number from 0 up to (not including) 1, got 5.0"),
    (["--momentum", "1"], "momentum must be a number from 0 up to (not including) 1, got 1.0"),
    (["--optimizer", "adam", "--momentum", "0.9"], "momentum 0.9 applies to sgd only, not to "
                                                    "adam"),
    (["--hidden", ""], "bad value '' for cl run setting 'hidden'"),
    (["--hidden", "10,,10"], "bad value '10,,10' for cl run setting 'hidden'"),
    (["--hidden", "10,"], "bad value '10,' for cl run setting 'hidden'"),
    (["--momentum", "nan"], "bad value 'nan' for cl run setting 'momentum'"),
    (["--weight-decay", "inf"], "bad value 'inf' for cl run setting 'weight_decay'"),
    (["--seed", str(2**70)], f"seed must be an integer from 0 to 2**63 - 1, got {2**70}"),
    (["--seed", "-1"], "seed must be an integer from 0 to 2**63 - 1, got -1"),
    (["--eval-batch-size", "0"], "eval_batch_size must be positive, got 0"),
    (["--log-every", "0"], "log_every must be positive, got 0"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_no_finished_run(tmp_path, capsys, bad_npz, args,
                                                          message):
    args = [a.format(missing=tmp_path / "missing.npz", bad_npz=bad_npz) for a in args]
    out = tmp_path / "run"
    assert cl("run", "--out", out, *FAST, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in err
    assert message in err
    assert not out.exists()  # every input is checked before the run directory is made


BAD_CONFIG_FILES = [
    (b"epochs = 1\x00\xff\xfe binary\n", "is not text (it is not UTF-8)"),
    (b"batch-size = 8\nbatch_size = 16\n", "sets 'batch-size' and 'batch_size'"),
    (b"[strategy]\nreplay = {capacity = 10}\n", "setting 'strategy': expected a list"),
    (b"hidden = [[100]]\n", "bad value [100] for cl run setting 'hidden'"),
    (b"lr = {value = 0.1}\n", "setting 'lr': expected a number, got a table"),
    (b"seed = 100000000000000000000\n", "seed must be an integer from 0 to 2**63 - 1"),
]


@pytest.mark.parametrize("content, message", BAD_CONFIG_FILES,
                         ids=[message for _, message in BAD_CONFIG_FILES])
def test_a_config_file_that_cannot_be_read_as_settings_is_one_line(tmp_path, capsys, content,
                                                                    message):
    config = tmp_path / "run.toml"
    config.write_bytes(content)
    assert cl("run", "--config", config, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["run", "ablate", "report"])
@pytest.mark.parametrize("out, message", [
    ("", "error: --out is empty: name a directory"),
    ("{file}", "error: --out {file} is a file, not a directory"),
    ("{file}/sub", "error: --out {file}/sub: {file} is a file, not a directory"),
    ("{dir}/" + "x" * 300, "error: --out: the name xxxxxxxxxxxxxxxxxxxxxxxx... is longer than "
                           "255 bytes"),
])
def test_an_out_path_that_cannot_be_a_directory_is_a_usage_error(tmp_path, capsys, command,
                                                                 out, message):
    # Found before any work (a run would otherwise train, then fail to save), exit 2 as the
    # user's to fix, and the path as typed: an empty --out is not the current directory.
    a_file = tmp_path / "afile"
    a_file.write_text("mine")
    spec = tmp_path / "spec.toml"
    spec.write_text("[base]\nepochs = 1\n")
    given = {"run": ["run", *FAST], "ablate": ["ablate", spec], "report": ["report", tmp_path]}
    out = out.format(file=a_file, dir=tmp_path)
    assert cl(*given[command], "--out", out) == 2
    assert capsys.readouterr().err == message.format(file=a_file, dir=tmp_path) + "\n"
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "afile", "spec.toml"]


def test_an_allocation_failure_is_recognised_with_the_size_asked_for():
    import torch

    from cl.errors import out_of_memory

    with pytest.raises(RuntimeError) as failed:
        torch.zeros(10**13, 64)  # 2.56 PB: refused at once by the allocator
    assert out_of_memory(failed.value) == " (2,560,000.0 GB asked for one tensor)"
    assert out_of_memory(MemoryError()) == ""
    assert out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
    assert out_of_memory(ValueError("can't allocate memory")) is None


def test_a_json_config_that_repeats_a_key_is_refused_not_half_read(tmp_path, capsys):
    # json.loads keeps the last of two equal keys: one of the user's settings would vanish.
    config = tmp_path / "run.json"
    config.write_text('{"lr": 0.1, "epochs": 1, "lr": 0.5}')
    assert cl("run", "--config", config, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: config file {config} is not valid JSON: key 'lr' is given twice"
    assert not (tmp_path / "run").exists()


def test_a_config_path_that_is_a_directory_says_so(tmp_path, capsys):
    assert cl("run", "--config", tmp_path, "--out", tmp_path / "run") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: config file {tmp_path} is a directory, not a .toml or .json file")


def test_a_model_too_large_for_the_machine_is_one_line_naming_the_size(tmp_path, capsys):
    assert cl("run", "--hidden", "100000000000", "--out", tmp_path / "run", *FAST) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: not enough memory for model 'mlp' with hidden sizes "
                          "100000000000 (") and "GB asked for one tensor)" in err, err
    assert not (tmp_path / "run").exists()


def test_joint_training_with_one_adapter_per_task_is_refused(tmp_path, capsys):
    # Only adapter task0 would exist: tasks 1.. would be evaluated on the untrained base.
    out = tmp_path / "run"
    assert cl("run", "--joint", "--scenario", "task", "--strategy", "lora", "--out", out,
              *FAST) == 2
    assert "lora trains one adapter per task, but --joint" in capsys.readouterr().err
    assert not out.exists()
    # One adapter over all tasks, folded into the model, is what a joint run can train.
    assert cl("run", "--joint", "--scenario", "task", "--strategy", "lora:merge=true",
              "--out", out, *FAST) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # Every task was trained: each one beats its accuracy before training.
    assert all(after > before for after, before in
               zip(metrics["accuracy_matrix"][0], metrics["initial_accuracy"], strict=True))


def test_bad_config_file_keys(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text("epochs = 1\nlearning_rate = 0.1\n")
    assert cl("run", "--config", config, "--out", tmp_path / "run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown key 'learning_rate' in config file") and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_a_finished_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert cl("run", "--out", out, *FAST) == 0
    before = (out / "metrics.json").read_text()
    assert cl("run", "--out", out, *FAST) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before


def test_nan_loss_stops_with_task_and_step(tmp_path, capsys):
    out = tmp_path / "run"
    assert cl("run", "--out", out, "--lr", "1e30", *FAST) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: loss is ") and "on task 0 (classes 0,1) at step" in err
    assert "\n" not in err
    assert not (out / "metrics.json").exists()


def test_full_disk_is_one_line_and_leaves_no_metrics(tmp_path, capsys, monkeypatch):
    real_fsync = os.fsync
    out = tmp_path / "run"

    def fsync(fd):  # the disk fills up when the metrics are written
        if any(p.name.startswith(".metrics.json") for p in out.iterdir()):
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert cl("run", "--out", out, *FAST) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: No space left on device"
    assert not (out / "metrics.json").exists()
    # No temporary file left; only cl's mark of its own run directory.
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == [store.MARKER]


def test_console_script_help_is_fast_and_loads_no_torch():
    code = ("import sys, cli\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'datasets', 'transformers', 'numpy') "
            "if m in sys.modules]\nprint('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert "Usage: cl" in done.stdout
    assert "HEAVY []" in done.stdout


def test_console_script_bad_input_has_no_traceback(tmp_path):
    done = subprocess.run([str(SCRIPT), "run", "--tasks", "nope", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: unknown stream 'nope'")
    assert len(done.stderr.strip().splitlines()) == 1


def test_mnist_without_data_offline_is_one_line_pointing_to_data(tmp_path):
    """No --data means the Hugging Face hub; offline, that is one line saying what to pass."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "HF_DATASETS_CACHE": str(tmp_path / "hf" / "ds")}
    done = subprocess.run([str(SCRIPT), "run", "--tasks", "split-mnist", "--out",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "ylecun/mnist" in lines[0] and "--data path/to/mnist.npz" in lines[0]
    assert not (tmp_path / "r" / "metrics.json").exists()


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("specs, scenario, report_key", [
    (["ema:decay=0.9,eval_with=both"], "class", "ema"),
    (["freeze:head_only=true"], "class", "freeze"),
    (["replay:capacity=50,policy=class_balanced"], "class", "replay"),
    (["distill:alpha=0.5,temperature=3"], "class", "distill"),
    (["lora:rank=2,alpha=2"], "task", "lora"),
    (["freeze:lr_mult=head.*=10", "lora:rank=2,alpha=2", "replay:capacity=40,store_logits=true",
      "distill:targets=buffer", "ema:decay=0.9"], "task", "replay"),
])
def test_each_strategy_and_all_five_run_from_the_cli(tmp_path, specs, scenario, report_key):
    out = tmp_path / "run"
    args = [arg for spec in specs for arg in ("--strategy", spec)]
    assert cl("run", "--out", out, "--scenario", scenario, *FAST, *args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert report_key in metrics["strategies"]
    assert json.loads((out / "config.json").read_text())["strategy"] == specs
    if "eval_with=both" in specs[0]:
        assert len(metrics["variants"]["live"]["accuracy_matrix"]) == 5


@pytest.mark.parametrize("specs, needle", [
    (["replay", "replay:capacity=10"], "'replay' appears more than once"),
    (["distill:targets=buffer"], "store_logits"),
    (["replay:capacity=0"], "capacity"),
    (["ema:decay=1.5"], "decay"),
    (["ema:eval_with=shadow"], "'shadow'"),
    (["lora:rnak=4"], "'rnak'"),
    (["lora"], "task id"),
    # Found only once the stream and the model are built, still before the run directory.
    (["freeze:blocks=1"], "no repeated blocks"),
    (["freeze:patterns=nothing.*"], "'nothing.*' matches no parameter"),
    (["freeze:after_task=5"], "would never act"),
    (["ema:device=meta"], "ema device 'meta' cannot train"),
    # EMA or feature distillation before LoRA would miss the modules LoRA adds.
    (["ema:decay=0.9,eval_with=both", "lora:rank=4"], "ema must come after lora"),
    (["distill:on=features", "lora:merge=true"], "distill must come after lora"),
    # Settings that are not finite are refused when parsed.
    (["distill:alpha=inf"], "'inf' for strategy 'distill' setting 'alpha'"),
    (["distill:temperature=inf"], "expected a finite number"),
    (["lora:alpha=inf,merge=true"], "expected a finite number"),
])
def test_bad_strategy_settings_and_contradictions_are_one_line(tmp_path, capsys, specs, needle):
    args = [arg for spec in specs for arg in ("--strategy", spec)]
    assert cl("run", "--out", tmp_path / "run", *FAST, *args) == 2
    error = capsys.readouterr().err
    assert needle in error and error.count("\n") == 1
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_the_advice_for_lora_in_the_class_scenario_works_as_given(tmp_path, capsys):
    assert cl("run", "--strategy", "lora", "--out", tmp_path / "refused", *FAST) == 2
    error = capsys.readouterr().err
    advice = "lora:merge=true"
    assert advice in error
    assert cl("run", "--strategy", advice, "--out", tmp_path / "run", *FAST) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["scenario"] == "class"


def test_the_run_table_shows_emas_live_figures_beside_the_averaged_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert cl("run", "--strategy", "ema:decay=0.9,eval_with=both", "--out", out, *FAST) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    live = metrics["variants"]["live"]
    row = next(line for line in printed.splitlines() if "ACC (final average)" in line)
    cells = [cell.strip() for cell in row.split("│")[2:-1]]
    assert cells == [f"{100 * value:.2f}" for value in (
        metrics["acc"], metrics["task_il"]["acc"], live["acc"], live["task_il"]["acc"])]
    assert "class-IL, live" in printed and "task-IL, live" in printed


def test_eval_on_seen_prints_dashes_where_nothing_was_evaluated(tmp_path, capsys):
    out = tmp_path / "seen"
    assert cl("run", "--out", out, "--eval-on", "seen", *FAST) == 0
    printed = capsys.readouterr().out
    assert "nan" not in printed.lower() and "-" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["initial_accuracy"] == [None] * 5 and metrics["fwt"] is None
    assert metrics["accuracy_matrix"][0][1] is None and metrics["bwt"] is not None
    config = json.loads((out / "config.json").read_text())
    assert (config["eval_on"], config["precision"]) == ("seen", "fp32")
    rows = (out / "matrix.csv").read_text().splitlines()
    assert rows[1] == "initial," + "," * 4  # nothing evaluated before training
    assert "nan" not in (out / "matrix.csv").read_text()
    assert cl("run", "--out", tmp_path / "bad", "--eval-on", "some", *FAST) == 2
    assert "unknown eval_on 'some'" in capsys.readouterr().err


def test_eval_on_final_with_training_logs(tmp_path):
    """Task ends with nothing evaluated (every task but the last, under --eval-on final) log
    no mean over the seen tasks instead of dividing by zero."""
    out = tmp_path / "final"
    assert cl("run", "--out", out, "--eval-on", "final", "--log", "csv", *FAST) == 0
    rows = (out / "log.csv").read_text().splitlines()
    seen_means = [row for row in rows if "accuracy/seen_mean" in row]
    assert len(seen_means) == 1 and seen_means[0].split(",")[2] == "task_end"
    assert json.loads((out / "metrics.json").read_text())["acc"] is not None


def test_a_normalised_stream_is_recorded_and_a_bad_normalisation_is_one_line(tmp_path, capsys):
    out = tmp_path / "normalised"
    assert cl("run", "--out", out, "--tasks", "split-digits:normalize=0.3/0.4", *FAST) == 0
    assert json.loads((out / "config.json").read_text())["tasks"] == \
        "split-digits:normalize=0.3/0.4"
    assert cl("run", "--out", tmp_path / "bad", "--tasks", "split-digits:normalize=big",
              *FAST) == 2
    err = capsys.readouterr().err
    assert "normalize='big' for stream 'split-digits'" in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()
