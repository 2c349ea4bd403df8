"""What the db agent takes from its surroundings, as small Protocols (and one simple catalog).

- `DbClientCertsLike.get(db_user)`: the client certificate (CN = db user) the agent presents
  to PostgreSQL, with the db CAs; `dataplane.cluster.DbClientCerts` fits it. When it has
  none to give it raises a LookupError whose message says why, which the client sees.
- `DatabasesLike`: the databases this agent serves (`served()`: name -> spec, the bundle's
  `BundleDatabase` shape) and their labels now (`labels(name)`: static and dynamic merged);
  the launcher builds it from `db_service` in teleport.yaml, the flags, and the bundle's
  databases matched by `db_service.resources`. `StaticDatabases` is the simple one.
- `PasswordProvider(database, db_user)`: an async callable giving the password to answer a
  server that asks for one (issue 8 fills it with RDS IAM tokens); None when there is none.
- `AuditSink.emit(event)`: where audit events go; it must not block (queue and return).

Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Protocol, runtime_checkable

from dataplane.tunnel.hosts import AuditSink
from schemas.bundle import BundleDatabase

__all__ = [
    "AuditSink",
    "DatabasesLike",
    "DbClientCertLike",
    "DbClientCertsLike",
    "PasswordProvider",
    "StaticDatabases",
]

PasswordProvider = Callable[[str, str], Awaitable[str | None]]


@runtime_checkable
class DbClientCertLike(Protocol):
    @property
    def cert_pem(self) -> bytes: ...

    @property
    def key_pem(self) -> bytes: ...

    @property
    def db_cas(self) -> tuple[bytes, ...]: ...

    @property
    def expires(self) -> datetime: ...


@runtime_checkable
class DbClientCertsLike(Protocol):
    async def get(self, db_user: str) -> DbClientCertLike: ...


@runtime_checkable
class DatabasesLike(Protocol):
    def served(self) -> Mapping[str, BundleDatabase]: ...

    def labels(self, name: str) -> Mapping[str, str]: ...


class StaticDatabases:
    """A fixed set of databases; `dynamic(name)` (optional) adds labels computed at run time,
    which win over static labels of the same key."""

    def __init__(
        self,
        databases: Iterable[BundleDatabase],
        dynamic: Callable[[str], Mapping[str, str]] | None = None,
    ) -> None:
        self._databases = {db.name: db for db in databases}
        self._dynamic = dynamic

    def served(self) -> Mapping[str, BundleDatabase]:
        return self._databases

    def labels(self, name: str) -> Mapping[str, str]:
        db = self._databases.get(name)
        labels = dict(db.labels) if db is not None else {}
        if self._dynamic is not None:
            labels.update(self._dynamic(name))
        return labels

    def replace(self, databases: Iterable[BundleDatabase]) -> None:
        self._databases = {db.name: db for db in databases}
