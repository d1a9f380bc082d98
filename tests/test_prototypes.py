"""Classifiers on frozen features: `ncm` (nearest class mean) and `ranpac` (random projection and
ridge regression), the runner's two hooks they use (`trains`, `eval_logits`), and their math
against hand computations."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import blob_stream, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import cl
from test_runner import Recorder, two_by_two

from cl.features import FeatureCache, mean_tokens, split_features
from cl.metrics import min_accuracy
from cl.runner import TrainConfig, run
from cl.strategy import Chain
from strategies import (
    EMA,
    NCM,
    EMAConfig,
    Freeze,
    FreezeConfig,
    NCMConfig,
    RanPAC,
    RanPACConfig,
    Replay,
    ReplayConfig,
)
from strategies.ranpac import RIDGES, choose_ridge, expand, random_projection, ridge_weights

CONFIG = TrainConfig(batch_size=4, epochs=2, lr=0.1, seed=0)


def hidden(model, x):
    """What the tiny model's head reads: the ReLU of its first layer."""
    with torch.no_grad():
        return model[1](model[0](x))


def test_a_strategy_that_fits_without_steps_and_scores_rows_itself_has_its_hooks_pinned():
    class Fitter(Recorder):
        predicts = True

        def trains(self, task):
            self.calls.append((self.name, "trains", task.index))
            return task.index == 0

        def eval_logits(self, model, split, rows):
            self.calls.append((self.name, "eval_logits", None))
            return None  # the runner forwards the rows itself

    stream, model, config = two_by_two()
    calls: list = []
    result = run(model, stream, Fitter("fit", calls), config)
    hooks = [(hook, task) for _, hook, task in calls]
    evaluate_all = [("eval_enter", 0), ("eval_logits", None), ("eval_exit", 0),
                    ("eval_enter", 1), ("eval_logits", None), ("eval_exit", 1)]
    step = [("transform_batch", 0), ("cross_entropy_mask", 0), ("loss_terms", 0),
            ("adjust_gradients", 0), ("after_step", 0)]
    # Task 1 takes no step: no optimizer (no param_groups), straight to after_task.
    assert hooks == [("trains", 0), ("trains", 1), ("before_run", None), *evaluate_all,
                     ("before_task", 0), ("param_groups", None), *step, *step,
                     ("after_task", 0), *evaluate_all, ("before_task", 1), ("after_task", 1),
                     *evaluate_all]
    assert result.steps == 2


def test_eval_logits_stand_in_for_the_forward_pass():
    class Constant(Recorder):
        predicts = True

        def eval_logits(self, model, split, rows):
            logits = torch.zeros(len(split.y[rows]), 4)
            logits[:, 3] = 1.0  # every row is class 3
            return logits

    stream, model, config = two_by_two()
    result = run(model, stream, Constant("constant", []), config)
    expected = [float((task.test.y == 3).float().mean()) for task in stream.tasks]
    assert np.array_equal(result.accuracy[-1], expected)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_ncm_equals_class_means_and_argmax_by_hand(metric):
    stream = blob_stream(num_tasks=3, classes_per_task=2, train_per_class=6, test_per_class=5)
    model = tiny_model(stream)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run(model, stream, NCM(NCMConfig(metric=metric)), CONFIG)
    assert result.steps == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(p.requires_grad for p in model.parameters())
    for after in range(3):
        seen = [task for task in stream.tasks[:after + 1]]
        classes = sorted({c for task in seen for c in task.classes})
        rows = torch.cat([hidden(model, task.train.x) for task in seen])
        labels = torch.cat([task.train.y for task in seen])
        means = torch.stack([rows[labels == c].mean(0) for c in classes])
        for task in stream.tasks:
            test = hidden(model, task.test.x)
            if metric == "cosine":
                scores = torch.stack([F.cosine_similarity(test, m[None]) for m in means], 1)
            else:
                scores = -torch.stack([(test - m).norm(dim=1) for m in means], 1)
            predicted = torch.tensor(classes)[scores.argmax(1)]
            accuracy = (predicted == task.test.y).sum().item() / len(task.test.y)
            assert result.accuracy[after, task.index] == pytest.approx(accuracy, abs=1e-12)


def test_ncm_before_any_task_scores_every_class_alike_and_never_a_class_not_seen():
    stream = blob_stream(num_tasks=2)
    result = run(tiny_model(stream), stream, NCM(), CONFIG)
    # After task 0 only its classes can be predicted: task 1's rows are all wrong.
    assert result.accuracy[0, 1] == 0.0
    assert result.accuracy[0, 0] > 0.5


def test_adapt_first_trains_on_task_0_only_then_the_features_are_those_of_the_trained_model():
    stream = blob_stream(num_tasks=3)
    model = tiny_model(stream)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    states = []
    result = run(model, stream, NCM(NCMConfig(adapt="first")), CONFIG,
                 checkpoint=lambda state: states.append(state["model"]))
    assert result.steps == 4 * 2  # 16 rows, batch 4, 2 epochs: task 0 only
    assert not torch.equal(states[0]["0.weight"], initial["0.weight"])
    for later in states[1:]:
        assert all(torch.equal(states[0][k], v) for k, v in later.items())
    # The prototypes come from the adapted model's features.
    hand = NCM()
    torch.manual_seed(0)
    adapted = tiny_model(stream)
    adapted.load_state_dict(states[0])
    again = run(adapted, stream, hand, CONFIG)
    assert np.array_equal(again.accuracy[1:], result.accuracy[1:])


def test_concat_puts_the_pretrained_features_beside_the_adapted_ones():
    stream = blob_stream(num_tasks=3, classes_per_task=2, train_per_class=6, test_per_class=5)
    model = tiny_model(stream)
    pretrained = copy.deepcopy(model)
    ncm = NCM(NCMConfig(adapt="first", concat=True))
    result = run(model, stream, ncm, CONFIG)
    assert not torch.equal(pretrained[0].weight, model[0].weight)  # task 0 adapted it

    def both(x):
        return torch.cat([hidden(pretrained, x), hidden(model, x)], 1)

    # By hand after the last task: class means of both models' features, cosine argmax.
    classes = sorted({c for task in stream.tasks for c in task.classes})
    rows = torch.cat([both(task.train.x) for task in stream.tasks])
    labels = torch.cat([task.train.y for task in stream.tasks])
    means = torch.stack([rows[labels == c].mean(0) for c in classes])
    for task in stream.tasks:
        scores = F.normalize(both(task.test.x), dim=1) @ F.normalize(means, dim=1).T
        predicted = torch.tensor(classes)[scores.argmax(1)]
        accuracy = (predicted == task.test.y).sum().item() / len(task.test.y)
        assert result.accuracy[-1, task.index] == pytest.approx(accuracy, abs=1e-12)
    with pytest.raises(ValueError, match="needs adapt=first"):
        NCMConfig(concat=True)
    with pytest.raises(ValueError, match="needs adapt=first"):
        RanPACConfig(concat=True)


@pytest.mark.parametrize("strategy", ["ncm", "ranpac"])
def test_concat_resumes_with_the_pretrained_copy_of_the_rebuilt_model(strategy):
    stream = blob_stream(num_tasks=3)
    make = {"ncm": lambda: NCM(NCMConfig(adapt="first", concat=True)),
            "ranpac": lambda: RanPAC(RanPACConfig(projection=16, adapt="first", concat=True))}
    saved = []
    whole = run(tiny_model(stream), stream, make[strategy](), CONFIG,
                checkpoint=lambda state: saved.append(state))
    resumed = run(tiny_model(stream), stream, make[strategy](), CONFIG, resume=saved[1])
    assert np.array_equal(resumed.accuracy, whole.accuracy)


def test_each_split_is_forwarded_once_for_features():
    stream = blob_stream(num_tasks=3)
    strategy = NCM()
    run(tiny_model(stream), stream, strategy, TrainConfig(eval_every=0))
    # Every task's training rows once, its test rows once, over 4 evaluations of 3 tasks.
    assert strategy.frozen.cache.rows_computed == sum(
        len(task.train) + len(task.test) for task in stream.tasks)


def test_classifiers_on_frozen_features_refuse_what_contradicts_them():
    for other in (Replay(ReplayConfig(capacity=4)), EMA(EMAConfig())):
        with pytest.raises(ValueError, match="does not compose with"):
            Chain(NCM(), other)
    with pytest.raises(ValueError, match="both score the evaluated rows"):
        Chain(NCM(), RanPAC())
    Chain(Freeze(FreezeConfig(patterns=("0.*",))), NCM(NCMConfig(adapt="first")))
    for bad in ({"metric": "dot"}, {"adapt": "last"}, {"features": "pooler"}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            NCMConfig(**bad)
    for bad in ({"projection": -1}, {"projection": 2.5}, {"held_out": 0}, {"held_out": 1.0}):
        with pytest.raises(ValueError, match=list(bad)[0]):
            RanPACConfig(**bad)


def test_a_bad_setting_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    assert cl("run", "--strategy", "ncm:metric=dot", "--out", tmp_path / "r") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metric" in err[0] and "dot" in err[0]
    assert not (tmp_path / "r").exists()


def test_cl_run_with_ncm_on_the_default_stream(tmp_path):
    out = tmp_path / "ncm"
    assert cl("run", "--strategy", "ncm", "--out", out) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 0 and metrics["trainable_parameters"] == 0
    assert metrics["trained_parameters"] == 0
    assert metrics["acc"] > 0.5
    report = metrics["strategies"]["ncm"]
    assert report["classes_seen"] == 10 and report["feature_rows_computed"] > 0


def test_ranpac_closed_form_equals_solve_on_the_accumulated_statistics():
    stream = blob_stream(num_tasks=3, train_per_class=10)
    model = tiny_model(stream)
    strategy = RanPAC(RanPACConfig(projection=40))
    result = run(model, stream, strategy, CONFIG)
    projection = random_projection(16, 40, torch.Generator().manual_seed(0 + 2_000_003))
    assert torch.equal(strategy.projection, projection)
    rows = torch.cat([expand(hidden(model, task.train.x), projection) for task in stream.tasks])
    labels = torch.cat([task.train.y for task in stream.tasks])
    gram = rows.T @ rows
    products = rows.T @ F.one_hot(labels, stream.num_classes).double()
    assert torch.allclose(strategy.gram, gram, rtol=1e-10, atol=1e-8)
    ridge = strategy.ridges[-1]
    assert ridge in RIDGES and len(strategy.ridges) == 3
    solved = torch.linalg.solve(gram + ridge * torch.eye(40, dtype=torch.float64), products)
    assert torch.allclose(strategy.weights, solved, rtol=1e-8, atol=1e-10)
    for task in stream.tasks:
        predicted = (expand(hidden(model, task.test.x), projection) @ solved).argmax(1)
        accuracy = (predicted == task.test.y).sum().item() / len(task.test.y)
        assert result.accuracy[-1, task.index] == pytest.approx(accuracy, abs=1e-12)
    assert result.steps == 0 and result.accuracy[-1].mean() > 0.8


def test_the_ridge_chosen_is_the_one_a_solve_per_candidate_would_choose():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(30, 12, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 3, (30,), generator=generator)
    fit, held = rows[:22], rows[22:]
    gram = fit.T @ fit
    products = fit.T @ F.one_hot(labels[:22], 3).double()
    ridge, errors = choose_ridge(gram, products, held, labels[22:])
    targets = F.one_hot(labels[22:], 3).double()
    by_solve = [float((held @ ridge_weights(gram, products, r) - targets).pow(2).mean())
                for r in RIDGES]
    assert np.allclose(errors, by_solve, rtol=1e-6, atol=1e-12)
    assert ridge == RIDGES[int(np.argmin(by_solve))]


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 12), st.integers(1, 4), st.floats(1e-6, 1e3), st.integers(0, 2**31))
def test_ridge_weights_satisfy_the_normal_equations(rows, classes, ridge, seed):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(rows, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (rows,), generator=generator)
    gram = features.T @ features
    products = features.T @ F.one_hot(labels, classes).double()
    weights = ridge_weights(gram, products, ridge)
    assert torch.allclose((gram + ridge * torch.eye(5, dtype=torch.float64)) @ weights,
                          products, atol=1e-8 * max(1.0, ridge))


@pytest.mark.parametrize("strategy", [lambda: NCM(), lambda: RanPAC(RanPACConfig(projection=16))])
def test_same_seed_same_matrix(strategy):
    stream = blob_stream(num_tasks=3)
    first = run(tiny_model(stream), stream, strategy(), CONFIG)
    second = run(tiny_model(stream), stream, strategy(), CONFIG)
    assert np.array_equal(first.accuracy, second.accuracy)


def test_min_accuracy_of_tasks_fitted_without_steps_reads_the_task_end_evaluations():
    # Initial evaluation, then three task ends, all at step 0.
    steps = [0, 0, 0, 0]
    accuracy = [[0.1, 0.1, 0.1], [0.9, np.nan, np.nan], [0.6, 0.8, np.nan], [0.7, 0.7, 0.9]]
    # Task 0: min(0.6, 0.7); task 1: 0.7.
    assert min_accuracy(steps, accuracy, [0, 0, 0]) == pytest.approx((0.6 + 0.7) / 2)


def text_model_and_split():
    from transformers import BertConfig, BertForSequenceClassification

    from cl.types import Split

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=4)).eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 50, (9, 10), generator=generator)
    lengths = torch.tensor([10, 3, 7, 10, 5, 2, 8, 10, 4])
    mask = (torch.arange(10) < lengths.unsqueeze(1)).long()
    return model, Split({"input_ids": ids * mask, "attention_mask": mask},
                        torch.arange(9) % 4)


def test_text_features_are_the_mean_of_the_last_hidden_states_over_each_rows_tokens():
    model, split = text_model_and_split()
    features = split_features(model, split, "auto")
    with torch.no_grad():
        for row in range(9):
            length = int(split.x["attention_mask"][row].sum())
            ids = split.x["input_ids"][row:row + 1, :length]
            states = model.bert(input_ids=ids).last_hidden_state[0]
            assert torch.allclose(features[row], states.mean(0), atol=1e-5)
        pooled = model.bert(**split.x).pooler_output
    # features=head reads the classifier's input: BERT's pooler output (dropout is off).
    assert torch.allclose(split_features(model, split, "head"), pooled, atol=1e-5)


def test_mean_tokens_leaves_padding_out():
    hidden_states = torch.tensor([[[1.0], [3.0], [100.0]]])
    assert mean_tokens(hidden_states, torch.tensor([[1, 1, 0]])).item() == 2.0


def test_the_cache_computes_a_split_once_until_cleared():
    model, split = text_model_and_split()
    cache = FeatureCache("auto")
    first = cache.of(model, split)
    assert cache.of(model, split) is first and cache.rows_computed == 9
    cache.clear()
    assert torch.equal(cache.of(model, split), first) and cache.rows_computed == 18
    with pytest.raises(ValueError, match="features"):
        FeatureCache("pooler")


def test_ncm_and_ranpac_on_a_transformers_model_end_to_end(tmp_path, monkeypatch):
    from text_data import CUES, write_jsonl_dataset, write_tiny_backbone

    monkeypatch.setenv("CL_CACHE_DIR", str(tmp_path / "cache"))
    backbone = write_tiny_backbone(tmp_path / "bert")
    write_jsonl_dataset(tmp_path / "data" / "news", CUES["news"])
    write_jsonl_dataset(tmp_path / "data" / "reviews", CUES["reviews"])
    for strategy in ("ncm", "ranpac:projection=64"):
        out = tmp_path / strategy.split(":")[0]
        assert cl("run", "--tasks", "text:datasets=news|reviews", "--data", tmp_path / "data",
                  "--model", f"hf:{backbone}", "--strategy", strategy, "--out", out) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["scenario"] == "class"
        assert metrics["steps"] == 0 and metrics["trainable_parameters"] == 0
        assert metrics["strategies"][strategy.split(":")[0]]["feature_rows_computed"] > 0
