"""Runner overhead: cl's `run` against a minimal hand-written PyTorch loop doing the same work.

Workload (issue 2): split-mnist (5 tasks x 2 classes), MLP 784-400-400-10, SGD lr 0.01, batch 128,
one epoch per task, every task evaluated before training and after each task. Both sides use the
same tensors, the same initial weights and the same seeded batch order, in one process,
alternating, several repeats; the medians are compared. The two accuracy matrices must be equal
bit for bit, which shows that both did the same work.

    python bench/overhead.py --data ../shared/data/mnist.npz
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

import numpy as np
import torch
import torch.nn.functional as F

from cl import __version__
from cl.models import build_mlp, build_seeded, model_input
from cl.runner import TrainConfig, run
from cl.types import StreamOptions
from tasks.builtin import split_mnist

HIDDEN = (400, 400)
LR = 0.01
BATCH_SIZE = 128
EVAL_BATCH_SIZE = 1024


def hand_written(model: torch.nn.Module, stream, seed: int) -> np.ndarray:
    """The loop a researcher would write by hand: no hooks, no logging, no checks (the stream
    keeps uint8 pixels: each batch is scaled as the runner scales it)."""
    tasks = stream.tasks
    generator = torch.Generator().manual_seed(seed)

    def evaluate() -> list[float]:
        model.eval()
        row = []
        with torch.inference_mode():
            for task in tasks:
                correct = 0
                for start in range(0, len(task.test), EVAL_BATCH_SIZE):
                    x = task.test.x[start:start + EVAL_BATCH_SIZE]
                    y = task.test.y[start:start + EVAL_BATCH_SIZE]
                    correct += (model(model_input(x)).argmax(1) == y).sum().item()
                row.append(correct / len(task.test))
        model.train()
        return row

    evaluate()  # the row before any training, as the runner computes it
    rows = []
    for task in tasks:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        order = torch.randperm(len(task.train), generator=generator)
        for start in range(0, len(task.train), BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            loss = F.cross_entropy(model(model_input(task.train.x[index])), task.train.y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        rows.append(evaluate())
    return np.array(rows)


def with_cl(model: torch.nn.Module, stream, seed: int) -> np.ndarray:
    config = TrainConfig(optimizer="sgd", lr=LR, batch_size=BATCH_SIZE, epochs=1,
                         eval_batch_size=EVAL_BATCH_SIZE, seed=seed)
    return run(model, stream, None, config).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="path to mnist.npz (Keras layout)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead.json"))
    args = parser.parse_args()

    stream = split_mnist(StreamOptions(data=args.data, seed=args.seed))
    shape, classes = stream.input_shape, stream.num_classes

    def fresh_model() -> torch.nn.Module:
        return build_seeded(build_mlp, shape, classes, HIDDEN, "default", args.seed)

    # Warm up both paths (allocator, kernels), then alternate which goes first.
    matrices = {"hand": hand_written(fresh_model(), stream, args.seed),
                "cl": with_cl(fresh_model(), stream, args.seed)}
    seconds: dict[str, list[float]] = {"hand": [], "cl": []}
    sides = {"hand": hand_written, "cl": with_cl}
    for repeat in range(args.repeats):
        for side in (("hand", "cl") if repeat % 2 == 0 else ("cl", "hand")):
            model = fresh_model()
            started = time.perf_counter()
            matrices[side] = sides[side](model, stream, args.seed)
            seconds[side].append(time.perf_counter() - started)
        print(f"repeat {repeat + 1}/{args.repeats}: hand {seconds['hand'][-1]:.3f} s, "
              f"cl {seconds['cl'][-1]:.3f} s", file=sys.stderr)

    median = {side: statistics.median(values) for side, values in seconds.items()}
    identical = bool(np.array_equal(matrices["hand"], matrices["cl"]))
    result = {
        "benchmark": "overhead",
        "workload": {"stream": "split-mnist", "tasks": len(stream.tasks),
                     "train_rows": sum(len(t.train) for t in stream.tasks),
                     "test_rows": sum(len(t.test) for t in stream.tasks),
                     "model": "mlp 784-400-400-10", "optimizer": "sgd", "lr": LR,
                     "batch_size": BATCH_SIZE, "epochs_per_task": 1,
                     "evaluation": "every task, before training and after each task"},
        "repeats": args.repeats,
        "seconds": seconds,
        "median_seconds": median,
        "ratio": median["cl"] / median["hand"],
        "goal": "ratio <= 1.10",
        "identical_accuracy_matrix": identical,
        "final_accuracy_row": matrices["cl"][-1].tolist(),
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cl": __version__, "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"hand-written {median['hand']:.3f} s, cl {median['cl']:.3f} s (medians of "
          f"{args.repeats}): ratio {result['ratio']:.3f}; identical R: {identical}")
    if not identical:
        sys.exit("the two loops disagree: they did not do the same work")


if __name__ == "__main__":
    main()
