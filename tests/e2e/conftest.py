"""Fixtures of the end-to-end tests: one cluster of the product's own processes for the
session (`cluster`), with alice and bob signed up and logged in to database `pg`.

Tests stop, kill and restart its services as an operator would; the autouse `heal`
fixture starts again whatever a test left stopped, so that the next test finds the
cluster whole. A test that changes policy puts it back itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import E2ECluster, Person


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ECluster]:
    running = E2ECluster.create(Path(tmp_path_factory.mktemp("e2e")))
    try:
        running.add_person("alice", ["alice"], ["postgres", "bench"])
        running.add_person("bob", ["bob"], ["postgres"])
        yield running
    finally:
        running.close()


@pytest.fixture(autouse=True)
def heal(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "cluster" in request.fixturenames:
        cluster: E2ECluster = request.getfixturevalue("cluster")
        cluster.heal()


@pytest.fixture
def alice(cluster: E2ECluster) -> Person:
    return cluster.people["alice"]


@pytest.fixture
def bob(cluster: E2ECluster) -> Person:
    return cluster.people["bob"]
