"""bench/gpu.py end to end on the CPU: --quick on a tiny synthetic MNIST, the JSON it writes."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def tiny_mnist(path: Path) -> Path:
    generator = np.random.default_rng(0)

    def images(rows: int) -> np.ndarray:
        return generator.integers(0, 256, size=(rows, 28, 28), dtype=np.uint8)

    np.savez(path, x_train=images(300), y_train=np.arange(300) % 10,
             x_test=images(100), y_test=np.arange(100) % 10)
    return path


def test_quick_cpu_run_writes_the_report(tmp_path):
    data = tiny_mnist(tmp_path / "mnist.npz")
    out = tmp_path / "gpu.json"
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--quick",
         "--skip-text", "--data", str(data), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert finished.returncode == 0, finished.stderr
    report = json.loads(out.read_text())
    for key in ("device", "versions", "settings", "mnist", "text", "wall_seconds", "complete"):
        assert key in report
    assert report["complete"] is True
    assert report["device"]["type"] == "cpu"
    assert report["versions"]["torch"] and report["versions"]["cl"]
    assert report["text"]["status"] == "skipped: --skip-text"
    cases = report["mnist"]["cases"]
    assert set(cases) == {"naive", "der"}
    for entry in cases.values():
        ratio = entry["ratio_cl_over_hand"]
        assert math.isfinite(ratio) and ratio > 0
        for side in ("cl", "hand"):
            assert entry[side]["median_seconds"] > 0
            assert entry[side]["samples_per_second"] > 0
            assert len(entry[side]["accuracy_matrix"]) == 5
    # The same work on both sides: equal matrices on the CPU; replay draws differently.
    assert cases["naive"]["identical_accuracy_matrix"] is True
    assert cases["naive"]["r_compared"] is True
    assert cases["der"]["r_compared"] is False
    # Replayed rows are counted: DER forwards more rows than plain fine-tuning.
    assert cases["der"]["cl"]["train_rows"] > cases["naive"]["cl"]["train_rows"]
    assert cases["der"]["hand"]["train_rows"] == cases["der"]["cl"]["train_rows"]


def test_missing_data_and_cuda_are_one_line(tmp_path):
    script = str(ROOT / "bench" / "gpu.py")
    finished = subprocess.run([sys.executable, script, "--data", str(tmp_path / "none.npz")],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert finished.returncode == 2
    assert finished.stderr.strip().count("\n") == 0 and "none.npz" in finished.stderr
    if not torch.cuda.is_available():
        data = tiny_mnist(tmp_path / "mnist.npz")
        finished = subprocess.run([sys.executable, script, "--data", str(data), "--device",
                                   "cuda", "--out", str(tmp_path / "gpu.json")],
                                  capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert finished.returncode == 2
        assert finished.stderr.strip().count("\n") == 0 and "CUDA" in finished.stderr
        assert not (tmp_path / "gpu.json").exists()
