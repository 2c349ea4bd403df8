"""Oversized audit events on the product's own processes: a Bind of a parameter that is six
bytes of JSON per character, and one query string of 7,000 statements, both run through the
proxy and both recorded, cut to fit the control plane's request limit and saying so, never
refused into the agent's rejected.jsonl."""

from __future__ import annotations

import secrets
from typing import Any

import psycopg
import pytest

from tests.e2e.cluster import E2ECluster, Person, wait_for

pytestmark = pytest.mark.slow


def find(cluster: E2ECluster, kind: str, tag: str) -> dict[str, Any]:
    def search() -> dict[str, Any] | None:
        for event in cluster.audit_events(f"--type={kind}", "--user=alice", "--since=5m"):
            if tag in (event.get("query") or ""):
                return event
        return None

    return wait_for(f"the {kind} event of {tag}", search, 30, 0.5)


def test_events_too_large_to_send_whole_are_stored_shortened(
    cluster: E2ECluster, alice: Person
) -> None:
    tag = f"size-{secrets.token_hex(4)}"
    value = "\x01" * 60_000
    with alice.libpq_env(), psycopg.connect(alice.dsn(), autocommit=True) as conn:
        row = conn.execute(
            f"select length(%s::text) as n /* {tag} */", [value]  # type: ignore[arg-type]
        ).fetchone()
        assert row == (60_000,)
        many = f"select 1 /* {tag} */;" + "select 1;" * 7000
        conn.execute(many)  # type: ignore[arg-type]  # no parameters: the simple protocol

    execute = find(cluster, "db.session.postgres.statements.execute", tag)
    (parameter,) = execute["parameters"]
    assert parameter.startswith("\x01") and parameter.endswith("…(truncated)")
    assert "parameters: texts cut to" in execute["shortened"]
    assert execute["outcome"]["status"] == "ok" and execute["outcome"]["rows"] == 1

    query = find(cluster, "db.session.query", tag)
    assert query["query"] == many
    assert query["truncated"] is False
    assert 0 < len(query["outcomes"]) < 7001
    assert all(o["command_tag"] == "SELECT 1" for o in query["outcomes"])
    assert "outcomes: the first" in query["shortened"]

    assert not list((cluster.root / "agent").rglob("rejected.jsonl"))
