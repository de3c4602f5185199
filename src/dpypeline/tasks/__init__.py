"""Built-in tasks, by the short names a config may use."""

from __future__ import annotations

BUILTINS: dict[str, str] = {
    "create_bucket": "dpypeline.tasks.upload:create_bucket",
    "upload_file": "dpypeline.tasks.upload:upload_file",
}
