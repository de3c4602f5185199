"""The original's ``retry`` decorator, for task code that used it.

The service already retries a failed job with backoff (``retry:`` in a config); this one
retries a single call inside a task, as it did in the original.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


def retry(
    _func: Callable[..., Any] | None = None, *, max_retries: int = 3, sleep_time: int = 5
) -> Callable[..., Any]:
    """``@retry`` or ``@retry(max_retries=..., sleep_time=...)``: call the function up to
    ``max_retries`` times, ``sleep_time`` seconds apart, then raise ``Exception``."""

    def decorator_retry(
        func: Callable[..., Any], max_retries: int = max_retries, sleep_time: int = sleep_time
    ) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper_retry(*args: Any, **kwargs: Any) -> Any:
            n_retries = 0
            while n_retries < max_retries:
                try:
                    return func(*args, **kwargs)
                except Exception as e:  # noqa: BLE001 - any failure is retried, as it was
                    logger.warning(f"Failed to execute {func.__name__} on attempt {n_retries + 1}.")
                    logger.warning(f"Exception: {e}.")
                    logger.warning(f"Retrying in {sleep_time} seconds.")
                n_retries += 1
                time.sleep(sleep_time)
            raise Exception(f"Failed to execute {func.__name__} after {n_retries} attempts.")

        return wrapper_retry

    if _func is None:
        return decorator_retry
    return decorator_retry(_func, max_retries=max_retries, sleep_time=sleep_time)


__all__ = ["retry"]
