"""Per-step cost of each strategy against the naive run: split-mnist, MLP 784-400-400-10, SGD,
batch 128, one epoch per task, in one process with runs alternating over several repeats.

What each strategy should cost (issue 3): EMA at most 10% over naive; replay about the cost of
its extra rows and no more (so it is also compared with naive at the same number of rows per
step); distill one extra forward pass without gradients.

    python bench/strategy_cost.py --data ../shared/data/mnist.npz
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from cl.experiment import RunConfig, build
from cl.runner import run

BATCH_SIZE = 128
# name: (scenario, batch size, strategy specs)
CASES: dict[str, tuple[str, int, list[str]]] = {
    "naive": ("class", BATCH_SIZE, []),
    "ema": ("class", BATCH_SIZE, ["ema:decay=0.999"]),
    "replay": ("class", BATCH_SIZE, ["replay:capacity=500"]),
    # The rows a replay step trains on (128 new + 128 replayed), without a buffer.
    "naive, 256 rows per step": ("class", 2 * BATCH_SIZE, []),
    "distill": ("class", BATCH_SIZE, ["distill:alpha=1,temperature=2"]),
    "freeze (head only)": ("class", BATCH_SIZE, ["freeze:head_only=true"]),
    "naive (task scenario)": ("task", BATCH_SIZE, []),
    "lora (task scenario)": ("task", BATCH_SIZE, ["lora:rank=8"]),
    "all five (task scenario)": ("task", BATCH_SIZE, [
        "freeze:lr_mult=head.*=10", "lora:rank=8", "replay:capacity=500",
        "distill:alpha=1,temperature=2", "ema:decay=0.999"]),
}


def step_seconds(name: str, data: str) -> tuple[float, int]:
    scenario, batch_size, strategies = CASES[name]
    config = RunConfig(tasks="split-mnist", data=data, scenario=scenario, hidden=(400, 400),
                       lr=0.01, batch_size=batch_size, epochs=1, seed=0,
                       strategy=tuple(strategies))
    built = build(config)
    result = run(built.model, built.stream, built.strategy, built.train)
    return result.train_seconds / result.steps, result.steps


def hook_seconds(data: str, calls: int = 500) -> dict[str, float]:
    """The seconds per step the strategies' own hooks take on the same model and batches,
    measured directly: whole-step timings on a shared 2-core machine vary by more than EMA's
    whole cost."""
    from cl.models import logits_of
    from cl.types import Batch
    from strategies import EMA, Replay, ReplayConfig

    config = RunConfig(tasks="split-mnist", data=data, hidden=(400, 400), batch_size=BATCH_SIZE)
    built = build(config)
    model, stream = built.model, built.stream
    task = stream.tasks[0]
    batch = Batch(task.train.x[:BATCH_SIZE], task.train.y[:BATCH_SIZE],
                  torch.zeros(BATCH_SIZE, dtype=torch.long))
    logits = logits_of(model, batch.x).detach()
    ema, replay = EMA(), Replay(ReplayConfig(capacity=500))
    ema.before_run(model, stream, 0)
    replay.before_run(model, stream, 0)
    replay.after_step(model, batch, logits, task)
    timings = {}
    for name, call in (("ema after_step", lambda: ema.after_step(model, batch, logits, task)),
                       ("replay transform_batch + after_step", lambda: replay.after_step(
                           model, replay.transform_batch(batch, task), logits, task))):
        for _ in range(20):
            call()
        started = time.perf_counter()
        for _ in range(calls):
            call()
        timings[name] = (time.perf_counter() - started) / calls
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "strategy_cost.json"))
    args = parser.parse_args()
    timings: dict[str, list[float]] = {name: [] for name in CASES}
    steps = {}
    for repeat in range(args.repeats):
        for name in CASES:  # alternating, so drift in machine speed hits every case alike
            seconds, steps[name] = step_seconds(name, args.data)
            timings[name].append(seconds)
            print(f"repeat {repeat}: {name:<28} {1000 * seconds:.3f} ms/step", file=sys.stderr)
    median = {name: statistics.median(values) for name, values in timings.items()}
    hooks = hook_seconds(args.data)

    def ratio(name: str, reference: str) -> float:
        return median[name] / median[reference]

    document = {
        "workload": "split-mnist, MLP 784-400-400-10, SGD lr 0.01, batch 128, 1 epoch per task; "
                    "train time per optimizer step (hooks included), median of repeats",
        "ms_per_step": {name: 1000 * value for name, value in median.items()},
        "all_ms_per_step": {name: [1000 * v for v in values] for name, values in timings.items()},
        "steps": steps,
        "ratios": {
            "ema / naive": ratio("ema", "naive"),
            "replay / naive": ratio("replay", "naive"),
            "replay / naive at 256 rows per step": ratio("replay", "naive, 256 rows per step"),
            "distill / naive": ratio("distill", "naive"),
            "freeze (head only) / naive": ratio("freeze (head only)", "naive"),
            "lora / naive (task scenario)": ratio("lora (task scenario)",
                                                  "naive (task scenario)"),
            "all five / naive (task scenario)": ratio("all five (task scenario)",
                                                      "naive (task scenario)"),
        },
        "hook_ms_per_step": {name: 1000 * value for name, value in hooks.items()},
        "hook_share_of_naive_step": {name: value / median["naive"]
                                     for name, value in hooks.items()},
        "goals": {"ema / naive": "<= 1.10", "replay / naive at 256 rows per step": "about 1",
                  "distill / naive": "about 1 + one forward without gradients"},
        "repeats": args.repeats,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    for key, value in {**document["ratios"], **document["hook_share_of_naive_step"]}.items():
        print(f"{key:<40} {value:.3f}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
