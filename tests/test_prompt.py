"""Prompt tuning per task: the same forward pass as peft's PeftModelForSequenceClassification,
each task training its own prompt and head copy only (the base bitwise unchanged), routing
without task ids, prompts reloaded from their safetensors files, and resume."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from helpers import blob_stream, tiny_bert, token_stream
from safetensors.torch import load_file, save_file

from cl.errors import UsageError
from cl.features import batch_features
from cl.models import build_mlp, logits_of
from cl.routing import route_by_prototype
from cl.runner import TrainConfig, run
from strategies import Prompt, PromptConfig

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]
TRAIN = TrainConfig(batch_size=4, epochs=2, lr=0.05, optimizer="adam")


def snapshot(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_the_forward_pass_is_peft_prompt_tuning():
    from peft import PromptTuningConfig, get_peft_model

    stream = token_stream(num_tasks=1)
    model = tiny_bert(stream.num_classes).eval()
    reference = get_peft_model(copy.deepcopy(model), PromptTuningConfig(
        task_type="SEQ_CLS", num_virtual_tokens=3, prompt_tuning_init="RANDOM")).eval()
    prompt = Prompt(PromptConfig(num_tokens=3))
    prompt.before_run(model, stream, seed=0)
    prompt.before_task(model, stream.tasks[0])
    with torch.no_grad():
        reference.prompt_encoder["default"].embedding.weight.copy_(
            model.cl_prompts.task0.embedding.weight)
        x = stream.tasks[0].test.x
        ours = logits_of(model, x)
        assert torch.allclose(ours, reference(**x).logits, atol=1e-6)
        prompt.use(model, None)  # the base alone: what the model gave before any prompt
        assert not torch.allclose(logits_of(model, x), ours)


def test_each_task_trains_only_its_prompt_and_head_and_the_base_stays_bitwise():
    stream = token_stream(num_tasks=3)
    model = tiny_bert(stream.num_classes)
    built = snapshot(model)
    before: list[dict] = []
    after: list[dict] = []

    class Recorder(Prompt):
        def before_task(self, model, task):
            super().before_task(model, task)
            before.append(snapshot(model))

        def after_task(self, model, task):
            super().after_task(model, task)
            after.append(snapshot(model))

    prompt = Recorder(PromptConfig(num_tokens=3))
    result = run(model, stream, prompt, TRAIN)
    final = model.state_dict()
    for key, value in built.items():  # the base: every weight as built (the head wrapped)
        wrapped = key.replace("classifier.", "classifier.original_module.")
        assert torch.equal(final[wrapped], value)
    for task in range(3):
        own = sorted(key for key in final if f".task{task}." in key)
        assert own == [f"cl_prompts.task{task}.embedding.weight",
                       f"classifier.modules_to_save.task{task}.bias",
                       f"classifier.modules_to_save.task{task}.weight"]
        for key in own:  # trained during its task (the gradient reaches it), never after
            assert not torch.equal(before[task][key], after[task][key])
            assert torch.equal(after[task][key], final[key])
    # Earlier tasks keep their accuracy exactly: BWT is zero.
    for j in range(3):
        assert (result.accuracy[j:, j] == result.accuracy[j, j]).all()
    assert prompt.report()["trainable_parameters_per_task"] == [3 * 16 + 16 * 6 + 6] * 3


def test_the_prompt_alone_lowers_the_training_loss():
    stream = token_stream(num_tasks=1, train_rows=32)
    model = tiny_bert(stream.num_classes)
    prompt = Prompt(PromptConfig(num_tokens=4, head="shared"))
    prompt.before_run(model, stream, 0)
    prompt.before_task(model, stream.tasks[0])
    x, y = stream.tasks[0].train.x, stream.tasks[0].train.y

    def loss():
        return torch.nn.functional.cross_entropy(logits_of(model, x), y)

    with torch.no_grad():
        initial = loss()
    optimizer = torch.optim.Adam(model.cl_prompts.parameters(), lr=0.05)  # not the head
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        assert loss() < initial


def test_prototype_routing_reports_the_rows_routed_to_their_own_task():
    stream = token_stream(num_tasks=3, scenario="class")
    model = tiny_bert(stream.num_classes)
    base = copy.deepcopy(model).eval()
    prompt = Prompt(PromptConfig(num_tokens=3, route="prototype"))
    result = run(model, stream, prompt, TRAIN)
    # By hand: the base model's mean-token features; a task's prototype is the mean of its
    # training rows' features.
    with torch.no_grad():
        features = [(batch_features(base, task.train.x, "mean_tokens").double(),
                     batch_features(base, task.test.x, "mean_tokens").double())
                    for task in stream.tasks]
    routing = prompt.report()["routing_accuracy"]
    for after in range(3):
        prototypes = torch.stack([features[t][0].mean(0) for t in range(after + 1)])
        for task in range(3):
            if task > after:
                assert routing[after][task] is None
                continue
            routed = route_by_prototype(features[task][1], prototypes)
            assert routing[after][task] == pytest.approx(float((routed == task).float().mean()))
    assert result.accuracy.shape == (3, 3)


def test_entropy_routing_is_deterministic():
    stream = token_stream(num_tasks=2, scenario="class")
    results = []
    for _ in range(2):
        prompt = Prompt(PromptConfig(num_tokens=2, route="entropy"))
        results.append(run(tiny_bert(stream.num_classes), stream, prompt, TRAIN))
        routing = prompt.report()["routing_accuracy"]
        assert routing[0] == [1.0, None] and all(0 <= v <= 1 for v in routing[1])
    assert np.array_equal(results[0].accuracy, results[1].accuracy)


def test_prompts_reload_from_their_safetensors_files_and_reproduce_r(tmp_path):
    stream = token_stream(num_tasks=2)
    model = tiny_bert(stream.num_classes)
    prompt = Prompt(PromptConfig(num_tokens=3))
    result = run(model, stream, prompt, TRAIN)
    files = {}
    for name, tensors in prompt.artifacts().items():
        files[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(files[name]))
    assert sorted(files) == ["task0", "task1"]
    for path in files.values():  # the prompt and its head copy; the base never
        assert all(key.startswith(("cl_prompts.", "classifier.modules_to_save."))
                   for key in load_file(str(path)))
    fresh = tiny_bert(stream.num_classes)  # the same base, from the same seed
    again = Prompt(PromptConfig(num_tokens=3))
    again.before_run(fresh, stream, 0)
    for task in stream.tasks:
        again.before_task(fresh, task)
    for path in files.values():
        missing, unexpected = fresh.load_state_dict(load_file(str(path)), strict=False)
        assert not unexpected
    fresh.eval()
    with torch.no_grad():
        for task in stream.tasks:
            with again.task_prompt(fresh, task):
                logits = logits_of(fresh, task.test.x)
            # Task-IL: each row classified within its task's classes, as R was measured.
            within = logits[:, list(task.classes)].argmax(1)
            predicted = torch.tensor(task.classes)[within]
            accuracy = float((predicted == task.test.y).float().mean())
            assert accuracy == result.accuracy[-1, task.index]


def weights_only_round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("route, scenario", [("none", "task"), ("prototype", "class")])
def test_resume_equals_the_uninterrupted_run_and_checkpoints_hold_no_base(route, scenario):
    stream = token_stream(num_tasks=3, scenario=scenario)
    config = TrainConfig(batch_size=4, epochs=2, lr=0.05, optimizer="adam", seed=3)
    saved = []
    whole = run(tiny_bert(stream.num_classes), stream, Prompt(PromptConfig(num_tokens=2,
                                                                           route=route)),
                config, checkpoint=lambda state: saved.append(weights_only_round_trip(state)))
    assert all(key.startswith(("cl_prompts.", "classifier.modules_to_save."))
               for state in saved for key in state["model"])
    for done in (1, 2):
        resumed = run(tiny_bert(stream.num_classes), stream,
                      Prompt(PromptConfig(num_tokens=2, route=route)), config,
                      resume=saved[done - 1])
        assert resumed.resumed_from == done
        assert np.array_equal(resumed.accuracy, whole.accuracy)


def test_bad_settings_and_models_are_refused():
    for bad in ({"num_tokens": 0}, {"num_tokens": 2.5}, {"init": "text"},
                {"head": "none"}, {"route": "sum"}):
        with pytest.raises(ValueError):
            PromptConfig(**bad)
    blobs = blob_stream(num_tasks=2, scenario="task")
    with pytest.raises(UsageError, match="transformers model's token embeddings"):
        Prompt().check(build_mlp(blobs.input_shape, blobs.num_classes, (8,)), blobs, False)
    tokens = token_stream(num_tasks=2, scenario="class")
    model = tiny_bert(tokens.num_classes, positions=16)
    with pytest.raises(UsageError, match="class scenario hides"):
        Prompt(PromptConfig(num_tokens=2)).check(model, tokens, False)
    with pytest.raises(UsageError, match="exceed the model's 16 positions"):
        Prompt(PromptConfig(num_tokens=9, route="entropy")).check(model, tokens, False)
    with pytest.raises(UsageError, match="task scenario gives"):
        Prompt(PromptConfig(route="entropy")).check(model, token_stream(2), False)
    with pytest.raises(UsageError, match="--joint"):
        Prompt(PromptConfig(num_tokens=2)).check(model, token_stream(2), True)
