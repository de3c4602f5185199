"""The original dpypeline's import path ``dpypeline.akita``: the code lives in
:mod:`dpypeline.legacy.akita`."""

__all__ = ["core", "directory_state", "event_handler", "factory", "queue_events"]
