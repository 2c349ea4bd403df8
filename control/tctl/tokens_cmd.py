"""`tctl tokens`: join tokens for proxies and db agents (on the local data dir).

    tctl tokens add --type=db [--db-name=N --db-protocol=postgres --db-uri=H:P
                    --db-aws-region=R --labels=k=v,..] [--ttl=30m] [--single-use]
        Prints the token and the exact `teleport start --roles=db --token=... --ca-pin=...
        --auth-server=... --db-name=...` command to run on the database host (seed 001).
    tctl tokens ls        static tokens (from teleport.yaml, shown cut short) and dynamic ones
    tctl tokens rm TOKEN  removes a dynamic token, given itself or its id from `ls`

A dynamic token is printed once, when made; `<data_dir>/tokens.json` keeps only its SHA-256.
The `--ca-pin` printed is the host CA's fingerprint: the joining host checks the control
plane's certificate against it before sending the token.
"""

from __future__ import annotations

import argparse
import json
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path

from control.ca import CAError, host_ca_pin
from control.settings import ControlSettings, load_settings
from control.tctl import UsageError, add_data_dir_argument, data_dir_of
from control.tctl.users_cmd import guarded
from control.tokens import DEFAULT_TTL, DbTokenInfo, TokenStore, normalize_roles
from schemas.durations import DurationError, format_duration, parse_duration
from schemas.policy.models import AWS_REGION_RE, split_host_port

DEFAULT_PROXY_PORT = 3080
DEFAULT_AUTH_PORT = 3025


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokens",
        help="add, list and remove join tokens",
        description="Manage the tokens proxies and database agents join the cluster with.",
    )
    tsub = p.add_subparsers(dest="tokens_command", metavar="ACTION", required=True)

    add = tsub.add_parser(
        "add",
        help="make a join token and print the command that uses it",
        description="Make a dynamic join token and print the `teleport start` command to "
        "run on the new host.",
    )
    add.add_argument("--type", required=True, help="role(s) the token joins: db, proxy")
    add.add_argument(
        "--ttl", default=None, help=f"validity (default {format_duration(DEFAULT_TTL)})"
    )
    add.add_argument("--single-use", action="store_true", help="the first join uses it up")
    add.add_argument("--db-name", help="name of the database the agent will serve")
    add.add_argument("--db-protocol", help="database protocol (postgres)")
    add.add_argument("--db-uri", help="database address, host:port")
    add.add_argument("--db-aws-region", help="AWS region of an RDS or Aurora database")
    add.add_argument("--labels", default="", help="static labels, k=v[,k=v]")
    add.add_argument("--format", choices=["text", "json"], default="text")
    add_data_dir_argument(add)
    add.set_defaults(func=guarded(run_add))

    ls = tsub.add_parser("ls", help="list join tokens", description="List static and "
                         "dynamic join tokens (dynamic ones by id; tokens are stored hashed).")
    ls.add_argument("--format", choices=["text", "json"], default="text")
    add_data_dir_argument(ls)
    ls.set_defaults(func=guarded(run_ls))

    rm = tsub.add_parser("rm", help="remove a dynamic join token",
                         description="Remove a dynamic join token, given the token or its id.")
    rm.add_argument("token", metavar="TOKEN_OR_ID")
    add_data_dir_argument(rm)
    rm.set_defaults(func=guarded(run_rm))


def _settings(data_dir: Path) -> ControlSettings:
    settings = load_settings(data_dir)
    if settings is None:
        raise UsageError(
            f"{data_dir} has no control.json: start the control plane once "
            "(teleport start --roles=auth) or pass the right --data-dir"
        )
    return settings


def _store(data_dir: Path, settings: ControlSettings) -> TokenStore:
    try:
        return TokenStore(data_dir, settings.api.static_tokens)
    except ValueError as exc:
        raise UsageError(f"auth_service.tokens: {exc}") from None


def _labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--labels: {part.strip()!r} is not key=value")
        labels[key.strip()] = value.strip()
    return labels


def _db_info(args: argparse.Namespace) -> DbTokenInfo | None:
    given = [args.db_name, args.db_protocol, args.db_uri, args.db_aws_region, args.labels]
    if not any(given):
        return None
    if not args.db_name:
        raise UsageError("--db-protocol, --db-uri, --db-aws-region and --labels need --db-name")
    protocol = args.db_protocol or "postgres"
    if protocol != "postgres":
        raise UsageError(f"--db-protocol: {protocol!r} is not supported; use postgres")
    if args.db_uri:
        try:
            split_host_port(args.db_uri)
        except ValueError:
            raise UsageError(
                f"--db-uri: {args.db_uri!r} is not host:port (e.g. db.example.com:5432)"
            ) from None
    if args.db_aws_region and not AWS_REGION_RE.match(args.db_aws_region):
        raise UsageError(f"--db-aws-region: {args.db_aws_region!r} is not an AWS region")
    return DbTokenInfo(
        name=args.db_name,
        protocol=protocol,
        uri=args.db_uri,
        aws_region=args.db_aws_region,
        labels=_labels(args.labels),
    )


def ca_pin(data_dir: Path) -> str:
    try:
        return host_ca_pin(data_dir)
    except CAError as exc:
        raise UsageError(str(exc)) from None


def start_command(
    token: str, roles: list[str], settings: ControlSettings, pin: str, db: DbTokenInfo | None
) -> str:
    """The `teleport start` line for the new host (one flag per line, as in seed 001)."""
    if "db" in roles:
        auth_server = (
            settings.api.proxy_addrs[0]
            if settings.api.proxy_addrs
            else f"{settings.api.nodename}:{DEFAULT_PROXY_PORT}"
        )
    else:
        auth_server = (
            settings.api.public_addrs[0]
            if settings.api.public_addrs
            else f"{settings.api.nodename}:{DEFAULT_AUTH_PORT}"
        )
    flags = [
        f"--roles={','.join(r for r in roles if r in ('db', 'proxy'))}",
        f"--token={token}",
        f"--ca-pin={pin}",
        f"--auth-server={auth_server}",
    ]
    if db is not None and "db" in roles:
        flags.append(f"--db-name={db.name}")
        if db.protocol:
            flags.append(f"--db-protocol={db.protocol}")
        if db.uri:
            flags.append(f"--db-uri={db.uri}")
        if db.aws_region:
            flags.append(f"--db-aws-region={db.aws_region}")
            # RDS certificates chain to Amazon's RDS CA, which the agent must be given.
            flags.append("--db-ca-cert=/path/to/rds-global-bundle.pem")
        if db.labels:
            flags.append("--labels=" + ",".join(f"{k}={v}" for k, v in db.labels.items()))
    quoted = [shlex.quote(f) for f in flags]
    return "teleport start \\\n   " + " \\\n   ".join(quoted)


def run_add(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    settings = _settings(data_dir)
    try:
        roles = normalize_roles(args.type)
    except ValueError as exc:
        raise UsageError(f"--type: {exc}") from None
    joinable = [r for r in roles if r in ("db", "proxy")]
    if not joinable:
        raise UsageError("--type: only db and proxy hosts join with a token here")
    ttl = DEFAULT_TTL
    if args.ttl is not None:
        try:
            ttl = parse_duration(args.ttl)
        except DurationError as exc:
            raise UsageError(f"--ttl: {exc}") from None
        if ttl <= timedelta(0):
            raise UsageError(f"--ttl must be positive, got {args.ttl!r}")
    db = _db_info(args)
    if db is not None and "db" not in roles:
        raise UsageError("--db-* flags are for tokens of type db")
    pin = ca_pin(data_dir)
    token, record = _store(data_dir, settings).add(
        joinable, ttl, single_use=args.single_use, db=db
    )
    command = start_command(token, joinable, settings, pin, db)
    if args.format == "json":
        print(
            json.dumps(
                {
                    "token": token,
                    "id": record.id,
                    "roles": record.roles,
                    "expires": record.expires_at.isoformat(),
                    "single_use": record.single_use,
                    "ca_pin": pin,
                    "command": command,
                },
                indent=2,
            )
        )
        return 0
    use = "once, then it is gone" if args.single_use else "until it expires"
    print(f"The invite token: {token}")
    print(f"This token will expire in {format_duration(ttl)} (id {record.id}; it works {use}).")
    print()
    print(f"Run this on the new {' and '.join(joinable)} host to join the cluster:")
    print()
    print(command)
    print()
    print("The --ca-pin value is the fingerprint of this cluster's host CA (`tctl status` "
          "shows it): the new host trusts the control plane only if they match.")
    return 0


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def run_ls(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    store = _store(data_dir, _settings(data_dir))
    dynamic = store.dynamic()
    if args.format == "json":
        print(
            json.dumps(
                {
                    "static": [
                        {"token": t.shown, "roles": list(t.roles)} for t in store.static
                    ],
                    "dynamic": [
                        {
                            "id": t.id,
                            "roles": t.roles,
                            "expires": t.expires_at.isoformat(),
                            "single_use": t.single_use,
                            "db_name": t.db.name if t.db else None,
                        }
                        for t in dynamic
                    ],
                },
                indent=2,
            )
        )
        return 0
    if not store.static and not dynamic:
        print("No join tokens; make one with `tctl tokens add --type=db`.")
        return 0
    table = [("Token", "Type", "Roles", "Expires", "Database")]
    for s in store.static:
        table.append((s.shown, "static", ",".join(s.roles), "never (teleport.yaml)", "-"))
    for t in dynamic:
        kind = "single-use" if t.single_use else "dynamic"
        table.append(
            (t.id, kind, ",".join(t.roles), _when(t.expires_at), (t.db.name if t.db else None)
             or "-")
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


def run_rm(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    store = _store(data_dir, _settings(data_dir))
    try:
        removed = store.remove(args.token)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if removed is None:
        if any(s.token == args.token for s in store.static):
            raise UsageError(
                "that is a static token from teleport.yaml (auth_service.tokens): remove it "
                "there and restart the auth service"
            )
        raise UsageError(
            f"no dynamic token matches {args.token!r}; `tctl tokens ls` shows their ids"
        )
    print(f"Token {removed.id} ({','.join(removed.roles)}) removed; it can no longer join.")
    return 0
