"""Durable state: the job ledger in SQLite (one row per job, its state the queue) and the
cache directory it lives in."""
