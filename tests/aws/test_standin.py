"""The RDS stand-in on its own, driven by real psql (and psycopg for a cancel): good tokens
reach the real PostgreSQL, bad ones get RDS's refusal, and the stand-in says which check
refused each. These tests keep the stand-in honest before the end-to-end tests rely on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import psycopg
import pytest
from botocore.credentials import Credentials

from dataplane.aws import RdsTokenProvider
from schemas.bundle import BundleDatabase
from tests.aws.conftest import OTHER_KEY, TEST_KEY, AwsEnv, RdsPki
from tests.aws.iamtoken import sign_token
from tests.aws.standin import RdsStandIn, RealPostgres
from tests.fixtures.pg import PgServer, conninfo, run_psql

T = TypeVar("T")
REGION = "us-west-1"
PAM_REFUSAL = 'FATAL:  PAM authentication failed for user "alice"'


def real_postgres(pg: PgServer) -> RealPostgres:
    def client_cert(user: str) -> tuple:
        issued = pg.client_cert(user)
        return issued.cert_file, issued.key_file

    return RealPostgres(
        host=pg.server.host,
        port=pg.port,
        server_hostname="localhost",
        ca_file=pg.pki.ca.cert_file,
        client_cert=client_cert,
    )


def with_standin(
    pg: PgServer,
    rds: RdsPki,
    body: Callable[[RdsStandIn], Awaitable[T]],
    trusted: tuple[Credentials, ...] = (TEST_KEY,),
) -> T:
    async def main() -> T:
        async with RdsStandIn(
            cert_file=rds.server.cert_file,
            key_file=rds.server.key_file,
            region=REGION,
            trusted=trusted,
            upstream=real_postgres(pg),
        ) as standin:
            return await body(standin)

    return asyncio.run(main())


def standin_conninfo(standin: RdsStandIn, rds: RdsPki, user: str = "alice", **extra: str) -> str:
    params: dict[str, str | int] = {
        "host": "localhost",
        "hostaddr": "127.0.0.1",
        "port": standin.port,
        "user": user,
        "dbname": "postgres",
        "sslmode": "verify-full",
        "sslrootcert": str(rds.ca.cert_file),
        "gssencmode": "disable",
        "connect_timeout": 10,
    }
    params.update(extra)
    return conninfo(**params)


async def psql_with(
    standin: RdsStandIn, rds: RdsPki, token: str, sql: str, user: str = "alice", **extra: str
) -> tuple[int, str, str]:
    done = await asyncio.to_thread(
        run_psql, standin_conninfo(standin, rds, user, **extra), sql, {"PGPASSWORD": token}
    )
    return done.returncode, done.stdout.strip(), done.stderr


def test_a_boto3_token_reaches_the_real_postgres(
    pg_server: PgServer, rds_pki: RdsPki, aws_env: AwsEnv
) -> None:
    aws_env.use_environment(TEST_KEY)
    provider = RdsTokenProvider()

    async def body(standin: RdsStandIn) -> tuple[tuple[int, str, str], list[str]]:
        spec = BundleDatabase(name="aurora", uri=standin.endpoint, aws_region=REGION)
        token = await provider.password_for(spec, "alice")
        assert token is not None
        result = await psql_with(
            standin,
            rds_pki,
            token,
            "select current_user, ssl from pg_stat_ssl where pid = pg_backend_pid()",
        )
        return result, [a.outcome for a in standin.attempts]

    (code, out, err), outcomes = with_standin(pg_server, rds_pki, body)
    assert code == 0, err
    assert out == "alice|t"  # the real server, over TLS with alice's certificate
    assert outcomes == ["accepted"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("other credentials", "unknown-key"),
        ("same key id, other secret", "signature"),
        ("for another user", "user"),
        ("for another port", "endpoint"),
        ("for another host", "endpoint"),
        ("for another region", "region"),
        ("expired", "expired"),
        ("tampered user", "signature"),
        ("not a token", "malformed"),
    ],
)
def test_bad_tokens_get_the_rds_refusal(
    pg_server: PgServer, rds_pki: RdsPki, case: str, reason: str
) -> None:
    now = datetime.now(UTC)

    def token(standin: RdsStandIn) -> str:
        port = standin.port
        if case == "other credentials":
            return sign_token(OTHER_KEY, "localhost", port, "alice", REGION, now)
        if case == "same key id, other secret":
            forged = Credentials(TEST_KEY.access_key, OTHER_KEY.secret_key)
            return sign_token(forged, "localhost", port, "alice", REGION, now)
        if case == "for another user":
            return sign_token(TEST_KEY, "localhost", port, "bob", REGION, now)
        if case == "for another port":
            return sign_token(TEST_KEY, "localhost", port + 1, "alice", REGION, now)
        if case == "for another host":
            return sign_token(TEST_KEY, "127.0.0.1", port, "alice", REGION, now)
        if case == "for another region":
            return sign_token(TEST_KEY, "localhost", port, "alice", "us-east-1", now)
        if case == "expired":
            old = now - timedelta(minutes=16)
            return sign_token(TEST_KEY, "localhost", port, "alice", REGION, old)
        if case == "tampered user":
            good = sign_token(TEST_KEY, "localhost", port, "bob", REGION, now)
            return good.replace("DBUser=bob", "DBUser=alice")
        return "hunter2"

    async def body(standin: RdsStandIn) -> tuple[tuple[int, str, str], list[str]]:
        result = await psql_with(standin, rds_pki, token(standin), "select 1")
        return result, [a.outcome for a in standin.attempts]

    (code, out, err), outcomes = with_standin(pg_server, rds_pki, body)
    assert code != 0 and out == ""
    assert PAM_REFUSAL in err
    assert outcomes == [reason]


def test_the_stand_in_requires_tls(pg_server: PgServer, rds_pki: RdsPki) -> None:
    async def body(standin: RdsStandIn) -> tuple[tuple[int, str, str], list[str]]:
        good = sign_token(TEST_KEY, "localhost", standin.port, "alice", REGION, datetime.now(UTC))
        result = await psql_with(standin, rds_pki, good, "select 1", sslmode="disable")
        return result, [a.outcome for a in standin.attempts]

    (code, _, err), outcomes = with_standin(pg_server, rds_pki, body)
    assert code != 0 and "SSL off" in err
    assert outcomes == ["no-tls"]


def test_server_errors_after_a_good_token_come_from_the_real_server(
    pg_server: PgServer, rds_pki: RdsPki
) -> None:
    async def body(standin: RdsStandIn) -> tuple[int, str, str]:
        good = sign_token(TEST_KEY, "localhost", standin.port, "alice", REGION, datetime.now(UTC))
        return await psql_with(standin, rds_pki, good, "select 1", dbname="no_such_db")

    code, _, err = with_standin(pg_server, rds_pki, body)
    assert code != 0 and 'database "no_such_db" does not exist' in err


def test_a_cancel_reaches_the_real_server(pg_server: PgServer, rds_pki: RdsPki) -> None:
    """A CancelRequest comes on a new connection (libpq 17+: over TLS when sslmode asks for
    it); the stand-in passes it on. psycopg's async client runs on the stand-in's loop: its
    blocking cancel would hold the GIL in C while the stand-in waits to answer."""

    async def body(standin: RdsStandIn) -> str:
        good = sign_token(TEST_KEY, "localhost", standin.port, "alice", REGION, datetime.now(UTC))
        dsn = standin_conninfo(standin, rds_pki, password=good)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            query = asyncio.ensure_future(conn.execute("select pg_sleep(30)"))
            await asyncio.sleep(0.5)
            started = time.monotonic()
            await conn.cancel_safe(timeout=10)
            with pytest.raises(psycopg.errors.QueryCanceled) as exc:
                await query
            assert time.monotonic() - started < 10
            return str(exc.value)

    assert "canceling statement due to user request" in with_standin(pg_server, rds_pki, body)
