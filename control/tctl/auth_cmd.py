"""`tctl auth`: certificates signed on the auth host, and the CA certificates.

    tctl auth sign --format=db --host=db.example.com --out=server --ttl=8760h
        PostgreSQL's server files: PREFIX.crt (db CA, serverAuth, one SAN per host),
        PREFIX.key (0600) and PREFIX.cas (the db CA certificate, for ssl_ca_file); prints the
        postgresql.conf and pg_hba.conf lines.

    tctl auth sign --user=ci-bot --format=db --db-service=NAME --db-user=U --db-name=D
                   --roles=ROLE[,ROLE] --ttl=1h --out=DIR [--proxy=HOST:PORT]
        Robot access (CI, Ansible): DIR/USER.key (0600), DIR/USER.crt (a database route
        certificate from the user CA) and DIR/ca.crt (the host CA, which signs the proxy's
        certificate psql verifies); prints the psql command.

    tctl auth export --type=user|host|db
        Prints the CA certificate in PEM.

The CAs are read from the data dir: `--data-dir`, else $TELEPORT_DATA_DIR, else
/var/lib/teleport (`control.tctl.data_dir_of`). Private keys for `sign` are made here, on
the auth host, and written 0600; existing output files are only replaced with `--overwrite`.

This command never prints a private key and never creates a CA (that is the auth service's
job at first start).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from control.ca import (
    CA_KINDS,
    CAError,
    CertificateAuthority,
    certificate_pem,
    load_ca_certificate,
    split_hosts,
)
from control.tctl import UsageError, add_data_dir_argument, data_dir_of
from schemas.durations import DurationError, format_duration, parse_duration
from schemas.identity import Identity, Route, verify_identity
from transport.files import write_atomic, write_private
from transport.tls import new_private_key, private_key_pem

DEFAULT_PROXY_PORT = 3080


def resolve_data_dir(args: argparse.Namespace) -> Path:
    """The data dir (see `control.tctl.data_dir_of`), also checked to be readable."""
    path = data_dir_of(args)
    effective = os.access in os.supports_effective_ids
    if not os.access(path, os.R_OK | os.X_OK, effective_ids=effective):
        raise UsageError(
            f"data directory {path} is not readable by this user: run tctl as the user the "
            "auth service runs as (usually root)"
        )
    return path


def _ttl(text: str) -> timedelta:
    try:
        ttl = parse_duration(text)
    except DurationError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    if ttl <= timedelta(0):
        raise UsageError(f"--ttl must be positive, got {text!r}")
    return ttl


def _check_free(paths: Sequence[Path], overwrite: bool) -> None:
    if overwrite:
        return
    taken = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if taken:
        raise UsageError(f"{', '.join(taken)} already exist(s): pass --overwrite to replace")


def _pg_conf_value(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _conninfo_value(value: str) -> str:
    if value and all(c.isalnum() or c in "._-/:@" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# --- tctl auth sign --format=db --host=... ------------------------------------------------


@dataclass(frozen=True)
class DbServerFiles:
    cert: Path
    key: Path
    cas: Path
    not_after: datetime


def sign_db_server(
    db_ca: CertificateAuthority,
    hosts: Sequence[str],
    ttl: timedelta,
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
) -> DbServerFiles:
    """Make a key here and write OUT.crt, OUT.key (0600) and OUT.cas for PostgreSQL."""
    prefix = Path(out).absolute()
    files = [prefix.with_name(prefix.name + ext) for ext in (".crt", ".key", ".cas")]
    _check_free(files, overwrite)
    if not prefix.parent.is_dir():
        raise UsageError(f"--out: directory {prefix.parent} does not exist")
    key = new_private_key()
    cert = db_ca.issue_db_server(key.public_key(), hosts, ttl)
    crt_path, key_path, cas_path = files
    write_private(key_path, private_key_pem(key))
    write_atomic(crt_path, certificate_pem(cert))
    write_atomic(cas_path, db_ca.certificate_pem())
    return DbServerFiles(crt_path, key_path, cas_path, cert.not_valid_after_utc)


def db_server_instructions(files: DbServerFiles) -> str:
    return f"""\
Wrote
  {files.cert}  the server certificate, valid until {files.not_after:%Y-%m-%d %H:%M} UTC
  {files.key}  its private key (mode 0600)
  {files.cas}  the cluster's db CA, which signs the agents' client certificates

Add to postgresql.conf:

ssl = on
ssl_cert_file = {_pg_conf_value(files.cert)}
ssl_key_file = {_pg_conf_value(files.key)}
ssl_ca_file = {_pg_conf_value(files.cas)}

and to pg_hba.conf, above other host lines, to require client certificates over TLS:

hostssl all             all             ::/0                    cert
hostssl all             all             0.0.0.0/0               cert

PostgreSQL reads the key only if the server's OS user owns it with mode 0600, e.g.
chown postgres:postgres {files.key}
"""


# --- tctl auth sign --user=... --format=db ------------------------------------------------


@dataclass(frozen=True)
class RobotFiles:
    cert: Path
    key: Path
    ca: Path
    identity: Identity


def sign_robot(
    user_ca: CertificateAuthority,
    host_ca_pem: bytes,
    *,
    user: str,
    roles: Sequence[str],
    traits: Mapping[str, Sequence[str]],
    route: Route,
    ttl: timedelta,
    out_dir: str | os.PathLike[str],
    overwrite: bool = False,
) -> RobotFiles:
    """Write OUT_DIR/USER.key (0600), OUT_DIR/USER.crt (route certificate) and OUT_DIR/ca.crt.

    `roles` and `traits` are what the certificate asserts; the caller decides them (today
    tctl's --roles; once tctl talks to the control plane, the user's record in the bundle).
    """
    directory = Path(out_dir).absolute()
    files = [directory / f"{user}.crt", directory / f"{user}.key", directory / "ca.crt"]
    _check_free(files, overwrite)
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out: cannot create {directory}: {exc.strerror}") from None
    now = datetime.now(UTC).replace(microsecond=0)
    try:
        login = Identity(
            username=user,
            roles=tuple(roles),
            traits={k: tuple(v) for k, v in traits.items()},
            cluster=user_ca.cluster,
            usage="user",
            expires=now + ttl,
        )
    except ValueError as exc:
        raise UsageError(f"cannot make an identity for {user!r}: {exc}") from None
    key = new_private_key()
    cert = user_ca.issue_route(key.public_key(), login, route, ttl, now=now)
    crt_path, key_path, ca_path = files
    write_private(key_path, private_key_pem(key))
    write_atomic(crt_path, certificate_pem(cert))
    write_atomic(ca_path, host_ca_pem)
    # Read back what was signed: the files are only reported if they verify.
    identity = verify_identity([cert], [user_ca.certificate], now, "db")
    return RobotFiles(crt_path, key_path, ca_path, identity)


def robot_instructions(files: RobotFiles, ttl: timedelta, proxy: str | None) -> str:
    route = files.identity.route
    assert route is not None
    if proxy:
        host, _, port = proxy.rpartition(":")
    else:
        host, port = "<proxy-host>", str(DEFAULT_PROXY_PORT)
    parts = [
        f"host={_conninfo_value(host.strip('[]'))}",
        f"port={port}",
        "sslmode=verify-full",
        f"sslrootcert={_conninfo_value(str(files.ca))}",
        f"sslcert={_conninfo_value(str(files.cert))}",
        f"sslkey={_conninfo_value(str(files.key))}",
    ]
    if route.db_user:
        parts.append(f"user={_conninfo_value(route.db_user)}")
    if route.db_name:
        parts.append(f"dbname={_conninfo_value(route.db_name)}")
    conninfo = " ".join(parts).replace('"', '\\"')
    text = f"""\
Wrote
  {files.cert}  database '{route.service}', roles {", ".join(files.identity.roles)}, \
valid for {format_duration(ttl)}
  {files.key}  its private key (mode 0600)
  {files.ca}  the cluster's host CA, which signs the proxy's certificate

Connect with:

psql "{conninfo}"
"""
    if not proxy:
        text += "\nReplace <proxy-host> with the proxy's address, or pass --proxy=HOST:PORT.\n"
    return text


# --- argparse -------------------------------------------------------------------------------


def _split_list(value: str | None) -> list[str]:
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def _run_sign(args: argparse.Namespace) -> int:
    ttl = _ttl(args.ttl)
    if args.user is None:
        for flag in ("db_service", "db_user", "db_name", "roles", "proxy"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is only for --user (robot access)")
        hosts = split_hosts(args.host or [])
        if not hosts:
            raise UsageError(
                "--host is required for a database server certificate, e.g. "
                "--host=db.example.com (comma-separate several names)"
            )
        data_dir = resolve_data_dir(args)
        db_ca = CertificateAuthority.load(data_dir, "db")
        files = sign_db_server(db_ca, hosts, ttl, args.out, overwrite=args.overwrite)
        print(db_server_instructions(files), end="")
        return 0

    if args.host:
        raise UsageError("--host is for a database server certificate; drop it with --user")
    if not args.db_service:
        raise UsageError("--db-service is required with --user: the database to connect to")
    roles = _split_list(args.roles)
    if not roles:
        raise UsageError(
            "--roles is required with --user: the roles the certificate carries "
            "(e.g. --roles=ci-readonly); the agent still checks them against the policy"
        )
    if args.proxy is not None and ":" not in args.proxy:
        raise UsageError(f"--proxy must be HOST:PORT, got {args.proxy!r}")
    try:
        route = Route(service=args.db_service, db_user=args.db_user, db_name=args.db_name)
    except ValueError as exc:
        raise UsageError(f"invalid database route: {exc}") from None
    data_dir = resolve_data_dir(args)
    user_ca = CertificateAuthority.load(data_dir, "user")
    host_ca = load_ca_certificate(data_dir, "host")
    files = sign_robot(
        user_ca,
        certificate_pem(host_ca),
        user=args.user,
        roles=roles,
        traits={},
        route=route,
        ttl=ttl,
        out_dir=args.out,
        overwrite=args.overwrite,
    )
    print(robot_instructions(files, ttl, args.proxy), end="")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    data_dir = resolve_data_dir(args)
    sys.stdout.write(certificate_pem(load_ca_certificate(data_dir, args.type)).decode())
    return 0


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """CA and file problems become UsageError: tctl prints them and exits 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CAError as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            raise UsageError(f"{where}{exc.strerror or exc}") from None

    return run


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    auth = subparsers.add_parser(
        "auth", help="sign certificates on the auth host; export the CA certificates"
    )
    sub = auth.add_subparsers(dest="auth_command", metavar="SUBCOMMAND", required=True)

    sign = sub.add_parser(
        "sign",
        help="make a key and certificate: for a PostgreSQL server, or for a robot user",
        description="With --host: PostgreSQL's server certificate from the db CA. With "
        "--user: a database certificate (user CA) that psql uses directly.",
    )
    sign.add_argument("--format", required=True, choices=["db"], help="output format")
    sign.add_argument(
        "--host",
        action="append",
        metavar="NAME",
        help="server name(s) to put in the certificate; repeat or comma-separate",
    )
    sign.add_argument(
        "--out", required=True, help="file name prefix (--host) or directory (--user)"
    )
    sign.add_argument("--ttl", default="12h", help="validity, e.g. 8760h or 1h (default 12h)")
    sign.add_argument("--user", help="sign a database certificate for this user (robot access)")
    sign.add_argument("--roles", help="with --user: comma-separated roles the certificate carries")
    sign.add_argument("--db-service", help="with --user: the database service to connect to")
    sign.add_argument("--db-user", help="with --user: the database user psql logs in as")
    sign.add_argument("--db-name", help="with --user: the database psql opens")
    sign.add_argument("--proxy", metavar="HOST:PORT", help="with --user: the proxy, for psql")
    sign.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_data_dir_argument(sign)
    sign.set_defaults(func=_guard(_run_sign))

    export = sub.add_parser("export", help="print a CA certificate (PEM)")
    export.add_argument("--type", required=True, choices=list(CA_KINDS), help="which CA")
    add_data_dir_argument(export)
    export.set_defaults(func=_guard(_run_export))
