"""A control plane with its HTTPS API on a free loopback port, and a client that speaks to it
over real TLS with real certificates (keys made here, certificates from the API itself).

One cluster per test module (starting one costs a git repository and a first reconcile);
tests use their own user names and hosts so that they do not see each other's lockouts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control import hosted
from control.settings import ApiSettings, ControlSettings, SourceSettings
from control.users import SecretsStore
from schemas.api import JoinResponse, LoginResponse
from tests.control.conftest import RunningControlPlane, start_control_plane
from transport import tls
from transport.http import ClientResponse, request_sync

STATIC_TOKEN = "cbdeeab9-6f88-436d-a673-44d14bd86bb7"
PASSWORD = "correct horse battery staple"


@dataclass
class Creds:
    """A private key made here and the certificate the API issued for it."""

    key: ec.EllipticCurvePrivateKey
    cert_pem: bytes
    host_id: str | None = None

    @property
    def key_pem(self) -> bytes:
        return tls.private_key_pem(self.key)


def public_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


@dataclass
class ApiCluster:
    running: RunningControlPlane
    host: str
    port: int

    @property
    def data_dir(self) -> Path:
        return self.running.data_dir

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def host_ca(self) -> bytes:
        return (self.data_dir / "ca" / "host.crt").read_bytes()

    def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        body: bytes | None = None,
        creds: Creds | None = None,
        params: Mapping[str, str | int] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> ClientResponse:
        ctx = tls.client_context(
            [self.host_ca],
            creds.cert_pem if creds else None,
            creds.key_pem if creds else None,
        )
        return request_sync(
            self.url,
            method,
            path,
            json=json,
            body=body,
            params=params,
            headers=headers,
            ssl_context=ctx,
            timeout=timeout,
        )

    # -- people ------------------------------------------------------------------------

    def signup(self, name: str, password: str = PASSWORD) -> None:
        token = SecretsStore(self.data_dir).reset(name)
        self.call("POST", "/v1/signup", json={"token": token, "password": password}
                  ).raise_for_error()

    def login_response(
        self, name: str, password: str = PASSWORD, **extra: Any
    ) -> tuple[ClientResponse, ec.EllipticCurvePrivateKey]:
        key = tls.new_private_key()
        body = {"user": name, "password": password, "public_key": public_pem(key), **extra}
        return self.call("POST", "/v1/login", json=body), key

    def login(self, name: str, password: str = PASSWORD, **extra: Any) -> Creds:
        response, key = self.login_response(name, password, **extra)
        cert = response.raise_for_error().json(LoginResponse).cert
        return Creds(key, cert.encode())

    # -- hosts -------------------------------------------------------------------------

    def join_response(
        self, role: str, token: str = STATIC_TOKEN, **extra: Any
    ) -> tuple[ClientResponse, ec.EllipticCurvePrivateKey]:
        key = tls.new_private_key()
        body = {"token": token, "role": role, "public_key": public_pem(key), **extra}
        return self.call("POST", "/v1/join", json=body), key

    def join(self, role: str, token: str = STATIC_TOKEN, **extra: Any) -> Creds:
        response, key = self.join_response(role, token, **extra)
        joined = response.raise_for_error().json(JoinResponse)
        return Creds(key, joined.cert.encode(), joined.host_id)

    def serve(self, agent: Creds, databases: list[dict[str, Any]]) -> None:
        """Heartbeat as db agent `agent` serving `databases`."""
        beat = {
            "host_id": agent.host_id,
            "role": "db",
            "serial": self.serial(),
            "databases": databases,
        }
        self.call("POST", "/v1/heartbeat", json=beat, creds=agent).raise_for_error()

    # -- policy ------------------------------------------------------------------------

    def serial(self) -> int:
        state = self.running.state()
        return state.in_force.serial if state.in_force else 0

    def commit(self, files: dict[str, bytes | None], message: str = "test change") -> int:
        """Push `files` to the hosted repository and wait until the new bundle is in force."""
        before = self.serial()
        hosted.commit_files(hosted.repo_path(self.data_dir), files, message)
        state = self.running.wait_for(
            lambda s: s.in_force is not None and s.in_force.serial > before
        )
        assert state.in_force is not None
        return state.in_force.serial


def api_settings(**changes: Any) -> ControlSettings:
    api = ApiSettings(
        nodename="auth.example.test",
        proxy_addrs=["proxy.example.test:3080"],
        tunnel_addrs=["proxy.example.test:3024"],
        static_tokens=[f"proxy,node,database:{STATIC_TOKEN}"],
        lockout_seconds=2,
        header_timeout_seconds=1.5,
        body_timeout_seconds=2.0,
    )
    api = api.model_copy(update=changes)
    return ControlSettings(
        cluster_name="root", source=SourceSettings(), api_addr="127.0.0.1:0", api=api
    )


def start_api_cluster(data_dir: Path, settings: ControlSettings) -> ApiCluster:
    running = start_control_plane(data_dir, settings)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        api = running.plane.api
        if api is not None and api.address is not None:
            break
        time.sleep(0.02)
    else:
        running.shutdown()
        raise AssertionError("the API did not start")
    running.wait_for(lambda s: s.in_force is not None)
    return ApiCluster(running, "127.0.0.1", api.address[1])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiCluster]:
    running = start_api_cluster(tmp_path_factory.mktemp("api") / "data", api_settings())
    yield running
    running.running.shutdown()
