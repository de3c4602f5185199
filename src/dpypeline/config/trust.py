"""Who may change what the service runs: the config, the task modules and the credentials.

The config names the code the service runs (a task is any importable function), so whoever
can write the config or a task module runs code as the service's user, and whoever can
write the credentials file chooses where the data goes. dpypeline cannot stop that user's
own mistakes, but it refuses to take any of these files from someone else: a file that the
group or others can write, or that belongs to another user than the service's (root
excepted), stops start-up with the ``chmod``/``chown`` that fixes it. Modules of the Python
installation itself (the standard library, site-packages, dpypeline) are trusted as
installed.

Standard functions that run their argument as a command or as Python code (``os.system``,
``subprocess.run``, ``eval``, ...) are refused as tasks too: a task's first argument is the
name of a file that arrived, so such a task would run every arriving file's name as code.
"""

from __future__ import annotations

import builtins
import importlib
import importlib.util
import os
import pty
import pwd
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from dpypeline.errors import ConfigError

__all__ = ["import_checked", "refuse_foreign_writers", "refuse_process_spawning"]

RUNS_AS_SERVICE = "what it says runs as the service's user"

# the functions of the standard library that run a command line or start a program
_SPAWNING_OS = (
    "system",
    "popen",
    "execl",
    "execle",
    "execlp",
    "execlpe",
    "execv",
    "execve",
    "execvp",
    "execvpe",
    "spawnl",
    "spawnle",
    "spawnlp",
    "spawnlpe",
    "spawnv",
    "spawnve",
    "spawnvp",
    "spawnvpe",
    "posix_spawn",
    "posix_spawnp",
)


def refuse_foreign_writers(
    path: str | os.PathLike[str], st: os.stat_result, what: str, why: str = RUNS_AS_SERVICE
) -> None:
    """ConfigError if anyone but the service's user (or root) can change the file *path*
    (whose ``stat`` is *st*): its content becomes code or secrets of the service. *what*
    names the file's role, *why* says why that matters."""
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        who = " and ".join(w for b, w in ((0o020, "its group"), (0o002, "others")) if mode & b)
        raise ConfigError(
            f"{what} {path} can be written by {who} (mode {mode:04o}), and {why}:"
            f" run `chmod go-w {path}`"
        )
    me = os.geteuid()
    if st.st_uid not in (0, me):
        owners = " or ".join(f"`chown {u} {path}`" for u in dict.fromkeys((_user(me), "root")))
        raise ConfigError(
            f"{what} {path} belongs to {_user(st.st_uid)}, not to the service's user"
            f" ({_user(me)}) or root, and {why}: once you trust its content, run {owners}"
        )


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@cache
def _installed() -> tuple[str, ...]:
    """The directories of the Python installation and of dpypeline itself."""
    dirs = {str(Path(__file__).resolve().parent)}
    for vars_ in ({}, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=vars_)
        dirs.update(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs)


def _check_module_file(name: str, what: str) -> None:
    """Refuse the source file of module *name* (not yet imported) if others can change it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return  # import_module says what is wrong
    origin = spec.origin if spec is not None and spec.has_location else None
    if origin is None:
        return
    real = os.path.realpath(origin)
    if real.startswith(_installed()):
        return
    try:
        st = os.stat(real)
    except OSError:
        return  # import_module says what is wrong
    refuse_foreign_writers(origin, st, what)


def import_checked(module_name: str, what: str = "task module") -> ModuleType:
    """``importlib.import_module``, but each module of the dotted path that is not yet
    imported is checked before it runs (:func:`refuse_foreign_writers`) unless it belongs
    to the Python installation or to dpypeline. *what* names the module's role."""
    parts = module_name.split(".")
    for end in range(1, len(parts) + 1):
        name = ".".join(parts[:end])
        if name not in sys.modules:
            _check_module_file(name, what)
        importlib.import_module(name)
    return sys.modules[module_name]


@cache
def _spawning() -> tuple[Callable[..., Any], ...]:
    found: list[Any] = [getattr(os, name) for name in _SPAWNING_OS if hasattr(os, name)]
    found += [
        subprocess.run,
        subprocess.call,
        subprocess.check_call,
        subprocess.check_output,
        subprocess.getoutput,
        subprocess.getstatusoutput,
        subprocess.Popen,
        pty.spawn,
        builtins.eval,
        builtins.exec,
    ]
    return tuple(found)


def refuse_process_spawning(func: Any, name: str) -> None:
    """ConfigError if the task *name* is a standard function that runs its argument as a
    command, a program or Python code: it would run the name of every file that arrives."""
    if any(func is spawn for spawn in _spawning()):
        raise ConfigError(
            f"{name!r} runs its argument as a command, a program or Python code, and a task's"
            " first argument is the name of the file that arrived: file names would run as"
            " code. Write a task function that builds the command itself (a list of"
            " arguments, no shell) and name that function instead"
        )
