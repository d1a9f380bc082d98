"""Where datasets and models come from: a local path or the Hugging Face hub, and one line for
each way that can fail.

Three things the Hugging Face libraries do badly at a console that cl owns:

* Offline, every hub download retries with exponential backoff (about 25 s) and logs each try
  twice (the library's own handler, then the root one) before failing. cl asks the hub once,
  quickly, whether it answers at all; when it does not, the libraries run in their offline
  mode, which reads their local caches without a single request, and a miss is one line.
* A path that is not there (`/data/bert`, `./agnews`) is taken for a hub id and refused as
  a malformed one. cl tells paths from hub ids first, and names the missing directory.
* A malformed data file fails as "An error occurred while generating the dataset", with the
  file's name only in an ERROR log line. cl finds the bad file and line itself.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cl.errors import DataError, one_line

logger = logging.getLogger(__name__)

# The loggers of the Hugging Face libraries: each has its own stderr handler.
LIBRARY_LOGGERS = ("huggingface_hub", "datasets", "transformers")
# Long enough for a slow link's first TLS handshake, short against the ~25 s of retries.
HUB_CHECK_TIMEOUT = 5.0
# A hub id is `name` or `org/name`: letters, digits, '-', '_', '.'.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
# The data files `datasets` reads from a local directory, by suffix.
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


class HubUnreachable(DataError):
    """The hub did not answer and the name is not in the local cache: the caller adds how to
    give a local copy instead (--data, hf:<path>)."""


# ---- local path or hub id --------------------------------------------------------------------

def looks_like_path(source: str) -> bool:
    """Whether `source` can only mean a local path: absolute, ./ ../ ~, a separator a hub id
    never has (a/b/c, a backslash), or an `org/name` whose `org` is a local directory."""
    if os.path.isabs(source) or source in (".", "..") or source.startswith("~"):
        return True
    separators = [sep for sep in (os.sep, os.altsep) if sep]
    if any(source.startswith(("." + sep, ".." + sep)) for sep in separators):
        return True
    if any(sep != "/" and sep in source for sep in separators):
        return True
    if "/" in source:
        return not _HUB_ID.fullmatch(source) or Path(source.split("/")[0]).is_dir()
    return False


def local_path(source: str) -> Path | None:
    """The local file or directory `source` names; None for a hub id. A source that can only
    be a path and is not there is a DataError naming it."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if looks_like_path(source):
        raise DataError(f"{source}: no such directory")
    return None


# ---- the hub ---------------------------------------------------------------------------------

def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


@functools.cache
def hub_unreachable() -> str | None:
    """None when the hub answers (any HTTP status will do), else why not ("did not answer
    (...)"): asked once a process, through huggingface_hub's own session, so that proxies and
    certificates are the ones its downloads use."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return "is switched off (HF_HUB_OFFLINE)"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_CHECK_TIMEOUT)
    except Exception as error:  # the transport errors differ between hub versions
        return f"did not answer ({one_line(error)})"
    return None


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """The libraries' offline mode, for the duration: local caches only, no request made.

    They read HF_HUB_OFFLINE at import time into these module constants (datasets before 3.0
    into HF_DATASETS_OFFLINE) and consult the constants at call time; there is no public
    switch."""
    import datasets.config
    from huggingface_hub import constants

    flags = [(constants, "HF_HUB_OFFLINE")] + [
        (datasets.config, name) for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
        if hasattr(datasets.config, name)]
    saved = [getattr(module, name) for module, name in flags]
    for module, name in flags:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(flags, saved, strict=True):
            setattr(module, name, value)


@contextlib.contextmanager
def hub_access(what: str, name: str) -> Iterator[bool]:
    """Around a load of the hub id `name`: yields whether only the local cache is used (the hub
    does not answer); a failure then is one HubUnreachable line ("could not load {what} ...")."""
    reason = hub_unreachable()
    if reason is None:
        yield False
        return
    logger.info("the Hugging Face hub at %s %s: %s %r from the local cache only", _endpoint(),
                reason, what, name)
    try:
        with _offline():
            yield True
    except DataError:
        raise
    except Exception as error:
        logger.debug("loading %s %r from the cache failed: %r", what, name, error)
        raise HubUnreachable(f"could not load {what} {name!r}: the Hugging Face hub at "
                             f"{_endpoint()} {reason} and {name!r} is not in the local cache"
                             ) from None


# ---- the libraries' log lines ----------------------------------------------------------------

class LibraryLogs(logging.Handler):
    """Takes the Hugging Face libraries' records while cl owns the console: errors are kept
    (they name the file that failed; cl reports the failure itself, in one line) and the rest
    are dropped unless cl is verbose (-v), when each goes once through cl's own handlers."""

    def __init__(self, verbose: bool) -> None:
        super().__init__()
        self.verbose = verbose
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:
            self.errors.append(one_line(Exception(record.getMessage())))
        if self.verbose:
            logging.getLogger().handle(record)


@contextlib.contextmanager
def library_logs() -> Iterator[LibraryLogs]:
    """The libraries' loggers routed to one LibraryLogs handler, for the duration."""
    handler = LibraryLogs(verbose=logging.getLogger().getEffectiveLevel() < logging.WARNING)
    saved = []
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        saved.append((library, library.handlers[:], library.propagate))
        library.handlers[:] = [handler]
        library.propagate = False
    try:
        yield handler
    finally:
        for library, handlers, propagate in saved:
            library.handlers[:] = handlers
            library.propagate = propagate


# ---- malformed local files -------------------------------------------------------------------

def _why(error: json.JSONDecodeError) -> str:
    # "Unterminated string starting at": the column follows in cl's message, not after "at".
    return error.msg.removesuffix(" starting at")


def _json_lines_problem(path: Path) -> str | None:
    """The first line that is not a JSON object, as 'line N: why'."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                return f"line {number}, column {error.colno}: not valid JSON ({_why(error)})"
            if not isinstance(row, dict):
                return f"line {number}: a JSON {type(row).__name__}, expected an object"
    return None


def _json_problem(path: Path) -> str | None:
    if path.suffix.lower() == ".jsonl":
        return _json_lines_problem(path)
    # A .json file is one document, or JSON lines under another name.
    text = path.read_text(encoding="utf-8")
    try:
        json.loads(text)
        return None
    except json.JSONDecodeError as whole:
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:
            return (f"line {whole.lineno}, column {whole.colno}: not valid JSON "
                    f"({_why(whole)})")
        return _json_lines_problem(path)


def _csv_problem(path: Path) -> str | None:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    start = 1
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            header = next(reader, None)
            if header is None:
                return None
            start = reader.line_num + 1
            for row in reader:
                if row and len(row) != len(header):
                    return (f"line {start}: {len(row)} fields, but the header has "
                            f"{len(header)}")
                start = reader.line_num + 1
    except csv.Error as error:  # an unclosed quote, a stray quote inside a field
        unclosed = " (a quote is never closed)" if "end of data" in str(error) else ""
        return f"line {start}: {error}{unclosed}"
    return None


def _parquet_problem(path: Path) -> str | None:
    import pyarrow.parquet

    try:
        pyarrow.parquet.ParquetFile(path).close()
    except Exception as error:  # pyarrow's errors: ArrowInvalid, OSError
        return f"not a Parquet file ({one_line(error)})"
    return None


def file_problem(path: Path) -> str | None:
    """What is wrong with one data file ('line N: ...', 'empty file'), or None."""
    try:
        with open(path, "rb") as handle:
            if not handle.read(4096).strip():
                return "empty file"
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            return _json_problem(path)
        if suffix in (".csv", ".tsv"):
            return _csv_problem(path)
        if suffix == ".parquet":
            return _parquet_problem(path)
    except UnicodeDecodeError as error:
        return f"not UTF-8 text (byte {error.start} is {error.object[error.start]:#04x})"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return None


def bad_file(directory: Path) -> str | None:
    """'FILE: what is wrong' for the first malformed data file under `directory`, or None."""
    if directory.is_file():
        files = [directory]
    else:
        files = sorted(path for path in directory.rglob("*")
                       if path.is_file() and path.suffix.lower() in DATA_SUFFIXES
                       and not any(part.startswith(".") for part in
                                   path.relative_to(directory).parts))
    for path in files:
        problem = file_problem(path)
        if problem is not None:
            return f"{path}: {problem}"
    return None


# ---- datasets --------------------------------------------------------------------------------

def load_dataset(source: str, cache_dir: str | os.PathLike | None = None) -> Any:
    """`datasets.load_dataset(source)` from a local path or the hub, every failure one
    DataError line: a missing path, the bad file and line, an unreachable hub."""
    import datasets  # slow to import: only when a dataset is actually loaded

    path = local_path(source)
    cache = None if cache_dir is None else os.fspath(cache_dir)
    with library_logs() as logs:
        try:
            if path is not None:
                return datasets.load_dataset(str(path), cache_dir=cache)
            with hub_access("dataset", source):
                return datasets.load_dataset(source, cache_dir=cache)
        except DataError:
            raise
        except Exception as error:  # malformed, missing, refused: each becomes one line
            failure = error
    if path is not None and (where := bad_file(path)) is not None:
        raise DataError(where)
    if logs.errors:
        # The library's own record names the file it failed on; its exception does not.
        reason = logs.errors[-1]
    else:
        cause = failure.__cause__
        reason = one_line(failure) + (f" ({one_line(cause)})" if cause is not None else "")
    raise DataError(f"could not load dataset {source!r}: {reason}")
