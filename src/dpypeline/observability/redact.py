"""The secret values a pipeline knows of, so that the log can blank them out.

Tracebacks no longer carry frame locals, and errors made here never echo credentials; this
is the last defence for whatever still quotes one (a library's error message, a task that
logs its options): every rendered log line is scrubbed of these values (``logs``).

Known secrets: the token and secret of each objectstore's credentials file, the values of
secret-looking keys anywhere in a task's ``with:`` (``storage_options: {key, secret,
token}``, ``aws_secret_access_key`` ...), and ``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``
(and the key id beside them) from the environment.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from dpypeline.config.credentials import load_credentials
from dpypeline.config.model import PipelineConfig
from dpypeline.errors import ConfigError

MIN_LENGTH = 6  # shorter values would blank out ordinary words; no real secret is this short
ENV_SECRETS = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_SECRET_KEY = re.compile(r"(^|_)(key|secret|token|password|passwd)(_id)?$", re.I)
MASK = "<redacted>"


def known_secrets(config: PipelineConfig, environ: Mapping[str, str] = os.environ) -> list[str]:
    """Every secret value the pipeline may handle, longest first (so that a secret that
    contains another is blanked whole)."""
    found = {environ.get(name, "") for name in ENV_SECRETS}
    for task in (*config.setup, *(t for job in config.jobs for t in job.tasks)):
        found.update(_secret_values(task.with_))
    found.update(_credential_files(config))
    return sorted((s for s in found if len(s) >= MIN_LENGTH), key=len, reverse=True)


def _secret_values(value: Any, secret: bool = False) -> Iterator[str]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _secret_values(item, secret or bool(_SECRET_KEY.search(str(key))))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _secret_values(item, secret)
    elif secret and isinstance(value, str):
        yield value


def _credential_files(config: PipelineConfig) -> Iterator[str]:
    for name, store in config.objectstores.items():
        if store.credentials is None:
            continue
        try:
            creds = load_credentials(name, store, environ={})
        except ConfigError:
            continue  # not readable now: the service refuses it elsewhere, with the reason
        yield creds.key
        yield creds.secret


class Scrubber:
    """Replaces each known secret in a text: as written, as JSON escapes it and as repr()
    does (the console's key=value pairs)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        forms: dict[str, None] = {}
        for secret in secrets:
            forms[secret] = None
            forms[json.dumps(secret)[1:-1]] = None
            forms[repr(secret)[1:-1]] = None
        self._pattern = (
            re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))
            if forms
            else None
        )

    def __call__(self, text: str) -> str:
        if self._pattern is None:
            return text
        return self._pattern.sub(MASK, text)
