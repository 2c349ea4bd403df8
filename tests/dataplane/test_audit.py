"""Audit end to end: a real session through the proxy produces start, query (with
outcomes), parse/bind/execute (with parameters), and end events; COPY data is never kept."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.dataplane.conftest import DataPath
from tests.fixtures.pg import run_pgbench, run_psql

pytestmark = pytest.mark.slow


def session_events(path: DataPath, match: Callable[[Any], bool], timeout: float = 5.0) -> list[Any]:
    """Every event of the one session whose start event matches, once its end is in."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        starts = [e for e in path.audit.of_type("db.session.start") if e.success and match(e)]
        if starts:
            sid = starts[-1].session_id
            events = [e for e in path.audit.events if e.session_id == sid]
            if any(e.type == "db.session.end" for e in events):
                return events
        time.sleep(0.02)
    raise AssertionError("the session's events did not arrive")


def test_a_psql_session_is_audited_with_outcomes(path: DataPath) -> None:
    dsn = path.dsn(path.cert("alice"), "alice", "main", application_name="audit-simple")
    done = run_psql(dsn, ["-v", "ON_ERROR_STOP=0", "-c", "select 42 as answer",
                          "-c", "select 1/0", "-c", "select 1; select 2, 3"])
    assert "division by zero" in done.stderr
    events = session_events(path, lambda e: e.user == "alice" and e.db_name == "main")
    kinds = [e.type for e in events]
    assert kinds[0] == "db.session.start" and kinds[-1] == "db.session.end"
    start = events[0]
    assert (start.cluster, start.user, start.roles, start.db_service, start.db_user,
            start.db_name, start.agent) == (
        "example", "alice", ["admin"], "pg", "alice", "main", "agent-1"
    )
    assert start.client_addr.startswith("127.0.0.1:")
    queries = {e.query: e for e in events if e.type == "db.session.query"}
    answer = queries["select 42 as answer"]
    assert answer.outcome.status == "ok"
    assert (answer.outcome.command_tag, answer.outcome.rows) == ("SELECT 1", 1)
    failed = queries["select 1/0"]
    assert failed.outcome.status == "error"
    assert (failed.outcome.sqlstate, failed.outcome.message) == ("22012", "division by zero")
    two = queries["select 1; select 2, 3"]
    assert [o.command_tag for o in two.outcomes] == ["SELECT 1", "SELECT 1"]
    end = events[-1]
    assert end.bytes_from_client > 0 and end.bytes_from_server > 0
    assert end.duration_ms >= 0
    assert end.reason == "client disconnected"
    assert len({e.id for e in events}) == len(events)


def test_pgbench_prepared_statements_are_audited_with_parameters(path: DataPath) -> None:
    dsn = path.dsn(path.cert("alice"), "alice", "bench", application_name="audit-prepared")
    done = run_pgbench(dsn, ["-n", "-M", "prepared", "-S", "-c", "1", "-t", "5"])
    assert done.returncode == 0, done.stderr
    events = session_events(path, lambda e: e.user == "alice" and e.db_name == "bench")
    parses = [e for e in events if e.type == "db.session.postgres.statements.parse"]
    binds = [e for e in events if e.type == "db.session.postgres.statements.bind"]
    executes = [e for e in events if e.type == "db.session.postgres.statements.execute"]
    assert len(parses) == 1
    assert parses[0].query == "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"
    assert parses[0].statement_name.startswith("P")  # pgbench names its statements
    assert parses[0].outcome.status == "ok"
    assert len(binds) == 5 and len(executes) == 5
    for bind, execute in zip(binds, executes, strict=True):
        assert bind.statement_name == parses[0].statement_name
        assert len(bind.parameters) == 1 and bind.parameters[0].isdigit()
        assert bind.parameter_formats == ["text"]
        assert execute.query == parses[0].query
        assert execute.parameters == bind.parameters
        assert execute.outcome.status == "ok"
        assert execute.outcome.command_tag == "SELECT 1"


def test_a_failing_extended_query_carries_its_sqlstate(path: DataPath, tmp_path: Path) -> None:
    script = tmp_path / "fail.sql"
    # random() keeps the planner from folding the division at Bind: it fails at Execute.
    script.write_text("SELECT :n::int / (random() * 0)::int;\n")
    dsn = path.dsn(path.cert("alice"), "alice", "bench", application_name="audit-failing")
    run_pgbench(dsn, ["-n", "-M", "extended", "-f", str(script), "-D", "n=3", "-t", "1"])
    events = session_events(path, lambda e: e.user == "alice" and e.db_name == "bench")
    executes = [e for e in events if e.type == "db.session.postgres.statements.execute"]
    assert executes and executes[-1].outcome.status == "error"
    assert executes[-1].outcome.sqlstate == "22012"
    assert executes[-1].parameters == ["3"]
    bind = next(e for e in events if e.type == "db.session.postgres.statements.bind")
    assert bind.outcome.status == "ok"


def test_a_statement_that_fails_to_parse_and_what_it_skipped(
    path: DataPath, tmp_path: Path
) -> None:
    script = tmp_path / "bad.sql"
    script.write_text("SELECT no_such_column FROM pgbench_branches WHERE bid = :n;\n")
    dsn = path.dsn(path.cert("alice"), "alice", "bench", application_name="audit-parse")
    run_pgbench(dsn, ["-n", "-M", "extended", "-f", str(script), "-D", "n=1", "-t", "1"])
    events = session_events(path, lambda e: e.user == "alice" and e.db_name == "bench")
    parse = next(e for e in events if e.type == "db.session.postgres.statements.parse")
    assert parse.outcome.status == "error" and parse.outcome.sqlstate == "42703"
    execute = next(e for e in events if e.type == "db.session.postgres.statements.execute")
    assert execute.outcome.message.startswith("not executed")


def test_copy_data_is_never_recorded(path: DataPath, tmp_path: Path) -> None:
    secret_rows = "".join(f"{i},very-secret-{i}\n" for i in range(500))
    source = tmp_path / "rows.csv"
    source.write_text(secret_rows)
    dsn = path.dsn(path.cert("alice"), "alice", "bench")
    done = run_psql(dsn, ["-c", "create temporary table c(i int, s text)",
                          "-c", f"\\copy c from '{source}' csv",
                          "-c", "\\copy c to stdout csv"])
    assert done.returncode == 0, done.stderr
    assert "very-secret-499" in done.stdout
    events = session_events(path, lambda e: e.user == "alice" and e.db_name == "bench")
    dumped = " ".join(e.model_dump_json() for e in events)
    assert "very-secret" not in dumped
    copies = [e for e in events if e.type == "db.session.query" and "copy" in e.query.lower()]
    assert [e.outcome.command_tag for e in copies] == ["COPY 500", "COPY 500"]
