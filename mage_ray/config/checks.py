"""Field checks shared by the config sections: each raises :class:`ConfigError` naming the field, the bad value
and what is allowed."""

from __future__ import annotations

import math
from typing import Any


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config field '{name}' = {value!r} is invalid: expected {allowed}")


def _check_range(
    name: str,
    value: float,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "a finite number")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        _fail(
            name,
            value,
            f"a number {'>' if lo_open else '>='} {lo}"
            + (f" and {'<' if hi_open else '<='} {hi}" if hi is not None else ""),
        )
    if hi is not None and (value > hi or (hi_open and value == hi)):
        _fail(
            name,
            value,
            f"a number {'<' if hi_open else '<='} {hi}"
            + (f" and {'>' if lo_open else '>='} {lo}" if lo is not None else ""),
        )


def _check_grid_step(name: str, value: float) -> None:
    """A simplex-lattice step must divide 1 (1/k: 0.5, 0.25, 0.2, 0.1, ...), or the grid misses the vertices."""
    _check_range(name, value, 0, 1, lo_open=True)
    k = round(1.0 / value)
    if abs(k * value - 1.0) > 1e-9:
        _fail(name, value, f"a step that divides 1, i.e. 1/k for an integer k (e.g. {1 / max(k, 1):g})")


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        _fail(name, value, f"one of {list(choices)}")
