"""Durations as operators write them (``500ms``, ``2s``, ``10m``, ``2h``, ``1d``), in seconds.

Every time setting in the pipeline file goes through :func:`parse_duration`, so one
spelling works everywhere and one error message explains the accepted forms.
"""

from __future__ import annotations

import math
import re
from typing import Annotated

from pydantic import BeforeValidator

__all__ = ["Duration", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"(?P<number>\d+(?:\.\d*)?|\.\d+)\s*(?P<unit>ms|s|m|h|d)?")
_HINT = "use e.g. 500ms, 2s, 10m, 2h"


def parse_duration(value: str | int | float) -> float:
    """Return *value* in seconds; a plain number (or numeric string) already is seconds.

    Raises ValueError naming the value and the accepted forms, so that the config
    loader can pass the message on unchanged.
    """
    if isinstance(value, bool):  # YAML turns "yes"/"on" into True; that is no duration
        raise ValueError(f"not a duration: {value!r} ({_HINT})")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _PATTERN.fullmatch(value.strip())):
        seconds = float(match["number"]) * _UNITS[match["unit"] or "s"]
    else:
        raise ValueError(f"not a duration: {value!r} ({_HINT})")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a duration: {value!r} (must be zero or positive; {_HINT})")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""A pydantic field type: seconds as float, written in the config as ``2s``, ``10m`` …"""
