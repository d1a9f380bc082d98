"""`cl report`: grouping over seeds, confidence intervals, paired comparisons, files, figures."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import cl

from cl.experiment import execute, make_config
from cl.report import (
    build_report,
    describe,
    find_runs,
    group_runs,
    paired,
    plot_bars,
    plot_curve,
    plot_matrix,
    plot_tasks,
    select_group,
)

TINY = {"tasks": "split-digits", "epochs": 1, "hidden": [16], "train_per_task": 40,
        "test_per_task": 20, "eval_every": 1}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """2 configurations x 3 seeds of real tiny runs, plus one unfinished and one failed run."""
    root = tmp_path_factory.mktemp("runs")
    for strategy, name in (([], "naive-00000000"), (["ema:decay=0.9"], "ema-decay0.9-11111111")):
        for seed in (0, 1, 2):
            execute(make_config({**TINY, "strategy": strategy, "seed": seed}),
                    root / f"{name}-seed{seed}", checkpoint=False)
    unfinished = root / "naive-00000000-seed3"
    shutil.copytree(root / "naive-00000000-seed0", unfinished)
    (unfinished / "metrics.json").unlink()
    failed = root / "other" / "broken-seed0"
    failed.mkdir(parents=True)
    (failed / "config.json").write_text("{}")
    (failed / "error.json").write_text(json.dumps({"error": "loss is nan"}))
    return root


def test_runs_are_grouped_by_configuration_across_seeds(runs):
    found = find_runs([runs])
    assert len(found.runs) == 6
    assert [path.name for path in found.unfinished] == ["naive-00000000-seed3"]
    assert [(path.name, error) for path, error in found.failed] == [("broken-seed0",
                                                                     "loss is nan")]
    groups = group_runs(found.runs)
    assert sorted(group.name for group in groups) == ["ema-decay0.9-11111111", "naive-00000000"]
    assert sorted(group.label for group in groups) == ["ema:decay=0.9", "naive"]
    for group in groups:
        assert [run.seed for run in group.runs] == [0, 1, 2]
        accs = [json.loads((run.path / "metrics.json").read_text())["acc"] for run in group.runs]
        assert np.array_equal(group.values("acc"), accs)
    assert select_group(groups, "naive").name == "naive-00000000"
    assert select_group(groups, "ema").label == "ema:decay=0.9"
    with pytest.raises(Exception, match="no configuration matches"):
        select_group(groups, "lora")


def test_the_summary_and_paired_comparison_follow_from_the_runs(runs):
    report = build_report([runs], [("naive", "ema")])
    naive, ema = (next(g for g in report.groups if g.label == label)
                  for label in ("naive", "ema:decay=0.9"))
    row = next(row for row in report.rows if row["label"] == "naive")
    assert row["acc"].n == 3
    assert row["acc"].mean == pytest.approx(100 * naive.values("acc").mean())
    assert row["acc"].std == pytest.approx(100 * naive.values("acc").std(ddof=1))
    assert row["time_seconds"].mean == pytest.approx(np.mean(
        [r.metrics["train_seconds"] + r.metrics["eval_seconds"] for r in naive.runs]))
    acc = next(c for c in report.comparisons if c.metric == "acc")
    assert (acc.a, acc.b, acc.seeds) == (naive.name, ema.name, (0, 1, 2))
    differences = ema.values("acc") - naive.values("acc")
    assert acc.diff.mean == pytest.approx(differences.mean())
    assert acc.diff.ci_low <= acc.diff.mean <= acc.diff.ci_high
    # Swapping the two negates the difference and mirrors the interval.
    swapped = paired(ema, naive, "acc")
    assert swapped.diff.mean == pytest.approx(-acc.diff.mean)
    assert swapped.diff.ci_low == pytest.approx(-acc.diff.ci_high)


def test_report_files_tables_and_a_self_contained_page(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert cl("report", runs, "--out", out, "--html") == 0
    printed = capsys.readouterr().out
    assert "ACC" in printed and "naive" in printed and "ema:decay=0.9" in printed
    assert "1 unfinished, 1 failed and 0 repeated" in printed
    figures = sorted(path.name for path in (out / "figures").iterdir())
    assert figures == sorted(["configurations.png"] + [
        f"{name}-{kind}.png" for name in ("naive-00000000", "ema-decay0.9-11111111")
        for kind in ("matrix", "tasks", "curve")])
    for name in figures:
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [row["label"] for row in rows] == ["ema:decay=0.9", "naive"] or \
        [row["label"] for row in rows] == ["naive", "ema:decay=0.9"]
    groups = {g.label: g for g in group_runs(find_runs([runs]).runs)}
    for row in rows:
        values = 100 * groups[row["label"]].values("acc")
        assert float(row["acc_mean"]) == pytest.approx(values.mean())
        assert float(row["acc_std"]) == pytest.approx(values.std(ddof=1))
        assert row["n"] == "3" and row["seeds"] == "0 1 2"
    data = json.loads((out / "report.json").read_text())
    assert [c["label"] for c in data["configurations"]] == [row["label"] for row in rows]
    assert data["configurations"][0]["acc"]["mean"] == pytest.approx(float(rows[0]["acc_mean"]))
    assert {c["metric"] for c in data["comparisons"]} == {"acc", "bwt", "forgetting"}
    assert data["failed"][0]["error"] == "loss is nan" and len(data["unfinished"]) == 1
    markdown = (out / "report.md").read_text()
    assert "| naive | 3 |" in markdown and "## Paired comparisons" in markdown
    assert "broken-seed0 (loss is nan)" in markdown and "naive-00000000-seed3" in markdown
    assert all(f"(figures/{name})" in markdown for name in figures)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(figures)
    assert "src=\"http" not in page and "src=\"figures" not in page and "<table>" in page


def test_figures_draw_the_numbers_of_the_runs(runs):
    groups = group_runs(find_runs([runs]).runs)
    group = groups[0]
    mean_matrix = 100 * np.mean([r.metrics["accuracy_matrix"] for r in group.runs], axis=0)
    image = plot_matrix(group).axes[0].images[0]
    assert np.allclose(image.get_array(), mean_matrix)
    lines = plot_tasks(group).axes[0].get_lines()
    assert len(lines) == 5  # one per task, from the row where it is trained on
    assert np.allclose(lines[0].get_ydata(), mean_matrix[:, 0])
    assert np.allclose(lines[4].get_ydata(), mean_matrix[4:, 4])
    curve = plot_curve(group).axes[0]
    ends = group.runs[0].metrics["curve"]["task_end_steps"]
    boundaries = [line.get_xdata()[0] for line in curve.get_lines() if
                  line.get_linestyle() == "--"]
    assert boundaries == ends[:-1]
    steps = group.runs[0].metrics["curve"]["steps"]
    assert list(curve.get_lines()[0].get_xdata()) == steps and len(steps) > len(ends)
    report = build_report([runs])
    bars = plot_bars(report.rows).axes[0]
    widths = [patch.get_width() for patch in bars.patches]
    assert np.allclose(widths, [row["acc"].mean for row in report.rows])


def test_a_seed_found_twice_counts_once(runs, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(runs / "naive-00000000-seed1", copy / "naive-00000000-seed1")
    report = build_report([runs, copy])
    naive = next(group for group in report.groups if group.label == "naive")
    assert [run.seed for run in naive.runs] == [0, 1, 2]
    assert [run.path for run in naive.duplicates] == [copy / "naive-00000000-seed1"]
    assert next(row for row in report.rows if row["label"] == "naive")["acc"].n == 3
    assert cl("report", runs, copy, "--out", tmp_path / "report") == 0
    assert "1 repeated" in capsys.readouterr().out
    assert "repeat a seed" in (tmp_path / "report" / "report.md").read_text()


def test_report_rejects_what_it_cannot_read(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in (([empty], "no finished runs"),
                          ([tmp_path / "missing"], "is not a directory"),
                          ([runs, runs], "--out"),
                          ([runs, "--out", tmp_path / "r", "--compare", "naive"], "A,B"),
                          ([runs, "--out", tmp_path / "r", "--compare", "naive,lora"], "lora")):
        assert cl("report", *args) == 2
        error = capsys.readouterr().err
        assert error.startswith("error: ") and error.count("\n") == 1 and message in error
    broken = tmp_path / "broken" / "run-seed0"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    (broken / "metrics.json").write_text("{not json")
    # With no run it can read, the report says why in its one line.
    assert cl("report", broken.parent) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: no finished runs") and error.count("\n") == 1
    assert f"unreadable {broken / 'metrics.json'}: Expecting property name" in error


def _without(data, key):
    return {name: value for name, value in data.items() if name != key}


def _set(matrix, i, j, value):
    """A copy of `matrix` with entry [i][j] replaced."""
    changed = [list(row) for row in matrix]
    changed[i][j] = value
    return changed


# (file, change, what the error line says): files no run writes, but a hand edit or another
# tool's output can; each is a field the report or its figures read.
UNREADABLE = {
    "metrics-empty": ("metrics.json", lambda m: {}, "task_names is missing"),
    "metrics-a-list": ("metrics.json", lambda m: [m], "is not a JSON object"),
    "metrics-not-json": ("metrics.json", lambda m: "{not json", "Expecting property name"),
    "acc-a-string": ("metrics.json", lambda m: {**m, "acc": "high"},
                     "acc is 'high', expected a number or null"),
    "matrix-of-strings": ("metrics.json", lambda m: {**m, "accuracy_matrix": [["high"] * 5] * 5},
                          "accuracy_matrix is [['high'"),
    "matrix-a-row-short": ("metrics.json",
                           lambda m: {**m, "accuracy_matrix": m["accuracy_matrix"][:-1]},
                           "expected 5 rows of 5 accuracies"),
    "time-a-string": ("metrics.json", lambda m: {**m, "train_seconds": "1s"}, "train_seconds"),
    "memory-a-list": ("metrics.json", lambda m: {**m, "peak_rss_mb": [1]}, "peak_rss_mb is [1]"),
    "curve-a-step-short": ("metrics.json", lambda m: {**m, "curve": {
        **m["curve"], "accuracy": m["curve"]["accuracy"][1:]}}, "curve is"),
    "curve-missing": ("metrics.json", lambda m: _without(m, "curve"), "curve is missing"),
    "variant-a-string": ("metrics.json", lambda m: {**m, "variants": {"live": {
        **m, "min_acc": "low"}}}, "variants.live.min_acc is 'low'"),
    "variants-a-list": ("metrics.json", lambda m: {**m, "variants": ["live"]},
                        "variants is ['live'], expected an object"),
    # Numbers of the right type but no accuracy: a percentage, a typo, NaN or an infinity
    # (Python's json reads NaN and Infinity) would be averaged into the table.
    "matrix-a-percentage": ("metrics.json", lambda m: {**m, "accuracy_matrix": _set(
        m["accuracy_matrix"], 1, 0, 5.0)}, "accuracy_matrix[1][0] is 5.0, not an accuracy in "
                                           "[0, 1]"),
    "matrix-nan": ("metrics.json", lambda m: {**m, "accuracy_matrix": _set(
        m["accuracy_matrix"], 2, 3, math.nan)}, "accuracy_matrix[2][3] is nan, not an accuracy"),
    "matrix-negative": ("metrics.json", lambda m: {**m, "accuracy_matrix": _set(
        m["accuracy_matrix"], 0, 0, -0.5)}, "accuracy_matrix[0][0] is -0.5, not an accuracy"),
    "acc-a-percentage": ("metrics.json", lambda m: {**m, "acc": 7.5},
                         "acc is 7.5, not an accuracy in [0, 1]"),
    "acc-inf": ("metrics.json", lambda m: {**m, "acc": math.inf}, "acc is inf, not an accuracy"),
    "learning-accuracy-nan": ("metrics.json", lambda m: {**m, "learning_accuracy": math.nan},
                              "learning_accuracy is nan, not an accuracy"),
    "bwt-nan": ("metrics.json", lambda m: {**m, "bwt": math.nan},
                "bwt is nan, not a difference of accuracies in [-1, 1]"),
    "forgetting-a-percentage": ("metrics.json", lambda m: {**m, "forgetting": 12.5},
                                "forgetting is 12.5, not a difference of accuracies"),
    "curve-point-a-percentage": ("metrics.json", lambda m: {**m, "curve": {
        **m["curve"], "accuracy": _set(m["curve"]["accuracy"], 3, 1, 80.0)}},
        "curve.accuracy[3][1] is 80.0, not an accuracy in [0, 1]"),
    "curve-step-inf": ("metrics.json", lambda m: {**m, "curve": {
        **m["curve"], "steps": [math.inf, *m["curve"]["steps"][1:]]}},
        "curve.steps[0] is inf, expected a finite step"),
    "time-nan": ("metrics.json", lambda m: {**m, "eval_seconds": math.nan},
                 "eval_seconds is nan, expected a finite non-negative number or null"),
    "variant-matrix-inf": ("metrics.json", lambda m: {**m, "variants": {"live": {
        **m, "accuracy_matrix": _set(m["accuracy_matrix"], 4, 4, -math.inf)}}},
        "variants.live.accuracy_matrix[4][4] is -inf, not an accuracy"),
    "seed-missing": ("config.json", lambda c: _without(c, "seed"), "seed is missing"),
    "seed-a-string": ("config.json", lambda c: {**c, "seed": "1"}, "seed is '1'"),
    "config-a-list": ("config.json", lambda c: [c], "is not a JSON object"),
    "strategy-not-names": ("config.json", lambda c: {**c, "strategy": [1]}, "strategy is [1]"),
}


@pytest.mark.parametrize(("file", "change", "problem"), UNREADABLE.values(), ids=UNREADABLE)
def test_a_run_it_cannot_read_is_listed_and_the_others_reported(runs, tmp_path, capsys, file,
                                                               change, problem):
    root = tmp_path / "runs"
    good, bad = root / "naive-00000000-seed0", root / "naive-00000000-seed1"
    shutil.copytree(runs / good.name, good)
    shutil.copytree(runs / bad.name, bad)
    changed = change(json.loads((bad / file).read_text()))
    (bad / file).write_text(changed if isinstance(changed, str) else json.dumps(changed))
    found = find_runs([root])
    assert [run.path for run in found.runs] == [good]
    [(path, error)] = found.failed
    assert path == bad and error.startswith(f"unreadable {bad / file}: ") and problem in error
    assert "\n" not in error
    out = tmp_path / "report"
    assert cl("report", root, "--out", out) == 0
    assert "0 unfinished, 1 failed" in capsys.readouterr().out
    assert json.loads((out / "report.json").read_text())["failed"] == [{"run": str(bad),
                                                                         "error": error}]
    assert f"naive-00000000-seed1 ({error})" in (out / "report.md").read_text()


@pytest.mark.parametrize("manifest", ["[]", '{"runs": 3}', '{"runs": {"a": 1}}', '{"runs": [{}]}',
                                      '{"runs": [{"name": ["x"]}]}', "{not json"])
def test_a_manifest_it_cannot_follow_only_costs_the_grid_order(runs, tmp_path, manifest):
    root = tmp_path / "ablation"
    for seed in (0, 1):
        shutil.copytree(runs / f"naive-00000000-seed{seed}", root / f"naive-00000000-seed{seed}")
    (root / "ablation.json").write_text(json.dumps(
        {"runs": [{"name": "naive-00000000-seed1"}, {"name": "naive-00000000-seed0"}]}))
    assert [run.seed for run in find_runs([root]).runs] == [1, 0]  # the grid's order
    (root / "ablation.json").write_text(manifest)
    found = find_runs([root])
    assert [run.seed for run in found.runs] == [0, 1] and found.failed == []  # the paths' order
    assert build_report([root]).rows[0]["acc"].n == 2


def test_a_report_over_an_earlier_one_leaves_none_of_its_stale_files(runs, tmp_path):
    out = tmp_path / "report"
    assert cl("report", runs, "--out", out, "--html") == 0
    assert (out / "report.html").is_file()
    assert (out / "figures" / "ema-decay0.9-11111111-curve.png").is_file()
    # Files the report does not name stay, wherever they are.
    theirs = [out / "notes.txt", out / "figures" / "mine-matrix.png", out / "keep.png"]
    for path in theirs:
        path.write_text("not the report's")
    assert cl("report", runs, "--out", out, "--compare", "naive,ema") == 0
    assert not (out / "report.html").exists()
    data = json.loads((out / "report.json").read_text())
    data["figures"].append("../keep.png")  # an edited list must not reach out of figures/
    (out / "report.json").write_text(json.dumps(data))
    naive = [runs / f"naive-00000000-seed{seed}" for seed in (0, 1, 2)]
    assert cl("report", *naive, "--out", out) == 0  # the EMA configuration is gone
    assert sorted(path.name for path in (out / "figures").iterdir()) == sorted([
        "configurations.png", "mine-matrix.png",
        *(f"naive-00000000-{kind}.png" for kind in ("matrix", "tasks", "curve"))])
    assert all(path.read_text() == "not the report's" for path in theirs)
    assert json.loads((out / "report.json").read_text())["figures"] == [
        "configurations.png", *(f"naive-00000000-{kind}.png" for kind in ("matrix", "tasks",
                                                                          "curve"))]


@pytest.fixture(scope="module")
def ema_both(tmp_path_factory):
    """2 seeds of EMA that also records the live weights' matrix (metrics.json "variants")."""
    root = tmp_path_factory.mktemp("ema-both")
    for seed in (0, 1):
        execute(make_config({**TINY, "strategy": ["ema:decay=0.9,eval_with=both"],
                             "seed": seed}), root / f"ema-both-seed{seed}", checkpoint=False)
    return root


def test_the_live_weights_of_ema_get_a_row_beside_the_ema_one(ema_both, tmp_path, capsys):
    report = build_report([ema_both])
    [group] = report.groups
    [live] = group.variants
    label = "ema:decay=0.9,eval_with=both"
    assert (live.name, live.label, live.variant) == ("ema-both-live", f"{label} [live weights]",
                                                     "live")
    assert [row["label"] for row in report.rows] == [label, f"{label} [live weights]"]
    metrics = [json.loads((run.path / "metrics.json").read_text()) for run in group.runs]
    ema_row, live_row = report.rows
    assert ema_row["acc"].mean == pytest.approx(100 * np.mean([m["acc"] for m in metrics]))
    for key in ("acc", "bwt", "fwt", "forgetting", "learning_accuracy", "min_acc"):
        values = 100 * np.array([m["variants"]["live"][key] for m in metrics])
        assert live_row[key].n == 2 and live_row[key].mean == pytest.approx(values.mean())
        assert live_row[key].std == pytest.approx(values.std(ddof=1))
    assert live_row["time_seconds"].mean == ema_row["time_seconds"].mean  # the same runs' cost
    live_matrix = 100 * np.mean([m["variants"]["live"]["accuracy_matrix"] for m in metrics], 0)
    assert not np.allclose(live_matrix, 100 * np.mean([m["accuracy_matrix"] for m in metrics], 0))
    assert np.allclose(plot_matrix(live).axes[0].images[0].get_array(), live_matrix)
    # "ema" still names the EMA configuration; its live weights are asked for by their name.
    assert select_group(report.groups, "ema") is group
    assert select_group(report.groups, "live") is live

    out = tmp_path / "report"
    assert cl("report", ema_both, "--out", out, "--compare", "ema-both,live") == 0
    assert "2 runs" in capsys.readouterr().out  # the runs, not the rows, are counted
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert [(row["configuration"], row["label"]) for row in rows] == [
        ("ema-both", label), ("ema-both-live", f"{label} [live weights]")]
    assert float(rows[1]["acc_mean"]) == pytest.approx(live_row["acc"].mean)
    data = json.loads((out / "report.json").read_text())
    assert [c["variant"] for c in data["configurations"]] == [None, "live"]
    assert data["configurations"][1]["bwt"]["mean"] == pytest.approx(live_row["bwt"].mean)
    acc = next(c for c in data["comparisons"] if c["metric"] == "acc")
    assert (acc["a"], acc["b"]) == ("ema-both", "ema-both-live")
    assert acc["difference"]["mean"] == pytest.approx(100 * np.mean(
        [m["variants"]["live"]["acc"] - m["acc"] for m in metrics]))
    markdown = (out / "report.md").read_text()
    assert f"| {label} [live weights] | 2 |" in markdown and "`ema-both-live`" in markdown
    figures = {path.name for path in (out / "figures").iterdir()}
    assert {"ema-both-live-matrix.png", "ema-both-live-tasks.png"} <= figures
    assert "ema-both-live-curve.png" not in figures  # measured after each task only


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=12))
def test_the_interval_holds_the_mean_and_grows_with_the_spread(values):
    stat = describe(values)
    assert stat.n == len(values) and stat.mean == pytest.approx(np.mean(values))
    assert stat.ci_low <= stat.mean + 1e-9 and stat.mean - 1e-9 <= stat.ci_high
    wider = describe([stat.mean + 2 * (value - stat.mean) for value in values])
    assert wider.half_width == pytest.approx(2 * stat.half_width, abs=1e-6)


def test_the_95_percent_interval_covers_the_true_mean_95_percent_of_the_time():
    # Three seeds is the usual ablation: a normal-quantile interval would cover only ~88%.
    generator = np.random.default_rng(0)
    covered = [describe(sample).ci_low <= 1.0 <= describe(sample).ci_high
               for sample in generator.normal(1.0, 2.0, size=(4000, 3))]
    assert 0.94 <= np.mean(covered) <= 0.96


def test_one_value_has_a_mean_but_no_interval():
    stat = describe([0.5])
    assert stat.mean == 0.5 and math.isnan(stat.std) and math.isnan(stat.half_width)
    assert describe([math.nan, math.nan]).n == 0


def _partly_evaluated_run(path, seed, eval_on, bwt_lost=False):
    """A run directory written by hand as a run with `eval_on` seen or final would write it:
    null for what it did not evaluate, in R, the initial accuracies, the curve and metrics."""
    from cl import metrics as measures
    from cl.store import write_json

    rng = np.random.default_rng(seed)
    T, ends = 3, [10, 20, 30]
    R, initial = rng.uniform(0.2, 0.9, (T, T)), np.full(T, math.nan)
    if eval_on == "seen":
        R[np.triu_indices(T, k=1)] = math.nan
        steps, rows = [], []
        for task in range(T):  # a periodic evaluation of the seen tasks, then the task end
            periodic = np.full(T, math.nan)
            periodic[: task + 1] = rng.uniform(0.2, 0.9, task + 1)
            steps += [ends[task] - 5, ends[task]]
            rows += [periodic, R[task]]
        curve = np.array(rows)
    else:
        R[:-1] = math.nan
        steps, curve = list(ends), R
    summary = measures.summarize(R, initial, steps, curve, ends)
    if bwt_lost:
        summary["bwt"] = None
    path.mkdir(parents=True)
    write_json(path / "config.json", {"seed": seed, "strategy": [], "eval_on": eval_on})
    write_json(path / "metrics.json", {
        "task_names": ["a", "b", "c"], "accuracy_matrix": R.tolist(),
        "initial_accuracy": initial.tolist(), **summary,
        "curve": {"steps": steps, "accuracy": curve.tolist(), "task_end_steps": ends},
        "train_seconds": 1.0 + seed, "eval_seconds": 0.5, "peak_rss_mb": 100.0})
    return path


def test_runs_that_evaluated_only_some_tasks_are_reported_with_dashes(tmp_path, capsys):
    root = tmp_path / "runs"
    seen = [_partly_evaluated_run(root / f"seen-seed{seed}", seed, "seen", bwt_lost=seed == 1)
            for seed in (0, 1, 2)]
    final = [_partly_evaluated_run(root / f"final-seed{seed}", seed, "final")
             for seed in (0, 1, 2)]
    written = json.loads((seen[0] / "metrics.json").read_text())
    assert written["accuracy_matrix"][0][1] is None and written["fwt"] is None
    assert json.loads((final[0] / "metrics.json").read_text())["accuracy_matrix"][0] == [None] * 3

    report = build_report([root])
    assert report.found.failed == [] and len(report.found.runs) == 6
    rows = {row["name"]: row for row in report.rows}
    seen_values = [json.loads((path / "metrics.json").read_text()) for path in seen]
    # A null metric is missing: left out of the mean and the interval, not a crash or a NaN.
    assert rows["seen"]["bwt"].n == 2
    assert rows["seen"]["bwt"].mean == pytest.approx(
        100 * np.mean([seen_values[0]["bwt"], seen_values[2]["bwt"]]))
    assert rows["seen"]["forgetting"].n == 3 and rows["seen"]["fwt"].n == 0
    for key in ("bwt", "fwt", "forgetting", "learning_accuracy", "min_acc"):
        assert rows["final"][key].n == 0, key
    assert rows["final"]["acc"].n == 3
    bwt = next(c for c in report.comparisons if c.metric == "bwt")
    assert bwt.diff.n == 0  # no seed has BWT on both sides

    out = tmp_path / "report"
    assert cl("report", root, "--out", out, "--html", "--compare", "seen,final") == 0
    printed = capsys.readouterr().out
    nan = re.compile(r"\bnan\b", re.IGNORECASE)
    assert not nan.search(printed)
    markdown = (out / "report.md").read_text()
    assert not nan.search(markdown)
    [final_line] = [line for line in markdown.splitlines()
                    if line.startswith("| eval_on=final | 3 |")]
    cells = [cell.strip() for cell in final_line.strip("|").split("|")]
    # configuration, seeds, ACC, BWT, FWT, Forgetting, LA, min-ACC, time, memory
    assert cells[3:8] == ["-"] * 5 and cells[2] != "-"
    [paired_line] = [line for line in markdown.splitlines()
                     if line.startswith("| eval_on=final | eval_on=seen |")]
    assert paired_line.rstrip(" |").endswith("| - | -")  # ΔBWT, ΔForgetting: no seed has both
    table = {row["configuration"]: row for row in csv.DictReader((out / "report.csv").open())}
    assert table["final"]["bwt_mean"] == "" and table["final"]["min_acc_mean"] == ""
    assert float(table["seen"]["bwt_mean"]) == pytest.approx(rows["seen"]["bwt"].mean)
    text = (out / "report.json").read_text()
    assert "NaN" not in text
    data = {c["name"]: c for c in json.loads(text)["configurations"]}
    assert data["final"]["bwt"]["mean"] is None and data["seen"]["fwt"]["n"] == 0
    page = re.sub(r"base64,[^\"]*", "", (out / "report.html").read_text())
    assert not nan.search(page)
    assert sorted(path.name for path in (out / "figures").iterdir()) == sorted(
        ["configurations.png"] + [f"{name}-{kind}.png" for name in ("seen", "final")
                                  for kind in ("matrix", "tasks", "curve")])
    # The heatmap leaves an entry not evaluated blank: numbers only where R has them.
    groups = {group.name: group for group in report.groups}
    for name, evaluated in (("seen", 6), ("final", 3)):
        texts = [text.get_text() for text in plot_matrix(groups[name]).axes[0].texts]
        assert len(texts) == evaluated and not any(nan.search(text) for text in texts)


def test_runs_from_before_a_setting_existed_pool_with_runs_at_its_default(tmp_path):
    """config.json gained precision, eval_on and eval_tokens: a run written before, which ran
    at their defaults, belongs with new runs of the same configuration (new seeds of an old
    ablation), and a run at another value does not."""
    from cl.experiment import RunConfig
    from cl.report import ADDED_SETTINGS, Run, group_runs

    defaults = RunConfig().to_dict()
    assert ADDED_SETTINGS == {key: defaults[key] for key in ADDED_SETTINGS}
    old = {"seed": 0, "strategy": [], "lr": 0.1}
    runs = [Run(tmp_path / "a", old, {}),
            Run(tmp_path / "b", {**old, "seed": 1, **ADDED_SETTINGS}, {}),
            Run(tmp_path / "c", {**old, "seed": 2, **ADDED_SETTINGS, "eval_on": "seen"}, {})]
    groups = group_runs(runs)
    assert [[run.seed for run in group.runs] for group in groups] == [[0, 1], [2]]
