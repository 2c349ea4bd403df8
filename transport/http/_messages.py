"""What a handler receives and returns: `Request`, `Response`, and the JSON error shape.

Rules for this module:
- Every error body has one shape: `{"error": {"code": ..., "message": ...}}`; `ApiError` is
  that error as a Python exception, raised by handlers (the server renders it) and by
  clients (`ClientResponse.raise_for_error` parses it back).
- A message built from a pydantic error names the field path and what is wrong, never the
  value that was sent (it may be a password or a key).
- No I/O. The request body is already bounded by the server when a `Request` exists.
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload
from urllib.parse import parse_qs, unquote

import pydantic
import pydantic_core

from transport.http._headers import Headers, etag_matches

Model = TypeVar("Model", bound=pydantic.BaseModel)

#: At most this many query fields are parsed; more is a bad request, not a slow one.
MAX_QUERY_FIELDS = 64


class ApiError(Exception):
    """An HTTP error with the JSON body `{"error": {"code": code, "message": message}}`.

    Raise it from a handler to answer with that error; `ClientResponse.raise_for_error`
    raises it on the client side. `str()` is the message, which says what to do next.
    """

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.code!r}, {self.message!r})"

    def to_response(self) -> Response:
        return error_response(self.status, self.code, self.message)


@dataclass(frozen=True, slots=True)
class Request:
    """One HTTP request with its whole (size-limited) body, as a handler sees it."""

    method: str
    target: str
    path: str
    query: Mapping[str, list[str]]
    headers: Headers
    body: bytes = b""
    peer: tuple[str, int] | None = None
    #: DER of the client's TLS certificate (the leaf), or None (no TLS or no certificate).
    peer_cert: bytes | None = None
    http_version: str = "1.1"

    @overload
    def json(self) -> Any: ...
    @overload
    def json(self, model: type[Model]) -> Model: ...

    def json(self, model: type[Model] | None = None) -> Any:
        """The body parsed as JSON, validated as `model` when one is given.

        Malformed JSON raises `ApiError(400, "malformed_json", ...)` naming the place; a
        body that does not fit `model` raises pydantic's `ValidationError`, which the server
        answers with 400 naming the fields.
        """
        data = parse_json_body(self.body, "request body")
        if model is None:
            return data
        return model.model_validate(data)

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The single value of query parameter `name`; 400 if it is given more than once."""
        values = self.query.get(name)
        if not values:
            return default
        if len(values) > 1:
            raise ApiError(400, "bad_query", f"query parameter {name!r} is given {len(values)} "
                           "times; give it once")
        return values[0]

    def etag_matches(self, etag: str) -> bool:
        """Whether the request's `If-None-Match` names `etag` (quotes included, `"17"`)."""
        return etag_matches(self.headers.get("if-none-match"), etag)


@dataclass(slots=True)
class Response:
    """What a handler returns. The server adds `Content-Length` and the framing."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""


def json_response(
    content: pydantic.BaseModel | Mapping[str, Any] | Sequence[Any] | None,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """A JSON response from a pydantic model, or from plain data that may hold models."""
    fields = [("content-type", "application/json")]
    fields += [(k.lower(), v) for k, v in (headers or {}).items()]
    return Response(status, fields, encode_json(content))


def encode_json(content: Any) -> bytes:
    """Compact UTF-8 JSON of a pydantic model or of plain data that may hold models (by
    field alias, as the API documents them)."""
    if isinstance(content, pydantic.BaseModel):
        return content.model_dump_json(by_alias=True).encode()
    return pydantic_core.to_json(content, by_alias=True)


def error_response(status: int, code: str, message: str) -> Response:
    """The one error shape: `{"error": {"code": code, "message": message}}`."""
    return json_response({"error": {"code": code, "message": message}}, status)


def parse_json_body(body: bytes, what: str) -> Any:
    """`body` as JSON, or `ApiError(400, "malformed_json")` saying where it went wrong."""
    if not body.strip():
        raise ApiError(400, "malformed_json", f"{what} is empty; send a JSON document")
    try:
        return jsonlib.loads(body)
    except UnicodeDecodeError as exc:
        raise ApiError(400, "malformed_json", f"{what} is not UTF-8 text (byte {exc.start} "
                       "is not valid); send JSON encoded as UTF-8") from None
    except jsonlib.JSONDecodeError as exc:
        raise ApiError(400, "malformed_json", f"{what} is not valid JSON: {exc.msg} at line "
                       f"{exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise ApiError(400, "malformed_json", f"{what} nests arrays or objects too deeply"
                       ) from None


def describe_validation_error(exc: pydantic.ValidationError, limit: int = 10) -> str:
    """`field.path: message; ...` for each error (at most `limit`), never the input values."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False)[:limit]:
        parts.append(f"{format_location(err['loc'])}: {err['msg']}")
    more = exc.error_count() - limit
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def format_location(loc: Sequence[int | str]) -> str:
    """`("spec", "roles", 0)` -> `spec.roles[0]`; the empty location is `(body)`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(body)"


def split_target(target: str) -> tuple[str, dict[str, list[str]]]:
    """The percent-decoded path and the parsed query of an origin-form request target."""
    path, _, query = target.partition("?")
    path, _, _ = path.partition("#")
    try:
        decoded = unquote(path, errors="strict")
        params = parse_qs(query, keep_blank_values=True, errors="strict",
                          max_num_fields=MAX_QUERY_FIELDS)
    except UnicodeDecodeError:
        raise ApiError(400, "bad_target", "the request path or query has percent-escapes "
                       "that are not UTF-8") from None
    except ValueError:
        raise ApiError(400, "bad_target", f"the query has more than {MAX_QUERY_FIELDS} "
                       "fields") from None
    return decoded, params
