"""`teleport start`: run the control plane (auth), the proxy and database agents.

Roles come from `--roles` (comma-separated: auth, proxy, db) or, without it, from the
`enabled` flags of `--config`; with neither, auth and proxy run (plus db when a `--db-*` flag
is given), so that seed 001's one-line start works on one machine. Flags override the file.
Several roles in one process share an event loop, and the proxy hands connections for a
local agent over in-process instead of tunnelling them through TLS.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dataplane.run_cmd import FlagError, add_database_flags, database_from_flags
from schemas.config import ConfigError, FileConfig, load_config, resolve_data_dir
from transport.logs import configure_logging
from transport.process import freeze_startup_heap, install_event_loop

log = logging.getLogger("teleport")

ROLES = ("auth", "proxy", "db")


class StartError(Exception):
    """Bad flags or configuration: printed without a traceback, exit code 2."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "start",
        help="start cluster services: auth (control plane), proxy, db (database agent)",
        description="Start teleport-db services in this process. Examples:\n\n"
        "  teleport start --roles=proxy,auth,db --db-name=aurora --db-protocol=postgres \\\n"
        "      --db-uri=aurora.cluster-xyz.us-west-1.rds.amazonaws.com:5432 "
        "--db-aws-region=us-west-1\n"
        "  teleport start --config=/etc/teleport.yaml\n"
        "  teleport start --roles=db --token=TOKEN --auth-server=proxy.example.com:3080 \\\n"
        "      --db-name=test --db-protocol=postgres --db-uri=db.example.com:5432 "
        "--labels=env=test",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-c", "--config", type=Path, help="teleport.yaml to read")
    p.add_argument(
        "--roles",
        help="comma-separated services to run: auth, proxy, db (default: from the config, "
        "else auth,proxy and db when --db-* flags are given)",
    )
    p.add_argument("-d", "--debug", action="store_true", help="log at debug level")
    p.add_argument("--data-dir", help="data directory (default /var/lib/teleport)")
    p.add_argument("--nodename", help="name of this host (default: the host name)")
    p.add_argument("--cluster-name", help="cluster name at first start (default: the node name)")
    g = p.add_argument_group("joining (proxy and db roles on their own)")
    g.add_argument("--token", help="join token, or a file holding it")
    g.add_argument(
        "--auth-server",
        action="append",
        help="address of the auth server or of a proxy's web port (host:port)",
    )
    g.add_argument("--ca-pin", help="sha256:<hex> of the cluster's host CA, checked at join")
    add_database_flags(p.add_argument_group("database agent (seed 001 flags)"))
    g = p.add_argument_group("auth service")
    g.add_argument(
        "--policy-repo",
        help='where policy lives: "hosted" (default: <data_dir>/policies.git), a local '
        "repository path, or a git URL to pull",
    )
    g.add_argument("--policy-branch", help="the branch that is policy (default main)")
    p.set_defaults(func=run)


@dataclass
class Plan:
    """What to run: the effective configuration and roles after flags are applied."""

    config: FileConfig
    roles: set[str]
    data_dir: Path
    nodename: str
    cluster_name: str
    debug: bool = False
    token: str | None = None
    ca_pin: str | None = None
    auth_servers: list[str] = field(default_factory=list)


def make_plan(args: argparse.Namespace) -> Plan:
    try:
        config = load_config(args.config) if args.config else FileConfig()
    except ConfigError as exc:
        raise StartError(str(exc)) from None

    try:
        flag_db = database_from_flags(args)
    except FlagError as exc:
        raise StartError(str(exc)) from None
    if args.roles:
        roles = {r.strip() for r in args.roles.split(",") if r.strip()}
        unknown = roles - set(ROLES) - {"node", "database"}
        if unknown:
            raise StartError(
                f"--roles: unknown role(s) {', '.join(sorted(unknown))}; use auth, proxy, db"
            )
        roles = {"db" if r == "database" else r for r in roles} - {"node"}
    elif args.config:
        roles = {
            name
            for name, section in (
                ("auth", config.auth_service),
                ("proxy", config.proxy_service),
                ("db", config.db_service),
            )
            if section.enabled
        }
    else:
        roles = {"auth", "proxy"} | ({"db"} if flag_db is not None else set())
    if not roles:
        raise StartError("nothing to run: enable a service in the config or pass --roles")

    if flag_db is not None:
        if "db" not in roles:
            raise StartError("--db-* flags need the db role (--roles=...,db)")
        config.db_service.databases.append(flag_db)

    data_dir = resolve_data_dir(args.data_dir, config, os.environ.get("TELEPORT_DATA_DIR"))
    nodename = args.nodename or config.teleport.nodename or socket.gethostname()
    cluster = args.cluster_name or config.auth_service.cluster_name or nodename
    if args.policy_repo:
        config.auth_service.policy.repository = args.policy_repo
    if args.policy_branch:
        config.auth_service.policy.branch = args.policy_branch
    token = args.token or config.teleport.auth_token
    if token and os.path.isfile(token):
        token = Path(token).read_text().strip()
    return Plan(
        config=config,
        roles=roles,
        data_dir=data_dir,
        nodename=nodename,
        cluster_name=cluster,
        debug=args.debug,
        token=token,
        ca_pin=args.ca_pin or config.teleport.ca_pin,
        auth_servers=list(args.auth_server or config.teleport.auth_servers),
    )


def setup_logging(debug: bool, config: FileConfig | None = None) -> None:
    log_config = config.teleport.log if config is not None else None
    try:
        configure_logging(
            debug,
            log_config.severity if log_config else "INFO",
            log_config.output if log_config else "stderr",
        )
    except OSError as exc:
        raise StartError(
            f"teleport.log.output: cannot open {exc.filename}: {exc.strerror}"
        ) from None


async def serve(plan: Plan, stop: asyncio.Event) -> None:
    """Run every role of the plan until `stop` is set or one of them fails."""
    from launcher.services import build_services, run_services  # noqa: PLC0415 - fast --help

    services = await build_services(plan)
    freeze_startup_heap()
    await run_services(services, stop)


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except StartError as exc:
        print(f"teleport: error: {exc}", file=sys.stderr)
        return 2
    try:
        setup_logging(plan.debug, plan.config)
    except StartError as exc:
        print(f"teleport: error: {exc}", file=sys.stderr)
        return 2
    install_event_loop()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(plan, stop)

    try:
        asyncio.run(main())
    except StartError as exc:
        print(f"teleport: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a port in use, a data dir that cannot be written...
        print(f"teleport: error: {exc.strerror or exc}", file=sys.stderr)
        return 1
    log.info("stopped")
    return 0
