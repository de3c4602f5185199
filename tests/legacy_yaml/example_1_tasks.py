"""Task functions in the original dpypeline's style, for its first example (GSOD station
CSVs, TEMP from °F to °C): plain functions, the first given the file's path, each next
one the previous result, keyword arguments from the YAML. They know nothing of dpypeline.
"""

from __future__ import annotations

import os

import pandas as pd


def read_csv(path: str) -> pd.DataFrame:
    frame = pd.read_csv(path)
    frame.attrs["filename"] = os.path.basename(path)
    return frame


def convert_fahrenheit_to_celsius(df: pd.DataFrame, col_temp: str) -> pd.DataFrame:
    df[col_temp] = (df[col_temp] - 32.0) / 1.8
    return df


def write_csv(df: pd.DataFrame, prefix: str) -> None:
    os.makedirs(prefix, exist_ok=True)
    df.to_csv(os.path.join(prefix, df.attrs["filename"]), index=False)
