"""The built-in named streams: each `build(options) -> Stream`, a cl.tasks entry point.

The first line of each builder's docstring is what `cl list` shows. Options a stream does not
use, and settings it does not know, are refused rather than ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor

from cl.errors import DataError, UsageError
from cl.sources import HubUnreachable
from cl.types import Stream, StreamOptions
from tasks.digits import load_digits
from tasks.hf import load_image_classification
from tasks.images import LAYOUTS
from tasks.mnist import load_mnist
from tasks.npz import load_npz
from tasks.split import (
    Statistics,
    check_positive,
    check_scenario,
    normalized,
    parse_normalization,
    permuted_stream,
    rotated_stream,
    split_stream,
)
from tasks.text import DEFAULT_MAX_LENGTH, TextSource, text_stream

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


def _image_settings(stream: str, options: StreamOptions, defaults: dict[str, str]
                    ) -> tuple[dict[str, str], Statistics | None]:
    """An image stream's own settings, and its `normalize=none|mnist|means/stds` parsed (None:
    pixels / 255, the DER protocol's input), so that a bad value fails before loading."""
    settings = _checked_settings(stream, options, {**defaults, "normalize": "none"})
    return settings, parse_normalization(stream, settings.pop("normalize"))


def _normalize(stream: Stream, statistics: Statistics | None) -> Stream:
    return stream if statistics is None else normalized(stream, *statistics)


def _split(stream: str, options: StreamOptions, arrays: Arrays,
           statistics: Statistics | None) -> Stream:
    return _normalize(split_stream(
        stream, *arrays, scenario=options.scenario or "class", num_tasks=options.num_tasks,
        classes_per_task=options.classes_per_task, class_order=options.class_order,
        seed=options.seed), statistics)


def _num_tasks(options: StreamOptions, default: int) -> int:
    return default if options.num_tasks is None else options.num_tasks


def _transform_first(stream: str, text: str) -> bool:
    """`transform_first=true`: task 0 is permuted or rotated too (the DER table's code)."""
    if text not in ("true", "false"):
        raise UsageError(f"transform_first for stream {stream!r} must be true or false, "
                         f"got {text!r}")
    return text == "true"


def _permuted(stream: str, options: StreamOptions, load: Callable[[], Arrays],
              default_tasks: int) -> Stream:
    settings, statistics = _image_settings(stream, options, {"transform_first": "false"})
    _refuse_class_split(stream, options)
    first = _transform_first(stream, settings["transform_first"])
    return _normalize(permuted_stream(stream, *load(),
                                      num_tasks=_num_tasks(options, default_tasks),
                                      scenario=options.scenario or "domain", seed=options.seed,
                                      transform_first=first), statistics)


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
    settings, statistics = _image_settings(stream, options, {"angles": "",
                                                             "transform_first": "false"})
    _refuse_class_split(stream, options)
    angles = _parse_angles(stream, settings["angles"])
    first = _transform_first(stream, settings["transform_first"])
    if angles is not None and first:
        raise UsageError(f"stream {stream!r}: angles and transform_first=true both set the "
                         "first task's angle; give one")
    num_tasks = options.num_tasks if angles is not None else _num_tasks(options, default_tasks)
    return _normalize(rotated_stream(stream, *load(), num_tasks=num_tasks,
                                     scenario=options.scenario or "domain", seed=options.seed,
                                     angles=angles, transform_first=first), statistics)


def split_digits(options: StreamOptions) -> Stream:
    """Split digits: scikit-learn's 8x8 digits (offline), 5 tasks of 2 classes each."""
    _, statistics = _image_settings("split-digits", options, {})
    _refuse_data("split-digits", options)
    return _split("split-digits", options, load_digits(), statistics)


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
    _, statistics = _image_settings("split-mnist", options, {})
    return _split("split-mnist", options, load_mnist(options.data), statistics)


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
    settings, statistics = _image_settings("split-npz", options, {"layout": "auto"})
    path = _require_data("split-npz", options, "an .npz file with x_train, y_train, x_test, y_test")
    if settings["layout"] not in LAYOUTS:
        raise UsageError(f"layout={settings['layout']!r} for stream 'split-npz' is not one of "
                         f"{', '.join(LAYOUTS)}")
    return _split("split-npz", options, load_npz(path, layout=settings["layout"]), statistics)


def split_hf(options: StreamOptions) -> Stream:
    """Class splits of any image-classification dataset from `datasets` (--data name or path)."""
    settings, statistics = _image_settings("split-hf", options, {
        "image_column": "image", "label_column": "label",
        "train_split": "train", "test_split": "test"})
    source = _require_data("split-hf", options, "a Hugging Face dataset name or local path")
    try:
        arrays = load_image_classification(source, **settings)
    except HubUnreachable as error:
        raise HubUnreachable(f"{error}; give a local directory with --data") from None
    return _split("split-hf", options, arrays, statistics)


# The continual-learning text benchmark of the LoRA-for-CL literature (de Masson d'Autume et al.
# 2019; O-LoRA): Zhang et al.'s 2015 classification sets. The hub copies and their columns; the
# two review sets share the five sentiment names, as the local labels.json files have them.
SENTIMENT = ("very negative", "negative", "neutral", "positive", "very positive")
TEXT_CL_HUB = {
    "agnews": TextSource("agnews", "fancyzhx/ag_news",
                         label_names=("World", "Sports", "Business", "Science or Technology")),
    "amazon": TextSource("amazon", "SetFit/amazon_reviews_multi_en", label_names=SENTIMENT),
    "dbpedia": TextSource("dbpedia", "fancyzhx/dbpedia_14", text_columns=("title", "content")),
    "yelp": TextSource("yelp", "Yelp/yelp_review_full", label_names=SENTIMENT),
}
TEXT_CL_ORDER = "agnews|amazon|dbpedia|yelp"


def _text_settings(stream: str, options: StreamOptions, extra: dict[str, str]
                   ) -> tuple[dict[str, str], int, bool]:
    """A text stream's settings, with max_length and share_labels checked."""
    settings = _checked_settings(stream, options, {
        **extra, "max_length": str(DEFAULT_MAX_LENGTH), "share_labels": "false"})
    if options.classes_per_task is not None or options.class_order != "natural":
        raise UsageError(f"--classes-per-task and --class-order do not apply to stream "
                         f"{stream!r}: each dataset is one task with its own classes")
    if options.num_tasks is not None:
        raise UsageError(f"--num-tasks does not apply to stream {stream!r}: it has one task per "
                         "dataset (choose them with its order or datasets setting)")
    try:
        max_length = int(settings["max_length"])
    except ValueError:
        raise UsageError(f"max_length={settings['max_length']!r} for stream {stream!r} is not "
                         "an integer") from None
    share = settings["share_labels"].lower()
    if share not in ("true", "false"):
        raise UsageError(f"share_labels={settings['share_labels']!r} for stream {stream!r} is "
                         "not true or false")
    return settings, max_length, share == "true"


def _build_text(stream: str, options: StreamOptions, sources: list[TextSource],
                max_length: int, share_labels: bool) -> Stream:
    return text_stream(stream, sources, options.tokenizer, scenario=options.scenario or "class",
                       share_labels=share_labels, max_length=max_length,
                       train_per_task=options.train_per_task,
                       test_per_task=options.test_per_task, seed=options.seed)


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split("|") if part.strip()]


def text_cl(options: StreamOptions) -> Stream:
    """Text CL: agnews, amazon, dbpedia, yelp (--data DIR/<name>/{train,test}.jsonl, else hub)."""
    settings, max_length, share = _text_settings("text-cl", options, {"order": TEXT_CL_ORDER})
    order = _names(settings["order"])
    unknown = [name for name in order if name not in TEXT_CL_HUB]
    if unknown or not order:
        bad = unknown[0] if unknown else settings["order"]
        raise UsageError(f"order for stream 'text-cl': unknown dataset {bad!r} (known: "
                         f"{', '.join(TEXT_CL_HUB)}; e.g. order=dbpedia|amazon|yelp|agnews)")
    if options.data is not None:
        root = Path(options.data).expanduser()
        if not root.is_dir():
            raise DataError(f"--data {options.data}: not a directory (expected "
                            "DIR/<name>/{train,test}.jsonl for agnews, amazon, dbpedia, yelp)")
        sources = [TextSource(name, str(root / name)) for name in order]
        missing = [s.source for s in sources if not Path(s.source).is_dir()]
        if missing:
            raise DataError(f"--data {options.data}: no directory {missing[0]}")
    else:
        sources = [TEXT_CL_HUB[name] for name in order]
    return _build_text("text-cl", options, sources, max_length, share)


def _per_dataset(stream: str, key: str, text: str, count: int) -> list[str]:
    """One value for every dataset, or a `|`-separated list with one value each."""
    values = _names(text)
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise UsageError(f"{key} for stream {stream!r} lists {len(values)} values for "
                         f"{count} datasets; give one, or one per dataset")
    return values


def text(options: StreamOptions) -> Stream:
    """Any text classification datasets, one task each (datasets=a|b, hub names or dirs)."""
    settings, max_length, share = _text_settings("text", options, {
        "datasets": "", "text_column": "text", "label_column": "label",
        "train_split": "train", "test_split": "test"})
    names = _names(settings["datasets"])
    if not names:
        raise UsageError("stream 'text' needs datasets=a|b|... (hub names, or directories; "
                         "relative to --data when it is given)")
    count = len(names)
    columns = {key: _per_dataset("text", key, settings[key], count)
               for key in ("text_column", "label_column", "train_split", "test_split")}
    root = Path(options.data).expanduser() if options.data is not None else None
    if root is not None and not root.is_dir():
        raise DataError(f"--data {options.data}: not a directory")
    sources = []
    for position, name in enumerate(names):
        source = str(root / name) if root is not None else name
        sources.append(TextSource(
            Path(name).name or name, source,
            text_columns=tuple(part for part in columns["text_column"][position].split("+")
                               if part),
            label_column=columns["label_column"][position],
            train_split=columns["train_split"][position],
            test_split=columns["test_split"][position]))
    return _build_text("text", options, sources, max_length, share)
