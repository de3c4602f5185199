"""File paths as Linux has them: bytes, whatever they hold.

A file name is any run of bytes but ``/`` and NUL; it need not be valid UTF-8. Python hands
such a name over as a ``str`` in which each byte that does not decode is a lone surrogate
(``os.fsdecode``, "surrogateescape"), and that ``str`` opens the real file. dpypeline keeps
paths in that form everywhere in the process and converts at the two edges that cannot
take a lone surrogate:

- the ledger (SQLite encodes ``str`` as strict UTF-8): :func:`to_db` gives the path's bytes,
  stored as TEXT (``CAST(? AS TEXT)``) so the column holds exactly the bytes of the file
  name, and :func:`from_db` reads them back. A valid UTF-8 path is stored byte for byte
  as it always was, so databases written before keep matching the same files;
- what people read (logs, ``dpypeline jobs``, error texts): :func:`shown` writes each byte
  that does not decode as ``\\xNN`` (``bad\\xff.dat``).

And one rule for opening: :func:`refusal` says why a path must not be opened as a job's
input (a symbolic link on a watch that does not follow them, anything but a regular file).
"""

from __future__ import annotations

import os
import stat

__all__ = ["from_db", "refusal", "shown", "to_db"]


def to_db(path: str) -> bytes:
    """The bytes of ``path``, to bind as ``CAST(? AS TEXT)``."""
    return path.encode("utf-8", "surrogateescape")


def from_db(raw: bytes) -> str:
    """SQLite's TEXT bytes as ``str``, undecodable bytes as surrogates (the ledger's
    ``text_factory``): the inverse of :func:`to_db`, and plain UTF-8 decoding otherwise."""
    return raw.decode("utf-8", "surrogateescape")


def shown(text: str) -> str:
    """``text`` for people and for strict UTF-8 sinks: undecodable bytes as ``\\xNN``.
    Text without them comes back unchanged (the same object)."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


def refusal(path: str, *, follow_symlinks: bool) -> str | None:
    """Why ``path`` must not be opened as a job's input, or None when it may.

    Checked right before a job runs, not only when the file was noticed: a name can be
    replaced by a symbolic link (to the service's own credentials, say) at any time. A link
    anywhere in the path counts, not only in its last component, since the path is the
    one the watch found under its (resolved) root. Raises FileNotFoundError when the path
    is gone."""
    st = os.lstat(path)
    if not follow_symlinks:
        if stat.S_ISLNK(st.st_mode):
            return (
                "a symbolic link; links are not followed"
                " (set follow_symlinks: true on the watch to process them)"
            )
        if os.path.realpath(path) != os.path.normpath(path):
            return (
                "its path goes through a symbolic link; links are not followed"
                " (set follow_symlinks: true on the watch to process them)"
            )
    else:
        st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None
