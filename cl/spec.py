"""The `name` / `name:key=value,key=value` grammar of `--strategy` and `--tasks`, and its typing.

Values are strings on the command line; `parse_config` turns them into a frozen config dataclass
by the types of its fields, so each strategy validates its own values in `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union

from cl.errors import UsageError

TRUE_WORDS = {"true", "yes", "on", "1"}
FALSE_WORDS = {"false", "no", "off", "0"}


def parse_spec(spec: str) -> tuple[str, dict[str, str]]:
    """`"replay:capacity=200,policy=reservoir"` -> `("replay", {"capacity": "200", ...})`.

    A value may itself hold `=` (`lr_mult=head=10`): the key ends at the first one.
    """
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name:
        raise UsageError(f"empty name in spec {spec!r}")
    params: dict[str, str] = {}
    if rest.strip():
        for item in rest.split(","):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise UsageError(f"bad setting {item.strip()!r} in {spec!r}: expected key=value")
            if key in params:
                raise UsageError(f"setting {key!r} given twice in {spec!r}")
            params[key] = value.strip()
    return name, params


def format_spec(name: str, params: dict[str, Any]) -> str:
    """The inverse of `parse_spec`, for configs written back to disk."""
    if not params:
        return name
    return name + ":" + ",".join(f"{key}={value}" for key, value in params.items())


def _convert(value: Any, annotation: Any, where: str) -> Any:
    """Convert a CLI string (or an already typed value from a config file) to `annotation`.

    Settings are scalars or flat lists of them: a table (a config file's `[strategy]`), or a
    list where a scalar belongs (`hidden = [[0]]`), is refused here, as is a number that is
    not finite (no setting means anything at NaN or infinity)."""
    if isinstance(value, dict):
        raise UsageError(f"bad value for {where}: expected {_expected(annotation)}, "
                         f"got a table {value!r}")
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = typing.get_args(annotation)
        if type(None) in options and (value is None or str(value).lower() in ("none", "null")):
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except UsageError as error:
                errors.append(str(error))
        raise UsageError(errors[0] if errors else f"bad value {value!r} for {where}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise UsageError(f"bad value {value!r} for {where} "
                             f"(choose from: {', '.join(map(str, allowed))})")
        return value
    if isinstance(value, (list, tuple)) and origin is not tuple:
        raise UsageError(f"bad value {value!r} for {where}: expected {_expected(annotation)}, "
                         "not a list")
    if origin is tuple:
        item_type = typing.get_args(annotation)[0]
        items = value if isinstance(value, (list, tuple)) else [
            part for part in str(value).split("|") if part.strip()]
        return tuple(_convert(item.strip() if isinstance(item, str) else item, item_type, where)
                     for item in items)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        word = str(value).lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise UsageError(f"bad value {value!r} for {where}: expected true or false")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise UsageError(f"bad value {value!r} for {where}: expected a number")
        try:
            number = annotation(value)
        except (TypeError, ValueError):
            kind = "an integer" if annotation is int else "a number"
            raise UsageError(f"bad value {value!r} for {where}: expected {kind}") from None
        if annotation is int and isinstance(value, float) and number != value:
            raise UsageError(f"bad value {value!r} for {where}: expected an integer")
        if annotation is float and not math.isfinite(number):
            raise UsageError(f"bad value {value!r} for {where}: expected a finite number")
        return number
    if annotation is str:
        return str(value)
    return value


def _expected(annotation: Any) -> str:
    """What a value of `annotation` looks like, for error lines."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(option) for option in typing.get_args(annotation)
                           if option is not type(None))
    if origin is tuple:
        return f"a list ({_expected(typing.get_args(annotation)[0])} each)"
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(annotation)))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"
            }.get(annotation, getattr(annotation, "__name__", str(annotation)))


def parse_config(config_class: type, params: dict[str, Any], owner: str) -> Any:
    """Build `config_class` from `params`, converting each value to its field's type.

    Unknown keys and bad values raise a UsageError naming the key, the value and `owner`; the
    dataclass's own `__post_init__` checks (ValueError) are turned into UsageErrors too.
    """
    hints = typing.get_type_hints(config_class)
    fields = {field.name for field in dataclasses.fields(config_class) if field.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise UsageError(f"unknown setting {unknown[0]!r} for {owner} (known: {known})")
    values = {key: _convert(value, hints[key], f"{owner} setting {key!r}")
              for key, value in params.items()}
    try:
        return config_class(**values)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{owner}: {error}") from None
