"""`tctl`: the administrator's command line.

Each subcommand lives in its own module in this package and exposes
`register(subparsers) -> None`, which adds its parser and sets `func` to a callable taking the
parsed arguments and returning the exit code. Exit codes: 0 success, 1 the input or the
state is wrong (lint errors, refused bundle), 2 usage or I/O errors.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from transport.process import run_command

# Subcommand modules, in the order `tctl --help` lists them.
SUBCOMMANDS = ["lint", "auth", "status", "reconcile", "bundle", "users", "tokens", "audit", "db"]


DEFAULT_DATA_DIR = "/var/lib/teleport"


class UsageError(Exception):
    """A problem with how tctl was called or with files it could not read: exit code 2."""


def add_data_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="the control plane's data directory (default: $TELEPORT_DATA_DIR or "
        f"{DEFAULT_DATA_DIR})",
    )


def data_dir_of(args: argparse.Namespace, must_exist: bool = True) -> Path:
    """The data dir from --data-dir, $TELEPORT_DATA_DIR or the default; checked to exist."""
    path = Path(args.data_dir or os.environ.get("TELEPORT_DATA_DIR") or DEFAULT_DATA_DIR)
    if must_exist and not path.is_dir():
        raise UsageError(
            f"data directory {path} does not exist; start the control plane first "
            "(teleport start --roles=auth) or pass --data-dir"
        )
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tctl",
        description="Administer a teleport-db cluster: lint policy, inspect bundles, "
        "manage users, join tokens and certificates.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"control.tctl.{name}_cmd").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run_command(args.func, args)
    except UsageError as exc:
        print(f"tctl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
