"""Errors that name the user's mistake (the CLI prints them as one line and exits with 2)."""

from __future__ import annotations

import math


class SettingsError(ValueError):
    """A setting outside its valid range; the message names the setting and the range."""


def check_number(name: str, value, *, positive: bool = False, nonnegative: bool = False,
                 integer: bool = False, low=None, high=None, low_open: bool = False) -> float:
    """Return ``value`` as a float (int if ``integer``) after checking it is a finite number in
    range; raises SettingsError "setting NAME = VALUE: must be …"."""
    def bad(why):
        return SettingsError(f"setting {name} = {value!r}: must be {why}")

    if isinstance(value, (bool, str, bytes)):
        raise bad("a number")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise bad("a number") from None
    if not math.isfinite(v):
        raise bad("a finite number")
    if integer:
        if v != int(v):
            raise bad("a whole number")
        v = int(v)
    if positive and v <= 0:
        raise bad("> 0")
    if nonnegative and v < 0:
        raise bad("≥ 0")
    if low is not None and high is not None:
        rng = f"in {'(' if low_open else '['}{low}, {high}]"
    else:
        rng = f"{'>' if low_open else '≥'} {low}" if low is not None else f"≤ {high}"
    if (low is not None and (v <= low if low_open else v < low)) or (high is not None and v > high):
        raise bad(rng)
    return v
