"""Replay: buffer policies (sizes, CBRS balance, reservoir uniformity), sampling, the strategy's
hooks, checkpoints and an end-to-end run."""

from __future__ import annotations

import io
import json

import pytest
import torch
from helpers import blob_stream, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest, chisquare

from cl.errors import ClError, UsageError
from cl.spec import parse_config
from cl.types import Batch
from strategies.replay import DRAW_BOUND, Buffer, Replay, ReplayConfig

POLICIES = ["reservoir", "class_balanced"]


def id_batch(start: int, count: int, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose single feature is a unique id, labelled id % classes."""
    ids = torch.arange(start, start + count)
    return ids.float().unsqueeze(1), ids % classes


def stored_ids(buffer: Buffer) -> list[int]:
    return buffer.x[:len(buffer), 0].long().tolist() if len(buffer) else []


def make_buffer(capacity: int, policy: str, seed: int = 0) -> Buffer:
    return Buffer(capacity, policy, torch.Generator().manual_seed(seed))


def insert_labels(buffer: Buffer, labels: list[int], sizes: list[int]) -> None:
    """Insert `labels` (ids = positions) in consecutive batches of `sizes` (cycled)."""
    start, turn = 0, 0
    while start < len(labels):
        count = max(1, sizes[turn % len(sizes)])
        chunk = torch.tensor(labels[start:start + count], dtype=torch.int64)
        ids = torch.arange(start, start + len(chunk))
        buffer.insert(ids.float().unsqueeze(1), chunk, 0)
        start, turn = start + len(chunk), turn + 1


# -- buffer sizes and contents ------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 30), sizes=st.lists(st.integers(0, 40), min_size=1, max_size=12),
       policy=st.sampled_from(POLICIES), seed=st.integers(0, 2**31))
def test_size_is_min_of_seen_and_capacity(capacity, sizes, policy, seed):
    buffer = make_buffer(capacity, policy, seed)
    seen = 0
    for size in sizes:
        buffer.insert(*id_batch(seen, size), task=1)
        seen += size
        assert buffer.seen == seen
        assert len(buffer) == min(seen, capacity)
        ids = stored_ids(buffer)
        assert len(set(ids)) == len(ids), "a row is stored twice"
        assert set(ids) <= set(range(seen))
        labels = buffer.y[:len(buffer)].tolist() if len(buffer) else []
        assert labels == [i % 3 for i in ids], "row parts got mixed up"
        assert sum(buffer.class_counts().values()) == len(buffer)


def reference_reservoir(capacity: int, sizes: list[int], seed: int) -> list[int | None]:
    """Algorithm R one row at a time, drawing the same numbers as Buffer (one call per batch)."""
    generator = torch.Generator().manual_seed(seed)
    slots: list[int | None] = [None] * capacity
    seen = 0
    for size in sizes:
        position = seen + torch.arange(size)
        full = position >= capacity
        draws = iter((torch.randint(0, DRAW_BOUND, (int(full.sum()),), generator=generator)
                      % (position[full] + 1)).tolist())
        for n in position.tolist():
            slot = n if n < capacity else next(draws)
            if slot < capacity:
                slots[slot] = n
        seen += size
    return slots


@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 8), sizes=st.lists(st.integers(1, 60), min_size=1, max_size=6),
       seed=st.integers(0, 2**31))
def test_reservoir_collisions_in_a_batch_resolve_as_one_at_a_time(capacity, sizes, seed):
    # Small capacities and large batches make several rows of a batch pick the same slot.
    buffer = make_buffer(capacity, "reservoir", seed)
    seen = 0
    for size in sizes:
        buffer.insert(*id_batch(seen, size), task=0)
        seen += size
    assert stored_ids(buffer) == reference_reservoir(capacity, sizes, seed)[:len(buffer)]


# -- class balance ------------------------------------------------------------------------------

def assert_balanced(buffer: Buffer, seen_per_class: dict[int, int]) -> None:
    counts = buffer.class_counts()
    assert sum(counts.values()) == len(buffer)
    lossy = [counts.get(c, 0) for c, seen in seen_per_class.items() if counts.get(c, 0) < seen]
    intact = [c for c, seen in seen_per_class.items() if counts.get(c, 0) == seen]
    assert all(counts.get(c, 0) <= seen for c, seen in seen_per_class.items())
    if lossy:
        assert max(lossy) - min(lossy) <= 1, counts
        # A class only loses rows while it is a largest one, so losers stay near the top.
        assert min(lossy) >= max(counts.values()) - 1, counts
    assert all(counts[c] <= max(counts.values()) for c in intact)
    # The bookkeeping that makes each step O(1) agrees with the stored labels.
    for label, slots in buffer._class_slots.items():
        assert buffer.y[slots].eq(label).all()
        assert len(slots) == counts[label]


@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 25),
       labels=st.lists(st.integers(0, 5), min_size=1, max_size=120),
       late=st.lists(st.integers(6, 8), max_size=30),
       sizes=st.lists(st.integers(1, 17), min_size=1, max_size=5), seed=st.integers(0, 2**31))
def test_class_balanced_keeps_classes_balanced(capacity, labels, late, sizes, seed):
    # `late` classes arrive only after everything else, usually once the buffer is full.
    buffer = make_buffer(capacity, "class_balanced", seed)
    sequence = labels + late
    insert_labels(buffer, sequence, sizes)
    seen_per_class = {c: sequence.count(c) for c in set(sequence)}
    assert_balanced(buffer, seen_per_class)


def test_class_balanced_makes_room_for_new_classes():
    buffer = make_buffer(10, "class_balanced")
    insert_labels(buffer, [0] * 30, [7])
    assert buffer.class_counts() == {0: 10}
    insert_labels(buffer, [1] * 5, [2])
    assert buffer.class_counts() == {0: 5, 1: 5}
    insert_labels(buffer, [2] * 40, [9])
    counts = buffer.class_counts()
    assert sorted(counts) == [0, 1, 2] and sum(counts.values()) == 10
    assert max(counts.values()) - min(counts.values()) <= 1
    assert_balanced(buffer, {0: 30, 1: 5, 2: 40})


# -- uniformity ---------------------------------------------------------------------------------

def inclusion_counts(policy: str, seeds: int, ids: int, capacity: int,
                     newcomers: int) -> torch.Tensor:
    """How often each of `ids` rows of class 0 is in the buffer at the end, over `seeds` runs,
    when `newcomers` rows of class 1 follow them."""
    counts = torch.zeros(ids + newcomers, dtype=torch.int64)
    for seed in range(seeds):
        buffer = make_buffer(capacity, policy, seed)
        start = 0
        for size in (7, 13, 30, 50):  # straddles the moment the buffer fills up
            x = torch.arange(start, start + size).float().unsqueeze(1)
            buffer.insert(x, torch.zeros(size, dtype=torch.int64), 0)
            start += size
        if newcomers:
            x = torch.arange(ids, ids + newcomers).float().unsqueeze(1)
            buffer.insert(x, torch.ones(newcomers, dtype=torch.int64), 0)
        counts[torch.tensor(stored_ids(buffer))] += 1
    return counts[:ids]


# Class 0 alone: CBRS is reservoir within the class; then newcomers of class 1 must evict
# uniformly chosen rows of class 0.
@pytest.mark.parametrize(("policy", "newcomers"), [("reservoir", 0), ("class_balanced", 0),
                                                   ("class_balanced", 4)])
def test_every_row_is_kept_with_equal_probability(policy, newcomers):
    seeds, capacity, ids = 2000, 10, 100
    counts = inclusion_counts(policy, seeds, ids, capacity, newcomers)
    assert counts.sum() == seeds * (capacity - newcomers)
    assert chisquare(counts.numpy()).pvalue > 0.001
    # The same statistic would catch a biased buffer: one that keeps the first or last rows.
    first = torch.zeros(ids, dtype=torch.int64)
    first[:capacity] = seeds
    assert chisquare(first.numpy()).pvalue < 1e-12
    assert chisquare(first.flip(0).numpy()).pvalue < 1e-12


def test_class_balanced_evicts_from_every_largest_class_alike():
    lost = []
    for seed in range(400):
        buffer = make_buffer(10, "class_balanced", seed)
        insert_labels(buffer, [0, 1] * 5 + [2], [11])
        counts = buffer.class_counts()
        assert sorted(counts.values()) == [1, 4, 5]
        lost.append(counts[0] == 4)
    assert binomtest(sum(lost), len(lost)).pvalue > 0.001


def test_sample_draws_slots_uniformly():
    buffer = make_buffer(20, "reservoir", seed=3)
    buffer.insert(*id_batch(0, 20), task=0)
    counts = torch.zeros(20, dtype=torch.int64)
    for _ in range(2000):
        counts[buffer.sample_index(5)] += 1
    assert chisquare(counts.numpy()).pvalue > 0.001
    assert counts.sum() == 2000 * 5


# -- sampling and determinism -------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(capacity=st.integers(1, 30), inserted=st.integers(1, 60), count=st.integers(0, 40),
       policy=st.sampled_from(POLICIES), seed=st.integers(0, 2**31))
def test_sample_returns_distinct_rows_of_the_buffer(capacity, inserted, count, policy, seed):
    buffer = make_buffer(capacity, policy, seed)
    buffer.insert(*id_batch(0, inserted), task=torch.full((inserted,), 4))
    x, y, task, logits = buffer.sample(count)
    ids = x[:, 0].long().tolist()
    assert len(ids) == min(count, len(buffer)) == len(y) == len(task)
    assert len(set(ids)) == len(ids)
    assert set(ids) <= set(stored_ids(buffer))
    assert y.tolist() == [i % 3 for i in ids] and task.eq(4).all() and logits is None


def filled(policy: str, seed: int) -> tuple[Buffer, list[list[int]]]:
    buffer = make_buffer(20, policy, seed)
    for start in range(0, 1000, 50):
        buffer.insert(*id_batch(start, 50), task=0)
    return buffer, [buffer.sample_index(8).tolist() for _ in range(5)]


@pytest.mark.parametrize("policy", POLICIES)
def test_same_seed_same_buffer_and_samples_other_seed_differs(policy):
    first, first_samples = filled(policy, seed=11)
    again, again_samples = filled(policy, seed=11)
    other, other_samples = filled(policy, seed=12)
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert first_samples == again_samples
    assert not torch.equal(first.x, other.x)
    assert first_samples != other_samples


def test_empty_buffer_cannot_be_sampled_and_mismatched_rows_are_refused():
    buffer = make_buffer(5, "reservoir")
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1)
    buffer.insert(*id_batch(0, 3), task=0)
    with pytest.raises(ValueError, match="shape"):
        buffer.insert(torch.zeros(2, 4), torch.zeros(2, dtype=torch.int64), 0)
    with pytest.raises(ValueError, match="logits"):
        buffer.insert(*id_batch(3, 2), task=0, logits=torch.zeros(2, 3))


@pytest.mark.parametrize("policy", POLICIES)
def test_a_buffer_too_large_for_memory_is_one_line_naming_its_size(policy):
    # 10**13 rows of 64 floats: petabytes, which every allocator refuses at once.
    buffer = make_buffer(10**13, policy)
    with pytest.raises(ClError) as raised:
        buffer.insert(torch.zeros(4, 64), torch.zeros(4, dtype=torch.int64), 0)
    per_row = 64 * 4 + 8 + 8 + (8 if policy == "reservoir" else 0)  # x, y, task, scratch
    assert str(raised.value) == (f"replay buffer of {10**13} rows does not fit in memory "
                                 f"({10**13 * per_row / 1e9:,.1f} GB asked for)")
    assert buffer.y is None and buffer.x is None  # nothing half-allocated is kept


def test_a_buffer_too_large_for_memory_stops_a_run_with_one_line():
    from cl.runner import TrainConfig, run

    stream = blob_stream()
    strategy = Replay(ReplayConfig(capacity=10**13))
    with pytest.raises(ClError, match=r"^replay buffer of 10000000000000 rows does not fit in "
                                      r"memory \([\d,.]+ GB asked for\)$"):
        run(tiny_model(stream), stream, strategy, TrainConfig(batch_size=4))


def test_dict_inputs_are_stored_and_sampled():
    buffer = make_buffer(6, "class_balanced", seed=5)
    for start in range(0, 40, 8):
        ids = torch.arange(start, start + 8)
        x = {"input_ids": ids.unsqueeze(1) * 10 + torch.arange(5),
             "attention_mask": (torch.arange(5) < 3).long().expand(8, 5).clone()}
        buffer.insert(x, ids % 2, 0, logits=ids.float().unsqueeze(1).expand(8, 2).clone())
    assert len(buffer) == 6 and set(buffer.x) == {"input_ids", "attention_mask"}
    x, y, _, logits = buffer.sample(4)
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (4, 5)
    ids = x["input_ids"][:, 0] // 10
    assert torch.equal(x["input_ids"], ids.unsqueeze(1) * 10 + torch.arange(5))
    assert torch.equal(y, ids % 2) and torch.equal(logits[:, 0], ids.float())
    assert x["attention_mask"].tolist() == [[1, 1, 1, 0, 0]] * 4
    assert buffer.nbytes == 6 * (5 * 8 * 2 + 8 + 8 + 2 * 4)
    with pytest.raises(ValueError, match="keys"):
        buffer.insert({"input_ids": x["input_ids"]}, y, 0, logits=logits)


# -- the strategy -------------------------------------------------------------------------------

def started(config: ReplayConfig, seed: int = 0):
    stream = blob_stream(num_tasks=2)
    model = tiny_model(stream)
    strategy = Replay(config)
    strategy.before_run(model, stream, seed)
    return strategy, model, stream


def id_rows(start: int, count: int, task: int = 0) -> Batch:
    x, y = id_batch(start, count)
    return Batch(x, y, torch.full((count,), task))


def id_logits(batch: Batch) -> torch.Tensor:
    """Distinctive per-row 'logits' (id, -id, 2 id) to recognise rows by."""
    ids = batch.x[:, 0]
    return torch.stack([ids, -ids, 2 * ids], dim=1)


def test_transform_batch_appends_marked_replay_rows():
    strategy, model, stream = started(ReplayConfig(capacity=10, batch_size=3))
    task = stream.tasks[0]
    batch = id_rows(0, 4)
    assert strategy.transform_batch(batch, task) is batch  # nothing to replay yet
    strategy.after_step(model, batch, id_logits(batch), task)
    out = strategy.transform_batch(id_rows(100, 5), task)
    assert len(out) == 8 and out.replayed.tolist() == [False] * 5 + [True] * 3
    assert out.x[:5, 0].tolist() == list(range(100, 105))
    assert set(out.x[5:, 0].long().tolist()) <= {0, 1, 2, 3}
    assert out.stored_logits is None
    # Without batch_size, as many replayed rows as fresh ones (when the buffer has them).
    default, model, _ = started(ReplayConfig(capacity=10))
    default.after_step(model, id_rows(0, 8), torch.zeros(8, 3), task)
    assert default.transform_batch(id_rows(100, 5), task).replayed.sum() == 5


def test_after_step_inserts_only_fresh_rows():
    strategy, model, stream = started(ReplayConfig(capacity=100))
    task = stream.tasks[0]
    first = id_rows(0, 6)
    strategy.after_step(model, first, id_logits(first), task)
    mixed = strategy.transform_batch(id_rows(50, 6, task=1), task)
    assert mixed.replayed.sum() == 6
    strategy.after_step(model, mixed, id_logits(mixed), task)
    buffer = strategy.buffer
    assert buffer.seen == 12 and len(buffer) == 12
    assert sorted(stored_ids(buffer)) == list(range(6)) + list(range(50, 56))
    assert buffer.task[:12].tolist() == [0] * 6 + [1] * 6


def test_stored_logits_come_back_on_replayed_rows():
    strategy, model, stream = started(ReplayConfig(capacity=50, store_logits=True, batch_size=4))
    task = stream.tasks[0]
    for start in (0, 10):
        batch = strategy.transform_batch(id_rows(start, 5), task)
        logits = id_logits(batch)
        logits[batch.replayed if batch.replayed is not None else []] = 99.0  # must not be kept
        strategy.after_step(model, batch, logits, task)
    out = strategy.transform_batch(id_rows(20, 3), task)
    assert out.replayed.tolist() == [False] * 3 + [True] * 4
    assert out.stored_logits.shape == (7, 3)
    assert out.stored_logits[:3].isnan().all()
    assert torch.equal(out.stored_logits[3:], id_logits(out)[3:])


@pytest.mark.parametrize("training", [True, False])
def test_task_end_fills_the_buffer_after_the_task_only(training):
    strategy, model, stream = started(ReplayConfig(capacity=40, insert="task_end",
                                                   store_logits=True))
    task = stream.tasks[0]
    model.train(training)
    batch = Batch(task.train.x[:4], task.train.y[:4], torch.zeros(4, dtype=torch.int64))
    strategy.after_step(model, batch, torch.zeros(4, 4), task)
    assert len(strategy.buffer) == 0 and strategy.transform_batch(batch, task) is batch
    strategy.after_task(model, task)
    assert model.training == training
    buffer = strategy.buffer
    assert len(buffer) == buffer.seen == len(task.train) == 16
    # A shuffled order of the task's rows, with the model's eval-mode logits for each.
    rows = buffer.x[:16]
    assert not torch.equal(rows, task.train.x)
    assert sorted(rows.sum(1).tolist()) == sorted(task.train.x.sum(1).tolist())
    with torch.no_grad():
        assert torch.allclose(buffer.logits[:16], model.eval()(rows))
    assert buffer.task[:16].eq(0).all()


def test_report_is_json_ready():
    strategy, model, stream = started(ReplayConfig(capacity=10))
    task = stream.tasks[0]
    strategy.after_step(model, id_rows(0, 14), torch.zeros(14, 3), task)
    report = strategy.report()
    json.dumps(report)  # raises on tensors or numpy numbers
    assert report["buffer_rows"] == 10 and report["seen"] == 14
    assert report["buffer_bytes"] == 10 * (4 + 8 + 8)
    assert sum(report["class_counts"].values()) == 10
    assert all(type(v) is int for v in report["class_counts"].values())
    assert all(type(report[k]) is int for k in ("buffer_rows", "seen", "buffer_bytes"))
    assert "capacity=10" in repr(strategy) and "policy='reservoir'" in repr(strategy)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("store_logits", [False, True])
def test_state_dict_round_trip_continues_bitwise(policy, store_logits):
    config = ReplayConfig(capacity=12, policy=policy, store_logits=store_logits, batch_size=5)

    def steps(strategy, model, task, start, count):
        samples = []
        for offset in range(start, start + count * 7, 7):
            batch = strategy.transform_batch(id_rows(offset, 7, task=offset % 3), task)
            samples.append((batch.x.clone(), batch.y.clone(), batch.task.clone()))
            strategy.after_step(model, batch, id_logits(batch), task)
        return samples

    original, model, stream = started(config, seed=1)
    task = stream.tasks[0]
    steps(original, model, task, 0, 6)
    saved = io.BytesIO()
    torch.save(original.state_dict(), saved)
    saved.seek(0)
    restored, _, _ = started(config, seed=999)  # its own seed must not matter after loading
    restored.load_state_dict(torch.load(saved, weights_only=True))

    later_original = steps(original, model, task, 1000, 8)
    later_restored = steps(restored, model, task, 1000, 8)
    for (xa, ya, ta), (xb, yb, tb) in zip(later_original, later_restored, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(ta, tb)
    a, b = original.buffer, restored.buffer
    assert a.seen == b.seen and len(a) == len(b)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.task, b.task)
    assert (a.logits is None) == (not store_logits)
    if store_logits:
        assert torch.equal(a.logits, b.logits)
    assert original.report() == restored.report()


def test_empty_state_round_trips():
    strategy, _, _ = started(ReplayConfig(capacity=3))
    state = strategy.state_dict()
    fresh, _, _ = started(ReplayConfig(capacity=3), seed=5)
    fresh.load_state_dict(state)
    assert len(fresh.buffer) == 0
    assert torch.equal(fresh.generator.get_state(), strategy.generator.get_state())
    other, _, _ = started(ReplayConfig(capacity=4))
    with pytest.raises(ValueError, match="capacity"):
        other.load_state_dict(state)


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value"), [("capacity", 0), ("capacity", -3), ("capacity", 2.5),
                                            ("batch_size", 0), ("policy", "fifo"),
                                            ("insert", "later"), ("store_logits", "yes")])
def test_bad_config_values_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        ReplayConfig(**{key: value})


def test_config_parses_from_cli_strings():
    config = parse_config(ReplayConfig, {"capacity": "50", "policy": "class_balanced",
                                         "batch_size": "none", "store_logits": "yes"}, "replay")
    assert config == ReplayConfig(capacity=50, policy="class_balanced", store_logits=True)
    with pytest.raises(UsageError, match="policy"):
        parse_config(ReplayConfig, {"policy": "fifo"}, "replay")
    with pytest.raises(UsageError, match="capacity"):
        parse_config(ReplayConfig, {"capacity": "0"}, "replay")


# -- end to end ---------------------------------------------------------------------------------

@pytest.mark.parametrize("policy", POLICIES)
def test_run_with_replay_keeps_rows_of_several_tasks(policy):
    from cl.runner import TrainConfig, run

    stream = blob_stream(num_tasks=3)
    strategy = Replay(ReplayConfig(capacity=20, policy=policy))
    result = run(tiny_model(stream), stream, strategy, TrainConfig(batch_size=4, lr=0.1))
    assert result.accuracy.shape == (3, 3)
    buffer = strategy.buffer
    assert len(buffer) == 20 and buffer.seen == sum(len(t.train) for t in stream.tasks)
    assert len(set(buffer.task[:20].tolist())) >= 2
    assert strategy.report()["buffer_rows"] == 20
