"""RdsTokenProvider: IAM tokens signed with boto3's default credential chain, checked with
botocore's own SigV4 signer; the errors a person gets when credentials or regions are wrong.

No AWS here: credentials are AWS's documentation example keys, set in the environment or
in shared config files of a temp directory (`aws_env`), with instance metadata disabled.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl

import pytest
from botocore.credentials import Credentials

from dataplane.aws import (
    CredentialsUnusable,
    InvalidRegion,
    NoCredentials,
    RdsTokenProvider,
    RegionMissing,
    endpoint_region,
    preflight,
)
from schemas.bundle import BundleDatabase
from tests.aws.conftest import OTHER_KEY, TEST_KEY, AwsEnv
from tests.aws.iamtoken import TokenRejected, sign_token, verify_token

HOST = "aurora-1.abcdefghijkl.us-west-1.rds.amazonaws.com"
AURORA = BundleDatabase(name="aurora", uri=f"{HOST}:5432", aws_region="us-west-1")


def token_for(
    provider: RdsTokenProvider, spec: BundleDatabase = AURORA, user: str = "alice"
) -> str:
    token = asyncio.run(provider.password_for(spec, user))
    assert token is not None
    return token


def check(token: str, creds: Credentials = TEST_KEY, *, user: str = "alice") -> None:
    verify_token(
        token,
        host=HOST,
        port=5432,
        db_user=user,
        region="us-west-1",
        trusted={creds.access_key: creds},
        now=datetime.now(UTC),
    )


def query(token: str) -> dict[str, str]:
    return dict(parse_qsl(token.split("?", 1)[1], strict_parsing=True))


# ------------------------------------------------------------------ tokens and their signature


def test_token_from_environment_is_a_valid_sigv4_presigned_url(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    provider = RdsTokenProvider()
    before = datetime.now(UTC).replace(microsecond=0)
    token = token_for(provider)
    after = datetime.now(UTC)

    assert token.startswith(f"{HOST}:5432/?")  # no scheme, as RDS expects
    q = query(token)
    assert q["Action"] == "connect"
    assert q["DBUser"] == "alice"
    assert q["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
    assert q["X-Amz-Expires"] == "900"
    assert q["X-Amz-SignedHeaders"] == "host"
    key, day, region, service, terminator = q["X-Amz-Credential"].split("/")
    assert (key, region, service, terminator) == (
        TEST_KEY.access_key,
        "us-west-1",
        "rds-db",
        "aws4_request",
    )
    signed = datetime.strptime(q["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert before <= signed <= after and day == q["X-Amz-Date"][:8]
    assert "X-Amz-Security-Token" not in q

    claims = verify_token(
        token,
        host=HOST,
        port=5432,
        db_user="alice",
        region="us-west-1",
        trusted={TEST_KEY.access_key: TEST_KEY},
        now=after,
    )
    assert (claims.service, claims.expires_in, claims.access_key) == (
        "rds-db",
        900,
        TEST_KEY.access_key,
    )
    assert provider.credentials_method == "env"


def test_verification_recomputes_the_signature_it_does_not_trust_it(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    token = token_for(RdsTokenProvider())
    same_id_other_secret = Credentials(TEST_KEY.access_key, OTHER_KEY.secret_key)
    with pytest.raises(TokenRejected) as exc:
        check(token, same_id_other_secret)
    assert exc.value.reason == "signature"
    forged = token.replace("DBUser=alice", "DBUser=postgres")
    with pytest.raises(TokenRejected) as exc:
        check(forged, user="postgres")
    assert exc.value.reason == "signature"
    with pytest.raises(TokenRejected) as exc:
        check(token, user="bob")
    assert exc.value.reason == "user"


def test_sign_token_helper_agrees_with_boto3(aws_env: AwsEnv) -> None:
    """The tests make expired tokens with `sign_token`: it must sign exactly like boto3."""
    aws_env.use_environment(TEST_KEY)
    token = token_for(RdsTokenProvider())
    signed = datetime.strptime(query(token)["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert sign_token(TEST_KEY, HOST, 5432, "alice", "us-west-1", signed) == token


def test_session_token_of_temporary_credentials_is_in_the_token(aws_env: AwsEnv) -> None:
    temporary = Credentials(TEST_KEY.access_key, TEST_KEY.secret_key, "FwoGZXIvYXdzE+test/token=")
    aws_env.use_environment(temporary)
    token = token_for(RdsTokenProvider())
    assert query(token)["X-Amz-Security-Token"] == temporary.token
    check(token, temporary)
    with pytest.raises(TokenRejected) as exc:
        check(token, TEST_KEY)  # the same keys without the session token
    assert exc.value.reason == "session-token"


def test_a_fresh_token_for_every_connection(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    provider = RdsTokenProvider()
    first = token_for(provider)
    time.sleep(1.05)  # SigV4 timestamps have one-second resolution
    second = token_for(provider)
    assert first != second
    assert query(first)["X-Amz-Date"] < query(second)["X-Amz-Date"]
    check(first)
    check(second)


def test_credentials_are_found_once_and_reused(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    provider = RdsTokenProvider()
    check(token_for(provider))
    aws_env.monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    aws_env.monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    check(token_for(provider))  # the session made at the first call still signs
    with pytest.raises(NoCredentials):
        token_for(RdsTokenProvider())  # a new one finds nothing


def test_tokens_for_other_users_ports_and_regions(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    provider = RdsTokenProvider()
    east = BundleDatabase(name="east", uri="10.0.0.7:6432", aws_region="us-east-2")
    token = token_for(provider, east, "bob")
    verify_token(
        token,
        host="10.0.0.7",
        port=6432,
        db_user="bob",
        region="us-east-2",
        trusted={TEST_KEY.access_key: TEST_KEY},
        now=datetime.now(UTC),
    )
    with pytest.raises(TokenRejected) as exc:
        verify_token(
            token,
            host="10.0.0.7",
            port=6432,
            db_user="bob",
            region="us-west-1",
            trusted={TEST_KEY.access_key: TEST_KEY},
            now=datetime.now(UTC),
        )
    assert exc.value.reason == "region"
    with pytest.raises(TokenRejected) as exc:
        verify_token(
            token,
            host="10.0.0.7",
            port=5432,
            db_user="bob",
            region="us-east-2",
            trusted={TEST_KEY.access_key: TEST_KEY},
            now=datetime.now(UTC),
        )
    assert exc.value.reason == "endpoint"
    with pytest.raises(TokenRejected) as exc:
        verify_token(
            token,
            host="10.0.0.7",
            port=6432,
            db_user="bob",
            region="us-east-2",
            trusted={TEST_KEY.access_key: TEST_KEY},
            now=datetime.now(UTC) + timedelta(minutes=16),
        )
    assert exc.value.reason == "expired"


def test_ipv6_endpoint_is_bracketed_in_the_token(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    spec = BundleDatabase(name="v6", uri="[::1]:5432", aws_region="us-west-1")
    token = token_for(RdsTokenProvider(), spec)
    assert token.startswith("[::1]:5432/?")
    verify_token(
        token,
        host="::1",
        port=5432,
        db_user="alice",
        region="us-west-1",
        trusted={TEST_KEY.access_key: TEST_KEY},
        now=datetime.now(UTC),
    )


def test_no_token_and_no_secret_in_logs_even_at_debug(
    aws_env: AwsEnv, caplog: pytest.LogCaptureFixture
) -> None:
    aws_env.use_environment(TEST_KEY)
    caplog.set_level(logging.DEBUG)
    logging.getLogger("botocore").setLevel(logging.DEBUG)
    try:
        token = token_for(RdsTokenProvider())
    finally:
        logging.getLogger("botocore").setLevel(logging.NOTSET)
    signature = query(token)["X-Amz-Signature"]
    assert "botocore" in caplog.text  # botocore did log at DEBUG...
    assert signature not in caplog.text  # ...but not the signature
    assert "StringToSign" not in caplog.text and "CanonicalRequest" not in caplog.text
    assert TEST_KEY.secret_key not in caplog.text
    assert "credentials from env" in caplog.text


# ------------------------------------------------------------------ the default chain


def test_shared_credentials_file_default_profile(aws_env: AwsEnv) -> None:
    aws_env.write_credentials(default=TEST_KEY)
    provider = RdsTokenProvider()
    check(token_for(provider))
    assert provider.credentials_method == "shared-credentials-file"


def test_profile_from_aws_profile_and_from_the_argument(aws_env: AwsEnv) -> None:
    aws_env.write_credentials(default=TEST_KEY, agent=OTHER_KEY)
    aws_env.monkeypatch.setenv("AWS_PROFILE", "agent")
    check(token_for(RdsTokenProvider()), OTHER_KEY)
    aws_env.monkeypatch.delenv("AWS_PROFILE")
    check(token_for(RdsTokenProvider()), TEST_KEY)
    check(token_for(RdsTokenProvider(profile_name="agent")), OTHER_KEY)


def test_profile_in_the_config_file(aws_env: AwsEnv) -> None:
    aws_env.config_file.write_text(
        "[profile rds-agent]\n"
        f"aws_access_key_id = {OTHER_KEY.access_key}\n"
        f"aws_secret_access_key = {OTHER_KEY.secret_key}\n"
    )
    aws_env.monkeypatch.setenv("AWS_PROFILE", "rds-agent")
    provider = RdsTokenProvider()
    check(token_for(provider), OTHER_KEY)
    assert provider.credentials_method == "config-file"


def test_environment_wins_over_the_shared_file(aws_env: AwsEnv) -> None:
    aws_env.write_credentials(default=OTHER_KEY)
    aws_env.use_environment(TEST_KEY)
    check(token_for(RdsTokenProvider()), TEST_KEY)


# ------------------------------------------------------------------ errors a person can act on


def test_no_credentials_says_where_boto3_looked_and_what_to_set(aws_env: AwsEnv) -> None:
    with pytest.raises(NoCredentials) as exc:
        token_for(RdsTokenProvider())
    err = exc.value
    assert "no AWS credentials" in err.message and "'aurora'" in err.message
    for where in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        str(aws_env.credentials_file),
        str(aws_env.config_file),
        "profile 'default'",
        "AWS_PROFILE",
        "instance role",
        "AWS_EC2_METADATA_DISABLED",
        "tctl db iam-policy aurora",
        "rds-db:connect",
    ):
        assert where in err.hint, where
    response = err.error_response()
    assert response.fields["S"] == "FATAL" and response.fields["C"] == "08001"
    assert response.fields["M"] == err.message and response.fields["H"] == err.hint


def test_missing_credentials_are_remembered_briefly_then_looked_for_again(
    aws_env: AwsEnv,
) -> None:
    patient = RdsTokenProvider(retry_after=3600)
    eager = RdsTokenProvider(retry_after=0)
    for provider in (patient, eager):
        with pytest.raises(NoCredentials):
            token_for(provider)
    aws_env.write_credentials(default=TEST_KEY)  # the operator fixes the host
    with pytest.raises(NoCredentials) as exc:
        token_for(patient, user="bob")  # within retry_after: not probed again
    assert "'aurora'" in exc.value.message
    check(token_for(eager))  # after retry_after: found without a restart


def test_a_profile_that_does_not_exist(aws_env: AwsEnv) -> None:
    aws_env.write_credentials(default=TEST_KEY)
    aws_env.monkeypatch.setenv("AWS_PROFILE", "agnet")
    with pytest.raises(CredentialsUnusable) as exc:
        token_for(RdsTokenProvider())
    assert "agnet" in exc.value.message and "could not be found" in exc.value.message
    assert "AWS_PROFILE" in exc.value.hint and str(aws_env.credentials_file) in exc.value.hint


def test_half_a_key_pair(aws_env: AwsEnv) -> None:
    aws_env.credentials_file.write_text(f"[default]\naws_access_key_id = {TEST_KEY.access_key}\n")
    with pytest.raises(CredentialsUnusable) as exc:
        token_for(RdsTokenProvider())
    assert "aws_secret_access_key" in exc.value.message
    assert TEST_KEY.secret_key not in str(exc.value.error_response())


def test_region_missing_for_an_rds_endpoint(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    spec = BundleDatabase(name="aurora", uri=f"{HOST}:5432")
    with pytest.raises(RegionMissing) as exc:
        token_for(RdsTokenProvider(), spec)
    assert "no AWS region" in exc.value.message and HOST in exc.value.message
    assert "--db-aws-region=us-west-1" in exc.value.hint
    assert "databases/aurora.yaml" in exc.value.hint


@pytest.mark.parametrize("region", ["us-west-9", "mars-north-1", "US-WEST-1", "uswest1"])
def test_a_region_that_is_not_an_aws_region(aws_env: AwsEnv, region: str) -> None:
    aws_env.use_environment(TEST_KEY)
    spec = BundleDatabase(name="pg", uri="db.internal:5432", aws_region=region)
    with pytest.raises(InvalidRegion) as exc:
        token_for(RdsTokenProvider(), spec)
    assert repr(region) in exc.value.message and "not a region" in exc.value.message
    assert "spec.aws.region" in exc.value.hint


def test_a_region_other_than_the_endpoints(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    spec = BundleDatabase(name="aurora", uri=f"{HOST}:5432", aws_region="us-east-1")
    with pytest.raises(InvalidRegion) as exc:
        token_for(RdsTokenProvider(), spec)
    assert "'us-east-1'" in exc.value.message and "in us-west-1" in exc.value.message
    assert "us-west-1" in exc.value.hint


def test_region_errors_come_before_credential_errors(aws_env: AwsEnv) -> None:
    spec = BundleDatabase(name="pg", uri="db.internal:5432", aws_region="us-west-9")
    with pytest.raises(InvalidRegion):
        token_for(RdsTokenProvider(), spec)


def test_every_partition_is_known(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    provider = RdsTokenProvider()
    for region in ("eu-central-1", "cn-north-1", "us-gov-west-1"):
        spec = BundleDatabase(name="db", uri="db.internal:5432", aws_region=region)
        assert query(token_for(provider, spec))["X-Amz-Credential"].split("/")[2] == region


# ------------------------------------------------------------------ the agent's provider shape


def test_lookup_by_name_and_fallback_for_databases_without_aws(aws_env: AwsEnv) -> None:
    aws_env.use_environment(TEST_KEY)
    local = BundleDatabase(name="local", uri="127.0.0.1:5432")
    specs = {"aurora": AURORA, "local": local}
    asked: list[tuple[str, str]] = []

    async def static(database: str, db_user: str) -> str | None:
        asked.append((database, db_user))
        return "from-the-fallback"

    async def scenario() -> tuple[str | None, ...]:
        bare = RdsTokenProvider(specs.get)
        chained = RdsTokenProvider(specs.get, fallback=static)
        return (
            await bare("aurora", "alice"),
            await bare("local", "alice"),
            await bare("unknown", "alice"),
            await chained("local", "bob"),
            await chained("unknown", "carol"),
        )

    token, none_local, none_unknown, fallback_local, fallback_unknown = asyncio.run(scenario())
    assert token is not None
    check(token)
    assert none_local is None and none_unknown is None
    assert fallback_local == fallback_unknown == "from-the-fallback"
    assert asked == [("local", "bob"), ("unknown", "carol")]


def test_signing_runs_off_the_event_loop(aws_env: AwsEnv) -> None:
    """Finding credentials may read files and ask instance metadata: never on the loop."""
    aws_env.use_environment(TEST_KEY)
    provider = RdsTokenProvider()
    threads: list[str] = []
    original = provider.token_blocking

    def spy(spec: BundleDatabase, user: str) -> str:
        threads.append(threading.current_thread().name)
        return original(spec, user)

    provider.token_blocking = spy  # type: ignore[method-assign]

    async def scenario() -> str:
        return await provider.password_for(AURORA, "alice") or ""

    loop_thread = threading.current_thread().name
    check(asyncio.run(scenario()))
    assert threads and threads[0] != loop_thread


@pytest.mark.parametrize(
    ("host", "region"),
    [
        ("mydb.abcdefghijkl.us-west-1.rds.amazonaws.com", "us-west-1"),
        ("aurora.cluster-abcdefghijkl.eu-central-1.rds.amazonaws.com", "eu-central-1"),
        ("MYDB.ABC.US-EAST-2.RDS.AMAZONAWS.COM.", "us-east-2"),
        ("proxy.proxy-abcdefghijkl.ap-south-1.rds.amazonaws.com", "ap-south-1"),
        ("mydb.abc.cn-north-1.rds.amazonaws.com.cn", "cn-north-1"),
        ("db.example.com", None),
        ("rds.amazonaws.com", None),
        ("127.0.0.1", None),
    ],
)
def test_endpoint_region(host: str, region: str | None) -> None:
    assert endpoint_region(host) == region


def test_the_validity_window_is_checked_both_ways() -> None:
    """A token signed 20 minutes ago is expired, one signed 20 minutes ahead is not yet
    valid; one signed 14 minutes ago is still good (RDS tokens last 15 minutes)."""
    now = datetime.now(UTC)
    for offset, reason in ((-20, "expired"), (20, "not-yet-valid")):
        signed_at = now + timedelta(minutes=offset)
        token = sign_token(TEST_KEY, HOST, 5432, "alice", "us-west-1", signed_at)
        with pytest.raises(TokenRejected) as exc:
            check(token)
        assert exc.value.reason == reason
    check(sign_token(TEST_KEY, HOST, 5432, "alice", "us-west-1", now - timedelta(minutes=14)))


def test_preflight_before_dialling() -> None:
    """What the agent checks before it connects: the region settings, and a CA to verify
    RDS with (IAM tokens go only to a verified server)."""
    no_ca = BundleDatabase(name="aurora", uri=f"{HOST}:5432", aws_region="us-west-1")
    problem = preflight(no_ca)
    assert problem is not None
    assert "'aurora' has an AWS region but no ca_cert_file" in problem.message
    assert "global-bundle.pem" in problem.hint and "--db-ca-cert" in problem.hint
    assert preflight(no_ca.model_copy(update={"ca_cert_file": "/etc/rds-ca.pem"})) is None
    assert preflight(BundleDatabase(name="local", uri="127.0.0.1:5432")) is None
    assert isinstance(preflight(BundleDatabase(name="a", uri=f"{HOST}:5432")), RegionMissing)
    wrong = BundleDatabase(name="a", uri=f"{HOST}:5432", aws_region="eu-west-1", ca_cert_file="x")
    assert isinstance(preflight(wrong), InvalidRegion)
