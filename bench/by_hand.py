"""Methods of the DER table written out in a plain loop on cl's streams: the checks behind the
table's rows that differ from the published means.

cl builds only the stream (the same tasks as a cl run of that seed) and the seeded model;
training and each method's terms are written out here, one torch thread:

- `ewc_on`: online EWC as aimagelab/mammoth's models/ewc_on.py writes it. The Fisher is per
  training row, p(y|x) times the squared gradient of log p(y|x) at the true label, averaged
  (`torch.func` per-row gradients); online (gamma 1); the penalty lambda * sum F (w - w*)^2
  toward the weights after the last task. Permuted MNIST, lr 0.1, batch 128, lambda 0.7.
- `si`: synaptic intelligence as mammoth's models/si.py writes it: loss CE + c * sum
  Omega (w - w*)^2, every gradient entry clipped to [-1, 1], then the SGD step, then
  omega += lr * g^2 with that clipped gradient; after each task Omega += omega / ((w - w*)^2 + xi)
  and w* moves on. Permuted MNIST, lr 0.1, batch 128, c 0.5, xi 1.
- `er_kl`: experience replay with KL toward the logits stored with the buffer rows, as
  ../shared/REPRODUCTION.md describes its hand-written loop: reservoir insertion of every
  incoming row (with the logits of this step's forward pass) after the step, 10 replayed rows
  drawn uniformly without replacement and concatenated to the batch, cross-entropy over the
  whole batch, plus alpha * T^2 * KL(stored || model) at T = 2 over all ten classes, averaged
  over the replayed rows. `--ema D` also evaluates an exponential moving average of the weights
  (decay D, updated after every step). Seq-MNIST class-IL, lr 0.1, batch 10, buffer 500.

`--with-cl` runs each seed through cl too (the same stream, initial weights and batch order;
only the buffer's random draws differ), so every line is a pair:

    python bench/by_hand.py --method ewc_on --data ../shared/data/mnist.npz --seeds 0 --with-cl \
        --out bench/results/by_hand_ewc_on.json
    python bench/by_hand.py --method si --data ../shared/data/mnist.npz --seeds 0-4 --with-cl \
        --out bench/results/by_hand_si.json
    python bench/by_hand.py --method er_kl --data ../shared/data/mnist.npz --seeds 0-14 \
        --ema 0.999 --with-cl --out bench/results/by_hand_er_kl.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cl.experiment import RunConfig, build  # noqa: E402

# Per method: the stream, its task count, and mammoth's best settings for it.
PROTOCOLS = {
    "ewc_on": {"tasks": "permuted-mnist", "num_tasks": 20, "lr": 0.1, "batch_size": 128,
               "strength": 0.7},
    "si": {"tasks": "permuted-mnist", "num_tasks": 20, "lr": 0.1, "batch_size": 128,
           "strength": 0.5, "damping": 1.0},
    "er_kl": {"tasks": "split-mnist", "num_tasks": 5, "lr": 0.1, "batch_size": 10,
              "capacity": 500, "alpha": 1.0, "temperature": 2.0},
}


def inputs(split, index):
    return split.rows(index).float().flatten(1) / 255


def fisher_of(model, split) -> list[torch.Tensor]:
    """mammoth's ewc_on Fisher: mean over the rows of p(y|x) * (d log p(y|x) / dw)^2."""
    names = [name for name, _ in model.named_parameters()]
    weights = {name: p.detach() for name, p in model.named_parameters()}

    def log_p(weights, x, y):
        value = F.log_softmax(functional_call(model, weights, (x.unsqueeze(0),))[0], 0)
        value = value.gather(0, y.unsqueeze(0))[0]
        return value, value.detach()

    per_row = vmap(grad(log_p, has_aux=True), in_dims=(None, 0, 0))
    total = [torch.zeros_like(p) for p in model.parameters()]
    rows = len(split)
    for start in range(0, rows, 500):
        index = torch.arange(start, min(rows, start + 500))
        gradients, value = per_row(weights, inputs(split, index), split.y[index])
        weight = value.exp()
        for position, name in enumerate(names):
            shape = (-1,) + (1,) * (gradients[name].dim() - 1)
            total[position] += (weight.view(shape) * gradients[name] ** 2).sum(0)
    return [value / rows for value in total]


def accuracies(model, stream) -> list[float]:
    with torch.no_grad():
        return [(model(inputs(task.test, torch.arange(len(task.test)))).argmax(1)
                 == task.test.y).float().mean().item() for task in stream.tasks]


CL_STRATEGIES = {
    "ewc_on": lambda settings: (f"ewc:strength={settings['strength']},gamma=1",),
    "si": lambda settings: (f"si:strength={settings['strength']},damping={settings['damping']},"
                            "clip_value=1",),
    "er_kl": lambda settings: (
        f"replay:capacity={settings['capacity']},batch_size=10,store_logits=true",
        f"distill:targets=buffer,alpha={settings['alpha']},"
        f"temperature={settings['temperature']}"),
}


def cl_run(method: str, settings: dict, num_tasks: int, seed: int, data: str,
           ema: float | None) -> dict:
    """The same protocol through cl's runner and strategies: final ACC (live and EMA)."""
    from cl.runner import run

    strategy = CL_STRATEGIES[method](settings)
    if ema is not None:
        strategy += (f"ema:decay={ema},eval_with=both",)
    built = build(RunConfig(tasks=settings["tasks"], num_tasks=num_tasks, data=data,
                            model="mlp", hidden=(100, 100), init="xavier", lr=settings["lr"],
                            batch_size=settings["batch_size"], epochs=1, seed=seed, threads=1,
                            eval_on="final", strategy=strategy))
    result = run(built.model, built.stream, built.strategy, built.train)
    final = 100 * float(result.accuracy[-1].mean())
    if ema is None:
        return {"acc": final}
    return {"acc": 100 * float(torch.as_tensor(result.variants["live"]["accuracy"])[-1].mean()),
            "acc_ema": final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=sorted(PROTOCOLS), required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seeds", default="0", help="a seed, or a range such as 0-14")
    parser.add_argument("--tasks", type=int, default=None, help="default: the protocol's")
    parser.add_argument("--lr", type=float, default=None, help="default: the protocol's")
    parser.add_argument("--strength", type=float, default=None,
                        help="ewc_on's lambda or si's c; default: the protocol's")
    parser.add_argument("--ema", type=float, default=None, help="er_kl: also evaluate an EMA")
    parser.add_argument("--with-cl", action="store_true",
                        help="also run the same protocol and seed through cl, for the pair")
    parser.add_argument("--out", default=None, help="write the runs and their means as JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = dict(PROTOCOLS[args.method])
    for key in ("lr", "strength"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    num_tasks = args.tasks or settings["num_tasks"]
    first, _, last = args.seeds.partition("-")
    runs = []
    for seed in range(int(first), int(last or first) + 1):
        started = time.perf_counter()
        run = {"seed": seed, "by_hand": hand_run(args.method, settings, num_tasks, seed,
                                                 args.data, args.ema)}
        if args.with_cl:
            run["cl"] = cl_run(args.method, settings, num_tasks, seed, args.data, args.ema)
        run["seconds"] = time.perf_counter() - started
        runs.append(run)
        print(json.dumps(run))
    summary = {"method": args.method, **settings, "num_tasks": num_tasks, "ema": args.ema,
               "runs": runs, "means": {}}
    for side in ("by_hand", "cl"):
        for key in ("acc", "acc_ema"):
            values = [run[side][key] for run in runs if key in run.get(side, {})]
            if values:
                summary["means"][f"{side}.{key}"] = {
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "seeds": len(values)}
    print(json.dumps(summary["means"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


def hand_run(method: str, settings: dict, num_tasks: int, seed: int, data: str,
             ema: float | None) -> dict:
    """One run of `method` written out by hand: final ACC (and the EMA's)."""
    lr, batch_size = settings["lr"], settings["batch_size"]
    built = build(RunConfig(tasks=settings["tasks"], num_tasks=num_tasks, data=data,
                            model="mlp", hidden=(100, 100), init="xavier", lr=lr,
                            batch_size=batch_size, epochs=1, seed=seed))
    model, stream = built.model, built.stream
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(parameters, lr=lr)
    order_generator = torch.Generator().manual_seed(seed)
    buffer_generator = torch.Generator().manual_seed(seed + 1)
    average = copy.deepcopy(model) if ema is not None else None
    # ewc_on: Fisher and anchor; si: Omega, anchor (the initial weights first) and omega.
    fisher = importance = None
    anchor = [p.detach().clone() for p in parameters]
    path = [torch.zeros_like(p) for p in parameters]
    # er_kl: the buffer, and how many rows it has seen.
    capacity = settings.get("capacity", 0)
    stored_x = torch.zeros(capacity, 784)
    stored_y = torch.zeros(capacity, dtype=torch.int64)
    stored_logits = torch.zeros(capacity, 10)
    seen = 0
    started = time.perf_counter()
    for task in stream.tasks:
        rows = len(task.train)
        order = torch.randperm(rows, generator=order_generator)
        for start in range(0, rows, batch_size):
            index = order[start:start + batch_size]
            x, y = inputs(task.train, index), task.train.y[index]
            fresh = len(y)
            if method == "er_kl" and seen:
                drawn = torch.randperm(min(seen, capacity), generator=buffer_generator)[:10]
                x, y = torch.cat([x, stored_x[drawn]]), torch.cat([y, stored_y[drawn]])
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if method == "er_kl" and len(y) > fresh:
                temperature = settings["temperature"]
                kl = F.kl_div(F.log_softmax(logits[fresh:] / temperature, 1),
                              F.log_softmax(stored_logits[drawn] / temperature, 1),
                              log_target=True, reduction="batchmean")
                loss = loss + settings["alpha"] * temperature ** 2 * kl
            if method == "ewc_on" and fisher is not None:
                pulls = zip(fisher, parameters, anchor, strict=True)
                loss = loss + settings["strength"] * sum(
                    (f * (p - a) ** 2).sum() for f, p, a in pulls)
            if method == "si" and importance is not None:
                pulls = zip(importance, parameters, anchor, strict=True)
                loss = loss + settings["strength"] * sum(
                    (o * (p - a) ** 2).sum() for o, p, a in pulls)
            optimizer.zero_grad()
            loss.backward()
            if method == "si":
                torch.nn.utils.clip_grad_value_(parameters, 1)
            optimizer.step()
            if method == "si":
                for omega, p in zip(path, parameters, strict=True):
                    omega += lr * p.grad ** 2
            if method == "er_kl":  # reservoir insertion, one row at a time
                for row in range(fresh):
                    slot = seen if seen < capacity else int(torch.randint(
                        0, seen + 1, (1,), generator=buffer_generator))
                    if slot < capacity:
                        stored_x[slot] = x[row]
                        stored_y[slot] = y[row]
                        stored_logits[slot] = logits[row].detach()
                    seen += 1
            if average is not None:
                with torch.no_grad():
                    for kept, live in zip(average.parameters(), parameters, strict=True):
                        kept.mul_(ema).add_(live, alpha=1 - ema)
        if method == "ewc_on":
            this_task = fisher_of(model, task.train)
            fisher = this_task if fisher is None else [
                a + b for a, b in zip(fisher, this_task, strict=True)]
            anchor = [p.detach().clone() for p in parameters]
        if method == "si":
            with torch.no_grad():
                moved = [omega / ((p - a) ** 2 + settings["damping"])
                         for omega, p, a in zip(path, parameters, anchor, strict=True)]
                importance = moved if importance is None else [
                    a + b for a, b in zip(importance, moved, strict=True)]
            anchor = [p.detach().clone() for p in parameters]
            path = [torch.zeros_like(p) for p in parameters]
        seconds = time.perf_counter() - started
        print(f"seed {seed}: task {task.index + 1}/{len(stream.tasks)} ({seconds:.0f} s)",
              file=sys.stderr)
    result = {"acc": 100 * sum(accuracies(model, stream)) / num_tasks}
    if average is not None:
        result["acc_ema"] = 100 * sum(accuracies(average, stream)) / num_tasks
    return result


if __name__ == "__main__":
    main()
