"""Run parameters: declared with defaults on the pipeline, set per run.

``Pipeline("etl", params={"date": "2013-01-01", "limit": 100})`` declares
them; a run overrides some with :func:`resolve_params` (values from Python,
checked against the default's type) or :func:`parse_params` (``k=v``
strings from the command line, converted to the default's type). Unknown
names and values that do not fit raise :class:`~pipeopt.errors.ParameterError`
naming the parameter, the expected type and the nearest declared name.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pipeopt.errors import ParameterError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


class RunParams(Mapping[str, Any]):
    """The read-only mapping of run parameters a body's ``params`` receives (picklable)."""

    __slots__ = ("_values",)

    def __init__(self, values: Mapping[str, Any] | None = None) -> None:
        self._values = dict(values or {})

    def __getitem__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise _unknown(name, self._values) from None

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def get(self, name: str, default: Any = None) -> Any:
        """Return the value of ``name``, or ``default`` if it is not declared."""
        return self._values.get(name, default)

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"RunParams({self._values!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (RunParams, (self._values,))


def _unknown(name: str, declared: Mapping[str, Any]) -> ParameterError:
    close = difflib.get_close_matches(name, list(declared), n=1, cutoff=0.6)
    if close:
        hint = f"; did you mean {close[0]!r}?"
    elif declared:
        hint = f"; declared: {', '.join(sorted(declared))}"
    else:
        hint = "; the pipeline declares none (Pipeline(name, params={...}))"
    return ParameterError(f"unknown parameter {name!r}{hint}", name, close[0] if close else None)


def _type_name(default: Any) -> str:
    return type(default).__name__


def _fits(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float)
    if isinstance(default, dt.datetime):
        return isinstance(value, dt.datetime)
    return isinstance(value, type(default))


def resolve_params(declared: Mapping[str, Any], given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return the declared parameters with ``given`` values applied.

    Raises:
        ParameterError: a name is not declared, or a value's type does not
            match its default's (an ``int`` default takes ints, a ``float``
            default ints or floats; a ``None`` default takes anything).
    """
    values = dict(declared)
    for name, value in (given or {}).items():
        if name not in declared:
            raise _unknown(name, declared)
        default = declared[name]
        if not _fits(default, value):
            raise ParameterError(
                f"parameter {name!r} must be {_type_name(default)} like its default "
                f"{default!r}, got {type(value).__name__} {value!r}",
                name,
            )
        values[name] = float(value) if isinstance(default, float) else value
    return values


def parse_flag(text: str) -> bool:
    """Return the truth of a yes/no text (``1``, ``true``, ``yes``, ``on`` and their opposites).

    Raises:
        ValueError: any other text.
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"use one of {', '.join(_TRUE + _FALSE)}, got {text!r}")


def convert(name: str, default: Any, text: str) -> Any:
    """Return ``text`` converted to the type of ``default``.

    Raises:
        ParameterError: the text does not read as that type.
    """
    try:
        if default is None or isinstance(default, str):
            return text
        if isinstance(default, bool):
            return parse_flag(text)
        if isinstance(default, int | float):
            return type(default)(text)
        if isinstance(default, dt.datetime):
            return dt.datetime.fromisoformat(text)
        if isinstance(default, dt.date):
            return dt.date.fromisoformat(text)
        if isinstance(default, pathlib.PurePath):
            return type(default)(text)
        if isinstance(default, list | dict):
            value = json.loads(text)
            if not isinstance(value, type(default)):
                raise ValueError(f"JSON {type(value).__name__}, not {_type_name(default)}")
            return value
    except ValueError as exc:
        reason = str(exc).split("\n", 1)[0]
        raise ParameterError(
            f"parameter {name!r} must be {_type_name(default)} like its default "
            f"{default!r}; {text!r} is not ({reason})",
            name,
        ) from None
    raise ParameterError(
        f"parameter {name!r} has a default of type {_type_name(default)}, "
        "which cannot be set from text; use str, int, float, bool, date, datetime, "
        "path, list or dict defaults",
        name,
    )


def parse_params(declared: Mapping[str, Any], pairs: Iterable[str]) -> dict[str, Any]:
    """Return the values of ``KEY=VALUE`` strings, converted to their defaults' types.

    Raises:
        ParameterError: a pair has no ``=``, names an undeclared parameter,
            or its value does not convert.
    """
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ParameterError(f"--param takes KEY=VALUE, got {pair!r}", name or pair, None)
        if name not in declared:
            raise _unknown(name, declared)
        values[name] = convert(name, declared[name], text)
    return values


def show_value(value: Any) -> str:
    """Return a short text of a parameter value for listings."""
    text = value.isoformat() if isinstance(value, dt.date) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


__all__ = ["RunParams", "convert", "parse_flag", "parse_params", "resolve_params", "show_value"]
