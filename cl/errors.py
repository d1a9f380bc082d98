"""The errors cl raises on purpose, each carrying one line for the user."""

import re

# What torch's allocators say when they run out: the CPU one, CUDA's and MPS's.
ALLOCATION_FAILED = re.compile(r"can't allocate|cannot allocate|out of memory|failed to allocate",
                               re.IGNORECASE)


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what a
    one-line error report quotes of an exception from a library."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def out_of_memory(error: BaseException) -> str | None:
    """For an allocation that failed (Python's MemoryError, torch's CPU allocator, CUDA out of
    memory): what was asked for, e.g. " (80.0 GB asked for one tensor)", or "" when the error
    does not say. None for any other error."""
    text = str(error)
    if not isinstance(error, MemoryError) and not (
            isinstance(error, RuntimeError) and ALLOCATION_FAILED.search(text)):
        return None
    cpu = re.search(r"allocate (\d+) bytes", text)
    if cpu:
        return f" ({int(cpu.group(1)) / 1e9:,.1f} GB asked for one tensor)"
    cuda = re.search(r"Tried to allocate ([\d.]+ [KMGT]i?B)", text)
    return f" ({cuda.group(1)} asked for one tensor)" if cuda else ""


class ClError(Exception):
    """Base of cl's deliberate errors: the message is one line meant for the user."""

    exit_code = 1


class UsageError(ClError):
    """Bad input: an unknown name, a bad value, a missing or malformed file. The CLI exits 2."""

    exit_code = 2


class DataError(UsageError):
    """A data file or dataset that is missing, unreadable or not in the expected layout."""


class DivergenceError(ClError):
    """A NaN or infinite loss: training stopped at the named task and step."""
