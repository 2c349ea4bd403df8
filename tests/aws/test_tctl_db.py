"""`tctl db iam-policy`: seed 001's IAM policy for a database of the bundle in force (a real
control plane data dir, reconciled from a git repository holding the example policies), or
for the region given with --region."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from control.service import ControlPlane, make_reconciler
from control.settings import ControlSettings, SourceSettings
from control.tctl import main as tctl
from tests.control.conftest import git

ROOT = Path(__file__).resolve().parents[2]
SEED_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": ["rds-db:connect"],
            "Resource": ["arn:aws:rds-db:<region>:<account-id>:dbuser:<resource-id>/*"],
        }
    ],
}


def seed_policy(
    region: str,
    account: str = "<account-id>",
    resource: str = "<resource-id>",
    partition: str = "aws",
) -> dict:
    doc = json.loads(json.dumps(SEED_POLICY))
    doc["Statement"][0]["Resource"] = [
        f"arn:{partition}:rds-db:{region}:{account}:dbuser:{resource}/*"
    ]
    return doc


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A control plane whose bundle in force holds the example policies (aurora in
    us-west-1 with IAM authentication, local without)."""
    base = tmp_path_factory.mktemp("iam-policy")
    forge = base / "forge"
    shutil.copytree(ROOT / "policies", forge)
    git("init", "--quiet", "--initial-branch=main", cwd=forge)
    git("add", "-A", cwd=forge)
    git("commit", "--quiet", "-m", "example policies", cwd=forge)
    settings = ControlSettings(
        cluster_name="root", source=SourceSettings(kind="remote", url=f"file://{forge}")
    )
    plane = ControlPlane(base / "data", settings)
    plane.prepare()
    plane.close()
    outcome = make_reconciler(base / "data", settings).run_once()
    assert outcome.result == "published", outcome
    return base / "data"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = tctl(["db", "iam-policy", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_policy_of_a_database_in_the_bundle(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "aurora", "--data-dir", str(data_dir))
    assert code == 0, err
    assert json.loads(out) == seed_policy("us-west-1")
    assert "fill in <account-id> (--account-id) and <resource-id> (--resource-id)" in err


def test_placeholders_filled_where_given(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(
        capsys,
        "aurora",
        "--data-dir",
        str(data_dir),
        "--account-id",
        "123456789012",
        "--resource-id",
        "cluster-ABCDEFGHIJKL01234",
    )
    assert code == 0, err
    assert json.loads(out) == seed_policy("us-west-1", "123456789012", "cluster-ABCDEFGHIJKL01234")
    assert err == ""
    code, out, err = run(
        capsys, "aurora", "--data-dir", str(data_dir), "--account-id", "123456789012"
    )
    assert json.loads(out) == seed_policy("us-west-1", "123456789012")
    assert "<resource-id> (--resource-id)" in err and "account-id" not in err


def test_a_database_without_aws_region(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "local", "--data-dir", str(data_dir))
    assert code == 1 and out == ""
    assert "'local' has no spec.aws.region in the bundle in force (serial 1)" in err
    assert "client certificates" in err and "--region" in err
    code, out, err = run(capsys, "local", "--data-dir", str(data_dir), "--region", "eu-west-1")
    assert code == 0 and json.loads(out) == seed_policy("eu-west-1")
    assert "using --region" in err


def test_a_database_only_an_agent_knows(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "rds-prod", "--data-dir", str(data_dir))
    assert code == 1 and out == ""
    assert "'rds-prod' is not in the bundle in force (serial 1)" in err
    assert "its AWS databases: aurora" in err and "--region" in err
    code, out, err = run(capsys, "rds-prod", "--data-dir", str(data_dir), "--region", "us-east-2")
    assert code == 0 and json.loads(out) == seed_policy("us-east-2")


def test_region_contradicting_the_bundle(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "aurora", "--data-dir", str(data_dir), "--region", "us-east-1")
    assert code == 1 and out == ""
    assert "--region us-east-1 contradicts" in err and "in us-west-1" in err
    code, out, _ = run(capsys, "aurora", "--data-dir", str(data_dir), "--region", "us-west-1")
    assert code == 0 and json.loads(out) == seed_policy("us-west-1")


def test_without_a_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nowhere")
    code, out, err = run(capsys, "aurora", "--data-dir", missing, "--region", "cn-north-1")
    assert code == 0
    assert json.loads(out) == seed_policy("cn-north-1", partition="aws-cn")
    assert "not looked up" in err
    code, out, err = run(capsys, "aurora", "--data-dir", missing, "--region", "us-gov-west-1")
    assert json.loads(out) == seed_policy("us-gov-west-1", partition="aws-us-gov")
    code, out, err = run(capsys, "aurora", "--data-dir", missing)
    assert code == 2 and out == ""
    assert "does not exist" in err and "--region" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--account-id", "12345"], "is not a 12-digit AWS account id"),
        (["--account-id", "arn:aws:iam::123456789012:root"], "12-digit"),
        (["--resource-id", "my-aurora"], "db-... for an RDS instance or cluster-..."),
        (["--region", "US West"], "is not an AWS region name"),
    ],
)
def test_bad_arguments_are_usage_errors(
    data_dir: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = run(capsys, "aurora", "--data-dir", str(data_dir), *argv)
    assert code == 2 and out == ""
    assert expected in err


def test_a_region_rds_is_not_in(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "x", "--data-dir", str(tmp_path / "no"), "--region", "us-west-9")
    assert code == 1 and out == ""
    assert "'us-west-9' is not an AWS region that RDS is in" in err
