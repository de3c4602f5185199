"""Task functions written for the original dpypeline (its example 1): plain functions, the
first given the file's path, each next one the previous one's result."""

import os

import pandas as pd


def read_csv(path: str) -> pd.DataFrame:
    frame = pd.read_csv(path)
    frame.attrs["filename"] = path.rsplit("/", 1)[1]
    return frame


def convert_fahrenheit_to_celsius(df: pd.DataFrame, col_temp: str) -> pd.DataFrame:
    df[col_temp] = (df[col_temp] - 32) * 5.0 / 9.0
    return df


def write_csv(df: pd.DataFrame, prefix: str) -> None:
    os.makedirs(prefix.rsplit("/", 1)[0], exist_ok=True)
    df.to_csv(os.path.join(prefix, df.attrs["filename"]))
