"""Print the README's benchmark tables (markdown) from the committed JSON results.

    python bench/readme_tables.py
"""

from __future__ import annotations

import json
from pathlib import Path

from text_classil import CHOSEN  # bench/ is the script's directory, first on sys.path

RESULTS = Path(__file__).parent / "results"


def seq_mnist() -> str:
    data = json.loads((RESULTS / "seq_mnist.json").read_text())["results"]
    lines = ["| method | class-IL (mean ± std, 5 seeds) | task-IL | published class-IL / task-IL "
             "| reproduced (±2) |", "|---|---|---|---|---|"]
    for name, entry in data.items():
        published = entry["published"]
        reference = f"{published['class_il']:.2f} / {published['task_il']:.2f}"
        if entry["published_row"] != name:
            reference += f" ({entry['published_row']})"
        if "expected" in entry:
            reference += (f"; working LwF ≈ {entry['expected']['class_il']} / "
                          f"{entry['expected']['task_il']}")
        verdict = {True: "yes", False: "**no**"}.get(entry.get("reproduced"), "-")
        cells = [f"{entry[k]['mean']:.2f} ± {entry[k]['std']:.2f}" for k in ("class_il", "task_il")]
        if "live_class_il" in entry:
            cells[0] += f" (live {entry['live_class_il']['mean']:.2f})"
            cells[1] += f" (live {entry['live_task_il']['mean']:.2f})"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {reference} | {verdict} |")
    return "\n".join(lines)


MNIST_BENCHMARKS = (("seq-mnist", "Seq-MNIST class-IL"), ("perm-mnist", "P-MNIST"),
                    ("rot-mnist", "R-MNIST"))
MNIST_ORDER = ("joint", "naive", "distill", "ewc", "si", "replay", "er_ace", "agem", "der",
               "derpp")


def _mnist_cell(cell: dict | None) -> str:
    """mean ± std (published), the mean in bold where it misses the published one by > 2."""
    if cell is None:
        return "not run yet"
    text = f"{cell['mean']:.2f} ± {cell['std']:.2f}"
    if cell["published"] is not None:
        if cell["verdict"] != "reproduced":
            text = f"**{text}**"
        text += f" ({cell['published']:.2f})"
    return text


def mnist_table() -> str:
    """The DER table's MNIST rows: cl's 5-seed means against the published ones; then the
    compositions chosen on validation."""
    data = json.loads((RESULTS / "mnist_table.json").read_text())
    methods = {benchmark: data.get(benchmark, {}).get("methods", {})
               for benchmark, _ in MNIST_BENCHMARKS}
    lines = ["| method | buffer | " + " | ".join(title for _, title in MNIST_BENCHMARKS)
             + " | Seq-MNIST task-IL |", "|---|---|---|---|---|---|"]
    for name in MNIST_ORDER:
        buffers = sorted({buffer for cells in methods.values() for buffer in cells.get(name, {})})
        for buffer in buffers:
            cells = [methods[benchmark].get(name, {}).get(buffer)
                     for benchmark, _ in MNIST_BENCHMARKS]
            seq = cells[0]
            task = "not run yet" if seq is None else _mnist_cell(
                {**seq["task_il"], "verdict": seq["verdict"]})
            lines.append(f"| `{name}` | {buffer} | "
                         + " | ".join(_mnist_cell(cell) for cell in cells) + f" | {task} |")
    lines += ["", "| composition (chosen on validation) | buffer | benchmark | test ACC "
              "(mean ± std), all rows | validation ACC | test ACC, 90% of rows | target | "
              "candidates |",
              "|---|---|---|---|---|---|---|---|"]
    for benchmark, title in MNIST_BENCHMARKS:
        for cells in methods[benchmark].values():
            for buffer, cell in cells.items():
                if "family" not in cell:
                    continue
                target = cell.get("target")
                verdict = "-" if target is None else (
                    f"{target:.1f}: " + ("met" if cell["mean"] >= target else "**missed**"))
                lines.append(f"| `{' + '.join(cell['strategy'])}` | {buffer} | {title} | "
                             f"{cell['mean']:.2f} ± {cell['std']:.2f} | "
                             f"{cell['validation_mean']:.2f} | "
                             f"{cell['held_out_run_mean']:.2f} | {verdict} | "
                             f"{len(cell['candidates'])} |")
    return "\n".join(lines)


def strategy_cost() -> str:
    data = json.loads((RESULTS / "strategy_cost.json").read_text())
    lines = ["| run | ms per step (median) |", "|---|---|"]
    lines += [f"| {name} | {value:.2f} |" for name, value in data["ms_per_step"].items()]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in data["ratios"].items()]
    return "\n".join(lines)


def text_cl() -> str:
    data = json.loads((RESULTS / "text_cl.json").read_text())
    results = data["results"]
    names = list(next(iter(results.values()))["per_task_final"])
    lines = ["| method | ACC | BWT | of joint | " + " | ".join(names)
             + " | train samples/s | eval samples/s | trainable parameters | peak MiB |",
             "|---" * (8 + len(names)) + "|"]
    for name, entry in results.items():
        bwt = "-" if entry["bwt"] is None else f"{100 * entry['bwt']:.2f}"
        per_task = " | ".join(f"{100 * a:.1f}" for a in entry["per_task_final"].values())
        trainable = entry["trainable_parameters_per_task"] or [entry["trainable_parameters"]]
        trainable_text = f"{trainable[0]:,}" + (" per task" if entry[
            "trainable_parameters_per_task"] else "")
        lines.append(f"| {name} | {100 * entry['acc']:.2f} | {bwt} | "
                     f"{100 * entry['fraction_of_joint']:.0f}% | {per_task} | "
                     f"{entry['train_samples_per_second']:.1f} | "
                     f"{entry['eval_samples_per_second']:.1f} | {trainable_text} | "
                     f"{entry['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def text_classil() -> str:
    data = json.loads((RESULTS / "text_classil.json").read_text())

    def cell(entry: dict, key: str, scale: float = 100.0, digits: int = 2) -> str:
        if f"{key}_mean" not in entry:
            return "-"
        return (f"{scale * entry[f'{key}_mean']:.{digits}f} ± "
                f"{scale * entry[f'{key}_std']:.{digits}f}")

    lines = ["| method | runs | ACC | of joint | BWT | forgetting | routing | trained "
             "parameters | train s | eval s | peak MiB |", "|---" * 11 + "|"]
    def trained(entry: dict) -> str:
        """What any task trained; runs made before cl counted it give what trained at the end."""
        if entry.get("trained_parameters") is not None:
            return f"{entry['trained_parameters']:,}"
        return f"{entry['trainable_parameters']:,} at the end"

    entries = [*data["methods"].items()] + ([(data["joint"]["method"], data["joint"])]
                                            if "joint" in data else [])
    for name, entry in entries:
        fraction = "-" if "fraction_of_joint" not in entry else (
            f"{100 * entry['fraction_of_joint']:.1f}%")
        lines.append(f"| `{name}` | {entry['runs']} | {cell(entry, 'acc')} | {fraction} | "
                     f"{cell(entry, 'bwt')} | {cell(entry, 'forgetting')} | "
                     f"{cell(entry, 'routing_accuracy')} | {trained(entry)} | "
                     f"{cell(entry, 'train_seconds', 1.0, 0)} | "
                     f"{cell(entry, 'eval_seconds', 1.0, 0)} | "
                     f"{entry['peak_rss_mb_mean']:.0f} |")
    return "\n".join(lines)


def text_classil_runs(order: int = 1, seed: int = 0) -> str:
    """Every method run so far on one order and seed (the summary waits for all of them)."""
    rows = [json.loads(line) for line in
            (RESULTS / "text_classil_runs.jsonl").read_text().splitlines() if line.strip()]
    names = next(row["task_names"] for row in rows if row["order"] == order)
    lines = ["| method | ACC | " + " | ".join(names) + " | BWT | routing | train s | eval s |",
             "|---" * (6 + len(names)) + "|"]
    for row in rows:
        # Runs on held-out rows choose settings: text_classil_selection lists them.
        if (row["order"], row["seed"]) != (order, seed) or row.get("val_acc") is not None:
            continue
        final = " | ".join(f"{100 * value:.1f}" for value in row["accuracy_matrix"][-1])
        bwt = "-" if row["bwt"] is None else f"{100 * row['bwt']:.2f}"
        routing = "-" if row["routing_accuracy"] is None else f"{100 * row['routing_accuracy']:.1f}"
        name = row["method"] + (f" ({row['setting']})" if row.get("setting") else
                                # METHODS' own settings, where validation chose more epochs
                                " (epochs=1)" if "epochs" in CHOSEN.get(row["method"], {})
                                else "")
        lines.append(f"| `{name}` | {100 * row['acc']:.2f} | {final} | {bwt} | "
                     f"{routing} | {row['train_seconds']:.0f} | {row['eval_seconds']:.0f} |")
    return "\n".join(lines)


def text_classil_selection() -> str:
    """The settings tried on validation rows, per method: validation ACC (with --eval-every,
    after each epoch), and the setting chosen."""
    data = json.loads((RESULTS / "text_classil.json").read_text())
    lines = ["| method | setting | runs (order, seed) | validation ACC | chosen |",
             "|---" * 5 + "|"]
    for method, found in data["selection"].items():
        chosen = found["chosen"]
        for candidate in found["candidates"]:
            setting = candidate["setting"]
            curves = candidate["val_curves"]
            value = f"{100 * candidate['val_acc_mean']:.2f}"
            if curves:  # at every eval_every steps (225: one epoch of joint training)
                value = "along training: " + ", ".join(
                    f"{100 * point:.2f}" for point in curves[0]["val_acc"])
            runs = ", ".join(f"{order}/{seed}" for order, seed in candidate["runs"])
            mine = ",".join(part for part in setting.split(",") if not part.startswith(
                ("val=", "eval_every=")))
            lines.append(f"| `{method}` | {setting} | {runs} | {value} | "
                         f"{'yes' if mine == chosen else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(mnist_table())
    print()
    print(seq_mnist())
    print()
    print(strategy_cost())
    print()
    print(text_cl())
    print()
    print(text_classil())
    print()
    print(text_classil_runs())
    print()
    print(text_classil_selection())
