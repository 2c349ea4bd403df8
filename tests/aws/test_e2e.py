"""Issue 8 end to end: psql -> proxy -> reverse tunnel -> db agent -> (IAM token) -> an RDS
stand-in -> a real PostgreSQL.

There is no AWS here. `tests/aws/standin.py` plays RDS: TLS with a certificate from a test
"RDS root CA" (the databases' `ca_cert_file`), a cleartext password request, the token
checked with botocore's signer against the credentials it trusts, then a relay to the
session's real PostgreSQL (`pg_server`). The agent signs with boto3's default chain, fed
from shared credentials files in a temp directory (profile `agent`, AWS's documentation
example key), instance metadata disabled.

The agent `aws-agent` is built without a password provider, as a deployment builds it: the
AgentService default (`RdsTokenProvider`) signs its tokens. `aws-agent-nocreds` uses a
profile with no credentials in it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dataplane.aws import RdsTokenProvider
from schemas.bundle import BundleDatabase
from tests.aws.conftest import OTHER_KEY, TEST_KEY, RdsPki
from tests.aws.standin import RdsStandIn
from tests.aws.test_standin import real_postgres
from tests.dataplane.conftest import DataPath
from tests.dataplane.support import LoopThread, Pki
from tests.fixtures.pg import PgServer, run_psql

pytestmark = pytest.mark.slow

REGION = "us-west-1"
RDS_HOST = "aurora-1.abcdefghijkl.us-west-1.rds.amazonaws.com"


class AwsPath(DataPath):
    """The data-path harness with the AWS databases below; `start_agent` always gets its
    databases, so the data-path tests' own PostgreSQL (`pg`) is not needed."""

    def __init__(self, pki: Pki, key: Ed25519PrivateKey) -> None:
        super().__init__(pki, None, key)  # type: ignore[arg-type]


@dataclass
class World:
    path: AwsPath
    standins: dict[str, RdsStandIn]
    thread: LoopThread
    pg: PgServer

    def psql(
        self, database: str, sql: str = "select 1", user: str = "alice", **options: str
    ) -> tuple[int, str, str]:
        cert = self.path.cert(user, database)
        done = run_psql(self.path.dsn(cert, user, "postgres", **options), sql)
        return done.returncode, done.stdout.strip(), done.stderr

    def attempts(self, standin: str) -> list[str]:
        s = self.standins[standin]
        return self.thread.call(lambda: [a.outcome for a in s.attempts])


def _isolated_aws(mp: pytest.MonkeyPatch, base: Path) -> None:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            mp.delenv(key)
    config, credentials = base / "aws-config", base / "aws-credentials"
    config.write_text("[profile empty]\nregion = us-west-1\n")
    credentials.write_text(
        f"[agent]\naws_access_key_id = {TEST_KEY.access_key}\n"
        f"aws_secret_access_key = {TEST_KEY.secret_key}\n"
    )
    mp.setenv("AWS_CONFIG_FILE", str(config))
    mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    mp.setenv("AWS_PROFILE", "agent")
    mp.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, rds_pki: RdsPki, pg_server: PgServer
) -> Iterator[World]:
    base = tmp_path_factory.mktemp("aws-e2e")
    with pytest.MonkeyPatch.context() as mp:
        _isolated_aws(mp, base)
        thread = LoopThread("rds-standins")
        upstream = real_postgres(pg_server)

        def standin(
            region: str = REGION, trusted: tuple = (TEST_KEY,), skew: int = 0
        ) -> RdsStandIn:
            s = RdsStandIn(
                cert_file=rds_pki.server.cert_file,
                key_file=rds_pki.server.key_file,
                region=region,
                trusted=trusted,
                upstream=upstream,
                now=lambda: datetime.now(UTC) + timedelta(minutes=skew),
            )
            thread.run(s.start())
            return s

        standins = {
            "good": standin(),
            "untrusting": standin(trusted=(OTHER_KEY,)),
            "ahead": standin(skew=20),  # its clock 20 minutes ahead of the agent's
            "east": standin(region="us-east-1"),
        }
        ca = str(rds_pki.ca.cert_file)

        def db(
            name: str, uri: str, region: str | None = REGION, ca_file: str | None = ca
        ) -> BundleDatabase:
            return BundleDatabase(
                name=name, uri=uri, aws_region=region, ca_cert_file=ca_file, labels={"env": "prod"}
            )

        good = standins["good"]
        databases = [
            db("aurora", good.endpoint),
            db("aurora-untrusted", standins["untrusting"].endpoint),
            db("aurora-skewed", standins["ahead"].endpoint),
            db("aurora-east", standins["east"].endpoint),
            db("aurora-by-ip", f"127.0.0.1:{good.port}"),
            db("aurora-badregion", good.endpoint, region="us-west-9"),
            db("rds-noregion", f"{RDS_HOST}:5432", region=None),
            db("rds-wrongregion", f"{RDS_HOST}:5432", region="us-east-1"),
            db("aurora-noca", good.endpoint, ca_file=None),
        ]
        nocreds = db("aurora-nocreds", good.endpoint)
        path = AwsPath(Pki(base / "pki"), Ed25519PrivateKey.generate())
        path.bundle_bytes = path.next_bundle()
        try:
            path.start_proxy()
            path.start_agent("aws-agent", databases=databases)
            path.start_agent(
                "aws-agent-nocreds",
                databases=[nocreds],
                password_provider=RdsTokenProvider(
                    {"aurora-nocreds": nocreds}.get, profile_name="empty"
                ),
            )
            yield World(path, standins, thread, pg_server)
        finally:
            path.close()
            for s in standins.values():
                thread.run(s.close())
            thread.stop()


def test_psql_through_the_proxy_gets_rows_from_an_aws_database(world: World) -> None:
    before = len(world.attempts("good"))
    code, out, err = world.psql(
        "aurora",
        "select current_user, inet_server_port(), count(*) from generate_series(1, 3)",
    )
    assert code == 0, err
    # The rows come from the real PostgreSQL behind the stand-in, logged in as alice.
    assert out == f"alice|{world.pg.port}|3"
    assert world.attempts("good")[before:] == ["accepted"]


def test_every_login_signs_a_fresh_token(world: World) -> None:
    """Every login signs its own token: two sessions with other startup options (so one's
    server connection cannot serve the other) and a second like the last, three tokens. That
    client reconnected, so the agent keeps the last server connection, and a fourth session
    like it takes it and needs none."""
    before = len(world.attempts("good"))
    for name in ("token-1", "token-2", "token-2"):
        code, out, err = world.psql("aurora", "select 'again'", application_name=name)
        assert code == 0 and out == "again", err
    assert world.attempts("good")[before:] == ["accepted"] * 3
    time.sleep(0.5)  # the agent resets the kept connection after psql has gone
    code, out, err = world.psql("aurora", "select 'kept'", application_name="token-2")
    assert code == 0 and out == "kept", err
    assert world.attempts("good")[before:] == ["accepted"] * 3


@pytest.mark.parametrize(
    ("database", "standin", "reason"),
    [
        ("aurora-untrusted", "untrusting", "unknown-key"),  # signed with other credentials
        ("aurora-skewed", "ahead", "expired"),
        ("aurora-east", "east", "region"),  # the database's region is not the one in force
        ("aurora-by-ip", "good", "endpoint"),  # signed for 127.0.0.1, the endpoint is localhost
    ],
)
def test_a_refused_token_reaches_psql_with_the_hint(
    world: World, database: str, standin: str, reason: str
) -> None:
    before = len(world.attempts(standin))
    code, out, err = world.psql(database)
    assert code != 0 and out == ""
    assert world.attempts(standin)[before:] == [reason]
    assert (
        f"FATAL:  database {database!r} refused the IAM authentication token for db user "
        "'alice' (the server said: PAM authentication failed for user \"alice\")"
    ) in err
    assert "HINT:  the database account needs the rds_iam role (GRANT rds_iam TO alice;)" in err
    assert f"rds-db:connect on this database: `tctl db iam-policy {database}`" in err
    assert f"signed for region {REGION}" in err and "clock" in err


def test_no_aws_credentials(world: World) -> None:
    before = len(world.attempts("good"))
    code, out, err = world.psql("aurora-nocreds")
    assert code != 0 and out == ""
    assert (
        "FATAL:  the db agent found no AWS credentials to sign an IAM token for database "
        "'aurora-nocreds'"
    ) in err
    assert (
        "HINT:  boto3 looked in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err
    )
    assert "profile 'empty'" in err and "tctl db iam-policy aurora-nocreds" in err
    assert world.attempts("good")[before:] == []  # no token was ever sent


def test_a_region_that_is_not_an_aws_region(world: World) -> None:
    code, _, err = world.psql("aurora-badregion")
    assert code != 0
    assert (
        "FATAL:  AWS region 'us-west-9' of database 'aurora-badregion' is not a region boto3 knows"
    ) in err
    assert "HINT:  set the region the database is deployed in" in err


def test_an_rds_endpoint_without_a_region(world: World) -> None:
    code, _, err = world.psql("rds-noregion")
    assert code != 0
    assert (
        f"FATAL:  database 'rds-noregion' at {RDS_HOST}:5432 is an AWS RDS endpoint, but no "
        "AWS region is set for it"
    ) in err
    assert "HINT:  set the region the database is in" in err
    assert "--db-aws-region=us-west-1" in err
    assert "could not connect" not in err  # found before dialling (no DNS here anyway)


def test_a_region_other_than_the_endpoints(world: World) -> None:
    code, _, err = world.psql("rds-wrongregion")
    assert code != 0
    assert (
        f"FATAL:  AWS region 'us-east-1' of database 'rds-wrongregion' is not the region of its "
        f"endpoint {RDS_HOST}, which is in us-west-1"
    ) in err
    assert (
        "HINT:  RDS refuses a token signed for another region: set spec.aws.region to us-west-1"
        in err
    )


def test_an_aws_database_without_a_ca_to_verify_it(world: World) -> None:
    before = len(world.attempts("good"))
    code, _, err = world.psql("aurora-noca")
    assert code != 0
    assert "FATAL:  database 'aurora-noca' has an AWS region but no ca_cert_file" in err
    assert "HINT:  download the RDS CA bundle" in err
    assert world.attempts("good")[before:] == []  # nothing was sent to the server
