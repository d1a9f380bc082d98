"""Pretrained image classifiers through `--model hf:<path>`: a tiny random ViT saved with its
image processor, images resized and normalised as that processor does, and the strategies of
the text backbones (prototypes, routed LoRA) on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import cl

from cl.backbones import HF, ImageInput, image_input
from cl.errors import UsageError
from cl.experiment import RunConfig, build
from cl.models import find_head, logits_of, repeated_blocks

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]


def write_tiny_vit(directory: Path, image_size: int = 16, seed: int = 0) -> Path:
    """A random 1-layer ViT (hidden 16, patches of 4) and its image processor, saved with
    save_pretrained: what `--model hf:<directory>` loads, offline."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(
        image_size=image_size, patch_size=4, num_channels=3, hidden_size=16,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=3))
    processor = ViTImageProcessor(size={"height": image_size, "width": image_size},
                                  image_mean=MEAN, image_std=STD)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def vit(tmp_path_factory) -> Path:
    return write_tiny_vit(tmp_path_factory.mktemp("vit"))


def test_images_are_resized_and_normalised_as_the_image_processor_does(vit):
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(vit)
    prepare = image_input(processor, 3, str(vit))
    assert prepare == ImageInput(3, (16, 16), None, None, "bilinear", tuple(MEAN), tuple(STD))
    generator = np.random.default_rng(0)
    for size in (8, 40):  # up and down
        gray = generator.integers(0, 256, (2, size, size), dtype=np.uint8)
        expected = processor(images=[np.stack([image] * 3, -1) for image in gray],
                             return_tensors="pt")["pixel_values"]
        ours = prepare.pixels(torch.from_numpy(gray).float().div(255).unsqueeze(1))
        assert ours.shape == expected.shape == (2, 3, 16, 16)
        # The processor resizes 8-bit images (PIL): it rounds to 1/255 before normalising.
        assert (ours - expected).abs().max() <= 1 / 255 / min(STD) + 1e-4


def test_shortest_edge_and_centre_crop():
    prepare = ImageInput(3, None, 12, (8, 8), "bicubic", None, None)
    out = prepare.pixels(torch.rand(1, 3, 6, 9))
    assert out.shape == (1, 3, 8, 8)  # 6x9 -> 12x18, centre 8x8
    assert ImageInput(1, (4, 4), None, None, "nearest", None, None).pixels(
        torch.arange(64.0).view(1, 1, 8, 8)).tolist() == [[[[0.0, 2.0, 4.0, 6.0],
                                                            [16.0, 18.0, 20.0, 22.0],
                                                            [32.0, 34.0, 36.0, 38.0],
                                                            [48.0, 50.0, 52.0, 54.0]]]]


def test_an_image_model_loads_for_an_image_stream_with_its_head_sized_and_seeded(vit):
    assert HF.kind(str(vit)) == "image"
    built = build(RunConfig(tasks="split-digits", model=f"hf:{vit}", num_tasks=2, seed=3))
    model = built.model
    assert find_head(model) == "classifier"  # saved with 3 labels, sized to the stream
    assert model.classifier.out_features == built.stream.num_classes == 10
    assert repeated_blocks(model) == ["vit.layers.0", "vit.layers.1"]  # transformers 5 names
    again = build(RunConfig(tasks="split-digits", model=f"hf:{vit}", num_tasks=2, seed=3))
    x = built.stream.tasks[0].test.x[:5]  # 8x8 gray digits, resized to 16x16 RGB
    with torch.no_grad():
        assert torch.equal(logits_of(model.eval(), x), logits_of(again.model.eval(), x))
        assert logits_of(model, x).shape == (5, 10)


@pytest.mark.parametrize("strategy, scenario", [
    ("ncm", "class"), ("lora:rank=2,route=prototype", "class"), ("lora:rank=2", "task"),
    (None, "class"),
])
def test_the_strategies_run_on_a_pretrained_vit(vit, tmp_path, strategy, scenario):
    out = tmp_path / "run"
    args = ["run", "--tasks", "split-digits", "--num-tasks", 2, "--model", f"hf:{vit}",
            "--scenario", scenario, "--train-per-task", 40, "--test-per-task", 20,
            "--epochs", 1, "--batch-size", 8, "--optimizer", "adamw", "--lr", 0.01,
            "--out", out]
    if strategy:
        args += ["--strategy", strategy]
    assert cl(*args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["accuracy_matrix"]) == 2
    if strategy and strategy.startswith("lora"):
        assert metrics["bwt"] == 0.0 or scenario == "class"
        weights = (out / "checkpoint" / "model.safetensors").stat().st_size
        assert weights < 100_000  # the adapters and head copies: never the ViT


def test_bad_combinations_are_one_line(vit, tmp_path, capsys):
    from text_data import CUES, write_jsonl_dataset

    root = write_jsonl_dataset(tmp_path / "news", CUES["news"]).parent
    assert cl("run", "--tasks", "text:datasets=news", "--data", root, "--model", f"hf:{vit}",
              "--out", tmp_path / "a") == 2
    error = capsys.readouterr().err.strip()
    assert "stream 'text' holds text: give a text model" in error
    assert len(error.splitlines()) == 1
    with pytest.raises(UsageError, match="reads 3-channel images, the stream has 2"):
        HF.image_model(str(vit), 4, 0, (2, 8, 8))
    with pytest.raises(UsageError, match=r"rows have shape \(64,\)"):
        HF.image_model(str(vit), 4, 0, (64,))
    (tmp_path / "no_processor").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "no_processor" / name).write_bytes((vit / name).read_bytes())
    with pytest.raises(UsageError, match="could not load the image processor"):
        HF.image_model(str(tmp_path / "no_processor"), 4, 0, (1, 8, 8))
