"""Query cancel end to end: psql's Ctrl-C, keys the proxy issued, wrong keys cancel nothing."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dataplane.postgres import messages as pm
from tests.dataplane import rawclient
from tests.dataplane.conftest import DataPath
from tests.fixtures.pg import PSQL_DEFAULTS, client_env

pytestmark = pytest.mark.slow


def wait_running(path: DataPath, pattern: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    sql = (
        "select count(*) from pg_stat_activity where state = 'active' "
        f"and query like '{pattern}%'"
    )
    while time.monotonic() < deadline:
        if path.pg.server.psql_admin(sql).strip() != "0":
            return
        time.sleep(0.05)
    raise AssertionError(f"no running query like {pattern!r}")


def test_psql_ctrl_c_cancels_a_running_query_within_a_second(path: DataPath) -> None:
    dsn = path.dsn(path.cert("alice"), "alice", "main")
    proc = subprocess.Popen(
        ["psql", *PSQL_DEFAULTS, "-c", "select pg_sleep(30)", "-d", dsn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(),
    )
    try:
        wait_running(path, "select pg_sleep(30)")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "canceling statement due to user request" in stderr
    assert elapsed < 1.0, f"psql took {elapsed:.2f} s to come back"


def test_the_client_sees_the_servers_process_id_and_the_proxys_secret(
    path: DataPath,
) -> None:
    """pg_backend_pid() is the pid in the client's BackendKeyData, as on a direct connection
    (tools cancel with pg_cancel_backend(pid) and match NOTIFY senders by it); the secret
    is the proxy's, never the server's."""
    one = rawclient.connect(path.web_port, path.cert("alice"), path.pki.host_ca_file, "alice",
                            "main")
    two = rawclient.connect(path.web_port, path.cert("alice"), path.pki.host_ca_file, "alice",
                            "main")
    try:
        assert one.key is not None and two.key is not None
        for session in (one, two):
            row = next(r for r in session.query("select pg_backend_pid()")
                       if isinstance(r, pm.DataRow))
            assert int(row.values[0] or b"0") == session.key.process_id  # type: ignore[union-attr]
        assert one.key.process_id != two.key.process_id
        assert one.key.secret_key != two.key.secret_key
        engine = path.agents[0].service.engine  # type: ignore[union-attr]
        given = {(k.process_id, k.secret_key) for k in (one.key, two.key)}
        ours = [s for s in engine.registry
                if (s.client_key.process_id, s.client_key.secret_key) in given]
        assert len(ours) == 2
        for live in ours:
            assert live.server_key is not None
            assert live.server_key.process_id == live.client_key.process_id
            assert live.server_key.secret_key != live.client_key.secret_key
    finally:
        one.close()
        two.close()


def test_a_wrong_key_cancels_nothing_and_the_right_one_cancels(path: DataPath) -> None:
    session = rawclient.connect(path.web_port, path.cert("alice"), path.pki.host_ca_file,
                                "alice", "main")
    try:
        assert session.key is not None
        pid, secret = session.key.process_id, session.key.secret_key
        session.send(pm.Query("select pg_sleep(1.5), 'finished'"))
        wait_running(path, "select pg_sleep(1.5)")
        rawclient.send_cancel(path.web_port, pid, secret ^ 1)  # right pid, wrong secret
        rawclient.send_cancel(path.web_port, pid ^ 0x5A5A, secret)  # right secret, wrong pid
        messages = []
        while True:
            message = session.read_message()
            messages.append(message)
            if isinstance(message, pm.ReadyForQuery):
                break
        assert not any(isinstance(m, pm.ErrorResponse) for m in messages), messages
        assert any(isinstance(m, pm.DataRow) for m in messages)

        session.send(pm.Query("select pg_sleep(30)"))
        wait_running(path, "select pg_sleep(30)")
        started = time.monotonic()
        rawclient.send_cancel(path.web_port, pid, secret)
        while True:
            message = session.read_message()
            if isinstance(message, pm.ErrorResponse):
                assert message.sqlstate == "57014"
                assert message.message == "canceling statement due to user request"
            if isinstance(message, pm.ReadyForQuery):
                break
        assert time.monotonic() - started < 1.0
        assert any(True for _ in session.query("select 1"))  # the session goes on
    finally:
        session.close()


@contextlib.contextmanager
def held(owner: Any, method: str) -> Iterator[threading.Event]:
    """`owner.method` (a coroutine method of an agent running in its own thread) waits
    until the yielded event is set, then does its work."""
    gate = threading.Event()
    original = getattr(owner, method)

    async def waiting(*args: Any) -> Any:
        await asyncio.to_thread(gate.wait, 10)
        return await original(*args)

    setattr(owner, method, waiting)
    try:
        yield gate
    finally:
        gate.set()
        delattr(owner, method)


def check_cancel_closes_after_delivery(
    path: DataPath, session: rawclient.RawSession, gate: threading.Event
) -> None:
    """The client's cancel connection stays open while the agent holds the cancel, and
    closes once it was delivered; the running query is cancelled by then. (Clients such as
    asyncpg and libpq wait for that close before their next statement: a close that came
    first let a late cancel hit the statement after.)"""
    assert session.key is not None
    session.send(pm.Query("select pg_sleep(30)"))
    wait_running(path, "select pg_sleep(30)")
    closed = threading.Event()

    def cancel() -> None:
        rawclient.send_cancel(path.web_port, session.key.process_id, session.key.secret_key)
        closed.set()

    sender = threading.Thread(target=cancel)
    sender.start()
    try:
        assert not closed.wait(0.5), "the cancel connection closed before the cancel was sent"
        gate.set()
        assert closed.wait(5), "the cancel connection stayed open after the cancel was sent"
    finally:
        gate.set()
        sender.join(10)
    while True:
        message = session.read_message()
        if isinstance(message, pm.ErrorResponse):
            assert message.sqlstate == "57014"
        if isinstance(message, pm.ReadyForQuery):
            break


def test_the_cancel_connection_closes_once_the_cancel_reached_the_server(
    path: DataPath,
) -> None:
    session = rawclient.connect(path.web_port, path.cert("alice"), path.pki.host_ca_file,
                                "alice", "main")
    try:
        with held(path.agents[0].service, "on_cancel") as gate:
            check_cancel_closes_after_delivery(path, session, gate)
    finally:
        session.close()
