"""The codec and the authenticator against a real PostgreSQL 15, and real psql and pgbench
through a decoding relay.

A throwaway cluster is started in a temporary directory as the `postgres` OS user (initdb
with --auth=scram-sha-256 and a password file, a free loopback port, no TLS). A plain socket
then logs in with our encoder, decoder and ClientAuthenticator using SCRAM, md5 and
password (pg_hba.conf is rewritten and reloaded between them), runs queries, COPY,
LISTEN/NOTIFY, cancels a query with a CancelRequest, and checks the SQLSTATEs the server
sends against our constants. Then psql and pgbench talk to the server through a relay that
decodes every byte both ways with StartupDecoder / MessageDecoder and MessageScanner.

The server helper here is private to this module on purpose.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dataplane.postgres import (
    BACKEND,
    FRONTEND,
    AuthenticationRejected,
    ClientAuthenticator,
    MessageDecoder,
    MessageScanner,
    StartupDecoder,
    encode,
    errors,
)
from dataplane.postgres import messages as m

SUPERUSER = "postgres"
SUPERPASS = "sup3r-Secret"

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------ a private throwaway server


def _as_postgres() -> dict[str, object]:
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam("postgres")
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


@dataclass
class Server:
    base: Path
    port: int

    @property
    def data(self) -> Path:
        return self.base / "data"

    def run(self, *args: str) -> None:
        env = {"PATH": os.environ["PATH"], "LC_ALL": "C", "HOME": str(self.base)}
        done = subprocess.run(
            args, env=env, capture_output=True, text=True, timeout=60, check=False, **_as_postgres()
        )
        assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout}\n{done.stderr}"

    def use_hba(self, method: str, user: str) -> None:
        """Allow `user` with `method` on loopback, everyone else with SCRAM; reload; wait."""
        (self.data / "pg_hba.conf").write_text(
            f"host all {user} 127.0.0.1/32 {method}\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        self.run("pg_ctl", "-D", str(self.data), "reload")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    base = Path(tempfile.mkdtemp(prefix="pgwire-test-"))
    ids = _as_postgres()
    if ids:
        os.chown(base, ids["user"], ids["group"])  # type: ignore[arg-type]
    srv = Server(base, _free_port())
    started = False
    try:
        pwfile = base / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, SUPERPASS.encode() + b"\n")
        os.close(fd)
        if ids:
            os.chown(pwfile, ids["user"], ids["group"])  # type: ignore[arg-type]
        srv.run(
            "initdb",
            "-D",
            str(srv.data),
            "-U",
            SUPERUSER,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--no-sync",
            "-E",
            "UTF8",
            "--locale=C",
        )
        options = (
            f"-p {srv.port} -c listen_addresses=127.0.0.1 -k {base} -c fsync=off "
            "-c max_connections=20 -c shared_buffers=16MB"
        )
        srv.run(
            "pg_ctl",
            "-D",
            str(srv.data),
            "-l",
            str(base / "log"),
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "start",
        )
        started = True
        yield srv
    finally:
        if started:
            srv.run("pg_ctl", "-D", str(srv.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------ a client made of our codec


class StartupFailed(Exception):
    def __init__(self, error: m.ErrorResponse) -> None:
        super().__init__(str(error))
        self.error = error


class Session:
    """A PostgreSQL client built from the codec and ClientAuthenticator over a plain socket."""

    def __init__(self, port: int, user: str, password: str | None, database: str = "postgres"):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.decoder = MessageDecoder(BACKEND)
        self.received = bytearray()
        self.send(m.StartupMessage({"user": user, "database": database}))
        self.auth = ClientAuthenticator(user, password)
        try:
            while not self.auth.done:
                self.send(*self.auth.receive(self.recv()))  # type: ignore[arg-type]
            self.parameters: dict[str, str] = {}
            self.key: m.BackendKeyData | None = None
            while not isinstance(msg := self.recv(), m.ReadyForQuery):
                if isinstance(msg, m.ParameterStatus):
                    self.parameters[msg.name] = msg.value
                elif isinstance(msg, m.BackendKeyData):
                    self.key = msg
                elif isinstance(msg, m.ErrorResponse):  # e.g. the database does not exist
                    raise StartupFailed(msg)
        except BaseException:
            self.sock.close()
            raise

    def send(self, *messages: m.Message) -> None:
        if messages:
            self.sock.sendall(b"".join(encode(x) for x in messages))

    def recv(self) -> object:
        while (msg := self.decoder.next_message()) is None:
            data = self.sock.recv(65536)
            if not data:
                self.decoder.receive_eof()
                if (msg := self.decoder.next_message()) is None:
                    raise ConnectionError("the server closed the connection")
                return msg
            self.received += data
            self.decoder.receive_data(data)
        return msg

    def until_ready(self) -> list[object]:
        out = []
        while not isinstance(msg := self.recv(), m.ReadyForQuery):
            out.append(msg)
        return [*out, msg]

    def query(self, sql: str) -> list[object]:
        self.send(m.Query(sql))
        return self.until_ready()

    def close(self) -> None:
        try:
            self.send(m.Terminate())
        finally:
            self.sock.close()


def rows(messages: list[object]) -> list[tuple[bytes | None, ...]]:
    return [x.values for x in messages if isinstance(x, m.DataRow)]


def ok(messages: list[object]) -> list[object]:
    errs = [x for x in messages if isinstance(x, m.ErrorResponse)]
    assert not errs, str(errs[0])
    return messages


def login_with(server: Server, method: str, user: str, password: str) -> Session:
    """Log in, retrying while the postmaster has not yet applied a pg_hba.conf reload."""
    deadline = time.monotonic() + 10
    while True:
        session = Session(server.port, user, password)
        if session.auth.method == method or time.monotonic() > deadline:
            return session
        session.close()
        time.sleep(0.05)


# ------------------------------------------------------------------ the tests


def test_scram_login_then_select_1(server: Server) -> None:
    s = Session(server.port, SUPERUSER, SUPERPASS)
    try:
        assert s.auth.method == "scram-sha-256"
        assert s.parameters["server_version"].startswith("15")
        assert s.parameters["client_encoding"] == "UTF8"
        assert s.key is not None and s.key.process_id > 0
        assert s.query("SELECT 1") == [
            m.RowDescription((m.FieldDescription("?column?", 0, 0, 23, 4, -1, 0),)),
            m.DataRow((b"1",)),
            m.CommandComplete("SELECT 1"),
            m.ReadyForQuery("I"),
        ]
    finally:
        s.close()


def test_md5_and_password_logins_after_a_pg_hba_reload(server: Server) -> None:
    admin = Session(server.port, SUPERUSER, SUPERPASS)
    try:
        ok(admin.query("SET password_encryption = 'md5'"))
        ok(admin.query("CREATE ROLE md5user LOGIN PASSWORD 'md5-Secret'"))
        ok(admin.query("RESET password_encryption"))
        ok(admin.query("CREATE ROLE plainuser LOGIN PASSWORD 'plain-Secret'"))
        server.use_hba("md5", "md5user")
        s = login_with(server, "md5", "md5user", "md5-Secret")
        assert s.auth.method == "md5"
        assert rows(ok(s.query("SELECT 1"))) == [(b"1",)]
        s.close()
        server.use_hba("password", "plainuser")
        s = login_with(server, "password", "plainuser", "plain-Secret")
        assert s.auth.method == "password"
        assert rows(ok(s.query("SELECT current_user"))) == [(b"plainuser",)]
        s.close()
        with pytest.raises(AuthenticationRejected) as caught:
            Session(server.port, "plainuser", "wrong")
        assert caught.value.sqlstate == errors.INVALID_PASSWORD
    finally:
        server.use_hba("scram-sha-256", "all")
        admin.close()


def test_a_non_ascii_password_is_prepared_as_the_server_prepares_it(server: Server) -> None:
    password = "p\u00e4\u00a0ss\u2168"  # a non-ASCII space and a Roman numeral: SASLprep maps both
    admin = Session(server.port, SUPERUSER, SUPERPASS)
    try:
        ok(admin.query(f"CREATE ROLE unicode_user LOGIN PASSWORD '{password}'"))
    finally:
        admin.close()
    s = Session(server.port, "unicode_user", password)
    assert s.auth.method == "scram-sha-256"
    s.close()
    with pytest.raises(AuthenticationRejected):
        Session(server.port, "unicode_user", "p\u00e4 ssVIII")


def test_login_errors_carry_the_sqlstates_we_name(server: Server) -> None:
    with pytest.raises(AuthenticationRejected) as wrong:
        Session(server.port, SUPERUSER, "not-the-password")
    assert wrong.value.sqlstate == errors.INVALID_PASSWORD
    assert 'password authentication failed for user "postgres"' in str(wrong.value)
    with pytest.raises(StartupFailed) as missing:  # after AuthenticationOk: not an auth error
        Session(server.port, SUPERUSER, SUPERPASS, database="nope")
    assert missing.value.error.sqlstate == errors.INVALID_CATALOG_NAME
    assert missing.value.error.severity == "FATAL"


def test_extended_protocol_with_binary_parameters_and_results(server: Server) -> None:
    s = Session(server.port, SUPERUSER, SUPERPASS)
    try:
        s.send(
            m.Parse("add", "SELECT $1::int4 + 1 AS answer, $2::text AS t", (23, 25)),
            m.Describe("S", "add"),
            m.Bind("", "add", (1, 0), ((41).to_bytes(4, "big"), None), (1, 0)),
            m.Execute("", 0),
            m.Close("S", "add"),
            m.Sync(),
        )
        reply = s.until_ready()
        assert reply == [
            m.ParseComplete(),
            m.ParameterDescription((23, 25)),
            m.RowDescription(
                (
                    m.FieldDescription("answer", 0, 0, 23, 4, -1, 0),
                    m.FieldDescription("t", 0, 0, 25, -1, -1, 0),
                )
            ),
            m.BindComplete(),
            m.DataRow(((42).to_bytes(4, "big"), None)),
            m.CommandComplete("SELECT 1"),
            m.CloseComplete(),
            m.ReadyForQuery("I"),
        ]
    finally:
        s.close()


def test_copy_out_and_in_and_notifications(server: Server) -> None:
    s = Session(server.port, SUPERUSER, SUPERPASS)
    try:
        out = ok(s.query("COPY (SELECT g FROM generate_series(1, 3) g) TO STDOUT"))
        assert out == [
            m.CopyOutResponse(0, (0,)),
            m.CopyData(b"1\n"),
            m.CopyData(b"2\n"),
            m.CopyData(b"3\n"),
            m.CopyDone(),
            m.CommandComplete("COPY 3"),
            m.ReadyForQuery("I"),
        ]
        ok(s.query("CREATE TEMP TABLE t (a int, b text)"))
        s.send(m.Query("COPY t FROM STDIN"))
        assert s.recv() == m.CopyInResponse(0, (0, 0))
        s.send(m.CopyData(b"1\tone\n2\t\\N\n"), m.CopyDone())
        assert s.until_ready() == [m.CommandComplete("COPY 2"), m.ReadyForQuery("I")]
        assert rows(s.query("SELECT a, b FROM t ORDER BY a")) == [(b"1", b"one"), (b"2", None)]
        s.send(m.Query("COPY t FROM STDIN"))
        assert isinstance(s.recv(), m.CopyInResponse)
        s.send(m.CopyFail("client gave up"))
        failed = s.until_ready()
        assert isinstance(failed[0], m.ErrorResponse) and "client gave up" in (
            failed[0].message or ""
        )
        ok(s.query("LISTEN news"))
        notified = ok(s.query("NOTIFY news, 'hello'"))
        assert s.key is not None
        assert m.NotificationResponse(s.key.process_id, "news", "hello") in notified
    finally:
        s.close()


def test_cancel_request_with_the_right_key_only(server: Server) -> None:
    s = Session(server.port, SUPERUSER, SUPERPASS)
    try:
        assert s.key is not None
        s.send(m.Query("SELECT pg_sleep(30)"))

        def cancel(secret: int) -> None:
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as c:
                c.sendall(encode(m.CancelRequest(s.key.process_id, secret)))  # type: ignore[union-attr]
                assert c.recv(1) == b""  # the server just closes the cancel connection

        cancel(s.key.secret_key ^ 1)  # a wrong key cancels nothing
        s.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):
            s.sock.recv(1, socket.MSG_PEEK)
        s.sock.settimeout(10)
        started = time.monotonic()
        cancel(s.key.secret_key)
        reply = s.until_ready()
        assert time.monotonic() - started < 5
        errs = [x for x in reply if isinstance(x, m.ErrorResponse)]
        assert [e.sqlstate for e in errs] == [errors.QUERY_CANCELED]
        assert reply[-1] == m.ReadyForQuery("I")
    finally:
        s.close()


def test_termination_and_privilege_errors_carry_the_sqlstates_we_name(server: Server) -> None:
    admin = Session(server.port, SUPERUSER, SUPERPASS)
    victim = Session(server.port, SUPERUSER, SUPERPASS)
    try:
        ok(admin.query("CREATE ROLE lowly LOGIN PASSWORD 'lowly-Secret'"))
        ok(admin.query("CREATE TABLE secret_table (x int)"))
        lowly = Session(server.port, "lowly", "lowly-Secret")
        denied = lowly.query("SELECT * FROM secret_table")
        assert isinstance(denied[0], m.ErrorResponse)
        assert denied[0].sqlstate == errors.INSUFFICIENT_PRIVILEGE
        lowly.close()
        assert victim.key is not None
        ok(admin.query(f"SELECT pg_terminate_backend({victim.key.process_id})"))
        ended = victim.recv()
        assert isinstance(ended, m.ErrorResponse)
        assert (ended.severity, ended.sqlstate) == ("FATAL", errors.ADMIN_SHUTDOWN)
        with pytest.raises(ConnectionError):
            victim.recv()
    finally:
        admin.close()
        victim.sock.close()


def test_scanner_finds_the_same_boundaries_in_real_server_traffic(server: Server) -> None:
    s = Session(server.port, SUPERUSER, SUPERPASS)
    try:
        start = len(s.received)
        ok(s.query("SELECT g, repeat('x', g % 300) FROM generate_series(1, 3000) g"))
        traffic = bytes(s.received[start:])
    finally:
        s.close()
    for size in (7, 4096, 65536):
        scanner = MessageScanner(b"CZT", report=b"D")
        found = []
        for i in range(0, len(traffic), size):
            found += scanner.feed(traffic[i : i + size])
        assert scanner.at_boundary
        assert [x.type_code for x in found] == [b"T"] + [b"D"] * 3000 + [b"C", b"Z"]
        assert found[-2].payload == b"SELECT 3000\0"


# ------------------------------------------------------------- psql, pgbench via a decoding relay


def _hang_up(sock: socket.socket) -> None:
    """Close so that a thread blocked in recv() on this socket wakes up too."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


class DecodingRelay:
    """Copies bytes between clients and the server, decoding everything on the side."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.from_client: list[object] = []
        self.from_server: list[object] = []
        self.problems: list[BaseException] = []
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accept = threading.Thread(target=self._serve, daemon=True)
        self._accept.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port),
                                                    timeout=30)
            except OSError:  # the server is gone (the test is over): this client is closed
                _hang_up(client)
                continue
            client.settimeout(30)
            t = threading.Thread(target=self._client_side, args=(client, upstream))
            self.threads.append(t)
            t.start()

    def _record(self, where: list[object], messages: list[object]) -> None:
        with self._lock:
            where.extend(messages)

    def _client_side(self, client: socket.socket, upstream: socket.socket) -> None:
        frontend = MessageDecoder(FRONTEND)
        try:
            startup = StartupDecoder()
            while not startup.finished:
                data = client.recv(65536)
                if not data:
                    return
                startup.receive_data(data)
                while (packet := startup.next_message()) is not None:
                    self._record(self.from_client, [packet])
                    upstream.sendall(encode(packet))
                    if isinstance(packet, m.SSLRequest | m.GSSENCRequest):
                        client.sendall(upstream.recv(1))  # the one-byte answer, 'N' here
            # only now do typed messages flow from the server
            t = threading.Thread(target=self._server_side, args=(upstream, client, frontend))
            self.threads.append(t)
            t.start()
            rest = startup.take_unprocessed()
            upstream.sendall(rest)
            self._pump(client, upstream, frontend, self.from_client, None, rest)
        except BaseException as exc:  # surfaced by the test
            self.problems.append(exc)
        finally:
            _hang_up(upstream)

    def _server_side(
        self, upstream: socket.socket, client: socket.socket, frontend: MessageDecoder
    ) -> None:
        try:
            self._pump(upstream, client, MessageDecoder(BACKEND), self.from_server, frontend)
        except BaseException as exc:
            self.problems.append(exc)
        finally:
            _hang_up(client)

    def _pump(
        self,
        src: socket.socket,
        dst: socket.socket,
        decoder: MessageDecoder,
        where: list[object],
        client_decoder: MessageDecoder | None,
        initial: bytes = b"",
    ) -> None:
        scanner = MessageScanner(b"", report=bytes(range(256)))
        seen = bytearray()
        sizes: list[int] = []
        decoded: list[object] = []
        data = initial
        while True:
            seen += data
            sizes += [x.size for x in scanner.feed(data)]
            decoder.receive_data(data)
            got = []
            while (msg := decoder.next_message()) is not None:
                got.append(msg)
                if client_decoder is not None:  # how the client's next 'p' must be read
                    if isinstance(msg, m.AuthenticationSASL):
                        client_decoder.expect_auth_response(m.SASLInitialResponse)
                    elif isinstance(msg, m.AuthenticationSASLContinue):
                        client_decoder.expect_auth_response(m.SASLResponse)
            self._record(where, got)
            decoded += got
            if data is not initial:
                dst.sendall(data)
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
        decoder.receive_eof()
        assert decoder.next_message() is None and scanner.at_boundary
        # the scanner saw the boundaries the decoder saw, and re-encoding gives the same bytes
        assert sizes == [len(encode(x)) - 5 for x in decoded]  # type: ignore[arg-type]
        assert b"".join(encode(x) for x in decoded) == seen  # type: ignore[arg-type]

    def close(self) -> None:
        self.listener.close()
        for t in self.threads:
            t.join(timeout=30)


@pytest.fixture
def relay(server: Server) -> Iterator[DecodingRelay]:
    r = DecodingRelay(server.port)
    yield r
    r.close()
    assert not r.problems, r.problems


def _client_env(server: Server) -> dict[str, str]:
    return {
        "PATH": os.environ["PATH"],
        "PGPASSWORD": SUPERPASS,
        "PGUSER": SUPERUSER,
        "PGDATABASE": "postgres",
        "PGGSSENCMODE": "disable",
        "PGCONNECT_TIMEOUT": "10",
        "HOME": str(server.base),
    }


def test_psql_through_a_decoding_relay(server: Server, relay: DecodingRelay) -> None:
    done = subprocess.run(
        [
            "psql",
            "-h",
            "127.0.0.1",
            "-p",
            str(relay.port),
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "SELECT 40 + 2 AS answer",
            "-c",
            "COPY (SELECT 'a' UNION ALL SELECT 'b') TO STDOUT",
        ],
        env=_client_env(server),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["42", "a", "b"]
    relay.close()
    client = relay.from_client
    assert isinstance(client[0], m.SSLRequest)  # psql's default sslmode=prefer; the server said N
    assert isinstance(client[1], m.StartupMessage) and client[1].user == SUPERUSER
    assert isinstance(client[2], m.SASLInitialResponse) and client[2].mechanism == "SCRAM-SHA-256"
    assert isinstance(client[3], m.SASLResponse)
    assert m.Query("SELECT 40 + 2 AS answer") in client
    assert isinstance(client[-1], m.Terminate)
    assert m.AuthenticationOk() in relay.from_server
    assert m.CommandComplete("COPY 2") in relay.from_server


def test_pgbench_extended_and_prepared_through_a_decoding_relay(
    server: Server, relay: DecodingRelay
) -> None:
    script = server.base / "bench.sql"
    script.write_text("\\set x random(1, 1000)\nSELECT :x::int + 1;\n")
    os.chmod(script, 0o644)
    for mode in ("extended", "prepared"):
        done = subprocess.run(
            [
                "pgbench",
                "-h",
                "127.0.0.1",
                "-p",
                str(relay.port),
                "-n",
                "-M",
                mode,
                "-t",
                "20",
                "-f",
                str(script),
            ],
            env=_client_env(server),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    relay.close()
    kinds = {type(x) for x in relay.from_client}
    assert {m.Parse, m.Bind, m.Execute, m.Sync, m.Terminate} <= kinds
    binds = [x for x in relay.from_client if isinstance(x, m.Bind)]
    assert len(binds) == 40 and all(len(b.params) == 1 for b in binds)
    assert sum(isinstance(x, m.DataRow) for x in relay.from_server) == 40
