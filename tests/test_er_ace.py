"""ER-ACE: the asymmetric mask against a hand-written one, the losses against the reference's
(masked incoming cross-entropy plus a separate buffer draw's), replayed rows left unmasked,
and the CLI form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import blob_stream, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import FAST, cl

from cl.runner import TrainConfig, mask_logits, run
from cl.strategy import Chain
from cl.types import Batch
from strategies import ERACE, ERACEConfig, Replay, ReplayConfig
from strategies.er_ace import asymmetric_mask, present_classes


@settings(max_examples=60, deadline=None)
@given(classes=st.integers(2, 12), data=st.data())
def test_the_mask_is_the_present_classes_and_every_class_not_seen_yet(classes, data):
    labels = data.draw(st.lists(st.integers(0, classes - 1), min_size=1, max_size=8))
    fresh = data.draw(st.lists(st.booleans(), min_size=len(labels), max_size=len(labels)))
    earlier = data.draw(st.lists(st.integers(0, classes - 1), max_size=8))
    present = present_classes(torch.tensor(labels), torch.tensor(fresh), classes)
    incoming = {label for label, new in zip(labels, fresh, strict=True) if new}
    assert present.tolist() == [c in incoming for c in range(classes)]
    seen = torch.zeros(classes, dtype=torch.bool)
    seen[earlier] = True
    seen |= present
    mask = asymmetric_mask(present, seen)
    assert mask.tolist() == [c in incoming or c not in incoming | set(earlier)
                             for c in range(classes)]


def test_a_shuffled_class_order_keeps_old_classes_masked():
    """Task 0 had classes 9 and 3; a batch of 0 and 1 is scored over 0, 1 and the classes not
    seen yet, never over 9 or 3 (the reference's highest-id rule would allow 9)."""
    seen = torch.zeros(10, dtype=torch.bool)
    seen[[9, 3]] = True
    present = present_classes(torch.tensor([0, 1, 1]), None, 10)
    seen |= present
    assert asymmetric_mask(present, seen).nonzero().flatten().tolist() == [0, 1, 2, 4, 5, 6, 7, 8]


def started(config=None, scenario="class"):
    stream = blob_stream(num_tasks=3, scenario=scenario)
    model = tiny_model(stream)
    strategy = ERACE(config or ERACEConfig(capacity=6))
    strategy.before_run(model, stream, 0)
    return stream, model, strategy


def test_nothing_changes_on_the_first_task():
    stream, model, strategy = started()
    task = stream.tasks[0]
    batch = Batch.of(task.train.x[:4], task.train.y[:4], task)
    assert strategy.cross_entropy_mask(batch, task) is None
    strategy.after_step(model, batch, model(batch.x).detach(), task)
    assert len(strategy.buffer) == 4
    assert strategy.loss_terms(model, batch, model(batch.x), task) == {}


def test_the_loss_is_the_masked_incoming_cross_entropy_plus_the_buffers_own():
    """The reference's loss on task 1: incoming rows over task 1's (present) classes and the
    unseen ones, plus the buffer draw's cross-entropy over every class."""
    stream, model, strategy = started()
    first, second = stream.tasks[0], stream.tasks[1]
    old = Batch.of(first.train.x[:6], first.train.y[:6], first)
    assert strategy.cross_entropy_mask(old, first) is None  # as the runner calls it: seen
    strategy.after_step(model, old, model(old.x).detach(), first)  # the buffer: these 6 rows
    new = Batch.of(second.train.x[:4], second.train.y[:4], second)
    mask = strategy.cross_entropy_mask(new, second)
    logits = model(new.x)
    incoming = F.cross_entropy(mask_logits(logits, mask), new.y)
    terms = strategy.loss_terms(model, new, logits, second)
    assert sorted(terms) == ["ce"]
    present = set(new.y.tolist())
    seen = set(first.train.y[:6].tolist()) | present
    allowed = [c in present or c not in seen for c in range(stream.num_classes)]
    assert all(row == allowed for row in mask.tolist())
    by_hand = logits.masked_fill(~torch.tensor(allowed), torch.finfo(logits.dtype).min)
    assert torch.allclose(incoming, F.cross_entropy(by_hand, new.y))
    # The draw is the whole buffer (6 rows asked for of 6): its mean does not depend on order.
    strategy.config = ERACEConfig(capacity=6, batch_size=6)
    terms = strategy.loss_terms(model, new, logits, second)
    assert torch.allclose(terms["ce"], F.cross_entropy(model(old.x), old.y))


def test_rows_replayed_by_another_strategy_keep_every_class():
    stream, model, strategy = started()
    first, second = stream.tasks[0], stream.tasks[1]
    strategy.cross_entropy_mask(Batch.of(first.train.x, first.train.y, first), first)
    fresh = Batch.of(second.train.x[:3], second.train.y[:3], second)
    old = first.train
    batch = Batch(torch.cat([fresh.x, old.x[:2]]), torch.cat([fresh.y, old.y[:2]]),
                  torch.tensor([1, 1, 1, 0, 0]),
                  replayed=torch.tensor([False, False, False, True, True]))
    mask = strategy.cross_entropy_mask(batch, second)
    assert mask[3:].all()
    # The replayed rows' labels (task 0's) do not count as present for the fresh rows.
    assert not mask[:3, list(first.classes)].any()


def test_alpha_adds_the_squared_error_toward_the_stored_logits_of_the_same_draw():
    stream, model, strategy = started(ERACEConfig(capacity=6, batch_size=6, alpha=0.5))
    first, second = stream.tasks[0], stream.tasks[1]
    old = Batch.of(first.train.x[:6], first.train.y[:6], first)
    stored = model(old.x).detach()
    strategy.after_step(model, old, stored, first)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.9)
    new = Batch.of(second.train.x[:2], second.train.y[:2], second)
    terms = strategy.loss_terms(model, new, model(new.x), second)
    assert torch.allclose(terms["mse"], 0.5 * F.mse_loss(model(old.x), stored))


@pytest.mark.parametrize("settings, message", [
    ({"capacity": 0}, "capacity must be a positive integer"),
    ({"alpha": -1.0}, "alpha must be a non-negative number"),
    ({"policy": "fifo"}, "policy must be one of"),
])
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        ERACEConfig(**settings)


def test_same_seed_same_matrix_composes_with_replay_and_the_cli_form(tmp_path, capsys):
    stream = blob_stream(num_tasks=3)
    config = TrainConfig(batch_size=4, epochs=1, lr=0.1)
    results = [run(tiny_model(stream), stream, ERACE(ERACEConfig(capacity=10)), config).accuracy
               for _ in range(2)]
    assert np.array_equal(results[0], results[1])
    chained = run(tiny_model(stream), stream, Chain(Replay(ReplayConfig(capacity=10)),
                                                    ERACE(ERACEConfig(capacity=10))), config)
    assert np.isfinite(chained.accuracy).all()
    assert cl("run", "--out", tmp_path / "ace", "--strategy", "er_ace:capacity=50,alpha=0.3",
              *FAST) == 0
    assert cl("run", "--out", tmp_path / "bad", "--strategy", "er_ace:capacity=-5", *FAST) == 2
    assert "capacity must be a positive integer" in capsys.readouterr().err
