"""What can go wrong when the agent logs in to AWS RDS/Aurora with an IAM token, as data.

Every error here carries a `message` (what went wrong, where), a `hint` (what to do next)
and a SQLSTATE, and becomes the FATAL ErrorResponse the psql user sees through
`error_response()`. The agent raises nothing else for these cases, so a person never reads
a botocore traceback or "NoCredentialsError".

`explain_upstream_auth_failure(database, db_user, server_error)` turns the database's own
refusal of a token (RDS answers `FATAL 28000 PAM authentication failed for user "alice"`)
into a message and a hint that name the two things to check: the `rds_iam` grant and the
`rds-db:connect` IAM policy that `tctl db iam-policy` prints.

This module never holds, prints or logs a token, a secret key or a session token.
"""

from __future__ import annotations

import re

from dataplane.postgres import messages as m
from dataplane.postgres.errors import (
    INVALID_AUTHORIZATION_SPECIFICATION,
    INVALID_PASSWORD,
    SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION,
    fatal,
)

__all__ = [
    "AwsAuthError",
    "CredentialsUnusable",
    "InvalidRegion",
    "NoCredentials",
    "RegionMissing",
    "explain_upstream_auth_failure",
]

# How PostgreSQL words a refused login by a password-like method (auth.c, auth_failed()):
# RDS's IAM tokens go through PAM; "password" covers a server that asks plain passwords.
_REFUSAL_WORDING = (
    "pam authentication failed for user",
    "password authentication failed for user",
)


_PLAIN_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_$]*$")
# Reserved words that people do pick as account names; they must be quoted in SQL.
_RESERVED = frozenset(
    [
        "all",
        "user",
        "current_user",
        "session_user",
        "select",
        "table",
        "group",
        "order",
        "default",
        "grant",
        "to",
        "from",
        "where",
        "with",
        "case",
        "end",
        "primary",
        "references",
        "check",
        "column",
        "constraint",
    ]
)


def sql_identifier(name: str) -> str:
    """`name` as it must be written in SQL: plain when it can be, double-quoted otherwise."""
    if _PLAIN_IDENTIFIER.match(name) and name not in _RESERVED:
        return name
    return '"' + name.replace('"', '""') + '"'


class AwsAuthError(Exception):
    """The agent could not get or use an IAM token; `message` and `hint` are for people."""

    sqlstate: str = SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def error_response(self) -> m.ErrorResponse:
        """The FATAL ErrorResponse psql prints as `FATAL:  <message>` and `HINT:  <hint>`."""
        return fatal(self.sqlstate, self.message, hint=self.hint)


class NoCredentials(AwsAuthError):
    """boto3's default credential chain found nothing on the agent host."""


class CredentialsUnusable(AwsAuthError):
    """Credentials are configured but cannot be used (missing profile, half a key pair,
    a credential process or role assumption that failed)."""


class RegionMissing(AwsAuthError):
    """The database is an RDS endpoint but no AWS region is configured for it."""


class InvalidRegion(AwsAuthError):
    """The configured region is not an AWS region, or not the one the endpoint is in."""


def explain_upstream_auth_failure(
    database: str, db_user: str, server_error: m.ErrorResponse, *, region: str | None = None
) -> tuple[str, str] | None:
    """Message and hint for an RDS/Aurora database that refused the agent's IAM token.

    `region` is the one the token was signed for (the hint asks to check it). Returns None
    when `server_error` is not a refused login (a missing database, too many
    connections...): those are passed to the client as the server said them.
    """
    sqlstate = server_error.sqlstate
    ident = sql_identifier(db_user)
    text = (server_error.message or "").lower()
    if sqlstate not in (INVALID_AUTHORIZATION_SPECIFICATION, INVALID_PASSWORD):
        return None
    if any(wording in text for wording in _REFUSAL_WORDING):
        message = (
            f"database {database!r} refused the IAM authentication token for db user "
            f"{db_user!r} (the server said: {server_error.message})"
        )
        checks = [
            f"the database account needs the rds_iam role (GRANT rds_iam TO {ident};), IAM "
            "database authentication must be on for the instance, and the AWS identity of the "
            f"db agent needs rds-db:connect on this database: `tctl db iam-policy {database}` "
            "prints that IAM policy.",
            "The agent host's clock must be right: a token is valid for 15 minutes from when "
            "it is signed.",
        ]
        if region:
            checks.insert(
                1, f"The token was signed for region {region}: it must be the database's."
            )
        hint = " ".join(checks)
        return message, hint
    if "role" in text and "does not exist" in text:
        message = f"database {database!r} has no account {db_user!r} ({server_error.message})"
        hint = f"create it for IAM authentication: CREATE USER {ident}; GRANT rds_iam TO {ident};"
        return message, hint
    return None
