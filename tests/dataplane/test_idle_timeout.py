"""`proxy_service.client_idle_timeout`: a session whose client sends nothing for that long
is ended with a FATAL error that says why (at a message boundary, by the agent, which
audits the end); a client that keeps talking is never cut off. Distributed and all-in-one,
and the teleport.yaml wiring."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dataplane.postgres import messages as m
from dataplane.runtime import idle_timeout
from schemas.config import ProxyService as ProxyConfig
from schemas.config import load_config
from tests.dataplane import rawclient
from tests.dataplane.conftest import DataPath, Pg
from tests.dataplane.support import Pki
from tests.dataplane.test_allinone import AllInOne
from tests.fixtures.pg import PSQL_DEFAULTS, client_env

TIMEOUT = 1.0
MESSAGE = (
    "terminating connection due to idle-session timeout: the client sent nothing for 1s "
    "(client_idle_timeout)"
)


@pytest.mark.parametrize(
    ("text", "seconds"), [(None, None), ("90s", 90.0), ("1h30m", 5400.0), ("250ms", 0.25)]
)
def test_the_yaml_setting_in_seconds(text: str | None, seconds: float | None) -> None:
    assert idle_timeout(ProxyConfig(client_idle_timeout=text)) == seconds


def test_teleport_yaml_carries_it_to_the_proxy(tmp_path: Path) -> None:
    text = "proxy_service:\n  enabled: yes\n  client_idle_timeout: 15m\n"
    config = load_config(tmp_path / "teleport.yaml", text)
    assert idle_timeout(config.proxy_service) == 900.0


@pytest.fixture(scope="module")
def idle(pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey) -> Iterator[DataPath]:
    dp = DataPath(pki, pg, signing_key)
    dp.bundle_bytes = dp.next_bundle()
    try:
        dp.start_proxy("proxy-idle", client_idle_timeout=TIMEOUT)
        dp.start_agent("agent-idle")
        yield dp
    finally:
        dp.close()


def end_event(dp: DataPath, session_count: int, timeout: float = 5.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ends = dp.audit.of_type("db.session.end")
        if len(ends) >= session_count:
            return ends[session_count - 1]
        time.sleep(0.02)
    raise AssertionError("no db.session.end event")


@pytest.mark.slow
def test_an_idle_psql_is_told_why_it_was_disconnected(idle: DataPath) -> None:
    dsn = idle.dsn(idle.cert("alice"), "alice", "main")
    proc = subprocess.Popen(
        ["psql", *PSQL_DEFAULTS, "-d", dsn], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=client_env(),
    )  # fmt: skip
    assert proc.stdin is not None
    proc.stdin.write("select 'first';\n")
    proc.stdin.flush()
    time.sleep(TIMEOUT + 1.5)  # idle past the timeout
    out, err = proc.communicate("select 'second';\n", timeout=30)
    assert "first" in out
    assert f"FATAL:  {MESSAGE}" in err
    assert "HINT:  reconnect to go on" in err


@pytest.mark.slow
def test_the_end_reaches_a_raw_client_unasked_and_is_audited(idle: DataPath) -> None:
    idle.audit.clear()
    session = rawclient.connect(idle.web_port, idle.cert("alice"), idle.pki.host_ca_file,
                                "alice", "main")
    try:
        session.query("select 1")
        started = time.monotonic()
        error = session.read_message()  # nothing sent: the proxy speaks first
        waited = time.monotonic() - started
        assert isinstance(error, m.ErrorResponse)
        assert (error.severity, error.sqlstate, error.message) == ("FATAL", "57P05", MESSAGE)
        with pytest.raises(ConnectionError):
            session.read_message()
    finally:
        session.close()
    assert TIMEOUT * 0.9 <= waited < TIMEOUT + 1.0
    event = end_event(idle, 1)
    assert event.reason == MESSAGE  # type: ignore[attr-defined]
    assert event.user == "alice"  # type: ignore[attr-defined]


@pytest.mark.slow
def test_a_client_that_keeps_talking_is_never_cut_off(idle: DataPath) -> None:
    session = rawclient.connect(idle.web_port, idle.cert("alice"), idle.pki.host_ca_file,
                                "alice", "main")
    try:
        deadline = time.monotonic() + TIMEOUT * 3
        count = 0
        while time.monotonic() < deadline:
            answer = session.query("select 1")
            assert not any(isinstance(msg, m.ErrorResponse) for msg in answer), answer
            count += 1
            time.sleep(TIMEOUT / 3)
        assert count >= 8
    finally:
        session.close()


@pytest.mark.slow
def test_without_a_timeout_an_idle_session_stays(path: DataPath) -> None:
    session = rawclient.connect(path.web_port, path.cert("alice"), path.pki.host_ca_file,
                                "alice", "main")
    try:
        time.sleep(TIMEOUT + 1.0)
        answer = session.query("select 'still here'")
        rows = [msg.values for msg in answer if isinstance(msg, m.DataRow)]
        assert rows == [(b"still here",)]
    finally:
        session.close()


@pytest.mark.slow
def test_the_all_in_one_ends_idle_sessions_too(
    pki: Pki, pg: Pg, signing_key: Ed25519PrivateKey
) -> None:
    dp = AllInOne(pki, pg, signing_key)
    dp.bundle_bytes = dp.next_bundle()
    try:
        dp.start_all(client_idle_timeout=TIMEOUT)
        session = rawclient.connect(dp.web_port, dp.cert("alice"), dp.pki.host_ca_file,
                                    "alice", "main")
        try:
            error = session.read_message()
        finally:
            session.close()
        assert isinstance(error, m.ErrorResponse)
        assert (error.sqlstate, error.message) == ("57P05", MESSAGE)
        assert end_event(dp, 1).reason == MESSAGE  # type: ignore[attr-defined]
    finally:
        dp.close()
