"""cl on one GPU: the runner against hand-written loops, and MiniLM fine-tuning in fp32 and bf16.

Part 1, split-mnist (5 tasks x 2 classes, class-IL), MLP 784-400-400-10, SGD lr 0.01, batch 128,
one epoch per task, every task evaluated before training and after each task:

- `naive`: plain fine-tuning;
- `der`: DER-style replay as cl composes it, `replay:capacity=500,store_logits=true` then
  `distill:targets=buffer,alpha=1,temperature=2` (each batch gets as many replayed rows as it
  has fresh ones, and a KL at T = 2 pulls the replayed rows' logits toward the ones the buffer
  stored with them).

Each is cl's `run` in process against a hand-written loop on the same device doing the same
work: the same tensors on the device, the same initial weights, the same seeded batch order, the
loss read back once every 50 steps. For `der` the hand loop keeps its own minimal reservoir
buffer on the device (algorithm R without a host round trip), so it draws other rows than cl's
buffer: its accuracy matrix differs by chance and only the times are compared. One warm-up run
of each side, then the sides alternate over `--repeats` repeats (synchronised with
torch.cuda.synchronize() on cuda); medians, the ratio cl / hand, samples/s, peak GPU memory.

Part 2, text-cl (agnews -> amazon -> dbpedia -> yelp, task scenario) with `--model minilm`, one
epoch per task, AdamW: full fine-tuning (lr 5e-5) and `lora:rank=8,alpha=16` (lr 5e-4), each in
fp32 and bf16 (`precision`), each through `cl.experiment.execute` into a scratch directory:
train and eval samples/s from metrics.json, ACC, BWT, peak GPU memory. Skipped, with the reason
recorded, when the text extra (`pip install -e ".[text]"`) or the data is missing.

Sized to finish in under 5 minutes on one H100 (a time budget skips the text runs that would
not fit); `--quick` shrinks everything so that the script runs on a CPU in seconds.

    python bench/gpu.py --data ../shared/data/mnist.npz --text-data ../shared/data/text
    python bench/gpu.py --device cpu --quick --skip-text --data ../shared/data/mnist.npz \
        --out /tmp/gpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gpu.json"
STARTED = time.perf_counter()

# Part 1: the workload of bench/overhead.py.
HIDDEN = (400, 400)
LR = 0.01
BATCH_SIZE = 128
EVAL_BATCH_SIZE = 1024
LOG_EVERY = 50  # the hand loops read the loss back once a window, as cl does on accelerators
CAPACITY = 500
ALPHA, TEMPERATURE = 1.0, 2.0
CASES = {
    "naive": (),
    "der": (f"replay:capacity={CAPACITY},store_logits=true",
            f"distill:targets=buffer,alpha={ALPHA:g},temperature={TEMPERATURE:g}"),
}

# Part 2: the settings of bench/text_cl.py, with larger caps and batches for a GPU.
TEXT_SETS = ("agnews", "amazon", "dbpedia", "yelp")
TEXT_METHODS = {
    "finetune": (5e-5, ()),
    "lora": (5e-4, ("lora:rank=8,alpha=16",)),
}
PRECISIONS = ("fp32", "bf16")

# Sizes: (full, --quick).
SIZES = {
    "mnist_train_per_task": (None, 128),
    "mnist_test_per_task": (None, 64),
    "repeats": (9, 1),
    "text_train_per_task": (4000, 8),
    "text_test_per_task": (1000, 8),
    "text_batch_size": (32, 8),
    "text_max_length": (64, 16),
}


def log(message: str) -> None:
    print(f"[gpu.py {time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr,
          flush=True)


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="path to mnist.npz (Keras layout)")
    parser.add_argument("--text-data", default=None,
                        help="directory of agnews, amazon, dbpedia, yelp (or one holding text/)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repeats per side (default {SIZES['repeats'][0]}, "
                             f"{SIZES['repeats'][1]} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes: the whole script in seconds on a CPU (a smoke test)")
    parser.add_argument("--skip-text", action="store_true", help="skip part 2 (MiniLM)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch's CPU threads (default: torch's choice; 1 with --quick on "
                             "the CPU, where tiny batches gain nothing from more)")
    parser.add_argument("--text-train-per-task", type=int, default=None)
    parser.add_argument("--text-test-per-task", type=int, default=None)
    parser.add_argument("--text-batch-size", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=270.0,
                        help="text runs that would end after this many seconds of the script "
                             "are skipped (default 270: the whole script within 5 minutes)")
    parser.add_argument("--out", default=str(RESULTS))
    return parser.parse_args()


def size(args: argparse.Namespace, name: str):
    given = getattr(args, name, None)
    if given is not None:
        return given
    return SIZES[name][1 if args.quick else 0]


# -- device helpers -----------------------------------------------------------------------------


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device, release: bool = False) -> None:
    """Start a new peak of GPU memory; `release` also hands the allocator's cached blocks back
    (between text runs; not before timed repeats, which would then pay for fresh allocations)."""
    import torch

    gc.collect()
    if device.type == "cuda":
        if release:
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def on_device(stream, device):
    """The stream with every tensor on `device`, made once and shared by both sides."""
    from cl.types import Split, Stream, Task, to_device

    for task in stream.tasks:  # the hand loops index the stored rows: nothing to apply to them
        assert getattr(task.train, "transform", None) is None, "a stream with row transforms"
    if device.type == "cpu":
        return stream

    def moved(split):
        return Split(to_device(split.x, device), split.y.to(device))

    tasks = tuple(Task(task.name, task.index, moved(task.train), moved(task.test), task.classes)
                  for task in stream.tasks)
    return Stream(stream.name, tasks, stream.scenario, stream.num_classes, stream.input_shape)


# -- part 1: the hand-written loops -------------------------------------------------------------


def hand_evaluate(model, tasks, device) -> list[float]:
    """Accuracy on every task: correct counts summed on the device, read once per task."""
    import torch

    from cl.models import model_input

    model.eval()
    row = []
    with torch.inference_mode():
        for task in tasks:
            correct = torch.zeros((), dtype=torch.long, device=device)
            for start in range(0, len(task.test), EVAL_BATCH_SIZE):
                x = task.test.x[start:start + EVAL_BATCH_SIZE]
                y = task.test.y[start:start + EVAL_BATCH_SIZE]
                correct += (model(model_input(x)).argmax(1) == y).sum()
            row.append(correct.item() / len(task.test))
    model.train()
    return row


def check_window(window, steps: int, task) -> None:
    loss = window.item() / steps
    if not math.isfinite(loss):
        raise RuntimeError(f"hand loop: loss {loss} on task {task.index}")


def hand_naive(model, stream, seed: int, device) -> tuple:
    """Plain fine-tuning, as a researcher would write it for a GPU."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cl.models import model_input

    tasks = stream.tasks
    generator = torch.Generator().manual_seed(seed)
    hand_evaluate(model, tasks, device)  # the row before any training, as cl computes it
    rows, train_rows = [], 0
    for task in tasks:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        order = torch.randperm(len(task.train), generator=generator).to(device)
        window, steps = torch.zeros((), dtype=torch.float64, device=device), 0
        for start in range(0, len(task.train), BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            loss = F.cross_entropy(model(model_input(task.train.x[index])), task.train.y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            train_rows += len(index)
            window += loss.detach()
            steps += 1
            if steps == LOG_EVERY:
                check_window(window, steps, task)
                window, steps = torch.zeros_like(window), 0
        if steps:
            check_window(window, steps, task)
        rows.append(hand_evaluate(model, tasks, device))
    return np.array(rows), train_rows


def kl_to_stored(stored, logits, mask):
    """alpha T^2 mean KL(softmax(stored/T) || softmax(logits/T)) over the classes in `mask`."""
    import torch

    lowest = torch.finfo(torch.float32).min
    teacher, student = stored.float() / TEMPERATURE, logits.float() / TEMPERATURE
    log_p = (teacher - torch.logsumexp(teacher.masked_fill(~mask, lowest), 1, keepdim=True)
             ).masked_fill(~mask, 0.0)
    log_q = (student - torch.logsumexp(student.masked_fill(~mask, lowest), 1, keepdim=True)
             ).masked_fill(~mask, 0.0)
    return ALPHA * TEMPERATURE ** 2 * (log_p.exp() * mask * (log_p - log_q)).sum(1).mean()


class DeviceReservoir:
    """A minimal reservoir buffer (algorithm R) that never leaves the device: one extra row
    takes the writes of dropped rows, so no step waits for the host."""

    def __init__(self, capacity: int, like, num_classes: int, generator, device) -> None:
        import torch

        self.capacity, self.seen, self.generator, self.device = capacity, 0, generator, device
        self.x = torch.zeros((capacity + 1, *like.shape[1:]), dtype=like.dtype, device=device)
        self.y = torch.zeros(capacity + 1, dtype=torch.long, device=device)
        self.task = torch.zeros(capacity + 1, dtype=torch.long, device=device)
        self.logits = torch.zeros((capacity + 1, num_classes), device=device)
        self.last = torch.empty(capacity + 1, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return min(self.capacity, self.seen)

    def sample(self, count: int):
        import torch

        pick = torch.randperm(len(self), generator=self.generator, device=self.device)[:count]
        return self.x[pick], self.y[pick], self.task[pick], self.logits[pick]

    def insert(self, x, y, task: int, logits) -> None:
        import torch

        count = len(y)
        rows = torch.arange(count, device=self.device)
        position = self.seen + rows
        if self.seen + count <= self.capacity:
            slots = position
        else:
            draws = torch.rand(count, generator=self.generator, device=self.device,
                               dtype=torch.float64)
            slots = torch.where(position < self.capacity, position,
                                (draws * (position + 1)).long())
            slots = slots.clamp_(max=self.capacity)  # a draw past the buffer: the spare row
            # Two rows aimed at one slot: the later wins, as if inserted one at a time.
            self.last.fill_(-1).scatter_reduce_(0, slots, rows, reduce="amax")
            slots = torch.where(self.last[slots] == rows, slots, self.capacity)
        self.x[slots] = x
        self.y[slots] = y
        self.task[slots] = task
        self.logits[slots] = logits
        self.seen += count


def hand_der(model, stream, seed: int, device) -> tuple:
    """Replay with stored logits and a KL toward them on the replayed rows (DER-style)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cl.models import model_input

    tasks = stream.tasks
    class_mask = torch.zeros((len(tasks), stream.num_classes), dtype=torch.bool)
    for task in tasks:
        class_mask[task.index, list(task.classes)] = True
    seen_mask = (class_mask.cumsum(0) > 0).to(device)  # row t: the classes of tasks 0..t
    order_generator = torch.Generator().manual_seed(seed)
    buffer = DeviceReservoir(CAPACITY, tasks[0].train.x, stream.num_classes,
                             torch.Generator(device=device).manual_seed(seed + 1), device)
    hand_evaluate(model, tasks, device)
    rows, train_rows = [], 0
    for task in tasks:
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        order = torch.randperm(len(task.train), generator=order_generator).to(device)
        window, steps = torch.zeros((), dtype=torch.float64, device=device), 0
        for start in range(0, len(task.train), BATCH_SIZE):
            index = order[start:start + BATCH_SIZE]
            x, y = task.train.x[index], task.train.y[index]
            fresh = len(y)
            replayed = len(buffer) > 0
            if replayed:
                old_x, old_y, old_task, old_logits = buffer.sample(fresh)
                x, y = torch.cat([x, old_x]), torch.cat([y, old_y])
            logits = model(model_input(x))
            loss = F.cross_entropy(logits, y)
            if replayed:
                loss = loss + kl_to_stored(old_logits, logits[fresh:], seen_mask[old_task])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            buffer.insert(x[:fresh], y[:fresh], task.index, logits[:fresh].detach())
            train_rows += len(y)
            window += loss.detach()
            steps += 1
            if steps == LOG_EVERY:
                check_window(window, steps, task)
                window, steps = torch.zeros_like(window), 0
        if steps:
            check_window(window, steps, task)
        rows.append(hand_evaluate(model, tasks, device))
    return np.array(rows), train_rows


HAND = {"naive": hand_naive, "der": hand_der}


def strategies_of(specs: tuple[str, ...]):
    """The strategy chain of the spec strings, built as `cl run` builds it."""
    from cl.experiment import RunConfig, plan

    return plan(RunConfig(tasks="split-mnist", strategy=specs)).strategy


def with_cl(strategy, model, stream, seed: int, device) -> tuple:
    """cl's `run` in process."""
    from cl.runner import TrainConfig, run

    config = TrainConfig(optimizer="sgd", lr=LR, batch_size=BATCH_SIZE, epochs=1,
                         eval_batch_size=EVAL_BATCH_SIZE, log_every=LOG_EVERY, seed=seed,
                         device=str(device))
    result = run(model, stream, strategy, config)
    return result.accuracy, result.train_rows


def mnist_part(args: argparse.Namespace, device, repeats: int) -> dict:
    import numpy as np

    from cl.models import build_mlp, build_seeded
    from cl.sampling import cap_stream
    from cl.types import StreamOptions
    from tasks.builtin import split_mnist

    stream = split_mnist(StreamOptions(data=args.data, seed=args.seed))
    stream = cap_stream(stream, size(args, "mnist_train_per_task"),
                        size(args, "mnist_test_per_task"), args.seed)
    stream = on_device(stream, device)
    shape, classes = stream.input_shape, stream.num_classes

    def fresh_model():
        return build_seeded(build_mlp, shape, classes, HIDDEN, "default", args.seed).to(device)

    workload = {"stream": "split-mnist", "scenario": stream.scenario, "tasks": len(stream.tasks),
                "train_rows": sum(len(t.train) for t in stream.tasks),
                "test_rows": sum(len(t.test) for t in stream.tasks),
                "model": "mlp 784-400-400-10", "optimizer": "sgd", "lr": LR,
                "batch_size": BATCH_SIZE, "epochs_per_task": 1,
                "eval_batch_size": EVAL_BATCH_SIZE, "loss_read_every": LOG_EVERY,
                "evaluation": "every task, before training and after each task",
                "warmup_runs_per_side": 1, "repeats": repeats,
                "samples_per_second": "training rows forwarded (replayed rows included) per "
                                      "second of the whole run, evaluations included",
                "peak_gpu_memory_mb": "torch.cuda.max_memory_allocated over a run, the "
                                      "stream's tensors (shared by both sides) included"}
    cases = {}
    for case, specs in CASES.items():
        # Each side's model (and cl's strategies) are made outside the timed region.
        sides = {"cl": lambda model, strategy: with_cl(strategy, model, stream, args.seed, device),
                 "hand": lambda model, _, case=case: HAND[case](model, stream, args.seed, device)}
        prepare = {"cl": lambda specs=specs: strategies_of(specs), "hand": lambda: None}
        matrices, rows, seconds, peaks = {}, {}, {"cl": [], "hand": []}, {"cl": [], "hand": []}
        log(f"split-mnist {case}: warm-up")
        for side, function in sides.items():
            matrices[side], rows[side] = function(fresh_model(), prepare[side]())
        for repeat in range(repeats):
            for side in (("hand", "cl") if repeat % 2 == 0 else ("cl", "hand")):
                model, extra = fresh_model(), prepare[side]()
                reset_peak(device)
                synchronize(device)
                started = time.perf_counter()
                matrices[side], rows[side] = sides[side](model, extra)
                synchronize(device)
                seconds[side].append(time.perf_counter() - started)
                peaks[side].append(peak_mb(device))
                del model, extra
            log(f"split-mnist {case} repeat {repeat + 1}/{repeats}: hand "
                f"{seconds['hand'][-1]:.3f} s, cl {seconds['cl'][-1]:.3f} s")
        median = {side: statistics.median(values) for side, values in seconds.items()}
        difference = float(np.abs(matrices["cl"] - matrices["hand"]).max())
        entry = {
            "strategy": list(specs),
            "ratio_cl_over_hand": median["cl"] / median["hand"],
            "accuracy_matrix_max_abs_diff": difference,
            "identical_accuracy_matrix": difference == 0.0,
        }
        if case == "naive":
            entry["r_compared"] = True
            entry["r_note"] = ("same work on both sides: the accuracy matrices should be equal "
                               "(bit for bit on the CPU)")
        else:
            entry["r_compared"] = False
            entry["r_note"] = ("the hand loop's reservoir draws its rows from a generator on the "
                               "device, cl's buffer from one on the host: other rows are "
                               "replayed, so the matrices differ by chance and only the times "
                               "are compared")
        for side in ("cl", "hand"):
            entry[side] = {
                "seconds": seconds[side],
                "median_seconds": median[side],
                "train_rows": rows[side],  # replayed rows included
                "samples_per_second": rows[side] / median[side],
                "acc": float(matrices[side][-1].mean()),
                "accuracy_matrix": matrices[side].tolist(),
                "peak_gpu_memory_mb": max(peaks[side]) if device.type == "cuda" else None,
            }
        if case == "naive" and difference:
            log(f"warning: split-mnist naive: the accuracy matrices differ by up to "
                f"{difference:.3g}: the two sides did not do the same work"
                + ("" if device.type == "cpu" else f" (or {device.type} kernels are not "
                   "deterministic)"))
        log(f"split-mnist {case}: hand {median['hand']:.3f} s, cl {median['cl']:.3f} s, "
            f"ratio {entry['ratio_cl_over_hand']:.3f}, max |R diff| {difference:.3g}")
        cases[case] = entry
    return {"workload": workload, "cases": cases}


# -- part 2: MiniLM ------------------------------------------------------------------------------


def text_directory(given: str | None) -> tuple[Path | None, str | None]:
    """The directory holding the four sets, or why there is none."""
    if given is None:
        return None, "no --text-data given"
    for candidate in (Path(given), Path(given) / "text"):
        if all((candidate / name / "train.jsonl").is_file()
               and (candidate / name / "test.jsonl").is_file() for name in TEXT_SETS):
            return candidate.resolve(), None
    return None, (f"{given} holds no {'/'.join(TEXT_SETS)} sets "
                  "(<name>/train.jsonl and test.jsonl)")


def text_unavailable(args: argparse.Namespace) -> tuple[Path | None, str | None]:
    if args.skip_text:
        return None, "--skip-text"
    directory, reason = text_directory(args.text_data)
    if reason is not None:
        return None, reason
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None, "transformers is not installed (pip install -e '.[text]')"
    from cl.backbones import MINILM
    from cl.errors import UsageError

    try:
        MINILM.source("")
    except UsageError as error:
        return None, str(error)
    return directory, None


def text_part(args: argparse.Namespace, device, directory: Path) -> dict:
    from cl.errors import one_line
    from cl.experiment import CONFIG_KEYS, RunConfig, execute

    has_precision = "precision" in CONFIG_KEYS
    train_cap, test_cap = size(args, "text_train_per_task"), size(args, "text_test_per_task")
    batch_size, max_length = size(args, "text_batch_size"), size(args, "text_max_length")
    settings = {"stream": f"text-cl:max_length={max_length}", "data": str(directory),
                "model": "minilm (all-MiniLM-L6-v2)", "scenario": "task", "epochs": 1,
                "optimizer": "adamw", "batch_size": batch_size, "train_per_task": train_cap,
                "test_per_task": test_cap, "seed": args.seed,
                "precision_supported": has_precision,
                "lr": {name: lr for name, (lr, _) in TEXT_METHODS.items()},
                "strategy": {name: list(specs) for name, (_, specs) in TEXT_METHODS.items()}}
    try:
        import peft  # noqa: F401
        lora_missing = None
    except ImportError:
        lora_missing = "peft is not installed (pip install -e '.[text]')"
    runs: dict[str, dict] = {}
    longest = 0.0
    with tempfile.TemporaryDirectory(prefix="cl-gpu-bench-") as scratch:
        # Tokenized splits are cached by cl; unless told where, in the scratch directory (the
        # first run tokenizes, the others read the cache; nothing is left behind).
        if not os.environ.get("CL_CACHE_DIR"):
            os.environ["CL_CACHE_DIR"] = str(Path(scratch) / "tokenized")
            settings["tokenizer_cache"] = "scratch directory (first run tokenizes)"
        else:
            settings["tokenizer_cache"] = os.environ["CL_CACHE_DIR"]
        for method, (lr, specs) in TEXT_METHODS.items():
            for precision in PRECISIONS:
                name = f"{method}-{precision}"
                elapsed = time.perf_counter() - STARTED
                if precision != "fp32" and not has_precision:
                    runs[name] = {"status": "skipped: this cl has no precision setting "
                                            "(RunConfig.precision)"}
                    continue
                if method == "lora" and lora_missing:
                    runs[name] = {"status": f"skipped: {lora_missing}"}
                    continue
                if elapsed + longest > args.budget_s:
                    runs[name] = {"status": f"skipped: time budget ({elapsed:.0f} s spent, the "
                                            f"longest text run took {longest:.0f} s, budget "
                                            f"{args.budget_s:.0f} s)"}
                    log(f"text {name}: skipped (time budget)")
                    continue
                extra = {"precision": precision} if has_precision else {}
                config = RunConfig(tasks=f"text-cl:max_length={max_length}", data=str(directory),
                                   model="minilm", scenario="task", train_per_task=train_cap,
                                   test_per_task=test_cap, epochs=1, batch_size=batch_size,
                                   optimizer="adamw", lr=lr, strategy=specs, seed=args.seed,
                                   device=str(device), **extra)
                log(f"text {name}: running")
                reset_peak(device, release=True)
                started = time.perf_counter()
                try:
                    _, metrics = execute(config, Path(scratch) / name, checkpoint=False)
                except Exception as error:  # recorded; the other runs go on
                    traceback.print_exc()
                    runs[name] = {"status": f"error: {type(error).__name__}: {one_line(error)}"}
                    log(f"text {name}: {runs[name]['status']}")
                    continue
                finally:
                    synchronize(device)
                wall = time.perf_counter() - started
                longest = max(longest, wall)
                runs[name] = {
                    "status": "ran",
                    "method": method,
                    "precision": precision,
                    "strategy": list(specs),
                    "lr": lr,
                    "acc": metrics["acc"],
                    "bwt": metrics["bwt"],
                    "per_task_final": dict(zip(metrics["task_names"],
                                               metrics["accuracy_matrix"][-1], strict=True)),
                    "accuracy_matrix": metrics["accuracy_matrix"],
                    "train_samples_per_second": metrics["train_samples_per_second"],
                    "eval_samples_per_second": metrics["eval_samples_per_second"],
                    "train_seconds": metrics["train_seconds"],
                    "eval_seconds": metrics["eval_seconds"],
                    "train_rows": metrics["train_rows"],
                    "eval_rows": metrics["eval_rows"],
                    "steps": metrics["steps"],
                    "trainable_parameters": metrics["trainable_parameters"],
                    "peak_gpu_memory_mb": peak_mb(device),
                    "peak_rss_mb": metrics["peak_rss_mb"],
                    "wall_seconds": wall,
                }
                log(f"text {name}: ACC {100 * metrics['acc']:.2f}, train "
                    f"{metrics['train_samples_per_second']:.0f}/s, eval "
                    f"{metrics['eval_samples_per_second']:.0f}/s, {wall:.1f} s")
                gc.collect()
    return {"status": "ran", "settings": settings, "runs": runs}


# -- the report -----------------------------------------------------------------------------------


def describe_device(device) -> dict:
    import torch

    entry = {"requested": str(device), "type": device.type}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        entry.update({"name": torch.cuda.get_device_name(device),
                      "capability": list(torch.cuda.get_device_capability(device)),
                      "total_memory_mb": properties.total_memory / 2**20,
                      "count": torch.cuda.device_count()})
    else:
        entry["name"] = platform.processor() or platform.machine()
    return entry


def main() -> None:
    args = parse_args()
    if not Path(args.data).is_file():
        fail(f"--data {args.data}: no such file (a Keras-layout mnist.npz)")
    out = Path(args.out)
    if out.is_dir():
        fail(f"--out {out} is a directory; give the path of a .json file")
    if args.threads is not None and args.threads < 1:
        fail(f"--threads must be at least 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        fail(f"--repeats must be at least 1, got {args.repeats}")
    for name in ("text_train_per_task", "text_test_per_task", "text_batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")

    import torch

    from cl import __version__
    from cl.errors import UsageError
    from cl.models import check_device

    try:
        device = check_device(args.device, "--device")
    except UsageError as error:
        fail(str(error))
    threads = args.threads if args.threads is not None else (
        1 if args.quick and device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    repeats = size(args, "repeats")
    if device.type != "cuda" and out.resolve() == RESULTS.resolve():
        log(f"warning: a {device.type} run writes {RESULTS}; that file is meant for GPU results")

    report: dict = {
        "benchmark": "gpu",
        "complete": False,
        "device": describe_device(device),
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda,
                     "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                     "cl": __version__, "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(),
                    "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "settings": {"quick": args.quick, "seed": args.seed, "repeats": repeats,
                     "data": str(Path(args.data).resolve()), "text_data": args.text_data,
                     "skip_text": args.skip_text, "budget_s": args.budget_s},
        "date": time.strftime("%Y-%m-%d"),
    }
    failures: list[str] = []

    def write() -> None:
        report["wall_seconds"] = time.perf_counter() - STARTED
        out.parent.mkdir(parents=True, exist_ok=True)
        temporary = out.with_name(out.name + ".tmp")
        temporary.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(temporary, out)

    log(f"device {report['device']['name']} ({device}), torch {torch.__version__}, "
        f"cl {__version__}{', quick' if args.quick else ''}")
    try:
        report["mnist"] = mnist_part(args, device, repeats)
    except Exception as error:  # recorded, then the text part still runs
        traceback.print_exc()
        report["mnist"] = {"status": f"error: {type(error).__name__}: {error}"}
        failures.append(f"split-mnist: {error}")
        log(f"split-mnist failed: {type(error).__name__}: {error}")
    write()

    directory, reason = text_unavailable(args)
    if reason is not None:
        report["text"] = {"status": f"skipped: {reason}"}
        log(f"text: skipped ({reason})")
    else:
        try:
            report["text"] = text_part(args, device, directory)
        except Exception as error:
            traceback.print_exc()
            report["text"] = {"status": f"error: {type(error).__name__}: {error}"}
            failures.append(f"text: {error}")
        for name, entry in report["text"].get("runs", {}).items():
            if entry["status"].startswith("error"):
                failures.append(f"text {name}: {entry['status']}")
    report["complete"] = True
    write()
    log(f"wrote {out} ({report['wall_seconds']:.1f} s)")
    summary = {case: round(entry["ratio_cl_over_hand"], 3)
               for case, entry in report["mnist"].get("cases", {}).items()}
    print(json.dumps({"ratio_cl_over_hand": summary, "wall_seconds": report["wall_seconds"]}))
    if failures:
        fail("; ".join(failures), code=1)


if __name__ == "__main__":
    main()
