"""ErrorResponse and NoticeResponse messages built the way PostgreSQL builds them.

PostgreSQL sends, in this order: S (severity, localized), V (severity, never localized),
C (SQLSTATE), M (message), then D (detail) and H (hint) when there are any. psql prints
"<severity>:  <message>", then "DETAIL:" and "HINT:" lines. Messages follow PostgreSQL's
style: lower case, no trailing period; detail and hint are full sentences.

This module builds messages only; it never sends them, and never puts secrets in them.
"""

from __future__ import annotations

from typing import Literal

from dataplane.postgres.messages import ErrorResponse, NoticeResponse

# SQLSTATE codes (PostgreSQL Appendix A) that the data plane reports.
SUCCESSFUL_COMPLETION = "00000"
CONNECTION_FAILURE = "08006"
SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION = "08001"
SQLSERVER_REJECTED_ESTABLISHMENT_OF_SQLCONNECTION = "08004"
PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
INVALID_PASSWORD = "28P01"  # noqa: S105 (an SQLSTATE)
INVALID_CATALOG_NAME = "3D000"  # "database does not exist"
INSUFFICIENT_PRIVILEGE = "42501"
TOO_MANY_CONNECTIONS = "53300"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
IDLE_SESSION_TIMEOUT = "57P05"
INTERNAL_ERROR = "XX000"

ErrorSeverity = Literal["ERROR", "FATAL", "PANIC"]
NoticeSeverity = Literal["WARNING", "NOTICE", "DEBUG", "INFO", "LOG"]


def _fields(
    severity: str, sqlstate: str, message: str, detail: str | None, hint: str | None
) -> dict[str, str]:
    if len(sqlstate) != 5 or not sqlstate.isascii() or not sqlstate.isalnum():
        raise ValueError(f"SQLSTATE must be 5 ASCII letters or digits, not {sqlstate!r}")
    fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
    if detail:
        fields["D"] = detail
    if hint:
        fields["H"] = hint
    return fields


def error_response(
    sqlstate: str,
    message: str,
    *,
    detail: str | None = None,
    hint: str | None = None,
    severity: ErrorSeverity = "ERROR",
) -> ErrorResponse:
    """An ErrorResponse; ERROR ends the statement, FATAL ends the session."""
    return ErrorResponse(_fields(severity, sqlstate, message, detail, hint))


def fatal(
    sqlstate: str, message: str, *, detail: str | None = None, hint: str | None = None
) -> ErrorResponse:
    """A FATAL ErrorResponse: the session ends after it (send it, then close)."""
    return error_response(sqlstate, message, detail=detail, hint=hint, severity="FATAL")


def notice_response(
    message: str,
    *,
    sqlstate: str = SUCCESSFUL_COMPLETION,
    detail: str | None = None,
    hint: str | None = None,
    severity: NoticeSeverity = "NOTICE",
) -> NoticeResponse:
    """A NoticeResponse (a warning or information the client prints and carries on)."""
    return NoticeResponse(_fields(severity, sqlstate, message, detail, hint))
