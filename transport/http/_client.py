"""The HTTP/1.1 client: one kept-alive connection per `HttpClient`, h11 underneath.

Rules for this module:
- Every failure to talk to the server is an `HttpError` subclass whose message names the
  address and says what to check; no bare OSError, ssl or h11 exception leaves this module.
  A server that answered with an error is not a transport failure: `raise_for_error()`
  turns that answer into `ApiError`.
- A response is bounded: its head by `max_header_bytes`, its body by `max_response_bytes`.
- A request is sent again on a new connection only when that is safe: an idempotent request
  that got no byte of answer on a kept-alive connection the server had closed meanwhile.
- `request_sync` is for synchronous programs (tsh, tctl) only; it runs its own event loop.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload
from urllib.parse import urlencode, urlsplit

import h11
import pydantic
import pydantic_core

from transport.http._headers import Headers, head_size
from transport.http._messages import ApiError, encode_json, format_location, parse_json_body
from transport.http._streams import READ_CHUNK, close_stream

Model = TypeVar("Model", bound=pydantic.BaseModel)

_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_USER_AGENT = "teleport-db"


class HttpError(Exception):
    """Talking to `address` failed; the message says how and what to check."""

    def __init__(self, message: str, address: str) -> None:
        super().__init__(message)
        self.address = address


class HttpConnectError(HttpError):
    """No connection: refused, unreachable, or the name does not resolve."""


class HttpTlsError(HttpError):
    """The TLS handshake failed or the server refused our certificate."""


class HttpTimeoutError(HttpError):
    """No complete answer within the timeout."""


class HttpProtocolError(HttpError):
    """The server's answer is not valid HTTP, or it closed the connection without one."""


class ResponseTooLarge(HttpProtocolError):
    """The response body is larger than `max_response_bytes`."""


@dataclass(frozen=True, slots=True)
class ClientResponse:
    """One complete response; `url` (`GET https://host:port/path`) is for messages."""

    status: int
    reason: str
    headers: Headers
    body: bytes
    url: str

    @property
    def ok(self) -> bool:
        return self.status < 400

    @overload
    def json(self) -> Any: ...
    @overload
    def json(self, model: type[Model]) -> Model: ...

    def json(self, model: type[Model] | None = None) -> Any:
        """The body as JSON (validated as `model` if given); HttpProtocolError if it is not."""
        try:
            data = parse_json_body(self.body, "the response body")
        except ApiError as exc:
            raise HttpProtocolError(f"{self.url} answered {self.status}, but {exc.message}",
                                    self.url) from None
        if model is None:
            return data
        try:
            return model.model_validate(data)
        except pydantic.ValidationError as exc:
            raise HttpProtocolError(f"{self.url} answered {self.status} with a body that is "
                                    f"not a {model.__name__}: {exc.error_count()} problem(s), "
                                    f"first: {_first_problem(exc)}", self.url) from None

    def raise_for_error(self) -> ClientResponse:
        """Raise `ApiError` (from the JSON error body) if the status is 400 or more."""
        if self.status >= 400:
            raise api_error(self)
        return self


def api_error(response: ClientResponse) -> ApiError:
    """The `ApiError` a response stands for: from `{"error": {"code", "message"}}` if the
    body has that shape, else from the status and the start of a text body."""
    try:
        error = pydantic_core.from_json(response.body)["error"]
        return ApiError(response.status, str(error["code"]), str(error["message"]))
    except (ValueError, KeyError, TypeError):
        pass
    message = f"{response.url} answered {response.status} {response.reason}".rstrip()
    if response.headers.get("content-type", "").startswith("text/plain"):
        text = response.body[:200].decode("utf-8", "replace").strip()
        if text:
            message += f": {text}"
    return ApiError(response.status, f"http_{response.status}", message)


class HttpClient:
    """An HTTP/1.1 client for one server, reusing one connection between requests.

    `HttpClient("https://auth.example.com:3025", ssl_context=ctx)` or
    `HttpClient(host="127.0.0.1", port=3080, ssl_context=ctx)` (https when a context is
    given). Requests on one client run one after another; use one client per concurrent
    stream of requests (a long poll gets its own).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        timeout: float = 10.0,
        max_response_bytes: int = 32 * 1024 * 1024,
        max_header_bytes: int = 64 * 1024,
        idle_timeout: float = 30.0,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if base_url is not None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"{base_url!r} is not an http:// or https:// URL with a host")
            scheme, host = parts.scheme, parts.hostname
            port = parts.port or (443 if scheme == "https" else 80)
            self._prefix = parts.path.rstrip("/")
        elif host is not None and port is not None:
            scheme = "https" if ssl_context is not None else "http"
            self._prefix = ""
        else:
            raise ValueError("give HttpClient a base_url, or a host and a port")
        if scheme == "https" and ssl_context is None:
            ssl_context = ssl.create_default_context()
            ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        if scheme == "http" and ssl_context is not None:
            raise ValueError(f"{base_url} is plain http:// but an ssl_context was given; "
                             "use an https:// URL")
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.max_header_bytes = max_header_bytes
        self.idle_timeout = idle_timeout
        self.default_headers = dict(headers or {})
        shown_host = f"[{host}]" if ":" in host else host
        self.address = f"{scheme}://{shown_host}:{port}"
        self._host_header = f"{shown_host}:{port}"
        self._conn: _ClientConnection | None = None
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the kept-alive connection, if any."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ClientResponse:
        """Send one request and read the whole response (any status: see raise_for_error).

        `json` is a pydantic model or plain data (which may hold models); `body` is raw
        bytes; give at most one. `timeout` bounds connect, send and receive together.
        """
        method = method.upper()
        timeout = self.timeout if timeout is None else timeout
        target = self._prefix + (path if path.startswith("/") else "/" + path)
        if params:
            target += ("&" if "?" in target else "?") + urlencode(params)
        url = f"{method} {self.address}{target}"
        payload, fields = self._encode(method, json, body, headers)
        async with self._lock:
            try:
                async with asyncio.timeout(timeout):
                    return await self._exchange(method, target, fields, payload, url)
            except TimeoutError:
                await self._drop()
                raise HttpTimeoutError(f"{url}: no complete answer within {timeout:g}s; check "
                                       "that the server is up and the address is right",
                                       self.address) from None
            except BaseException:
                await self._drop()
                raise

    def _encode(self, method: str, json: Any, body: bytes | None,
                headers: Mapping[str, str] | None) -> tuple[bytes, list[tuple[str, str]]]:
        fields = [("host", self._host_header), ("user-agent", _USER_AGENT),
                  ("accept", "application/json")]
        if json is not None and body is not None:
            raise ValueError("give a request either json or body, not both")
        if json is not None:
            payload = encode_json(json)
            fields.append(("content-type", "application/json"))
        else:
            payload = body or b""
        if payload or method in ("POST", "PUT", "PATCH"):
            fields.append(("content-length", str(len(payload))))
        ours = {name for name, _ in fields}
        for name, value in {**self.default_headers, **(headers or {})}.items():
            if name.lower() in ours:
                fields = [(k, v) for k, v in fields if k != name.lower()]
            fields.append((name.lower(), value))
        return payload, fields

    async def _exchange(self, method: str, target: str, fields: list[tuple[str, str]],
                        payload: bytes, url: str) -> ClientResponse:
        loop = asyncio.get_running_loop()
        for attempt in (1, 2):
            conn = self._conn
            if conn is not None and not await conn.reusable(loop.time(), self.idle_timeout):
                await self._drop()
                conn = None
            reused = conn is not None
            if conn is None:
                conn = self._conn = await self._connect()
            try:
                response = await self._exchange_on(conn, method, target, fields, payload, url)
            except _NoAnswer:
                await self._drop()
                if attempt == 1 and reused and method in _IDEMPOTENT:
                    continue
                if not reused and self.ssl_context is not None:
                    # With TLS 1.3 the server checks our certificate after our side of the
                    # handshake is done; asyncio servers then close without an alert.
                    raise HttpTlsError(f"{url}: the server closed the new TLS connection "
                                       "without answering; it may have refused our client "
                                       "certificate (missing, expired or from another CA)",
                                       self.address) from None
                hint = "" if reused else " (if it serves HTTPS, use an https:// address)"
                raise HttpProtocolError(f"{url}: the server closed the connection without "
                                        f"answering{hint}", self.address) from None
            if conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
                conn.h11.start_next_cycle()
                conn.last_used = loop.time()
            else:
                await self._drop()
            return response
        raise AssertionError("unreachable")

    async def _exchange_on(self, conn: _ClientConnection, method: str, target: str,
                           fields: list[tuple[str, str]], payload: bytes, url: str
                           ) -> ClientResponse:
        h = conn.h11
        data = h.send(h11.Request(method=method, target=target, headers=fields))
        if payload:
            data += h.send(h11.Data(data=payload))
        data += h.send(h11.EndOfMessage())
        try:
            conn.writer.write(data)
            await conn.writer.drain()
        except ssl.SSLError as exc:
            raise self._tls_error(exc) from None
        except OSError:
            # The server may have answered (e.g. 413) and closed before we finished sending:
            # read what it said below rather than failing here.
            pass

        head: h11.Response | None = None
        chunks: list[bytes] = []
        size = 0
        answered = False
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                if not answered and h.trailing_data[1]:
                    raise _NoAnswer from None
                raise self._protocol_error(exc, url) from None
            if event is h11.NEED_DATA:
                try:
                    chunk = await conn.reader.read(READ_CHUNK)
                except ssl.SSLError as exc:
                    raise self._tls_error(exc) from None
                except OSError:
                    chunk = b""
                answered = answered or bool(chunk)
                h.receive_data(chunk)
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                if head_size((event.reason,), event.headers) > self.max_header_bytes:
                    raise self._protocol_error(
                        h11.RemoteProtocolError("head too large", error_status_hint=431), url)
                head = event
                declared = _content_length(event)
                if declared is not None and declared > self.max_response_bytes:
                    raise self._too_large(url, declared)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_response_bytes:
                    raise self._too_large(url, None)
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return ClientResponse(head.status_code, head.reason.decode("latin-1"),
                                      Headers(head.headers), b"".join(chunks), url)
            else:
                raise _NoAnswer

    async def _connect(self) -> _ClientConnection:
        extra: dict[str, Any] = {}
        if self.ssl_context is not None:
            extra = {"ssl_handshake_timeout": self.timeout,
                     "server_hostname": self.server_hostname or self.host}
        try:
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.ssl_context, limit=READ_CHUNK, **extra)
        except ssl.SSLError as exc:
            raise self._tls_error(exc) from None
        except ConnectionRefusedError:
            raise HttpConnectError(f"cannot connect to {self.address}: connection refused; "
                                   "check that the server is running and listens on that "
                                   "address", self.address) from None
        except socket.gaierror as exc:
            raise HttpConnectError(f"cannot connect to {self.address}: the host name does not "
                                   f"resolve ({exc.strerror})", self.address) from None
        except ConnectionError as exc:
            if self.ssl_context is not None:
                raise HttpTlsError(f"TLS with {self.address} failed: the server ended the "
                                   "handshake without saying why; it may have refused our "
                                   "client certificate (missing, expired or from another CA)",
                                   self.address) from None
            raise HttpConnectError(f"cannot connect to {self.address}: "
                                   f"{_os_reason(exc)}", self.address) from None
        except OSError as exc:
            raise HttpConnectError(f"cannot connect to {self.address}: "
                                   f"{_os_reason(exc)}", self.address) from None
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=self.max_header_bytes)
        return _ClientConnection(reader, writer, conn, asyncio.get_running_loop().time())

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()

    def _tls_error(self, exc: ssl.SSLError) -> HttpTlsError:
        if isinstance(exc, ssl.SSLCertVerificationError):
            what = (f"the server's certificate is not trusted ({exc.verify_message}); check "
                    "the CA certificate you trust for this server and the name you use for it")
        else:
            reason = exc.reason or str(exc)
            what = _TLS_REASONS.get(reason, f"{reason}; check that this port serves HTTPS and "
                                    "that the certificates on both sides are current")
        return HttpTlsError(f"TLS with {self.address} failed: {what}", self.address)

    def _protocol_error(self, exc: h11.RemoteProtocolError, url: str) -> HttpProtocolError:
        if exc.error_status_hint == 431:
            return HttpProtocolError(f"{url}: the response head is larger than "
                                     f"{self.max_header_bytes} bytes", self.address)
        return HttpProtocolError(f"{url}: the server's answer is not valid HTTP/1.1: {exc}",
                                 self.address)

    def _too_large(self, url: str, declared: int | None) -> ResponseTooLarge:
        size = f"of {declared} bytes " if declared is not None else ""
        return ResponseTooLarge(f"{url}: the response body {size}is larger than the limit of "
                                f"{self.max_response_bytes} bytes", self.address)


_TLS_REASONS = {
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate and got "
    "none; log in again to get one",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the server refused our client certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "the server does not trust the CA of our client certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the server says our client certificate has expired; "
    "log in again",
    "WRONG_VERSION_NUMBER": "the server did not answer in TLS; use an http:// address if it "
    "serves plain HTTP",
    "RECORD_LAYER_FAILURE": "the server did not answer in TLS; use an http:// address if it "
    "serves plain HTTP",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the server and this client share no TLS version (TLS 1.2 "
    "or newer is required)",
    "UNSUPPORTED_PROTOCOL": "the server and this client share no TLS version (TLS 1.2 or "
    "newer is required)",
}


class _NoAnswer(Exception):
    """The connection ended before any byte of a response arrived."""


class _ClientConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 conn: h11.Connection, now: float) -> None:
        self.reader = reader
        self.writer = writer
        self.h11 = conn
        self.last_used = now

    async def reusable(self, now: float, idle_timeout: float) -> bool:
        """False if the connection idled too long or the server has closed it meanwhile."""
        await asyncio.sleep(0)  # let a pending end-of-stream reach the reader
        return (now - self.last_used < idle_timeout and not self.reader.at_eof()
                and not self.writer.is_closing() and self.h11.our_state is h11.IDLE)

    async def close(self) -> None:
        await close_stream(self.writer)


def _os_reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _content_length(event: h11.Response) -> int | None:
    for name, value in event.headers:
        if name == b"content-length":
            return int(value)
    return None


def _first_problem(exc: pydantic.ValidationError) -> str:
    err = exc.errors(include_url=False, include_input=False)[0]
    return f"{format_location(err['loc'])}: {err['msg']}"


def request_sync(
    base_url: str,
    method: str,
    path: str,
    *,
    json: Any = None,
    body: bytes | None = None,
    params: Mapping[str, str | int] | None = None,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 10.0,
    max_response_bytes: int = 32 * 1024 * 1024,
) -> ClientResponse:
    """One request from synchronous code (tsh, tctl). Not for use inside an event loop."""

    async def once() -> ClientResponse:
        async with HttpClient(base_url, ssl_context=ssl_context,
                              server_hostname=server_hostname, timeout=timeout,
                              max_response_bytes=max_response_bytes) as client:
            return await client.request(method, path, json=json, body=body, params=params,
                                        headers=headers)

    return asyncio.run(once())
