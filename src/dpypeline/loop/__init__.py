"""The loop: a file seen becomes a job in the ledger (``arrivals``, ``intake``), the worker
claims and runs it on an executor, the service drives both, one pass at a time."""
