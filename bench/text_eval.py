"""Text evaluation cost: length-sorted batches of a token budget against batches of many rows.

MiniLM (all-MiniLM-L6-v2, its pretrained encoder and a seeded head) evaluates the test rows of
text-cl (agnews, amazon, dbpedia, yelp), once with the old plan (up to `--rows` rows a batch,
padded to the batch's longest) and once per token budget, alternating, in one process; CPU
seconds are taken with `time.process_time`. The predictions of every plan must be equal to the
old plan's, row for row: only the amount of padding changes.

    pip install -e ".[text]"
    python bench/text_eval.py --data ../shared/data/text
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from cl import __version__
from cl.experiment import RunConfig, build
from cl.runner import MAIN, TrainConfig, evaluate

RESULTS = Path(__file__).parent / "results" / "text_eval.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory of agnews, amazon, dbpedia, yelp")
    parser.add_argument("--test-per-task", type=int, default=500)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rows", type=int, default=1024, help="rows a batch in the old plan")
    parser.add_argument("--budgets", default="2048,4096,8192,16384")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    built = build(RunConfig(tasks=f"text-cl:max_length={args.max_length}", data=args.data,
                            model="minilm", scenario="task", train_per_task=16,
                            test_per_task=args.test_per_task))
    stream, model = built.stream, built.model
    class_mask = stream.class_mask()
    tasks = list(stream.tasks)
    # The old plan: fixed batches of `--rows` rows (a budget no batch reaches). Rows are taken
    # by length in both plans (the stream stores test rows sorted by length, as before), so the
    # old plan's padding is reproduced exactly while a task has at most `--rows` test rows.
    plans = {"rows": TrainConfig(eval_batch_size=args.rows, eval_tokens=10**12)}
    for budget in (int(b) for b in args.budgets.split(",")):
        plans[f"tokens={budget}"] = TrainConfig(eval_batch_size=args.rows, eval_tokens=budget)
    seconds: dict[str, list[float]] = {name: [] for name in plans}
    predictions: dict[str, np.ndarray] = {}
    accuracy: dict[str, list[float]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not counted
        for name, config in plans.items():
            started = time.process_time()
            result = evaluate(model, stream, built.strategy, tasks, class_mask, config,
                              torch.device("cpu"), keep_predictions=True)
            spent = time.process_time() - started
            if repeat:
                seconds[name].append(spent)
            predictions[name] = np.concatenate(result.predictions)
            accuracy[name] = result.accuracy.tolist()
            print(f"{name:14s} {spent:7.2f} s CPU", flush=True)
    old = statistics.median(seconds["rows"])
    results = {name: {"cpu_seconds": seconds[name], "median_cpu_seconds": statistics.median(
                          seconds[name]),
                      "cpu_ratio_to_rows": statistics.median(seconds[name]) / old,
                      "accuracy": accuracy[name],
                      "same_predictions_as_rows": bool(np.array_equal(predictions[name],
                                                                      predictions["rows"]))}
               for name in plans}
    report = {
        "setting": {"stream": "text-cl test rows", "model": "all-MiniLM-L6-v2",
                    "test_per_task": args.test_per_task, "max_length": args.max_length,
                    "rows": args.rows, "repeats": args.repeats, "view": MAIN,
                    "rows_evaluated": int(sum(len(task.test) for task in tasks))},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "cl": __version__},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, entry in results.items():
        print(f"{name:14s} median {entry['median_cpu_seconds']:7.2f} s CPU, "
              f"{entry['cpu_ratio_to_rows']:.3f} of the row plan, same predictions: "
              f"{entry['same_predictions_as_rows']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
