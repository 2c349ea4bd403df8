"""The control plane's settings as last started, kept in `<data_dir>/control.json`.

`teleport start --roles=auth` writes them; `tctl` reads them to act on the same data dir
(which repository is policy, which cluster, which static join tokens, where the proxy is)
without being told again. The file is written 0600: it holds the static join tokens of
`auth_service.tokens`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from transport.files import write_private

FILE = "control.json"


class SourceSettings(BaseModel):
    kind: Literal["hosted", "local", "remote"] = "hosted"
    path: str | None = None  # local repository (kind local)
    url: str | None = None  # remote to pull from (kind remote)
    branch: str = "main"
    pull_interval_seconds: int = 30


class ApiSettings(BaseModel):
    """The HTTPS API (`control.api`): who it is, what it accepts, and its limits."""

    nodename: str = "localhost"
    # Addresses people and agents reach the auth service by (host:port); their hosts are
    # subject alternative names of the API's certificate.
    public_addrs: list[str] = Field(default_factory=list)
    # Public web addresses of the proxies (host:port): `ping`, and the `tsh login` and
    # `teleport start` lines tctl prints. Proxies that heartbeat add theirs.
    proxy_addrs: list[str] = Field(default_factory=list)
    # Reverse tunnel addresses agents dial (host:port); proxies that heartbeat add theirs.
    tunnel_addrs: list[str] = Field(default_factory=list)
    # Static join tokens, "roles:token" as in auth_service.tokens (secrets: file is 0600).
    static_tokens: list[str] = Field(default_factory=list)
    second_factor: Literal["off", "otp", "optional"] = "off"
    lockout_failures: int = Field(default=5, ge=1)
    lockout_seconds: int = Field(default=15 * 60, ge=1)
    signup_ttl_seconds: int = Field(default=3600, ge=1)
    host_cert_ttl_seconds: int = Field(default=24 * 3600, ge=60)
    db_client_cert_ttl_seconds: int = Field(default=3600, ge=60)
    heartbeat_interval_seconds: float = Field(default=10.0, gt=0)
    # Login attempts: a burst, then one more every `refill` seconds; per user name and per
    # client address (both must allow the attempt).
    login_burst_per_user: int = Field(default=10, ge=1)
    login_refill_per_user_seconds: float = Field(default=6.0, gt=0)
    login_burst_per_addr: int = Field(default=60, ge=1)
    login_refill_per_addr_seconds: float = Field(default=1.0, gt=0)
    max_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    body_timeout_seconds: float = Field(default=30.0, gt=0)


class ControlSettings(BaseModel):
    cluster_name: str
    source: SourceSettings = SourceSettings()
    bundle_ttl_seconds: int = 24 * 3600
    # Where the API listens (host:port; port 0 picks a free one); None: no API. The address
    # actually bound is written to <data_dir>/run/api.json.
    api_addr: str | None = None
    api: ApiSettings = Field(default_factory=ApiSettings)


def load_settings(data_dir: Path) -> ControlSettings | None:
    path = Path(data_dir) / FILE
    if not path.exists():
        return None
    return ControlSettings.model_validate_json(path.read_bytes())


def save_settings(data_dir: Path, settings: ControlSettings) -> None:
    write_private(Path(data_dir) / FILE, settings.model_dump_json(indent=1).encode() + b"\n")
