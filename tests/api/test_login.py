"""People against the real API over TLS: signup, login, lockout, TOTP, TTL capping, limits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

from control.users import SecretsStore, totp_code, totp_step
from schemas.api import LoginResponse, SignupChallenge, SignupResponse
from schemas.identity import verify_identity
from tests.api.conftest import PASSWORD, ApiCluster, api_settings, start_api_cluster
from transport.http import ClientResponse

USERS = {
    "ann": "access",
    "ben": "access",
    "cat": "access",
    "dan": "access",
    "fay": "access",
    "gil": "access",
    "hal": "short",
    "ida": "access",
    "jon": "access",
}
SHORT_ROLE = b"""\
kind: role
version: v5
metadata: {name: short}
spec:
  allow: {db_labels: {"*": "*"}, db_users: ["{{internal.db_users}}"], db_names: ["*"]}
  options: {max_session_ttl: 1h}
"""


def _user(name: str, role: str) -> bytes:
    return (
        f"kind: user\nversion: v2\nmetadata: {{name: {name}}}\n"
        f"spec: {{roles: [{role}], traits: {{db_users: [{name}], team: [blue]}}}}\n"
    ).encode()


@pytest.fixture(scope="module")
def people(cluster: ApiCluster) -> ApiCluster:
    files: dict[str, bytes | None] = {f"users/{n}.yaml": _user(n, r) for n, r in USERS.items()}
    files["roles/short.yaml"] = SHORT_ROLE
    cluster.commit(files)
    return cluster


def _error(response: ClientResponse) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status, error["code"], error["message"]


def _away_from_a_step_boundary() -> None:
    """Codes are computed here and checked there a moment later: never let a 30 s step end
    in between."""
    if time.time() % 30 > 26:
        time.sleep(30 - time.time() % 30 + 0.1)


def _lifetime(response: ClientResponse) -> timedelta:
    cert = x509.load_pem_x509_certificate(response.json(LoginResponse).cert.encode())
    return cert.not_valid_after_utc - datetime.now(UTC)


# --- signup ----------------------------------------------------------------------------------


def test_signup_sets_a_password_and_login_returns_a_user_certificate(
    people: ApiCluster,
) -> None:
    token = SecretsStore(people.data_dir).reset("ann")
    start = people.call("POST", "/v1/signup/start", json={"token": token}).raise_for_error()
    assert start.json(SignupChallenge).user == "ann"
    assert start.json(SignupChallenge).totp_secret is None  # second_factor off, not asked
    done = people.call("POST", "/v1/signup", json={"token": token, "password": PASSWORD})
    assert done.raise_for_error().json(SignupResponse).model_dump() == {
        "user": "ann",
        "totp_enrolled": False,
    }
    response, key = people.login_response("ann")
    login = response.raise_for_error().json(LoginResponse)
    user_ca = x509.load_pem_x509_certificate((people.data_dir / "ca/user.crt").read_bytes())
    identity = verify_identity(login.cert.encode(), [user_ca], datetime.now(UTC), "user")
    assert identity.username == "ann"
    assert identity.roles == ("access",)
    assert identity.traits == {"db_users": ("ann",), "team": ("blue",)}
    assert x509.load_pem_x509_certificate(login.cert.encode()).public_key() == key.public_key()
    assert login.user_ca == [(people.data_dir / "ca/user.crt").read_text()]
    assert login.host_ca == [(people.data_dir / "ca/host.crt").read_text()]
    # The hash is scrypt with its parameters, and the file is private.
    path = people.data_dir / "secrets/users.json"
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert PASSWORD not in text and token not in text and '"n":' in text


def test_a_used_signup_token_is_refused(people: ApiCluster) -> None:
    token = SecretsStore(people.data_dir).reset("ben")
    people.call("POST", "/v1/signup", json={"token": token, "password": PASSWORD}
                ).raise_for_error()
    again = people.call("POST", "/v1/signup", json={"token": token, "password": "another one!"})
    status, code, message = _error(again)
    assert (status, code) == (401, "invalid_signup_token")
    assert "tctl users reset" in message
    people.login("ben")  # the first password stands


def test_an_expired_signup_token_is_refused(people: ApiCluster) -> None:
    two_hours_ago = datetime.now(UTC) - timedelta(hours=2)
    token = SecretsStore(people.data_dir).reset("cat", timedelta(hours=1), now=two_hours_ago)
    response = people.call("POST", "/v1/signup", json={"token": token, "password": PASSWORD})
    status, code, message = _error(response)
    assert (status, code) == (401, "expired_signup_token")
    assert "expired at" in message
    assert _error(people.call("POST", "/v1/signup/start", json={"token": token}))[1] == (
        "expired_signup_token"
    )


def test_a_weak_password_is_refused_and_the_token_kept(people: ApiCluster) -> None:
    token = SecretsStore(people.data_dir).reset("dan")
    status, code, message = _error(
        people.call("POST", "/v1/signup", json={"token": token, "password": "short"})
    )
    assert (status, code) == (400, "weak_password")
    assert "password:" in message and "at least 8" in message
    people.call("POST", "/v1/signup", json={"token": token, "password": PASSWORD}
                ).raise_for_error()


# --- wrong credentials, lockout --------------------------------------------------------------


def test_wrong_password_and_unknown_user_get_the_same_answer(people: ApiCluster) -> None:
    people.signup("fay")
    wrong, _ = people.login_response("fay", "not the password")
    unknown, _ = people.login_response("nobody-here", "not the password")
    assert _error(wrong) == _error(unknown) == (
        401,
        "bad_credentials",
        "invalid user name or password",
    )


def test_an_account_locks_after_five_failures_and_unlocks_later(people: ApiCluster) -> None:
    people.signup("gil")
    for _ in range(5):
        response, _ = people.login_response("gil", "wrong password")
        assert _error(response)[1] == "bad_credentials"
    locked, _ = people.login_response("gil")  # the right password, but locked
    status, code, message = _error(locked)
    assert (status, code) == (403, "account_locked")
    assert "locked until" in message and "tctl users reset" in message
    status_line = SecretsStore(people.data_dir).status("gil")
    assert status_line.locked_until is not None
    time.sleep(2.2)  # lockout_seconds=2 in these tests
    people.login("gil")


def test_an_unknown_name_locks_out_the_same_way(people: ApiCluster) -> None:
    for _ in range(5):
        response, _ = people.login_response("ghost", "wrong password")
        assert _error(response)[1] == "bad_credentials"
    response, _ = people.login_response("ghost", "wrong password")
    assert _error(response)[:2] == (403, "account_locked")


def test_a_user_not_in_the_policy_cannot_log_in_even_with_secrets(people: ApiCluster) -> None:
    people.signup("zed")  # a secrets record, but no users/zed.yaml
    response, _ = people.login_response("zed")
    assert _error(response) == (401, "bad_credentials", "invalid user name or password")


# --- TOTP ---------------------------------------------------------------------------------------


def test_totp_enrolled_at_signup_is_required_checked_and_never_replayed(
    people: ApiCluster,
) -> None:
    token = SecretsStore(people.data_dir).reset("ida")
    start = people.call("POST", "/v1/signup/start", json={"token": token, "enroll_totp": True})
    challenge = start.raise_for_error().json(SignupChallenge)
    assert challenge.totp_secret and challenge.totp_uri
    assert challenge.totp_uri.startswith("otpauth://totp/root%3Aida?secret=")
    secret = challenge.totp_secret
    now = datetime.now(UTC)
    wrong_signup = people.call(
        "POST", "/v1/signup", json={"token": token, "password": PASSWORD, "totp": "000000"}
    )
    if totp_code(secret, totp_step(now)) != "000000":
        assert _error(wrong_signup)[:2] == (400, "bad_totp")
    _away_from_a_step_boundary()
    signup_code = totp_code(secret, totp_step(datetime.now(UTC)) - 1)
    done = people.call(
        "POST", "/v1/signup", json={"token": token, "password": PASSWORD, "totp": signup_code}
    )
    assert done.raise_for_error().json(SignupResponse).totp_enrolled

    _away_from_a_step_boundary()
    missing, _ = people.login_response("ida")
    assert _error(missing)[:2] == (401, "second_factor_required")
    wrong_code = str((int(totp_code(secret, totp_step(datetime.now(UTC)))) + 1) % 10**6).zfill(6)
    wrong, _ = people.login_response("ida", totp=wrong_code)
    assert _error(wrong)[:2] == (401, "bad_totp")
    code = totp_code(secret, totp_step(datetime.now(UTC)))
    people.login("ida", totp=code)
    replayed, _ = people.login_response("ida", totp=code)
    assert _error(replayed)[:2] == (401, "bad_totp")
    # The code of the signup (one step back) is older than the one just used: refused too.
    older, _ = people.login_response("ida", totp=signup_code)
    assert _error(older)[:2] == (401, "bad_totp")


@pytest.fixture
def otp_cluster(tmp_path: Path) -> Iterator[ApiCluster]:
    running = start_api_cluster(tmp_path / "data", api_settings(second_factor="otp"))
    yield running
    running.running.shutdown()


def test_a_cluster_requiring_otp_enrolls_at_signup_and_refuses_without(
    otp_cluster: ApiCluster,
) -> None:
    otp_cluster.commit({"users/kim.yaml": _user("kim", "access")})
    store = SecretsStore(otp_cluster.data_dir)
    token = store.reset("kim")
    challenge = (
        otp_cluster.call("POST", "/v1/signup/start", json={"token": token})
        .raise_for_error()
        .json(SignupChallenge)
    )
    assert challenge.second_factor == "otp" and challenge.totp_secret
    no_code = otp_cluster.call("POST", "/v1/signup", json={"token": token, "password": PASSWORD})
    status, code, message = _error(no_code)
    assert (status, code) == (400, "second_factor_required")
    assert message.startswith("invalid request: totp:")
    _away_from_a_step_boundary()
    code_now = totp_code(challenge.totp_secret, totp_step(datetime.now(UTC)))
    otp_cluster.call(
        "POST", "/v1/signup", json={"token": token, "password": PASSWORD, "totp": code_now}
    ).raise_for_error()
    assert _error(otp_cluster.login_response("kim")[0])[:2] == (401, "second_factor_required")
    ping = otp_cluster.call("GET", "/v1/ping").json()
    assert ping["second_factor"] == "otp"


# --- certificate TTL ------------------------------------------------------------------------


def test_certificate_ttl_is_capped_by_request_cluster_and_role(people: ApiCluster) -> None:
    people.signup("jon")
    default, _ = people.login_response("jon")
    assert timedelta(hours=11, minutes=58) < _lifetime(default) <= timedelta(hours=12)
    asked_less, _ = people.login_response("jon", ttl_seconds=1800)
    assert timedelta(minutes=28) < _lifetime(asked_less) <= timedelta(minutes=30)
    asked_more, _ = people.login_response("jon", ttl_seconds=48 * 3600)
    assert _lifetime(asked_more) <= timedelta(hours=12)  # cluster certificate_ttl
    people.signup("hal")
    role_capped, _ = people.login_response("hal", ttl_seconds=10 * 3600)
    assert timedelta(minutes=58) < _lifetime(role_capped) <= timedelta(hours=1)


# --- rate limits ----------------------------------------------------------------------------


@pytest.fixture
def limited_cluster(tmp_path: Path) -> Iterator[ApiCluster]:
    settings = api_settings(
        login_burst_per_user=3,
        login_refill_per_user_seconds=60,
        login_burst_per_addr=5,
        login_refill_per_addr_seconds=60,
    )
    running = start_api_cluster(tmp_path / "data", settings)
    yield running
    running.running.shutdown()


def test_login_attempts_are_rate_limited_per_user_and_per_address(
    limited_cluster: ApiCluster,
) -> None:
    for _ in range(3):
        assert limited_cluster.login_response("amy", "x" * 8)[0].status == 401
    limited = limited_cluster.login_response("amy", "x" * 8)[0]
    status, code, message = _error(limited)
    assert (status, code) == (429, "rate_limited")
    assert int(limited.headers["retry-after"]) >= 1
    assert "wait" in message
    # Another name from the same address: two attempts left on the address's bucket.
    for _ in range(2):
        assert limited_cluster.login_response("bob", "x" * 8)[0].status == 401
    assert limited_cluster.login_response("cyd", "x" * 8)[0].status == 429
    # Everything else keeps working.
    assert limited_cluster.call("GET", "/v1/ping").status == 200
