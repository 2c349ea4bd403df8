"""Hosts against the real API over TLS: join with each kind of token, renewal, db client
certificates, the bundle long poll woken by a real hosted-repo commit, heartbeats."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control.signing import load_signing_key
from control.tctl import main as tctl
from control.tokens import TokenStore
from schemas.api import DbClientCert, HeartbeatAck, HostCert, JoinResponse
from schemas.bundle import key_id, public_key_from_b64, verify_bundle
from schemas.identity import verify_identity
from tests.api.conftest import STATIC_TOKEN, ApiCluster, Creds, public_pem
from transport import tls
from transport.http import ClientResponse


def _ca(cluster: ApiCluster, kind: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((cluster.data_dir / "ca" / f"{kind}.crt").read_bytes())


def _error(response: ClientResponse) -> tuple[int, str, str]:
    error = response.json()["error"]
    return response.status, error["code"], error["message"]


# --- join ------------------------------------------------------------------------------------


def test_join_with_the_static_token_gives_a_host_certificate_cas_and_bundle_key(
    cluster: ApiCluster,
) -> None:
    response, _key = cluster.join_response(
        "db", STATIC_TOKEN, nodename="db1", dns_names=["db1.example.test"]
    )
    joined = response.raise_for_error().json(JoinResponse)
    identity = verify_identity(
        joined.cert.encode(), [_ca(cluster, "host")], datetime.now(UTC), "host"
    )
    assert identity.host_role == "db"
    assert identity.host_id == joined.host_id
    cert = x509.load_pem_x509_certificate(joined.cert.encode())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["db1.example.test"]
    assert joined.cluster == "root"
    assert joined.host_ca == [(cluster.data_dir / "ca/host.crt").read_text()]
    assert joined.user_ca == [(cluster.data_dir / "ca/user.crt").read_text()]
    assert joined.db_ca == [(cluster.data_dir / "ca/db.crt").read_text()]
    assert joined.tunnel_addrs == ["proxy.example.test:3024"]
    signing = load_signing_key(cluster.data_dir / "keys/bundle-signing.key").public_key()
    assert {k: public_key_from_b64(v) for k, v in joined.bundle_keys.items()} == {
        key_id(signing): signing
    }


def test_the_static_token_joins_each_of_its_roles(cluster: ApiCluster) -> None:
    proxy = cluster.join("proxy")
    identity = verify_identity(proxy.cert_pem, [_ca(cluster, "host")], datetime.now(UTC), "host")
    assert identity.host_role == "proxy"


def test_a_dynamic_token_joins_until_it_expires(cluster: ApiCluster) -> None:
    token, _ = TokenStore(cluster.data_dir).add(["db"], timedelta(minutes=5))
    first = cluster.join("db", token)
    second = cluster.join("db", token)
    assert first.host_id != second.host_id


def test_a_single_use_token_joins_once(cluster: ApiCluster) -> None:
    token, _ = TokenStore(cluster.data_dir).add(["proxy"], single_use=True)
    cluster.join("proxy", token)
    response, _ = cluster.join_response("proxy", token)
    assert _error(response)[:2] == (401, "invalid_token")


def test_an_expired_token_is_refused(cluster: ApiCluster) -> None:
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    token, _ = TokenStore(cluster.data_dir).add(["db"], timedelta(minutes=30), now=an_hour_ago)
    response, _ = cluster.join_response("db", token)
    status, code, message = _error(response)
    assert (status, code) == (401, "expired_token")
    assert "tctl tokens add --type=db" in message


def test_a_token_of_another_type_is_refused_and_not_used_up(cluster: ApiCluster) -> None:
    token, _ = TokenStore(cluster.data_dir).add(["proxy"], single_use=True)
    response, _ = cluster.join_response("db", token)
    status, code, message = _error(response)
    assert (status, code) == (403, "wrong_token_role")
    assert "proxy, not db" in message
    cluster.join("proxy", token)


def test_a_wrong_token_is_refused(cluster: ApiCluster) -> None:
    response, _ = cluster.join_response("db", "not-a-token")
    assert _error(response)[:2] == (401, "invalid_token")


def test_a_join_that_cannot_be_served_does_not_use_up_the_token(cluster: ApiCluster) -> None:
    token, _ = TokenStore(cluster.data_dir).add(["db"], single_use=True)
    response, _ = cluster.join_response("db", token, dns_names=["not a host name"])
    status, _code, message = _error(response)
    assert status == 400
    assert "not a host name" in message
    response, _ = cluster.join_response("db", token, host_id="../../etc")
    assert _error(response)[0] == 400
    cluster.join("db", token)


def test_a_join_with_an_rsa_key_is_refused(cluster: ApiCluster) -> None:
    rsa_pem = (
        rsa.generate_private_key(65537, 2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    body = {"token": STATIC_TOKEN, "role": "db", "public_key": rsa_pem}
    status, _code, message = _error(cluster.call("POST", "/v1/join", json=body))
    assert status == 400
    assert "public_key" in message and "P-256" in message


# --- renewal -----------------------------------------------------------------------------------


def test_a_host_renews_its_certificate_with_the_current_one(cluster: ApiCluster) -> None:
    agent = cluster.join("db")
    key = tls.new_private_key()
    response = cluster.call(
        "POST", "/v1/certs/host", json={"public_key": public_pem(key)}, creds=agent
    )
    renewed = response.raise_for_error().json(HostCert)
    identity = verify_identity(
        renewed.cert.encode(), [_ca(cluster, "host")], datetime.now(UTC), "host"
    )
    assert (identity.host_id, identity.host_role) == (agent.host_id, "db")
    assert renewed.host_id == agent.host_id
    renewed_creds = Creds(key, renewed.cert.encode(), agent.host_id)
    # The new certificate works for host endpoints.
    cluster.call("GET", "/v1/bundle", params={"after": 0}, creds=renewed_creds).raise_for_error()


def test_renewal_needs_a_host_certificate(cluster: ApiCluster) -> None:
    body = {"public_key": public_pem(tls.new_private_key())}
    assert _error(cluster.call("POST", "/v1/certs/host", json=body))[:2] == (
        401,
        "no_certificate",
    )


# --- db client certificates --------------------------------------------------------------


def test_a_db_agent_gets_a_short_lived_db_client_certificate(cluster: ApiCluster) -> None:
    agent = cluster.join("db")
    key = tls.new_private_key()
    body = {"db_user": "alice", "public_key": public_pem(key), "ttl_seconds": 10 * 3600}
    issued = (
        cluster.call("POST", "/v1/certs/db-client", json=body, creds=agent)
        .raise_for_error()
        .json(DbClientCert)
    )
    cert = x509.load_pem_x509_certificate(issued.cert.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    cert.verify_directly_issued_by(_ca(cluster, "db"))
    assert cert.public_key() == key.public_key()
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    lifetime = cert.not_valid_after_utc - datetime.now(UTC)
    assert timedelta(minutes=55) < lifetime <= timedelta(hours=1)  # capped at the 1h default
    assert issued.db_ca == [(cluster.data_dir / "ca/db.crt").read_text()]


def test_db_client_certificates_are_refused_to_a_proxy(cluster: ApiCluster) -> None:
    proxy = cluster.join("proxy")
    body = {"db_user": "alice", "public_key": public_pem(tls.new_private_key())}
    status, code, message = _error(
        cluster.call("POST", "/v1/certs/db-client", json=body, creds=proxy)
    )
    assert (status, code) == (403, "wrong_host_role")
    assert "only db hosts" in message


def test_db_client_certificates_are_refused_to_a_user(cluster: ApiCluster) -> None:
    cluster.commit(
        {"users/carol.yaml": b"kind: user\nversion: v2\nmetadata: {name: carol}\n"
         b"spec: {roles: [access], traits: {db_users: [carol]}}\n"}
    )
    cluster.signup("carol")
    carol = cluster.login("carol")
    body = {"db_user": "postgres", "public_key": public_pem(tls.new_private_key())}
    status, code, message = _error(
        cluster.call("POST", "/v1/certs/db-client", json=body, creds=carol)
    )
    assert (status, code) == (401, "bad_certificate")
    assert "host CA" in message
    assert _error(cluster.call("POST", "/v1/certs/db-client", json=body))[0] == 401


# --- the bundle long poll ------------------------------------------------------------------


def _signing_keys(cluster: ApiCluster) -> dict[str, Ed25519PublicKey]:
    pub = load_signing_key(cluster.data_dir / "keys/bundle-signing.key").public_key()
    return {key_id(pub): pub}


def test_the_bundle_comes_at_once_when_newer_than_after(cluster: ApiCluster) -> None:
    agent = cluster.join("db")
    started = time.monotonic()
    response = cluster.call("GET", "/v1/bundle", params={"after": 0, "wait": 30}, creds=agent)
    assert response.status == 200
    assert time.monotonic() - started < 5
    bundle = verify_bundle(response.body, _signing_keys(cluster), "root", 0, datetime.now(UTC))
    assert response.headers["etag"] == f'"{bundle.serial}"'
    assert bundle.serial == cluster.serial()


def test_a_long_poll_waits_and_returns_on_publish(cluster: ApiCluster) -> None:
    agent = cluster.join("db")
    before = cluster.serial()
    result: dict[str, object] = {}

    def poll() -> None:
        started = time.monotonic()
        result["response"] = cluster.call(
            "GET",
            "/v1/bundle",
            params={"after": before, "wait": 30},
            creds=agent,
            timeout=40,
        )
        result["elapsed"] = time.monotonic() - started

    waiter = threading.Thread(target=poll)
    waiter.start()
    time.sleep(1.0)
    assert waiter.is_alive(), "the poll answered before anything was published"
    role = (
        b"kind: role\nversion: v5\nmetadata: {name: poll-test}\n"
        b"spec: {allow: {db_labels: {env: dev}, db_users: [x], db_names: [y]}}\n"
    )
    published = cluster.commit({"roles/poll-test.yaml": role})
    waiter.join(30)
    assert not waiter.is_alive()
    response = result["response"]
    assert isinstance(response, ClientResponse)
    assert response.status == 200
    bundle = verify_bundle(response.body, _signing_keys(cluster), "root", before, datetime.now(UTC))
    assert bundle.serial == published > before
    assert "poll-test" in bundle.roles
    assert response.headers["etag"] == f'"{published}"'
    assert result["elapsed"] < 25  # type: ignore[operator]


def test_a_long_poll_answers_304_when_nothing_is_published(cluster: ApiCluster) -> None:
    agent = cluster.join("proxy")
    current = cluster.serial()
    started = time.monotonic()
    response = cluster.call("GET", "/v1/bundle", params={"after": current, "wait": 1}, creds=agent)
    elapsed = time.monotonic() - started
    assert response.status == 304
    assert response.body == b""
    assert response.headers["etag"] == f'"{current}"'
    assert 0.9 <= elapsed < 5


def test_the_etag_decides_with_if_none_match(cluster: ApiCluster) -> None:
    agent = cluster.join("db")
    current = cluster.serial()
    same = cluster.call(
        "GET", "/v1/bundle", params={"wait": 1}, headers={"if-none-match": f'"{current}"'},
        creds=agent,
    )
    assert same.status == 304
    started = time.monotonic()
    older = cluster.call(
        "GET", "/v1/bundle", params={"wait": 30}, headers={"if-none-match": '"0"'}, creds=agent
    )
    assert older.status == 200 and time.monotonic() - started < 5
    assert older.headers["etag"] == f'"{current}"'


def test_the_bundle_is_only_for_hosts(cluster: ApiCluster) -> None:
    assert _error(cluster.call("GET", "/v1/bundle", params={"after": 0}))[:2] == (
        401,
        "no_certificate",
    )


def test_bad_long_poll_parameters_are_400(cluster: ApiCluster) -> None:
    agent = cluster.join("db")
    for params in ({"after": "abc"}, {"after": -1}, {"wait": 61}):
        status, _code, message = _error(
            cluster.call("GET", "/v1/bundle", params=params, creds=agent)
        )
        assert status == 400
        assert next(iter(params)) in message


# --- heartbeats --------------------------------------------------------------------------------


def test_a_heartbeat_reaches_the_inventory_and_tctl_status(
    cluster: ApiCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = cluster.join("db")
    serial = cluster.serial()
    beat = {
        "host_id": agent.host_id,
        "role": "db",
        "serial": serial,
        "databases": [{"name": "hb-db", "labels": {"env": "dev"}}],
    }
    ack = (
        cluster.call("POST", "/v1/heartbeat", json=beat, creds=agent)
        .raise_for_error()
        .json(HeartbeatAck)
    )
    assert ack.serial == serial
    assert ack.tunnel_addrs == ["proxy.example.test:3024"]
    deadline = time.monotonic() + 5
    while True:
        assert tctl(["status", "--format=json", "--data-dir", str(cluster.data_dir)]) == 0
        out = json.loads(capsys.readouterr().out)
        if out["agents"].get(agent.host_id) == serial:
            break
        assert time.monotonic() < deadline, out["agents"]
        time.sleep(0.2)
    assert tctl(["status", "--data-dir", str(cluster.data_dir)]) == 0
    text = capsys.readouterr().out
    assert f"on serial {serial}" in text
    assert "CA pin:         sha256:" in text


def test_a_heartbeat_for_another_host_is_refused(cluster: ApiCluster) -> None:
    agent = cluster.join("db")
    beat = {"host_id": "someone-else", "role": "db", "serial": 1}
    assert _error(cluster.call("POST", "/v1/heartbeat", json=beat, creds=agent))[:2] == (
        403,
        "wrong_host",
    )
    beat = {"host_id": agent.host_id, "role": "proxy", "serial": 1}
    assert _error(cluster.call("POST", "/v1/heartbeat", json=beat, creds=agent))[0] == 403
