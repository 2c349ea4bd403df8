"""A tiny blocking PostgreSQL client for tests that need what psql hides: the BackendKeyData
the proxy issued, a client that stops reading, raw CancelRequests.

Built on the project's sans-IO codec and the standard ssl module; test scaffolding only.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

from dataplane.postgres import BACKEND, MessageDecoder, encode
from dataplane.postgres import messages as m
from tests.dataplane.support import UserCert


@dataclass
class RawSession:
    sock: ssl.SSLSocket
    key: m.BackendKeyData | None
    parameters: dict[str, str] = field(default_factory=dict)
    decoder: MessageDecoder = field(default_factory=lambda: MessageDecoder(BACKEND))

    def send(self, message: m.FrontendMessage) -> None:
        self.sock.sendall(encode(message))

    def read_message(self) -> m.BackendMessage:
        while True:
            message = self.decoder.next_message()
            if message is not None:
                return message  # type: ignore[return-value]
            data = self.sock.recv(65536)
            if not data:
                self.decoder.receive_eof()
                message = self.decoder.next_message()
                if message is None:
                    raise ConnectionError("the server closed the connection")
                return message  # type: ignore[return-value]
            self.decoder.receive_data(data)

    def read_until_ready(self) -> list[m.BackendMessage]:
        """Every message up to and including the next ReadyForQuery."""
        out = []
        while True:
            out.append(self.read_message())
            if isinstance(out[-1], m.ReadyForQuery):
                return out

    def query(self, sql: str) -> list[m.BackendMessage]:
        """Run `sql`; every message up to and including ReadyForQuery."""
        self.send(m.Query(sql))
        return self.read_until_ready()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def tls_session(
    port: int, cert: UserCert | None, root_ca: Path, timeout: float = 10.0
) -> RawSession:
    """SSLRequest, 'S', TLS to the proxy (presenting `cert` if given); nothing else yet."""
    ctx = ssl.create_default_context(cafile=str(root_ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert_file), str(cert.key_file))
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    raw.sendall(encode(m.SSLRequest()))
    if raw.recv(1) != b"S":
        raw.close()
        raise ConnectionError("the proxy refused TLS")
    return RawSession(ctx.wrap_socket(raw, server_hostname="localhost"), None)


def start(session: RawSession, startup: m.StartupMessage) -> list[m.BackendMessage]:
    """Send `startup`; every message up to the first ReadyForQuery or ErrorResponse."""
    session.send(startup)  # type: ignore[arg-type]
    out: list[m.BackendMessage] = []
    while True:
        message = session.read_message()
        out.append(message)
        if isinstance(message, m.BackendKeyData):
            session.key = message
        elif isinstance(message, m.ParameterStatus):
            session.parameters[message.name] = message.value
        elif isinstance(message, m.ReadyForQuery | m.ErrorResponse):
            return out


def connect(
    port: int, cert: UserCert, root_ca: Path, user: str, dbname: str, timeout: float = 10.0
) -> RawSession:
    """TLS to the proxy with `cert`, StartupMessage, read to the first ReadyForQuery."""
    session = tls_session(port, cert, root_ca, timeout)
    messages = start(session, m.StartupMessage({"user": user, "database": dbname}))
    if isinstance(messages[-1], m.ErrorResponse):
        session.close()
        raise ConnectionError(str(messages[-1]))
    return session


def send_cancel(port: int, process_id: int, secret_key: int) -> None:
    """A CancelRequest as libpq sends it: a new plain connection, 16 bytes, then close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode(m.CancelRequest(process_id, secret_key)))
        sock.settimeout(5)
        try:
            while sock.recv(1024):
                pass
        except OSError:
            pass
