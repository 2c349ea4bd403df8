"""Prepared statements through the proxy, as `tctl audit search` shows them: pgbench
`-M prepared` appears as parse, bind and execute events with their parameters, and a
failing query's event carries its SQLSTATE."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.cluster import E2ECluster, Person, run, wait_for

pytestmark = pytest.mark.slow

SELECT_ONLY = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"


def pgbench(person: Person, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run(["pgbench", *args, person.dsn("bench")], person.env, check=check, timeout=300)


@pytest.fixture(scope="module")
def tables(cluster: E2ECluster) -> None:
    """pgbench's tables in database bench, made through the proxy (COPY and DDL)."""
    alice = cluster.people["alice"]
    pgbench(alice, "-i", "-s", "1", "-q")


def since_now() -> str:
    return (datetime.now(UTC) - timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%S")


def sessions_since(
    cluster: E2ECluster, since: str, what: str, match: Callable[[dict[str, Any]], bool]
) -> list[list[dict[str, Any]]]:
    """alice's ended sessions since `since` with an event that `match`es (the pgbench run
    of the test: `since` has whole seconds, an earlier test's session may fall in it), each
    as its events in log order."""

    def ended() -> list[list[dict[str, Any]]] | None:
        by_session: dict[str, list[dict[str, Any]]] = {}
        for event in cluster.audit_events("--user=alice", "--db=pg", f"--since={since}"):
            by_session.setdefault(event["session_id"], []).append(event)
        found = [
            events
            for events in by_session.values()
            if any(match(e) for e in events) and events[-1]["type"] == "db.session.end"
        ]
        return found or None

    return wait_for(f"the ended session with {what}", ended, 30, 0.5)


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == f"db.session.postgres.statements.{kind}"]


def test_pgbench_prepared_statements_are_audited_with_their_parameters(
    cluster: E2ECluster, alice: Person, tables: None
) -> None:
    since = since_now()
    done = pgbench(alice, "-n", "-M", "prepared", "-S", "-c", "1", "-t", "5")
    assert "number of transactions actually processed: 5/5" in done.stdout, done.stdout
    [events] = sessions_since(
        cluster, since, "the parse of pgbench -S", lambda e: e.get("query") == SELECT_ONLY
    )
    assert events[0]["type"] == "db.session.start" and events[0]["success"] is True

    parses, binds, executes = of(events, "parse"), of(events, "bind"), of(events, "execute")
    assert [p["query"] for p in parses] == [SELECT_ONLY]
    name = parses[0]["statement_name"]
    assert name  # a named (prepared) statement, parsed once
    assert parses[0]["outcome"]["status"] == "ok"
    assert len(binds) == 5 and len(executes) == 5
    for bind, execute in zip(binds, executes, strict=True):
        assert bind["statement_name"] == name
        [aid] = bind["parameters"]
        assert aid.isdigit() and 1 <= int(aid) <= 100_000
        assert bind["parameter_formats"] == ["text"]
        assert execute["statement_name"] == name
        assert execute["query"] == SELECT_ONLY
        assert execute["parameters"] == [aid]
        assert execute["outcome"]["status"] == "ok"
        assert execute["outcome"]["command_tag"] == "SELECT 1"
        assert execute["outcome"]["rows"] == 1
    for event in events:
        assert (event["user"], event["db_service"], event["db_name"], event["db_user"]) == (
            "alice",
            "pg",
            "bench",
            "alice",
        )
        assert event["roles"] == ["access"]

    # The text form people read shows the statement and each execution's parameter.
    text = cluster.tctl(
        "audit", "search", "--user=alice", f"--since={since}", "--type=db.session.postgres",
        "--limit=0",  # `since` has whole seconds: an earlier test's many events may share it
    ).stdout
    assert f"parse {name}: {SELECT_ONLY} -> ok" in text, text
    aid = binds[0]["parameters"][0]
    assert f"execute {SELECT_ONLY} ['{aid}'] -> SELECT 1 (1 row)" in text, text


def test_a_failing_prepared_query_carries_its_sqlstate(
    cluster: E2ECluster, alice: Person, tables: None, tmp_path: Path
) -> None:
    script = tmp_path / "failing.sql"
    # random() keeps the planner from folding the division when binding: it fails when run.
    script.write_text("SELECT :n::int / (random() * 0)::int;\n")
    since = since_now()
    failed = pgbench(
        alice, "-n", "-M", "prepared", "-f", str(script), "-D", "n=3", "-t", "1", check=False
    )
    assert "division by zero" in failed.stderr, failed.stderr
    [events] = sessions_since(
        cluster, since, "the failing execute", lambda e: "random() * 0" in (e.get("query") or "")
    )
    [execute] = of(events, "execute")
    assert execute["parameters"] == ["3"]
    assert execute["outcome"]["status"] == "error"
    assert execute["outcome"]["sqlstate"] == "22012"
    assert execute["outcome"]["message"] == "division by zero"
    assert of(events, "bind")[0]["outcome"]["status"] == "ok"
    text = cluster.tctl("audit", "search", "--user=alice", f"--since={since}").stdout
    assert "-> ERROR 22012: division by zero" in text, text
