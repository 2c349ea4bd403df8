"""The stores under the API, on a real temp data dir: secrets (scrypt, TOTP against the RFC
6238 vectors, lockout), join tokens (hashed, single use), the inventory, rate limits."""

from __future__ import annotations

import base64
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from control.inventory import Inventory, read_agents, write_agents
from control.tokens import JoinRefused, TokenStore, normalize_roles, parse_static
from control.users import (
    LockoutPolicy,
    LoginRefused,
    SecretsStore,
    hash_password,
    totp_code,
    totp_match,
    verify_password,
)
from schemas.api import Heartbeat
from transport.ratelimit import TokenBuckets

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode()


@pytest.mark.parametrize(
    ("unix_time", "code"),
    [(59, "287082"), (1111111109, "081804"), (1234567890, "005924"), (2000000000, "279037")],
)
def test_totp_matches_the_rfc_6238_sha1_vectors(unix_time: int, code: str) -> None:
    assert totp_code(RFC_SECRET, unix_time // 30) == code


def test_totp_accepts_one_step_of_drift_and_never_an_older_step() -> None:
    now = datetime.fromtimestamp(1111111109, UTC)
    step = 1111111109 // 30
    for offset in (-1, 0, 1):
        assert totp_match(RFC_SECRET, totp_code(RFC_SECRET, step + offset), now, 0) == (
            step + offset
        )
    assert totp_match(RFC_SECRET, totp_code(RFC_SECRET, step + 2), now, 0) is None
    assert totp_match(RFC_SECRET, totp_code(RFC_SECRET, step), now, step) is None
    assert totp_match(RFC_SECRET, "12345", now, 0) is None
    assert totp_match(RFC_SECRET, "abcdef", now, 0) is None


def test_password_hashes_carry_their_parameters_and_salt() -> None:
    a = hash_password("one password", n=2**10)
    b = hash_password("one password", n=2**10)
    assert (a.n, a.r, a.p) == (2**10, 8, 1)
    assert a.salt != b.salt and a.hash != b.hash
    assert verify_password("one password", a)
    assert not verify_password("One password", a)
    assert not verify_password("one password", None)


def test_lockout_counts_in_a_row_and_expires(tmp_path: Path) -> None:
    store = SecretsStore(tmp_path, LockoutPolicy(failures=3, lock_seconds=60))
    token = store.reset("amy", now=T0)
    store.signup_finish(token, "a good password", None, "off", now=T0)
    for _ in range(2):
        with pytest.raises(LoginRefused, match="invalid user name or password"):
            store.check_login("amy", "wrong", None, "off", now=T0)
    store.check_login("amy", "a good password", None, "off", now=T0)  # resets the count
    for _ in range(3):
        with pytest.raises(LoginRefused):
            store.check_login("amy", "wrong", None, "off", now=T0)
    with pytest.raises(LoginRefused) as locked:
        store.check_login("amy", "a good password", None, "off", now=T0 + timedelta(seconds=59))
    assert locked.value.code == "account_locked"
    store.check_login("amy", "a good password", None, "off", now=T0 + timedelta(seconds=61))
    assert store.status("amy", now=T0 + timedelta(seconds=61)).locked_until is None


def test_secrets_file_is_private_and_holds_no_secret_in_clear(tmp_path: Path) -> None:
    store = SecretsStore(tmp_path)
    token = store.reset("amy")
    name, secret = store.signup_start(token, "off", enroll_totp=True)
    assert name == "amy" and secret is not None
    path = tmp_path / "secrets" / "users.json"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(tmp_path / "secrets").st_mode & 0o777 == 0o700
    assert token not in path.read_text()
    assert store.remove("amy") and not store.remove("amy")
    assert json.loads(path.read_text())["users"] == {}


def test_reset_clears_password_totp_and_lockout(tmp_path: Path) -> None:
    store = SecretsStore(tmp_path, LockoutPolicy(failures=1, lock_seconds=600))
    token = store.reset("amy", now=T0)
    store.signup_finish(token, "a good password", None, "off", now=T0)
    with pytest.raises(LoginRefused):
        store.check_login("amy", "wrong", None, "off", now=T0)
    assert store.status("amy", now=T0).locked_until is not None
    store.reset("amy", now=T0)
    status = store.status("amy", now=T0)
    assert not status.password_set and status.locked_until is None
    assert status.signup_expires == T0 + timedelta(hours=1)


# --- join tokens -----------------------------------------------------------------------------


def test_static_tokens_take_the_seed_format() -> None:
    (token,) = parse_static(["proxy,node,database:cbdeeab9-6f88-436d-a673-44d14bd86bb7"])
    assert token.roles == ("proxy", "node", "db")
    assert normalize_roles("db,database") == ["db"]
    with pytest.raises(ValueError, match="unknown role 'ssh'"):
        normalize_roles("ssh")
    with pytest.raises(ValueError, match="roles:token"):
        parse_static(["no-colon"])


def test_dynamic_tokens_are_stored_hashed_and_0600(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    token, record = store.add(["db"], timedelta(minutes=5))
    text = (tmp_path / "tokens.json").read_text()
    assert token not in text and record.token_sha256 in text
    assert os.stat(tmp_path / "tokens.json").st_mode & 0o777 == 0o600
    assert store.use(token, "db").id == record.id
    with pytest.raises(JoinRefused) as refused:
        store.use(token, "proxy")
    assert refused.value.status == 403
    assert store.remove(record.id[:8]) == record
    with pytest.raises(JoinRefused) as gone:
        store.use(token, "db")
    assert gone.value.code == "invalid_token"


def test_static_tokens_compare_whole(tmp_path: Path) -> None:
    store = TokenStore(tmp_path, ["db:abcdef123456"])
    assert store.use("abcdef123456", "db").kind == "static"
    for wrong in ("abcdef12345", "abcdef1234567", "ABCDEF123456", ""):
        with pytest.raises(JoinRefused):
            store.use(wrong, "db")


# --- inventory and rate limits ---------------------------------------------------------------


def test_hosts_are_forgotten_after_three_missed_heartbeats(tmp_path: Path) -> None:
    inventory = Inventory(interval=timedelta(seconds=10), missed=3)
    beat = Heartbeat(
        host_id="a1", role="db", serial=4, databases=[{"name": "pg", "labels": {"env": "dev"}}]
    )
    inventory.heartbeat(beat, T0)
    inventory.heartbeat(Heartbeat(host_id="p1", role="proxy", serial=4,
                                  tunnel_addr="proxy:3024"), T0)
    assert list(inventory.databases(T0 + timedelta(seconds=29))) == ["pg"]
    assert inventory.tunnel_addrs(T0) == ["proxy:3024"]
    write_agents(tmp_path, inventory, T0)
    written = read_agents(tmp_path)
    assert written is not None and written.agents["a1"].serial == 4
    assert written.fresh(T0 + timedelta(seconds=30))
    assert not written.fresh(T0 + timedelta(seconds=31))
    assert inventory.expire(T0 + timedelta(seconds=31)) == ["a1", "p1"]
    assert inventory.databases(T0 + timedelta(seconds=31)) == {}


def test_token_buckets_refill_and_bound_their_keys() -> None:
    buckets = TokenBuckets(burst=2, refill_seconds=10, max_keys=3)
    assert buckets.take("a", 0.0) is None
    assert buckets.take("a", 0.0) is None
    assert buckets.take("a", 0.0) == pytest.approx(10.0)
    assert buckets.take("a", 5.0) == pytest.approx(5.0)
    assert buckets.take("a", 10.0) is None
    for key in "bcde":
        buckets.take(key, 10.0)
    assert len(buckets._buckets) == 3
