"""``dpypeline ledger backup | restore | reset``: the operator's hands on the ledger itself.

A ledger that is damaged or lost is refused (exit 4) rather than silently started afresh;
these are the ways on that the refusal names, and the consistent backup that makes the
first of them possible (see deploy/OPERATING.md, "When the ledger is refused").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dpypeline.config.model import PipelineConfig
from dpypeline.state import copies
from dpypeline.state.integrity import BACKUP

EXIT_OK = 0  # cli's
CONFIG_HELP = "pipeline YAML (default: $DPYPELINE_CONFIG, then ./pipeline.yaml)"


def add_parser(command: argparse.ArgumentParser) -> None:
    actions = command.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help, file in (
        ("backup", "copy the ledger consistently, also while the service runs", "DEST"),
        ("restore", "put a copy in place of the ledger (the service stopped)", "FILE"),
        ("reset", "start over with an empty ledger: every file is processed again", None),
    ):
        action = actions.add_parser(name, help=help, description=help)
        # -c after the action too; not set there, it leaves the one given before alone
        action.add_argument("-c", "--config", default=argparse.SUPPRESS, help=CONFIG_HELP)
        if file == "DEST":
            default = f"default: CACHE_DIR/{BACKUP}"
            action.add_argument("file", nargs="?", metavar=file, help=default)
        elif file:
            action.add_argument("file", metavar=file)


def cmd_ledger(config: PipelineConfig, args: argparse.Namespace) -> int:
    cache_dir = config.cache_dir
    if args.action == "backup":
        dest = copies.backup(cache_dir, Path(args.file) if args.file else None)
        print(f"ledger of {config.name} copied to {dest}")
        return EXIT_OK
    if args.action == "restore":
        aside = copies.restore(cache_dir, Path(args.file))
        print(f"ledger of {config.name} restored from {args.file}{_kept(aside)}")
        return EXIT_OK
    aside = copies.reset(cache_dir)
    print(
        f"ledger of {config.name} started over: every file present is processed again when"
        f" the service starts{_kept(aside)}"
    )
    return EXIT_OK


def _kept(aside: Path | None) -> str:
    return f"; the ledger it replaced is in {aside}" if aside is not None else ""
