"""Built-in tasks, by the short names a config may use."""

from __future__ import annotations

BUILTINS: dict[str, str] = {}
