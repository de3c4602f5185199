"""The original's modules that have no counterpart here: importing one names what
replaced it, rather than a bare ``ModuleNotFoundError``.

They are the original's command line, ``dpypeline.cli.*`` (its ``-i`` entry point, argument
parser and the YAML loader that built objects from tags). Here ``dpypeline.cli`` is this
dpypeline's command line, a module; it declares an empty package path so that importing a
submodule of it reaches :class:`Finder`, which answers with the replacement.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType

_TAGGED = (
    "the tagged YAML is no longer built into Python objects: `dpypeline -i FILE` runs it as"
    " it is and `dpypeline migrate FILE -o NEW.yaml` converts it; from Python,"
    " dpypeline.Pipeline.from_yaml('NEW.yaml').run() (see docs/migrating.md)"
)
REPLACED = {
    "dpypeline.cli.main_cli": (
        "the original's command line is `dpypeline -i FILE` (or `--input FILE`), as before;"
        " from Python, dpypeline.cli.main(['-i', 'FILE'])"
    ),
    "dpypeline.cli.argument_parser": (
        "the command line's options are `dpypeline --help`; from Python,"
        " dpypeline.cli.main([...]) takes the same arguments"
    ),
    "dpypeline.cli.yaml_loader": _TAGGED,
    "dpypeline.cli.yaml_constructors": _TAGGED,
    "dpypeline.cli.yaml_executers": _TAGGED,
}
PACKAGE = "dpypeline.cli"


class Finder:
    """On ``sys.meta_path``: a submodule of ``dpypeline.cli`` is the original's, and gone."""

    @staticmethod
    def find_spec(
        fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not fullname.startswith(PACKAGE + "."):
            return None
        instead = REPLACED.get(
            fullname, "the original's command line is `dpypeline -i FILE`, as before"
        )
        raise ModuleNotFoundError(
            f"{fullname} was the original dpypeline's and is not in this one: {instead}"
        )  # no name=: `from dpypeline.cli import main_cli` would hide this message


def install(cli: ModuleType) -> None:
    """Make ``cli`` (dpypeline.cli) answer for the original's submodules of it."""
    cli.__path__ = []  # submodules are looked for, and found by Finder
    if not any(isinstance(f, Finder) for f in sys.meta_path):
        sys.meta_path.append(Finder())


__all__ = ["REPLACED", "Finder", "install"]
