"""Joining the real control plane: tokens, CA pins, restarts without a token, renewal."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from control.tokens import TokenStore
from dataplane.cluster.api_client import ControlPlaneClient
from dataplane.cluster.identity import (
    CredentialRenewer,
    CredentialsError,
    HostCredentials,
    JoinError,
    credential_paths,
    join,
    load_credentials,
    save_credentials,
)
from schemas.api import Heartbeat
from schemas.identity import load_certificates, verify_identity
from tests.cluster.conftest import TOKEN, LiveControlPlane
from tests.cluster.helpers import run
from tests.cluster.pki import credentials


def joined(cp: LiveControlPlane, data_dir: Path, role: str = "db", **kw: object
           ) -> HostCredentials:
    return run(join(data_dir, cp.addr, kw.pop("token", TOKEN), role,  # type: ignore[arg-type]
                    ca_pin=kw.pop("ca_pin", cp.pin), **kw))  # type: ignore[arg-type]


def test_join_with_a_token_then_restart_without_one_while_the_control_plane_is_down(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    creds = joined(control_plane, agent_dir, dns_names=["agent.example.com"],
                   ip_addresses=["10.0.0.7"])
    assert creds.cluster == "root" and creds.role == "db"
    cert = load_certificates(creds.cert_pem)[0]
    identity = verify_identity([cert], load_certificates(creds.host_cas[0]),
                               datetime.now(UTC), "host")
    assert identity.host_id == creds.host_id and identity.host_role == "db"
    assert creds.host_cas[0] == control_plane.cas.host.certificate_pem()
    assert creds.user_cas and creds.db_cas and creds.bundle_keys
    assert not creds.expired()

    pem, meta = credential_paths(agent_dir, "db")
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert stat.S_IMODE(meta.stat().st_mode) == 0o600
    assert stat.S_IMODE(pem.parent.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in pem.read_bytes() and b"PRIVATE KEY" not in meta.read_bytes()
    assert json.loads(meta.read_text())["dns_names"] == ["agent.example.com"]

    control_plane.shutdown()
    again = run(join(agent_dir, control_plane.addr, None, "db"))  # no token, no pin, no network
    assert again.host_id == creds.host_id
    assert again.cert_pem == creds.cert_pem and again.key_pem == creds.key_pem
    assert again.dns_names == ("agent.example.com",)
    assert load_credentials(agent_dir) == again
    # the same pin is fine on restart; another cluster's pin is not silently ignored
    assert run(join(agent_dir, control_plane.addr, TOKEN, "db", ca_pin=control_plane.pin)
               ).host_id == creds.host_id
    with pytest.raises(JoinError, match=r"joined cluster 'root', whose host CA is .*remove"):
        run(join(agent_dir, control_plane.addr, TOKEN, "db", ca_pin="sha256:" + "0" * 64))


def test_a_wrong_token_is_refused_and_nothing_is_written(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    with pytest.raises(JoinError, match="refused to join this host as db") as info:
        joined(control_plane, agent_dir, token="not-the-token")
    assert TOKEN not in str(info.value)
    assert load_credentials(agent_dir) is None
    assert not (agent_dir / "host").exists()


def test_a_wrong_ca_pin_stops_the_join_before_the_token_is_sent(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    token, _ = TokenStore(control_plane.data_dir).add(["db"], single_use=True)
    wrong = "sha256:" + "ab" * 32
    with pytest.raises(JoinError, match="does not match --ca-pin") as info:
        joined(control_plane, agent_dir, token=token, ca_pin=wrong)
    assert control_plane.pin in str(info.value) and "The token was not sent" in str(info.value)
    assert load_credentials(agent_dir) is None
    # the single-use token was not spent: it still works with the right pin
    creds = joined(control_plane, agent_dir, token=token)
    assert creds.role == "db"


def test_without_a_pin_the_join_needs_insecure_first_join_and_says_so_loudly(
    control_plane: LiveControlPlane, agent_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(JoinError, match="--ca-pin sha256"):
        joined(control_plane, agent_dir, ca_pin=None)
    with caplog.at_level(logging.WARNING, "teleport.cluster.identity"):
        creds = joined(control_plane, agent_dir, ca_pin=None, insecure_first_join=True)
    assert creds.cluster == "root"
    [warning] = [r for r in caplog.records if "INSECURE FIRST JOIN" in r.getMessage()]
    assert control_plane.pin in warning.getMessage()


def test_pins_are_accepted_in_the_usual_spellings(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    hexpart = control_plane.pin.split(":", 1)[1]
    colons = ":".join(hexpart[i:i + 2] for i in range(0, 64, 2)).upper()
    assert joined(control_plane, agent_dir, ca_pin=colons).cluster == "root"
    with pytest.raises(JoinError, match="is not sha256:<64 hex digits>"):
        joined(control_plane, agent_dir / "other", ca_pin="sha256:1234")


def test_a_data_dir_whose_certificate_expired_needs_a_new_token(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    creds = joined(control_plane, agent_dir)
    cas = control_plane.cas
    expired = credentials(cas, "db", creds.host_id)
    cert = cas.host.issue_host(  # expired 20 s ago
        load_certificates(expired.cert_pem)[0].public_key(), creds.host_id, "db",
        ttl=timedelta(seconds=10), now=datetime.now(UTC) - timedelta(seconds=30),
    )
    stale = HostCredentials(**{
        **creds.__dict__,
        "cert_pem": cert.public_bytes(serialization.Encoding.PEM),
        "key_pem": expired.key_pem,
        "expires": cert.not_valid_after_utc,
        "not_before": cert.not_valid_before_utc,
    })
    save_credentials(agent_dir, stale)
    loaded = load_credentials(agent_dir, "db")
    assert loaded is not None and loaded.expired()
    with pytest.raises(JoinError, match=r"expired at .* give a new join token"):
        run(join(agent_dir, control_plane.addr, None, "db"))
    rejoined = joined(control_plane, agent_dir)
    assert rejoined.host_id == creds.host_id and not rejoined.expired()


def test_damaged_or_exposed_credentials_are_named(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    joined(control_plane, agent_dir)
    pem, meta = credential_paths(agent_dir, "db")
    pem.chmod(0o644)
    with pytest.raises(CredentialsError, match=r"readable by others .*chmod 600"):
        load_credentials(agent_dir)
    pem.chmod(0o600)
    meta.write_text("{not json")
    with pytest.raises(JoinError, match=r"db\.json is damaged"):
        run(join(agent_dir, control_plane.addr, TOKEN, "db"))


def test_renewal_replaces_the_certificate_and_tells_listeners(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    creds = joined(control_plane, agent_dir)

    async def main() -> tuple[HostCredentials, list[HostCredentials]]:
        async with ControlPlaneClient(control_plane.addr, creds.api_context()) as client:
            renewer = CredentialRenewer(agent_dir, creds, client)
            told: list[HostCredentials] = []
            renewer.subscribe(told.append)
            new = await renewer.renew()
            # the client now authenticates with the new certificate
            await client.heartbeat(Heartbeat(host_id=new.host_id, role="db", serial=0))
            return new, told

    new, told = run(main())
    assert told == [new]
    assert new.host_id == creds.host_id and new.key_pem != creds.key_pem
    assert new.cert_pem != creds.cert_pem
    assert load_credentials(agent_dir) == new  # on disk too


def test_the_renewer_renews_when_two_thirds_of_the_life_have_passed(
    control_plane: LiveControlPlane, agent_dir: Path
) -> None:
    creds = joined(control_plane, agent_dir)
    cas = control_plane.cas
    # a certificate of this host past 2/3 of its life (notBefore 110 s ago, 10 s left)
    key_source = credentials(cas, "db", creds.host_id)
    cert = cas.host.issue_host(
        load_certificates(key_source.cert_pem)[0].public_key(), creds.host_id, "db",
        ttl=timedelta(seconds=60), now=datetime.now(UTC) - timedelta(seconds=50),
    )
    old = HostCredentials(**{
        **creds.__dict__,
        "cert_pem": cert.public_bytes(serialization.Encoding.PEM),
        "key_pem": key_source.key_pem,
        "expires": cert.not_valid_after_utc,
        "not_before": cert.not_valid_before_utc,
    })
    assert old.renew_at < datetime.now(UTC) < old.expires

    async def main() -> list[HostCredentials]:
        async with ControlPlaneClient(control_plane.addr, old.api_context()) as client:
            renewer = CredentialRenewer(agent_dir, old, client)
            told: list[HostCredentials] = []
            renewer.subscribe(told.append)
            stop = asyncio.Event()
            task = asyncio.create_task(renewer.run(stop))
            while not told:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the new certificate is young: no second renewal
            stop.set()
            await task
            return told

    told = run(main())
    assert len(told) == 1
    assert told[0].expires > old.expires and told[0].renew_at > datetime.now(UTC)
