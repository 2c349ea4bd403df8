"""Second factor: signup with TOTP enrollment and logins that need the code, on clusters
where TOTP is optional and where it is required. Codes come from the secret the cluster
offered, computed here with the control plane's own RFC 6238 implementation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from control.users import SecretsStore, totp_code, totp_step
from schemas.api import SignupChallenge
from tests.api.conftest import ApiCluster
from tests.tsh.conftest import Tsh, proxy_of, start_cluster, user_yaml

NEW_PASSWORD = "a long and private passphrase"


@pytest.fixture(scope="module")
def optional(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiCluster]:
    users = {n: user_yaml(n, ["dev"], [n], ["postgres"]) for n in ("olga", "omar", "oscar", "otto")}
    running = start_cluster(tmp_path_factory.mktemp("optional") / "data", users,
                            second_factor="optional")
    yield running
    running.running.shutdown()


@pytest.fixture(scope="module")
def required(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiCluster]:
    users = {n: user_yaml(n, ["dev"], [n], ["postgres"]) for n in ("rita", "rosa", "ruth")}
    running = start_cluster(tmp_path_factory.mktemp("required") / "data", users,
                            second_factor="otp")
    yield running
    running.running.shutdown()


def _token_and_secret(cluster: ApiCluster, name: str) -> tuple[str, str | None]:
    """A signup token (what `tctl users add` prints) and the TOTP secret the cluster offers
    for it (the same secret tsh will be shown: it is kept until the signup finishes)."""
    token = SecretsStore(cluster.data_dir).reset(name)
    challenge = cluster.call("POST", "/v1/signup/start", json={"token": token}
                             ).raise_for_error().json(SignupChallenge)
    return token, challenge.totp_secret


def _code(secret: str, ahead: int = 0) -> str:
    return totp_code(secret, totp_step(datetime.now(UTC)) + ahead)


def _signup(tsh: Tsh, cluster: ApiCluster, name: str, token: str, stdin: str):
    return tsh("login", "--insecure", f"--proxy={proxy_of(cluster)}", f"--user={name}",
               f"--signup-token={token}", stdin=stdin)


def test_signup_enrolls_totp_and_login_asks_for_the_code_when_refused(
    tsh: Tsh, optional: ApiCluster
) -> None:
    token, secret = _token_and_secret(optional, "olga")
    assert secret is not None
    # Password, the code that enrolls, then the next code for the login that follows.
    done = _signup(tsh, optional, "olga", token,
                   f"{NEW_PASSWORD}\n{_code(secret)}\n{_code(secret, 1)}\n")
    assert done.code == 0, done.err
    assert f"secret: {secret}" in done.err
    assert "otpauth://totp/" in done.err
    assert "Password set for olga, TOTP enrolled." in done.err
    assert "Logged in as: olga" in done.out



def _enrolled(cluster: ApiCluster, name: str) -> str:
    """Sign `name` up with TOTP through the API (code of this step); returns the secret.
    The next login can then use the code of the next step at once."""
    token, secret = _token_and_secret(cluster, name)
    assert secret is not None
    cluster.call("POST", "/v1/signup", json={"token": token, "password": NEW_PASSWORD,
                                             "totp": _code(secret)}).raise_for_error()
    return secret


def test_login_asks_for_the_code_when_the_cluster_says_it_is_needed(
    tsh: Tsh, optional: ApiCluster
) -> None:
    secret = _enrolled(optional, "omar")
    # The cluster only offers TOTP, so tsh sends the password alone first; the cluster says
    # omar needs his code, and tsh asks for it.
    no_code = tsh("login", "--insecure", f"--proxy={proxy_of(optional)}", "--user=omar",
                  stdin=f"{NEW_PASSWORD}\n")
    assert no_code.code == 1
    assert "Enter the code from your authenticator app" in no_code.err
    assert "no TOTP code on standard input" in no_code.err
    code = _code(secret, 1)
    later = tsh("login", "--insecure", f"--proxy={proxy_of(optional)}", "--user=omar",
                stdin=f"{NEW_PASSWORD}\n{code}\n")
    assert later.code == 0, later.err
    assert "Logged in as: omar" in later.out
    spent = tsh("login", f"--proxy={proxy_of(optional)}", "--user=omar",
                stdin=f"{NEW_PASSWORD}\n{code}\n")
    assert spent.code == 1
    assert "the second factor code is wrong or was already used" in spent.err


def test_enrollment_can_be_skipped_where_it_is_optional(
    tsh: Tsh, optional: ApiCluster
) -> None:
    token, _ = _token_and_secret(optional, "oscar")
    done = _signup(tsh, optional, "oscar", token, f"{NEW_PASSWORD}\n\n")
    assert done.code == 0, done.err
    assert "(empty to skip)" in done.err
    assert "Password set for oscar." in done.err
    again = tsh("login", f"--proxy={proxy_of(optional)}", "--user=oscar",
                stdin=f"{NEW_PASSWORD}\n")
    assert again.code == 0, again.err


def test_a_wrong_enrollment_code_is_refused(tsh: Tsh, optional: ApiCluster) -> None:
    token, secret = _token_and_secret(optional, "otto")
    assert secret is not None
    wrong = "000000" if _code(secret) != "000000" else "111111"
    done = _signup(tsh, optional, "otto", token, f"{NEW_PASSWORD}\n{wrong}\n")
    assert done.code == 1
    assert "the TOTP code does not match the secret offered" in done.err


def test_where_totp_is_required_tsh_asks_for_it_with_the_password(
    tsh: Tsh, required: ApiCluster
) -> None:
    token, secret = _token_and_secret(required, "rita")
    assert secret is not None
    done = _signup(tsh, required, "rita", token,
                   f"{NEW_PASSWORD}\n{_code(secret)}\n{_code(secret, 1)}\n")
    assert done.code == 0, done.err
    assert "This cluster requires a second factor" in done.err
    assert "(empty to skip)" not in done.err
    secret = _enrolled(required, "rosa")
    # The cluster requires TOTP: tsh asks for the code with the password, before sending.
    later = tsh("login", "--insecure", f"--proxy={proxy_of(required)}", "--user=rosa",
                stdin=f"{NEW_PASSWORD}\n{_code(secret, 1)}\n")
    assert later.code == 0, later.err
    assert later.err.index("Password for rosa") < later.err.index("Enter the code")
    wrong_password = tsh("login", f"--proxy={proxy_of(required)}", "--user=rosa",
                         stdin=f"not it\n{_code(secret, 1)}\n")
    assert wrong_password.code == 1
    assert "invalid user name or password" in wrong_password.err


def test_enrollment_cannot_be_skipped_where_totp_is_required(
    tsh: Tsh, required: ApiCluster
) -> None:
    token, _ = _token_and_secret(required, "ruth")
    refused = _signup(tsh, required, "ruth", token, f"{NEW_PASSWORD}\n\n")
    assert refused.code == 1
    assert "the TOTP code is empty; nothing was sent" in refused.err
    # Nothing was set: the token still works.
    _, secret = _token_and_secret(required, "ruth")
    assert secret is not None
