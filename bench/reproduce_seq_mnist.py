"""Seq-MNIST reproduction: the DER paper / Mammoth protocol run through cl, against the published
class-IL and task-IL means, then compositions no published table has.

Protocol: MLP 784-100-100-10 (Xavier-uniform weights, zero biases), plain SGD without momentum,
batch 10, one epoch per task, 5 tasks of 2 classes in natural order, pixels / 255 only, one
10-way head; task-IL accuracy from the same run with logits masked to each task's classes.
Every configuration runs over 5 seeds in parallel worker processes (one torch thread each).

    python bench/reproduce_seq_mnist.py --data ../shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Published means (Buzzega et al. 2020, Table 2, Seq-MNIST): class-IL, task-IL.
PUBLISHED = {
    "fine-tune": (19.60, 94.94),
    "lwf (as published)": (19.62, 94.11),
    "lwf (working)": (19.62, 94.11),
    "er-200": (80.43, 97.86),
    "er-500": (86.12, 99.04),
    "oewc": (20.46, 98.39),  # oEWC and DER: the table of mammoth's README at its first commit
    "der-200": (84.55, 98.80),
    "der-500": (90.54, 98.84),
    "der++-200": (85.61, 98.76),
    "der++-500": (91.00, 98.94),
}
# The published LwF row trained without distillation; a working LwF under the same protocol
# lands near these means in a plain PyTorch loop (../shared/REPRODUCTION.md).
WORKING_LWF = (21.5, 98.8)
REPLAY_LR = {200: 0.01, 500: 0.1}  # the published ER learning rates per buffer size

# name: (lr, weight decay, strategy specs, which published row it is measured against)
CONFIGS: dict[str, tuple[float, float, list[str], str | None]] = {
    "fine-tune": (0.03, 0.0, [], "fine-tune"),
    # The published LwF row trained as plain SGD with an L2 term: the begin-task hook that
    # snapshots the teacher never ran (see ../shared/REPRODUCTION.md). Both forms are run.
    "lwf (as published)": (0.03, 5e-4, [], "lwf (as published)"),
    "lwf (working)": (0.03, 5e-4, ["distill:alpha=1,temperature=2"], "lwf (working)"),
}
for size in (200, 500):
    lr = REPLAY_LR[size]
    replay = f"replay:capacity={size},batch_size=10"
    CONFIGS[f"er-{size}"] = (lr, 0.0, [replay], f"er-{size}")
    CONFIGS[f"er-{size} + lwf"] = (lr, 0.0, [replay, "distill:alpha=1,temperature=2"],
                                   f"der++-{size}")
    logits_replay = replay + ",store_logits=true"
    stored = "distill:targets=buffer,alpha=1,temperature=2"
    CONFIGS[f"er-{size} + stored logits"] = (lr, 0.0, [logits_replay, stored], f"der++-{size}")
    CONFIGS[f"er-{size} + stored logits + ema"] = (
        lr, 0.0, [logits_replay, stored, "ema:decay=0.995,eval_with=both"], f"der++-{size}")
    CONFIGS[f"er-{size} + stored logits + ema + freeze"] = (
        lr, 0.0, ["freeze:patterns=body.1.*,after_task=1", logits_replay, stored,
                  "ema:decay=0.995,eval_with=both"], f"der++-{size}")


# Online EWC as published (mammoth's utils/best_args.py, seq-mnist ewc_on): lambda 90, gamma 1.
CONFIGS["oewc"] = (0.03, 0.0, ["ewc:strength=90,gamma=1"], "oewc")
# DER and DER++ as published (mammoth's utils/best_args.py, seq-mnist): the learning rate, the
# rows per buffer draw (minibatch_size) and the weights.
for size, lr, draw, alpha in ((200, 0.03, 10, 0.2), (500, 0.03, 128, 1.0)):
    CONFIGS[f"der-{size}"] = (lr, 0.0, [f"der:capacity={size},alpha={alpha},batch_size={draw}"],
                              f"der-{size}")
for size, lr, draw, alpha, beta in ((200, 0.03, 128, 0.2, 1.0), (500, 0.03, 10, 1.0, 0.5)):
    CONFIGS[f"der++-{size}"] = (
        lr, 0.0, [f"derpp:capacity={size},alpha={alpha},beta={beta},batch_size={draw}"],
        f"der++-{size}")


def one_run(job: tuple[str, int, str]) -> dict:
    """Train one configuration with one seed; return its final accuracies."""
    name, seed, data = job
    import torch

    torch.set_num_threads(1)
    from cl.experiment import RunConfig, build
    from cl.runner import run

    lr, weight_decay, strategies, _ = CONFIGS[name]
    config = RunConfig(tasks="split-mnist", data=data, model="mlp", hidden=(100, 100),
                       init="xavier", optimizer="sgd", lr=lr, weight_decay=weight_decay,
                       batch_size=10, epochs=1, seed=seed, strategy=tuple(strategies))
    built = build(config)
    started = time.perf_counter()
    result = run(built.model, built.stream, built.strategy, built.train)
    seconds = time.perf_counter() - started
    row = {"name": name, "seed": seed, "class_il": 100 * float(result.accuracy[-1].mean()),
           "task_il": 100 * float(result.task_accuracy[-1].mean()), "seconds": seconds}
    if "live" in result.variants:  # EMA evaluated both ways: the live weights' numbers too
        live = result.variants["live"]
        row["live_class_il"] = 100 * float(live["accuracy"][-1].mean())
        row["live_task_il"] = 100 * float(live["task_accuracy"][-1].mean())
    return row


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1
            else 0.0, "values": values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="mnist.npz (Keras layout)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "seq_mnist.json"))
    args = parser.parse_args()
    names = args.only or list(CONFIGS)
    jobs = [(name, seed, args.data) for name in names for seed in range(args.seeds)]
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        rows = []
        for row in pool.map(one_run, jobs):
            rows.append(row)
            print(f"{row['name']:<40} seed {row['seed']}: class-IL {row['class_il']:6.2f}  "
                  f"task-IL {row['task_il']:6.2f}  ({row['seconds']:.1f} s)", file=sys.stderr)
    results = {}
    if args.only and Path(args.out).is_file():
        # A rerun of some configurations keeps the others' results.
        previous = json.loads(Path(args.out).read_text())
        if previous.get("seeds") == list(range(args.seeds)):
            results = {name: entry for name, entry in previous["results"].items()
                       if name in CONFIGS and name not in names}
    for name in names:
        mine = [row for row in rows if row["name"] == name]
        lr, weight_decay, strategies, reference = CONFIGS[name]
        entry = {"lr": lr, "weight_decay": weight_decay, "strategy": strategies,
                 "class_il": mean_std([r["class_il"] for r in mine]),
                 "task_il": mean_std([r["task_il"] for r in mine]),
                 "seconds_per_run": statistics.fmean(r["seconds"] for r in mine)}
        if "live_class_il" in mine[0]:
            entry["live_class_il"] = mean_std([r["live_class_il"] for r in mine])
            entry["live_task_il"] = mean_std([r["live_task_il"] for r in mine])
        published = PUBLISHED[reference]
        entry["published_row"] = reference
        entry["published"] = {"class_il": published[0], "task_il": published[1]}
        expected = WORKING_LWF if name == "lwf (working)" else published
        if name == "lwf (working)":
            entry["expected"] = {"class_il": expected[0], "task_il": expected[1],
                                 "source": "a working LwF in a plain PyTorch loop, "
                                           "../shared/REPRODUCTION.md"}
        if name == reference:  # a reproduction: within +-2 points of the expected mean
            entry["reproduced"] = all(
                abs(entry[key]["mean"] - value) <= 2.0
                for key, value in zip(("class_il", "task_il"), expected, strict=True))
        entry["difference"] = {key: entry[key]["mean"] - value for key, value in
                               zip(("class_il", "task_il"), expected, strict=True)}
        results[name] = entry
    results = {name: results[name] for name in CONFIGS if name in results}
    document = {
        "protocol": "Seq-MNIST (DER / Mammoth): MLP 784-100-100-10 xavier, SGD no momentum, "
                    "batch 10, 1 epoch per task, 5 tasks x 2 classes natural order, pixels/255, "
                    "single head; task-IL from the same run with logits masked per task",
        "seeds": list(range(args.seeds)),
        "results": results,
        "wall_seconds": time.perf_counter() - started,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "workers": args.workers},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
