"""resolve_target and upstream_parameters: what proxy and agent both decide from a route."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dataplane.tunnel.routing import TargetRefused, resolve_target, upstream_parameters
from schemas.identity import Identity, Route


def identity(db_user: str | None = None, db_name: str | None = None) -> Identity:
    return Identity(
        username="alice", roles=("dba",), cluster="example", usage="db",
        expires=datetime.now(UTC) + timedelta(hours=1),
        route=Route(service="aurora", db_user=db_user, db_name=db_name),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("route", "startup", "target"),
    [
        ((None, None), {"user": "bob", "database": "sales"}, ("bob", "sales")),
        ((None, None), {"user": "bob"}, ("bob", "bob")),  # PostgreSQL's default database
        (("alice", None), {"user": "alice", "database": "x"}, ("alice", "x")),
        (("alice", "main"), {}, ("alice", "main")),
        (("alice", "main"), {"user": "alice", "database": "main"}, ("alice", "main")),
        ((None, "main"), {"user": "carol"}, ("carol", "main")),
    ],
)
def test_route_binds_and_startup_fills_in(
    route: tuple[str | None, str | None], startup: dict[str, str], target: tuple[str, str]
) -> None:
    assert resolve_target(identity(*route), startup) == target


@pytest.mark.parametrize(
    ("route", "startup", "message"),
    [
        (("alice", None), {"user": "bob"}, "`tsh db login --db-user=bob aurora`"),
        ((None, "main"), {"user": "a", "database": "b"}, "`tsh db login --db-name=b aurora`"),
        ((None, None), {}, "names no db user and the connection gives none"),
        ((None, None), {"user": "a", "replication": "database"}, "replication connections"),
    ],
)
def test_mismatches_say_what_to_run(
    route: tuple[str | None, str | None], startup: dict[str, str], message: str
) -> None:
    with pytest.raises(TargetRefused, match=message.replace("`", ".").replace("-", ".")):
        resolve_target(identity(*route), startup)


@pytest.mark.parametrize(
    "value", ["false", "FALSE", "f", "fal", "no", "N", "off", "of", "OFF", "0"]
)
def test_a_false_replication_value_is_an_ordinary_session(value: str) -> None:
    # PostgreSQL reads `replication` as a boolean (or "database"); false means no walsender.
    startup = {"user": "bob", "database": "sales", "replication": value}
    assert resolve_target(identity(), startup) == ("bob", "sales")
    assert "replication" not in upstream_parameters(startup)


@pytest.mark.parametrize(
    "value", ["true", "database", "1", "on", "yes", "o", "", "falsey", "nope", "offf", "00"]
)
def test_any_other_replication_value_is_refused(value: str) -> None:
    with pytest.raises(TargetRefused, match="replication connections are not supported"):
        resolve_target(identity(), {"user": "bob", "replication": value})


def test_only_client_parameters_go_upstream() -> None:
    startup = {"user": "a", "database": "b", "application_name": "psql", "options": "-c x=1",
               "client_encoding": "UTF8", "_pq_.something": "1", "replication": "true"}
    assert upstream_parameters(startup) == {
        "application_name": "psql", "options": "-c x=1", "client_encoding": "UTF8"
    }
