"""The original dpypeline's import path ``dpypeline.etl_pipeline``: the code lives in
:mod:`dpypeline.legacy.etl_pipeline`."""

__all__ = ["core", "thread_pipeline"]
