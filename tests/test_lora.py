"""LoRA per task: the fresh-adapter identity, base and earlier adapters bitwise unchanged, the
evaluated task's adapter active (BWT exactly 0), merging, adapter files, and transformers."""

from __future__ import annotations

import pytest
import torch
from helpers import blob_stream, tiny_bert, token_stream
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from cl.errors import UsageError
from cl.models import build_mlp
from cl.runner import TrainConfig, run
from strategies import LoRA, LoRAConfig
from strategies.lora import (
    adapter_state,
    masked_entropy,
    orthogonality_penalty,
    route_by_entropy,
    route_by_prototype,
    set_adapter,
    tuner_layers,
    within_routed_task,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def mlp(stream, seed=0):
    torch.manual_seed(seed)
    return build_mlp(stream.input_shape, stream.num_classes, (8, 8))


@pytest.mark.parametrize("head", ["per_task", "shared"])
def test_a_fresh_adapter_leaves_outputs_unchanged(head):
    stream = blob_stream(scenario="task")
    model = mlp(stream)
    x = stream.tasks[0].test.x
    before = model(x)
    lora = LoRA(LoRAConfig(rank=2, head=head))
    lora.before_run(model, stream, 0)
    lora.before_task(model, stream.tasks[0])
    assert torch.equal(model(x), before)
    # Once trained, the adapter changes the outputs; a second fresh one again starts as identity
    # of the base (its own B = 0, its own copy of the initial head).
    run_model = mlp(stream)
    run(run_model, stream, LoRA(LoRAConfig(rank=2, head=head)),
        TrainConfig(batch_size=4, epochs=1, lr=0.1))
    assert not torch.equal(run_model(x), before)


def test_base_and_earlier_adapters_stay_bitwise_unchanged_and_bwt_is_zero():
    stream = blob_stream(num_tasks=3, scenario="task")
    model = mlp(stream)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    snapshots = []

    class Spy(LoRA):
        def after_task(self, model, task):
            super().after_task(model, task)
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    result = run(model, stream, Spy(LoRAConfig(rank=2)),
                 TrainConfig(batch_size=4, epochs=2, lr=0.1, momentum=0.9, weight_decay=0.01))
    final = model.state_dict()
    for key, value in base.items():
        wrapped = key.replace("body.1.", "body.1.base_layer.").replace(
            "body.3.", "body.3.base_layer.").replace("head.", "head.original_module.")
        assert torch.equal(final[wrapped], value), key
    for task, snapshot in enumerate(snapshots):
        mine = [k for k in snapshot if f".task{task}." in k]
        assert mine and all(torch.equal(final[k], snapshot[k]) for k in mine)
    # Each task is evaluated with its own adapter: later tasks cannot change its accuracy.
    for j in range(3):
        assert all(result.accuracy[i, j] == result.accuracy[j, j] for i in range(j, 3))
    assert result.accuracy[2].mean() > 0.5


def test_each_task_trains_only_its_own_adapter_and_head():
    stream = blob_stream(num_tasks=2, scenario="task")
    model = mlp(stream)
    lora = LoRA(LoRAConfig(rank=2))
    lora.before_run(model, stream, 0)
    lora.before_task(model, stream.tasks[0])
    lora.before_task(model, stream.tasks[1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".task1." in n for n in trainable)
    assert lora.report()["trainable_parameters_per_task"][0] == sum(
        p.numel() for n, p in model.named_parameters() if ".task1." in n)
    # Evaluating task 0 switches to adapter 0 and then back to training adapter 1.
    with lora.eval_context(model, stream.tasks[0]):
        assert {tuple(layer.active_adapters) for layer in tuner_layers(model)} == {("task0",)}
    assert {tuple(layer.active_adapters) for layer in tuner_layers(model)} == {("task1",)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable


def test_adapters_save_and_load_on_their_own(tmp_path):
    stream = blob_stream(num_tasks=2, scenario="task")
    model = mlp(stream)
    lora = LoRA(LoRAConfig(rank=2))
    run(model, stream, lora, TrainConfig(batch_size=4, epochs=1, lr=0.1))
    files = {}
    for name, tensors in lora.artifacts().items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(files[name]))
    assert sorted(files) == ["task0", "task1"]
    assert all("base_layer" not in k and "original_module" not in k
               for k in load_file(str(files["task0"])))
    # A fresh model of the same base, given the adapters back, answers as the trained one.
    fresh = mlp(stream)
    fresh_lora = LoRA(LoRAConfig(rank=2))
    fresh_lora.before_run(fresh, stream, 0)
    for task in stream.tasks:
        fresh_lora.before_task(fresh, task)
    for path in files.values():
        fresh.load_state_dict(load_file(str(path)), strict=False)
    x = stream.tasks[0].test.x
    for name in files:
        set_adapter(model, name)
        set_adapter(fresh, name)
        assert torch.equal(model(x), fresh(x))
        assert set(adapter_state(model, name)) == set(load_file(str(files[name])))


def test_class_scenario_needs_merge():
    stream = blob_stream(scenario="class")
    with pytest.raises(UsageError, match="task id"):
        LoRA(LoRAConfig()).check(mlp(stream), stream, False)


def test_merge_folds_each_adapter_into_the_base():
    stream = blob_stream(num_tasks=2, scenario="class")
    model = mlp(stream)
    start = model.body[1].weight.detach().clone()
    lora = LoRA(LoRAConfig(rank=2, alpha=2.0, head="shared", merge=True))
    result = run(model, stream, lora, TrainConfig(batch_size=4, epochs=2, lr=0.1))
    names = [n for n, _ in model.named_parameters()]
    assert "body.1.weight" in names and not any("lora" in n for n in names)
    assert not torch.equal(model.body[1].weight, start)
    assert sorted(lora.artifacts()) == ["task0", "task1"]
    assert result.accuracy.shape == (2, 2)


def test_targets_matching_nothing_are_named():
    stream = blob_stream(scenario="task")
    with pytest.raises(UsageError, match="attention"):
        LoRA(LoRAConfig(targets=("attention*",))).check(mlp(stream), stream, False)


def test_a_rank_above_a_layers_width_is_refused_naming_the_layer():
    stream = blob_stream(scenario="task")  # 6 features: the first layer is Linear 6 -> 8
    model = mlp(stream)
    with pytest.raises(UsageError) as raised:
        LoRA(LoRAConfig(rank=7)).check(model, stream, False)
    assert str(raised.value) == ("lora rank 7 exceeds the width 6 of layer 'body.1' (Linear "
                                 "6 -> 8): use lora:rank=6 or less, or targets that leave it out")
    LoRA(LoRAConfig(rank=6)).check(model, stream, False)
    # Targets that leave the narrow layer out bound the rank by the layers they keep.
    LoRA(LoRAConfig(rank=8, targets=("body.3",))).check(model, stream, False)
    with pytest.raises(UsageError, match="rank 9 exceeds the width 8 of layer 'body.3'"):
        LoRA(LoRAConfig(rank=9, targets=("body.3",))).check(model, stream, False)
    # A conv layer's input side is its channels times its kernel.
    conv = nn.Sequential(nn.Conv2d(1, 32, 3), nn.Flatten(), nn.Linear(32, 4))
    with pytest.raises(UsageError, match=r"width 9 of layer '0' \(Conv2d 1 -> 32 channels, "
                                         r"kernel 3x3\)"):
        LoRA(LoRAConfig(rank=10, targets=("0",))).check(conv, stream, False)
    LoRA(LoRAConfig(rank=9, targets=("0",))).check(conv, stream, False)


def test_a_rank_above_a_layers_width_stops_build_before_anything_runs():
    from cl.experiment import build, make_config

    settings = {"tasks": "split-digits", "scenario": "task", "hidden": [16],
                "train_per_task": 20, "test_per_task": 10}
    with pytest.raises(UsageError, match=r"^lora rank 17 exceeds the width 16 of layer 'body\.1' "
                                         r"\(Linear 64 -> 16\): use lora:rank=16 or less"):
        build(make_config({**settings, "strategy": ["lora:rank=17"]}))
    build(make_config({**settings, "strategy": ["lora:rank=16"]}))


def test_bad_settings():
    for bad in ({"rank": 0}, {"alpha": -1.0}, {"alpha": float("inf")}, {"dropout": 1.0},
                {"merge": True, "head": "per_task"}):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)


def test_lora_on_a_transformers_model():
    stream = token_stream()
    model = tiny_bert(stream.num_classes, positions=16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRA(LoRAConfig(rank=2, targets=("*query", "*value")))
    result = run(model, stream, lora, TrainConfig(batch_size=4, epochs=2, lr=0.05))
    assert lora.targets == ["bert.encoder.layer.0.attention.self.query",
                            "bert.encoder.layer.0.attention.self.value"]
    assert result.accuracy[1, 0] == result.accuracy[0, 0]
    final = model.state_dict()
    query = "bert.encoder.layer.0.attention.self.query"
    assert torch.equal(final[f"{query}.base_layer.weight"], base[f"{query}.weight"])
    assert torch.equal(final["bert.embeddings.word_embeddings.weight"],
                       base["bert.embeddings.word_embeddings.weight"])


# ---- routing: adapters without task ids -----------------------------------------------------

def test_routing_picks_the_nearest_prototype_and_the_surest_adapter():
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    features = torch.tensor([[5.0, 0.1], [0.2, 3.0], [-2.0, -0.5], [0.3, -0.2]])
    assert route_by_prototype(features, prototypes).tolist() == [0, 1, 2, 0]
    allowed = torch.tensor([[True, True, False, False], [False, False, True, True]])
    logits = torch.tensor([[[4.0, 0.0, 9.0, 9.0], [0.1, 0.0, 0.0, 0.0]],    # adapter of task 0
                           [[0.0, 0.0, 1.0, 0.9], [0.0, 0.0, 5.0, 0.0]]])  # adapter of task 1
    # Row 0: task 0's softmax over its classes is sure (4 vs 0), task 1's is not (1 vs 0.9);
    # row 1: the other way round. Logits of classes outside a task do not count.
    assert route_by_entropy(logits, allowed).tolist() == [0, 1]
    entropy = masked_entropy(torch.tensor([[0.0, 0.0, 7.0]]), torch.tensor([True, True, False]))
    assert entropy.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    chosen = within_routed_task(torch.ones(2, 4), torch.tensor([1, 0]), allowed)
    lowest = torch.finfo(torch.float32).min
    assert chosen.tolist() == [[lowest, lowest, 1.0, 1.0], [1.0, 1.0, lowest, lowest]]


def test_prototype_routing_reports_the_rows_routed_to_their_own_task():
    stream = blob_stream(num_tasks=3, train_per_class=10, test_per_class=6)
    torch.manual_seed(0)
    model = build_mlp(stream.input_shape, stream.num_classes, (16, 16))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    lora = LoRA(LoRAConfig(rank=2, alpha=2.0, route="prototype"))
    result = run(model, stream, lora, TrainConfig(batch_size=4, epochs=2, lr=0.05))
    # By hand: the base model (initial weights, which LoRA never changes) gives the features
    # (the head's input); each trained task's prototype is its training rows' mean feature.
    base = build_mlp(stream.input_shape, stream.num_classes, (16, 16))
    base.load_state_dict(initial)
    with torch.no_grad():
        features = [(base.body(task.train.x).double(), base.body(task.test.x).double())
                    for task in stream.tasks]
    routing = lora.report()["routing_accuracy"]
    for after in range(3):
        prototypes = torch.stack([features[t][0].mean(0) for t in range(after + 1)])
        for task in range(3):
            if task > after:
                assert routing[after][task] is None  # no adapter to route to yet
                continue
            routed = route_by_prototype(features[task][1], prototypes)
            assert routing[after][task] == pytest.approx(float((routed == task).float().mean()))
    assert result.accuracy[-1].mean() > 0.5
    assert lora.report()["feature_rows_computed"] == sum(
        len(task.train) + len(task.test) for task in stream.tasks)


def test_entropy_routing_runs_every_adapter_and_scores_rows_without_task_ids():
    stream = blob_stream(num_tasks=2, train_per_class=10, test_per_class=6)
    torch.manual_seed(0)
    model = build_mlp(stream.input_shape, stream.num_classes, (16, 16))
    lora = LoRA(LoRAConfig(rank=2, alpha=2.0, route="entropy"))
    first = run(model, stream, lora, TrainConfig(batch_size=4, epochs=2, lr=0.05))
    routing = lora.report()["routing_accuracy"]
    assert routing[0] == [1.0, None] and all(0 <= value <= 1 for value in routing[1])
    torch.manual_seed(0)
    again = build_mlp(stream.input_shape, stream.num_classes, (16, 16))
    second = run(again, stream, LoRA(LoRAConfig(rank=2, alpha=2.0, route="entropy")),
                 TrainConfig(batch_size=4, epochs=2, lr=0.05))
    assert (first.accuracy == second.accuracy).all()


def test_routing_settings_that_contradict_are_refused():
    with pytest.raises(ValueError, match="route must be one of"):
        LoRAConfig(route="nearest")
    with pytest.raises(ValueError, match="merge"):
        LoRAConfig(route="prototype", merge=True, head="shared")
    stream = blob_stream(num_tasks=2, scenario="task")
    model = build_mlp(stream.input_shape, stream.num_classes, (8, 8))
    with pytest.raises(UsageError, match="which the task scenario gives"):
        LoRA(LoRAConfig(route="entropy")).check(model, stream, False)


# ---- O-LoRA: every adapter at once, each new one orthogonal to the earlier ones --------------

def test_the_orthogonality_penalty_is_zero_for_orthogonal_a_matrices_and_positive_otherwise():
    basis = torch.eye(6)
    assert orthogonality_penalty(basis[:2], [basis[2:4], basis[4:]]).item() == 0.0
    assert orthogonality_penalty(basis[:2], []).item() == 0.0
    overlapping = basis[:2] + 0.5 * basis[2:4]
    # |A_old A_new^T|: the 0.5 each new row shares with one old row.
    assert orthogonality_penalty(overlapping, [basis[2:4]]).item() == pytest.approx(1.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), st.integers(0, 2**31))
def test_the_orthogonality_penalty_is_never_negative(rank, earlier, seed):
    generator = torch.Generator().manual_seed(seed)
    new = torch.randn(rank, 7, generator=generator)
    old = [torch.randn(rank, 7, generator=generator) for _ in range(earlier)]
    assert orthogonality_penalty(new, old).item() >= 0
    assert orthogonality_penalty(torch.zeros(rank, 7), old).item() == 0.0


def test_route_sum_runs_every_adapter_and_trains_only_the_newest():
    stream = blob_stream(num_tasks=3, train_per_class=6, test_per_class=4)
    torch.manual_seed(0)
    model = build_mlp(stream.input_shape, stream.num_classes, (8, 8))
    lora = LoRA(LoRAConfig(rank=2, alpha=2.0, route="sum", lambda_orth=0.5, lambda_l2=0.01))
    assert lora.config.head == "shared"
    states = []
    run(model, stream, lora, TrainConfig(batch_size=4, epochs=2, lr=0.05),
        checkpoint=lambda state: states.append({k: v.clone() for k, v in state["model"].items()}))
    for done, state in enumerate(states[1:], start=1):
        for earlier in range(done):  # earlier adapters never move
            keys = [k for k in state if f".task{earlier}." in k]
            assert keys and all(torch.equal(state[k], states[done - 1][k]) for k in keys)
    # A layer's output is the base's plus every adapter's update, scaled by alpha / rank.
    layer = model.body[1]
    x = torch.randn(5, 6)
    with torch.no_grad():
        expected = layer.base_layer(x) + sum(
            layer.lora_B[name](layer.lora_A[name](x)) * layer.scaling[name]
            for name in ("task0", "task1", "task2"))
        assert torch.allclose(layer(x), expected, atol=1e-6)
    terms = lora.loss_terms(model, None, None, stream.tasks[2])
    assert set(terms) == {"orthogonal", "l2"} and terms["orthogonal"].item() > 0


def test_o_lora_settings_are_checked():
    for bad in ({"lambda_orth": -1.0}, {"lambda_l2": float("nan")},
                {"route": "sum", "head": "per_task"}, {"merge": True, "lambda_orth": 0.5}):
        with pytest.raises(ValueError):
            LoRAConfig(**bad)
    stream = blob_stream(scenario="class")
    LoRA(LoRAConfig(rank=2, route="sum")).check(mlp(stream), stream, False)
