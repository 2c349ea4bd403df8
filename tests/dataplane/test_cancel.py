"""Query cancel end to end: psql's Ctrl-C, keys the proxy issued, wrong keys cancel nothing;
behind a load balancer, a cancel that lands on another proxy of the cluster still cancels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dataplane.postgres import messages as pm
from dataplane.proxy.cancel import FanOutLimit
from dataplane.proxy.service import ProxyService
from tests.dataplane import rawclient
from tests.dataplane.conftest import DataPath, Pg
from tests.dataplane.support import Pki, conninfo_for
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


def check_psql_ctrl_c_cancels_within_a_second(path: DataPath, dsn: str) -> None:
    """psql runs pg_sleep(30) through `dsn`; Ctrl-C (SIGINT) stops it within a second."""
    proc = subprocess.Popen(
        ["psql", *PSQL_DEFAULTS, "-c", "select pg_sleep(30)", "-d", dsn],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=client_env(),
    )
    try:
        wait_running(path, "select pg_sleep(30)")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("psql's cancel did not stop the query")
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "canceling statement due to user request" in stderr
    assert elapsed < 1.0, f"psql took {elapsed:.2f} s to come back"


def test_psql_ctrl_c_cancels_a_running_query_within_a_second(path: DataPath) -> None:
    check_psql_ctrl_c_cancels_within_a_second(path, path.dsn(path.cert("alice"), "alice", "main"))


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


def check_only_the_right_key_cancels(
    path: DataPath, session: rawclient.RawSession, cancel_port: int
) -> None:
    """CancelRequests sent to `cancel_port`: a wrong secret or a wrong process id cancels
    nothing, the session's own key cancels its query within a second, and the session goes
    on."""
    assert session.key is not None
    pid, secret = session.key.process_id, session.key.secret_key
    session.send(pm.Query("select pg_sleep(1.5), 'finished'"))
    wait_running(path, "select pg_sleep(1.5)")
    rawclient.send_cancel(cancel_port, pid, secret ^ 1)  # right pid, wrong secret
    rawclient.send_cancel(cancel_port, pid ^ 0x5A5A, secret)  # right secret, wrong pid
    messages = session.read_until_ready()
    assert not any(isinstance(m, pm.ErrorResponse) for m in messages), messages
    assert any(isinstance(m, pm.DataRow) for m in messages)

    session.send(pm.Query("select pg_sleep(30)"))
    wait_running(path, "select pg_sleep(30)")
    started = time.monotonic()
    rawclient.send_cancel(cancel_port, pid, secret)
    errors = [m for m in session.read_until_ready() if isinstance(m, pm.ErrorResponse)]
    assert [(e.sqlstate, e.message) for e in errors] == [
        ("57014", "canceling statement due to user request")
    ]
    assert time.monotonic() - started < 1.0
    assert any(True for _ in session.query("select 1"))  # the session goes on


def test_a_wrong_key_cancels_nothing_and_the_right_one_cancels(path: DataPath) -> None:
    session = rawclient.connect(path.web_port, path.cert("alice"), path.pki.host_ca_file,
                                "alice", "main")
    try:
        check_only_the_right_key_cancels(path, session, path.web_port)
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
    for message in session.read_until_ready():
        if isinstance(message, pm.ErrorResponse):
            assert message.sqlstate == "57014"


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


# -- several proxies behind a load balancer -------------------------------------------------


class RoundRobin:
    """A TCP load balancer in front of proxies: each new connection goes to the next port in
    turn, so a client's cancel connection lands on another proxy than its session."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.chosen: list[int] = []
        self._sockets: list[socket.socket] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            port = self.ports[len(self.chosen) % len(self.ports)]
            self.chosen.append(port)
            upstream = socket.create_connection(("127.0.0.1", port))
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()

    def close(self) -> None:
        for sock in [self._server, *self._sockets]:
            sock.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
        sink.shutdown(socket.SHUT_WR)
    except OSError:
        pass


@dataclass
class TwoProxies:
    path: DataPath
    first: ProxyService
    second: ProxyService

    def port(self, proxy: ProxyService) -> int:
        assert proxy.web_address is not None
        return proxy.web_address[1]


@pytest.fixture
def proxies(pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey) -> Iterator[TwoProxies]:
    """Two proxies of one cluster and an agent connected to both (as the control plane's
    list of proxies tells every agent)."""
    dp = DataPath(pki, pg, signing_key)
    dp.bundle_bytes = dp.next_bundle()
    try:
        first = dp.start_proxy("proxy-a")
        first_node = dp.proxy
        second = dp.start_proxy("proxy-b")
        tunnels = [f"127.0.0.1:{p.tunnel_address[1]}" for p in (first, second)]  # type: ignore[index]
        dp.start_agent("agent-ab", proxies=tunnels)  # routable on the second proxy
        dp.proxy = first_node
        dp.wait_routable("agent-ab")  # and on the first
        yield TwoProxies(dp, first, second)
    finally:
        dp.close()


def test_psql_ctrl_c_cancels_through_a_load_balancer_that_sends_it_to_another_proxy(
    proxies: TwoProxies,
) -> None:
    dp = proxies.path
    first, second = proxies.port(proxies.first), proxies.port(proxies.second)
    balancer = RoundRobin([first, second])
    dsn = conninfo_for(balancer.port, dp.cert("alice"), dp.pki.host_ca_file, "alice", "main")
    try:
        check_psql_ctrl_c_cancels_within_a_second(dp, dsn)
    finally:
        balancer.close()
    assert balancer.chosen == [first, second]  # the session on one proxy, the cancel on the other


def test_through_another_proxy_only_the_sessions_own_key_cancels(proxies: TwoProxies) -> None:
    dp = proxies.path
    session = rawclient.connect(proxies.port(proxies.first), dp.cert("alice"),
                                dp.pki.host_ca_file, "alice", "main")
    try:
        check_only_the_right_key_cancels(dp, session, proxies.port(proxies.second))
    finally:
        session.close()


def test_keys_no_proxy_issued_reach_the_agents_only_within_the_fan_out_limit(
    proxies: TwoProxies, caplog: pytest.LogCaptureFixture,
) -> None:
    """Anyone can send CancelRequests, and each one with a key this proxy did not issue costs
    every agent a data connection: past the limit they are ignored, and the log says so."""
    proxies.second.frontend.fan_out = FanOutLimit(per_client=3, refill=3600)
    agent = proxies.path.agents[0].service
    passed: list[Any] = []
    original = agent.on_cancel

    async def counting(cancel: Any) -> None:
        passed.append(cancel)
        await original(cancel)

    agent.on_cancel = counting  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO, logger="dataplane.proxy.postgres"):
            for n in range(6):
                rawclient.send_cancel(proxies.port(proxies.second), 4242 + n, 0xC0FFEE + n)
    finally:
        del agent.on_cancel
    assert [c.process_id for c in passed] == [4242, 4243, 4244]
    assert "come too often to pass to every agent; some are ignored" in caplog.text
    assert str(0xC0FFEE) not in caplog.text  # never a secret in the log


def test_the_fan_out_limit_counts_each_client_address_and_all_of_them() -> None:
    limit = FanOutLimit(per_client=2, refill=1.0, total=3, total_refill=10.0)
    assert [limit.allow("10.0.0.1", 0.0) for _ in range(3)] == [True, True, False]
    # a client over its own limit spent none of the total: its last goes to another
    # address, and then no one has any
    assert [limit.allow("10.0.0.2", 0.0) for _ in range(2)] == [True, False]
    assert limit.allow("10.0.0.3", 0.0) is False
    assert limit.allow("10.0.0.1", 1.0) is False  # its own bucket refilled, the total not
    assert limit.allow("10.0.0.1", 10.0) is True
