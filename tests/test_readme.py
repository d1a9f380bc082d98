"""The README as a newcomer reads it: its first command prints the table it shows, and every
shell example that needs no data runs as written, in order, in an empty directory (with the
repository's `bench/` and `examples/` beside it, as in a clone)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from test_cli import cl

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# Examples that need what a clone does not have: a data file, a hub model, the text extra.
NEEDS_DATA = ("--data", "hf:", "minilm")


def readme_commands() -> list[str]:
    """The `cl ...` lines of the README's bash blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line.startswith("cl "):
                commands.append(line)
    return commands


def test_the_readme_lists_its_examples():
    commands = readme_commands()
    assert commands[0] == "cl run" and "cl list" in commands
    assert sum(not any(word in c for word in NEEDS_DATA) for c in commands) >= 10


def test_every_readme_example_that_needs_no_data_runs_as_written(tmp_path, monkeypatch,
                                                                  capsys):
    for folder in ("bench", "examples"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    monkeypatch.chdir(tmp_path)
    ran = []
    for command in readme_commands():
        if any(word in command for word in NEEDS_DATA):
            continue
        if "<name>" in command:  # "rerun a run exactly": the first run the README made
            first = sorted((tmp_path / "runs").glob("split-digits-naive-seed0-*"))[0]
            command = command.replace("runs/<name>", str(first.relative_to(tmp_path)))
        args = shlex.split(command)[1:]
        assert cl(*args) == 0, (command, capsys.readouterr().err)
        printed = capsys.readouterr().out
        ran.append(command)
        if command == "cl run":
            # The README shows the output of its first command, as it prints here.
            shown = README.split("prints, in a few seconds:\n\n```\n", 1)[1].split("```")[0]
            assert [line.rstrip() for line in printed.splitlines()[:len(shown.splitlines())]] \
                == shown.splitlines()
        if command.startswith("cl ablate") and "--dry-run" not in command:
            assert printed.startswith("12 runs in runs/digits: 12 finished now, 0 done before, "
                                      "0 failed")
        if command.startswith("cl report") and "--html" in command:
            assert (tmp_path / "runs/digits/report/report.html").is_file()
        if "--compare" in command:  # no stale page of the earlier report stays beside it
            assert not (tmp_path / "runs/digits/report/report.html").exists()
            assert "Paired" in printed
    assert any(c.startswith("cl ablate") for c in ran) and "cl list" in ran
    assert any("--config runs/" in c for c in ran)


@pytest.mark.parametrize("block", re.findall(r"```toml\n(.*?)```", README, re.S)[:1])
def test_the_config_file_the_readme_shows_is_the_one_shipped(block):
    shipped = (ROOT / "examples" / "run.toml").read_text(encoding="utf-8")
    assert [line for line in shipped.splitlines() if not line.startswith("#")] == \
        block.splitlines()
