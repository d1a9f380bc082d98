"""A plain PyTorch script doing the work of one `cl run`: the baseline of bench/end_to_end.py.

It trains what `cl run --tasks split-mnist --data MNIST --hidden 400,400 --lr 0.01 --batch-size 128
--epochs 1` trains (class-incremental Split MNIST: five tasks of two digits, an MLP 784-400-400-10,
SGD, one epoch a task), with the same seeded initial weights and batch order, and evaluates every
task after each one (and once before any training), as cl does. It prints the accuracy matrix as
JSON: with the same seed it equals the `R` of that cl run, which shows both did the same work.

    python bench/hand_written.py --data ../shared/data/mnist.npz [--threads 1]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Keras-layout mnist.npz")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    with np.load(args.data) as arrays:
        x_train, y_train = arrays["x_train"], arrays["y_train"].astype(np.int64)
        x_test, y_test = arrays["x_test"], arrays["y_test"].astype(np.int64)
    tasks = []
    for first in range(0, 10, 2):
        train = np.isin(y_train, (first, first + 1))
        test = np.isin(y_test, (first, first + 1))
        tasks.append((torch.from_numpy(x_train[train]).float().div_(255).unsqueeze(1),
                      torch.from_numpy(y_train[train]),
                      torch.from_numpy(x_test[test]).float().div_(255).unsqueeze(1),
                      torch.from_numpy(y_test[test])))
    del x_train, y_train, x_test, y_test

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        body = nn.Sequential(nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400),
                             nn.ReLU())
        head = nn.Linear(400, 10)
    model = nn.Sequential(body, head)
    order = torch.Generator().manual_seed(args.seed)

    def evaluate() -> list[float]:
        model.eval()
        accuracies = []
        with torch.no_grad():
            for _, _, x, y in tasks:
                correct = sum(int((model(x[i:i + 1024]).argmax(1) == y[i:i + 1024]).sum())
                              for i in range(0, len(y), 1024))
                accuracies.append(correct / len(y))
        model.train()
        return accuracies

    rows = [evaluate()]
    for x, y, _, _ in tasks:
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        for _ in range(args.epochs):
            permutation = torch.randperm(len(y), generator=order)
            for start in range(0, len(y), args.batch_size):
                index = permutation[start:start + args.batch_size]
                loss = F.cross_entropy(model(x[index]), y[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        rows.append(evaluate())
    R = np.array(rows[1:])
    print(json.dumps({"initial": rows[0], "accuracy_matrix": R.tolist(),
                      "acc": float(R[-1].mean())}))


if __name__ == "__main__":
    main()
