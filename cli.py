"""The `cl` command line: `cl run` trains over a task stream, `cl list` shows what is installed.

This module owns the console: tables, progress bars and error lines. Heavy packages (torch,
datasets) load inside the commands that need them, so `cl --help` answers at once. Every
deliberate error is one line on stderr and a non-zero exit (2 for bad input).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="cl",
    help="Continual learning: train one model over a stream of tasks and measure what it forgets.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

Opt = typer.Option


@app.callback()
def configure(verbose: Annotated[int, Opt("--verbose", "-v", count=True,
                                         help="More log lines (-v: info, -vv: debug).")] = 0
              ) -> None:
    """Continual learning: train one model over a stream of tasks and measure what it forgets."""
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    # The console is cl's: the Hugging Face libraries' own progress bars and advice stay off
    # unless asked for with -vv.
    if verbose < 2:
        for variable, value in (("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
                                ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
                                ("TRANSFORMERS_VERBOSITY", "error"),
                                ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
            os.environ.setdefault(variable, value)


@app.command("run")
def run_command(
    tasks: Annotated[str | None, Opt(help="Task stream, e.g. split-digits, split-mnist, "
                                        "permuted-mnist, or name:key=value,... [split-digits]")
                     ] = None,
    scenario: Annotated[str | None, Opt(help="class, task or domain [the stream's own]")] = None,
    num_tasks: Annotated[str | None, Opt(metavar="INT", help="Number of tasks [the stream's own]")
                         ] = None,
    classes_per_task: Annotated[str | None, Opt(metavar="INT", help="Classes per task [2]")] = None,
    class_order: Annotated[str | None, Opt(help="natural, shuffle, or ids '3,1,2,...'")
                           ] = None,
    data: Annotated[str | None, Opt(help="Data file or directory, or a hub dataset name")
                    ] = None,
    train_per_task: Annotated[str | None, Opt(metavar="INT",
                                              help="Cap each task's training rows (seeded, "
                                              "stratified by class) [all]")] = None,
    test_per_task: Annotated[str | None, Opt(metavar="INT",
                                             help="Cap each task's test rows (seeded, "
                                             "stratified by class) [all]")] = None,
    val_fraction: Annotated[str | None, Opt(metavar="FLOAT",
                                            help="Hold out this fraction of each task's "
                                            "training rows (seeded, stratified) and record "
                                            "their accuracy matrix too [0]")] = None,
    model: Annotated[str | None, Opt(help="Model: mlp, cnn, minilm (text), or "
                                          "hf:<name-or-path> (a text or image "
                                          "classifier) [mlp]")] = None,
    hidden: Annotated[str | None, Opt(metavar="SIZES",
                                      help="Hidden sizes, e.g. 400,400 [the model's own]")
                      ] = None,
    init: Annotated[str | None, Opt(help="Weight init: default or xavier")] = None,
    optimizer: Annotated[str | None, Opt(help="sgd, adam or adamw [sgd]")] = None,
    lr: Annotated[str | None, Opt(metavar="FLOAT", help="Learning rate [0.1]")] = None,
    momentum: Annotated[str | None, Opt(metavar="FLOAT", help="SGD momentum [0]")] = None,
    weight_decay: Annotated[str | None, Opt(metavar="FLOAT", help="Weight decay [0]")] = None,
    batch_size: Annotated[str | None, Opt(metavar="INT", help="Batch size [32]")] = None,
    epochs: Annotated[str | None, Opt(metavar="INT", help="Epochs per task [5]")] = None,
    seed: Annotated[str | None, Opt(metavar="INT",
                                    help="Seed of the model, the data order and the stream [0]")
                    ] = None,
    eval_every: Annotated[str | None, Opt(metavar="INT",
                                          help="Evaluate the seen tasks every N steps (the "
                                          "stability-gap curve); 0: only after each task")
                          ] = None,
    eval_batch_size: Annotated[str | None, Opt(metavar="INT", help="Rows per evaluation "
                                               "forward pass [1024]")] = None,
    log_every: Annotated[str | None, Opt(metavar="INT", help="Steps per logged mean loss "
                                         "[50]")] = None,
    eval_on: Annotated[str | None, Opt(help="Tasks evaluated before training and after each "
                                       "task: all (R in full), seen (tasks trained so far), "
                                       "final (all, after the last task only) [all]")] = None,
    eval_tokens: Annotated[str | None, Opt(metavar="INT", help="Token budget of a text "
                                           "evaluation batch (rows by length) [4096]")] = None,
    device: Annotated[str | None, Opt(help="cpu, cuda, cuda:1, mps [cpu]")] = None,
    precision: Annotated[str | None, Opt(help="fp32, or bf16 (bfloat16 autocast) [fp32]")
                         ] = None,
    threads: Annotated[str | None, Opt(metavar="INT", help="Torch CPU threads, recorded in "
                                       "config.json [torch's own choice]")] = None,
    strategy: Annotated[list[str] | None, Opt(help="Strategy spec name or name:key=value,... "
                                                 "(repeatable; applied in the order given)")
                        ] = None,
    joint: Annotated[bool | None, Opt("--joint/--sequential",
                                         help="Train on all tasks at once (the upper bound)")
                     ] = None,
    config: Annotated[Path | None, Opt(help="TOML or JSON file of these settings; "
                                          "flags override it")] = None,
    out: Annotated[str | None, Opt(help="Run directory [runs/<stream>-<strategy>-...]")
                   ] = None,
    resume: Annotated[Path | None, Opt(metavar="DIR",
                                       help="Continue the unfinished run in DIR after its last "
                                       "finished task (settings from DIR/config.json)")] = None,
    log: Annotated[list[str] | None, Opt(help="Also log losses and evaluations as the run "
                                             "goes: csv (log.csv), tensorboard (tensorboard/); "
                                             "repeatable")] = None,
) -> None:
    """Train one model over a task stream; print the accuracy matrix and what it forgot."""
    from cl.errors import UsageError
    from cl.experiment import build, execute, make_config, read_config_file
    from cl.logs import check_log_formats
    from cl.store import MARKER, output_directory

    flags = {"tasks": tasks, "scenario": scenario, "num_tasks": num_tasks,
             "classes_per_task": classes_per_task, "class_order": class_order, "data": data,
             "train_per_task": train_per_task, "test_per_task": test_per_task,
             "val_fraction": val_fraction, "model": model, "hidden": hidden, "init": init,
             "optimizer": optimizer, "lr": lr,
             "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size,
             "epochs": epochs, "seed": seed, "eval_every": eval_every,
             "eval_batch_size": eval_batch_size, "log_every": log_every, "device": device,
             "eval_on": eval_on, "eval_tokens": eval_tokens, "precision": precision,
             "threads": threads, "strategy": strategy, "joint": joint}
    given = sorted(key for key, value in flags.items() if value is not None)
    if resume is not None:
        # A resumed run must be the run that was started: its settings come from its own file.
        if given or config is not None or out is not None:
            extra = (given or ["config" if config is not None else "out"])[0]
            raise UsageError(f"--resume takes every setting from {resume / 'config.json'}; "
                             f"drop --{extra.replace('_', '-')}")
        if not (resume / MARKER).is_file():
            raise UsageError(f"--resume {resume} is not a run directory cl made (no {MARKER})")
        if not (resume / "config.json").is_file():
            raise UsageError(f"--resume {resume}: no run there (no config.json)")
        config, out = resume / "config.json", resume
    if out is not None:
        out = output_directory(out, "--out")
    settings = read_config_file(config) if config is not None else {}
    settings.update({key: value for key, value in flags.items() if value is not None})
    run_config = make_config(settings, source="cl run")
    check_log_formats(log or ())
    built = build(run_config)

    console = _console()
    with _progress(console) as progress:
        task_bar = progress.add_task("training", total=None)
        num_tasks = len(built.stream.tasks)
        # Built once: the listener runs after every optimizer step.
        descriptions = (["training joint"] if built.config.joint else
                        [f"training task {index + 1}/{num_tasks}" for index in range(num_tasks)])

        def listener(event: dict) -> None:
            if event["event"] == "step":
                progress.update(task_bar, completed=event["step"], total=event["total_steps"],
                                description=descriptions[event["task"]])

        run_dir, metrics = execute(built.config, out, listener=listener, built=built,
                                   resume=resume is not None, logs=tuple(log or ()))
    _print_run(console, metrics, run_dir)


@app.command("ablate")
def ablate_command(
    spec: Annotated[Path, typer.Argument(help="TOML or JSON spec: seeds = [...], a [base] table "
                                              "of run settings, a [grid] table of lists")],
    out: Annotated[str | None, Opt(help="Directory of the runs [runs/<spec file name>]")
                   ] = None,
    workers: Annotated[int | None, Opt(help="Runs at once [the core count]")] = None,
    threads: Annotated[int | None, Opt(help="Torch threads per run [cores // workers]")] = None,
    executor: Annotated[str, Opt(help="process (local worker processes) or ray")] = "process",
    ray_address: Annotated[str | None, Opt(help="Ray cluster address, e.g. ray://head:10001 "
                                               "or auto [a local Ray]")] = None,
    gpus_per_run: Annotated[float | None, Opt(help="GPUs each Ray task claims [1 for a cuda "
                                                   "device, else 0]")] = None,
    retry_failed: Annotated[bool, Opt(help="Run again the runs that failed before")] = False,
    log: Annotated[list[str] | None, Opt(help="Also log each run's losses and evaluations: "
                                             "csv, tensorboard (repeatable)")] = None,
    dry_run: Annotated[bool, Opt(help="List the runs and what would happen, run nothing")
                       ] = False,
) -> None:
    """Run every combination of a grid of settings over seeds, in parallel; resumable."""
    from cl.ablation import ablate, expand, read_spec
    from cl.store import output_directory, run_status

    out = output_directory(out, "--out") if out is not None else Path("runs") / spec.stem
    parsed = read_spec(spec)
    jobs = expand(parsed, out)
    console = _console()
    if dry_run:
        for job in jobs:
            console.print(f"{run_status(job.run_dir):8} {job.run_dir}", soft_wrap=True)
        console.print(f"{len(jobs)} runs ({len(jobs) // len(parsed.seeds)} configurations x "
                      f"{len(parsed.seeds)} seeds)", soft_wrap=True)
        return
    with _progress(console) as progress:
        bar = progress.add_task("runs", total=len(jobs))
        running: set[str] = set()

        def on_plan(before, to_run) -> None:
            progress.update(bar, completed=len(before),
                            description=f"runs ({len(before)} done or failed before)")

        def on_start(job) -> None:
            running.add(job.name)
            progress.update(bar, description=f"runs ({len(running)} running)")

        def on_finish(outcome) -> None:
            running.discard(outcome.job.name)
            progress.update(bar, advance=1, description=f"runs ({len(running)} running)")
            if outcome.status == "failed" and console.is_terminal:  # listed at the end too
                console.print(f"failed: {outcome.job.name}: {outcome.error}", soft_wrap=True)

        outcomes = ablate(jobs, out, parsed, executor=executor, workers=workers,
                          threads=threads, retry_failed=retry_failed, logs=tuple(log or ()),
                          ray_address=ray_address, gpus_per_run=gpus_per_run,
                          on_plan=on_plan, on_start=on_start, on_finish=on_finish)
    counts = {status: sum(o.status == status for o in outcomes)
              for status in ("done", "skipped", "failed", "busy")}
    busy = f", {counts['busy']} held by another process" if counts["busy"] else ""
    console.print(f"{len(outcomes)} runs in {out}: {counts['done']} finished now, "
                  f"{counts['skipped']} done before, {counts['failed']} failed{busy}",
                  soft_wrap=True)
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        # On stderr, as every error: a script that keeps only stdout still learns what failed.
        for outcome in failed:
            print(f"failed: {outcome.job.name}: {outcome.error}", file=sys.stderr)
        print(f"error: {len(failed)} of {len(outcomes)} runs failed (each run's error.json has "
              f"its traceback); rerun them with cl ablate {spec} --out {out} --retry-failed",
              file=sys.stderr)
        raise typer.Exit(1)
    console.print(f"report: cl report {out}", soft_wrap=True)


@app.command("report")
def report_command(
    directories: Annotated[list[Path], typer.Argument(help="Run directories, or directories "
                                                           "holding runs (searched below)")],
    out: Annotated[str | None, Opt(help="Where to write the report [DIR/report for one DIR]")
                   ] = None,
    html: Annotated[bool, Opt("--html", help="Also write report.html, one self-contained page")
                    ] = False,
    compare: Annotated[list[str] | None, Opt(metavar="A,B",
                                             help="Compare configuration B with A seed by seed "
                                             "(names or unique parts of them; repeatable) "
                                             "[every pair, up to 8 configurations]")] = None,
    select_on: Annotated[str, Opt(help="none, or val: per method (its strategies' names), keep "
                                       "only the configuration with the best validation ACC "
                                       "(runs made with --val-fraction) and report its test "
                                       "numbers")] = "none",
) -> None:
    """Tables (mean, std, 95% CI over seeds), paired comparisons and figures of many runs."""
    from rich.markup import escape
    from rich.table import Table

    from cl.errors import UsageError
    from cl.report import build_report, paired_table, summary_table, write_report
    from cl.store import output_directory

    pairs = []
    for item in compare or []:
        parts = [part.strip() for part in item.split(",")]
        if len(parts) != 2 or not all(parts):
            raise UsageError(f"--compare takes two configurations as A,B, got {item!r}")
        pairs.append((parts[0], parts[1]))
    if out is None:
        if len(directories) != 1:
            raise UsageError("with several directories, say where the report goes: --out DIR")
        out = directories[0] / "report"
    out = output_directory(out, "--out")
    report = build_report(directories, pairs, select_on)
    files = write_report(report, out, html_page=html)

    console = _console(wide=True)
    header, cells = summary_table(report.rows)
    counted = sum(len(group.runs) for group in report.groups)
    table = Table(title=f"{counted} runs, mean ± 95% CI over seeds "
                        "(accuracies in %)", title_justify="left")
    for index, title in enumerate(header):
        table.add_column(title, justify="left" if index == 0 else "right")
    for row in cells:
        table.add_row(*map(escape, row))  # labels such as '... [live weights]'
    console.print(table)
    if report.selections:
        table = Table(title="Chosen on validation (mean final ACC on the held-out rows, %)",
                      title_justify="left")
        for title in ("method", "chosen", "validation ACC", "among"):
            table.add_column(title)
        for chosen in report.selections:
            table.add_row(escape(chosen.method), escape(chosen.chosen),
                          f"{100 * chosen.validation_acc:.2f}", str(len(chosen.candidates)))
        console.print(table)
    if report.comparisons:
        header, cells = paired_table(report.comparisons, report.groups)
        table = Table(title="Paired: B minus A on shared seeds (points)", title_justify="left")
        for index, title in enumerate(header):
            table.add_column(title, justify="left" if index < 2 else "right")
        for row in cells:
            table.add_row(*map(escape, row))
        console.print(table)
    found = report.found
    duplicates = sum(len(group.duplicates) for group in report.groups)
    if found.unfinished or found.failed or duplicates:
        console.print(f"left out: {len(found.unfinished)} unfinished, {len(found.failed)} failed "
                      f"and {duplicates} repeated runs (listed in report.md)", soft_wrap=True)
    console.print(f"wrote {len(files)} files to {out}: report.md, report.csv, report.json"
                  f"{', report.html' if html else ''}, figures/", soft_wrap=True)


@app.command("list")
def list_command() -> None:
    """Show the task streams, strategies and models cl knows (built-in and installed)."""
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    from cl import registry
    from cl.errors import ClError

    console = _console()
    kinds = (("stream", "Task streams (--tasks)"),
             ("strategy", "Strategies (--strategy name:key=value,...)"),
             ("model", "Models (--model)"))
    for kind, title in kinds:
        table = Table(title=title, title_justify="left", show_header=False, box=None)
        for name in registry.names(kind):
            # A plugin that fails to load is listed as such: the rest of the listing still helps.
            try:
                description = registry.describe_entry(kind, name)
                settings = registry.strategy_settings(name) if kind == "strategy" else ()
            except ClError as error:
                description, settings = f"(not loadable: {error})", ()
            # Text, not markup: docstrings and annotations hold brackets (`tuple[str, ...]`).
            table.add_row(Text(name), Text(description))
            for setting in settings:
                table.add_row("", Padding(Text(_setting_line(setting)), (0, 0, 0, 2)))
        console.print(table)
        console.print()


def _console(wide: bool = False):
    """The console; `wide` tables get 160 columns when the output is not a terminal."""
    from rich.console import Console

    console = Console(highlight=False)
    if wide and not console.is_terminal:
        console = Console(highlight=False, width=160)
    return console


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


def _fmt(value: Any, percent: bool = True) -> str:
    """A figure for the console; "-" where there is none (a task not evaluated is NaN)."""
    if value is None or value != value:
        return "-"
    return f"{100 * value:.2f}" if percent else f"{value:.3f}"


def _print_run(console, metrics: dict, run_dir: Path) -> None:
    """The accuracy matrix (rows: after training task i; columns: task j) and the metrics."""
    from rich.table import Table

    names = metrics["task_names"]
    matrix = Table(title=f"Accuracy (%), {metrics['stream']}, {metrics['scenario']}-incremental",
                   caption="row: after training on; column: task evaluated",
                   title_justify="left", caption_justify="left")
    matrix.add_column("after")
    for index in range(len(names)):
        matrix.add_column(f"T{index}", justify="right")
    matrix.add_row("initial", *(_fmt(a) for a in metrics["initial_accuracy"]))
    row_names = ["joint"] if metrics["joint"] else [f"T{i} {name}" for i, name in enumerate(names)]
    for name, row in zip(row_names, metrics["accuracy_matrix"], strict=True):
        matrix.add_row(name, *(_fmt(a) for a in row))
    console.print(matrix)

    summary = Table(title="Metrics (%)", title_justify="left")
    summary.add_column("metric")
    # Every matrix of the run, each measured at the same points: R itself, a class-IL run's
    # task-IL view of it (logits masked per task), and the variants a strategy asked for
    # (EMA's eval_with=both: the live weights beside the average).
    columns = [(f"{metrics['scenario']}-IL", metrics)]
    if metrics.get("task_il") is not None:
        columns.append(("task-IL", metrics["task_il"]))
    for name, variant in metrics.get("variants", {}).items():
        columns.append((f"{metrics['scenario']}-IL, {name}", variant))
        if variant.get("task_il") is not None:
            columns.append((f"task-IL, {name}", variant["task_il"]))
    for title, _ in columns:
        summary.add_column(title, justify="right")
    for title, key in (("ACC (final average)", "acc"), ("BWT", "bwt"), ("FWT", "fwt"),
                       ("Forgetting", "forgetting"), ("Learning accuracy", "learning_accuracy"),
                       ("min-ACC", "min_acc"), ("WC-ACC", "wc_acc")):
        summary.add_row(title, *(_fmt(values.get(key)) for _, values in columns))
    console.print(summary)
    console.print(f"train {metrics['train_seconds']:.2f} s, eval {metrics['eval_seconds']:.2f} s, "
                  f"peak memory {metrics['peak_rss_mb']:.0f} MiB, "
                  f"{metrics['trainable_parameters']:,} trainable parameters")
    console.print(f"run saved in {run_dir}")


def _typer_errors() -> tuple[type, ...]:
    """The exception bases of bad command lines: typer's own (>= 0.29 vendors click) or click's."""
    import click

    return tuple(c for c in (getattr(typer, "TyperException", None), click.ClickException) if c)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; turn deliberate errors into one line and an exit code."""
    import signal
    import threading

    from cl.errors import ClError, out_of_memory

    command = typer.main.get_command(app)
    if threading.current_thread() is threading.main_thread():
        # A polite kill (SIGTERM) ends a command as Ctrl-C does: one line and no run that looks
        # finished; an ablation's workers stop too and their runs resume next time.
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        # Outside standalone mode typer returns the code of a `typer.Exit` instead of exiting,
        # and turns Ctrl-C into the code 130.
        code = command.main(args=argv, prog_name="cl", standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        if isinstance(code, int) and code != 0:
            sys.exit(code)
    except typer.Exit as stop:
        sys.exit(stop.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        if threading.current_thread() is threading.main_thread():
            # Deaf to a second Ctrl-C while the interpreter shuts down: it would interrupt a
            # finalizer and print a traceback after the one line.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except ClError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except OSError as error:  # a full disk, a read-only directory: name the file, no traceback
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        # A path that cannot name a file is the user's to fix; the rest is the machine's.
        usage = error.errno in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG)
        sys.exit(2 if usage else 1)
    except (MemoryError, RuntimeError) as error:  # an allocation no check could foresee
        asked = out_of_memory(error)
        if asked is None:
            raise
        print(f"error: not enough memory{asked}; use smaller settings (batch, model, buffer "
              "capacity) or a machine with more memory", file=sys.stderr)
        sys.exit(1)
    except _typer_errors() as error:  # unknown flags, missing values: the parser's own errors
        print(f"error: {error.format_message()}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))


def _setting_line(setting) -> str:
    """`key (type, default VALUE): help`, one line of a strategy in `cl list`."""
    from cl.registry import REQUIRED

    default = REQUIRED if setting.default == REQUIRED else f"default {setting.default}"
    line = f"{setting.name} ({setting.type}, {default})"
    return f"{line}: {setting.help}" if setting.help else line


if __name__ == "__main__":
    main()
