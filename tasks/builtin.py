"""The built-in named streams: each `build(options) -> Stream`, a cl.tasks entry point.

The first line of each builder's docstring is what `cl list` shows. Options a stream does not
use, and settings it does not know, are refused rather than ignored.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from cl.errors import UsageError
from cl.types import Stream, StreamOptions
from tasks.digits import load_digits
from tasks.hf import load_image_classification
from tasks.images import LAYOUTS
from tasks.mnist import load_mnist
from tasks.npz import load_npz
from tasks.split import (
    check_positive,
    check_scenario,
    permuted_stream,
    rotated_stream,
    split_stream,
)

Arrays = tuple[Tensor, Tensor, Tensor, Tensor]


def _checked_settings(stream: str, options: StreamOptions,
                      defaults: dict[str, str]) -> dict[str, str]:
    """The stream's `key=value` settings over its defaults; unknown or repeated keys are refused.

    Also checks the generic options, so that a bad value fails before any data are loaded.
    """
    if options.scenario is not None:
        check_scenario(options.scenario)
    if options.num_tasks is not None:
        check_positive(options.num_tasks, "num_tasks")
    if options.classes_per_task is not None:
        check_positive(options.classes_per_task, "classes_per_task")
    settings = dict(defaults)
    seen = set()
    for key, value in options.params:
        if key not in defaults:
            known = ", ".join(defaults) if defaults else "it takes none"
            raise UsageError(f"unknown setting {key!r} for stream {stream!r} (known: {known})")
        if key in seen:
            raise UsageError(f"setting {key!r} given twice for stream {stream!r}")
        seen.add(key)
        settings[key] = value
    return settings


def _refuse_data(stream: str, options: StreamOptions) -> None:
    if options.data is not None:
        raise UsageError(f"--data does not apply to stream {stream!r}: its data are built in")


def _require_data(stream: str, options: StreamOptions, what: str) -> str:
    if not options.data:
        raise UsageError(f"stream {stream!r} needs --data ({what})")
    return options.data


def _refuse_class_split(stream: str, options: StreamOptions) -> None:
    """Transformed streams (permuted, rotated) give every task all classes."""
    if options.classes_per_task is not None:
        raise UsageError(f"--classes-per-task does not apply to stream {stream!r}: "
                         "every task holds all classes")
    if options.class_order != "natural":
        raise UsageError(f"--class-order does not apply to stream {stream!r}: "
                         "every task holds all classes")


def _split(stream: str, options: StreamOptions, arrays: Arrays) -> Stream:
    return split_stream(stream, *arrays, scenario=options.scenario or "class",
                        num_tasks=options.num_tasks, classes_per_task=options.classes_per_task,
                        class_order=options.class_order, seed=options.seed)


def _num_tasks(options: StreamOptions, default: int) -> int:
    return default if options.num_tasks is None else options.num_tasks


def _permuted(stream: str, options: StreamOptions, load: Callable[[], Arrays],
              default_tasks: int) -> Stream:
    _checked_settings(stream, options, {})
    _refuse_class_split(stream, options)
    return permuted_stream(stream, *load(), num_tasks=_num_tasks(options, default_tasks),
                           scenario=options.scenario or "domain", seed=options.seed)


def _parse_angles(stream: str, text: str) -> list[float] | None:
    """`angles=0|45|90`: degrees separated by '|' (commas already separate settings)."""
    if not text:
        return None
    angles = []
    for part in text.split("|"):
        try:
            angles.append(float(part))
        except ValueError:
            raise UsageError(f"angles for stream {stream!r}: {part!r} is not a number of "
                             "degrees (e.g. angles=0|45|90)") from None
    return angles


def _rotated(stream: str, options: StreamOptions, load: Callable[[], Arrays],
             default_tasks: int) -> Stream:
    settings = _checked_settings(stream, options, {"angles": ""})
    _refuse_class_split(stream, options)
    angles = _parse_angles(stream, settings["angles"])
    num_tasks = options.num_tasks if angles is not None else _num_tasks(options, default_tasks)
    return rotated_stream(stream, *load(), num_tasks=num_tasks,
                          scenario=options.scenario or "domain", seed=options.seed,
                          angles=angles)


def split_digits(options: StreamOptions) -> Stream:
    """Split digits: scikit-learn's 8x8 digits (offline), 5 tasks of 2 classes each."""
    _checked_settings("split-digits", options, {})
    _refuse_data("split-digits", options)
    return _split("split-digits", options, load_digits())


def permuted_digits(options: StreamOptions) -> Stream:
    """Permuted digits: 8x8 digits (offline), 5 tasks each with its own fixed pixel permutation."""
    _refuse_data("permuted-digits", options)
    return _permuted("permuted-digits", options, load_digits, default_tasks=5)


def rotated_digits(options: StreamOptions) -> Stream:
    """Rotated digits: 8x8 digits (offline), 5 tasks each rotated by its own fixed angle."""
    _refuse_data("rotated-digits", options)
    return _rotated("rotated-digits", options, load_digits, default_tasks=5)


def split_mnist(options: StreamOptions) -> Stream:
    """Split MNIST: 5 tasks of 2 digit classes each (--data mnist.npz, else the HF hub)."""
    _checked_settings("split-mnist", options, {})
    return _split("split-mnist", options, load_mnist(options.data))


def permuted_mnist(options: StreamOptions) -> Stream:
    """Permuted MNIST: 10 tasks each with its own fixed pixel permutation (task 0 unpermuted)."""
    return _permuted("permuted-mnist", options, lambda: load_mnist(options.data),
                     default_tasks=10)


def rotated_mnist(options: StreamOptions) -> Stream:
    """Rotated MNIST: 10 tasks each rotated by its own fixed angle (task 0 upright)."""
    return _rotated("rotated-mnist", options, lambda: load_mnist(options.data),
                    default_tasks=10)


def split_npz(options: StreamOptions) -> Stream:
    """Class splits of any .npz with x_train, y_train, x_test, y_test (--data file.npz)."""
    settings = _checked_settings("split-npz", options, {"layout": "auto"})
    path = _require_data("split-npz", options, "an .npz file with x_train, y_train, x_test, y_test")
    if settings["layout"] not in LAYOUTS:
        raise UsageError(f"layout={settings['layout']!r} for stream 'split-npz' is not one of "
                         f"{', '.join(LAYOUTS)}")
    return _split("split-npz", options, load_npz(path, layout=settings["layout"]))


def split_hf(options: StreamOptions) -> Stream:
    """Class splits of any image-classification dataset from `datasets` (--data name or path)."""
    settings = _checked_settings("split-hf", options, {
        "image_column": "image", "label_column": "label",
        "train_split": "train", "test_split": "test"})
    source = _require_data("split-hf", options, "a Hugging Face dataset name or local path")
    return _split("split-hf", options, load_image_classification(source, **settings))
