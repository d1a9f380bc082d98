"""The `cl` command line: `cl run` trains over a task stream, `cl list` shows what is installed.

This module owns the console: tables, progress bars and error lines. Heavy packages (torch,
datasets) load inside the commands that need them, so `cl --help` answers at once. Every
deliberate error is one line on stderr and a non-zero exit (2 for bad input).
"""

from __future__ import annotations

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
    model: Annotated[str | None, Opt(help="Model: mlp, cnn, minilm (text), or "
                                          "hf:<name-or-path> (text) [mlp]")] = None,
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
    device: Annotated[str | None, Opt(help="cpu, cuda, cuda:1 [cpu]")] = None,
    strategy: Annotated[list[str] | None, Opt(help="Strategy spec name or name:key=value,... "
                                                 "(repeatable; applied in the order given)")
                        ] = None,
    joint: Annotated[bool | None, Opt("--joint/--sequential",
                                         help="Train on all tasks at once (the upper bound)")
                     ] = None,
    config: Annotated[Path | None, Opt(help="TOML or JSON file of these settings; "
                                          "flags override it")] = None,
    out: Annotated[Path | None, Opt(help="Run directory [runs/<stream>-<strategy>-...]")
                   ] = None,
    resume: Annotated[Path | None, Opt(metavar="DIR",
                                       help="Continue the unfinished run in DIR after its last "
                                       "finished task (settings from DIR/config.json)")] = None,
) -> None:
    """Train one model over a task stream; print the accuracy matrix and what it forgot."""
    from cl.errors import UsageError
    from cl.experiment import build, execute, make_config, read_config_file

    flags = {"tasks": tasks, "scenario": scenario, "num_tasks": num_tasks,
             "classes_per_task": classes_per_task, "class_order": class_order, "data": data,
             "train_per_task": train_per_task, "test_per_task": test_per_task,
             "model": model, "hidden": hidden, "init": init, "optimizer": optimizer, "lr": lr,
             "momentum": momentum, "weight_decay": weight_decay, "batch_size": batch_size,
             "epochs": epochs, "seed": seed, "eval_every": eval_every, "device": device,
             "strategy": strategy, "joint": joint}
    given = sorted(key for key, value in flags.items() if value is not None)
    if resume is not None:
        # A resumed run must be the run that was started: its settings come from its own file.
        if given or config is not None or out is not None:
            extra = (given or ["config" if config is not None else "out"])[0]
            raise UsageError(f"--resume takes every setting from {resume / 'config.json'}; "
                             f"drop --{extra.replace('_', '-')}")
        if not (resume / "config.json").is_file():
            raise UsageError(f"--resume {resume}: no run there (no config.json)")
        config, out = resume / "config.json", resume
    settings = read_config_file(config) if config is not None else {}
    settings.update({key: value for key, value in flags.items() if value is not None})
    run_config = make_config(settings, source="cl run")
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
                                   resume=resume is not None)
    _print_run(console, metrics, run_dir)


@app.command("list")
def list_command() -> None:
    """Show the task streams, strategies and models cl knows (built-in and installed)."""
    from rich.table import Table

    from cl import registry

    console = _console()
    kinds = (("stream", "Task streams (--tasks)"), ("strategy", "Strategies (--strategy)"),
             ("model", "Models (--model)"))
    for kind, title in kinds:
        table = Table(title=title, title_justify="left", show_header=False, box=None)
        for name in registry.names(kind):
            table.add_row(name, registry.describe(registry.load(kind, name)))
        console.print(table)
        console.print()


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=True,
                    disable=not console.is_terminal)


def _fmt(value: Any, percent: bool = True) -> str:
    if value is None:
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
    summary.add_column(f"{metrics['scenario']}-IL", justify="right")
    task_il = metrics.get("task_il")
    if task_il is not None:  # a class-IL run also reports task-IL (logits masked per task)
        summary.add_column("task-IL", justify="right")
    for title, key in (("ACC (final average)", "acc"), ("BWT", "bwt"), ("FWT", "fwt"),
                       ("Forgetting", "forgetting"), ("Learning accuracy", "learning_accuracy"),
                       ("min-ACC", "min_acc"), ("WC-ACC", "wc_acc")):
        cells = [_fmt(metrics[key])]
        if task_il is not None:
            cells.append(_fmt(task_il.get(key)))
        summary.add_row(title, *cells)
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
    from cl.errors import ClError

    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name="cl", standalone_mode=False)
    except typer.Exit as stop:
        sys.exit(stop.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except ClError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except OSError as error:  # a full disk, a read-only directory: name the file, no traceback
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        sys.exit(1)
    except _typer_errors() as error:  # unknown flags, missing values: the parser's own errors
        print(f"error: {error.format_message()}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))


if __name__ == "__main__":
    main()
