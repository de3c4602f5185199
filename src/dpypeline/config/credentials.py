"""The credentials of a named object store: from its ``credentials`` file or from the AWS
environment variables, never echoed.

The file is the original dpypeline's JSON (``token`` is the access key id). It must be a
regular file private to the service's user and owned by it (or root); it is opened without
following a FIFO into a hang, and no message made here quotes its content (a JSON error
carries the document).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from dpypeline.config.model import ObjectStoreConfig
from dpypeline.config.trust import refuse_foreign_writers
from dpypeline.errors import ConfigError

__all__ = ["ENV_HINT", "FILE_FORMAT", "SOURCE_VARIABLE", "Credentials", "load_credentials"]

# Set by the units (and by the operators' command) to the file systemd copies into
# $CREDENTIALS_DIRECTORY: an error about the copy then names the file the operator edits.
SOURCE_VARIABLE = "DPYPELINE_CREDENTIALS_SOURCE"
FILE_FORMAT = '{"token": ACCESS_KEY_ID, "secret": SECRET_KEY, "endpoint_url": "https://…"}'
ENV_HINT = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


@dataclass(frozen=True, repr=False)
class Credentials:
    """An access key pair and where to use it; ``source`` says where it came from."""

    key: str
    secret: str = field(repr=False)
    endpoint_url: str | None = None
    region: str | None = None
    source: str = f"the environment ({ENV_HINT})"

    def __repr__(self) -> str:
        return (
            f"Credentials(key={_mask(self.key)!r}, secret=<hidden>, "
            f"endpoint_url={self.endpoint_url!r}, region={self.region!r}, source={self.source!r})"
        )

    __str__ = __repr__


def _mask(key: str) -> str:
    shown = key[:4] if len(key) >= 12 else ""
    return f"{shown}…({len(key)} chars)"


def load_credentials(
    name: str, cfg: ObjectStoreConfig, environ: Mapping[str, str] = os.environ
) -> Credentials:
    """The credentials of objectstore *name*: from its ``credentials`` file (the original
    dpypeline's JSON, ``token`` being the access key id), else from the AWS environment
    variables. The config's ``endpoint_url``/``region`` win over the file's.

    Raises ConfigError naming the objectstore and the file, never echoing its content.
    """
    if cfg.credentials is not None:
        found = _read_file(name, Path(cfg.credentials), environ)
    else:
        key, secret = environ.get("AWS_ACCESS_KEY_ID"), environ.get("AWS_SECRET_ACCESS_KEY")
        if not key or not secret:
            raise ConfigError(
                f"objectstore '{name}' has no credentials: set its `credentials:` to a JSON file"
                f" {FILE_FORMAT}, or set {ENV_HINT} in the service's environment"
            )
        found = Credentials(
            key,
            secret,
            environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"),
            environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"),
        )
    return replace(
        found,
        endpoint_url=cfg.endpoint_url or found.endpoint_url,
        region=cfg.region or found.region,
    )


def _read_file(name: str, path: Path, environ: Mapping[str, str]) -> Credentials:
    where = f"objectstore '{name}': credentials file {path}"
    try:  # O_NONBLOCK: a FIFO in its place must not hang start-up
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(
            f"{where} does not exist (under systemd, LoadCredential= puts it in"
            " $CREDENTIALS_DIRECTORY)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where} cannot be read: {exc.strerror}") from None
    st = os.fstat(fd)  # the file we read, not whatever the name points to now
    if not stat.S_ISREG(st.st_mode):  # before fdopen, which refuses a directory itself
        os.close(fd)
        raise ConfigError(f"{where} is not a regular file")
    with os.fdopen(fd, "rb") as stream:
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{where} is accessible by group or others (mode {mode:04o}); a secret must be"
                f" private to the service's user: run `chmod 600 {path}`, or let systemd hand"
                " the service a private copy with LoadCredential="
            )
        refuse_foreign_writers(  # whoever owns it can make it readable, or change it
            path,
            st,
            f"objectstore '{name}': credentials file",
            "its keys and endpoint decide where the service's data goes",
        )
        raw = stream.read()
    if not raw.strip():
        raise ConfigError(_empty(name, path, environ))
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        at = f" (line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        # "from None": a JSONDecodeError carries the whole document, secret included
        raise ConfigError(f"{where} is not valid JSON{at}; expected {FILE_FORMAT}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where} is not a JSON object; expected {FILE_FORMAT}")
    missing = [k for k in ("token", "secret") if not (isinstance(data.get(k), str) and data[k])]
    if missing:
        raise ConfigError(
            f"{where} lacks {' and '.join(missing)} (non-empty strings); expected {FILE_FORMAT}"
        )
    optional = {k: data.get(k) for k in ("endpoint_url", "region")}
    wrong = [k for k, v in optional.items() if v is not None and not isinstance(v, str)]
    if wrong:
        raise ConfigError(f"{where}: {', '.join(wrong)} must be a string")
    return Credentials(
        data["token"], data["secret"], optional["endpoint_url"], optional["region"], str(path)
    )


def _empty(name: str, path: Path, environ: Mapping[str, str]) -> str:
    """What to say about an empty file. The units hand over an empty default (SetCredential=)
    when the real file is missing, so that a pipeline without an object store still starts:
    for that copy, the file to fill in is the one the units name in SOURCE_VARIABLE."""
    given, source = environ.get("CREDENTIALS_DIRECTORY"), environ.get(SOURCE_VARIABLE)
    fix = f"put {FILE_FORMAT} in it (mode 0600, owned by root), then restart the service"
    if given and source and path.parent == Path(given):
        return (
            f"objectstore '{name}': the credentials file {source} (handed over by systemd as"
            f" $CREDENTIALS_DIRECTORY/{path.name}) is missing or empty: {fix}"
        )
    return f"objectstore '{name}': credentials file {path} is empty; expected {FILE_FORMAT}"
