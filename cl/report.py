"""Reports over many runs: group by configuration across seeds, summarize, compare, plot.

`find_runs` reads run directories (finished ones have `metrics.json`, checked by `read_run`
for everything the report reads); `group_runs` puts the runs of one configuration (the same
`config.json` but for the seed) together, with a group per extra evaluation the runs recorded
(EMA's live weights); `summarize` gives each metric's mean, standard deviation and 95%
confidence interval (Student's t, since a handful of seeds is the usual case); `paired`
compares two configurations seed by seed.
The figures are drawn with matplotlib's object API (no pyplot state) and `write_report`
writes the markdown, CSV, PNG and optional self-contained HTML files.
A metric or accuracy a run did not evaluate (null in metrics.json: a run that evaluates only
the tasks seen so far, or only after the last task) is missing: left out of the means and
intervals, a dash in the tables, an empty CSV cell, null in report.json, blank in the figures.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cl import store
from cl.errors import DataError, UsageError, one_line

# (key, column title, is an accuracy in [0, 1] shown in percent)
METRICS = (
    ("acc", "ACC", True),
    ("bwt", "BWT", True),
    ("fwt", "FWT", True),
    ("forgetting", "Forgetting", True),
    ("learning_accuracy", "LA", True),
    ("min_acc", "min-ACC", True),
    ("time_seconds", "time (s)", False),
    ("peak_rss_mb", "peak MiB", False),
)
COMPARED = ("acc", "bwt", "forgetting")  # the metrics of the paired comparisons
# What the whole run spent: the same for every evaluation the run recorded (its variants).
COSTS = ("time_seconds", "peak_rss_mb")
ACCURACIES = tuple(key for key, _, _ in METRICS if key not in COSTS)
# The ones of ACCURACIES that compare two accuracies, so lie in [-1, 1] rather than [0, 1].
DIFFERENCES = ("bwt", "fwt", "forgetting")
# The row label of a variant, an extra evaluation a strategy records (EMA's eval_with=both).
VARIANT_LABELS = {"live": "live weights", "validation": "validation rows"}
SEED_SUFFIX = re.compile(r"^(?P<configuration>.+)-seed-?\d+$")


@dataclass(frozen=True)
class Run:
    path: Path
    config: dict[str, Any]  # its config.json
    metrics: dict[str, Any]  # its metrics.json
    # An extra evaluation the run recorded in metrics["variants"] (EMA's "live" weights): this
    # Run then stands for that evaluation's accuracies, at the costs of the whole run.
    variant: str | None = None

    @property
    def seed(self) -> int:
        return self.config["seed"]

    @property
    def measured(self) -> dict[str, Any]:
        """The accuracies (matrix and metrics) this Run stands for: the run's or its variant's."""
        return self.metrics if self.variant is None else self.metrics["variants"][self.variant]

    def value(self, key: str) -> float:
        """A metric of this run as a float: NaN where metrics.json has null, a metric undefined
        (BWT of a joint run) or not evaluated (BWT of a run evaluated only after the last task),
        which `describe` and `paired` then leave out as missing."""
        if key == "time_seconds":
            parts = (self.metrics.get("train_seconds"), self.metrics.get("eval_seconds"))
            return math.nan if None in parts else float(sum(parts))
        value = (self.metrics if key in COSTS else self.measured).get(key)
        return math.nan if value is None else float(value)


@dataclass
class Group:
    """The runs of one configuration, one per seed."""

    name: str  # short id: the ablation's configuration name, or "config-<hash>"
    label: str  # the settings that set it apart from the other groups
    config: dict[str, Any]  # its config.json without the seed
    runs: list[Run] = field(default_factory=list)
    # Runs of a seed already in `runs` (the same ablation run twice, say): counting them would
    # narrow the interval with copies, so they are listed instead.
    duplicates: list[Run] = field(default_factory=list)
    variant: str | None = None  # set in a group of the runs' extra evaluation (EMA's "live")
    variants: list[Group] = field(default_factory=list)  # those groups of this one's runs

    def values(self, key: str) -> np.ndarray:
        return np.array([run.value(key) for run in self.runs], dtype=float)

    def by_seed(self, key: str) -> dict[int, float]:
        return {run.seed: run.value(key) for run in self.runs}


@dataclass(frozen=True)
class Stat:
    """Mean, sample standard deviation and 95% t-interval of n values (NaNs dropped)."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


@dataclass(frozen=True)
class Paired:
    """B minus A on the seeds both ran: mean difference, its 95% CI, and the t-test p-value."""

    a: str
    b: str
    metric: str
    seeds: tuple[int, ...]
    diff: Stat
    p_value: float


def describe(values: Sequence[float], confidence: float = 0.95) -> Stat:
    """The Stat of `values`; std and the interval are NaN below two values."""
    from scipy import stats

    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    n = int(values.size)
    if n == 0:
        return Stat(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(values.mean())
    if n == 1:
        return Stat(1, mean, math.nan, math.nan, math.nan)
    std = float(values.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * std / math.sqrt(n)
    return Stat(n, mean, std, mean - half, mean + half)


def paired(a: Group, b: Group, metric: str) -> Paired:
    """Compare `b` to `a` seed by seed: a paired difference removes the between-seed spread."""
    from scipy import stats

    first, second = a.by_seed(metric), b.by_seed(metric)
    seeds = tuple(sorted(seed for seed in set(first) & set(second)
                         if not (math.isnan(first[seed]) or math.isnan(second[seed]))))
    differences = [second[seed] - first[seed] for seed in seeds]
    p_value = math.nan
    if len(seeds) >= 2 and np.std(differences) > 0:
        p_value = float(stats.ttest_1samp(differences, 0.0).pvalue)
    return Paired(a.name, b.name, metric, seeds, describe(differences), p_value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DataError(f"unreadable {path}: {one_line(error)}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_matrix(value: Any, rows: int, columns: int) -> bool:
    """Whether `value` is `rows` lists of `columns` numbers (null: not measured)."""
    return (isinstance(value, list) and len(value) == rows
            and all(isinstance(row, list) and len(row) == columns
                    and all(item is None or _is_number(item) for item in row) for row in value))


def _short(value: Any, width: int = 40) -> str:
    """A value as a message quotes it: its repr, cut to `width` characters."""
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _shown(data: dict[str, Any], key: str) -> str:
    """A field's value for a message that says what is wrong with it."""
    return _short(data[key]) if key in data else "missing"


def _config_problems(config: Any) -> Iterator[str]:
    """What keeps the report from grouping and labelling a run by its config.json."""
    if not isinstance(config, dict):
        yield f"{_short(config)} is not a JSON object"
        return
    seed = config.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        yield f"seed is {_shown(config, 'seed')}, expected an integer"
    strategy = config.get("strategy")
    if not (isinstance(strategy, list) and all(isinstance(spec, str) for spec in strategy)):
        yield f"strategy is {_shown(config, 'strategy')}, expected a list of strategy specs"


def _is_accuracy(value: Any) -> bool:
    """A fraction in [0, 1], or null (not measured). NaN and infinities fail the comparison."""
    return value is None or 0 <= value <= 1


def _matrix_problems(where: str, matrix: list[list[Any]]) -> Iterator[str]:
    """Each entry of a matrix of accuracies (checked for shape already) that is no accuracy."""
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            if not _is_accuracy(value):
                yield f"{where}[{i}][{j}] is {_short(value)}, not an accuracy in [0, 1]"


def _measured_problems(measured: dict[str, Any], rows: int, columns: int) -> Iterator[str]:
    """What keeps the report from reading one evaluation's accuracies (the run's, a variant's)."""
    for key in ACCURACIES:
        value = measured.get(key)
        if not (value is None or _is_number(value)):
            yield f"{key} is {_shown(measured, key)}, expected a number or null"
        elif key in DIFFERENCES:
            # Negative is legitimate (forgetting), but a difference of two fractions is no
            # more than 1 either way; NaN and infinities fail the comparison.
            if value is not None and not -1 <= value <= 1:
                yield f"{key} is {_short(value)}, not a difference of accuracies in [-1, 1]"
        elif not _is_accuracy(value):  # a percentage or a typo would be averaged into the table
            yield f"{key} is {_short(value)}, not an accuracy in [0, 1]"
    matrix = measured.get("accuracy_matrix")
    if not _is_matrix(matrix, rows, columns):
        yield (f"accuracy_matrix is {_shown(measured, 'accuracy_matrix')}, expected {rows} "
               f"rows of {columns} accuracies")
    else:
        yield from _matrix_problems("accuracy_matrix", matrix)


def _metrics_problems(metrics: Any) -> Iterator[str]:
    """What keeps the report and its figures from reading a run's metrics.json."""
    if not isinstance(metrics, dict):
        yield f"{_short(metrics)} is not a JSON object"
        return
    names = metrics.get("task_names")
    if not (isinstance(names, list) and names and all(isinstance(name, str) for name in names)):
        yield f"task_names is {_shown(metrics, 'task_names')}, expected a list of task names"
        return
    for key in ("train_seconds", "eval_seconds", "peak_rss_mb"):
        value = metrics.get(key)
        if not (value is None or _is_number(value)):
            yield f"{key} is {_shown(metrics, key)}, expected a number or null"
        elif value is not None and not 0 <= value < math.inf:  # NaN fails the comparison too
            yield f"{key} is {_short(value)}, expected a finite non-negative number or null"
    # R is one row per task trained, or the single row of a joint run.
    rows = 1 if metrics.get("joint") else len(names)
    yield from _measured_problems(metrics, rows, len(names))
    if not metrics.get("joint"):  # the continual-evaluation curve is drawn for sequential runs
        curve = metrics.get("curve")
        steps = curve.get("steps") if isinstance(curve, dict) else None
        if not (isinstance(steps, list) and all(_is_number(step) for step in steps)
                and _is_matrix(curve.get("accuracy"), len(steps), len(names))
                and isinstance(curve.get("task_end_steps"), list)
                and all(_is_number(end) for end in curve["task_end_steps"])):
            yield (f"curve is {_shown(metrics, 'curve')}, expected steps, task_end_steps and "
                   f"a row of {len(names)} accuracies per step")
        else:
            for key in ("steps", "task_end_steps"):
                for index, value in enumerate(curve[key]):
                    if not -math.inf < value < math.inf:  # the figure's x axis
                        yield f"curve.{key}[{index}] is {_short(value)}, expected a finite step"
            yield from _matrix_problems("curve.accuracy", curve["accuracy"])
    variants = metrics.get("variants", {})
    if not isinstance(variants, dict):
        yield f"variants is {_short(variants)}, expected an object"
        return
    for name, variant in variants.items():
        if not isinstance(variant, dict):
            yield f"variants.{name} is {_short(variant)}, expected an object"
        else:
            yield from (f"variants.{name}.{problem}"
                        for problem in _measured_problems(variant, rows, len(names)))


def read_run(run_dir: Path) -> Run:
    """A finished run, its config.json and metrics.json checked for everything the report and
    its figures read, so that a hand-edited or foreign file is named instead of failing deep in
    a figure; raises DataError("unreadable <file>: <what is wrong>")."""
    config_path, metrics_path = run_dir / store.CONFIG, run_dir / store.METRICS
    config, metrics = _read_json(config_path), _read_json(metrics_path)
    for path, problems in ((config_path, _config_problems(config)),
                           (metrics_path, _metrics_problems(metrics))):
        problem = next(problems, None)
        if problem is not None:
            raise DataError(f"unreadable {path}: {problem}")
    return Run(run_dir, config, metrics)


@dataclass
class Found:
    """The run directories under the report's directories, finished ones in ablation order."""

    runs: list[Run]
    unfinished: list[Path]
    failed: list[tuple[Path, str]]


def _manifest_order(directory: Path) -> dict[str, int]:
    """Run name -> position in the ablation's `ablation.json`, when there is one.

    A manifest the report cannot follow only costs the grid order (runs then come by path):
    the runs themselves are what the report is about."""
    path = directory / store.MANIFEST
    if not path.is_file():
        return {}
    try:
        manifest = _read_json(path)
    except DataError:
        return {}
    runs = manifest.get("runs") if isinstance(manifest, dict) else None
    if not (isinstance(runs, list)
            and all(isinstance(run, dict) and isinstance(run.get("name"), str) for run in runs)):
        return {}
    return {run["name"]: index for index, run in enumerate(runs)}


def find_runs(directories: Sequence[str | Path]) -> Found:
    """Every run directory at or under `directories` (a directory with `config.json`).

    Runs come in the order of the directories given, and within an ablation's directory in
    the order of its grid (so configurations appear as the spec lists them), else by path.
    A finished run `read_run` cannot read is listed among the failed ones, and the rest go on.
    """
    found = Found([], [], [])
    seen = set()
    for directory in directories:
        directory = Path(directory)
        if not directory.is_dir():
            raise UsageError(f"{directory} is not a directory")
        order = _manifest_order(directory)
        paths = sorted(directory.rglob(store.CONFIG),
                       key=lambda path: (order.get(path.parent.name, len(order)), str(path)))
        for config_path in paths:
            run_dir = config_path.parent
            if run_dir.resolve() in seen:
                continue
            seen.add(run_dir.resolve())
            status = store.run_status(run_dir)
            if status == "done":
                try:
                    found.runs.append(read_run(run_dir))
                except DataError as error:
                    found.failed.append((run_dir, str(error)))
            elif status == "failed":
                found.failed.append((run_dir, store.read_error(run_dir)))
            else:
                found.unfinished.append(run_dir)
    return found


def _digest(config: dict[str, Any]) -> str:
    """8 hex digits of a configuration, to tell apart groups without an ablation's name."""
    text = json.dumps(config, sort_keys=True)
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def _config_name(runs: list[Run], config: dict[str, Any]) -> str:
    """The configuration part of the run directories' names, or a hash of the config."""
    matches = [SEED_SUFFIX.match(run.path.name) for run in runs]
    names = {match["configuration"] for match in matches if match}
    if len(names) == 1 and all(matches):
        return names.pop()
    return "config-" + _digest(config)


def _format_setting(key: str, value: Any) -> str:
    if key == "strategy":
        return " + ".join(value) or "naive"
    return f"{key}={value}"


# Settings config.json gained after runs were already on disk, with the default those runs had
# (kept here, not read from RunConfig, so that a report need not import torch; a test checks
# that they are RunConfig's defaults).
ADDED_SETTINGS = {"precision": "fp32", "eval_on": "all", "eval_tokens": 4096,
                  "val_fraction": 0.0}


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs grouped by configuration (config.json minus the seed), in first-seen order."""
    groups: dict[str, Group] = {}
    for run in runs:
        # A setting newer than a run's cl had its default there: such runs pool with new ones.
        config = {**ADDED_SETTINGS, **run.config}
        config.pop("seed", None)
        key = json.dumps(config, sort_keys=True)
        if key not in groups:
            groups[key] = Group("", "", config)
        group = groups[key]
        if any(other.seed == run.seed for other in group.runs):
            group.duplicates.append(run)
        else:
            group.runs.append(run)
    result = list(groups.values())
    # A label names what differs between the groups (always the strategy when it is one).
    keys = sorted({key for group in result for key in group.config})
    differing = [key for key in keys
                 if len({json.dumps(group.config.get(key)) for group in result}) > 1]
    if "strategy" in differing:
        differing = ["strategy"] + [key for key in differing if key != "strategy"]
    for group in result:
        group.runs.sort(key=lambda run: run.seed)
        group.name = _config_name(group.runs, group.config)
        shown = differing or ["strategy"]
        group.label = ", ".join(_format_setting(key, group.config.get(key)) for key in shown)
    names = [group.name for group in result]
    for group in result:
        if names.count(group.name) > 1:  # e.g. one name reused with changed settings
            group.name += "-" + _digest(group.config)
    for group in result:
        group.variants = _variant_groups(group)
    return result


def _variant_groups(group: Group) -> list[Group]:
    """A group per extra evaluation the group's runs recorded (EMA's live weights): the same
    runs, seen through that evaluation's accuracies."""
    groups: dict[str, Group] = {}  # by variant, in first-seen order
    for run in group.runs:
        for variant in run.metrics.get("variants", {}):
            if variant not in groups:
                label = f"{group.label} [{VARIANT_LABELS.get(variant, variant)}]"
                groups[variant] = Group(f"{group.name}-{variant}", label, group.config,
                                        variant=variant)
            groups[variant].runs.append(replace(run, variant=variant))
    return list(groups.values())


def with_variants(groups: Sequence[Group]) -> list[Group]:
    """Every group followed by its variants' groups: the rows of the summary."""
    return [shown for group in groups for shown in (group, *group.variants)]


def summarize(groups: Sequence[Group]) -> list[dict[str, Any]]:
    """One row per group and variant: name, label, seeds, and each metric's Stat (accuracies
    in percent)."""
    rows = []
    for group in with_variants(groups):
        row: dict[str, Any] = {"name": group.name, "label": group.label,
                               "seeds": [run.seed for run in group.runs]}
        for key, _, percent in METRICS:
            values = group.values(key) * (100 if percent else 1)
            row[key] = describe(values)
        rows.append(row)
    return rows


def select_group(groups: Sequence[Group], query: str) -> Group:
    """The group named or labelled `query`, else the only one whose name starts with it,
    else the only one whose name or label contains it; the groups' variants (whose names
    extend their group's) are looked at only when no group matches, so "ema" stays the EMA
    configuration rather than also matching its live weights."""
    for candidates in (list(groups), [variant for group in groups for variant in group.variants]):
        for matches in ([g for g in candidates if query in (g.name, g.label)],
                        [g for g in candidates if g.name.startswith(query)],
                        [g for g in candidates if query in g.name or query in g.label]):
            if len(matches) == 1:
                return matches[0]
            if len(matches) > 1:
                raise UsageError(f"{query!r} matches {len(matches)} configurations: "
                                 f"{', '.join(group.name for group in matches)}; "
                                 "give more of a name")
    raise UsageError(f"no configuration matches {query!r} (known: "
                     f"{', '.join(group.name for group in with_variants(groups))})")


def comparisons(groups: Sequence[Group], pairs: Sequence[tuple[str, str]] | None = None,
                limit: int = 8) -> list[Paired]:
    """Paired comparisons: the pairs asked for, else every pair when there are few groups."""
    if pairs:
        chosen = [(select_group(groups, a), select_group(groups, b)) for a, b in pairs]
    elif len(groups) <= limit:
        chosen = [(groups[i], groups[j]) for i in range(len(groups))
                  for j in range(i + 1, len(groups))]
    else:
        chosen = []
    return [paired(a, b, metric) for a, b in chosen for metric in COMPARED]


# Figures -------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _mean_matrix(group: Group) -> np.ndarray:
    return np.mean([np.asarray(run.measured["accuracy_matrix"], dtype=float)
                    for run in group.runs], axis=0)


def _seeds_note(group: Group) -> str:
    count = len(group.runs)
    return "1 seed" if count == 1 else f"mean of {count} seeds"


def plot_matrix(group: Group):
    """The accuracy matrix R as a heatmap: row i after training task i, column j task j.

    An entry not evaluated (null in metrics.json) is a blank cell without a number."""
    matrix = 100 * _mean_matrix(group)
    names = group.runs[0].metrics["task_names"]
    rows = ["joint"] if group.runs[0].metrics.get("joint") else names
    figure = _figure(1.2 + 0.75 * len(names), 1.0 + 0.6 * len(rows))
    axes = figure.subplots()
    image = axes.imshow(matrix, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(matrix):
        if math.isnan(value):  # not evaluated: the cell stays blank
            continue
        axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8,
                  color="white" if value < 60 else "black")
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(rows)), rows, fontsize=8)
    axes.set_xlabel("task evaluated")
    axes.set_ylabel("after training on")
    axes.set_title(f"{group.label}\naccuracy (%), {_seeds_note(group)}", fontsize=9)
    figure.colorbar(image, ax=axes, shrink=0.8)
    return figure


def plot_tasks(group: Group):
    """Each task's accuracy after each training task: the forgetting picture."""
    matrices = 100 * np.array([run.measured["accuracy_matrix"] for run in group.runs],
                              dtype=float)
    mean, spread = matrices.mean(axis=0), matrices.std(axis=0)
    names = group.runs[0].metrics["task_names"]
    figure = _figure(6.0, 3.6)
    axes = figure.subplots()
    after = np.arange(mean.shape[0])
    for task, name in enumerate(names):
        shown = after >= task  # from the moment the task is trained
        axes.plot(after[shown], mean[shown, task], marker="o", label=name)
        axes.fill_between(after[shown], (mean - spread)[shown, task],
                          (mean + spread)[shown, task], alpha=0.15)
    axes.set_xticks(after, [f"after {name}" for name in names][:len(after)], rotation=30,
                    ha="right", fontsize=8)
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"{group.label}\naccuracy of each task over the stream "
                   f"({_seeds_note(group)}, band: ±1 std)", fontsize=9)
    axes.legend(fontsize=7, ncols=2)
    return figure


def _curve(run: Run) -> tuple[np.ndarray, np.ndarray, list[int]]:
    curve = run.metrics["curve"]
    accuracy = np.array([[math.nan if value is None else value for value in row]
                         for row in curve["accuracy"]], dtype=float)
    # Shaped even without evaluations, when the list above has no rows to give it a width.
    accuracy = accuracy.reshape(len(curve["steps"]), len(run.metrics["task_names"]))
    return np.asarray(curve["steps"]), 100 * accuracy, list(curve["task_end_steps"])


def plot_curve(group: Group):
    """The continual-evaluation curve: each task's accuracy at every evaluation, task ends
    marked; the dips right after a boundary are the stability gap."""
    steps, accuracy, ends = _curve(group.runs[0])
    curves = [_curve(run) for run in group.runs]
    same_steps = all(np.array_equal(other[0], steps) for other in curves)
    if same_steps:  # the seeds evaluated the same tasks at the same steps: average them
        accuracy = np.mean(np.stack([other[1] for other in curves]), axis=0)
    names = group.runs[0].metrics["task_names"]
    figure = _figure(6.5, 3.6)
    axes = figure.subplots()
    for task, name in enumerate(names):
        # A task is drawn from its own training on: before it, it is only the zeros of a
        # class-incremental head that has not met its classes.
        shown = steps > ends[task - 1] if 0 < task <= len(ends) else np.ones_like(steps, bool)
        axes.plot(steps[shown], accuracy[shown, task], marker="." if len(steps) < 60 else None,
                  linewidth=1.2, label=name)
    for end in ends[:-1]:
        axes.axvline(end, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("training step (dashed: end of a task)")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    note = _seeds_note(group) if same_steps else "seed " + str(group.runs[0].seed)
    axes.set_title(f"{group.label}\ncontinual evaluation ({note})", fontsize=9)
    axes.legend(fontsize=7, ncols=2)
    return figure


def plot_bars(rows: Sequence[dict[str, Any]]):
    """ACC and forgetting of every row of the summary, with 95% confidence intervals."""
    shown = [("acc", "ACC (%)"), ("forgetting", "forgetting (%)")]
    height = 1.0 + 0.45 * len(rows)
    figure = _figure(9.0, max(2.4, height))
    panels = figure.subplots(1, len(shown), sharey=True)
    positions = np.arange(len(rows))
    for axes, (key, title) in zip(panels, shown, strict=True):
        means = [row[key].mean for row in rows]
        errors = [0 if math.isnan(row[key].half_width) else row[key].half_width for row in rows]
        axes.barh(positions, means, xerr=errors, capsize=4, color="tab:blue", alpha=0.8)
        for position, mean in zip(positions, means, strict=True):
            if not math.isnan(mean):
                axes.text(mean, position, f" {mean:.1f}", va="bottom", fontsize=7)
        axes.set_xlabel(title + ", 95% CI")
        axes.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(positions, [row["label"] for row in rows], fontsize=8)
    panels[0].invert_yaxis()
    seeds = sorted({len(row["seeds"]) for row in rows})
    figure.suptitle(f"configurations over {'/'.join(map(str, seeds))} seeds", fontsize=9)
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# Tables --------------------------------------------------------------------------------


def _cell(stat: Stat, decimals: int = 2) -> str:
    if stat.n == 0:
        return "-"
    if math.isnan(stat.half_width):
        return f"{stat.mean:.{decimals}f}"
    return f"{stat.mean:.{decimals}f} ± {stat.half_width:.{decimals}f}"


def _decimals(key: str) -> int:
    return {"peak_rss_mb": 0, "time_seconds": 1}.get(key, 2)


def summary_table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The summary as header and string cells: mean ± 95% CI half-width."""
    header = ["configuration", "seeds", *(title for _, title, _ in METRICS)]
    cells = [[row["label"], str(len(row["seeds"])),
              *(_cell(row[key], _decimals(key)) for key, _, _ in METRICS)] for row in rows]
    return header, cells


def paired_table(results: Sequence[Paired], groups: Sequence[Group]
                 ) -> tuple[list[str], list[list[str]]]:
    """One row per compared pair: B minus A of each compared metric, its 95% CI and p."""
    labels = {group.name: group.label for group in with_variants(groups)}
    titles = {key: title for key, title, _ in METRICS}
    header = ["B", "minus A", "seeds", *(f"Δ{titles[key]} [95% CI], p" for key in COMPARED)]
    rows: dict[tuple[str, str], list[str]] = {}
    for result in results:
        row = rows.setdefault((result.a, result.b), [labels[result.b], labels[result.a],
                                                     str(result.diff.n)])
        diff = result.diff
        if diff.n == 0:
            row.append("-")
            continue
        text = f"{100 * diff.mean:+.2f}"
        if not math.isnan(diff.ci_low):
            text += f" [{100 * diff.ci_low:+.2f}, {100 * diff.ci_high:+.2f}]"
        if not math.isnan(result.p_value):
            text += f", p={result.p_value:.3f}"
        row.append(text)
    return header, list(rows.values())


def _markdown_table(header: list[str], cells: list[list[str]]) -> str:
    def line(items):
        return "| " + " | ".join(item.replace("|", "\\|") for item in items) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, cells)])


def _html_table(header: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(item)}</th>" for item in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(item)}</td>" for item in row) + "</tr>"
                   for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# Writing -------------------------------------------------------------------------------


SELECT_ON = ("none", "val")


# The settings that make runs comparable at all: a selection never lets runs of different data,
# streams or models compete (cl.experiment.DATA_KEYS without the seed; a test checks).
COMPARABLE_KEYS = ("tasks", "scenario", "num_tasks", "classes_per_task", "class_order", "data",
                   "train_per_task", "test_per_task", "val_fraction", "model", "hidden", "init")


def method_of(config: dict[str, Any]) -> str:
    """What `--select-on` chooses among: the strategies' names in their order with their
    settings left out, but for a buffer's `capacity` (a memory budget, not a setting to tune),
    and a joint run apart; so `ema:decay=0.99` and `ema:decay=0.999` compete, as do two
    learning rates."""
    names = []
    for spec in config.get("strategy") or []:
        name, _, settings = spec.partition(":")
        capacity = [item for item in settings.split(",") if item.startswith("capacity=")]
        names.append(f"{name}({capacity[0]})" if capacity else name)
    return ("joint " if config.get("joint") else "") + (" + ".join(names) or "naive")


def selection_key(config: dict[str, Any]) -> str:
    """The method and the settings that must match for two configurations to compete."""
    return json.dumps([method_of(config), *(config.get(key) for key in COMPARABLE_KEYS)])


@dataclass(frozen=True)
class Selection:
    """The configuration chosen for one method, and what it was chosen among."""

    method: str
    chosen: str  # the chosen group's name
    validation_acc: float  # its mean final ACC on the validation rows, in [0, 1]
    candidates: tuple[tuple[str, float], ...]  # (group name, mean validation ACC), all of them


def validation_acc(group: Group) -> float:
    """The group's mean final ACC on its runs' validation rows; a run without them is one
    line naming it."""
    values = []
    for run in group.runs:
        validation = run.metrics.get("variants", {}).get("validation")
        if validation is None or validation.get("acc") is None:
            raise UsageError(f"--select-on val: run {run.path} has no validation matrix "
                             "(run it with --val-fraction F)")
        values.append(float(validation["acc"]))
    return float(np.mean(values))


def select_on_validation(groups: Sequence[Group]) -> tuple[list[Group], list[Selection]]:
    """Per method (`method_of`) on the same data and model (`COMPARABLE_KEYS`), the group with
    the best mean validation ACC (the first one on a tie): the groups kept, in their order, and
    what was chosen among what."""
    by_method: dict[str, list[tuple[Group, float]]] = {}
    for group in groups:
        by_method.setdefault(selection_key(group.config), []).append(
            (group, validation_acc(group)))
    selections, kept = [], set()
    for scored in by_method.values():
        best, score = max(scored, key=lambda pair: pair[1])  # max keeps the first of equals
        kept.add(id(best))
        selections.append(Selection(method_of(best.config), best.name, score,
                                     tuple((group.name, value) for group, value in scored)))
    return [group for group in groups if id(group) in kept], selections


@dataclass
class Report:
    groups: list[Group]
    rows: list[dict[str, Any]]
    comparisons: list[Paired]
    found: Found
    files: list[Path] = field(default_factory=list)
    selections: list[Selection] = field(default_factory=list)  # with --select-on val


def build_report(directories: Sequence[str | Path],
                 pairs: Sequence[tuple[str, str]] | None = None,
                 select_on: str = "none") -> Report:
    """Read, group, summarize and compare the runs under `directories`; with `select_on` "val",
    only the configuration with the best validation ACC of each method is kept (its test
    numbers are what the tables show)."""
    if select_on not in SELECT_ON:
        raise UsageError(f"--select-on must be one of {', '.join(SELECT_ON)}, got {select_on!r}")
    found = find_runs(directories)
    if not found.runs:
        where = ", ".join(str(directory) for directory in directories)
        message = f"no finished runs (directories with metrics.json) under {where}"
        if found.failed:  # an unreadable metrics.json would otherwise look like no run at all
            path, error = found.failed[0]
            message += (f"; {len(found.failed)} failed or unreadable, the first: {path.name}: "
                        + " ".join(str(error).split()))
        raise UsageError(message)
    groups = group_runs(found.runs)
    selections: list[Selection] = []
    if select_on == "val":
        groups, selections = select_on_validation(groups)
    return Report(groups, summarize(groups), comparisons(groups, pairs), found,
                  selections=selections)


def _csv_text(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = [f"{key}_{part}" for key, _, _ in METRICS
               for part in ("mean", "std", "ci_low", "ci_high")]
    writer.writerow(["configuration", "label", "seeds", "n", *columns])
    for row in report.rows:
        values = []
        for key, _, _ in METRICS:
            stat = row[key]
            values += ["" if math.isnan(x) else repr(x)
                       for x in (stat.mean, stat.std, stat.ci_low, stat.ci_high)]
        writer.writerow([row["name"], row["label"], " ".join(map(str, row["seeds"])),
                         len(row["seeds"]), *values])
    return buffer.getvalue()


def _json_data(report: Report, figures: list[str]) -> dict[str, Any]:
    """The summary and comparisons as plain data (accuracies in percent, NaN as null), and
    the figure files (so that the next report over this one knows which are its own)."""

    def stat(value: Stat) -> dict[str, float | int]:
        return {"n": value.n, "mean": value.mean, "std": value.std,
                "ci_low": value.ci_low, "ci_high": value.ci_high}

    configurations = [{"name": row["name"], "label": row["label"], "variant": group.variant,
                       "seeds": row["seeds"], "runs": [str(run.path) for run in group.runs],
                       **{key: stat(row[key]) for key, _, _ in METRICS}}
                      for row, group in zip(report.rows, with_variants(report.groups),
                                            strict=True)]
    comparisons = [{"a": result.a, "b": result.b, "metric": result.metric,
                    "seeds": list(result.seeds), "p_value": result.p_value,
                    "difference": stat(Stat(result.diff.n, *(100 * x for x in (
                        result.diff.mean, result.diff.std, result.diff.ci_low,
                        result.diff.ci_high))))}
                   for result in report.comparisons]
    found = report.found
    selections = [{"method": chosen.method, "chosen": chosen.chosen,
                   "validation_acc": 100 * chosen.validation_acc,
                   "candidates": [{"name": name, "validation_acc": 100 * value}
                                  for name, value in chosen.candidates]}
                  for chosen in report.selections]
    return {"configurations": configurations, "comparisons": comparisons,
            "selected_on_validation": selections,
            "duplicates": [str(run.path) for group in report.groups for run in group.duplicates],
            "unfinished": [str(path) for path in found.unfinished],
            "failed": [{"run": str(path), "error": error} for path, error in found.failed],
            "figures": figures}


def _earlier_figures(out: Path) -> list[str]:
    """The figure files an earlier report in `out` wrote, as its report.json lists them."""
    try:
        earlier = json.loads((out / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    names = earlier.get("figures") if isinstance(earlier, dict) else None
    if not isinstance(names, list):  # not a report's, or one from before figures were listed
        return []
    # Only bare PNG names: a list edited to name another file must not get it deleted.
    return [name for name in names
            if isinstance(name, str) and name.endswith(".png") and Path(name).name == name]


def write_report(report: Report, out: str | Path, html_page: bool = False) -> list[Path]:
    """Write report.md, report.csv, report.json, figures/*.png (and report.html); return the
    paths.

    Every file goes through a temporary file and a rename: an interrupted report never
    leaves a file that looks whole. The files of an earlier report in `out` that this one
    does not write (its report.html, figures of configurations gone) are removed, so that no
    stale page or figure sits beside the new tables.
    """
    from cl.store import atomic_write, atomic_write_bytes, write_json

    out = Path(out)
    figures_dir = out / "figures"
    earlier_figures = _earlier_figures(out)  # read before report.json is replaced
    figures_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str, bytes]] = []  # (file name, caption, png)
    figures.append(("configurations.png", "ACC and forgetting per configuration (95% CI)",
                    _png(plot_bars(report.rows))))
    for group in with_variants(report.groups):
        figures.append((f"{group.name}-matrix.png", f"{group.label}: accuracy matrix",
                        _png(plot_matrix(group))))
        if not group.runs[0].metrics.get("joint"):
            figures.append((f"{group.name}-tasks.png", f"{group.label}: accuracy per task",
                            _png(plot_tasks(group))))
            if group.variant is None:  # a variant is measured after each task only: no curve
                figures.append((f"{group.name}-curve.png",
                                f"{group.label}: continual evaluation", _png(plot_curve(group))))
    written = []
    for name, _, png in figures:
        atomic_write_bytes(figures_dir / name, png)
        written.append(figures_dir / name)

    summary = summary_table(report.rows)
    pairs = paired_table(report.comparisons, report.groups)
    found = report.found
    notes = [f"{len(found.runs)} finished runs in {len(report.groups)} configurations."]
    duplicates = [run for group in report.groups for run in group.duplicates]
    if duplicates:
        notes.append(f"{len(duplicates)} runs repeat a seed of their configuration and are "
                     "left out: " + ", ".join(str(run.path) for run in duplicates) + ".")
    if found.unfinished:
        notes.append(f"{len(found.unfinished)} unfinished runs left out: "
                     + ", ".join(path.name for path in found.unfinished) + ".")
    if found.failed:
        notes.append(f"{len(found.failed)} failed runs left out: "
                     + "; ".join(f"{path.name} ({error})" for path, error in found.failed) + ".")
    explanation = ("Cells are the mean ± the half-width of the 95% confidence interval "
                   "(Student's t over seeds); accuracies in %, time is train + eval seconds, "
                   "peak memory is the run process's resident set.")
    names = "\n".join(f"- `{group.name}`: {group.label} (seeds "
                      f"{', '.join(str(run.seed) for run in group.runs)})"
                      for group in with_variants(report.groups))
    markdown = ["# Report", "", " ".join(notes), "", explanation, "",
                _markdown_table(*summary), "", "Configurations:", "", names, ""]
    if report.selections:
        markdown += ["## Chosen on validation", "",
                     "Per method, the configuration with the best mean final ACC on the rows "
                     "held out of each task's training data (--val-fraction); the tables above "
                     "show its test numbers.", "",
                     _markdown_table(["method", "chosen", "validation ACC", "among"],
                                     [[chosen.method, chosen.chosen,
                                       f"{100 * chosen.validation_acc:.2f}",
                                       ", ".join(f"{name} ({100 * value:.2f})"
                                                 for name, value in chosen.candidates)]
                                      for chosen in report.selections]), ""]
    if report.comparisons:
        markdown += ["## Paired comparisons", "",
                     "B minus A on the seeds both ran (percentage points); p from a paired "
                     "t-test.", "", _markdown_table(*pairs), ""]
    markdown += ["## Figures", ""]
    markdown += [f"![{caption}](figures/{name})\n" for name, caption, _ in figures]
    atomic_write(out / "report.md", "\n".join(markdown))
    atomic_write(out / "report.csv", _csv_text(report))
    figure_names = [name for name, _, _ in figures]
    write_json(out / "report.json", _json_data(report, figure_names))
    written += [out / "report.md", out / "report.csv", out / "report.json"]

    if html_page:
        images = "".join(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}"><figcaption>{html.escape(caption)}'
            "</figcaption></figure>" for _, caption, png in figures)
        comparison = ("<h2>Paired comparisons</h2><p>B minus A on the seeds both ran "
                      "(percentage points); p from a paired t-test.</p>" + _html_table(*pairs)
                      if report.comparisons else "")
        page = (
            "<!DOCTYPE html><html><head><meta charset='utf-8'><title>cl report</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
            "figure{margin:1.5em 0}</style></head><body><h1>Report</h1>"
            f"<p>{html.escape(' '.join(notes))}</p><p>{html.escape(explanation)}</p>"
            f"{_html_table(*summary)}{comparison}<h2>Figures</h2>{images}</body></html>\n")
        atomic_write(out / "report.html", page)
        written.append(out / "report.html")
    else:  # an earlier report's page would show other numbers than these tables
        (out / "report.html").unlink(missing_ok=True)
    for name in set(earlier_figures) - set(figure_names):
        (figures_dir / name).unlink(missing_ok=True)
    report.files = written
    return written
