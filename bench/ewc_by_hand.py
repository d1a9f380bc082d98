"""Online EWC as the DER table's code writes it (aimagelab/mammoth, models/ewc_on.py), in a
plain loop on cl's Permuted MNIST stream: the check behind the P-MNIST oEWC row.

cl builds only the stream (the same permutations as a cl run of that seed) and the seeded
model; training, the Fisher and the penalty are written out here. The Fisher is mammoth's: per
training row, p(y|x) times the squared gradient of log p(y|x) at the true label, averaged, by
`torch.func` per-row gradients; online (gamma 1); the penalty lambda * sum F (w - w*)^2 toward
the weights after the last task. One torch thread.

    python bench/ewc_by_hand.py --data ../shared/data/mnist.npz --tasks 5 --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cl.experiment import RunConfig, build  # noqa: E402


def inputs(split, index):
    return split.rows(index).float().flatten(1) / 255


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", type=float, default=0.7)  # mammoth's e_lambda
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    built = build(RunConfig(tasks="permuted-mnist", num_tasks=args.tasks, data=args.data,
                            model="mlp", hidden=(100, 100), init="xavier", lr=args.lr,
                            batch_size=128, epochs=1, seed=args.seed))
    model, stream = built.model, built.stream
    names = [name for name, _ in model.named_parameters()]
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=args.lr)
    fisher = anchor = None
    order_generator = torch.Generator().manual_seed(args.seed)
    started = time.perf_counter()

    def log_p(weights, x, y):
        value = F.log_softmax(functional_call(model, weights, (x.unsqueeze(0),))[0], 0)
        value = value.gather(0, y.unsqueeze(0))[0]
        return value, value.detach()

    per_row = vmap(grad(log_p, has_aux=True), in_dims=(None, 0, 0))
    for task in stream.tasks:
        rows = len(task.train)
        order = torch.randperm(rows, generator=order_generator)
        for start in range(0, rows, 128):
            index = order[start:start + 128]
            loss = F.cross_entropy(model(inputs(task.train, index)), task.train.y[index])
            if fisher is not None:
                pulls = zip(fisher, parameters, anchor, strict=True)
                loss = loss + args.strength * sum((f * (p - a) ** 2).sum() for f, p, a in pulls)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        weights = {name: p.detach() for name, p in model.named_parameters()}
        this_task = [torch.zeros_like(p) for p in parameters]
        for start in range(0, rows, 500):
            index = torch.arange(start, min(rows, start + 500))
            gradients, value = per_row(weights, inputs(task.train, index), task.train.y[index])
            weight = value.exp()
            for position, name in enumerate(names):
                shape = (-1,) + (1,) * (gradients[name].dim() - 1)
                this_task[position] += (weight.view(shape) * gradients[name] ** 2).sum(0)
        this_task = [value / rows for value in this_task]
        fisher = this_task if fisher is None else [
            a + b for a, b in zip(fisher, this_task, strict=True)]
        anchor = [p.detach().clone() for p in parameters]
        seconds = time.perf_counter() - started
        print(f"task {task.index + 1}/{len(stream.tasks)} ({seconds:.0f} s)", file=sys.stderr)
    accuracy = []
    with torch.no_grad():
        for task in stream.tasks:
            predicted = model(inputs(task.test, torch.arange(len(task.test)))).argmax(1)
            accuracy.append((predicted == task.test.y).float().mean().item())
    print(f"seed {args.seed}, {args.tasks} tasks, strength {args.strength}: "
          f"ACC {100 * sum(accuracy) / len(accuracy):.2f}")


if __name__ == "__main__":
    main()
