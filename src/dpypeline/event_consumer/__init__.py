"""The original dpypeline's import path ``dpypeline.event_consumer``: the code lives in
:mod:`dpypeline.legacy.event_consumer`."""

__all__ = ["consumer_parallel", "consumer_serial"]
