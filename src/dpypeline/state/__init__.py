"""Durable state: the job ledger, its ready queue and the cache directory they live in."""
