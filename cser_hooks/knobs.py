"""Validation of integer knobs, shared by every state (a bad value gets an error naming the fix).

``int(2.5)`` is 2: a ``period=2.5`` used to reset every 2 steps without a word. Integer knobs take
ints (or integral floats such as ``4.0``, and NumPy integers); anything else is a ``ValueError``
that names the state, the knob, the value and the valid range.
"""
from __future__ import annotations

import numbers


def integer_knob(who: str, name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int, or a ValueError naming ``who``'s knob ``name`` and its valid range."""
    valid = f"an integer >= {minimum}" if minimum is not None else "an integer"
    integral = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"{who}: {name} must be {valid}, got {value!r}")
    v = int(value)
    if minimum is not None and v < minimum:
        raise ValueError(f"{who}: {name} must be {valid}, got {value!r}")
    return v
