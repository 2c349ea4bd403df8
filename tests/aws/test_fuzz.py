"""Hypothesis: what comes from the wire or from configuration never makes the AWS code fail
with anything but its own errors.

- `explain_upstream_auth_failure` reads a server's ErrorResponse: any fields, any text;
- `settings_problem` / `preflight` read database specs: any uri and region text;
- the stand-in's `verify_token` reads a client's password: any text is refused with a
  reason, never an exception of another kind (the end-to-end tests rely on the stand-in).
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.aws import AwsAuthError, explain_upstream_auth_failure, preflight
from dataplane.postgres import messages as m
from schemas.bundle import BundleDatabase
from tests.aws.conftest import TEST_KEY
from tests.aws.iamtoken import TokenRejected, sign_token, verify_token

FIELD_CODES = st.sampled_from(list("SVCMDHPpqWstcdnFLR"))
SQLSTATES = st.sampled_from(["28000", "28P01", "3D000", "53300", "08006", "XX000"])


@settings(max_examples=300)
@given(
    fields=st.dictionaries(FIELD_CODES, st.text(max_size=200), max_size=8),
    sqlstate=st.one_of(SQLSTATES, st.text(max_size=6)),
    db_user=st.text(min_size=1, max_size=64),
    region=st.one_of(st.none(), st.text(max_size=20)),
)
def test_explain_takes_any_server_error(
    fields: dict[str, str], sqlstate: str, db_user: str, region: str | None
) -> None:
    error = m.ErrorResponse({**fields, "C": sqlstate})
    explained = explain_upstream_auth_failure("aurora", db_user, error, region=region)
    if explained is not None:
        message, hint = explained
        assert message and hint


@settings(max_examples=300)
@given(
    uri=st.text(max_size=80),
    region=st.one_of(st.none(), st.text(max_size=24)),
    ca=st.one_of(st.none(), st.text(max_size=10)),
)
def test_preflight_takes_any_spec(uri: str, region: str | None, ca: str | None) -> None:
    spec = BundleDatabase(name="db", uri=uri, aws_region=region, ca_cert_file=ca)
    problem = preflight(spec)
    assert problem is None or (isinstance(problem, AwsAuthError) and problem.hint)


@settings(max_examples=500)
@given(st.text(max_size=600))
def test_any_password_is_refused_with_a_reason(password: str) -> None:
    try:
        verify_token(
            password,
            host="localhost",
            port=5432,
            db_user="alice",
            region="us-west-1",
            trusted={TEST_KEY.access_key: TEST_KEY},
            now=datetime.now(UTC),
        )
    except TokenRejected as exc:
        assert exc.reason
    else:
        raise AssertionError("a random password verified as a token")


@settings(max_examples=300)
@given(
    position=st.integers(min_value=0, max_value=10_000),
    replacement=st.characters(codec="ascii"),
)
def test_any_one_character_change_to_a_token_is_refused(position: int, replacement: str) -> None:
    token = sign_token(TEST_KEY, "localhost", 5432, "alice", "us-west-1", datetime.now(UTC))
    i = position % len(token)
    if token[i] == replacement:
        return
    changed = token[:i] + replacement + token[i + 1 :]
    try:
        verify_token(
            changed,
            host="localhost",
            port=5432,
            db_user="alice",
            region="us-west-1",
            trusted={TEST_KEY.access_key: TEST_KEY},
            now=datetime.now(UTC),
        )
    except TokenRejected:
        return
    # Host names are case-insensitive, and SigV4 signs the lower-cased host: a change of
    # case there is the same token. Any other change that verifies is a bug.
    assert i < len("localhost") and changed.lower() == token.lower(), (
        f"a token changed at {i} ({token[i]!r} -> {replacement!r}) verified"
    )
