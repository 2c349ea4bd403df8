"""`teleport-agent run --role=proxy|db`: one data-plane service on its own host.

The same flags and configuration file as `teleport start` for that role (seed 001's
`--token --auth-server --db-name --db-protocol --db-uri --db-aws-region --labels`), without
a control plane in the process: a proxy relays API connections unopened to the auth server
and receives agents on its tunnel port; an agent dials every proxy of the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from pydantic import ValidationError

from dataplane.cluster.identity import CredentialsError, JoinError
from dataplane.runtime import (
    AgentConfigError,
    JoinOptions,
    Node,
    NodeBusy,
    build_agent,
    build_proxy,
)
from schemas.config import (
    ConfigError,
    DatabaseConfig,
    FileConfig,
    load_config,
    resolve_data_dir,
)
from transport.logs import configure_logging
from transport.process import freeze_startup_heap, install_event_loop

log = logging.getLogger("teleport.agent")


class RunError(Exception):
    """Bad flags or configuration: printed without a traceback, exit code 2."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a proxy or a database agent",
        description="Run one data-plane service. Examples:\n\n"
        "  teleport-agent run --role=db --token=TOKEN --auth-server=proxy.example.com:3080 \\\n"
        "      --ca-pin=sha256:... --db-name=test --db-protocol=postgres \\\n"
        "      --db-uri=db.example.com:5432 --labels=env=test\n"
        "  teleport-agent run --role=proxy --token=TOKEN --auth-server=auth.example.com:3025\n"
        "  teleport-agent run --role=db --config=/etc/teleport-db.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--role", required=True, choices=["proxy", "db"], help="which service")
    p.add_argument("-c", "--config", type=Path, help="teleport.yaml to read")
    p.add_argument("-d", "--debug", action="store_true", help="log at debug level")
    p.add_argument("--data-dir", help="data directory (default /var/lib/teleport)")
    p.add_argument("--nodename", help="name of this host (default: the host name)")
    p.add_argument("--token", help="join token, or a file holding it (first start only)")
    p.add_argument(
        "--auth-server",
        help="auth server address, or a proxy's web address (host:port)",
    )
    p.add_argument(
        "--ca-pin",
        help="sha256:<hex> of the cluster's host CA (`tctl status`); without it the first "
        "join trusts the server it reaches, with a warning",
    )
    add_database_flags(p.add_argument_group("database (role db; seed 001 flags)"))
    p.set_defaults(func=run)


def add_database_flags(group: argparse._ArgumentGroup) -> None:
    """Seed 001's flags for the one database an agent serves (`database_from_flags` reads
    them): `teleport-agent run --role=db` and `teleport start` take the same ones."""
    group.add_argument("--db-name", help="name of the database to serve")
    group.add_argument("--db-protocol", help="database protocol: postgres")
    group.add_argument("--db-uri", help="database address host:port")
    group.add_argument("--db-aws-region",
                       help="AWS region of an RDS/Aurora database (IAM auth)")
    group.add_argument("--db-ca-cert", help="CA certificate file to verify the database with")
    group.add_argument("--db-description", default="", help="free-form description")
    group.add_argument("--labels",
                       help="static labels of the database, e.g. env=test,team=payments")


class FlagError(ValueError):
    """Seed 001's --db-* / --labels flags do not describe a database; says which flag."""


def parse_labels(text: str | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for part in (text or "").split(","):
        if part.strip():
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise FlagError(f"--labels: {part!r} is not key=value (e.g. env=test)")
            labels[key.strip()] = value.strip()
    return labels


def database_from_flags(args: argparse.Namespace) -> DatabaseConfig | None:
    """The database of seed 001's --db-* flags, validated like a config file entry; None
    when no --db-* flag is given. Used by `teleport-agent run` and `teleport start`."""
    if not any([args.db_name, args.db_protocol, args.db_uri, args.db_aws_region]):
        if args.labels:
            raise FlagError("--labels applies to the database of --db-name")
        return None
    missing = [
        flag
        for flag, value in (
            ("--db-name", args.db_name),
            ("--db-protocol", args.db_protocol),
            ("--db-uri", args.db_uri),
        )
        if not value
    ]
    if missing:
        raise FlagError(f"serving a database from flags needs {', '.join(missing)}")
    try:
        return DatabaseConfig.model_validate(
            {
                "name": args.db_name,
                "description": args.db_description,
                "protocol": args.db_protocol,
                "uri": args.db_uri,
                "ca_cert_file": args.db_ca_cert,
                "labels": parse_labels(args.labels),
                **({"aws": {"region": args.db_aws_region}} if args.db_aws_region else {}),
            }
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = str(first.get("msg", "")).removeprefix("Value error, ")
        raise FlagError(f"--db-* flags: {where + ': ' if where else ''}{msg}") from None


async def build(args: argparse.Namespace, config: FileConfig) -> Node:
    data_dir = resolve_data_dir(args.data_dir, config, os.environ.get("TELEPORT_DATA_DIR"))
    auth = args.auth_server or (config.teleport.auth_servers or [None])[0]
    if not auth:
        raise RunError("say where the cluster is: --auth-server host:port")
    token = args.token or config.teleport.auth_token
    if token and os.path.isfile(token):
        token = Path(token).read_text().strip()
    pin = args.ca_pin or config.teleport.ca_pin
    join = JoinOptions(
        data_dir=data_dir,
        auth_addr=auth,
        token=token,
        ca_pin=pin,
        insecure_first_join=pin is None,
        nodename=args.nodename or config.teleport.nodename or socket.gethostname(),
    )
    try:
        if args.role == "proxy":
            return await build_proxy(join, config.proxy_service)
        db = database_from_flags(args)
        if db is not None:
            config.db_service.databases.append(db)
        if not config.db_service.databases and not config.db_service.resources:
            raise RunError(
                "this agent would serve nothing: give --db-name/--db-protocol/--db-uri, or "
                "db_service.databases or db_service.resources in --config"
            )
        return await build_agent(join, config.db_service)
    except (JoinError, CredentialsError, FlagError, NodeBusy, AgentConfigError) as exc:
        raise RunError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config) if args.config else FileConfig()
        configure_logging(args.debug, config.teleport.log.severity, config.teleport.log.output)
    except ConfigError as exc:
        print(f"teleport-agent: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(
            f"teleport-agent: error: teleport.log.output: cannot open {exc.filename}: "
            f"{exc.strerror}",
            file=sys.stderr,
        )
        return 2
    install_event_loop()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        node = await build(args, config)
        freeze_startup_heap()
        await node.run(stop)

    try:
        asyncio.run(main())
    except RunError as exc:
        print(f"teleport-agent: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port in use, a data dir that cannot be written...
        print(f"teleport-agent: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
