"""What the `tsh` commands share once a person is logged in: the current profile, a client
that presents its certificate, the pg_service.conf sections of its databases, and the
status block `tsh login` and `tsh status` print.

Never prints or logs a key; never sends a request with an expired login (the expiry message
comes from here, before any network call).
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from pathlib import Path

from dataplane.tsh.client import ProxyClient, parse_proxy, verified_context
from dataplane.tsh.errors import SESSION_EXPIRED, TshError
from dataplane.tsh.pgservice import ServiceFile, ServiceFileError
from dataplane.tsh.profile import DbLogin, Profile, ProfileStore, now_utc
from schemas.durations import format_duration
from transport.http import ApiError


def client_for(profile: Profile) -> ProxyClient:
    """A client that verifies the proxy with the pinned host CA (and the system store) and
    presents the login certificate."""
    host, port = parse_proxy(profile.data.proxy)
    try:
        context = verified_context(
            profile.host_ca_path.read_bytes(),
            profile.cert_path.read_bytes(),
            profile.key_path.read_bytes(),
        )
    except FileNotFoundError as exc:
        raise TshError(
            f"the profile in {profile.dir} is incomplete ({Path(exc.filename).name} is "
            f"missing): run `{profile.login_hint()}` again"
        ) from None
    return ProxyClient(host, port, context)


def refused_login(exc: ApiError, profile: Profile) -> TshError | ApiError:
    """A 401 from an endpoint that needs the login certificate means: log in again."""
    if exc.status == 401:
        if "expired" in exc.message:
            return TshError(f"{SESSION_EXPIRED} ({profile.login_hint()})")
        return TshError(
            f"the cluster did not accept your login: {exc.message}; run "
            f"`{profile.login_hint()}`"
        )
    return exc


def active_profile(store: ProfileStore) -> Profile:
    """The current profile, with a valid login."""
    return store.require_current().require_valid()


# --- status ---------------------------------------------------------------------------------


def when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def remaining(expires: datetime, now: datetime | None = None) -> str:
    left = expires - (now or now_utc())
    if left <= timedelta(0):
        return "EXPIRED"
    return f"valid for {format_duration(timedelta(seconds=int(left.total_seconds())))}"


def describe_db(record: DbLogin, now: datetime | None = None) -> str:
    state = "" if record.expires > (now or now_utc()) else ", EXPIRED"
    return f"{record.name} (user {record.db_user}, db {record.db_name}{state})"


def status_lines(profile: Profile, current: bool = True) -> list[str]:
    data = profile.data
    dbs = [describe_db(r) for r in profile.db_logins().values()]
    lines = [
        f"{'>' if current else ' '} Profile URL:  https://{data.proxy}",
        f"  Logged in as: {data.user}",
        f"  Cluster:      {data.cluster}",
        f"  Roles:        {', '.join(data.roles) or '-'}",
        f"  Valid until:  {when(data.expires)} [{remaining(data.expires)}]",
    ]
    if dbs:
        lines.append(f"  Databases:    {dbs[0]}")
        lines += [f"                {d}" for d in dbs[1:]]
    return lines


# --- pg_service.conf ------------------------------------------------------------------------


def service_params(profile: Profile, record: DbLogin) -> list[tuple[str, str]]:
    """The libpq parameters of a database login, in the order the section lists them."""
    host, port = parse_proxy(profile.data.postgres_addr)
    params = [
        ("host", host),
        ("port", str(port)),
        ("sslmode", "verify-full"),
        ("sslrootcert", str(profile.host_ca_path)),
        ("sslcert", str(profile.db_cert_path(record.name))),
        ("sslkey", str(profile.db_key_path(record.name))),
        ("gssencmode", "disable"),
    ]
    if record.db_user:
        params.append(("user", record.db_user))
    if record.db_name:
        params.append(("dbname", record.db_name))
    return params


def write_service(profile: Profile, record: DbLogin) -> None:
    try:
        ServiceFile(Path(record.service_file)).upsert(
            record.service, service_params(profile, record)
        )
    except ServiceFileError as exc:
        raise TshError(str(exc), 2) from None


def remove_service(record: DbLogin) -> None:
    with contextlib.suppress(FileNotFoundError):
        ServiceFile(Path(record.service_file)).remove([record.service])


def forget_db(profile: Profile, record: DbLogin) -> None:
    """Remove a database login: its pg_service.conf section, certificate, key and record."""
    remove_service(record)
    profile.forget_db_login(record.name)
