"""Distill: the KL's invariants, which classes enter it, the teachers (previous, initial, a file),
DER-style targets from a replay buffer, and composition errors."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import blob_stream, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import Tensor

from cl.errors import UsageError
from cl.runner import TrainConfig, run
from cl.spec import parse_config
from cl.strategy import Chain, Strategy
from cl.types import Batch
from strategies import Distill, DistillConfig, Replay, ReplayConfig
from strategies.distill import distillation_loss, masked_kl

logit_rows = st.integers(1, 4).flatmap(lambda rows: st.integers(2, 6).flatmap(
    lambda classes: st.lists(st.floats(-30, 30, allow_nan=False, width=32),
                             min_size=rows * classes, max_size=rows * classes).map(
        lambda values: torch.tensor(values).reshape(rows, classes))))


@settings(max_examples=40, deadline=None)
@given(logits=logit_rows, temperature=st.floats(0.5, 5))
def test_kl_of_a_distribution_with_itself_is_zero(logits, temperature):
    mask = torch.ones_like(logits, dtype=torch.bool)
    assert torch.equal(masked_kl(logits, logits, mask, temperature), torch.zeros(len(logits)))


@settings(max_examples=40, deadline=None)
@given(teacher=logit_rows, seed=st.integers(0, 1000), temperature=st.floats(0.5, 5))
def test_kl_is_never_negative_and_ignores_masked_classes(teacher, seed, temperature):
    generator = torch.Generator().manual_seed(seed)
    student = 10 * torch.randn(teacher.shape, generator=generator)
    mask = torch.rand(teacher.shape, generator=generator) < 0.6
    mask[:, 0] = True
    kl = masked_kl(teacher, student, mask, temperature)
    assert (kl >= -1e-5).all()
    # Whatever the logits of masked-out classes are, the KL is the same.
    noise = 100 * torch.randn(teacher.shape, generator=generator)
    moved = masked_kl(teacher + noise * ~mask, student - noise * ~mask, mask, temperature)
    assert torch.allclose(kl, moved, atol=1e-5)


def test_kl_gradients_stay_finite_with_masked_classes():
    student = torch.randn(3, 5, requires_grad=True)
    mask = torch.tensor([True, True, False, False, False])
    teacher = torch.randn(3, 5)
    distillation_loss(teacher, student, mask, 2.0, 1.0).backward()
    assert torch.isfinite(student.grad).all()
    assert (student.grad[:, 2:] == 0).all() and (student.grad[:, :2] != 0).any()


def test_loss_is_alpha_times_t_squared_times_mean_kl():
    teacher, student = torch.randn(4, 3), torch.randn(4, 3)
    mask = torch.ones(4, 3, dtype=torch.bool)
    kl = masked_kl(teacher, student, mask, 3.0).mean()
    assert torch.allclose(distillation_loss(teacher, student, mask, 3.0, 0.5), 0.5 * 9 * kl)


class Probe(Strategy):
    """Records the loss terms of the strategy it wraps at every step, by task."""

    name = "probe"

    def __init__(self, inner):
        self.inner, self.terms = inner, []

    def before_run(self, model, stream, seed):
        self.inner.before_run(model, stream, seed)

    def before_task(self, model, task):
        self.inner.before_task(model, task)

    def loss_terms(self, model, batch, logits, task):
        terms = self.inner.loss_terms(model, batch, logits, task)
        self.terms.append((task.index, {k: v.item() for k, v in terms.items()}))
        return terms

    def after_task(self, model, task):
        self.inner.after_task(model, task)


def test_lwf_has_no_term_on_the_first_task_and_a_frozen_teacher_after():
    stream = blob_stream(num_tasks=3)
    model = tiny_model(stream)
    distill = Distill(DistillConfig(alpha=1.0, temperature=2.0))
    probe = Probe(distill)
    snapshots = []

    class Snap(Strategy):
        name = "snap"

        def after_task(self, model, task):
            snapshots.append({k: v.clone() for k, v in model.state_dict().items()})

    run(model, stream, Chain(Snap(), probe), TrainConfig(batch_size=4, epochs=1))
    assert all(terms == {} for task, terms in probe.terms if task == 0)
    later = [terms["kl"] for task, terms in probe.terms if task > 0]
    assert later and all(value >= 0 for value in later) and max(later) > 0
    # The teacher is the model as it ended the previous task, untouched by training since.
    teacher = distill.teacher.state_dict()
    assert all(torch.equal(teacher[k], snapshots[-1][k]) for k in teacher)
    assert not any(p.requires_grad for p in distill.teacher.parameters())


def test_class_incremental_kl_only_sees_the_teachers_classes():
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    distill = Distill(DistillConfig())
    distill.before_run(model, stream, 0)
    distill.after_task(model, stream.tasks[0])
    batch = Batch(stream.tasks[1].train.x[:4], stream.tasks[1].train.y[:4],
                  torch.ones(4, dtype=torch.long))
    logits = model(batch.x)
    base = distill.loss_terms(model, batch, logits, stream.tasks[1])["kl"]
    # Moving the logits of the new task's classes (2, 3) changes nothing; classes 0, 1 do.
    bump = torch.zeros_like(logits)
    bump[:, 2:] = 5.0
    assert torch.allclose(distill.loss_terms(model, batch, logits + bump, stream.tasks[1])["kl"],
                          base)
    bump = torch.zeros_like(logits)
    bump[:, 0] = 5.0
    assert not torch.allclose(
        distill.loss_terms(model, batch, logits + bump, stream.tasks[1])["kl"], base)


def test_initial_teacher_is_the_model_before_training():
    stream = blob_stream()
    model = tiny_model(stream)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    distill = Distill(DistillConfig(teacher="initial"))
    run(model, stream, distill, TrainConfig(batch_size=4, epochs=1))
    teacher = distill.teacher.state_dict()
    assert all(torch.equal(teacher[k], start[k]) for k in start)
    assert not torch.equal(model.state_dict()["0.weight"], start["0.weight"])


def test_teacher_from_a_file(tmp_path):
    stream = blob_stream()
    source = tiny_model(stream, seed=7)
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    distill = Distill(DistillConfig(teacher=str(path)))
    distill.before_run(tiny_model(stream), stream, 0)
    assert torch.equal(distill.teacher[0].weight, source[0].weight)


def test_a_missing_teacher_file_is_named():
    with pytest.raises(UsageError, match="nowhere.pt"):
        parse_config(DistillConfig, {"teacher": "nowhere.pt"}, owner="strategy 'distill'")


def test_buffer_targets_need_replay_storing_logits_before_it():
    with pytest.raises(ValueError, match="store_logits"):
        Chain(Replay(ReplayConfig(capacity=10)), Distill(DistillConfig(targets="buffer")))
    with pytest.raises(ValueError, match="store_logits"):
        Chain(Distill(DistillConfig(targets="buffer")),
              Replay(ReplayConfig(capacity=10, store_logits=True)))


def test_buffer_targets_distil_replayed_rows_toward_stored_logits():
    stream = blob_stream(num_tasks=2)
    probe = Probe(Distill(DistillConfig(targets="buffer", alpha=0.5)))
    chain = Chain(Replay(ReplayConfig(capacity=8, store_logits=True)), probe)
    # Chain checks composition by name and config; the probe stands where distill would.
    probe.name, probe.config = "distill", probe.inner.config
    run(tiny_model(stream), stream, chain, TrainConfig(batch_size=4, epochs=2))
    values = [terms["kl"] for _, terms in probe.terms if terms]
    assert len(values) >= len(probe.terms) - 1  # every step once the buffer holds rows
    assert all(v >= 0 for v in values) and max(values) > 0


NOT_SAVED_BY_TORCH = "is not a state dict saved by torch.save or safetensors"


@pytest.mark.parametrize("write, message", [
    (lambda path: torch.save(torch.zeros(3), path), "holds Tensor, not a state dict"),
    (lambda path: torch.save([torch.zeros(3)], path), "holds list, not a state dict"),
    (lambda path: torch.save({"0.weight": "text"}, path), "holds a dict of other values"),
    (lambda path: path.write_bytes(b"not a torch file"), NOT_SAVED_BY_TORCH),
    # A whole pickled model: torch names the class its weights-only loader refuses.
    (lambda path: torch.save(torch.nn.Linear(2, 2), path),
     f"{NOT_SAVED_BY_TORCH} \\(Unsupported global: GLOBAL torch.nn.modules.linear.Linear "
     "was not an allowed global by default\\)$"),
])
def test_a_teacher_file_that_is_not_a_state_dict_is_one_line(tmp_path, write, message):
    stream = blob_stream()
    path = tmp_path / "teacher.pt"
    write(path)
    distill = Distill(DistillConfig(teacher=str(path)))
    with pytest.raises(UsageError, match=message) as raised:
        distill.check(tiny_model(stream), stream, False)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_a_corrupt_safetensors_teacher_is_one_line(tmp_path):
    stream = blob_stream()
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_model(stream).state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:40])  # truncated
    with pytest.raises(UsageError, match=f"teacher file {path} {NOT_SAVED_BY_TORCH} "
                                         r"\(Error while deserializing header"):
        Distill(DistillConfig(teacher=str(path))).check(tiny_model(stream), stream, False)


def test_a_json_teacher_is_one_line_without_torchs_paragraph(tmp_path):
    # torch's own error is a paragraph on its weights-only default, with advice to load
    # untrusted pickles; the line keeps what it says about the file.
    stream = blob_stream()
    path = tmp_path / "teacher.json"
    path.write_text('{"a": 1}')
    with pytest.raises(UsageError) as raised:
        Distill(DistillConfig(teacher=str(path))).check(tiny_model(stream), stream, False)
    assert str(raised.value) == (f"teacher file {path} {NOT_SAVED_BY_TORCH} (Unsupported "
                                 "operand 123)")


def counting_reads(monkeypatch) -> list[str]:
    """The paths the distill module loads weights from, in order (the real loader runs)."""
    import strategies.distill

    reads = []
    real = strategies.distill.load_weights

    def load_weights(path):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(strategies.distill, "load_weights", load_weights)
    return reads


DIGITS = {"tasks": "split-digits", "num_tasks": 2, "epochs": 1, "hidden": [8],
          "train_per_task": 20, "test_per_task": 10}


def test_a_teacher_file_is_read_once_per_run(tmp_path, monkeypatch):
    from cl.experiment import build, execute, make_config

    path = tmp_path / "teacher.pt"
    torch.save(build(make_config(DIGITS)).model.state_dict(), path)
    reads = counting_reads(monkeypatch)
    config = make_config({**DIGITS, "strategy": [f"distill:teacher={path}"]})
    execute(config, tmp_path / "run", checkpoint=False)  # build's check, run's check, before_run
    assert reads == [str(path)]


def test_a_teacher_file_changed_after_build_is_read_again(tmp_path, monkeypatch):
    from cl.experiment import build, make_config

    path = tmp_path / "teacher.pt"
    first = build(make_config(DIGITS)).model.state_dict()
    torch.save(first, path)
    reads = counting_reads(monkeypatch)
    built = build(make_config({**DIGITS, "strategy": [f"distill:teacher={path}"]}))
    assert len(reads) == 1
    second = {key: value + 1 for key, value in first.items()}
    torch.save(second, path)
    stat = path.stat()  # a rewrite within the clock's tick may keep the time: move it on
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    [distill] = built.strategy.strategies
    run(built.model, built.stream, built.strategy, built.train)
    assert len(reads) == 2
    assert all(torch.equal(distill.teacher.state_dict()[key], second[key]) for key in second)


def test_a_teacher_of_another_architecture_names_what_differs(tmp_path):
    stream = blob_stream()
    model = tiny_model(stream)  # 0.weight (16, 6), 0.bias, 2.weight (4, 16), 2.bias
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    cases = [
        ({**state, "3.weight": torch.zeros(2)}, "unexpected 3.weight"),
        ({k: v for k, v in state.items() if k != "2.bias"}, "missing 2.bias"),
        ({**state, "0.weight": torch.zeros(16, 7)},
         "0.weight has shape (16, 7) in the file but (16, 6) in the model"),
    ]
    for index, (weights, message) in enumerate(cases):
        path = tmp_path / f"teacher{index}.safetensors"
        save_file(weights, str(path))
        with pytest.raises(UsageError, match=r"does not fit the model Sequential: ") as raised:
            Distill(DistillConfig(teacher=str(path))).check(model, stream, False)
        assert message in str(raised.value)


def test_feature_distillation_must_come_after_lora():
    from strategies import LoRA, LoRAConfig

    with pytest.raises(ValueError, match="distill must come after lora"):
        Chain(Distill(DistillConfig(on="features")), LoRA(LoRAConfig()))
    Chain(LoRA(LoRAConfig()), Distill(DistillConfig(on="features")))
    Chain(Distill(DistillConfig()), LoRA(LoRAConfig()))  # logits: no hook to miss


def test_a_joint_run_has_no_previous_task_to_distil_from():
    stream = blob_stream()
    with pytest.raises(UsageError, match="no previous task in a --joint run"):
        Distill(DistillConfig()).check(tiny_model(stream), stream, True)
    Distill(DistillConfig(teacher="initial")).check(tiny_model(stream), stream, True)


# ---- DER's targets: every stored logit, and the squared error ------------------------------

@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 6), classes=st.integers(2, 7), seed=st.integers(0, 2**16),
       alpha=st.floats(0.0, 3.0))
def test_logit_mse_is_the_mean_squared_error_over_the_marked_classes(rows, classes, seed,
                                                                     alpha):
    from strategies.distill import logit_mse

    generator = torch.Generator().manual_seed(seed)
    stored = torch.randn(rows, classes, generator=generator)
    student = torch.randn(rows, classes, generator=generator)
    everything = torch.ones(1, classes, dtype=torch.bool)
    expected = alpha * torch.nn.functional.mse_loss(student, stored)
    assert torch.allclose(logit_mse(stored, student, everything, alpha), expected, atol=1e-6)
    mask = torch.rand(rows, classes, generator=generator) < 0.5
    mask[:, 0] = True
    by_hand = sum(float(student[i, j] - stored[i, j]) ** 2 for i in range(rows)
                  for j in range(classes) if mask[i, j]) / int(mask.sum())
    assert abs(float(logit_mse(stored, student, mask, alpha)) - alpha * by_hand) < 1e-4
    assert float(logit_mse(stored, stored, mask, alpha)) == 0.0


def buffer_terms(stored_classes: str, loss: str, unseen_value: float) -> Tensor:
    """The distillation term of one batch whose replayed row, from task 0 (classes 0 and 1 of
    a 4-class class-IL stream), stored `unseen_value` as its logits for classes 2 and 3."""
    stream = blob_stream(num_tasks=2)
    distill = Distill(DistillConfig(targets="buffer", loss=loss, stored_classes=stored_classes))
    model = tiny_model(stream)
    distill.before_run(model, stream, 0)
    stored = torch.tensor([[2.0, -1.0, unseen_value, unseen_value]])
    logits = torch.tensor([[1.0, 0.5, 3.0, 2.0]])
    batch = Batch(torch.zeros(1, *stream.input_shape), torch.tensor([0]), torch.tensor([0]),
                  torch.tensor([True]), stored)
    return distill.loss_terms(model, batch, logits, stream.tasks[1])[loss]


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_stored_targets_match_all_logits_by_default_or_only_the_seen_classes(loss):
    """DER matches every stored logit: what a row stored for classes not yet seen (near zero)
    is what keeps new classes from taking it over. `stored_classes=seen` ignores them."""
    assert buffer_terms("all", loss, 0.0) != buffer_terms("all", loss, -5.0)
    assert buffer_terms("seen", loss, 0.0) == buffer_terms("seen", loss, -5.0)
    assert DistillConfig().loss == "kl" and DistillConfig().stored_classes == "all"


@pytest.mark.parametrize("settings, message", [
    ({"loss": "l1"}, "loss must be kl or mse"),
    ({"stored_classes": "some"}, "stored_classes must be all or seen"),
    ({"stored_classes": "seen"}, "stored_classes applies to targets=buffer only"),
    ({"loss": "mse", "on": "features"}, "loss applies to on=logits"),
])
def test_bad_distillation_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        DistillConfig(**settings)
