"""`tsh db ls | login | logout | config | env | connect`: databases through the proxy.

`tsh db login NAME` asks the cluster for a route certificate (POST /v1/certs/db, for a key
made here) and writes a section `[<cluster>-<name>]` to `~/.pg_service.conf` (or
`$PGSERVICEFILE`) so that plain `psql "service=<cluster>-<name>"` connects through the
proxy with it; the cluster refuses what RBAC would refuse, so a wrong db user or db name
fails here, with the reason, and not later in psql. `tsh db config` and `tsh db env` give
the same connection settings to GUI clients and shells; `tsh db connect` runs psql with
them, logging in to the database first when needed.

Never writes a key anywhere but the profile (0600), never puts one in pg_service.conf (it
holds paths), never prints one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import sys
from collections.abc import Sequence
from urllib.parse import quote

from dataplane.tsh.client import check_certificate, join_host_port, public_key_pem
from dataplane.tsh.errors import TshError, UsageError, command
from dataplane.tsh.pgservice import service_file_path
from dataplane.tsh.profile import DbLogin, Profile, ProfileStore, check_db_name, now_utc
from dataplane.tsh.session import (
    active_profile,
    client_for,
    forget_db,
    refused_login,
    remaining,
    remove_service,
    service_params,
    when,
    write_service,
)
from schemas.api import DatabaseCertRequest, DatabaseEntry
from transport import tls
from transport.http import ApiError

# A value RBAC lists literally (not a wildcard or an expression) can be a default.
_LITERAL = re.compile(r"^[A-Za-z0-9_.@-]+$")


def register(sub: argparse._SubParsersAction) -> None:
    db = sub.add_parser(
        "db",
        help="list databases, log in to them, and connect",
        description="Databases you may access through the proxy.",
    )
    dsub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)

    ls = dsub.add_parser("ls", help="list the databases your roles allow",
                         description="List the databases your roles allow; those you are "
                         "logged in to are marked with '>'.")
    ls.add_argument("--format", choices=["text", "json"], default="text")
    ls.set_defaults(func=run_ls)

    login = dsub.add_parser(
        "login",
        help="get a certificate for a database and write its pg_service.conf section",
        description="Get a certificate for database NAME and write the section "
        "[<cluster>-NAME] of ~/.pg_service.conf (or $PGSERVICEFILE) that psql uses.",
    )
    _target_arguments(login)
    login.set_defaults(func=run_db_login)

    logout = dsub.add_parser(
        "logout",
        help="remove a database login (all of them without NAME)",
        description="Remove the certificate and the pg_service.conf section of database "
        "NAME, or of every database without NAME.",
    )
    logout.add_argument("name", metavar="NAME", nargs="?")
    logout.set_defaults(func=run_db_logout)

    config = dsub.add_parser(
        "config",
        help="print connection settings for GUI clients",
        description="Print the host, port, CA, certificate and key paths, user and database "
        "of a database login (NAME may be left out when you are logged in to one).",
    )
    config.add_argument("name", metavar="NAME", nargs="?")
    config.add_argument("--format", choices=["text", "json", "cmd", "jdbc"], default="text",
                        help="cmd: the psql command line; jdbc: a URL for the PostgreSQL JDBC "
                        "driver (its sslkey is the key as PKCS#8 DER, db/NAME.pk8)")
    config.set_defaults(func=run_config)

    env = dsub.add_parser(
        "env",
        help="print PG* variables for a shell: eval \"$(tsh db env)\"",
        description="Print `export PGHOST=... PGPORT=...` for a database login.",
    )
    env.add_argument("name", metavar="NAME", nargs="?")
    env.set_defaults(func=run_env)

    connect = dsub.add_parser(
        "connect",
        help="run psql connected to a database (logging in to it first if needed)",
        description="Run psql with the settings of a database login, logging in to the "
        "database first when there is no valid login for it (or for other --db-user / "
        "--db-name). Arguments after `--` go to psql.",
    )
    _target_arguments(connect)
    connect.add_argument("psql_args", nargs=argparse.REMAINDER, metavar="-- PSQL_ARGS")
    connect.set_defaults(func=run_connect)


def _target_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="the database, as `tsh db ls` shows it")
    parser.add_argument("--db-user", metavar="USER", help="the database user to connect as")
    parser.add_argument("--db-name", metavar="DBNAME", help="the database inside it")


# --- ls ---------------------------------------------------------------------------------------


def format_labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def table(rows: Sequence[Sequence[str]]) -> list[str]:
    """A header row, a dashed line, the rows; columns as wide as their widest cell."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append(" ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            out.append(" ".join("-" * w for w in widths))
    return out


def _valid_logins(profile: Profile) -> dict[str, DbLogin]:
    now = now_utc()
    return {n: r for n, r in profile.db_logins().items() if r.expires > now}


def _list(profile: Profile) -> list[DatabaseEntry]:
    try:
        listed = client_for(profile).databases().databases
    except ApiError as exc:
        raise refused_login(exc, profile) from None
    return sorted(listed, key=lambda d: d.name)


@command
def run_ls(args: argparse.Namespace) -> int:
    profile = active_profile(ProfileStore())
    databases = _list(profile)
    logged = _valid_logins(profile)
    if args.format == "json":
        rows = []
        for d in databases:
            record = logged.get(d.name)
            rows.append({
                **d.model_dump(),
                "logged_in": record is not None,
                "db_user": record.db_user if record else None,
                "db_name": record.db_name if record else None,
                "service": record.service if record else None,
            })
        print(json.dumps(rows, indent=2))
        return 0
    rows_text = [("Name", "Description", "Labels")]
    for d in databases:
        name = f"> {d.name}" if d.name in logged else d.name
        rows_text.append((name, d.description, format_labels(d.labels)))
    print("\n".join(table(rows_text)))
    if not databases:
        print(
            "No databases your roles allow are online; if you expected some, ask an "
            "administrator to check the db agents (`tctl status`) and your roles.",
            file=sys.stderr,
        )
    return 0


# --- login ------------------------------------------------------------------------------------


def _suggest(allowed: list[str]) -> str | None:
    """The default for the service section when the roles allow exactly one literal value."""
    if len(allowed) == 1 and _LITERAL.match(allowed[0]):
        return allowed[0]
    return None


def db_login(
    profile: Profile, name: str, db_user: str | None, db_name: str | None,
    store: ProfileStore,
) -> DbLogin:
    """Get a route certificate for database `name` and write its pg_service.conf section."""
    check_db_name(name)
    client = client_for(profile)
    try:
        entry = next((d for d in client.databases().databases if d.name == name), None)
    except ApiError as exc:
        raise refused_login(exc, profile) from None
    if entry is None:
        raise TshError(
            f"database {name!r} is not one your roles allow, or no agent serves it right "
            "now: `tsh db ls` lists those you can log in to"
        )
    # Flags bind the route; without them psql's user/dbname decide at connection (and the
    # agent's RBAC), with the only value the roles allow written as the section's default.
    key = tls.new_private_key()
    request = DatabaseCertRequest(service=name, db_user=db_user, db_name=db_name,
                                  public_key=public_key_pem(key))
    try:
        issued = client.db_cert(request)
    except ApiError as exc:
        raise refused_login(exc, profile) from None
    identity = check_certificate(
        issued.cert, profile.user_ca_path.read_bytes(), key, "db", now_utc()
    )
    route = identity.route
    if route is None or route.service != name:
        raise TshError(
            f"the cluster issued a certificate for another database than {name!r}; nothing "
            "was saved"
        )
    record = DbLogin(
        name=name,
        db_user=route.db_user or _suggest(entry.allowed_db_users),
        db_name=route.db_name or _suggest(entry.allowed_db_names),
        route_db_user=route.db_user,
        route_db_name=route.db_name,
        expires=identity.expires,
        service=profile.service_name(name),
        service_file=str(service_file_path()),
    )
    with store.locked():
        previous = profile.db_logins().get(name)
        if previous is not None and previous.service_file != record.service_file:
            remove_service(previous)
        profile.write_file(profile.db_key_path(name), tls.private_key_pem(key))
        profile.write_file(profile.db_key_der_path(name), tls.private_key_der(key))
        profile.write_file(profile.db_cert_path(name), issued.cert.encode())
        write_service(profile, record)
        profile.save_db_login(record)
    return record


def _connect_line(record: DbLogin) -> str:
    """Seed 001's psql line: the service, with the db user and db name spelled out."""
    return conninfo(
        [
            ("service", record.service),
            ("user", record.db_user or "<db user>"),
            ("dbname", record.db_name or "<db name>"),
        ]
    )


@command
def run_db_login(args: argparse.Namespace) -> int:
    store = ProfileStore()
    profile = active_profile(store)
    record = db_login(profile, args.name, args.db_user, args.db_name, store)
    as_who = ", ".join(
        f"{what} {value}" + ("" if bound else " (default)")
        for what, value, bound in (
            ("db user", record.db_user, record.route_db_user),
            ("db name", record.db_name, record.route_db_name),
        )
        if value
    )
    print(
        f"Logged in to database {record.name}"
        + (f" as {as_who}" if as_who else "; choose the db user and db name in psql")
        + f" (until {when(record.expires)}).\n"
        f"Section [{record.service}] is in {record.service_file}. Connect with:\n\n"
        f"  psql \"{_connect_line(record)}\"\n\n"
        f"GUI and JDBC clients: tsh db config {record.name} (--format=jdbc for a JDBC URL).\n"
    )
    if os.environ.get("PGSERVICEFILE"):
        print(f"(psql finds it while PGSERVICEFILE={record.service_file} is set, as now.)")
    return 0


# --- logout -----------------------------------------------------------------------------------


@command
def run_db_logout(args: argparse.Namespace) -> int:
    store = ProfileStore()
    profile = store.require_current()
    logins = profile.db_logins()
    if args.name is not None:
        check_db_name(args.name)
        record = logins.get(args.name)
        if record is None:
            raise TshError(
                f"you are not logged in to database {args.name!r}"
                + (f"; logged in: {', '.join(sorted(logins))}" if logins else "")
            )
        chosen = [record]
    else:
        chosen = list(logins.values())
    with store.locked():
        for record in chosen:
            forget_db(profile, record)
    if not chosen:
        print("You are not logged in to any database.")
    for record in chosen:
        print(f"Logged out of database {record.name} (section [{record.service}] removed from "
              f"{record.service_file}).")
    return 0


# --- config, env, connect ---------------------------------------------------------------------


def _chosen_login(profile: Profile, name: str | None) -> DbLogin:
    """The database login `name` (or the only one), valid now."""
    profile.require_valid()
    logins = profile.db_logins()
    if name is None:
        if len(logins) == 1:
            return _valid(next(iter(logins.values())))
        if not logins:
            raise TshError("you are not logged in to any database: run `tsh db login NAME`")
        raise TshError(
            f"you are logged in to several databases ({', '.join(sorted(logins))}): name one"
        )
    check_db_name(name)
    record = logins.get(name)
    if record is None:
        raise TshError(f"you are not logged in to database {name!r}: run `tsh db login {name}`")
    return _valid(record)


def _valid(record: DbLogin) -> DbLogin:
    if record.expires <= now_utc():
        raise TshError(
            f"your certificate for database {record.name!r} expired at {when(record.expires)}; "
            f"run `tsh db login {record.name}`"
        )
    return record


def conninfo(params: Sequence[tuple[str, str]]) -> str:
    """A libpq key=value connection string, values quoted where libpq needs it."""
    parts = []
    for key, value in params:
        if value and not re.search(r"[\s'\\]", value):
            parts.append(f"{key}={value}")
        else:
            quoted = value.replace("\\", "\\\\").replace("'", "\\'")
            parts.append(f"{key}='{quoted}'")
    return " ".join(parts)


def config_of(profile: Profile, record: DbLogin) -> dict[str, str]:
    params = dict(service_params(profile, record))
    return {
        "name": record.name,
        "service": record.service,
        "host": params["host"],
        "port": params["port"],
        "user": record.db_user or "",
        "database": record.db_name or "",
        "sslmode": "verify-full",
        "ca": params["sslrootcert"],
        "cert": params["sslcert"],
        "key": params["sslkey"],
        "key_pk8": str(profile.db_key_der_path(record.name)),
    }


def jdbc_url(settings: dict[str, str]) -> str:
    """A pgjdbc URL with the same TLS settings as the pg_service.conf section. pgjdbc reads
    its key only as PKCS#8 DER (`key_pk8`). A db user or db name the login leaves open is
    shown as a placeholder to fill in, as in the psql line."""
    query = [
        ("user", quote(settings["user"], safe="") if settings["user"] else "<db user>"),
        ("sslmode", settings["sslmode"]),
        ("sslrootcert", quote(settings["ca"], safe="/")),
        ("sslcert", quote(settings["cert"], safe="/")),
        ("sslkey", quote(settings["key_pk8"], safe="/")),
    ]
    database = quote(settings["database"], safe="") if settings["database"] else "<db name>"
    where = join_host_port(settings["host"], int(settings["port"]))
    return f"jdbc:postgresql://{where}/{database}?" + "&".join(
        f"{name}={value}" for name, value in query
    )


def _ensure_der_key(profile: Profile, name: str) -> None:
    """Logins made before tsh wrote the .pk8 file get it from their PEM key."""
    der = profile.db_key_der_path(name)
    if der.exists():
        return
    try:
        key = tls.private_key_der(profile.db_key_path(name).read_bytes())
    except (OSError, ValueError):
        raise TshError(
            f"the key of database {name!r} is missing or unreadable: run `tsh db login {name}`"
        ) from None
    profile.write_file(der, key)


@command
def run_config(args: argparse.Namespace) -> int:
    profile = ProfileStore().require_current()
    record = _chosen_login(profile, args.name)
    settings = config_of(profile, record)
    _ensure_der_key(profile, record.name)
    if args.format == "json":
        print(json.dumps(
            {**settings, "jdbc_url": jdbc_url(settings), "expires": record.expires.isoformat()},
            indent=2,
        ))
    elif args.format == "cmd":
        print(shlex.join(["psql", conninfo(service_params(profile, record))]))
    elif args.format == "jdbc":
        print(jdbc_url(settings))
    else:
        labels = [
            ("Name", "name"), ("Host", "host"), ("Port", "port"), ("User", "user"),
            ("Database", "database"), ("CA", "ca"), ("Cert", "cert"), ("Key", "key"),
            ("JDBC key", "key_pk8"),
        ]
        for label, key in labels:
            print(f"{label + ':':<10}{settings[key]}")
        print(f"{'Valid:':<10}{when(record.expires)} [{remaining(record.expires)}]")
    return 0


ENV_NAMES = [
    ("PGHOST", "host"), ("PGPORT", "port"), ("PGSSLMODE", "sslmode"),
    ("PGSSLROOTCERT", "sslrootcert"), ("PGSSLCERT", "sslcert"), ("PGSSLKEY", "sslkey"),
    ("PGGSSENCMODE", "gssencmode"), ("PGUSER", "user"), ("PGDATABASE", "dbname"),
]


@command
def run_env(args: argparse.Namespace) -> int:
    profile = ProfileStore().require_current()
    record = _chosen_login(profile, args.name)
    params = dict(service_params(profile, record))
    assignments = [f"{var}={shlex.quote(params[key])}" for var, key in ENV_NAMES if key in params]
    print("export " + " ".join(assignments))
    return 0


@command
def run_connect(args: argparse.Namespace) -> int:
    store = ProfileStore()
    profile = active_profile(store)
    record = profile.db_logins().get(check_db_name(args.name))
    stale = (
        record is None
        or record.expires <= now_utc()
        or (args.db_user is not None and record.route_db_user not in (None, args.db_user))
        or (args.db_name is not None and record.route_db_name not in (None, args.db_name))
    )
    if stale:
        record = db_login(profile, args.name, args.db_user, args.db_name, store)
        print(f"Logged in to database {record.name}.", file=sys.stderr)
    assert record is not None
    record = record.model_copy(
        update={
            "db_user": args.db_user or record.db_user,
            "db_name": args.db_name or record.db_name,
        }
    )
    psql = shutil.which("psql")
    if psql is None:
        raise UsageError(
            "psql is not on PATH: install the PostgreSQL client (e.g. `apt install "
            "postgresql-client`), or use `tsh db config` with another client"
        )
    extra = list(args.psql_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    argv = ["psql", conninfo(service_params(profile, record)), *extra]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(psql, argv)  # noqa: S606 -- psql, found on PATH, replaces tsh
    return 0  # pragma: no cover: execv does not return
