"""A real control plane with its HTTPS API on a loopback port, users and databases in its
policy, and helpers that run `tsh` the way a person does: `main(argv)` with the password on
standard input, in a home directory (`TELEPORT_HOME`, `PGSERVICEFILE`) of its own.

The API is the proxy's web port's other half: the proxy hands it TLS connections unopened,
so tsh speaking HTTPS to the API's own address is what it does through a proxy.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from control.settings import ApiSettings, ControlSettings, SourceSettings
from dataplane.tsh import cli
from launcher.embedded_postgres import free_tcp_port
from tests.api.conftest import PASSWORD, STATIC_TOKEN, ApiCluster, start_api_cluster

__all__ = ["PASSWORD", "Tsh", "TshRun", "user_yaml"]

DATABASES = [
    {"name": "aurora", "description": "AWS Aurora", "labels": {"env": "dev"}},
    {"name": "metrics", "description": "Metrics", "labels": {"env": "dev", "team": "obs"}},
    {"name": "vault", "description": "Secrets", "labels": {"env": "prod"}},
]

DEV_ROLE = b"""\
kind: role
version: v5
metadata:
  name: dev
spec:
  allow:
    db_labels:
      env: dev
    db_users: ["{{internal.db_users}}"]
    db_names: ["{{internal.db_names}}"]
"""


def user_yaml(name: str, roles: list[str], db_users: list[str], db_names: list[str]) -> bytes:
    return (
        f"kind: user\nversion: v2\nmetadata: {{name: {name}}}\n"
        f"spec: {{roles: [{', '.join(roles)}], traits: {{db_users: [{', '.join(db_users)}], "
        f"db_names: [{', '.join(db_names)}]}}}}\n"
    ).encode()


def cluster_settings(**api: object) -> ControlSettings:
    port = free_tcp_port()
    settings = ApiSettings(
        nodename="auth.example.test",
        proxy_addrs=[f"127.0.0.1:{port}"],
        static_tokens=[f"proxy,node,database:{STATIC_TOKEN}"],
        lockout_failures=3,
        lockout_seconds=600,
        heartbeat_interval_seconds=600,
        login_burst_per_user=100,
        login_burst_per_addr=1000,
    ).model_copy(update=api)
    return ControlSettings(
        cluster_name="root", source=SourceSettings(), api_addr=f"127.0.0.1:{port}", api=settings
    )


def start_cluster(data_dir: Path, users: dict[str, bytes], **api: object) -> ApiCluster:
    cluster = start_api_cluster(data_dir, cluster_settings(**api))
    files: dict[str, bytes | None] = {"roles/dev.yaml": DEV_ROLE}
    files.update({f"users/{name}.yaml": body for name, body in users.items()})
    cluster.commit(files)
    cluster.serve(cluster.join("db"), DATABASES)
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiCluster]:
    users = {
        "alice": user_yaml("alice", ["dev"], ["alice"], ["postgres"]),
        "bob": user_yaml("bob", ["dev"], ["bob", "reporting"], ["main", "metrics"]),
        "carl": user_yaml("carl", ["dev"], ["carl"], ["postgres"]),
        "lena": user_yaml("lena", ["dev"], ["lena"], ["postgres"]),
    }
    running = start_cluster(tmp_path_factory.mktemp("tsh") / "data", users)
    for name in ("alice", "bob", "carl", "lena"):
        running.signup(name)
    yield running
    running.running.shutdown()


@dataclass
class TshRun:
    code: int
    out: str
    err: str


@dataclass
class Tsh:
    """`tsh` for one person: their own TELEPORT_HOME and pg_service.conf."""

    home: Path
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture[str]

    @property
    def tsh_home(self) -> Path:
        return self.home / ".tsh"

    @property
    def service_file(self) -> Path:
        return self.home / ".pg_service.conf"

    def __call__(self, *argv: str, stdin: str = "") -> TshRun:
        self.monkeypatch.setenv("HOME", str(self.home))
        self.monkeypatch.setenv("TELEPORT_HOME", str(self.tsh_home))
        self.monkeypatch.setenv("PGSERVICEFILE", str(self.service_file))
        self.monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        self.capsys.readouterr()
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
        captured = self.capsys.readouterr()
        return TshRun(code, captured.out, captured.err)


@pytest.fixture
def tsh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Tsh:
    home = tmp_path / "home"
    home.mkdir()
    return Tsh(home, monkeypatch, capsys)


def proxy_of(cluster: ApiCluster) -> str:
    return f"127.0.0.1:{cluster.port}"
