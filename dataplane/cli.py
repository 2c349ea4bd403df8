"""`teleport-agent`: run a data-plane service (proxy or db agent) on its own."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from importlib.metadata import version

from transport.process import run_command

SUBCOMMANDS: list[str] = ["run_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teleport-agent",
        description="Run a teleport-db data-plane service: a proxy or a database agent.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    v = sub.add_parser("version", help="print the version and exit")
    v.set_defaults(func=lambda _args: print(f"teleport-agent {version('teleport-db')}") or 0)
    for name in SUBCOMMANDS:
        importlib.import_module(f"dataplane.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)
