"""Text streams and transformers backbones, offline: a tiny BERT and tokenizer built here, small
jsonl and csv datasets on disk, the strategies on the transformer, and the CLI's text forms."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import SCRIPT, cl
from text_data import CUES, write_csv_dataset, write_jsonl_dataset, write_tiny_backbone

from cl.backbones import HF
from cl.errors import DataError, UsageError
from cl.experiment import RunConfig, build
from cl.models import logits_of, trim_padding
from cl.runner import TrainConfig, run
from cl.sampling import class_quotas, stratified_indices
from cl.strategy import Chain
from strategies import EMA, Distill, Freeze, LoRA, Replay
from strategies.distill import DistillConfig, feature_distance
from strategies.ema import EMAConfig
from strategies.freeze import FreezeConfig
from strategies.lora import LoRAConfig
from strategies.replay import ReplayConfig
from tasks.text import TextSource, cache_root, text_stream

REVIEW_NAMES = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return write_tiny_backbone(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def tokenizer(backbone):
    return HF.tokenizer(str(backbone))


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    write_jsonl_dataset(root / "news", CUES["news"])
    write_jsonl_dataset(root / "reviews", CUES["reviews"], names=REVIEW_NAMES)
    write_jsonl_dataset(root / "reviews2", CUES["reviews"], names=REVIEW_NAMES, seed=3)
    write_csv_dataset(root / "topics", CUES["topics"])
    return root


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("CL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def source(root: Path, name: str, **columns) -> TextSource:
    return TextSource(name, str(root / name), **columns)


def topics(root: Path) -> TextSource:
    return source(root, "topics", text_columns=("sentence",), label_column="category")


def words(tokenizer, ids) -> list[str]:
    return tokenizer.convert_ids_to_tokens([int(i) for i in ids])


def test_label_names_become_global_ids_one_block_per_task(root, tokenizer):
    stream = text_stream("s", [source(root, "news"), topics(root)], tokenizer)
    assert stream.num_classes == 5
    assert [task.classes for task in stream.tasks] == [(0, 1, 2), (3, 4)]
    for task, cues, offset in zip(stream.tasks, (CUES["news"], CUES["topics"]), (0, 3),
                                  strict=True):
        for split in (task.train, task.test):
            for ids, label in zip(split.x["input_ids"], split.y, strict=True):
                # The label is the one of the cue word the sentence holds.
                cue = next(w for w in words(tokenizer, ids) if w in cues)
                assert int(label) == offset + cues.index(cue)


def test_shared_label_names_share_ids_and_domain_relabels_per_task(root, tokenizer):
    sources = [source(root, "news"), source(root, "reviews"), source(root, "reviews2")]
    shared = text_stream("s", sources, tokenizer, share_labels=True)
    assert shared.num_classes == 6
    assert [task.classes for task in shared.tasks] == [(0, 1, 2), (3, 4, 5), (3, 4, 5)]
    domain = text_stream("s", [source(root, "news"), topics(root)], tokenizer, scenario="domain")
    assert domain.num_classes == 3 and domain.tasks[1].classes == (0, 1)


def test_caps_are_stratified_and_seeded(root, tokenizer):
    def build_with(seed):
        return text_stream("s", [source(root, "news")], tokenizer, train_per_task=7,
                           test_per_task=4, seed=seed).tasks[0]

    task = build_with(0)
    assert len(task.train) == 7 and len(task.test) == 4
    assert sorted(np.bincount(task.train.y.numpy()).tolist()) == [2, 2, 3]
    assert torch.equal(build_with(0).train.x["input_ids"], task.train.x["input_ids"])
    assert not torch.equal(build_with(1).train.x["input_ids"], task.train.x["input_ids"])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=120), st.integers(0, 150),
       st.integers(0, 2**31))
def test_stratified_subsets_keep_each_class_share(labels, cap, seed):
    labels = np.array(labels)
    chosen = stratified_indices(labels, cap, seed)
    assert len(chosen) == min(cap, len(labels))
    assert np.all(np.diff(chosen) > 0)  # distinct rows, in their original order
    counts = np.bincount(labels, minlength=5)
    kept = np.bincount(labels[chosen], minlength=5)
    share = counts * min(cap, len(labels)) / len(labels)
    assert np.all(kept >= np.floor(share)) and np.all(kept <= np.ceil(share))
    assert np.array_equal(stratified_indices(labels, cap, seed), chosen)
    assert class_quotas(counts, cap).sum() == min(cap, len(labels))


def test_splits_share_one_width_test_rows_sorted_and_batches_trimmed(root, tokenizer, backbone):
    stream = text_stream("s", [source(root, "news"), topics(root)], tokenizer)
    width = stream.input_shape[0]
    for task in stream.tasks:
        for split in (task.train, task.test):
            assert set(split.x) == set(tokenizer.model_input_names) >= {"input_ids",
                                                                        "attention_mask"}
            assert split.x["input_ids"].shape[1] == width
        lengths = task.test.x["attention_mask"].sum(1)
        assert torch.all(lengths[:-1] >= lengths[1:])
    short = {k: v[-4:] for k, v in stream.tasks[0].test.x.items()}  # the shortest rows
    trimmed = trim_padding(short)
    assert trimmed["input_ids"].shape[1] == int(short["attention_mask"].sum(1).max()) < width
    model = HF.model(str(backbone), stream.num_classes, 0, tokenizer.pad_token_id).eval()
    with torch.inference_mode():
        assert torch.allclose(model(**short).logits, logits_of(model, short), atol=1e-5)


def test_tokenization_is_cached_and_the_cache_is_what_is_read(root, tokenizer, cache_dir):
    first = text_stream("s", [source(root, "news")], tokenizer)
    files = sorted(cache_root().glob("*.safetensors"))
    assert cache_root().is_relative_to(cache_dir) and len(files) == 2  # train and test
    from safetensors.torch import load_file, save_file

    for path in files:  # a marked cache: if the stream is built from it, it shows
        tensors = load_file(path)
        tensors["input_ids"][:, 0] = 7
        save_file(tensors, path)
    again = text_stream("s", [source(root, "news")], tokenizer)
    assert torch.all(again.tasks[0].train.x["input_ids"][:, 0] == 7)
    assert not torch.all(first.tasks[0].train.x["input_ids"][:, 0] == 7)
    text_stream("s", [source(root, "news")], tokenizer, max_length=5)
    assert len(list(cache_root().glob("*.safetensors"))) == 4  # another length, other entries


def test_a_missing_column_names_the_columns_there_are(root, tokenizer):
    with pytest.raises(DataError, match=r"no column 'sentence' \(columns: text, label\)"):
        text_stream("s", [source(root, "news", text_columns=("sentence",))], tokenizer)
    with pytest.raises(DataError, match="no split 'validation'"):
        text_stream("s", [source(root, "news", test_split="validation")], tokenizer)


def test_a_label_outside_the_names_is_refused(tmp_path, tokenizer):
    directory = write_jsonl_dataset(tmp_path / "bad", CUES["topics"])
    (directory / "labels.json").write_text(json.dumps(["animal"]))
    with pytest.raises(DataError, match="label 'plant' is not one of the label names"):
        text_stream("s", [TextSource("bad", str(directory))], tokenizer)


def test_generic_form_with_own_columns_runs_lora_with_bwt_zero(root, backbone, tmp_path):
    out = tmp_path / "run"
    code = cl("run", "--tasks", "text:datasets=news|topics,text_column=text|sentence,"
              "label_column=label|category", "--data", root, "--model", f"hf:{backbone}",
              "--scenario", "task", "--strategy", "lora:rank=2", "--train-per-task", 24,
              "--test-per-task", 6, "--epochs", 2, "--batch-size", 8, "--optimizer", "adamw",
              "--lr", 0.01, "--out", out)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_names"] == ["news", "topics"]
    assert metrics["bwt"] == 0.0  # LoRA per task: earlier tasks' adapters never move
    assert metrics["train_rows"] == 2 * (24 + 24) and metrics["eval_rows"] == 3 * 12
    assert metrics["train_samples_per_second"] > 0 and metrics["eval_samples_per_second"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["train_per_task"] == 24 and config["model"] == f"hf:{backbone}"


def test_routed_prompts_from_the_cli_save_prompts_and_never_the_base(root, backbone, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    code = cl("run", "--tasks", "text:datasets=news|reviews", "--data", root, "--model",
              f"hf:{backbone}", "--scenario", "class", "--strategy",
              "prompt:num_tokens=4,route=prototype", "--epochs", 1, "--batch-size", 8,
              "--optimizer", "adamw", "--lr", 0.01, "--out", out)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    routing = metrics["strategies"]["prompt"]["routing_accuracy"]
    assert routing[0][1] is None and all(0 <= value <= 1 for value in routing[1])
    checkpoint = out / "checkpoint"
    assert sorted(p.name for p in (checkpoint / "prompt").iterdir()) == [
        "task0.safetensors", "task1.safetensors"]
    for name in ("task0", "task1"):
        assert sorted(load_file(str(checkpoint / "prompt" / f"{name}.safetensors"))) == [
            f"cl_prompts.{name}.embedding.weight", f"classifier.modules_to_save.{name}.bias",
            f"classifier.modules_to_save.{name}.weight"]
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert weights and all(key.startswith(("cl_prompts.", "classifier.modules_to_save."))
                           for key in weights)


def test_text_cl_reads_its_layout_in_the_order_given(root, backbone, tmp_path):
    data = tmp_path / "data"
    for name, fixture in (("agnews", "news"), ("amazon", "reviews"), ("dbpedia", "news"),
                          ("yelp", "reviews2")):
        shutil.copytree(root / fixture, data / name)
    out = tmp_path / "run"
    assert cl("run", "--tasks", "text-cl:order=yelp|amazon,share_labels=true", "--data", data,
              "--model", f"hf:{backbone}", "--scenario", "domain", "--epochs", 1,
              "--batch-size", 8, "--optimizer", "adamw", "--lr", 0.001, "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task_names"] == ["yelp", "amazon"] and metrics["scenario"] == "domain"
    assert len(metrics["confusion_matrix"]) == 3  # amazon and yelp: one label space


@pytest.mark.parametrize("args, needle", [
    (["--tasks", "text:datasets=news", "--model", "mlp"], "holds text: give a text model"),
    (["--model", "hf:{backbone}"], "reads text, but stream 'split-digits' holds arrays"),
    (["--tasks", "text:datasets=news", "--model", "hf"], "needs a hub name or a local directory"),
    (["--model", "mlp:big"], "model 'mlp' takes no ':' argument"),
    (["--tasks", "text:datasets=news", "--model", "hf:{backbone}", "--hidden", "10"],
     "--hidden does not apply"),
    (["--tasks", "text:datasets=topics", "--model", "hf:{backbone}"],
     "no column 'text' (columns: sentence, category)"),
    (["--tasks", "text:datasets=news|topics,text_column=a|b|c", "--model", "hf:{backbone}"],
     "lists 3 values for 2 datasets"),
    (["--tasks", "text-cl:order=agnews|imdb", "--model", "hf:{backbone}"],
     "unknown dataset 'imdb'"),
    (["--tasks", "text:datasets=news", "--model", "hf:{backbone}", "--train-per-task", "0"],
     "train_per_task must be positive"),
])
def test_bad_text_input_is_one_line_and_exit_2(args, needle, root, backbone, tmp_path, capsys):
    args = [arg.replace("{backbone}", str(backbone)) for arg in args]
    data = [] if "split-digits" in needle or "--tasks" not in args else ["--data", root]
    assert cl("run", *args, *data, "--out", tmp_path / "run") == 2
    error = capsys.readouterr().err.strip()
    assert needle in error and len(error.splitlines()) == 1
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_text_cl_from_the_hub_offline_fails_in_one_line(tmp_path, backbone):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CL_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([str(SCRIPT), "run", "--tasks", "text-cl", "--model",
                           f"hf:{backbone}", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: agnews: could not load dataset 'fancyzhx/ag_news'")
    assert len(done.stderr.strip().splitlines()) == 1


def built(root, backbone, *strategies, scenario="task", **config):
    result = build(RunConfig(tasks="text:datasets=news|reviews", data=str(root),
                             model=f"hf:{backbone}", scenario=scenario))
    train = TrainConfig(optimizer="adamw", lr=0.005, batch_size=8, epochs=1, **config)
    return result.model, result.stream, train


def test_lora_targets_attention_and_feed_forward_by_default(root, backbone):
    model, stream, train = built(root, backbone)
    lora = LoRA(LoRAConfig(rank=2))
    run(model, stream, lora, train)
    assert lora.targets == [f"bert.encoder.layer.{layer}.{name}" for layer in (0, 1) for name in (
        "attention.self.query", "attention.self.key", "attention.self.value",
        "attention.output.dense", "intermediate.dense", "output.dense")]


def test_freeze_blocks_keeps_embeddings_and_lower_layers_bitwise(root, backbone):
    model, stream, train = built(root, backbone)
    before = {name: value.clone() for name, value in model.named_parameters()}
    freeze = Freeze(FreezeConfig(blocks=1, lr_mult=("classifier.*=10",)))
    groups = freeze.param_groups(model, [{"params": list(model.parameters()), "lr": 0.1}])
    assert sorted(group["lr"] for group in groups) == [0.1, 1.0]
    run(model, stream, freeze, train)
    for name, value in model.named_parameters():
        frozen = name.startswith(("bert.embeddings.", "bert.encoder.layer.0."))
        assert torch.equal(value, before[name]) == frozen, name


def test_replay_of_tokenized_rows(root, backbone):
    model, stream, train = built(root, backbone)
    replay = Replay(ReplayConfig(capacity=10, batch_size=4))
    result = run(model, stream, replay, train)
    stored = replay.buffer.x
    assert set(stored) == set(stream.tasks[0].train.x)
    assert stored["input_ids"].shape == (10, stream.input_shape[0])
    fresh = sum(len(task.train) for task in stream.tasks)
    # Online insertion: every step after the first finds rows to replay.
    assert result.train_rows == fresh + 4 * (result.steps - 1)


def test_ema_shadows_only_what_trains_when_the_base_is_frozen(root, backbone):
    model, stream, train = built(root, backbone)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    ema = EMA(EMAConfig(decay=0.9))
    run(model, stream, ema.__class__(ema.config), train)  # a full model shadow, for scale
    model, stream, train = built(root, backbone)
    frozen_ema = EMA(EMAConfig(decay=0.9))
    run(model, stream, Chain(Freeze(FreezeConfig(blocks=2)), frozen_ema), train)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    shadow = frozen_ema.report()["shadow_bytes"]
    assert shadow < total / 4 and shadow >= trainable


def test_feature_distillation_from_the_pretrained_model(root, backbone):
    model, stream, train = built(root, backbone, log_every=1)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    distill = Distill(DistillConfig(teacher="initial", on="features", alpha=1.0))
    result = run(model, stream, Chain(distill), train)
    terms = [event["distill/features"] for event in result.events if event["event"] == "loss"]
    assert terms and all(np.isfinite(terms)) and max(terms) > 0
    for name, value in distill.teacher.state_dict().items():
        assert torch.equal(value, initial[name]), name


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 8), st.floats(1e-3, 10), st.integers(0, 2**16))
def test_feature_distance_is_nonnegative_and_zero_only_on_equal_features(rows, width, alpha,
                                                                         seed):
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(rows, width, generator=generator)
    student = torch.randn(rows, width, generator=generator)
    assert feature_distance(teacher, student, alpha) >= 0
    assert feature_distance(teacher, teacher.clone(), alpha) == 0
    assert feature_distance(teacher, teacher + 1, alpha) > 0


def test_same_seed_same_matrix_on_a_transformer(root, backbone):
    matrices = []
    for _ in range(2):
        model, stream, train = built(root, backbone)
        matrices.append(run(model, stream, Replay(ReplayConfig(capacity=8)), train).accuracy)
    assert np.array_equal(matrices[0], matrices[1])


def test_caps_apply_to_any_stream(tmp_path):
    stream = build(RunConfig(train_per_task=50, test_per_task=20)).stream
    for task in stream.tasks:
        assert len(task.train) == 50 and len(task.test) == 20
        assert sorted(np.bincount(task.train.y.numpy())[list(task.classes)]) == [25, 25]
    with pytest.raises(UsageError, match="test_per_task must be positive"):
        build(RunConfig(test_per_task=-1))


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=60),
       batch_size=st.integers(1, 16), tokens=st.integers(1, 400))
def test_text_evaluation_batches_keep_to_the_token_budget(lengths, batch_size, tokens):
    """Every row exactly once; rows by length; each batch at most `batch_size` rows and within
    `tokens` (rows x its longest row), unless a single row is longer than the budget; and a
    batch stops only where the next row would break a limit."""
    from cl.runner import evaluation_batches

    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    x = {"input_ids": mask * 7, "attention_mask": mask}
    batches = evaluation_batches(x, batch_size, tokens)
    order = torch.cat(batches)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    ordered = [lengths[i] for i in order.tolist()]
    assert ordered == sorted(lengths)
    start = 0
    for batch in batches:
        rows, longest = len(batch), max(lengths[i] for i in batch.tolist())
        assert rows <= batch_size and (rows == 1 or rows * longest <= tokens)
        end = start + rows
        if end < len(lengths):  # greedy: the next row did not fit
            assert rows == batch_size or (rows + 1) * ordered[end] > tokens
        start = end


def test_token_budget_batches_give_the_same_accuracy_as_row_batches(root, backbone):
    """Length-sorted batches of a small token budget predict what batches of many padded rows
    predict: padding is masked, so only the amount of work changes."""
    predictions = []
    for tokens in (64, 10**9):
        model, stream, train = built(root, backbone)
        config = dataclasses.replace(train, eval_tokens=tokens, eval_batch_size=1024)
        result = run(model, stream, config=config)
        predictions.append((result.accuracy, np.concatenate(result.final_predictions)))
    assert np.array_equal(predictions[0][0], predictions[1][0])
    assert np.array_equal(predictions[0][1], predictions[1][1])
