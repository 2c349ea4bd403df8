"""The data plane's link to the control plane: join, host certificates, bundles, db client
certificates, heartbeats and dynamic labels.

Proxies and db agents use these objects; the data path (proxy, tunnel, agent sessions)
consumes them through their small public faces:

- `identity`: `join()`, `load_credentials()`, `HostCredentials` (TLS contexts for every hop),
  `CredentialRenewer`;
- `bundles`: `BundleFeed`, the verified bundle in force (`current`), hot-reloaded from the
  control plane through `<data_dir>/cache/bundle` and watchfiles;
- `dbcerts`: `DbClientCerts.get(db_user)`, client certificates for PostgreSQL, cached;
- `heartbeat`: `Heartbeater`, liveness, served databases and the proxies' tunnel addresses;
- `labels`: `DynamicLabels`, static plus command-computed labels (seed 000);
- `api_client`: `ControlPlaneClient`, the typed client of `schemas/api.py` over mTLS;
- `link`: `ClusterLink`, all of the above joined and run together for one host.

Nothing here decides access (that is `schemas.rbac`) or touches a database session. Every
object keeps working from what it has while the control plane is unreachable, for as long
as what it has is valid, and fails closed after.
"""

from dataplane.cluster.api_client import (
    ControlPlaneClient,
    ControlPlaneError,
    ControlPlaneRefused,
    ControlPlaneUnavailable,
)
from dataplane.cluster.bundles import BundleFeed
from dataplane.cluster.dbcerts import DbCertError, DbClientCert, DbClientCerts
from dataplane.cluster.heartbeat import Heartbeater
from dataplane.cluster.identity import (
    CredentialRenewer,
    CredentialsError,
    HostCredentials,
    JoinError,
    join,
    load_credentials,
    require_host_peer,
)
from dataplane.cluster.labels import DynamicLabels
from dataplane.cluster.link import ClusterLink

__all__ = [
    "BundleFeed",
    "ClusterLink",
    "ControlPlaneClient",
    "ControlPlaneError",
    "ControlPlaneRefused",
    "ControlPlaneUnavailable",
    "CredentialRenewer",
    "CredentialsError",
    "DbCertError",
    "DbClientCert",
    "DbClientCerts",
    "DynamicLabels",
    "Heartbeater",
    "HostCredentials",
    "JoinError",
    "join",
    "load_credentials",
    "require_host_peer",
]
