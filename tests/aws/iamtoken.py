"""Checking RDS IAM authentication tokens the way RDS does, with botocore's own SigV4 signer.

A token is `host:port/?Action=connect&DBUser=<user>&X-Amz-Algorithm=AWS4-HMAC-SHA256&
X-Amz-Credential=<key id>/<yyyymmdd>/<region>/rds-db/aws4_request&X-Amz-Date=<t>&
X-Amz-Expires=900&X-Amz-SignedHeaders=host[&X-Amz-Security-Token=...]&X-Amz-Signature=<hex>`.

`verify_token` parses it, finds the secret of its access key among the credentials it is
told to trust, recomputes the signature with `botocore.auth.SigV4QueryAuth` (canonical
request, string to sign, signing key) at the token's own X-Amz-Date, compares in constant
time, and then checks what the signature covers against what the server expects: host and
port, the db user of the StartupMessage, region, service `rds-db`, `Action=connect`, and
the validity window. It raises `TokenRejected(reason, detail)`, `reason` being one short
word per kind of failure, so tests can say which check refused a token.

`sign_token` makes a token at a chosen time (the only way to get an expired one without
touching the clock); `tests/aws/test_tokens.py` checks that it equals what boto3's
`generate_db_auth_token` signs at the same second.

Test scaffolding only; this is a stand-in for AWS, never used by the product.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote, urlsplit

from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.utils import percent_encode_sequence

SERVICE = "rds-db"
ALGORITHM = "AWS4-HMAC-SHA256"
AMZ_DATE = "%Y%m%dT%H%M%SZ"
MAX_EXPIRES = 900
CLOCK_SKEW = timedelta(minutes=5)

_REQUIRED = (
    "Action",
    "DBUser",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)
_OPTIONAL = ("X-Amz-Security-Token",)


class TokenRejected(Exception):
    """The token is not valid for this server; `reason` names the check that failed."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TokenClaims:
    """What a verified token says (never the signature or the session token)."""

    host: str
    port: int
    db_user: str
    access_key: str
    region: str
    service: str
    signed_at: datetime
    expires_in: int

    @property
    def expires_at(self) -> datetime:
        return self.signed_at + timedelta(seconds=self.expires_in)


def _netloc(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{host}:{port}"


def _auth(credentials: Credentials, region: str, service: str, expires: int) -> SigV4QueryAuth:
    return SigV4QueryAuth(credentials, service, region, expires=expires)


def _signature(auth: SigV4QueryAuth, url: str, timestamp: str) -> str:
    """botocore's SigV4 signature of a GET of `url` (query already in place) at `timestamp`."""
    request = AWSRequest(method="GET", url=url)
    request.context["timestamp"] = timestamp
    canonical = auth.canonical_request(request)
    return str(auth.signature(auth.string_to_sign(request, canonical), request))


def sign_token(
    credentials: Credentials,
    host: str,
    port: int,
    db_user: str,
    region: str,
    at: datetime,
    expires: int = MAX_EXPIRES,
) -> str:
    """A token as `generate_db_auth_token` makes it, but signed at `at` (for expired ones)."""
    timestamp = at.astimezone(UTC).strftime(AMZ_DATE)
    scope = f"{credentials.access_key}/{timestamp[:8]}/{region}/{SERVICE}/aws4_request"
    auth_params: dict[str, str | int] = {
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": scope,
        "X-Amz-Date": timestamp,
        "X-Amz-Expires": expires,
        "X-Amz-SignedHeaders": "host",
    }
    if credentials.token is not None:
        auth_params["X-Amz-Security-Token"] = credentials.token
    query = (
        percent_encode_sequence({"Action": "connect", "DBUser": db_user})
        + "&"
        + percent_encode_sequence(auth_params)
    )
    url = f"https://{_netloc(host, port)}/?{query}"
    signature = _signature(_auth(credentials, region, SERVICE, expires), url, timestamp)
    return f"{url[len('https://') :]}&X-Amz-Signature={signature}"


_TOKEN_CHARS = re.compile(r"^[A-Za-z0-9\-._~%/?&=:\[\]]+$")
_SIGNATURE = re.compile(r"^[0-9a-f]{64}$")


def _parse(token: str) -> tuple[str, str, list[tuple[str, str]]]:
    if len(token) > 4096 or not _TOKEN_CHARS.match(token) or "://" in token:
        raise TokenRejected("malformed", "a token is host:port/?query in URL characters")
    try:
        parts = urlsplit("https://" + token)
        port = parts.port
    except ValueError as exc:
        raise TokenRejected("malformed", f"the token's host:port is garbled: {exc}") from None
    if port is None or parts.path != "/" or not parts.query or parts.fragment:
        raise TokenRejected("malformed", "a token is host:port/?query")
    pairs = []
    for item in parts.query.split("&"):
        key, sep, value = item.partition("=")
        if not sep:
            raise TokenRejected("malformed", f"query item {key!r} has no value")
        pairs.append((key, value))
    return parts.netloc, parts.query, pairs


def verify_token(
    token: str,
    *,
    host: str,
    port: int,
    db_user: str,
    region: str,
    trusted: Mapping[str, Credentials],
    now: datetime,
) -> TokenClaims:
    """Check `token` as the RDS endpoint `host:port` in `region` would for `db_user`.

    `trusted` maps access key ids to the credentials whose signatures are accepted.
    """
    netloc, query, pairs = _parse(token)
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise TokenRejected("malformed", "a query parameter appears twice")
    unknown = set(keys) - set(_REQUIRED) - set(_OPTIONAL)
    missing = set(_REQUIRED) - set(keys)
    if unknown or missing:
        raise TokenRejected(
            "malformed", f"unexpected {sorted(unknown)} / missing {sorted(missing)} parameters"
        )
    if keys[-1] != "X-Amz-Signature":
        raise TokenRejected("malformed", "X-Amz-Signature is not the last parameter")
    raw = dict(pairs)
    values = {key: unquote(value) for key, value in pairs}

    if values["X-Amz-Algorithm"] != ALGORITHM or values["X-Amz-SignedHeaders"] != "host":
        raise TokenRejected("malformed", "not a SigV4 presigned URL signing the host header")
    scope = values["X-Amz-Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request":
        raise TokenRejected("malformed", "X-Amz-Credential is not key/date/region/service/...")
    access_key, scope_date, scope_region, scope_service, _ = scope
    timestamp = values["X-Amz-Date"]
    try:
        signed_at = datetime.strptime(timestamp, AMZ_DATE).replace(tzinfo=UTC)
        expires = int(values["X-Amz-Expires"])
    except ValueError:
        raise TokenRejected("malformed", "X-Amz-Date or X-Amz-Expires is garbled") from None
    if scope_date != timestamp[:8]:
        raise TokenRejected("malformed", "the credential scope's date is not X-Amz-Date's")

    credentials = trusted.get(access_key)
    if credentials is None:
        raise TokenRejected("unknown-key", f"access key {access_key} is not trusted here")
    session_token = values.get("X-Amz-Security-Token")
    if session_token != credentials.token:
        raise TokenRejected("session-token", "the session token is not the trusted one")
    unsigned = "https://" + netloc + "/?" + query[: -len("&X-Amz-Signature=" + raw[keys[-1]])]
    expected = _signature(
        _auth(credentials, scope_region, scope_service, expires), unsigned, timestamp
    )
    given = values["X-Amz-Signature"]
    if not _SIGNATURE.match(given) or not hmac.compare_digest(expected, given):
        raise TokenRejected("signature", "the signature does not match the trusted secret key")

    # The signature is good: now what it covers must be what this server expects.
    if values["Action"] != "connect":
        raise TokenRejected("action", f"Action is {values['Action']!r}, not 'connect'")
    if scope_service != SERVICE:
        raise TokenRejected("service", f"signed for service {scope_service!r}, not {SERVICE}")
    if scope_region != region:
        raise TokenRejected("region", f"signed for region {scope_region}, this is {region}")
    if netloc.lower() != _netloc(host, port).lower():
        raise TokenRejected("endpoint", f"signed for {netloc}, this is {_netloc(host, port)}")
    if values["DBUser"] != db_user:
        raise TokenRejected(
            "user", f"signed for db user {values['DBUser']!r}, the login is for {db_user!r}"
        )
    if not 1 <= expires <= MAX_EXPIRES:
        raise TokenRejected("expiry", f"X-Amz-Expires {expires} is not 1..{MAX_EXPIRES}")
    if signed_at > now + CLOCK_SKEW:
        raise TokenRejected("not-yet-valid", f"signed at {timestamp}, in the future")
    if now > signed_at + timedelta(seconds=expires):
        raise TokenRejected("expired", f"signed at {timestamp}, valid for {expires} s")
    return TokenClaims(
        host=host,
        port=port,
        db_user=db_user,
        access_key=access_key,
        region=scope_region,
        service=scope_service,
        signed_at=signed_at,
        expires_in=expires,
    )
