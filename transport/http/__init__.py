"""HTTP/1.1 over h11 on asyncio: the server the control plane's API and the proxy's web port
run on, and the client tsh, tctl and the agents use.

h11 is the protocol (sans-IO); this package is only the asyncio layer around it: sockets,
TLS, deadlines, size limits and the JSON error shape. It must never hold policy or API
logic (handlers do), log request bodies or headers, or wait on a peer without a deadline.

Server::

    async def handler(request: Request) -> Response:
        if request.path == "/v1/ping" and request.method in ("GET", "HEAD"):
            return json_response(Ping(...))
        raise ApiError(404, "not_found", f"no API endpoint {request.path}")

    server = HttpServer(handler, ServerLimits(max_body_bytes=64 * 1024))
    await server.listen("0.0.0.0", 3025, ssl=server_context)
    await server.accept_socket(sock, ssl=server_context)   # a connection the proxy accepted

Client::

    async with HttpClient("https://auth:3025", ssl_context=ctx) as client:
        ping = (await client.request("GET", "/v1/ping")).raise_for_error().json(Ping)
    request_sync("https://auth:3025", "GET", "/v1/ping", ssl_context=ctx)   # tsh, tctl
"""

from transport.http._client import (
    ClientResponse,
    HttpClient,
    HttpConnectError,
    HttpError,
    HttpProtocolError,
    HttpTimeoutError,
    HttpTlsError,
    ResponseTooLarge,
    api_error,
    request_sync,
)
from transport.http._headers import Headers, etag_matches
from transport.http._messages import (
    ApiError,
    Request,
    Response,
    describe_validation_error,
    error_response,
    json_response,
)
from transport.http._server import Handler, HttpServer, ServerLimits

__all__ = [
    "ApiError",
    "ClientResponse",
    "Handler",
    "Headers",
    "HttpClient",
    "HttpConnectError",
    "HttpError",
    "HttpProtocolError",
    "HttpServer",
    "HttpTimeoutError",
    "HttpTlsError",
    "Request",
    "Response",
    "ResponseTooLarge",
    "ServerLimits",
    "api_error",
    "describe_validation_error",
    "error_response",
    "etag_matches",
    "json_response",
    "request_sync",
]
