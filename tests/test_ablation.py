"""`cl ablate`: spec checks, stable names, parallel runs, skip/resume, interrupts, failures, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import SCRIPT, cl, matrix

from cl.ablation import config_hash, expand, parse_spec_table, read_spec
from cl.experiment import RunConfig, make_config

BASE = """\
[base]
tasks = "split-digits"
epochs = 1
hidden = [16]
train-per-task = 40
test-per-task = 20
"""
SPEC = "seeds = [0, 1]\n" + BASE + """
[grid]
strategy = [[], ["ema:decay=0.9"]]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def run_dirs(out: Path) -> list[Path]:
    return sorted(path for path in out.iterdir() if path.is_dir() and path.name != "report")


def test_the_spec_expands_to_every_combination_with_stable_names(tmp_path):
    spec = read_spec(write(tmp_path / "spec.toml", """\
seeds = [0, 1, 2]
[base]
tasks = "split-digits"
epochs = 1
[grid]
strategy = [[], ["replay:capacity=100"], ["replay:capacity=100", "ema:decay=0.99"]]
lr = [0.01, 0.1]
"""))
    jobs = expand(spec, tmp_path / "out")
    assert len(jobs) == 3 * 2 * 3 and len({job.name for job in jobs}) == 18
    assert len({job.configuration for job in jobs}) == 6
    # Grid order: the first key varies slowest; the seeds innermost.
    assert [job.config.seed for job in jobs[:3]] == [0, 1, 2]
    assert [job.config.lr for job in jobs[:6:3]] == [0.01, 0.1]
    assert jobs[0].config.strategy == () and jobs[-1].config.strategy == (
        "replay:capacity=100", "ema:decay=0.99")
    assert jobs[-1].name.startswith("replay-capacity100+ema-decay0.99_lr0.1-")
    assert jobs[-1].name.endswith("-seed2") and jobs[-1].run_dir == tmp_path / "out" / jobs[-1].name
    # The same spec always names its runs alike; a setting at its default does not count.
    assert [job.name for job in expand(spec, tmp_path / "out")] == [job.name for job in jobs]
    assert config_hash(RunConfig(lr=0.1, seed=3)) == config_hash(RunConfig())
    assert config_hash(RunConfig(lr=0.01)) != config_hash(RunConfig())
    assert config_hash(RunConfig(strategy=("ema",))) != config_hash(RunConfig())
    # Each run's settings are exactly base + its grid values + its seed.
    expected = make_config({"tasks": "split-digits", "epochs": 1, "lr": 0.01,
                            "strategy": ["replay:capacity=100"], "seed": 1})
    assert jobs[7].config == expected


@pytest.mark.parametrize("text, message", [
    ("seeds = [0]\nmodels = 1\n[grid]\nlr = [0.1]\n", "unknown key 'models'"),
    ("[base]\nepoch = 1\n[grid]\nlr = [0.1]\n", "unknown key 'epoch' in [base]"),
    ("[grid]\nlearning_rate = [0.1]\n", "unknown key 'learning_rate' in [grid]"),
    ("[base]\nseed = 1\n[grid]\nlr = [0.1]\n", "sets 'seed'"),
    # Found by building each configuration's stream and model, before any run starts.
    ('[grid]\nstrategy = [[], ["freeze:blocks=1"]]\n', "no repeated blocks"),
    ('[base]\nscenario = "class"\n[grid]\nstrategy = [["lora"]]\n', "task id"),
    ('[grid]\nstrategy = [["ema:device=meta"]]\n', "ema device 'meta' cannot train"),
    ("[grid]\nhidden = [[0]]\n", "hidden sizes must be positive"),
    ("[base]\nbatch-size = 8\nbatch_size = 16\n[grid]\nlr = [0.1]\n", "one setting"),
    ("[grid]\nlr = []\n", "[grid] lr"),
    ("[grid]\nlr = 0.1\n", "must be a list of values"),
    ("seeds = []\n[grid]\nlr = [0.1]\n", "'seeds'"),
    ("seeds = [1, 1]\n[grid]\nlr = [0.1]\n", "lists a seed twice"),
    ("seeds = [99999999999999999999]\n[base]\nepochs = 1\n",
     "seed 99999999999999999999 in 'seeds' of ablation spec"),
    ("seeds = [-1]\n[base]\nepochs = 1\n", "seed -1 in 'seeds' of ablation spec"),
    ("seeds = [0, 1]\n[grid]\nlr = [" + ", ".join(["0.1"] * 100) + "]\nepochs = ["
     + ", ".join(map(str, range(1, 101))) + "]\n", "makes 20,000 runs (100 x 100 x 2"),
    ('[grid]\nstrategy = [["replay:capacty=100"]]\n', "capacty"),
    ('[grid]\nstrategy = [["nope"]]\n', "'nope'"),
    ('[grid]\nstrategy = [[1]]\n', "strategy value"),
    ('[grid]\nlr = ["fast"]\n', "fast"),
    ('[base]\ntasks = "split-nothing"\n[grid]\nlr = [0.1]\n', "split-nothing"),
    ("[base]\nlr = 0.1\n[grid]\nlr = [0.1]\n", "both [base] and [grid]"),
    ("[grid]\nlr = [0.1, 0.1]\n", "same run configuration"),
    ("[grid\nlr = [0.1]\n", "not valid TOML"),
])
def test_a_bad_spec_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, text,
                                                                  message):
    spec = write(tmp_path / "spec.toml", text)
    assert cl("ablate", spec, "--out", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and message in error, error
    assert not (tmp_path / "out").exists()


def test_a_spec_without_a_grid_runs_its_base_over_the_seeds(tmp_path, capsys):
    spec = write(tmp_path / "spec.toml", "seeds = [0, 1]\n[base]\nepochs = 1\n")
    jobs = expand(read_spec(spec), tmp_path / "out")
    assert [job.config.seed for job in jobs] == [0, 1]
    assert {job.configuration for job in jobs} == {jobs[0].configuration}
    assert jobs[0].name.startswith("base-") and jobs[0].config.epochs == 1
    assert cl("ablate", spec, "--out", tmp_path / "out", "--workers", "1") == 0
    assert "2 runs in" in capsys.readouterr().out
    assert all((job.run_dir / "metrics.json").is_file() for job in jobs)


def test_bad_flags_and_a_missing_spec_are_usage_errors(tmp_path, capsys):
    spec = write(tmp_path / "spec.toml", SPEC)
    for args, message in ((["--workers", "0"], "--workers"),
                          (["--executor", "slurm"], "slurm"),
                          (["--ray-address", "auto"], "--executor ray"),
                          (["--log", "wandb"], "wandb"),
                          (["--gpus-per-run", "-1"], "got -1.0"),
                          (["--gpus-per-run", "nan"], "--gpus-per-run must be a finite number "
                                                      "from 0, got nan")):
        assert cl("ablate", spec, "--out", tmp_path / "out", *args) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "out").exists()
    assert cl("ablate", tmp_path / "missing.toml") == 2
    assert "does not exist" in capsys.readouterr().err


def test_runs_in_parallel_then_skips_what_is_done_and_resumes_what_is_not(tmp_path, capsys):
    spec = write(tmp_path / "spec.toml", SPEC)
    out = tmp_path / "out"
    assert cl("ablate", spec, "--out", out, "--workers", "2", "--log", "csv") == 0
    assert "4 runs in" in capsys.readouterr().out
    runs = run_dirs(out)
    assert len(runs) == 4 and all((run / "metrics.json").is_file() for run in runs)
    assert all((run / "log.csv").is_file() for run in runs)
    manifest = json.loads((out / "ablation.json").read_text())
    assert [run["name"] for run in manifest["runs"]] == [job.name for job in
                                                          expand(read_spec(spec), out)]
    # Seeds differ and configurations differ.
    by_name = {run.name.split("-")[0] + run.name[-1]: matrix(run) for run in runs}
    assert not np.array_equal(by_name["naive0"], by_name["naive1"])
    assert not np.array_equal(by_name["naive0"], by_name["ema0"])
    config = json.loads((runs[0] / "config.json").read_text())
    assert config["hidden"] == [16] and config["train_per_task"] == 40

    stamps = {run: (run / "metrics.json").stat().st_mtime_ns for run in runs}
    assert cl("ablate", spec, "--out", out) == 0
    assert "0 finished now, 4 done before, 0 failed" in capsys.readouterr().out
    assert all((run / "metrics.json").stat().st_mtime_ns == stamps[run] for run in runs)

    # An unfinished run (no metrics.json, a checkpoint after its last task) is continued,
    # and ends with the very matrix it would have had.
    unfinished = runs[1]
    before = matrix(unfinished)
    (unfinished / "metrics.json").unlink()
    assert cl("ablate", spec, "--out", out, "--workers", "1") == 0
    assert "1 finished now, 3 done before" in capsys.readouterr().out
    assert np.array_equal(matrix(unfinished), before)
    assert json.loads((unfinished / "metrics.json").read_text())["resumed_from"] == 5


def test_a_failed_run_is_reported_kept_and_retried_only_when_asked(tmp_path, capsys):
    spec = write(tmp_path / "spec.toml", "seeds = [0]\n" + BASE + "[grid]\nlr = [0.1, 1e30]\n")
    out = tmp_path / "out"
    assert cl("ablate", spec, "--out", out, "--workers", "2") == 1
    captured = capsys.readouterr()
    assert "1 finished now, 0 done before, 1 failed" in captured.out
    failed = next(run for run in run_dirs(out) if "lr1e" in run.name)
    # What failed is on stderr, ending in one error line: a script reading stdout alone, or
    # only the last line of stderr, still learns it.
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith(f"failed: {failed.name}: loss is nan"), captured.err
    assert lines[-1].startswith("error: 1 of 2 runs failed") and "--retry-failed" in lines[-1]
    assert len(lines) == 2
    record = json.loads((failed / "error.json").read_text())
    assert record["error"].startswith("loss is nan") and "DivergenceError" in record["traceback"]
    assert not (failed / "metrics.json").exists()

    stamp = (failed / "error.json").stat().st_mtime_ns
    assert cl("ablate", spec, "--out", out) == 1  # not retried: still reported as failed
    captured = capsys.readouterr()
    assert "0 finished now, 1 done before, 1 failed" in captured.out
    assert "--retry-failed" in captured.err
    assert (failed / "error.json").stat().st_mtime_ns == stamp
    assert cl("ablate", spec, "--out", out, "--retry-failed") == 1
    # The retry ran (a new error.json), and failed again.
    assert "0 finished now, 1 done before, 1 failed" in capsys.readouterr().out
    assert (failed / "error.json").stat().st_mtime_ns != stamp


def test_an_interrupted_ablation_resumes_without_redoing_finished_runs(tmp_path):
    spec = write(tmp_path / "spec.toml", "seeds = [0, 1, 2]\n" + BASE.replace(
        "epochs = 1", "epochs = 3") + '[grid]\nstrategy = [[], ["ema:decay=0.9"]]\n')
    out = tmp_path / "out"
    command = [str(SCRIPT), "ablate", str(spec), "--out", str(out), "--workers", "2"]
    # Its own process group, with Ctrl-C's default action even where this test runs in the
    # background of a shell (which starts its jobs ignoring SIGINT).
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if out.is_dir() and any((run / "metrics.json").is_file() for run in run_dirs(out)):
            break
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group
    _, error = process.communicate(timeout=60)
    assert process.returncode == 130 and error.strip().endswith("error: interrupted"), error
    assert "Traceback" not in error
    finished = {run: (run / "metrics.json").read_bytes() for run in run_dirs(out)
                if (run / "metrics.json").is_file()}
    stamps = {run: (run / "metrics.json").stat().st_mtime_ns for run in finished}
    assert 1 <= len(finished) < 6

    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{6 - len(finished)} finished now, {len(finished)} done before, 0 failed" \
        in done.stdout
    assert all((run / "metrics.json").is_file() for run in run_dirs(out))
    for run, content in finished.items():
        assert (run / "metrics.json").read_bytes() == content
        assert (run / "metrics.json").stat().st_mtime_ns == stamps[run]


def test_the_ray_executor_gives_the_same_runs_in_the_same_layout(tmp_path, capsys):
    pytest.importorskip("ray")
    spec = write(tmp_path / "spec.toml", SPEC)
    assert cl("ablate", spec, "--out", tmp_path / "ray", "--executor", "ray",
              "--workers", "2", "--threads", "1") == 0
    assert "4 finished now" in capsys.readouterr().out
    assert cl("ablate", spec, "--out", tmp_path / "local", "--workers", "2",
              "--threads", "1") == 0
    ray_runs, local_runs = run_dirs(tmp_path / "ray"), run_dirs(tmp_path / "local")
    assert [run.name for run in ray_runs] == [run.name for run in local_runs]
    for ray_run, local_run in zip(ray_runs, local_runs, strict=True):
        assert sorted(p.name for p in ray_run.iterdir()) == \
            sorted(p.name for p in local_run.iterdir())
        assert np.array_equal(matrix(ray_run), matrix(local_run))
        assert (ray_run / "config.json").read_text() == (local_run / "config.json").read_text()
    # Done runs are skipped under Ray too.
    assert cl("ablate", spec, "--out", tmp_path / "ray", "--executor", "ray") == 0
    assert "0 finished now, 4 done before" in capsys.readouterr().out


def test_parse_spec_table_reads_json_and_single_strategy_strings(tmp_path):
    spec = parse_spec_table({"seeds": [4], "base": {"strategy": "ema"},
                             "grid": {"batch-size": [16, 32]}}, "spec")
    assert spec.base == {"strategy": ["ema"]} and spec.grid == {"batch_size": [16, 32]}
    path = write(tmp_path / "spec.json", json.dumps(
        {"seeds": [0], "grid": {"strategy": ["replay:capacity=10", []]}}))
    assert read_spec(path).grid["strategy"] == [["replay:capacity=10"], []]
    jobs = expand(read_spec(path), tmp_path)
    assert [job.name.split("-")[0] for job in jobs] == ["replay", "naive"]
