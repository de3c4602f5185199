"""The commands beside ``run``: ``status``, ``jobs``, ``validate`` and ``ledger``."""
