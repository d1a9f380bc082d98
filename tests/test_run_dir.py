"""The run directory with real processes and real folders: cl writes only into folders it made
(or empty ones), one process owns a run directory at a time, files follow the umask, a full
disk while a checkpoint is written is one line, and a resumed run must be the run that was
started."""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import FAST, SCRIPT, cl, matrix

from cl import store

CL = str(SCRIPT)
SLOW = ["--epochs", "40", "--batch-size", "8"]  # long enough to be caught running


def start(*args, cwd: Path | None = None, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([CL, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def wait_until_locked(run_dir: Path, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while not store.is_locked(run_dir):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def contents(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_a_folder_cl_did_not_make_is_never_written_into(tmp_path, capsys):
    folder = tmp_path / "mine"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "config.json").write_text('{"my": "settings"}')
    (folder / "events.jsonl").write_text('{"my": "events"}\n')
    (folder / "checkpoint" / "important.bin").write_bytes(b"\x00precious")
    before = contents(folder)
    refused = subprocess.run([CL, "run", *FAST, "--out", "."], cwd=folder,
                             capture_output=True, text=True)
    assert refused.returncode == 2
    assert refused.stderr == ("error: --out . holds files cl did not write (checkpoint, "
                              "config.json, events.jsonl); choose a new or empty directory\n")
    assert cl("run", "--out", folder, *FAST) == 2
    assert cl("run", "--resume", folder) == 2
    assert "is not a run directory cl made" in capsys.readouterr().err
    assert contents(folder) == before and sorted(p.name for p in folder.iterdir()) == [
        "checkpoint", "config.json", "events.jsonl"]
    # An empty folder may be used, and then it is cl's: an unfinished run there is restarted.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cl("run", "--out", empty, *FAST) == 0
    assert (empty / store.MARKER).is_file() and (empty / "metrics.json").is_file()


def test_two_runs_into_one_directory_one_fails_with_one_line(tmp_path):
    out = tmp_path / "run"
    first = start("run", "--out", out, *SLOW)
    wait_until_locked(out, first)
    second = subprocess.run([CL, "run", "--out", str(out), *FAST], capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 1
    assert second.stderr == f"error: {out} is in use by process {first.pid}: one run " \
                            "directory, one process at a time\n"
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert f"run saved in {out}" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["epochs"] == 40  # the first run's files, whole; the second wrote nothing
    assert len(matrix(out)) == 5


def test_an_ablation_leaves_alone_the_runs_another_process_holds(tmp_path):
    from cl.ablation import expand, read_spec

    spec = tmp_path / "spec.toml"
    spec.write_text("seeds = [0]\n[base]\nepochs = 1\n[grid]\nlr = [0.05, 0.1]\n")
    out = tmp_path / "out"
    held, free = (job.run_dir for job in expand(read_spec(spec), out))
    # This process holds one run directory, as a `cl run` or another `cl ablate` would.
    with store.lock_run_dir(held):
        assert store.run_status(held) == "running"
        first = subprocess.run([CL, "ablate", str(spec), "--out", str(out), "--workers", "1"],
                               capture_output=True, text=True, timeout=300)
        assert first.returncode == 0, first.stderr
        assert "2 runs in" in first.stdout and "1 finished now" in first.stdout
        assert "1 held by another process" in first.stdout
        assert (free / "metrics.json").is_file() and not (held / "config.json").exists()
    second = subprocess.run([CL, "ablate", str(spec), "--out", str(out), "--workers", "1"],
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "1 finished now, 1 done before, 0 failed\n" in second.stdout
    assert (held / "metrics.json").is_file() and not list(out.rglob("error.json"))


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                         (0o077, 0o600, 0o700)])
def test_result_files_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    out = tmp_path / "run"
    subprocess.run([CL, "run", "--out", str(out), *FAST], check=True, capture_output=True,
                   preexec_fn=lambda: os.umask(umask))
    files = [path for path in out.rglob("*") if path.is_file()]
    folders = [out, *(path for path in out.rglob("*") if path.is_dir())]
    assert {"metrics.json", "config.json", "model.safetensors"} <= {p.name for p in files}
    assert any(path.name == "checkpoint" for path in folders)
    assert {stat.S_IMODE(path.stat().st_mode) for path in files} == {file_mode}
    assert {stat.S_IMODE(path.stat().st_mode) for path in folders} == {dir_mode}


def test_a_full_disk_while_a_checkpoint_is_written_is_one_line(tmp_path):
    # RLIMIT_FSIZE fails every write past 200 kB (EFBIG), as a full disk fails with ENOSPC:
    # the config is written, the checkpoint's model file (760 kB) is not.
    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "run"
    result = subprocess.run([CL, "run", "--out", str(out), "--hidden", "400,400", *FAST],
                            capture_output=True, text=True, preexec_fn=small_files)
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot write the checkpoint in {out}: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (out / "metrics.json").exists()
    assert not [path for path in out.iterdir() if path.name.startswith(".checkpoint")]


class StopAfterFirstCheckpoint:
    """A listener that interrupts the run once the second task trains: task 0 is saved."""

    def __call__(self, event: dict) -> None:
        if event["event"] == "step" and event["task"] == 1:
            raise KeyboardInterrupt


def interrupted_run(out: Path, **settings) -> None:
    """A run in `out` stopped while its second task trains: task 0 is in its checkpoint."""
    from cl.experiment import execute, make_config

    with pytest.raises(KeyboardInterrupt):
        execute(make_config({"epochs": 1, **settings}), out, listener=StopAfterFirstCheckpoint())


def test_resume_refuses_a_config_edited_since_the_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    interrupted_run(out)
    assert not store.is_locked(out)  # the interrupted process let go of it
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "strategy": ["ema"]}))
    assert cl("run", "--resume", out) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {out / 'config.json'} no longer matches its checkpoint: strategy "
                   "is ['ema'] there but [] in the checkpoint (1 setting(s) differ); put it "
                   "back or start a new run\n")
    (out / "config.json").write_text(json.dumps(config))
    assert cl("run", "--resume", out) == 0
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] == 1


def test_resume_refuses_a_checkpoint_model_of_another_model(tmp_path, capsys):
    out, other = tmp_path / "run", tmp_path / "other"
    interrupted_run(out)
    interrupted_run(other, hidden=[50, 50])
    # Same config.json, another network's weights: loading would raise a size mismatch deep in
    # torch; the user learns which tensor differs.
    model_file = Path(store.CHECKPOINT) / store.MODEL_FILE
    (out / model_file).write_bytes((other / model_file).read_bytes())
    assert cl("run", "--resume", out) == 2
    assert capsys.readouterr().err == (
        "error: the checkpoint's model does not fit this run's model: body.1.weight has "
        "shape (50, 64) in the file but (100, 64) in the model\n")
    assert not (out / "metrics.json").exists()


def test_resume_refuses_a_half_deleted_checkpoint_and_restarts_without_one(tmp_path, capsys):
    out, straight = tmp_path / "run", tmp_path / "straight"
    interrupted_run(out)
    (out / store.CHECKPOINT / store.STATE_FILE).unlink()
    assert cl("run", "--resume", out) == 2
    assert capsys.readouterr().err == (
        f"error: checkpoint {out / store.CHECKPOINT} is incomplete (no {store.STATE_FILE}): "
        "delete it to start the run again from its first task\n")
    # With no checkpoint at all the run starts over, and says so; the result is the same run.
    for path in (out / store.CHECKPOINT).iterdir():
        path.unlink()
    (out / store.CHECKPOINT).rmdir()
    result = subprocess.run([CL, "run", "--resume", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == (f"WARNING cl.experiment: {out} has no checkpoint: the run starts "
                             "again from its first task\n")
    assert json.loads((out / "metrics.json").read_text())["resumed_from"] is None
    assert cl("run", "--epochs", "1", "--out", straight) == 0
    assert np.array_equal(matrix(out), matrix(straight))


def test_the_thread_count_is_recorded_and_a_resumed_run_keeps_it(tmp_path):
    import torch

    from cl.experiment import execute, make_config

    out = tmp_path / "run"
    threads = torch.get_num_threads()
    interrupted_run(out, threads=1)
    assert json.loads((out / "config.json").read_text())["threads"] == 1
    try:
        # An ablation's worker resumes with whatever --threads it got this time: the run goes
        # on with the count it was started with, not refused as an edited config.
        torch.set_num_threads(2)
        _, metrics = execute(make_config({"epochs": 1}), out, resume=True)
        assert metrics["resumed_from"] == 1 and torch.get_num_threads() == 1
        assert json.loads((out / "config.json").read_text())["threads"] == 1
    finally:
        torch.set_num_threads(threads)
    # Not given: torch's own choice, recorded (here in a fresh process, as a user starts it).
    result = subprocess.run([CL, "run", "--out", str(tmp_path / "default"), *FAST],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    recorded = json.loads((tmp_path / "default" / "config.json").read_text())["threads"]
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                           capture_output=True, text=True)
    assert recorded == int(probe.stdout)


def test_a_polite_kill_of_a_run_is_one_line_and_leaves_it_resumable(tmp_path):
    import signal

    out = tmp_path / "run"
    process = start("run", "--out", out, *SLOW)
    wait_until_locked(out, process)
    while not (out / "config.json").is_file():  # training, not still taking the directory
        assert process.poll() is None, process.communicate()
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr == "error: interrupted\n", stderr
    assert store.run_status(out) == "partial" and not (out / "metrics.json").exists()


def test_config_json_reruns_from_another_directory(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    np.savez(here / "my6.npz", x_train=rng.random((60, 4, 4)), y_train=np.arange(60) % 6,
             x_test=rng.random((30, 4, 4)), y_test=np.arange(30) % 6)
    monkeypatch.chdir(here)
    assert cl("run", "--tasks", "split-npz", "--data", "my6.npz", "--num-tasks", "3",
              "--out", "run", *FAST) == 0
    config = json.loads((here / "run" / "config.json").read_text())
    assert config["data"] == str(here / "my6.npz")  # absolute: it reruns from anywhere
    metrics = json.loads((here / "run" / "metrics.json").read_text())
    assert metrics["paths_as_given"] == {"data": "my6.npz"}  # what was typed, for display
    monkeypatch.chdir(elsewhere)
    assert cl("run", "--config", here / "run" / "config.json", "--out", "again") == 0, \
        capsys.readouterr().err
    assert np.array_equal(matrix(elsewhere / "again"), matrix(here / "run"))


def test_the_cli_is_the_console_script_of_this_environment():
    assert Path(CL).is_file() and Path(sys.executable).parent == Path(CL).parent


def test_a_teacher_file_and_a_model_directory_are_stored_absolute(tmp_path, monkeypatch):
    from cl.experiment import absolute_paths, make_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.pt").write_bytes(b"")
    (tmp_path / "bert").mkdir()
    config = make_config({"strategy": ["replay:capacity=10", "distill:teacher=teacher.pt,alpha=2"],
                          "model": "hf:bert"})
    resolved, given = absolute_paths(config)
    assert resolved.strategy == ("replay:capacity=10",
                                 f"distill:teacher={tmp_path / 'teacher.pt'},alpha=2")
    assert resolved.model == f"hf:{tmp_path / 'bert'}"
    assert given == {"distill:teacher": "teacher.pt", "model": "bert"}
    # Names that are not local paths stay as they are.
    hub = make_config({"model": "hf:org/model", "strategy": ["distill:teacher=previous"]})
    assert absolute_paths(hub) == (hub, {})
