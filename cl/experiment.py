"""A run as data: `RunConfig` (everything needed to rerun), config files, and `execute`.

`execute(config, out)` turns names into objects through the registry, checks every input before
anything is written, trains, and writes the run directory. The CLI's `cl run` and the ablation
engine both call it, so a run is the same whichever way it was started.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl import __version__, registry
from cl.errors import ClError, UsageError, one_line, out_of_memory
from cl.spec import format_spec, parse_config, parse_spec
from cl.types import SCENARIOS, StreamOptions

log = logging.getLogger(__name__)

SEED_LIMIT = 2**63


@dataclass(frozen=True)
class RunConfig:
    """One run, complete: `config.json` holds exactly these fields."""

    tasks: str = "split-digits"  # a stream name, maybe with settings: "split-hf:label_column=y"
    scenario: str | None = None  # None: the stream's own scenario
    num_tasks: int | None = None
    classes_per_task: int | None = None
    class_order: str = "natural"
    data: str | None = None
    train_per_task: int | None = None  # seeded stratified caps on each task's rows
    test_per_task: int | None = None
    model: str = "mlp"  # mlp, cnn, minilm, or hf:<name-or-path>
    hidden: tuple[int, ...] | None = None  # None: the model's default, resolved before saving
    init: str = "default"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 5
    eval_every: int = 0
    eval_batch_size: int = 1024
    log_every: int = 50
    seed: int = 0
    joint: bool = False
    device: str = "cpu"
    precision: str = "fp32"  # "bf16": bfloat16 autocast around forward passes and losses
    eval_on: str = "all"  # after each task evaluate all tasks, the seen ones, or only at the end
    eval_tokens: int = 4096  # a text evaluation batch's token budget (rows x padded width)
    threads: int | None = None  # torch's intra-op threads; None: torch's own choice, recorded
    val_fraction: float = 0.0  # of each task's training rows, held out as its validation split
    strategy: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.scenario is not None and self.scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {self.scenario!r} (known: {', '.join(SCENARIOS)})")
        # Strategies derive their own seeds from it (seed + a constant): keep room below 2**64.
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {self.seed}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be at least 0 and below 1, got "
                             f"{self.val_fraction}")
        if self.hidden is not None and any(size <= 0 for size in self.hidden):
            raise ValueError(f"hidden sizes must be positive, got {list(self.hidden)}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["hidden"] = list(self.hidden) if self.hidden is not None else None
        data["strategy"] = list(self.strategy)
        return data


CONFIG_KEYS = tuple(field.name for field in dataclasses.fields(RunConfig))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: JSON allows a repeated key and keeps the
    last, which silently drops a setting (TOML refuses it; so does cl, for both)."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise ValueError(f"key {key!r} is given twice")
        data[key] = value
    return data


def read_data_file(path: str | Path, what: str) -> Any:
    """The parsed content of a TOML or JSON file; a missing or malformed file is one error line
    naming `what` ("config file", "ablation spec") and the path."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a directory, not a .toml or .json file")
    if not path.is_file():
        raise UsageError(f"{what} {path} does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            return tomllib.loads(text)
        if path.suffix == ".json":
            return json.loads(text, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise UsageError(f"{what} {path} is not text (it is not UTF-8)") from None
    except ValueError as error:
        raise UsageError(f"{what} {path} is not valid {path.suffix[1:].upper()}: "
                         f"{one_line(error)}") from None
    raise UsageError(f"{what} {path} must end in .toml or .json")


def settings_table(table: dict[str, Any], where: str) -> dict[str, Any]:
    """A table of run settings with dashes read as underscores (`batch-size` = `batch_size`,
    like the CLI flags), every key checked against RunConfig's fields."""
    settings = {key.replace("-", "_"): value for key, value in table.items()}
    if len(settings) < len(table):
        spellings = {}
        for key in table:
            spellings.setdefault(key.replace("-", "_"), []).append(key)
        twice = next(keys for keys in spellings.values() if len(keys) > 1)
        raise UsageError(f"{where} sets {twice[0]!r} and {twice[1]!r}, which are one setting: "
                         "keep one")
    unknown = sorted(set(settings) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r} in {where} "
                         f"(known: {', '.join(CONFIG_KEYS)})")
    return settings


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a TOML or JSON config file, read by `settings_table`."""
    data = read_data_file(path, "config file")
    if not isinstance(data, dict):
        raise UsageError(f"config file {path} must hold a table of settings")
    settings = settings_table(data, f"config file {path}")
    if isinstance(settings.get("strategy"), str):
        settings["strategy"] = [settings["strategy"]]
    return settings


def make_config(settings: dict[str, Any], source: str = "run config") -> RunConfig:
    """A RunConfig from loose settings (config file values, CLI flags), types checked."""
    hidden = settings.get("hidden")
    if isinstance(hidden, str):
        # An empty item is a typo ("10,,10"), and an empty string is no list at all: neither
        # may quietly mean fewer layers.
        if not hidden.strip() or any(not part.strip() for part in hidden.split(",")):
            raise UsageError(f"bad value {hidden!r} for {source} setting 'hidden': expected sizes "
                             "such as 400,400 (hidden = [] in a config file: no hidden layer)")
        settings = {**settings, "hidden": hidden.replace(",", "|")}
    return parse_config(RunConfig, settings, owner=source)


@dataclass
class Built:
    """The objects a RunConfig names, built and checked; `config` has its defaults resolved
    and its local paths made absolute (`given` keeps each path as it was typed)."""

    config: RunConfig
    stream: Any
    model: Any
    strategy: Any
    train: Any
    given: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclass
class Plan:
    """What a RunConfig names, resolved and checked without loading any data or weights."""

    train: Any  # the TrainConfig
    stream_name: str
    stream_params: dict[str, str]
    build_stream: Any
    build_model: Any
    backbone: Any  # a Backbone for pretrained text models, else None
    source: str | None  # the backbone's resolved name or path
    strategy: Any  # the Chain of strategies, freshly built


def plan(config: RunConfig) -> Plan:
    """Resolve every name of `config` and check every value that needs no data.

    Cheap enough to run over a whole ablation grid before any run starts: unknown streams,
    models and strategies, strategy parameters, and bad values all fail here.
    """
    from cl.backbones import Backbone
    from cl.models import check_device
    from cl.runner import TrainConfig
    from cl.strategy import Chain

    # RunConfig holds every TrainConfig field under the same name.
    train = TrainConfig(**{field.name: getattr(config, field.name)
                           for field in dataclasses.fields(TrainConfig)})
    for name in ("num_tasks", "classes_per_task", "train_per_task", "test_per_task"):
        value = getattr(config, name)
        if value is not None and value <= 0:
            raise UsageError(f"{name} must be positive, got {value}")
    check_device(config.device, "device")
    check_precision(config.precision, config.device)

    stream_name, stream_params = parse_spec(config.tasks)
    build_stream = registry.load("stream", stream_name)
    # `hf:<name-or-path>`: a path may hold anything, so only the first ':' splits.
    model_name, _, model_argument = config.model.partition(":")
    build_model = registry.load("model", model_name)
    backbone = build_model if isinstance(build_model, Backbone) else None
    source = None
    if backbone is not None:
        for flag, value, default in (("hidden", config.hidden, None),
                                     ("init", config.init, "default")):
            if value != default:
                raise UsageError(f"--{flag} does not apply to model {config.model!r}: "
                                 "a pretrained backbone keeps its own layers")
        source = backbone.source(model_argument)
    elif model_argument:
        raise UsageError(f"model {model_name!r} takes no ':' argument (got {config.model!r})")
    strategies = []
    for spec in config.strategy:
        name, params = parse_spec(spec)
        strategy_class = registry.load("strategy", name)
        strategy_config = parse_config(strategy_class.config_class, params,
                                       owner=f"strategy {name!r}")
        strategies.append(strategy_class(strategy_config))
    try:
        strategy = Chain(*strategies)
    except ValueError as error:  # a strategy twice, or strategies that contradict each other
        raise UsageError(str(error)) from None
    return Plan(train, stream_name, stream_params, build_stream, build_model,
                backbone, source, strategy)


def check_precision(precision: str, device: str) -> None:
    """A UsageError, before any directory exists, when the device cannot compute in bfloat16
    (a CUDA GPU older than Ampere): torch would fail at the first forward pass."""
    if precision != "bf16" or not device.startswith("cuda"):
        return
    import torch

    if not torch.cuda.is_bf16_supported():
        raise UsageError(f"--precision bf16: {torch.cuda.get_device_name(torch.device(device))} "
                         "has no bfloat16 support; use --precision fp32")


def absolute_paths(config: RunConfig) -> tuple[RunConfig, dict[str, str]]:
    """`config` with every local path it names made absolute: `--data`, an `hf:<path>` model,
    and strategy settings whose config field is marked as a path (`metadata={"path": True}`),
    so that `config.json` reruns from any directory. Hub names and words (`previous`) stay.
    Also returns what was typed, by setting, for the paths it changed."""
    given: dict[str, str] = {}

    def resolved(value: str, name: str) -> str:
        path = Path(value).expanduser()
        if not path.exists() or str(path.resolve()) == value:
            return value
        given[name] = value
        return str(path.resolve())

    changes: dict[str, Any] = {}
    if config.data is not None:
        changes["data"] = resolved(config.data, "data")
    model_name, colon, argument = config.model.partition(":")
    if argument:
        changes["model"] = f"{model_name}{colon}{resolved(argument, 'model')}"
    strategies = []
    for spec in config.strategy:
        name, params = parse_spec(spec)
        fields = {field.name: field for field in
                  dataclasses.fields(registry.load("strategy", name).config_class)}
        paths = {key: resolved(value, f"{name}:{key}") for key, value in params.items()
                 if key in fields and fields[key].metadata.get("path")}
        changed = {key: value for key, value in paths.items() if value != params[key]}
        strategies.append(format_spec(name, {**params, **changed}) if changed else spec)
    changes["strategy"] = tuple(strategies)
    return dataclasses.replace(config, **changes), given


def build_model(checked: Plan, config: RunConfig, stream: Any, hidden: tuple[int, ...]) -> Any:
    """The seeded model of a built-in builder; a size the machine cannot hold is one line."""
    from cl.models import build_seeded

    try:
        return build_seeded(checked.build_model, stream.input_shape, stream.num_classes,
                            hidden, config.init, config.seed)
    except (RuntimeError, MemoryError) as error:
        asked = out_of_memory(error)
        if asked is None:
            raise
        raise ClError(f"not enough memory for model {config.model!r} with hidden sizes "
                      f"{','.join(map(str, hidden))}{asked}") from None


def build(config: RunConfig) -> Built:
    """Resolve every name of `config`, check every value, load the stream and the model, and
    let the strategies check them (`Strategy.check`).

    Nothing is written here: whatever is wrong with the inputs fails before a run directory
    exists.
    """
    import torch

    from cl.sampling import cap_stream, hold_out

    checked = plan(config)
    config, given = absolute_paths(config)
    backbone, source = checked.backbone, checked.source
    kind = backbone.kind(source) if backbone is not None else None
    tokenizer = backbone.tokenizer(source) if kind == "text" else None
    stream = checked.build_stream(StreamOptions(
        scenario=config.scenario, num_tasks=config.num_tasks,
        classes_per_task=config.classes_per_task, class_order=config.class_order,
        seed=config.seed, data=config.data, params=tuple(checked.stream_params.items()),
        train_per_task=config.train_per_task, test_per_task=config.test_per_task,
        tokenizer=tokenizer))
    stream = cap_stream(stream, config.train_per_task, config.test_per_task, config.seed)
    stream = hold_out(stream, config.val_fraction, config.seed)
    text_inputs = isinstance(stream.tasks[0].train.x, dict)
    hidden = config.hidden
    if kind == "text":
        if not text_inputs:
            raise UsageError(f"model {config.model!r} reads text, but stream "
                             f"{checked.stream_name!r} holds arrays; use a text stream "
                             "(text-cl, text)")
        model = backbone.model(source, stream.num_classes, config.seed, tokenizer.pad_token_id)
    elif kind == "image":
        if text_inputs:
            raise UsageError(f"model {config.model!r} classifies images, but stream "
                             f"{checked.stream_name!r} holds text; use an image stream")
        model = backbone.image_model(source, stream.num_classes, config.seed,
                                     stream.input_shape)
    else:
        if text_inputs:
            raise UsageError(f"stream {checked.stream_name!r} holds text: use --model minilm "
                             f"or --model hf:<name-or-path>, not {config.model!r}")
        if hidden is None:
            hidden = tuple(inspect.signature(checked.build_model).parameters["hidden"].default)
        model = build_model(checked, config, stream, hidden)
    checked.strategy.check(model, stream, config.joint)
    # The thread count is recorded: CPU results can depend on how reductions are split.
    threads = config.threads if config.threads is not None else torch.get_num_threads()
    resolved = dataclasses.replace(config, hidden=hidden, scenario=stream.scenario,
                                   tasks=format_spec(checked.stream_name, checked.stream_params),
                                   threads=threads)
    return Built(resolved, stream, model, checked.strategy, checked.train, given)


# The settings that decide the stream and the model; the rest only change how they train.
DATA_KEYS = ("tasks", "scenario", "num_tasks", "classes_per_task", "class_order", "data",
             "train_per_task", "test_per_task", "val_fraction", "model", "hidden", "init",
             "seed")


def check_configs(configs: list[RunConfig], wheres: list[str]) -> None:
    """Check each configuration as `build` would (its strategies against its stream and model),
    building each distinct stream and model once; the first problem is one UsageError naming
    its configuration (`wheres`)."""
    groups: dict[tuple, list[tuple[RunConfig, str]]] = {}
    for config, where in zip(configs, wheres, strict=True):
        key = tuple(repr(getattr(config, name)) for name in DATA_KEYS)
        groups.setdefault(key, []).append((config, where))
    for members in groups.values():  # one stream in memory at a time
        built = None
        for config, where in members:
            try:
                if built is None:
                    built = build(config)
                else:
                    plan(config).strategy.check(built.model, built.stream, config.joint)
            except UsageError as error:
                raise UsageError(f"{where}: {error}") from None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (ru_maxrss is KiB on Linux)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def torch_peak_gpu_mb(device: str) -> float | None:
    """Peak memory allocated for tensors on a CUDA `device` in this process, in MiB; None
    elsewhere."""
    import torch

    if not device.startswith("cuda"):
        return None
    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**20


def versions() -> dict[str, str]:
    import numpy
    import torch

    return {"cl": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version()}


def metrics_of(built: Built, result: Any) -> dict[str, Any]:
    """The content of `metrics.json`: R, the derived metrics, costs and provenance."""
    import numpy as np

    from cl import metrics
    from cl.models import trainable_parameters

    stream = built.stream

    def measured(accuracy, initial, curve) -> dict[str, Any]:
        """A matrix with its metrics; min-ACC and WC-ACC from its curve, measured at the same
        points as every other matrix of the run (the `--eval-every` ones included)."""
        return {"accuracy_matrix": accuracy.tolist(), "initial_accuracy": initial.tolist(),
                **metrics.summarize(accuracy, initial, result.curve_steps, curve,
                                    result.task_end_steps)}

    data: dict[str, Any] = {
        "stream": stream.name,
        "scenario": stream.scenario,
        "num_tasks": len(stream.tasks),
        "task_names": [task.name for task in stream.tasks],
        "joint": built.config.joint,
        **measured(result.accuracy, result.initial_accuracy, result.curve_accuracy),
    }
    if result.task_accuracy is not None:
        # A class-IL run also yields task-IL numbers: the same logits, masked to each task.
        data["task_il"] = measured(result.task_accuracy, result.initial_task_accuracy,
                                   result.curve_task_accuracy)
    data["final_macro_f1"] = metrics.macro_f1_per_task(
        result.final_targets, result.final_predictions, [t.classes for t in stream.tasks])
    data["confusion_matrix"] = metrics.confusion(
        np.concatenate(result.final_targets), np.concatenate(result.final_predictions),
        stream.num_classes).tolist()
    data["curve"] = {"steps": result.curve_steps.tolist(),
                     "accuracy": result.curve_accuracy.tolist(),
                     "task_end_steps": list(result.task_end_steps)}
    if result.curve_task_accuracy is not None:
        data["curve"]["task_accuracy"] = result.curve_task_accuracy.tolist()
    data.update({
        "steps": result.steps,
        "train_seconds": result.train_seconds,
        "eval_seconds": result.eval_seconds,
        "train_rows": result.train_rows,
        "eval_rows": result.eval_rows,
        "train_samples_per_second": result.train_rows / max(result.train_seconds, 1e-9),
        "eval_samples_per_second": result.eval_rows / max(result.eval_seconds, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
        # The accelerator's own peak (allocated tensors), where the run had one.
        "peak_gpu_memory_mb": torch_peak_gpu_mb(built.config.device),
        "trainable_parameters": trainable_parameters(built.model),  # at the end
        "trained_parameters": result.trained_parameters,  # by any task, each counted once
        "strategies": built.strategy.report(),
        "resumed_from": result.resumed_from,
        "versions": versions(),
    })
    for name, variant in result.variants.items():
        # An extra matrix a strategy asked for (EMA's live weights), with its own metrics.
        entry = measured(variant["accuracy"], variant["initial_accuracy"],
                         variant["curve_accuracy"])
        # Every evaluation of the variant, as the main matrix's `curve` (for a validation view:
        # a setting such as the epoch count chosen along one run).
        entry["curve_accuracy"] = variant["curve_accuracy"].tolist()
        if variant["task_accuracy"] is not None:
            entry["task_il"] = measured(variant["task_accuracy"],
                                        variant["initial_task_accuracy"],
                                        variant["curve_task_accuracy"])
        data.setdefault("variants", {})[name] = entry
    if built.given:
        data["paths_as_given"] = dict(built.given)  # what was typed, where config.json differs
    return data


def default_run_dir(config: RunConfig, root: Path = Path("runs")) -> Path:
    """`runs/<stream>-<strategies>-seed<seed>-<time>`: readable, and unique per second."""
    strategies = "+".join(parse_spec(spec)[0] for spec in config.strategy) or "naive"
    stream = parse_spec(config.tasks)[0]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{stream}-{strategies}-seed{config.seed}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = root / f"{stream}-{strategies}-seed{config.seed}-{stamp}-{suffix}"
    return path


def check_same_run(saved: dict[str, Any], current: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume with settings other than those the checkpoint was trained with (an
    edited config.json): the result would be neither run."""
    # A setting newer than the checkpoint's cl has its default there.
    defaults = RunConfig().to_dict()
    differing = [key for key in sorted(set(saved) | set(current))
                 if saved.get(key, defaults.get(key)) != current.get(key)]
    if differing:
        key = differing[0]
        raise UsageError(f"{run_dir / 'config.json'} no longer matches its checkpoint: {key} is "
                         f"{current.get(key)!r} there but {saved.get(key)!r} in the checkpoint "
                         f"({len(differing)} setting(s) differ); put it back or start a new run")


def execute(config: RunConfig, out: str | Path | None = None, listener=None,
            built: Built | None = None, resume: bool = False, checkpoint: bool = True,
            logs: tuple[str, ...] = ()) -> tuple[Path, dict[str, Any]]:
    """Build, train and store one run; return its directory and its metrics.

    Every input is checked before the directory is made; `metrics.json` is written last, so a
    run that fails (bad data, a NaN loss, a full disk) never leaves a directory that looks done.
    After each task `checkpoint/` holds what `resume=True` needs to continue in `out` after the
    last finished task (from the start when there is none yet).
    `logs` names the optional training logs to write as the run goes ("csv", "tensorboard").
    """
    import torch

    from cl import store
    from cl.logs import Logs, chain_listeners, check_log_formats
    from cl.runner import run

    logs = check_log_formats(logs)
    built = built if built is not None else build(config)
    if resume and out is None:
        raise UsageError("resuming needs the run directory")
    run_dir = Path(out) if out is not None else default_run_dir(config)
    # Held until the run ends (or its process does): a second process gets one error line.
    with store.lock_run_dir(run_dir, resume=resume):
        state = None
        if resume:
            if store.is_complete(run_dir):
                raise store.RunFinished(f"{run_dir} already holds a finished run "
                                        f"({store.METRICS})")
            state = store.read_checkpoint(run_dir)
            if state is not None:
                saved_threads = state["config"].get("threads")
                if config.threads is None and saved_threads is not None:
                    # Not asked for (an ablation's worker): go on with the count it started with.
                    built = dataclasses.replace(built, config=dataclasses.replace(
                        built.config, threads=saved_threads))
                check_same_run(state["config"], built.config.to_dict(), run_dir)
            else:  # killed before its first task ended (or its checkpoint/ was deleted)
                log.warning("%s has no checkpoint: the run starts again from its first task",
                            run_dir)
            (run_dir / store.ERROR).unlink(missing_ok=True)  # a failed run, tried again
        else:
            store.clear_unfinished(run_dir)
        store.write_json(run_dir / store.CONFIG, built.config.to_dict())

        def save(run_state: dict) -> None:
            store.write_checkpoint(run_dir, {**run_state, "config": built.config.to_dict()},
                                   built.strategy.artifacts())

        training_logs = Logs(logs, run_dir)
        torch.set_num_threads(built.config.threads)
        if built.config.device.startswith("cuda"):  # this run's peak, not an earlier one's
            torch.cuda.reset_peak_memory_stats(torch.device(built.config.device))
        try:
            result = run(built.model, built.stream, built.strategy, built.train,
                         listener=chain_listeners(training_logs if logs else None, listener),
                         checkpoint=save if checkpoint else None, resume=state)
        finally:
            training_logs.close()
        data = metrics_of(built, result)
        names = [task.name for task in built.stream.tasks]
        row_names = ["joint"] if built.config.joint else names
        store.write_matrix_csv(run_dir / store.MATRIX, ["initial", *row_names], names,
                               [result.initial_accuracy.tolist(), *result.accuracy.tolist()])
        store.write_jsonl(run_dir / store.EVENTS, result.events)
        store.write_json(run_dir / store.METRICS, data)
    return run_dir, data
