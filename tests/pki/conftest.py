"""Fixtures of the PKI tests: the CAs of one cluster, and of an unrelated one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from control.ca import ClusterCAs
from schemas.identity import Identity

CLUSTER = "example"


@pytest.fixture(scope="session")
def cas(tmp_path_factory: pytest.TempPathFactory) -> ClusterCAs:
    return ClusterCAs.load_or_create(tmp_path_factory.mktemp("cluster"), CLUSTER)


@pytest.fixture(scope="session")
def other_cas(tmp_path_factory: pytest.TempPathFactory) -> ClusterCAs:
    """Another cluster with the SAME name: its CA names equal ours, its keys do not."""
    return ClusterCAs.load_or_create(tmp_path_factory.mktemp("impostor"), CLUSTER)


def login_identity(username: str = "alice", **changes: object) -> Identity:
    fields: dict[str, object] = {
        "username": username,
        "roles": ("dba", "dev"),
        "traits": {"db_users": ("alice", "readonly"), "team": ("payments",)},
        "cluster": CLUSTER,
        "usage": "user",
        "expires": datetime.now(UTC) + timedelta(hours=12),
    }
    fields.update(changes)
    return Identity(**fields)  # type: ignore[arg-type]
