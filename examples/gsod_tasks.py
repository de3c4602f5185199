"""Tasks of the GSOD example: the original dpypeline's first example (read a NOAA Global
Surface Summary of the Day CSV, convert TEMP from °F to °C, write one CSV per input).

Plain functions: the first receives the file path, each next one the previous result.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from dpypeline import JobContext, LocalPath
from dpypeline.errors import PermanentError

MISSING_TEMP = 9999.9  # GSOD's marker for "no temperature that day"


def read_csv(path: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise PermanentError(f"{path} is not a readable CSV file: {exc}") from exc


def to_celsius(df: pd.DataFrame, col: str = "TEMP") -> pd.DataFrame:
    if col not in df.columns:
        raise PermanentError(f"no column {col!r} (columns: {', '.join(df.columns)})")
    out = df.copy()
    temp = out[col].where(out[col] != MISSING_TEMP)
    out[col] = ((temp - 32.0) * 5.0 / 9.0).round(2)
    return out


def write_csv(df: pd.DataFrame, output_dir: LocalPath, context: JobContext) -> str:
    """Write next to the same relative path under ``output_dir``, atomically (a temp name,
    then rename), so a crash never leaves a half-written output behind."""
    target = Path(output_dir) / context.relpath
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, target)
    return str(target)
