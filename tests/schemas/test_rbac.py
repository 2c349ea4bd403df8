"""The RBAC decision, rule by rule (seeds 001 and 003)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.bundle import Bundle, BundleCluster, BundleConditions, BundleRole, BundleUser
from schemas.rbac import (
    AccessRequest,
    allowed_values,
    database_visible,
    decide,
    expand_templates,
    labels_match,
    max_session_ttl_seconds,
)

NOW = datetime(2026, 11, 21, tzinfo=UTC)


def role(name: str, allow: dict | None = None, deny: dict | None = None, ttl: int | None = None):
    return BundleRole(
        name=name,
        allow=BundleConditions(**(allow or {})),
        deny=BundleConditions(**(deny or {})),
        max_session_ttl_seconds=ttl,
    )


def bundle(roles: list[BundleRole], users: list[BundleUser]) -> Bundle:
    return Bundle(
        cluster=BundleCluster(
            name="root", certificate_ttl_seconds=3600, max_session_ttl_seconds=86400
        ),
        serial=1,
        commit="c" * 40,
        issued_at=NOW,
        expires_at=NOW + timedelta(days=1),
        roles={r.name: r for r in roles},
        users={u.name: u for u in users},
    )


def req(user: str = "alice", db_user: str = "alice", db_name: str = "main", labels=None, **kw):
    return AccessRequest(
        username=user,
        database="pg",
        labels=labels if labels is not None else {"environment": "dev"},
        db_user=db_user,
        db_name=db_name,
        **kw,
    )


DEVELOPER = role(
    "developer",
    allow={
        "db_labels": {"environment": ["dev", "stage"]},
        "db_users": ["viewer", "editor"],
        "db_names": ["main", "metrics", "postgres"],
    },
)
# Seed 003: any database/user on prod except the internal "postgres" database/user.
PROD = role(
    "prod",
    allow={"db_labels": {"environment": ["prod"]}, "db_users": ["*"], "db_names": ["*"]},
    deny={"db_users": ["postgres"], "db_names": ["postgres"]},
)


def test_allow_needs_labels_users_and_names() -> None:
    b = bundle([DEVELOPER], [BundleUser(name="alice", roles=["developer"])])
    assert decide(b, req(db_user="viewer", db_name="metrics"))
    assert decide(b, req(db_user="editor", labels={"environment": "stage"}))
    no_label = decide(b, req(db_user="viewer", labels={"environment": "prod"}))
    assert not no_label and "no role" in no_label.reason and "environment=prod" in no_label.reason
    no_user = decide(b, req(db_user="admin"))
    assert (
        not no_user and "db user 'admin'" in no_user.reason and "viewer, editor" in no_user.reason
    )
    no_name = decide(b, req(db_user="viewer", db_name="secret"))
    assert not no_name and "db name 'secret'" in no_name.reason


def test_deny_is_greedy_for_users_regardless_of_db_name() -> None:
    b = bundle([PROD], [BundleUser(name="alice", roles=["prod"])])
    prod = {"environment": "prod"}
    assert decide(b, req(db_user="anyone", db_name="app", labels=prod))
    d = decide(b, req(db_user="postgres", db_name="app", labels=prod))
    assert not d and "db user 'postgres' is denied by role 'prod'" in d.reason


def test_deny_is_greedy_for_names_regardless_of_db_user() -> None:
    b = bundle([PROD], [BundleUser(name="alice", roles=["prod"])])
    d = decide(b, req(db_user="app", db_name="postgres", labels={"environment": "prod"}))
    assert not d and "db name 'postgres' is denied" in d.reason


def test_deny_in_one_role_beats_allow_in_another() -> None:
    allow_all = role("all", allow={"db_labels": {"*": ["*"]}, "db_users": ["*"], "db_names": ["*"]})
    no_pg = role("no-postgres", deny={"db_users": ["postgres"]})
    b = bundle([allow_all, no_pg], [BundleUser(name="alice", roles=["all", "no-postgres"])])
    assert decide(b, req(db_user="app"))
    assert not decide(b, req(db_user="postgres"))


def test_deny_with_labels_only_shuts_those_databases() -> None:
    allow_all = role("all", allow={"db_labels": {"*": ["*"]}, "db_users": ["*"], "db_names": ["*"]})
    no_prod = role("no-prod", deny={"db_labels": {"environment": ["prod"]}})
    b = bundle([allow_all, no_prod], [BundleUser(name="alice", roles=["all", "no-prod"])])
    assert decide(b, req())
    d = decide(b, req(labels={"environment": "prod"}))
    assert not d and "database 'pg' is denied" in d.reason
    assert not database_visible(b, "alice", None, "pg", {"environment": "prod"})
    assert database_visible(b, "alice", None, "pg", {"environment": "dev"})


def test_deny_with_labels_applies_only_to_matching_databases() -> None:
    r = role(
        "r",
        allow={"db_labels": {"*": ["*"]}, "db_users": ["*"], "db_names": ["*"]},
        deny={"db_labels": {"environment": ["prod"]}, "db_users": ["postgres"]},
    )
    b = bundle([r], [BundleUser(name="alice", roles=["r"])])
    assert decide(b, req(db_user="postgres", labels={"environment": "dev"}))
    assert not decide(b, req(db_user="postgres", labels={"environment": "prod"}))


def test_empty_allow_labels_match_nothing_and_star_star_matches_all() -> None:
    assert not labels_match({}, {"a": "b"})
    assert labels_match({"*": ["*"]}, {})
    assert not labels_match({"*": ["prod"]}, {"env": "prod"})


@pytest.mark.parametrize(
    ("selector", "labels", "expected"),
    [
        ({"env": ["prod-*"]}, {"env": "prod-eu"}, True),
        ({"env": ["prod-*"]}, {"env": "stage-eu"}, False),
        ({"env": ["*-eu"]}, {"env": "prod-eu"}, True),
        ({"env": ["^(dev|stage)[0-9]+$"]}, {"env": "stage12"}, True),
        ({"env": ["^(dev|stage)[0-9]+$"]}, {"env": "stage12x"}, False),
        ({"env": ["^dev"]}, {"env": "^dev"}, True),  # not wrapped in ^...$: literal
        ({"env": ["*"]}, {"env": "anything"}, True),
        ({"env": ["*"]}, {"region": "eu"}, False),  # the key must exist
        ({"env": ["prod"], "region": ["eu"]}, {"env": "prod", "region": "us"}, False),
        ({"env": ["prod"], "region": ["eu", "us"]}, {"env": "prod", "region": "us"}, True),
        ({"env": ["a.b"]}, {"env": "axb"}, False),  # glob escapes regex characters
    ],
)
def test_label_matching(selector: dict, labels: dict, expected: bool) -> None:
    assert labels_match(selector, labels) is expected


def test_regex_and_glob_in_db_users_and_names() -> None:
    r = role(
        "r",
        allow={"db_labels": {"*": ["*"]}, "db_users": ["^app_[a-z]+$"], "db_names": ["metrics_*"]},
    )
    b = bundle([r], [BundleUser(name="alice", roles=["r"])])
    assert decide(b, req(db_user="app_reader", db_name="metrics_2026"))
    assert not decide(b, req(db_user="app_1", db_name="metrics_2026"))
    assert not decide(b, req(db_user="app_reader", db_name="main"))


def test_internal_templates_expand_to_traits() -> None:
    access = role(
        "access",
        allow={
            "db_labels": {"*": ["*"]},
            "db_users": ["{{internal.db_users}}"],
            "db_names": ["{{internal.db_names}}"],
        },
    )
    alice = BundleUser(
        name="alice", roles=["access"], traits={"db_users": ["alice"], "db_names": ["postgres"]}
    )
    b = bundle([access], [alice, BundleUser(name="bob", roles=["access"])])
    assert decide(b, req(db_user="alice", db_name="postgres"))
    assert not decide(b, req(db_user="bob", db_name="postgres"))
    # bob has no traits: the templates expand to nothing and allow nothing.
    d = decide(b, req(user="bob", db_user="bob", db_name="postgres"))
    assert not d and "allowed: none" in d.reason
    assert allowed_values(b, "alice", None, {}, "db_users") == ["alice"]


def test_external_templates_with_surrounding_text() -> None:
    r = role(
        "team",
        allow={"db_labels": {"*": ["*"]}, "db_users": ["svc_{{external.team}}"], "db_names": ["*"]},
    )
    b = bundle([r], [BundleUser(name="alice", roles=["team"], traits={"team": ["red", "blue"]})])
    assert decide(b, req(db_user="svc_red"))
    assert decide(b, req(db_user="svc_blue"))
    assert not decide(b, req(db_user="svc_green"))


def test_trait_values_are_literal_never_patterns_or_templates() -> None:
    traits = {"db_users": ["*"], "evil": ["{{internal.db_names}}"], "db_names": ["x"]}
    expanded = expand_templates(["{{internal.db_users}}", "{{external.evil}}"], traits)
    assert "*" not in expanded
    r = role(
        "r",
        allow={"db_labels": {"*": ["*"]}, "db_users": ["{{internal.db_users}}"], "db_names": ["*"]},
    )
    b = bundle([r], [BundleUser(name="alice", roles=["r"], traits=traits)])
    assert not decide(b, req(db_user="postgres"))
    assert decide(b, req(db_user="*"))


def test_effective_roles_are_cert_roles_the_user_still_has() -> None:
    b = bundle([DEVELOPER, PROD], [BundleUser(name="alice", roles=["developer"])])
    prod = {"environment": "prod"}
    # The certificate claims "prod", but the bundle in force no longer gives it to alice.
    d = decide(b, req(db_user="x", db_name="y", labels=prod, cert_roles=["prod"]))
    assert not d and "still assigned" in d.reason
    assert decide(b, req(db_user="viewer", cert_roles=["developer", "prod"]))


def test_user_missing_from_bundle_is_denied() -> None:
    b = bundle([DEVELOPER], [])
    d = decide(b, req(db_user="viewer", cert_roles=["developer"]))
    assert not d
    assert d.reason == f"user 'alice' is not in the policy in force (commit {'c' * 12}, serial 1)"


def test_role_deleted_from_bundle_is_ignored() -> None:
    b = bundle([], [BundleUser(name="alice", roles=["developer"])])
    assert not decide(b, req(db_user="viewer"))


def test_max_session_ttl_is_the_smallest_limit() -> None:
    b = bundle([role("a", ttl=3600), role("b", ttl=7200), role("c")], [])
    assert max_session_ttl_seconds(b, ["a", "b", "c"]) == 3600
    assert max_session_ttl_seconds(b, ["c"]) == 86400
