"""The MNIST rows of the DER table (Buzzega et al. 2020, Table 2) run through cl: every method at
buffers 200 and 500 (or none) on Seq-MNIST, Permuted MNIST and Rotated MNIST, 5 seeds each,
against the published means; then cl's compositions.

Protocol (aimagelab/mammoth at its first commit, the code that published the table): MLP
784-100-100-10 (Xavier-uniform weights, zero biases), plain SGD without momentum, one epoch per
task, pixels / 255 only, one 10-way head.
- seq-mnist: 5 tasks of 2 classes in natural order, batch 10, class-IL; task-IL from the same
  run with the logits masked to each task's classes.
- perm-mnist, rot-mnist: 20 tasks over all of MNIST, batch 128, domain-IL. A task is a seeded
  random pixel permutation or a rotation by a seeded angle in [0, 180) degrees; cl keeps task 0
  unpermuted / upright (the reference permutes and rotates every task).
Each method's learning rate, buffer draw size and weights are the reference's best arguments
(utils/best_args.py at the same commit), cited per entry below. Every run is one process with
one torch thread; each finished run is appended to a JSON-lines file, so an interrupted
invocation picks up where it stopped.

The compositions (cl's own) are families of candidate settings, each run with 10% of every
task's training rows held out; per family the candidate with the best validation ACC is chosen
and trained again on all the rows with the same seeds (the reference's protocol: settings chosen
on a validation split, numbers from runs on the full training set).

    python bench/reproduce_mnist_table.py --data ../shared/data/mnist.npz
    python bench/reproduce_mnist_table.py --data ... --benchmarks perm-mnist --methods der,derpp
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPRODUCED_WITHIN = 2.0  # points: a published mean counts as reproduced within this distance

# Published means, Buzzega et al. 2020, Table 2, as in the README table of aimagelab/mammoth's
# first commit: {method: {buffer: mean}}; Seq-MNIST as (class-IL, task-IL). "-": not published.
PUBLISHED: dict[str, dict[str, dict[str, float | tuple[float, float]]]] = {
    "seq-mnist": {
        "joint": {"none": (95.57, 99.51)}, "naive": {"none": (19.60, 94.94)},
        "ewc": {"none": (20.46, 98.39)}, "si": {"none": (19.27, 96.00)},
        "distill": {"none": (19.62, 94.11)},
        "replay": {"200": (80.43, 97.86), "500": (86.12, 99.04)},
        "agem": {"200": (45.72, 98.61), "500": (46.66, 98.93)},
        "der": {"200": (84.55, 98.80), "500": (90.54, 98.84)},
        "derpp": {"200": (85.61, 98.76), "500": (91.00, 98.94)},
    },
    "perm-mnist": {
        "joint": {"none": 94.33}, "naive": {"none": 40.70}, "ewc": {"none": 75.79},
        "si": {"none": 65.86},
        "replay": {"200": 72.37, "500": 80.60}, "agem": {"200": 66.42, "500": 67.56},
        "der": {"200": 81.74, "500": 87.29}, "derpp": {"200": 83.58, "500": 88.21},
    },
    "rot-mnist": {
        "joint": {"none": 95.76}, "naive": {"none": 67.66}, "ewc": {"none": 77.35},
        "si": {"none": 71.91},
        "replay": {"200": 85.01, "500": 88.91}, "agem": {"200": 81.91, "500": 80.31},
        "der": {"200": 90.04, "500": 92.24}, "derpp": {"200": 90.43, "500": 92.77},
    },
}

# Why a published mean is not the one to expect from a correct implementation.
CAUSES = {
    ("seq-mnist", "distill"): "the published LwF row trained without distillation: mammoth's "
    "LwF snapshots its teacher in a begin-task hook its training loop never called, so the row "
    "is SGD with weight decay (../shared/REPRODUCTION.md). A working LwF lands at about 21.5 / "
    "98.8 in a plain PyTorch loop under the same protocol.",
    ("perm-mnist", "ewc"): "not in cl: mammoth's ewc_on written out by hand "
    "(bench/by_hand.py --method ewc_on: per-row Fisher weighted by p(y|x), penalty lambda * "
    "sum F (w - w*)^2, lambda 0.7, gamma 1, lr 0.1, batch 128) on the same stream gives what cl "
    "gives (20 tasks, seed 0: 59.67 by hand, 59.91 in cl; bench/results/by_hand_ewc_on.json). "
    "With the published lambda the penalty is weak: the published code and settings do not "
    "reach the published mean here.",
    ("perm-mnist", "si"): "not in cl: mammoth's si written out by hand (bench/by_hand.py "
    "--method si: gradients clipped to [-1, 1], omega += lr * g^2, c 0.5, xi 1, lr 0.1, batch "
    "128) on the same stream gives 67.36 +- 1.11 over seeds 0-4 (cl 67.94 +- 0.83; "
    "bench/results/by_hand_si.json): the published code and settings land 1.5-2 points above "
    "the published mean here",
}
# Rotated MNIST draws its 19 angles from the seed: the spread over seeds of a method without a
# large buffer (std 6-8 points; seed 3's angles cost such methods 5-15 points) is larger than
# the 2-point criterion, and larger than these differences.
for _method in ("naive", "si", "agem", "ewc", "distill"):
    CAUSES["rot-mnist", _method] = (
        "within the spread over seeds: each seed draws its own rotation angles, and the "
        "5 runs' standard deviation is about as large as the distance to the published mean")


@dataclass(frozen=True)
class Benchmark:
    stream: str
    num_tasks: int
    batch_size: int
    eval_on: str  # domain-IL needs the final row only; Seq-MNIST keeps the whole matrix


BENCHMARKS = {
    "seq-mnist": Benchmark("split-mnist", 5, 10, "all"),
    "perm-mnist": Benchmark("permuted-mnist", 20, 128, "final"),
    "rot-mnist": Benchmark("rotated-mnist", 20, 128, "final"),
}


@dataclass(frozen=True)
class Method:
    lr: float
    strategy: tuple[str, ...] = ()
    weight_decay: float = 0.0
    joint: bool = False
    val_fraction: float = 0.0  # > 0 for the compositions, whose settings validation chooses


def reference_methods(benchmark: str) -> dict[tuple[str, str], Method]:
    """The published protocol's settings, (method, buffer) -> Method. Learning rates, draw
    sizes (minibatch_size) and weights: mammoth's utils/best_args.py at its first commit."""
    seq = benchmark == "seq-mnist"
    sgd_lr = 0.03 if seq else 0.2
    methods = {("naive", "none"): Method(sgd_lr), ("joint", "none"): Method(sgd_lr, joint=True)}
    # LwF: seq-mnist's published settings (alpha 1, temperature 2, weight decay 5e-4); the
    # domain-IL benchmarks have no LwF row, so it runs there with the SGD learning rate.
    methods["distill", "none"] = Method(sgd_lr, ("distill:alpha=1,temperature=2",),
                                        weight_decay=5e-4 if seq else 0.0)
    if seq:
        methods["ewc", "none"] = Method(0.03, ("ewc:strength=90,gamma=1",))
        methods["si", "none"] = Method(0.1, ("si:strength=1,damping=0.9,clip_value=1",))
    else:
        methods["ewc", "none"] = Method(0.1, ("ewc:strength=0.7,gamma=1",))
        si = "si:strength=0.5,damping=1,clip_value=1" if benchmark == "perm-mnist" \
            else "si:strength=1,damping=1,clip_value=1"
        methods["si", "none"] = Method(0.1, (si,))
    for size in (200, 500):
        buffer = str(size)
        if seq:
            er_lr, er_draw = (0.01, 10) if size == 200 else (0.1, 10)
            der = (0.03, 10, 0.2) if size == 200 else (0.03, 128, 1.0)
            derpp = (0.03, 128, 0.2, 1.0) if size == 200 else (0.03, 10, 1.0, 0.5)
            agem_lr = 0.1
        else:
            er_lr, er_draw = 0.2, 128
            if benchmark == "perm-mnist":
                der = (0.2, 128, 1.0)
                derpp = (0.1, 128, 1.0, 1.0) if size == 200 else (0.2, 128, 1.0, 0.5)
                agem_lr = 0.1
            else:
                der = (0.2, 128, 1.0) if size == 200 else (0.2, 128, 0.5)
                derpp = (0.1, 128, 1.0, 0.5) if size == 200 else (0.2, 128, 0.5, 1.0)
                agem_lr = 0.1 if size == 200 else 0.3
        methods["replay", buffer] = Method(er_lr, (
            f"replay:capacity={size},batch_size={er_draw}",))
        # ER-ACE has no MNIST row or settings in the reference: ER's are used.
        methods["er_ace", buffer] = Method(er_lr, (
            f"er_ace:capacity={size},batch_size={er_draw}",))
        methods["agem", buffer] = Method(agem_lr, (f"agem:capacity={size},batch_size=128",))
        lr, draw, alpha = der
        methods["der", buffer] = Method(lr, (
            f"der:capacity={size},alpha={alpha},batch_size={draw}",))
        lr, draw, alpha, beta = derpp
        methods["derpp", buffer] = Method(lr, (
            f"derpp:capacity={size},alpha={alpha},beta={beta},batch_size={draw}",))
    return methods


# cl's compositions, each a family of candidate settings; per family and buffer the candidate
# with the best mean validation ACC (10% of each task's training rows held out, seeded and
# stratified, as `cl run --val-fraction 0.1`) is chosen, and its test numbers are reported:
# the same rule as `cl report --select-on val`. The base settings are the reference's best ones
# for the method composed with (its learning rate, draw size and weights); validation chooses
# only what the composition adds.
VAL_FRACTION = 0.1
EMA_DECAYS = (0.99, 0.995, 0.999)
# Validation chose the slowest average, 0.999, for most families at first: the grid's edge, so
# it was extended by one slower step for the families where that happened (ER-ACE's chose
# 0.99 or 0.995, and 0.999 cost it about 14 points on validation).
SLOW_EMA_DECAYS = (*EMA_DECAYS, 0.9995)
# The targets for the best composition (class-IL on Seq-MNIST, domain-IL elsewhere).
TARGETS = {("seq-mnist", "500"): 93.0, ("seq-mnist", "200"): 91.0,
           ("perm-mnist", "500"): 89.0, ("rot-mnist", "500"): 93.5}


def compositions(benchmark: str) -> dict[tuple[str, str], list[Method]]:
    """(family, buffer) -> candidates: Seq-MNIST at both buffers (its class-IL targets are at
    200 and 500), the domain-IL benchmarks at 500 (their targets)."""
    reference = reference_methods(benchmark)
    seq = benchmark == "seq-mnist"
    families: dict[tuple[str, str], list[Method]] = {}
    for buffer in ("200", "500") if seq else ("500",):
        derpp, replay = reference["derpp", buffer], reference["replay", buffer]
        ace = reference["er_ace", buffer]
        families["derpp+ema", buffer] = [
            Method(derpp.lr, (*derpp.strategy, f"ema:decay={decay}"), val_fraction=VAL_FRACTION)
            for decay in SLOW_EMA_DECAYS]
        # ER whose replayed rows also match the logits stored with them (KL, T = 2), and EMA;
        # the learning rate is chosen too, from the reference ER's and two larger ones.
        rates = sorted({replay.lr, 0.03, 0.1}) if seq else (replay.lr,)
        families["replay+distill+ema", buffer] = [
            Method(lr, (f"{replay.strategy[0]},store_logits=true",
                        "distill:targets=buffer,alpha=1,temperature=2", f"ema:decay={decay}"),
                   val_fraction=VAL_FRACTION)
            for lr in rates for decay in SLOW_EMA_DECAYS]
        if seq:
            families["er_ace+ema", buffer] = [
                Method(ace.lr, (ace.strategy[0], f"ema:decay={decay}"),
                       val_fraction=VAL_FRACTION) for decay in EMA_DECAYS]
            # ER-ACE with stored logits (alpha: the squared error toward them, on its draw).
            families["er_ace+stored logits+ema", buffer] = [
                Method(ace.lr, (f"{ace.strategy[0]},alpha={alpha}", "ema:decay=0.995"),
                       val_fraction=VAL_FRACTION) for alpha in (0.1, 0.3)]
    return families


def method_key(method: Method) -> str:
    """A short hash of a method's settings: a cached run counts only for the same settings."""
    settings = [method.lr, list(method.strategy), method.weight_decay, method.joint]
    if method.val_fraction:
        settings.append(method.val_fraction)
    return hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]


def one_run(job: tuple[str, str, str, Method, int, str]) -> dict:
    """Train one (benchmark, method, buffer) with one seed; return its final accuracies."""
    benchmark, name, buffer, method, seed, data = job
    import torch

    torch.set_num_threads(1)
    from cl.experiment import RunConfig, build
    from cl.runner import run

    protocol = BENCHMARKS[benchmark]
    config = RunConfig(tasks=protocol.stream, num_tasks=protocol.num_tasks, data=data,
                       model="mlp", hidden=(100, 100), init="xavier", optimizer="sgd",
                       lr=method.lr, weight_decay=method.weight_decay,
                       batch_size=protocol.batch_size, epochs=1, seed=seed,
                       joint=method.joint, eval_on=protocol.eval_on, threads=1,
                       val_fraction=method.val_fraction, strategy=method.strategy)
    built = build(config)
    started = time.perf_counter()
    result = run(built.model, built.stream, built.strategy, built.train)
    row = {"benchmark": benchmark, "method": name, "buffer": buffer, "seed": seed,
           "key": method_key(method), "accuracy": 100 * float(result.accuracy[-1].mean()),
           "seconds": time.perf_counter() - started}
    if benchmark == "seq-mnist":
        row["task_accuracy"] = 100 * float(result.task_accuracy[-1].mean())
    if "validation" in result.variants:
        row["validation_accuracy"] = 100 * float(
            result.variants["validation"]["accuracy"][-1].mean())
    return row


def refit(method: Method) -> Method:
    """A validation-chosen method as it trains for its reported numbers: on all the rows."""
    return dataclasses.replace(method, val_fraction=0.0)


def run_all(jobs: list[tuple], runs_path: Path, workers: int) -> None:
    """Run `jobs` in parallel, appending each finished run to `runs_path` as it lands."""
    print(f"{len(jobs)} runs to do", file=sys.stderr)
    if not jobs:
        return
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(workers) as pool:
        futures = [pool.submit(one_run, job) for job in jobs]
        for future in as_completed(futures):
            row = future.result()
            with runs_path.open("a") as file:
                file.write(json.dumps(row) + "\n")
            print(f"{row['benchmark']:<10} {row['method']:<8} {row['buffer']:>4} seed "
                  f"{row['seed']}: {row['accuracy']:6.2f}  ({row['seconds']:.0f} s)",
                  file=sys.stderr)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(benchmark: str, name: str, buffer: str, method: Method, rows: list[dict]) -> dict:
    """One cell of the table: mean and std over seeds, the published mean and a verdict."""
    rows = sorted(rows, key=lambda row: row["seed"])
    mean, std = mean_std([row["accuracy"] for row in rows])
    cell = {"mean": mean, "std": std, "seeds": [row["accuracy"] for row in rows],
            "lr": method.lr, "strategy": list(method.strategy),
            "weight_decay": method.weight_decay, "joint": method.joint,
            "seconds_per_run": statistics.fmean(row["seconds"] for row in rows)}
    published = PUBLISHED[benchmark].get(name, {}).get(buffer)
    if benchmark == "seq-mnist":
        task_mean, task_std = mean_std([row["task_accuracy"] for row in rows])
        cell["task_il"] = {"mean": task_mean, "std": task_std,
                           "seeds": [row["task_accuracy"] for row in rows],
                           "published": None if published is None else published[1]}
        published = None if published is None else published[0]
    cell["published"] = published
    if published is None:
        cell["verdict"] = "no published row"
    else:
        cell["difference"] = mean - published
        within = abs(mean - published) <= REPRODUCED_WITHIN
        if benchmark == "seq-mnist" and cell["task_il"]["published"] is not None:
            within = within and abs(task_mean - cell["task_il"]["published"]) \
                <= REPRODUCED_WITHIN
        cause = CAUSES.get((benchmark, name))
        cell["verdict"] = "reproduced" if within else (
            "differs: " + cause if cause else "differs: cause not found")
    return cell


def load_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="mnist.npz (Keras layout)")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--benchmarks", default=",".join(BENCHMARKS),
                        help="comma-separated: seq-mnist, perm-mnist, rot-mnist")
    parser.add_argument("--methods", default=None, help="comma-separated method names "
                        "(default: all)")
    parser.add_argument("--runs", default=str(RESULTS / "mnist_table_runs.jsonl"),
                        help="JSON lines of finished runs, read to skip them and appended to")
    parser.add_argument("--out", default=str(RESULTS / "mnist_table.json"))
    args = parser.parse_args()
    benchmarks = args.benchmarks.split(",")
    unknown = [name for name in benchmarks if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r} (known: {', '.join(BENCHMARKS)})")
    wanted = set(args.methods.split(",")) if args.methods else None

    runs_path = Path(args.runs)
    done = {(r["benchmark"], r["method"], r["buffer"], r["seed"], r["key"])
            for r in load_rows(runs_path)}
    jobs = []
    # Every benchmark's reference rows first, then the compositions.
    candidates = [(benchmark, name, buffer, method) for benchmark in benchmarks
                  for (name, buffer), method in reference_methods(benchmark).items()]
    candidates += [(benchmark, name, buffer, method) for benchmark in benchmarks
                   for (name, buffer), family in compositions(benchmark).items()
                   for method in family]
    for benchmark, name, buffer, method in candidates:
        if wanted is not None and name not in wanted:
            continue
        for seed in range(args.seeds):
            if (benchmark, name, buffer, seed, method_key(method)) not in done:
                jobs.append((benchmark, name, buffer, method, seed, args.data))
    run_all(jobs, runs_path, args.workers)

    def seeds_of(benchmark: str, name: str, buffer: str, method: Method) -> list[dict] | None:
        """The method's rows, one per seed (a rerun's replaces the earlier), if all are done."""
        mine = {r["seed"]: r for r in rows
                if (r["benchmark"], r["method"], r["buffer"], r["key"])
                == (benchmark, name, buffer, method_key(method)) and r["seed"] < args.seeds}
        return list(mine.values()) if len(mine) == args.seeds else None

    def chosen(benchmark: str) -> dict[tuple[str, str], tuple[float, Method, list]]:
        """Per composition family and buffer whose candidates are all done: the candidate with
        the best mean validation ACC, with every candidate's scores."""
        choices = {}
        for (family, buffer), candidates in compositions(benchmark).items():
            measured = [(method, seeds_of(benchmark, family, buffer, method))
                        for method in candidates]
            if any(mine is None for _, mine in measured):
                continue
            scored = [(statistics.fmean(r["validation_accuracy"] for r in mine), method, mine)
                      for method, mine in measured]
            choices[family, buffer] = scored
        return choices

    # The reference protocol's last step: the chosen settings train again on all of each task's
    # training rows (Buzzega et al. chose on a 10% validation split, then reported runs on the
    # full training set), same seeds; those runs' test ACC is the composition's number.
    rows = load_rows(runs_path)
    refits = []
    for benchmark in benchmarks:
        for (family, buffer), scored in chosen(benchmark).items():
            method = refit(max(scored, key=lambda item: item[0])[1])
            if wanted is not None and family not in wanted:
                continue
            refits += [(benchmark, family, buffer, method, seed, args.data)
                       for seed in range(args.seeds)
                       if (benchmark, family, buffer, seed, method_key(method)) not in done]
    run_all(refits, runs_path, args.workers)

    rows = load_rows(runs_path)
    document = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    for benchmark in BENCHMARKS:
        methods: dict[str, dict] = {}
        for (name, buffer), method in reference_methods(benchmark).items():
            if (mine := seeds_of(benchmark, name, buffer, method)) is not None:
                methods.setdefault(name, {})[buffer] = summarise(benchmark, name, buffer,
                                                                 method, mine)
        for (family, buffer), scored in chosen(benchmark).items():
            score, method, held_out = max(scored, key=lambda item: item[0])  # first of equals
            if (mine := seeds_of(benchmark, family, buffer, refit(method))) is None:
                continue
            cell = summarise(benchmark, family, buffer, method, mine)
            cell["family"] = family
            cell["validation_mean"] = score
            cell["val_fraction"] = method.val_fraction
            # The chosen settings' test ACC when trained without the held-out rows.
            cell["held_out_run_mean"] = statistics.fmean(r["accuracy"] for r in held_out)
            cell["candidates"] = [{"strategy": list(m.strategy), "lr": m.lr,
                                   "validation_mean": value,
                                   "test_mean": statistics.fmean(r["accuracy"] for r in rows_)}
                                  for value, m, rows_ in scored]
            if (target := TARGETS.get((benchmark, buffer))) is not None:
                cell["target"] = target
                cell["verdict"] = "meets the target" if cell["mean"] >= target \
                    else "below the target"
            methods.setdefault("+".join(method.strategy), {})[buffer] = cell
        if methods:
            protocol = BENCHMARKS[benchmark]
            entry = document.setdefault(benchmark, {})
            entry["protocol"] = {"stream": protocol.stream, "num_tasks": protocol.num_tasks,
                                 "batch_size": protocol.batch_size, "epochs": 1,
                                 "model": "mlp 784-100-100-10, xavier", "optimizer": "sgd",
                                 "scenario": "class" if benchmark == "seq-mnist" else "domain"}
            entry["methods"] = {**{name: cells for name, cells in entry.get("methods", {}).items()
                                   if not any(c.get("family") for c in cells.values())},
                                **methods}
    document["source"] = ("published means: Buzzega et al. 2020, Table 2, as in the README of "
                          "aimagelab/mammoth's first commit; settings: its utils/best_args.py")
    document["seeds"] = list(range(args.seeds))
    document["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "python": platform.python_version(), "threads_per_run": 1}
    Path(args.out).write_text(json.dumps(document, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
