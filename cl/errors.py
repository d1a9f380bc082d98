"""The errors cl raises on purpose, each carrying one line for the user."""


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
