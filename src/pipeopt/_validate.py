"""Small argument validators shared by the public constructors.

Each raises with a message naming the parameter, the rule and the bad value,
as in ``chunk_size must be an integer >= 1, got 0``.
"""

from __future__ import annotations

import math


def check_int(name: str, value: object, *, minimum: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` (not ``bool``) at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        rule = f"an integer >= {minimum}" if minimum is not None else "an integer"
        raise TypeError(f"{name} must be {rule}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_float(
    name: str,
    value: object,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_minimum: bool = False,
) -> float:
    """Return ``value`` as a finite float within the given bounds.

    ``strict_minimum`` makes the lower bound exclusive (``> minimum``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None:
        too_small = number <= minimum if strict_minimum else number < minimum
        if too_small:
            op = ">" if strict_minimum else ">="
            raise ValueError(f"{name} must be {op} {minimum:g}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be <= {maximum:g}, got {value!r}")
    return number
