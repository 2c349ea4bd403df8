"""Audit under restarts, on the product's own processes: 10,000 queries from 20 clients
while the control plane is stopped and started twice reach the log exactly once each; the
log's hash chain verifies, and an edited line is found and named."""

from __future__ import annotations

import contextlib
import re
import secrets
import threading
import time
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from tests.e2e.cluster import ClusterError, E2ECluster, Person, wait_for

pytestmark = pytest.mark.slow

CLIENTS = 20
PER_CLIENT = 500
# Each client waits this long between queries, so that the run spans the control plane's
# two restarts (the path itself does thousands of queries a second).
PACE = 0.04
# Queries that must complete while the control plane is down, per outage.
DURING_OUTAGE = 800


class Clients:
    """20 psycopg sessions through the proxy (`service=` from tsh db login), each running
    its share of uniquely worded queries; counts what completed."""

    def __init__(self, person: Person, tag: str) -> None:
        self.person = person
        self.tag = tag
        self.done = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        with person.libpq_env():
            self.conns = [psycopg.connect(person.dsn(), autocommit=True) for _ in range(CLIENTS)]

    def text(self, client: int, n: int) -> str:
        return f"select '{self.tag}-c{client:02d}-q{n:03d}' as audited"

    def start(self) -> None:
        for i in range(CLIENTS):
            thread = threading.Thread(target=self._run, args=(i,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, client: int) -> None:
        try:
            with self.conns[client].cursor() as cur:
                for n in range(PER_CLIENT):
                    cur.execute(self.text(client, n))  # type: ignore[arg-type]
                    row = cur.fetchone()
                    assert row is not None and row[0].endswith(f"q{n:03d}")
                    with self._lock:
                        self.done += 1
                    time.sleep(PACE)
        except Exception as exc:  # reported by the test
            self.errors.append(f"client {client}: {exc!r}")
        finally:
            self.conns[client].close()

    def wait_done(self, count: int, timeout: float = 120.0) -> int:
        """Wait until at least `count` queries completed (or all clients ended)."""
        wait_for(
            f"{count} queries to complete",
            lambda: self.done >= count or not any(t.is_alive() for t in self._threads),
            timeout,
        )
        assert not self.errors, self.errors
        return self.done

    def join(self) -> None:
        for thread in self._threads:
            thread.join(120)
        assert not self.errors, self.errors


def query_events(cluster: E2ECluster, tag: str) -> list[dict]:
    return [e for e in cluster.audit_events("--type=db.session.query") if tag in e.get("query", "")]


def test_10000_queries_while_the_control_plane_restarts_twice_are_logged_once_each(
    cluster: E2ECluster, alice: Person
) -> None:
    assert cluster.auth is not None
    tag = "e2e-audit-" + secrets.token_hex(4)
    clients = Clients(alice, tag)
    clients.start()
    outages = []
    # First outage: an operator's stop (SIGTERM). Second: a crash (SIGKILL), so that a
    # batch may be cut mid-write and its acknowledgement lost.
    for how in ("stop", "kill"):
        clients.wait_done(clients.done + DURING_OUTAGE)
        code = cluster.auth.stop() if how == "stop" else cluster.auth.kill()
        assert code is not None
        down_at = clients.done
        clients.wait_done(down_at + DURING_OUTAGE)
        cluster.auth.start()
        outages.append(clients.done - down_at)
    clients.join()
    assert clients.done == CLIENTS * PER_CLIENT
    assert all(n >= DURING_OUTAGE for n in outages), outages

    expected = {clients.text(c, n) for c in range(CLIENTS) for n in range(PER_CLIENT)}
    events = wait_for(
        "10,000 query events in tctl audit search",
        lambda: (found := query_events(cluster, tag)) and len(found) >= len(expected) and found,
        timeout=90,
        interval=1.0,
    )
    time.sleep(2)  # late re-sends, if any, would arrive now
    events = query_events(cluster, tag)
    ids = Counter(e["id"] for e in events)
    texts = Counter(e["query"] for e in events)
    assert [i for i, n in ids.items() if n > 1] == []
    assert [t for t, n in texts.items() if n > 1] == []
    assert set(texts) == expected
    assert len(events) == CLIENTS * PER_CLIENT
    for event in events[:: len(events) // 50]:
        assert event["user"] == "alice" and event["db_service"] == "pg"
        assert event["outcome"] == {
            "status": "ok",
            "command_tag": "SELECT 1",
            "rows": 1,
            "sqlstate": None,
            "message": None,
        }

    verify = cluster.tctl("audit", "verify", check=False)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "is intact" in verify.stdout


def _a_query_line(cluster: E2ECluster) -> tuple[Path, int, int, bytes]:
    """A db.session.query record of the newest day file: path, line number, byte offset
    of a digit inside its query text, and that digit."""
    day_files = sorted(cluster.audit_dir.glob("*.jsonl"))
    assert day_files, f"no day files in {cluster.audit_dir}"
    path = day_files[-1]
    offset = 0
    with path.open("rb") as f:
        lines = f.readlines()
    candidates = []
    for number, line in enumerate(lines, start=1):
        found = re.search(rb'"query":"select [^"]*?(\d)', line)
        if b'"type":"db.session.query"' in line and found:
            candidates.append((number, offset + found.start(1), found.group(1)))
        offset += len(line)
    assert candidates, f"no query record in {path}"
    number, at, digit = candidates[len(candidates) // 2]
    return path, number, at, digit


def test_tctl_audit_verify_names_an_edited_line(cluster: E2ECluster, alice: Person) -> None:
    alice.query("select 'e2e-audit-edit 7' as audited")
    wait_for(
        "the query's event",
        lambda: any(
            "e2e-audit-edit" in e.get("query", "")
            for e in cluster.audit_events("--type=db.session.query", "--user=alice")
        ),
        timeout=30,
        interval=0.5,
    )
    before = cluster.tctl("audit", "verify", check=False)
    assert before.returncode == 0, before.stdout + before.stderr

    path, number, at, digit = _a_query_line(cluster)
    other = b"1" if digit != b"1" else b"2"
    # One byte of one record's query text, in place (the control plane only appends).
    with path.open("r+b") as f:
        f.seek(at)
        f.write(other)
    try:
        edited = cluster.tctl("audit", "verify", check=False)
    finally:
        with path.open("r+b") as f:
            f.seek(at)
            f.write(digit)
    assert edited.returncode == 1, edited.stdout + edited.stderr
    assert f"was changed: {path}:{number}:" in edited.stdout, edited.stdout
    assert f"the first is at {path}:{number}." in edited.stdout

    restored = cluster.tctl("audit", "verify", check=False)
    assert restored.returncode == 0, restored.stdout + restored.stderr


def test_a_killed_agent_loses_no_event_of_a_query_its_clients_saw_answered(
    cluster: E2ECluster, alice: Person
) -> None:
    """SIGKILL of the db agent while 4 clients run queries as fast as they can: once the
    agent is started again, every query a client got its answer to is in the log, once.
    (The agent sends events every 0.2 s; what was in its memory at the kill comes back
    from its journal, written before each answer goes to the client.)"""
    assert cluster.agent is not None
    tag = "e2e-agent-kill-" + secrets.token_hex(4)
    answered: list[str] = []
    lock = threading.Lock()

    def run(client: int) -> None:
        with contextlib.suppress(psycopg.Error), conns[client].cursor() as cur:
            for n in range(1_000_000):
                text = f"select '{tag}-c{client}-q{n}' as audited"
                cur.execute(text)  # type: ignore[arg-type]
                assert cur.fetchone() is not None
                with lock:
                    answered.append(text)

    with alice.libpq_env():
        conns = [psycopg.connect(alice.dsn(), autocommit=True) for _ in range(4)]
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for("2,000 answered queries", lambda: len(answered) >= 2000, timeout=60)
        assert cluster.agent.kill() is not None
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
    finally:
        for conn in conns:
            conn.close()
    expected = set(answered)
    assert len(expected) == len(answered) >= 2000

    cluster.agent.start()
    cluster.wait_serving(alice)
    def missing() -> set[str]:
        return expected - {e["query"] for e in query_events(cluster, tag)}

    with contextlib.suppress(ClusterError):
        wait_for("the answered queries in tctl audit search", lambda: not missing(), 60, 1.0)
    left = missing()
    assert not left, (
        f"{len(left)} of the {len(expected)} answered queries are not in the log, "
        f"e.g. {sorted(left)[:3]}"
    )
    texts = Counter(e["query"] for e in query_events(cluster, tag))
    assert [t for t, n in texts.items() if n > 1] == []
