"""Ablations: a spec of seeds x a grid of settings, expanded into named runs and executed.

A spec file (TOML or JSON) holds `seeds`, a `[base]` table of `cl run` settings and a `[grid]`
table of lists; every combination of the grid's values, over every seed, is one run. Each run
gets a stable directory name under the ablation's directory, derived from its configuration and
seed, so a second invocation finds the runs already done (they have `metrics.json`) and skips
them, resumes interrupted ones from their last finished task, and leaves failed ones (they have
`error.json`) alone unless asked to retry them.

Every run goes through `run_job`, the same function whether it runs in a local worker process
(one fresh process per run, so its peak memory is its own) or as a Ray task; either way the
results land in the same layout.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import logging
import math
import os
import re
import signal
import sys
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cl import store
from cl.errors import ClError, UsageError, one_line
from cl.experiment import (
    SEED_LIMIT,
    RunConfig,
    check_configs,
    make_config,
    plan,
    read_data_file,
    settings_table,
)
from cl.spec import parse_spec

log = logging.getLogger(__name__)

SPEC_KEYS = ("seeds", "base", "grid")
# Every run is checked before any starts and gets a directory: a grid beyond this is a typo
# (or a job for several specs), not something to enumerate silently for minutes.
MAX_RUNS = 10_000
EXECUTORS = ("process", "ray")


@dataclass(frozen=True)
class Spec:
    """An ablation: every grid combination (in the order of the grid's keys) x every seed."""

    seeds: tuple[int, ...]
    base: dict[str, Any]
    grid: dict[str, list[Any]]


@dataclass(frozen=True)
class Job:
    """One run of an ablation: its stable name, the configuration it belongs to, and where."""

    name: str  # "<configuration>-seed<seed>", the run directory's name
    configuration: str  # "<readable>-<hash>", shared by the seeds of one configuration
    config: RunConfig
    run_dir: Path


# A worker's exit code when another process holds its run directory (EX_TEMPFAIL).
BUSY_EXIT = 75


@dataclass(frozen=True)
class Outcome:
    """What became of one run: "done", "skipped" (done before), "busy" (another process holds
    its directory, e.g. a second `cl ablate` on the same --out), or "failed" (with its error)."""

    job: Job
    status: str
    error: str | None = None


def _settings(table: dict[str, Any], where: str) -> dict[str, Any]:
    """A [base] or [grid] table: `cl run`'s settings, but never the seed (the spec lists those)."""
    settings = settings_table(table, where)
    if "seed" in settings:
        raise UsageError(f"{where} sets 'seed': list the seeds in the top-level 'seeds' instead")
    return settings


def _strategy_list(value: Any, where: str) -> list[str]:
    """A strategy setting as a list of specs: one spec string, or a list of them."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise UsageError(f"{where}: a strategy value must be a spec string or a list of spec "
                     f"strings, got {value!r}")


def parse_spec_table(data: Any, source: str) -> Spec:
    """A Spec from the parsed file, every key and type checked; nothing is built here."""
    if not isinstance(data, dict):
        raise UsageError(f"{source} must hold a table with {', '.join(SPEC_KEYS)}")
    unknown = sorted(set(data) - set(SPEC_KEYS))
    if unknown:
        raise UsageError(f"unknown key {unknown[0]!r} in {source} (known: {', '.join(SPEC_KEYS)};"
                         " run settings go in [base] or [grid])")
    seeds = data.get("seeds", [0])
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(seed, int) and not isinstance(seed, bool) for seed in seeds)):
        raise UsageError(f"'seeds' in {source} must be a non-empty list of integers, "
                         f"got {seeds!r}")
    outside = [seed for seed in seeds if not 0 <= seed < SEED_LIMIT]
    if outside:
        raise UsageError(f"seed {outside[0]} in 'seeds' of {source} is not an integer from 0 to "
                         "2**63 - 1")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"'seeds' in {source} lists a seed twice: {seeds!r}")
    base, grid = data.get("base", {}), data.get("grid", {})
    for name, table in (("base", base), ("grid", grid)):
        if not isinstance(table, dict):
            raise UsageError(f"[{name}] in {source} must be a table, got {table!r}")
    base = _settings(base, f"[base] of {source}")
    # No [grid]: one configuration, [base], over the seeds (the most common ablation of all).
    grid = _settings(grid, f"[grid] of {source}")
    for key, values in grid.items():
        if not isinstance(values, list):
            raise UsageError(f"[grid] {key} in {source} must be a list of values, got {values!r}")
        if not values:
            raise UsageError(f"[grid] {key} in {source} is an empty list: the grid would "
                             "hold no configuration")
        if key in base:
            raise UsageError(f"{key!r} is set in both [base] and [grid] of {source}")
    sizes = [len(values) for values in grid.values()]
    runs = math.prod(sizes) * len(seeds)
    if runs > MAX_RUNS:
        shape = " x ".join(map(str, sizes + [len(seeds)]))
        raise UsageError(f"{source} makes {runs:,} runs ({shape} values x seeds); cl ablate "
                         f"runs at most {MAX_RUNS:,} from one spec: split the grid")
    if "strategy" in base:
        base["strategy"] = _strategy_list(base["strategy"], f"[base] of {source}")
    if "strategy" in grid:
        grid["strategy"] = [_strategy_list(value, f"[grid] strategy of {source}")
                            for value in grid["strategy"]]
    return Spec(tuple(seeds), base, grid)


def read_spec(path: str | Path) -> Spec:
    """The Spec of a TOML or JSON file."""
    data = read_data_file(path, "ablation spec")
    return parse_spec_table(data, f"ablation spec {path}")


def _slug(key: str, value: Any) -> str:
    """A grid value as a short, filesystem-safe piece of a name: lr0.01, replay-capacity100."""
    if key == "strategy":
        pieces = []
        for spec in value:
            name, params = parse_spec(spec)
            pieces.append("-".join([name, *(f"{k}{v}" for k, v in params.items())]))
        text = "+".join(pieces) or "naive"
    else:
        text = f"{key.replace('_', '-')}{value}"
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-")


def config_hash(config: RunConfig) -> str:
    """8 hex digits that name a configuration: the settings that differ from the defaults.

    The seed is left out (it tells runs of one configuration apart), and so are settings at
    their default value, so that cl growing a new setting leaves the names of old runs alone.
    """
    defaults = RunConfig().to_dict()
    changed = {key: value for key, value in config.to_dict().items()
               if key != "seed" and value != defaults[key]}
    text = json.dumps(changed, sort_keys=True, separators=(",", ":"))
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def expand(spec: Spec, out: str | Path) -> list[Job]:
    """Every run of `spec`, configurations in grid order and seeds within; all checked.

    Each configuration is type-checked and planned (names resolved, strategy parameters
    checked), then built as `cl run` builds it (each distinct stream and model once) so that
    what only the data and the model can tell (a freeze pattern that matches no parameter,
    lora in the class scenario) fails the whole ablation before any run starts.
    """
    out = Path(out)
    keys = list(spec.grid)
    jobs, names = [], {}
    for values in itertools.product(*(spec.grid[key] for key in keys)):
        combination = dict(zip(keys, values, strict=True))
        settings = {**spec.base, **combination}
        where = "ablation configuration " + ", ".join(
            f"{key}={value!r}" for key, value in combination.items())
        try:
            first = make_config({**settings, "seed": spec.seeds[0]}, source="[base]/[grid]")
            plan(first)
        except UsageError as error:
            raise UsageError(f"{where}: {error}") from None
        readable = "_".join(_slug(key, value) for key, value in combination.items())[:80] \
            or "base"
        configuration = f"{readable}-{config_hash(first)}"
        if configuration in names:
            raise UsageError(f"{where} is the same run configuration as {names[configuration]}")
        names[configuration] = where
        for seed in spec.seeds:
            name = f"{configuration}-seed{seed}"
            config = dataclasses.replace(first, seed=seed)
            jobs.append(Job(name, configuration, config, out / name))
    firsts = {job.configuration: job.config for job in jobs}
    check_configs(list(firsts.values()), [names[name] for name in firsts])
    return jobs


def set_threads(threads: int) -> None:
    """Cap this process's torch threads (intra-op to `threads`, inter-op to 1)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already ran in this process
        pass


def run_job(job: Job, threads: int, logs: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run one job to completion in this process; record a failure instead of raising it.

    An unfinished directory (an interrupted run) continues from its last checkpoint; a fresh
    one starts from the beginning. Returns {"status": "done"}, {"status": "busy"} (another
    process holds the directory: it is left alone), {"status": "skipped"} (another process
    finished it meanwhile) or {"status": "failed", "error": line}; a failure also leaves
    `error.json` in the run directory.
    """
    from cl.experiment import execute

    set_threads(threads)
    run_dir = Path(job.run_dir)
    try:
        execute(job.config, run_dir, resume=(run_dir / store.CONFIG).is_file(), logs=logs)
    except store.RunDirBusy:
        return {"status": "busy"}
    except store.RunFinished:  # another process finished it since this ablation looked
        return {"status": "skipped"}
    except Exception as error:  # every failure is recorded; KeyboardInterrupt is not one
        message = str(error) if isinstance(error, ClError) else \
            f"{type(error).__name__}: {one_line(error)}"
        store.write_error(run_dir, job.name, message, traceback.format_exc())
        return {"status": "failed", "error": message}
    return {"status": "done"}


def _process_main(job: Job, threads: int, logs: tuple[str, ...]) -> None:
    """A worker process: one run, then exit (so the next run's peak memory is its own)."""
    # Before torch loads, so its thread pools start at the right size.
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = str(threads)
    try:
        outcome = run_job(job, threads, logs)
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group: leave quietly
        _quiet_exit(130)
    _quiet_exit({"done": 0, "skipped": 0, "busy": BUSY_EXIT}.get(outcome["status"], 1))


def _quiet_exit(code: int) -> None:
    """Exit with `code`, deaf to Ctrl-C from here on: a Ctrl-C that reached a worker while its
    interpreter shut down (running its finalizers) printed a traceback, and the run is over
    either way."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


def _death(exit_code: int | None) -> str:
    if exit_code is not None and exit_code < 0:
        number = -exit_code
        name = signal.Signals(number).name if number in signal.valid_signals() else "?"
        hint = " (out of memory?)" if number == signal.SIGKILL else ""
        return f"the run's worker process was killed by signal {number} ({name}){hint}"
    return f"the run's worker process exited with code {exit_code} without a result"


def run_processes(jobs: Sequence[Job], workers: int, threads: int, logs: tuple[str, ...],
                  on_start: Callable[[Job], None], on_finish: Callable[[Outcome], None]) -> None:
    """Run `jobs` in up to `workers` fresh processes at a time, `threads` torch threads each.

    Each run's result is read back from its directory. On an interrupt the running processes
    are stopped and the interrupt goes on up; their runs stay unfinished, to resume later.
    """
    import multiprocessing
    from multiprocessing.connection import wait

    context = multiprocessing.get_context("spawn")  # no forked torch state in the workers
    pending, running = deque(jobs), {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                process = context.Process(target=_process_main, args=(job, threads, logs),
                                          name=f"cl-{job.name}")
                process.start()
                running[process.sentinel] = (process, job)
                on_start(job)
            for sentinel in wait(list(running)):
                process, job = running.pop(sentinel)
                process.join()
                state = store.run_status(job.run_dir)
                if process.exitcode == BUSY_EXIT:
                    on_finish(Outcome(job, "busy"))
                elif state == "done":
                    on_finish(Outcome(job, "done"))
                elif state == "failed":
                    on_finish(Outcome(job, "failed", store.read_error(job.run_dir)))
                else:
                    message = _death(process.exitcode)
                    store.write_error(job.run_dir, job.name, message)
                    on_finish(Outcome(job, "failed", message))
    finally:
        for process, _ in running.values():
            process.terminate()
        for process, _ in running.values():
            process.join()


def run_ray(jobs: Sequence[Job], threads: int, logs: tuple[str, ...], address: str | None,
            local_cpus: int, gpus_per_run: float | None,
            on_start: Callable[[Job], None], on_finish: Callable[[Outcome], None]) -> None:
    """Run `jobs` as Ray tasks of `run_job`, each declaring `threads` CPUs (and its GPUs).

    Without `address` a local Ray with `local_cpus` CPUs is started (and stopped after); with
    one, the tasks go to that cluster, whose nodes must have cl installed and see `out` (a
    shared filesystem), since each task writes its run directory itself.
    """
    try:
        import ray
        from ray.exceptions import RayError
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install -e '.[ray]'") from None

    options = {"include_dashboard": False, "logging_level": logging.WARNING,
               "log_to_driver": False}
    # A caller that already runs Ray (a library user) keeps it: use it, and leave it running.
    started = not ray.is_initialized()
    if started and address is None:
        ray.init(num_cpus=local_cpus, **options)
    elif started:
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as error:
            raise UsageError(f"cannot reach the Ray cluster at {address!r}: "
                             f"{one_line(error)}") from None
    # A fresh worker process per run (max_calls=1): its peak memory is its own; no retries,
    # since a failed run is recorded and retried only when asked.
    remote_run = ray.remote(max_calls=1, max_retries=0)(run_job)
    running = {}
    try:
        for job in jobs:
            # A CUDA run claims a GPU unless told otherwise; Ray then sets CUDA_VISIBLE_DEVICES.
            gpus = gpus_per_run if gpus_per_run is not None else \
                float(job.config.device.startswith("cuda"))
            remote = remote_run.options(num_cpus=threads, num_gpus=gpus, name=f"cl-{job.name}")
            running[remote.remote(job, threads, logs)] = job
            on_start(job)
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            job = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayError as error:  # the worker died: no error.json from it
                message = f"the run's Ray task failed: {one_line(error)}"
                store.write_error(job.run_dir, job.name, message)
                on_finish(Outcome(job, "failed", message))
                continue
            on_finish(Outcome(job, result["status"], result.get("error")))
    except BaseException:
        for ref in running:  # an interrupt: stop what is still running
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (macOS)
        return os.cpu_count() or 1


def ablate(jobs: Sequence[Job], out: str | Path, spec: Spec, *, executor: str = "process",
           workers: int | None = None, threads: int | None = None, retry_failed: bool = False,
           logs: tuple[str, ...] = (), ray_address: str | None = None,
           gpus_per_run: float | None = None,
           on_plan: Callable[[list[Outcome], list[Job]], None] = lambda before, to_run: None,
           on_start: Callable[[Job], None] = lambda job: None,
           on_finish: Callable[[Outcome], None] = lambda outcome: None) -> list[Outcome]:
    """Run the jobs not done yet; return an outcome for every job, in the jobs' order.

    Done runs are skipped; failed runs are reported as failed again, or rerun when
    `retry_failed`; unfinished ones continue from their checkpoint. `workers` defaults to
    the core count and `threads` (torch threads per run) to cores // workers.
    `on_plan` hears the outcomes known before anything runs and the jobs about to run;
    `on_start` and `on_finish` hear each run as it starts and ends.
    """
    from cl.logs import check_log_formats

    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r} (known: {', '.join(EXECUTORS)})")
    for name, value in (("workers", workers), ("threads", threads)):
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if gpus_per_run is not None and not 0 <= gpus_per_run < math.inf:  # also NaN
        raise UsageError(f"--gpus-per-run must be a finite number from 0, got {gpus_per_run}")
    if ray_address is not None and executor != "ray":
        raise UsageError("--ray-address needs --executor ray")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise UsageError("--executor ray needs Ray: pip install -e '.[ray]'")
    logs = check_log_formats(logs)
    cores = available_cores()
    workers = workers or cores
    threads = threads or max(1, cores // workers)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(out / store.MANIFEST, {
        "seeds": list(spec.seeds), "base": spec.base, "grid": spec.grid,
        "runs": [{"name": job.name, "configuration": job.configuration,
                  "seed": job.config.seed} for job in jobs]})

    outcomes: dict[str, Outcome] = {}
    to_run = []
    for job in jobs:
        state = store.run_status(job.run_dir)
        if state == "done":
            outcomes[job.name] = Outcome(job, "skipped")
        elif state == "running":
            outcomes[job.name] = Outcome(job, "busy")
        elif state == "failed" and not retry_failed:
            outcomes[job.name] = Outcome(job, "failed", store.read_error(job.run_dir))
        else:
            to_run.append(job)
    log.info("%d runs: %d done before, %d failed before, %d to run (%d workers x %d threads)",
             len(jobs), sum(o.status == "skipped" for o in outcomes.values()),
             sum(o.status == "failed" for o in outcomes.values()), len(to_run), workers, threads)

    on_plan(list(outcomes.values()), to_run)

    def finish(outcome: Outcome) -> None:
        outcomes[outcome.job.name] = outcome
        on_finish(outcome)

    if to_run:
        if executor == "process":
            run_processes(to_run, min(workers, len(to_run)), threads, logs, on_start, finish)
        else:
            run_ray(to_run, threads, logs, ray_address, workers * threads, gpus_per_run,
                    on_start, finish)
    return [outcomes[job.name] for job in jobs]
