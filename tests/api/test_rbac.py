"""Route certificates (POST /v1/certs/db) and `tsh db ls` (GET /v1/databases) against the
real API: one test per RBAC rule of seed 003, the decision taken by `schemas.rbac` on the
labels the serving agent reports."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from schemas.api import DatabaseCert, DatabaseList, LoginResponse
from schemas.identity import Route, verify_identity
from tests.api.conftest import ApiCluster, Creds, public_pem
from transport import tls
from transport.http import ClientResponse

ROLES = {
    # Seed 003: any database user and name on production, except the internal "postgres".
    "developer": """
  allow:
    db_labels: {environment: ["prod"]}
    db_users: ["*"]
    db_names: ["*"]
  deny:
    db_users: ["postgres"]
    db_names: ["postgres"]
""",
    "regex": """
  allow:
    db_labels: {environment: "^(dev|stage)$"}
    db_users: ["^read_[a-z]+$"]
    db_names: ["^app_.*$"]
""",
    "glob": """
  allow:
    db_labels: {team: "pay*"}
    db_users: ["svc-*"]
    db_names: ["*"]
""",
    "external": """
  allow:
    db_labels: {environment: dev}
    db_users: ["{{external.pg_user}}"]
    db_names: ["{{external.databases}}", "scratch_{{external.pg_user}}"]
""",
    "dev-all": """
  allow:
    db_labels: {environment: dev}
    db_users: ["*"]
    db_names: ["*"]
""",
    "no-secrets": """
  deny:
    db_names: ["secrets"]
""",
    "no-prod": """
  allow:
    db_labels: {"*": "*"}
    db_users: ["*"]
    db_names: ["*"]
  deny:
    db_labels: {environment: prod}
""",
}
USERS = {
    "dev1": ("developer", {}),
    "rex": ("regex", {}),
    "gus": ("glob", {}),
    "eve": ("external", {"pg_user": ["ext_user"], "databases": ["analytics"]}),
    "ina": ("access", {"db_users": ["ina"], "db_names": ["main"]}),
    "dana": ("dev-all, no-secrets", {}),
    "pat": ("no-prod", {}),
}
DATABASES = [
    {"name": "prod-db", "labels": {"environment": "prod"}},
    {"name": "dev-db", "labels": {"environment": "dev"}},
    {"name": "stage-db", "labels": {"environment": "stage", "team": "payments"}},
]


def _role(name: str, spec: str) -> bytes:
    return f"kind: role\nversion: v5\nmetadata: {{name: {name}}}\nspec:{spec}".encode()


def _user(name: str, roles: str, traits: dict[str, list[str]]) -> bytes:
    trait_text = ", ".join(f"{k}: [{', '.join(v)}]" for k, v in traits.items())
    return (
        f"kind: user\nversion: v2\nmetadata: {{name: {name}}}\n"
        f"spec: {{roles: [{roles}], traits: {{{trait_text}}}}}\n"
    ).encode()


@pytest.fixture(scope="module")
def rbac(cluster: ApiCluster) -> ApiCluster:
    files: dict[str, bytes | None] = {f"roles/{n}.yaml": _role(n, s) for n, s in ROLES.items()}
    files.update({f"users/{n}.yaml": _user(n, r, t) for n, (r, t) in USERS.items()})
    cluster.commit(files)
    cluster.serve(cluster.join("db"), DATABASES)
    for name in USERS:
        cluster.signup(name)
    return cluster


@pytest.fixture(scope="module")
def logins(rbac: ApiCluster) -> dict[str, Creds]:
    return {name: rbac.login(name) for name in USERS}


def _route(
    cluster: ApiCluster, creds: Creds, service: str, db_user: str, db_name: str, **extra: object
) -> ClientResponse:
    body = {
        "service": service,
        "db_user": db_user,
        "db_name": db_name,
        "public_key": public_pem(tls.new_private_key()),
        **extra,
    }
    return cluster.call("POST", "/v1/certs/db", json=body, creds=creds)


def _allowed(cluster: ApiCluster, creds: Creds, service: str, db_user: str, db_name: str) -> None:
    response = _route(cluster, creds, service, db_user, db_name)
    assert response.status == 200, response.body
    cert = response.json(DatabaseCert).cert.encode()
    user_ca = x509.load_pem_x509_certificate((cluster.data_dir / "ca/user.crt").read_bytes())
    identity = verify_identity(cert, [user_ca], datetime.now(UTC), "db")
    assert identity.route == Route(service=service, db_user=db_user, db_name=db_name)


def _denied(
    cluster: ApiCluster, creds: Creds, service: str, db_user: str, db_name: str
) -> str:
    response = _route(cluster, creds, service, db_user, db_name)
    error = response.json()["error"]
    assert (response.status, error["code"]) == (403, "access_denied"), response.body
    return str(error["message"])


# --- seed 003, rule by rule ----------------------------------------------------------------


def test_deny_on_db_user_is_greedy(rbac: ApiCluster, logins: dict[str, Creds]) -> None:
    message = _denied(rbac, logins["dev1"], "prod-db", "postgres", "main")
    assert "db user 'postgres' is denied by role 'developer'" in message


def test_deny_on_db_name_is_greedy(rbac: ApiCluster, logins: dict[str, Creds]) -> None:
    message = _denied(rbac, logins["dev1"], "prod-db", "alice", "postgres")
    assert "db name 'postgres' is denied by role 'developer'" in message


def test_a_deny_in_another_role_without_labels_applies_everywhere(
    rbac: ApiCluster, logins: dict[str, Creds]
) -> None:
    message = _denied(rbac, logins["dana"], "dev-db", "anyone", "secrets")
    assert "by role 'no-secrets'" in message
    _allowed(rbac, logins["dana"], "dev-db", "anyone", "main")


def test_a_deny_with_labels_only_shuts_whole_databases(
    rbac: ApiCluster, logins: dict[str, Creds]
) -> None:
    assert "database 'prod-db' is denied" in _denied(rbac, logins["pat"], "prod-db", "x", "y")
    _allowed(rbac, logins["pat"], "dev-db", "x", "y")


def test_wildcards_allow_any_user_and_name(rbac: ApiCluster, logins: dict[str, Creds]) -> None:
    _allowed(rbac, logins["dev1"], "prod-db", "alice", "metrics")
    _allowed(rbac, logins["dev1"], "prod-db", "reporting", "main")


def test_labels_that_do_not_match_refuse_the_database(
    rbac: ApiCluster, logins: dict[str, Creds]
) -> None:
    message = _denied(rbac, logins["dev1"], "dev-db", "alice", "main")
    assert "no role of 'dev1' (developer) allows database 'dev-db'" in message
    assert "environment=dev" in message


def test_regular_expressions_match_labels_users_and_names(
    rbac: ApiCluster, logins: dict[str, Creds]
) -> None:
    rex = logins["rex"]
    _allowed(rbac, rex, "dev-db", "read_only", "app_main")
    _allowed(rbac, rex, "stage-db", "read_reports", "app_billing")
    message = _denied(rbac, rex, "dev-db", "write_all", "app_x")
    assert "db user 'write_all' is not allowed" in message
    assert "db name 'main' is not allowed" in _denied(rbac, rex, "dev-db", "read_only", "main")
    # The expression is matched in full: a prefix is not enough.
    assert "is not allowed" in _denied(rbac, rex, "dev-db", "read_only2", "app_main")
    assert "allows database 'prod-db'" in _denied(rbac, rex, "prod-db", "read_only", "app_main")


def test_globs_in_labels_and_users(rbac: ApiCluster, logins: dict[str, Creds]) -> None:
    gus = logins["gus"]
    _allowed(rbac, gus, "stage-db", "svc-billing", "anything")
    assert "not allowed" in _denied(rbac, gus, "stage-db", "billing", "anything")
    _denied(rbac, gus, "dev-db", "svc-billing", "anything")  # no team label


def test_internal_templates_expand_to_the_users_traits(
    rbac: ApiCluster, logins: dict[str, Creds]
) -> None:
    ina = logins["ina"]
    _allowed(rbac, ina, "dev-db", "ina", "main")
    _allowed(rbac, ina, "prod-db", "ina", "main")
    assert "(allowed: ina)" in _denied(rbac, ina, "dev-db", "postgres", "main")
    assert "(allowed: main)" in _denied(rbac, ina, "dev-db", "ina", "other")


def test_external_templates_expand_with_text_around_them(
    rbac: ApiCluster, logins: dict[str, Creds]
) -> None:
    eve = logins["eve"]
    _allowed(rbac, eve, "dev-db", "ext_user", "analytics")
    _allowed(rbac, eve, "dev-db", "ext_user", "scratch_ext_user")
    assert "db name 'main' is not allowed" in _denied(rbac, eve, "dev-db", "ext_user", "main")
    assert "db user 'eve' is not allowed" in _denied(rbac, eve, "dev-db", "eve", "analytics")


# --- around the decision -----------------------------------------------------------------------


def test_a_database_no_agent_serves_is_404(rbac: ApiCluster, logins: dict[str, Creds]) -> None:
    response = _route(rbac, logins["dev1"], "nowhere", "alice", "main")
    assert response.status == 404
    assert "tsh db ls" in response.json()["error"]["message"]


def test_a_route_certificate_never_outlives_the_login(rbac: ApiCluster) -> None:
    response, key = rbac.login_response("dana", ttl_seconds=600)
    login = Creds(key, response.raise_for_error().json(LoginResponse).cert.encode())
    login_end = x509.load_pem_x509_certificate(login.cert_pem).not_valid_after_utc
    routed = _route(rbac, login, "dev-db", "anyone", "main", ttl_seconds=36000)
    cert = x509.load_pem_x509_certificate(routed.raise_for_error().json(DatabaseCert).cert.encode())
    assert cert.not_valid_after_utc <= login_end
    assert cert.not_valid_after_utc - datetime.now(UTC) <= timedelta(minutes=10)


def test_route_certificates_need_a_login_certificate(
    rbac: ApiCluster, logins: dict[str, Creds]
) -> None:
    body = {"service": "dev-db", "db_user": "x", "db_name": "y",
            "public_key": public_pem(tls.new_private_key())}
    assert rbac.call("POST", "/v1/certs/db", json=body).status == 401
    agent = rbac.join("db")
    refused = rbac.call("POST", "/v1/certs/db", json=body, creds=agent)
    assert refused.status == 401
    assert "user CA" in refused.json()["error"]["message"]
    # A route certificate is not a login certificate either.
    key = tls.new_private_key()
    body = {"service": "dev-db", "db_user": "anyone", "db_name": "main",
            "public_key": public_pem(key)}
    routed = rbac.call("POST", "/v1/certs/db", json=body, creds=logins["dana"])
    db_creds = Creds(key, routed.raise_for_error().json(DatabaseCert).cert.encode())
    refused = rbac.call("GET", "/v1/databases", creds=db_creds)
    assert refused.status == 401
    assert "not for the cluster API" in refused.json()["error"]["message"]


def test_db_ls_shows_only_what_the_roles_allow(rbac: ApiCluster, logins: dict[str, Creds]) -> None:
    def listed(name: str) -> dict[str, tuple[list[str], list[str]]]:
        response = rbac.call("GET", "/v1/databases", creds=logins[name]).raise_for_error()
        return {
            d.name: (d.allowed_db_users, d.allowed_db_names)
            for d in response.json(DatabaseList).databases
        }

    assert listed("dev1") == {"prod-db": (["*"], ["*"])}
    assert listed("rex") == {
        "dev-db": (["^read_[a-z]+$"], ["^app_.*$"]),
        "stage-db": (["^read_[a-z]+$"], ["^app_.*$"]),
    }
    assert listed("ina") == {
        "dev-db": (["ina"], ["main"]),
        "prod-db": (["ina"], ["main"]),
        "stage-db": (["ina"], ["main"]),
    }
    assert set(listed("pat")) == {"dev-db", "stage-db"}  # prod is denied whole
    labels = {
        d.name: d.labels
        for d in rbac.call("GET", "/v1/databases", creds=logins["ina"]).json(DatabaseList).databases
    }
    assert labels["stage-db"] == {"environment": "stage", "team": "payments"}
