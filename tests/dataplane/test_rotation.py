"""Trust follows the bundle in force: a user CA added by a new bundle is accepted at once
(the proxy's TLS context is rebuilt, the agent verifies against its own bundle), and a CA
taken out ends the sessions of its certificates."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from control.ca import ClusterCAs
from dataplane.postgres import messages as pm
from dataplane.tunnel.hosts import IdentityCache
from schemas.identity import IdentityError
from tests.dataplane import rawclient
from tests.dataplane.conftest import DataPath, base_bundle
from tests.dataplane.support import sign
from tests.fixtures.pg import run_psql

pytestmark = pytest.mark.slow


@pytest.fixture
def restore(path: DataPath) -> Iterator[None]:
    yield
    path.restore()


def test_a_new_user_ca_is_trusted_once_its_bundle_is_in_force(
    path: DataPath, tmp_path: Path, restore: None
) -> None:
    rotated = ClusterCAs.load_or_create(tmp_path / "next", path.pki.cluster)
    cert = path.pki.route_cert("alice", ["admin"], "pg", cas=rotated)
    dsn = path.dsn(cert, "alice", "main")
    assert run_psql(dsn, "select 1").returncode != 0  # not yet trusted

    path.serial += 1
    path.publish(sign(base_bundle(path.pki, path.serial,
                                  extra_user_cas=[rotated.user.certificate_pem()]), path.key))
    done = run_psql(dsn, "select 'rotated in'")
    assert done.stdout.strip() == "rotated in", done.stderr

    session = rawclient.connect(path.web_port, cert, path.pki.host_ca_file, "alice", "main")
    try:
        path.restore()  # the new CA is gone again
        message = session.read_message()
        assert isinstance(message, pm.ErrorResponse) and message.sqlstate == "28000"
        assert "its certificate is no longer trusted" in (message.message or "")
    finally:
        session.close()
    assert run_psql(dsn, "select 1").returncode != 0


def test_the_identity_cache_never_outlives_a_certificate(path: DataPath) -> None:
    cert = path.pki.route_cert("alice", ["admin"], "pg", ttl=timedelta(minutes=5))
    der = x509.load_pem_x509_certificate(cert.cert_file.read_bytes()).public_bytes(Encoding.DER)
    cache = IdentityCache()
    cas = [path.pki.cas.user.certificate_pem()]
    now = datetime.now(UTC)
    first = cache.verify(der, cas, now, "db")
    assert cache.verify(der, cas, now + timedelta(minutes=1), "db") is first  # reused
    with pytest.raises(IdentityError, match="expired"):
        cache.verify(der, cas, now + timedelta(minutes=10), "db")
    with pytest.raises(IdentityError, match="not for the cluster API"):
        cache.verify(der, cas, now, "user")  # another usage is another question
    other = ClusterCAs.load_or_create(path.pki.base / "cache-other", path.pki.cluster)
    with pytest.raises(IdentityError):
        cache.verify(der, [other.user.certificate_pem()], now, "db")  # other CAs: re-checked
