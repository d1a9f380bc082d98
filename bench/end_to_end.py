"""`cl run` end to end against `bench/hand_written.py`: whole processes, start to exit.

Each pair runs the two commands below in fresh processes, one after the other, alternating which
goes first; at least 5 pairs for each thread count (1 and 2). From each process it measures the
wall time (start to exit), the CPU time (user + system, from `wait4`) and the peak RSS, and it
checks that both accuracy matrices are equal bit for bit (the same work was done). The minimum and
median of each, and the ratios cl / hand-written of the medians (and of the minimums), go to
`bench/results/end_to_end.json`.

    cl run --tasks split-mnist --data MNIST --hidden 400,400 --lr 0.01 --batch-size 128 \
        --epochs 1 --threads N
    python bench/hand_written.py --data MNIST --threads N

It also runs a 20-task Permuted MNIST (`--permuted-tasks`, same model and settings) once with
every task evaluated after every task and once with `--eval-on final`, recording their wall
time and peak RSS, and times `cl list` (start to exit).

    python bench/end_to_end.py --data ../shared/data/mnist.npz [--pairs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SETTINGS = ["--hidden", "400,400", "--lr", "0.01", "--batch-size", "128", "--epochs", "1"]


def measure(command: list[str]) -> dict:
    """Run `command` to its end: wall seconds, CPU seconds, peak RSS in MB, and its stdout."""
    # Both streams go to files: a pipe left unread until the end could fill and stall the child.
    with tempfile.TemporaryFile() as output, tempfile.TemporaryFile() as errors:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=errors)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        code = os.waitstatus_to_exitcode(status)
        output.seek(0)
        errors.seek(0)
        stdout, stderr = output.read().decode(), errors.read().decode()
    if code != 0:
        raise SystemExit(f"{' '.join(command)} failed ({code}): {stderr}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024, "stdout": stdout}


def cl_command(data: str, threads: int, out: Path) -> list[str]:
    script = shutil.which("cl") or str(Path(sys.executable).parent / "cl")
    return [script, "run", "--tasks", "split-mnist", "--data", data, *SETTINGS,
            "--threads", str(threads), "--out", str(out)]


def summary(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="Keras-layout mnist.npz")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--threads", default="1,2", help="thread counts to measure")
    parser.add_argument("--permuted-tasks", type=int, default=20, help="0: skip")
    parser.add_argument("--out", default=str(HERE / "results" / "end_to_end.json"))
    args = parser.parse_args()
    data = str(Path(args.data).resolve())

    results: dict = {"workload": "cl run --tasks split-mnist " + " ".join(SETTINGS),
                     "pairs": args.pairs, "by_threads": {},
                     "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    with tempfile.TemporaryDirectory() as scratch:
        for threads in [int(part) for part in args.threads.split(",")]:
            samples: dict[str, list[dict]] = {"cl": [], "hand": []}
            for pair in range(args.pairs):
                out = Path(scratch) / f"run-{threads}-{pair}"
                commands = {"cl": cl_command(data, threads, out),
                            "hand": [sys.executable, str(HERE / "hand_written.py"), "--data",
                                     data, "--threads", str(threads)]}
                order = ["cl", "hand"] if pair % 2 == 0 else ["hand", "cl"]
                for side in order:
                    samples[side].append(measure(commands[side]))
                cl_matrix = json.loads((out / "metrics.json").read_text())["accuracy_matrix"]
                hand_matrix = json.loads(samples["hand"][-1]["stdout"])["accuracy_matrix"]
                if cl_matrix != hand_matrix:
                    raise SystemExit("the accuracy matrices differ: not the same work")
                print(f"threads {threads} pair {pair + 1}: cl "
                      f"{samples['cl'][-1]['wall_s']:.2f} s, hand "
                      f"{samples['hand'][-1]['wall_s']:.2f} s", file=sys.stderr)
            entry: dict = {"accuracy_matrix": cl_matrix, "matrices_equal": True}
            for side, runs in samples.items():
                entry[side] = {key: summary([run[key] for run in runs])
                               for key in ("wall_s", "cpu_s", "peak_rss_mb")}
            entry["ratio_cl_over_hand"] = {
                key: {stat: entry["cl"][key][stat] / entry["hand"][key][stat]
                      for stat in ("min", "median")}
                for key in ("wall_s", "cpu_s", "peak_rss_mb")}
            results["by_threads"][str(threads)] = entry

        for eval_on in ("all", "final") if args.permuted_tasks else ():
            # The full R (every task after every task: O(T^2) evaluations), then only the
            # final row, which a user who wants ACC alone asks for.
            out = Path(scratch) / f"permuted-{eval_on}"
            command = cl_command(data, 1, out)
            command[command.index("split-mnist")] = "permuted-mnist"
            command += ["--num-tasks", str(args.permuted_tasks), "--eval-on", eval_on]
            measured = measure(command)
            metrics = json.loads((out / "metrics.json").read_text())
            key = "permuted_mnist" if eval_on == "all" else "permuted_mnist_final_only"
            results[key] = {
                "command": " ".join(["cl run --tasks permuted-mnist --data MNIST", *SETTINGS,
                                     "--threads 1 --num-tasks", str(args.permuted_tasks),
                                     "--eval-on", eval_on]),
                "num_tasks": args.permuted_tasks, "threads": 1,
                "wall_s": measured["wall_s"], "cpu_s": measured["cpu_s"],
                "peak_rss_mb": measured["peak_rss_mb"], "acc": metrics["acc"],
                "final_row": metrics["accuracy_matrix"][-1],
                "train_seconds": metrics["train_seconds"],
                "eval_seconds": metrics["eval_seconds"]}
            print(f"permuted-mnist x{args.permuted_tasks}, eval on {eval_on}: "
                  f"{measured['wall_s']:.1f} s, {measured['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
    # `cl list` imports neither torch nor the strategies: it reads their source.
    script = shutil.which("cl") or str(Path(sys.executable).parent / "cl")
    listing = [measure([script, "list"]) for _ in range(args.pairs)]
    results["cl_list"] = {key: summary([run[key] for run in listing])
                          for key in ("wall_s", "cpu_s", "peak_rss_mb")}
    results["date"] = time.strftime("%Y-%m-%d")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({threads: entry["ratio_cl_over_hand"]
                      for threads, entry in results["by_threads"].items()}, indent=2))


if __name__ == "__main__":
    main()
