"""What the proxy and the agent both decide about a session, decided once, here.

`resolve_target(identity, startup)` gives the db user and db name of a connection from its
certificate's route and its StartupMessage: the route's values bind when it sets them (a
StartupMessage asking for others is refused with what to run instead), and the startup's
fill in what the route leaves open. The proxy runs it to refuse early; the agent runs it
again, because it trusts nothing it has not checked itself.

`upstream_parameters(startup)` is what of the client's StartupMessage goes on to
PostgreSQL: everything but `user` and `database` (the agent sets those), protocol options
(`_pq_.*`, which we do not negotiate) and `replication` (refused: a replication connection
is not a database session RBAC reasons about; a false value, which PostgreSQL takes for an
ordinary session, is accepted and dropped).

Nothing here touches the network or a clock.
"""

from __future__ import annotations

from collections.abc import Mapping

from schemas.identity import Identity


class TargetRefused(Exception):
    """The connection asks for something its certificate does not allow; `str()` says what
    and what to do next."""


def _describe(identity: Identity) -> str:
    service = identity.route.service if identity.route else "?"
    return f"the certificate of {identity.username!r} for database {service!r}"


def resolve_target(identity: Identity, startup: Mapping[str, str]) -> tuple[str, str]:
    """(db_user, db_name) for a connection presenting `identity` with these startup
    parameters; raises TargetRefused."""
    route = identity.route
    if route is None:
        raise TargetRefused(
            "the certificate carries no database route: run `tsh db login <database>` and "
            "connect with the files it writes"
        )
    if "replication" in startup and not is_false(startup["replication"]):
        raise TargetRefused(
            "replication connections are not supported through teleport-db; connect without "
            "the replication parameter"
        )
    asked_user = startup.get("user") or None
    asked_db = startup.get("database") or None
    if route.db_user is not None and asked_user is not None and asked_user != route.db_user:
        raise TargetRefused(
            f"{_describe(identity)} is for db user {route.db_user!r}, but the connection asks "
            f"for db user {asked_user!r}: connect as {route.db_user!r}, or run "
            f"`tsh db login --db-user={asked_user} {route.service}` for a certificate for it"
        )
    db_user = route.db_user or asked_user
    if not db_user:
        raise TargetRefused(
            f"{_describe(identity)} names no db user and the connection gives none: pass "
            f"user=..., or run `tsh db login --db-user=<user> {route.service}`"
        )
    if route.db_name is not None and asked_db is not None and asked_db != route.db_name:
        raise TargetRefused(
            f"{_describe(identity)} is for db name {route.db_name!r}, but the connection "
            f"asks for db name {asked_db!r}: connect to {route.db_name!r}, or run "
            f"`tsh db login --db-name={asked_db} {route.service}` for a certificate for it"
        )
    db_name = route.db_name or asked_db or db_user
    return db_user, db_name


def is_false(value: str) -> bool:
    """Whether PostgreSQL reads `value` as a false boolean (as it reads `replication`):
    "false", "no" and "off", any case, or a prefix of them long enough to be unique ("f",
    "n", "of"), or "0"."""
    lowered = value.lower()
    if lowered == "0":
        return True
    if lowered[:1] in ("f", "n"):
        return ("false" if lowered[0] == "f" else "no").startswith(lowered)
    return len(lowered) >= 2 and "off".startswith(lowered)


def upstream_parameters(startup: Mapping[str, str]) -> dict[str, str]:
    """The client's startup parameters that go on to the server (user/database excluded)."""
    return {
        name: value
        for name, value in startup.items()
        if name not in ("user", "database", "replication") and not name.startswith("_pq_.")
    }
