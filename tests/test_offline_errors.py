"""Loading from the hub while it cannot be reached, paths that are not there, and malformed data
files: each is one `error:` line on stderr, quickly, with no library log lines. Offline is
simulated: the hub endpoint is a closed local port, and every cache lives in tmp_path."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest
from test_cli import SCRIPT, cl
from text_data import CUES, write_jsonl_dataset, write_tiny_backbone

from cl import sources
from cl.errors import DataError
from cl.sources import looks_like_path
from tasks.text import TextSource, load_splits

# Offline, the libraries' retries alone took about 25 s; a quick failure takes a few.
QUICK_SECONDS = 15


def closed_port() -> int:
    """A local port nobody listens on: a connection there is refused at once."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def offline_env(tmp_path) -> dict[str, str]:
    """The environment of a `cl` whose hub does not answer and whose caches are empty."""
    import os

    home = tmp_path / "hf"
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(home),
               HF_HUB_CACHE=str(home / "hub"), HF_DATASETS_CACHE=str(home / "datasets"),
               CL_CACHE_DIR=str(tmp_path / "cache"))
    return env


def run_cl(env: dict[str, str], *args) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)
    return done, time.monotonic() - start


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return write_tiny_backbone(tmp_path_factory.mktemp("bert"))


@pytest.fixture
def text_cl_data(tmp_path) -> Path:
    """DIR/{agnews,amazon,dbpedia,yelp}/: what `--tasks text-cl --data DIR` reads."""
    for name, cues in (("agnews", "news"), ("amazon", "reviews"), ("dbpedia", "news"),
                       ("yelp", "reviews")):
        write_jsonl_dataset(tmp_path / "data" / name, CUES[cues], 4, 2)
    return tmp_path / "data"


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch):
    """In-process loads keep `datasets`' cache of the local files out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("CL_CACHE_DIR", str(tmp_path / "cache"))


# ---- the hub, unreachable ------------------------------------------------------------------

def test_split_mnist_from_an_unreachable_hub_is_one_quick_line(offline_env, tmp_path):
    done, seconds = run_cl(offline_env, "run", "--tasks", "split-mnist", "--out", tmp_path / "r")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: could not load dataset 'ylecun/mnist': the Hugging Face "
                               "hub at http://127.0.0.1:")
    assert "did not answer" in lines[0] and "--data path/to/mnist.npz" in lines[0]
    assert seconds < QUICK_SECONDS


def test_hf_model_from_an_unreachable_hub_is_one_quick_line(offline_env, text_cl_data,
                                                            tmp_path):
    done, seconds = run_cl(offline_env, "run", "--model", "hf:bert-base-uncased", "--tasks",
                           "text-cl", "--data", text_cl_data, "--out", tmp_path / "r")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: could not load model 'bert-base-uncased': the Hugging "
                               "Face hub at http://127.0.0.1:")
    assert lines[0].endswith("is not in the local cache; give a local directory with "
                             "--model hf:<path>")
    assert seconds < QUICK_SECONDS
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_a_cached_hub_model_still_loads_when_the_hub_is_unreachable(offline_env, backbone,
                                                                    text_cl_data, tmp_path):
    # The hub cache's layout: what an earlier, online hf_hub_download left behind.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(offline_env["HF_HUB_CACHE"]) / "models--someone--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in backbone.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    done, seconds = run_cl(offline_env, "run", "--model", "hf:someone/tiny-bert", "--tasks",
                           "text-cl:order=agnews", "--data", text_cl_data, "--epochs", 1,
                           "--out", tmp_path / "r")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["task_names"] == ["agnews"]
    assert seconds < 60


def test_the_libraries_go_offline_only_while_the_hub_does_not_answer(monkeypatch):
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(sources, "hub_unreachable", lambda: None)
    with sources.hub_access("dataset", "org/name") as offline:
        assert offline is False and constants.HF_HUB_OFFLINE is False
    monkeypatch.setattr(sources, "hub_unreachable", lambda: "did not answer (refused)")
    with sources.hub_access("dataset", "org/name") as offline:
        assert offline is True
        assert constants.HF_HUB_OFFLINE is True and datasets.config.HF_HUB_OFFLINE is True
    assert constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False
    with pytest.raises(sources.HubUnreachable, match="could not load dataset 'org/name': the "
                       "Hugging Face hub at .* did not answer \\(refused\\) and 'org/name' is "
                       "not in the local cache"), sources.hub_access("dataset", "org/name"):
        raise OSError("not cached")


# ---- paths that are not there --------------------------------------------------------------

@pytest.mark.parametrize("source, is_path", [
    ("/nonexistent", True), ("./model", True), ("../model", True), ("~/model", True),
    (".", True), ("a/b/c", True), ("runs/model", True), ("org/with space", True),
    ("bert-base-uncased", False), ("ylecun/mnist", False), ("fancyzhx/ag_news", False),
    ("SetFit/amazon_reviews_multi_en", False), ("gpt2", False),
])
def test_paths_are_told_from_hub_ids(source, is_path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()  # `runs/model` exists in part: a path, not the org `runs`
    assert looks_like_path(source) is is_path


@pytest.mark.parametrize("model", ["/nonexistent", "./nonexistent", "a/b/c", "~/no-such-cl-model"])
def test_a_missing_model_directory_is_named(model, tmp_path, capsys):
    write_jsonl_dataset(tmp_path / "news", CUES["news"], 4, 2)
    code = cl("run", "--tasks", "text:datasets=news", "--data", tmp_path, "--model",
              f"hf:{model}", "--out", tmp_path / "r")
    assert code == 2
    assert capsys.readouterr().err.strip() == f"error: --model hf:{model}: no such directory"


def test_a_model_file_is_not_a_directory(backbone, tmp_path, capsys):
    write_jsonl_dataset(tmp_path / "news", CUES["news"], 4, 2)
    code = cl("run", "--tasks", "text:datasets=news", "--data", tmp_path, "--model",
              f"hf:{backbone / 'config.json'}", "--out", tmp_path / "r")
    assert code == 2
    assert capsys.readouterr().err.strip().endswith("config.json is a file; give the directory "
                                                    "save_pretrained wrote")


@pytest.mark.parametrize("args, line", [
    (["--tasks", "split-hf", "--data", "/nonexistent"], "error: /nonexistent: no such directory"),
    (["--tasks", "split-hf", "--data", "./nope"], "error: ./nope: no such directory"),
    (["--tasks", "split-mnist", "--data", "/nonexistent"],
     "error: /nonexistent: no such directory; to use a local copy pass --data "
     "path/to/mnist.npz"),
    (["--tasks", "text:datasets=./nope", "--model", "hf:{backbone}"],
     "error: nope: ./nope: no such directory"),
    (["--tasks", "text:datasets=/nonexistent", "--model", "hf:{backbone}"],
     "error: nonexistent: /nonexistent: no such directory"),
])
def test_a_missing_data_directory_is_named(args, line, backbone, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [arg.replace("{backbone}", str(backbone)) for arg in args]
    assert cl("run", *args, "--out", tmp_path / "r") == 2
    assert capsys.readouterr().err.strip() == line


# ---- malformed data files ------------------------------------------------------------------

def truncated_jsonl(directory: Path) -> str:
    write_jsonl_dataset(directory, CUES["news"], 4, 2)  # 12 train rows
    with open(directory / "train.jsonl", "a") as handle:
        handle.write('{"text": "abc", "lab')
    return (f"{directory / 'train.jsonl'}: line 13, column 17: not valid JSON "
            "(Unterminated string)")


def bad_csv_row(directory: Path) -> str:
    directory.mkdir()
    (directory / "train.csv").write_text("text,label\nthe world,world\nfoo,bar,baz\n")
    (directory / "test.csv").write_text("text,label\nthe world,world\n")
    return f"{directory / 'train.csv'}: line 3: 3 fields, but the header has 2"


def unclosed_csv_quote(directory: Path) -> str:
    directory.mkdir()
    (directory / "train.csv").write_text('text,label\nthe world,world\n"a,b,world\nc,world\n')
    (directory / "test.csv").write_text("text,label\nthe world,world\n")
    return f"{directory / 'train.csv'}: line 3: unexpected end of data (a quote is never closed)"


def not_parquet(directory: Path) -> str:
    directory.mkdir()
    (directory / "train.parquet").write_text("not parquet")
    (directory / "test.parquet").write_bytes(b"PAR1 nor this")
    return f"{directory / 'test.parquet'}: not a Parquet file ("


def empty_file(directory: Path) -> str:
    write_jsonl_dataset(directory, CUES["news"], 4, 2)
    (directory / "train.jsonl").write_text("")
    return f"{directory / 'train.jsonl'}: empty file"


def broken_json_document(directory: Path) -> str:
    write_jsonl_dataset(directory, CUES["news"], 4, 2)
    (directory / "train.jsonl").unlink()
    (directory / "train.json").write_text('[\n {"text": "a", "label": "world"},\n'
                                          ' {"text": "b" "label": "world"}\n]\n')
    return (f"{directory / 'train.json'}: line 3, column 15: not valid JSON "
            "(Expecting ',' delimiter)")


@pytest.mark.parametrize("make", [truncated_jsonl, bad_csv_row, unclosed_csv_quote, not_parquet,
                                  empty_file, broken_json_document])
def test_a_malformed_file_is_named_with_its_line(make, tmp_path):
    expected = make(tmp_path / "bad")
    with pytest.raises(DataError) as caught:
        load_splits(TextSource("bad", str(tmp_path / "bad")))
    message = str(caught.value)
    assert message.startswith(f"bad: {expected}") and "\n" not in message


def test_a_truncated_jsonl_is_one_line_without_library_errors(offline_env, tmp_path):
    expected = truncated_jsonl(tmp_path / "bad")
    done, _ = run_cl(offline_env, "run", "--tasks", "split-hf", "--data", tmp_path / "bad",
                     "--out", tmp_path / "r")
    assert done.returncode == 2
    assert done.stderr == f"error: {expected}\n"
