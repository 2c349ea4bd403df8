"""The databases a db agent serves, and their labels now.

Two sources (seed 000's `db_service`): the databases in the agent's own configuration or
flags, which may have dynamic label commands, and the bundle's databases whose labels match
one of `db_service.resources` selectors, which follow each activated bundle. A configured
database wins over a bundle database of the same name (the agent's operator decides what
this host connects to). Labels are static plus dynamic; a dynamic label that could not be
computed is absent, so an allow rule selecting on it does not match (fail closed).

Nothing here does I/O: the dynamic labels are computed elsewhere and read through a callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from schemas.api import DatabaseInfo
from schemas.bundle import Bundle, BundleDatabase
from schemas.config import DatabaseConfig, ResourceSelector
from schemas.rbac import labels_match


def configured_database(db: DatabaseConfig) -> BundleDatabase:
    """A database of the agent's own configuration, in the shape the engine serves."""
    return BundleDatabase(
        name=db.name,
        description=db.description,
        labels=dict(db.labels),
        protocol=db.protocol,
        uri=db.uri,
        ca_cert_file=db.ca_cert_file,
        aws_region=db.aws.region if db.aws else None,
        tls_mode=db.tls_mode,
    )


class DatabaseCatalog:
    def __init__(
        self,
        configured: Sequence[DatabaseConfig],
        selectors: Sequence[ResourceSelector] = (),
        dynamic: Callable[[str], Mapping[str, str]] | None = None,
    ) -> None:
        self._configured = {db.name: configured_database(db) for db in configured}
        self._selectors = [dict(s.labels) for s in selectors]
        self._dynamic = dynamic
        self._from_bundle: dict[str, BundleDatabase] = {}
        self._served = dict(self._configured)

    def bundle_activated(self, bundle: Bundle) -> bool:
        """Follow a new bundle's databases; True when the set served changed."""
        selected = {
            name: db
            for name, db in bundle.databases.items()
            if name not in self._configured
            and any(labels_match(sel, db.labels) for sel in self._selectors)
        }
        if selected == self._from_bundle:
            return False
        self._from_bundle = selected
        self._served = {**selected, **self._configured}
        return True

    def served(self) -> Mapping[str, BundleDatabase]:
        return self._served

    def labels(self, name: str) -> Mapping[str, str]:
        db = self._served.get(name)
        if db is None:
            return {}
        labels = dict(db.labels)
        if self._dynamic is not None and name in self._configured:
            labels.update(self._dynamic(name))
        return labels

    def infos(self) -> list[DatabaseInfo]:
        """What heartbeats report: each database with its labels now."""
        return [
            DatabaseInfo(
                name=db.name,
                description=db.description,
                protocol=db.protocol,
                labels=dict(self.labels(db.name)),
            )
            for db in sorted(self._served.values(), key=lambda d: d.name)
        ]
