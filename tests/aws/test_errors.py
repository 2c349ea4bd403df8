"""explain_upstream_auth_failure: what the psql user reads when RDS refuses the agent's token,
and which server errors are left as the server said them."""

from __future__ import annotations

import pytest

from dataplane.aws import explain_upstream_auth_failure, sql_identifier
from dataplane.postgres import fatal


def test_pam_refusal_names_the_grant_and_the_iam_policy() -> None:
    refused = fatal("28000", 'PAM authentication failed for user "alice"')
    explained = explain_upstream_auth_failure("aurora", "alice", refused)
    assert explained is not None
    message, hint = explained
    assert "'aurora'" in message and "'alice'" in message and "IAM" in message
    assert 'PAM authentication failed for user "alice"' in message
    assert "GRANT rds_iam TO alice;" in hint
    assert "rds-db:connect" in hint and "`tctl db iam-policy aurora`" in hint
    assert "clock" in hint


def test_password_refusal_is_explained_the_same_way() -> None:
    refused = fatal("28P01", 'password authentication failed for user "bob"')
    explained = explain_upstream_auth_failure("rds-prod", "bob", refused)
    assert explained is not None
    assert "GRANT rds_iam TO bob;" in explained[1]
    assert "tctl db iam-policy rds-prod" in explained[1]


def test_a_missing_account_gets_create_user() -> None:
    missing = fatal("28000", 'role "carol" does not exist')
    explained = explain_upstream_auth_failure("aurora", "carol", missing)
    assert explained is not None
    assert "has no account 'carol'" in explained[0]
    assert (
        explained[1]
        == "create it for IAM authentication: CREATE USER carol; GRANT rds_iam TO carol;"
    )


@pytest.mark.parametrize(
    ("sqlstate", "message"),
    [
        ("3D000", 'database "nope" does not exist'),
        ("53300", "sorry, too many clients already"),
        ("28000", 'no pg_hba.conf entry for host "10.0.0.1", user "alice", database "x", SSL off'),
        ("57P03", "the database system is starting up"),
        ("42501", 'permission denied for database "postgres"'),
    ],
)
def test_other_server_errors_pass_unchanged(sqlstate: str, message: str) -> None:
    assert explain_upstream_auth_failure("aurora", "alice", fatal(sqlstate, message)) is None


def test_user_names_in_sql_hints_are_quoted_when_they_must_be() -> None:
    refused = fatal("28000", 'PAM authentication failed for user "App-User"')
    explained = explain_upstream_auth_failure("aurora", "App-User", refused)
    assert explained is not None and 'GRANT rds_iam TO "App-User";' in explained[1]
    assert sql_identifier("alice") == "alice"
    assert sql_identifier("user") == '"user"'  # a reserved word
    assert sql_identifier('we"ird') == '"we""ird"'
    assert sql_identifier("Alice") == '"Alice"'
