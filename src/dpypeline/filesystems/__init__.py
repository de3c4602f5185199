"""The original dpypeline's import path ``dpypeline.filesystems``: the code lives in
:mod:`dpypeline.legacy.filesystems`."""

__all__ = ["object_store"]
