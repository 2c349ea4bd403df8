"""`teleport`: start cluster services (auth, proxy, db) in one process, or the quick-start demo."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence
from importlib.metadata import version

from transport.process import run_command

SUBCOMMANDS: list[str] = ["start", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teleport",
        description="Run teleport-db services: the control plane (auth), the proxy and "
        "database agents, together or apart.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    v = sub.add_parser("version", help="print the version and exit")
    v.set_defaults(func=lambda _args: print(f"teleport {version('teleport-db')}") or 0)
    for name in SUBCOMMANDS:
        importlib.import_module(f"launcher.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.func, args)
