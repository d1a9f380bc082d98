"""Tests of the task streams: class splits, permutations, rotations, loaders and builders."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cl.errors import DataError, UsageError
from cl.models import model_input
from cl.types import Split, Stream, StreamOptions, Task
from tasks import builtin, load_image_classification, load_mnist, load_npz
from tasks.split import permuted_stream, rotate, rotated_stream, split_stream


def fake_mnist(n_train: int = 50, n_test: int = 20, seed: int = 0) -> dict[str, np.ndarray]:
    """Random uint8 28x28 images with every digit present in both splits."""
    rng = np.random.default_rng(seed)
    return {"x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
            "y_train": np.arange(n_train) % 10,
            "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
            "y_test": np.arange(n_test) % 10}


def small_arrays(num_classes: int = 6, per_class: int = 4, seed: int = 0):
    """Float images (N, 1, 4, 5) whose labels are the given classes, train and test."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(num_classes), per_class)
    return (rng.random((len(y), 1, 4, 5), dtype=np.float32), y,
            rng.random((len(y), 1, 4, 5), dtype=np.float32), y.copy())


@pytest.fixture(scope="module")
def split_digits_stream():
    return builtin.split_digits(StreamOptions())


# ---- split streams -------------------------------------------------------------------------

def test_split_digits_has_five_disjoint_two_class_tasks(split_digits_stream):
    stream = split_digits_stream
    assert len(stream) == 5 and stream.scenario == "class" and stream.num_classes == 10
    assert stream.input_shape == (1, 8, 8)
    seen: set[int] = set()
    for task in stream.tasks:
        assert len(task.classes) == 2 and not seen & set(task.classes)
        seen |= set(task.classes)
        for split in (task.train, task.test):
            assert set(split.y.unique().tolist()) == set(task.classes)
            assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
            assert 0 <= split.x.min() and split.x.max() <= 1
    assert seen == set(range(10))
    assert sum(len(task.train) for task in stream.tasks) == 1347
    assert sum(len(task.test) for task in stream.tasks) == 450


def test_digits_test_set_does_not_depend_on_seed(split_digits_stream):
    other = builtin.split_digits(StreamOptions(seed=7))
    for a, b in zip(split_digits_stream.tasks, other.tasks, strict=True):
        assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)


def test_class_order_natural_shuffle_and_explicit():
    arrays = small_arrays()
    natural = split_stream("s", *arrays)
    assert [task.classes for task in natural.tasks] == [(0, 1), (2, 3), (4, 5)]

    def order(**kwargs):
        stream = split_stream("s", *arrays, class_order="shuffle", **kwargs)
        return [task.name for task in stream.tasks]

    assert order(seed=1) == order(seed=1)
    assert len({tuple(order(seed=seed)) for seed in range(6)}) > 1
    explicit = split_stream("s", *arrays, class_order="5,0,3,1,2,4")
    assert [task.classes for task in explicit.tasks] == [(0, 5), (1, 3), (2, 4)]
    assert explicit.tasks[0].name == "classes 5,0"
    assert set(explicit.tasks[0].train.y.tolist()) == {0, 5}


@pytest.mark.parametrize("bad", ["0,1,2", "0,1,2,3,4,4", "a,b", "0,1,2,3,4,9"])
def test_explicit_class_order_must_permute_all_classes(bad):
    with pytest.raises(UsageError, match="class order"):
        split_stream("s", *small_arrays(), class_order=bad)


def test_labels_are_mapped_to_sorted_positions():
    x_train, y_train, x_test, y_test = small_arrays(num_classes=4)
    stream = split_stream("s", x_train, y_train * 10 + 3, x_test, y_test * 10 + 3)
    assert stream.num_classes == 4
    assert stream.tasks[1].train.y.unique().tolist() == [2, 3]


def test_task_sizes_options():
    arrays = small_arrays()
    assert len(split_stream("s", *arrays, classes_per_task=3)) == 2
    assert len(split_stream("s", *arrays, num_tasks=6)) == 6
    with pytest.raises(UsageError, match="classes per task 4 does not divide the 6 classes"):
        split_stream("s", *arrays, classes_per_task=4)
    with pytest.raises(UsageError, match="4 tasks"):
        split_stream("s", *arrays, num_tasks=4)
    with pytest.raises(UsageError, match="not both"):
        split_stream("s", *arrays, num_tasks=3, classes_per_task=2)
    for bad in (0, -2):
        with pytest.raises(UsageError, match=str(bad)):
            split_stream("s", *arrays, classes_per_task=bad)
        with pytest.raises(UsageError, match=str(bad)):
            split_stream("s", *arrays, num_tasks=bad)
    with pytest.raises(UsageError, match="scenario"):
        split_stream("s", *arrays, scenario="online")


def test_domain_scenario_remaps_labels_within_tasks():
    stream = split_stream("s", *small_arrays(), scenario="domain", class_order="5,0,3,1,2,4")
    assert stream.num_classes == 2
    first = stream.tasks[0]
    assert first.classes == (0, 1)
    # Class 5 comes first in its task, so it becomes 0 and class 0 becomes 1.
    original = torch.as_tensor(small_arrays()[1])
    rows = torch.isin(original, torch.tensor([0, 5]))
    expected = torch.where(original[rows] == 5, 0, 1)
    assert torch.equal(first.train.y, expected)


def test_task_scenario_keeps_global_ids_and_masks():
    stream = split_stream("s", *small_arrays(), scenario="task")
    mask = stream.class_mask()
    assert mask.shape == (3, 6) and mask.sum(1).tolist() == [2, 2, 2]


@pytest.mark.parametrize("change, message", [
    (lambda a: (a[0], a[1][:-1], a[2], a[3]), "rows"),
    (lambda a: (a[0], a[1].astype(np.float32), a[2], a[3]), "integer"),
    (lambda a: (a[0], a[1][:, None], a[2], a[3]), "1-D"),
    (lambda a: (a[0], a[1], a[2][:, :, :3], a[3]), "shape"),
    (lambda a: ((a[0] * 255).astype(np.uint8), a[1], a[2], a[3]), "float"),
    (lambda a: (a[0], a[1], a[2], a[3] + 100), "absent from y_train"),
])
def test_malformed_arrays_raise_data_error(change, message):
    with pytest.raises(DataError, match=message):
        split_stream("s", *change(small_arrays()))


# ---- permuted and rotated streams ----------------------------------------------------------

def test_permuted_stream():
    x_train, y_train, x_test, y_test = small_arrays()
    stream = permuted_stream("p", x_train, y_train, x_test, y_test, num_tasks=3, seed=4)
    assert stream.scenario == "domain" and stream.num_classes == 6 and len(stream) == 3
    first, second = stream.tasks[0], stream.tasks[1]
    assert torch.equal(first.train.x, torch.as_tensor(x_train))
    assert torch.equal(first.test.x, torch.as_tensor(x_test))
    # One permutation of the flattened features, the same for train and test.
    flat_train = torch.as_tensor(x_train).reshape(len(x_train), -1)
    flat_test = torch.as_tensor(x_test).reshape(len(x_test), -1)
    permuted = second.train.inputs().reshape(len(x_train), -1)
    permutation = [int((flat_train[0] == value).nonzero()[0]) for value in permuted[0]]
    assert sorted(permutation) == list(range(20)) and permutation != list(range(20))
    assert torch.equal(permuted, flat_train[:, permutation])
    assert torch.equal(second.test.inputs().reshape(len(x_test), -1), flat_test[:, permutation])
    assert torch.equal(second.train.y, first.train.y)
    again = permuted_stream("p", x_train, y_train, x_test, y_test, num_tasks=3, seed=4)
    assert all(torch.equal(a.train.inputs(), b.train.inputs())
               and torch.equal(a.test.inputs(), b.test.inputs())
               for a, b in zip(stream.tasks, again.tasks, strict=True))
    other = permuted_stream("p", x_train, y_train, x_test, y_test, num_tasks=3, seed=5)
    assert not torch.equal(other.tasks[1].train.inputs(), second.train.inputs())


def test_transform_first_permutes_and_rotates_task_0_too():
    x_train, y_train, x_test, y_test = small_arrays()
    usual = permuted_stream("p", x_train, y_train, x_test, y_test, num_tasks=3, seed=4)
    every = permuted_stream("p", x_train, y_train, x_test, y_test, num_tasks=3, seed=4,
                            transform_first=True)
    assert [t.name for t in every.tasks] == ["permutation 0", "permutation 1", "permutation 2"]
    # The seed's permutations, drawn in the same order: task t here is task t + 1 there.
    assert torch.equal(every.tasks[0].train.inputs(), usual.tasks[1].train.inputs())
    assert torch.equal(every.tasks[1].test.inputs(), usual.tasks[2].test.inputs())
    assert not torch.equal(every.tasks[0].train.inputs(), torch.as_tensor(x_train))
    square = np.random.default_rng(0).random((24, 1, 5, 5), dtype=np.float32)
    rotated = rotated_stream("r", square, y_train, square, y_test, num_tasks=3, seed=2,
                             transform_first=True)
    angles = [float(task.name.split()[1]) for task in rotated.tasks]
    assert all(0 < angle < 180 for angle in angles) and len(set(angles)) == 3
    upright = rotated_stream("r", square, y_train, square, y_test, num_tasks=4, seed=2)
    assert [task.name for task in upright.tasks[1:]] == [task.name for task in rotated.tasks]


def test_transform_first_is_a_stream_setting_checked_before_loading():
    from cl.types import StreamOptions
    from tasks.builtin import permuted_digits, rotated_digits

    stream = permuted_digits(StreamOptions(params=(("transform_first", "true"),), seed=1))
    assert stream.tasks[0].name == "permutation 0"
    with pytest.raises(UsageError, match="transform_first for stream 'rotated-digits' must be "
                                         "true or false, got 'yes'"):
        rotated_digits(StreamOptions(params=(("transform_first", "yes"),)))
    with pytest.raises(UsageError, match="angles and transform_first=true"):
        rotated_digits(StreamOptions(params=(("transform_first", "true"), ("angles", "0|90"))))


@pytest.mark.parametrize("scenario", ["class", "task"])
def test_permuted_class_and_task_scenarios_offset_labels(scenario):
    stream = permuted_stream("p", *small_arrays(), num_tasks=3, scenario=scenario)
    assert stream.num_classes == 18
    for task in stream.tasks:
        assert task.classes == tuple(range(6 * task.index, 6 * task.index + 6))
        assert task.train.y.min() == 6 * task.index and task.test.y.max() == 6 * task.index + 5
    assert stream.class_mask().sum(1).tolist() == [6, 6, 6]


def test_rotate_90_degrees_is_counterclockwise_rot90():
    image = torch.zeros(1, 1, 6, 6)
    image[0, 0, 0, 1:4] = 1.0  # an asymmetric "L" so every orientation differs
    image[0, 0, 1:5, 1] = 0.5
    rotated = rotate(image, 90)
    assert torch.allclose(rotated, torch.rot90(image, 1, dims=(-2, -1)), atol=1e-5)
    assert not torch.allclose(rotated, torch.rot90(image, -1, dims=(-2, -1)), atol=1e-2)
    assert torch.allclose(rotate(image, -90), torch.rot90(image, -1, dims=(-2, -1)), atol=1e-5)


def test_rotated_stream():
    x_train, y_train, x_test, y_test = small_arrays()
    stream = rotated_stream("r", x_train, y_train, x_test, y_test, num_tasks=4, seed=2)
    assert len(stream) == 4 and stream.scenario == "domain"
    assert torch.equal(stream.tasks[0].train.inputs(), torch.as_tensor(x_train))
    assert stream.tasks[0].name == "rotated 0.0 degrees"
    angles = [float(task.name.split()[1]) for task in stream.tasks[1:]]
    assert all(0 <= angle < 180 for angle in angles)
    again = rotated_stream("r", x_train, y_train, x_test, y_test, num_tasks=4, seed=2)
    assert [task.name for task in again.tasks] == [task.name for task in stream.tasks]
    square = np.random.default_rng(0).random((24, 1, 5, 5), dtype=np.float32)
    fixed = rotated_stream("r", square, y_train, square, y_test, angles=[0, 90])
    expected = torch.rot90(torch.as_tensor(square), 1, dims=(-2, -1))
    assert torch.allclose(fixed.tasks[1].train.inputs(), expected, atol=1e-5)
    assert torch.allclose(fixed.tasks[1].test.inputs(), expected, atol=1e-5)
    with pytest.raises(UsageError, match="2 rotation angles given for 3 tasks"):
        rotated_stream("r", square, y_train, square, y_test, angles=[0, 90], num_tasks=3)
    flat = (x_train.reshape(24, -1), y_train, x_test.reshape(24, -1), y_test)
    with pytest.raises(DataError, match="rotation needs images"):
        rotated_stream("r", *flat, num_tasks=2)


@pytest.mark.parametrize("make", [
    lambda arrays: permuted_stream("p", *arrays, num_tasks=20, seed=1),
    lambda arrays: rotated_stream("r", *arrays, num_tasks=20, seed=1),
])
def test_transformed_streams_store_the_data_once(make):
    """Twenty tasks hold one stored copy of the rows, not twenty (the memory of a long
    permuted or rotated stream does not grow with its tasks)."""
    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 256, (30, 1, 6, 6), dtype=np.uint8)
    labels = np.arange(30) % 3
    stream = make((pixels, labels, pixels[:12], labels[:12]))
    assert len({task.train.x.data_ptr() for task in stream.tasks}) == 1
    assert len({task.test.x.data_ptr() for task in stream.tasks}) == 1
    assert all(task.train.x.dtype == torch.uint8 for task in stream.tasks)
    assert len({tuple(task.train.inputs()[0].flatten().tolist()) for task in stream.tasks}) > 1
    # On a device the tasks share one copy too (meta: a device with no memory, for the test).
    from cl.runner import stream_to_device

    moved = stream_to_device(stream, torch.device("meta"))
    assert all(task.train.x is moved.tasks[0].train.x for task in moved.tasks)
    assert moved.tasks[0].train.x.device.type == "meta"
    # Each task's transform runs where its rows are (a rotation's grid is made there too).
    for task in moved.tasks:
        assert task.test.rows(torch.arange(3, device="meta")).device.type == "meta"


@settings(max_examples=25, deadline=None)
@given(rows=st.lists(st.integers(0, 29), min_size=1, max_size=40), kind=st.sampled_from(
    ["permuted", "rotated"]))
def test_a_batch_of_a_transformed_task_equals_the_rows_of_the_whole_task(rows, kind):
    """Transforming a batch gives bit for bit the rows of the task transformed at once, so a
    run's batches are what a stream of materialised copies would give."""
    pixels = np.random.default_rng(1).integers(0, 256, (30, 1, 7, 7), dtype=np.uint8)
    arrays = (pixels, np.arange(30) % 3, pixels[:9], np.arange(9) % 3)
    stream = (permuted_stream("p", *arrays, num_tasks=3, seed=2) if kind == "permuted"
              else rotated_stream("r", *arrays, angles=[0, 33.3, 121]))
    index = torch.tensor(rows)
    for task in stream.tasks:
        assert torch.equal(task.train.rows(index), task.train.inputs()[index])
        assert torch.equal(task.test.rows(slice(2, 7)), task.test.inputs()[2:7])


def test_a_transformed_stream_trains_as_its_materialised_copy():
    """The same R, bit for bit, from a permuted stream (one stored copy, permuted per batch)
    and from the same stream with every task's inputs made in full beforehand."""
    from cl.models import build_mlp
    from cl.runner import TrainConfig, run

    pixels = np.random.default_rng(3).integers(0, 256, (60, 1, 5, 5), dtype=np.uint8)
    arrays = (pixels, np.arange(60) % 3, pixels[:24], np.arange(24) % 3)
    stream = permuted_stream("p", *arrays, num_tasks=3, seed=4, scenario="class")
    copies = Stream(stream.name, tuple(
        Task(task.name, task.index, Split(task.train.inputs(), task.train.y),
             Split(task.test.inputs(), task.test.y), task.classes) for task in stream.tasks),
        stream.scenario, stream.num_classes, stream.input_shape)
    config = TrainConfig(batch_size=8, epochs=2, lr=0.1)
    results = []
    for each in (stream, copies):
        torch.manual_seed(0)
        model = build_mlp(each.input_shape, each.num_classes, (16,))
        results.append(run(model, each, config=config).accuracy)
    assert np.array_equal(results[0], results[1])
    assert not np.isnan(results[0]).any()


# ---- MNIST loading -------------------------------------------------------------------------

def test_load_mnist_from_npz(tmp_path):
    arrays = fake_mnist()
    np.savez(tmp_path / "mnist.npz", **arrays)
    x_train, y_train, x_test, y_test = load_mnist(str(tmp_path / "mnist.npz"))
    assert x_train.shape == (50, 1, 28, 28) and x_test.shape == (20, 1, 28, 28)
    # Pixels stay uint8 (a quarter of float32's memory) and are scaled as they enter the model,
    # to exactly the values float32(x) / 255 that a loader would have stored.
    assert x_train.dtype == torch.uint8 and y_train.dtype == torch.int64
    assert torch.equal(x_train[:, 0], torch.as_tensor(arrays["x_train"]))
    assert torch.equal(model_input(x_train)[:, 0],
                       torch.from_numpy(arrays["x_train"].astype(np.float32) / np.float32(255)))
    assert torch.equal(y_test, torch.as_tensor(arrays["y_test"]))
    stream = builtin.split_mnist(StreamOptions(data=str(tmp_path / "mnist.npz")))
    assert len(stream) == 5 and sum(len(task.train) for task in stream.tasks) == 50
    assert all(task.train.x.dtype == torch.uint8 for task in stream.tasks)
    # Permuted streams keep them too, permuted per batch; rotation works on floats (it
    # interpolates), made per batch from the stored pixels.
    permuted = builtin.permuted_mnist(StreamOptions(data=str(tmp_path / "mnist.npz"),
                                                    num_tasks=3))
    assert all(task.test.inputs().dtype == torch.uint8 for task in permuted.tasks)
    rotated = builtin.rotated_mnist(StreamOptions(data=str(tmp_path / "mnist.npz"), num_tasks=2))
    assert rotated.tasks[0].train.x.dtype == torch.uint8
    assert torch.equal(rotated.tasks[0].train.inputs(), model_input(x_train))


def _write(path, arrays):
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("make, message", [
    (lambda p: str(p / "absent.npz"), "absent.npz: no such file"),
    (lambda p: (p / "text.npz").write_text("not numbers") and str(p / "text.npz"),
     "not an .npz archive"),
    (lambda p: (p / "zip.npz").write_bytes(b"PK\x03\x04broken") and str(p / "zip.npz"),
     "not a readable .npz"),
    (lambda p: _write(p / "keys.npz", {k: v for k, v in fake_mnist().items() if k != "y_test"}),
     "missing key 'y_test' \\(found: x_train, y_train, x_test\\)"),
    (lambda p: _write(p / "shape.npz", {**fake_mnist(), "x_test": np.zeros((20, 28, 27))}),
     r"x_test has shape \(20, 28, 27\), expected \(N, 28, 28\)"),
    (lambda p: _write(p / "rows.npz", {**fake_mnist(), "y_train": np.zeros(49, np.int64)}),
     "x_train has 50 rows but y_train has 49"),
    (lambda p: _write(p / "labels.npz", {**fake_mnist(), "y_test": np.full(20, 12)}),
     "outside 0..9"),
    (lambda p: _write(p / "floaty.npz", {**fake_mnist(), "y_test": np.zeros(20)}),
     "integer labels"),
])
def test_malformed_mnist_npz_raises_data_error(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        load_mnist(make(tmp_path))


# ---- Hugging Face datasets path ------------------------------------------------------------

@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    """A tiny local image-classification dataset: train.parquet and test.parquet."""
    from datasets import ClassLabel, Dataset, Features, Image

    directory = tmp_path_factory.mktemp("hf")
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    for split, arrays in (("train", fake_mnist(40, 20)), ("test", fake_mnist(40, 20))):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        dataset = Dataset.from_dict({"image": list(x), "label": y.tolist()}, features=features)
        dataset.to_parquet(str(directory / f"{split}.parquet"))
    return directory


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """Keep `datasets`' cache of the local files out of the user's home."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_load_mnist_through_datasets_from_local_parquet(parquet_dir, hf_cache):
    x_train, y_train, x_test, y_test = load_mnist(str(parquet_dir))
    expected = fake_mnist(40, 20)
    assert x_train.shape == (40, 1, 28, 28) and x_test.shape == (20, 1, 28, 28)
    assert torch.allclose(x_train[:, 0], torch.as_tensor(expected["x_train"]) / 255.0)
    assert torch.equal(y_train, torch.as_tensor(expected["y_train"]))
    stream = builtin.split_hf(StreamOptions(data=str(parquet_dir), num_tasks=2))
    assert len(stream) == 2 and stream.tasks[0].classes == (0, 1, 2, 3, 4)


def test_load_image_classification_missing_column_and_split(parquet_dir, tmp_path):
    with pytest.raises(DataError, match="no column 'digit' \\(columns: image, label\\)"):
        load_image_classification(str(parquet_dir), label_column="digit", cache_dir=tmp_path)
    with pytest.raises(DataError, match="no split 'validation' \\(splits: train, test\\)"):
        load_image_classification(str(parquet_dir), test_split="validation",
                                  cache_dir=tmp_path)


def test_load_failure_names_the_npz_option(tmp_path, hf_cache):
    with pytest.raises(DataError, match="--data path/to/mnist.npz") as caught:
        load_mnist(str(tmp_path / "no-such-dir"))
    assert "\n" not in str(caught.value)


def test_rgb_images_of_mixed_sizes(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Image

    features = Features({"image": Image(), "label": ClassLabel(num_classes=2)})
    rgb = [np.full((6, 5, 3), value, np.uint8) for value in (0, 255)]
    for split in ("train", "test"):
        Dataset.from_dict({"image": rgb, "label": [0, 1]}, features=features).to_parquet(
            str(tmp_path / "rgb" / f"{split}.parquet"))
    x_train, *_ = load_image_classification(str(tmp_path / "rgb"), cache_dir=tmp_path / "c")
    assert x_train.shape == (2, 3, 6, 5) and x_train.max() == 1.0
    mixed = [np.zeros((6, 5, 3), np.uint8), np.zeros((4, 4, 3), np.uint8)]
    for split in ("train", "test"):
        Dataset.from_dict({"image": mixed, "label": [0, 1]}, features=features).to_parquet(
            str(tmp_path / "mixed" / f"{split}.parquet"))
    with pytest.raises(DataError, match="differ in size"):
        load_image_classification(str(tmp_path / "mixed"), cache_dir=tmp_path / "c")


# ---- generic .npz and builders -------------------------------------------------------------

@pytest.mark.parametrize("shape, expected", [
    ((30, 6, 7), (1, 6, 7)), ((30, 6, 7, 3), (3, 6, 7)), ((30, 3, 6, 7), (3, 6, 7)),
    ((30, 12), (12,)),
])
def test_split_npz_layouts(tmp_path, shape, expected):
    rng = np.random.default_rng(0)
    y = np.arange(30) % 4
    path = _write(tmp_path / "any.npz", {"x_train": rng.integers(0, 256, shape, np.uint8),
                                         "y_train": y, "x_test": rng.random(shape), "y_test": y})
    stream = builtin.split_npz(StreamOptions(data=path))
    assert stream.input_shape == expected and len(stream) == 2
    assert float(stream.tasks[0].train.x.max()) <= 1.0
    x_train, _, x_test, _ = load_npz(path)
    assert x_test.dtype == torch.float32


def test_builders_refuse_what_does_not_apply(tmp_path):
    with pytest.raises(UsageError, match="unknown setting 'foo' for stream 'split-hf' "
                                         r"\(known: image_column, label_column"):
        builtin.split_hf(StreamOptions(data="x", params=(("foo", "1"),)))
    with pytest.raises(UsageError, match="unknown setting 'angles' for stream 'split-digits'"):
        builtin.split_digits(StreamOptions(params=(("angles", "0|90"),)))
    with pytest.raises(UsageError, match="classes-per-task"):
        builtin.permuted_digits(StreamOptions(classes_per_task=2))
    with pytest.raises(UsageError, match="class-order"):
        builtin.rotated_digits(StreamOptions(class_order="shuffle"))
    with pytest.raises(UsageError, match="--data"):
        builtin.split_npz(StreamOptions())
    with pytest.raises(UsageError, match="--data"):
        builtin.split_hf(StreamOptions())
    with pytest.raises(UsageError, match="--data"):
        builtin.split_digits(StreamOptions(data="x.npz"))
    with pytest.raises(UsageError, match="num_tasks must be positive, got 0"):
        # Checked before the (missing) data file is opened.
        builtin.split_mnist(StreamOptions(data=str(tmp_path / "absent.npz"), num_tasks=0))
    with pytest.raises(UsageError, match="'ninety'"):
        builtin.rotated_digits(StreamOptions(params=(("angles", "0|ninety"),)))


def test_digit_builders_defaults():
    permuted = builtin.permuted_digits(StreamOptions(scenario="task", num_tasks=3))
    assert len(permuted) == 3 and permuted.num_classes == 30 and permuted.scenario == "task"
    rotated = builtin.rotated_digits(StreamOptions(params=(("angles", "0|45|90"),)))
    assert [task.name for task in rotated.tasks] == [
        "rotated 0.0 degrees", "rotated 45.0 degrees", "rotated 90.0 degrees"]
    assert len(builtin.rotated_digits(StreamOptions())) == 5
    domain = builtin.split_digits(StreamOptions(scenario="domain"))
    assert domain.num_classes == 2 and all(task.classes == (0, 1) for task in domain.tasks)


# ---- input normalisation -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["split_mnist", "permuted_mnist", "rotated_mnist"])
def test_normalize_mnist_scales_each_batch_by_the_usual_statistics(tmp_path, name):
    """`normalize=mnist`: (pixels / 255 - 0.1307) / 0.3081 after the task's own transform,
    one batch at a time; the stored rows stay uint8 and shared, and `none` (the default)
    leaves the inputs as they were."""
    np.savez(tmp_path / "mnist.npz", **fake_mnist())
    build = getattr(builtin, name)
    plain = build(StreamOptions(data=str(tmp_path / "mnist.npz"), num_tasks=2)
                  if name != "split_mnist" else StreamOptions(data=str(tmp_path / "mnist.npz")))
    options = StreamOptions(data=str(tmp_path / "mnist.npz"),
                            num_tasks=None if name == "split_mnist" else 2,
                            params=(("normalize", "mnist"),))
    stream = build(options)
    for before, after in zip(plain.tasks, stream.tasks, strict=True):
        assert torch.equal(after.train.x, before.train.x) and after.train.x.dtype == torch.uint8
        expected = (model_input(before.test.inputs()) - 0.1307) / 0.3081
        assert torch.allclose(after.test.inputs(), expected, atol=1e-6)
        index = torch.tensor([3, 0, 7])
        assert torch.equal(after.train.rows(index), after.train.inputs()[index])
    if name != "split_mnist":  # the tasks still share one stored copy
        assert len({task.train.x.data_ptr() for task in stream.tasks}) == 1
    none = build(dataclasses.replace(options, params=(("normalize", "none"),)))
    assert torch.equal(none.tasks[-1].test.inputs(), plain.tasks[-1].test.inputs())


def test_explicit_statistics_per_channel_and_their_errors():
    from tasks.split import parse_normalization

    assert parse_normalization("s", "0.5|0.4|0.3/0.2|0.2|0.1") == ((0.5, 0.4, 0.3),
                                                                   (0.2, 0.2, 0.1))
    for bad, message in (("abc", "is not none, mnist or means/stds"),
                         ("1|2/3", "2 means but 1 standard deviations"),
                         ("0.5/0", "standard deviations positive"),
                         ("0.5/x", "is not none, mnist")):
        with pytest.raises(UsageError, match=message):
            parse_normalization("s", bad)
    with pytest.raises(UsageError, match="3 normalisation values for inputs of 1 channels"):
        builtin.split_digits(StreamOptions(params=(("normalize", "0.1|0.2|0.3/1|1|1"),)))


def test_a_normalised_stream_trains_as_its_materialised_copy():
    """The same R, bit for bit, from normalisation per batch and from every task's inputs
    normalised in full beforehand."""
    from cl.models import build_mlp
    from cl.runner import TrainConfig, run

    stream = builtin.permuted_digits(StreamOptions(num_tasks=3,
                                                   params=(("normalize", "0.3/0.4"),)))
    copies = Stream(stream.name, tuple(
        Task(task.name, task.index, Split(task.train.inputs(), task.train.y),
             Split(task.test.inputs(), task.test.y), task.classes) for task in stream.tasks),
        stream.scenario, stream.num_classes, stream.input_shape)
    results = []
    for each in (stream, copies):
        torch.manual_seed(0)
        model = build_mlp(each.input_shape, each.num_classes, (16,))
        results.append(run(model, each, config=TrainConfig(batch_size=32, lr=0.1)).accuracy)
    assert np.array_equal(results[0], results[1]) and not np.isnan(results[0]).any()
