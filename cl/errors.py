"""The errors cl raises on purpose, each carrying one line for the user."""


def one_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): what a
    one-line error report quotes of an exception from a library."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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
