"""`tsh`: log in to a teleport-db cluster and get certificates for databases."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from importlib.metadata import version

from transport.process import run_command

SUBCOMMANDS: list[str] = ["login", "db"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tsh",
        description="Log in to a teleport-db cluster, list databases and get short-lived "
        "certificates that plain psql uses.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    v = sub.add_parser("version", help="print the version and exit")
    v.set_defaults(func=lambda _args: print(f"tsh {version('teleport-db')}") or 0)
    for name in SUBCOMMANDS:
        importlib.import_module(f"dataplane.tsh.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)
