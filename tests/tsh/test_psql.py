"""Seed 001's "Connect", end to end: the control plane, a proxy and a db agent joined to it
with a join token (their links run: bundle feed, heartbeats), a real PostgreSQL set up with
`tctl auth sign --format=db`; then `tsh login` through the proxy's web port, `tsh db ls`,
`tsh db login`, and real psql with `service=<cluster>-<name>`, and `tsh db connect`.

Nothing is faked: every hop is TLS with certificates from the cluster's CAs, and the
proxy relays the API connections to the control plane unopened.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from control import tctl
from dataplane.agent import AgentService, StaticDatabases
from dataplane.cluster import ClusterLink
from dataplane.proxy import ProxyService
from launcher.embedded_postgres import EmbeddedPostgres, ServerTLS, free_tcp_port
from schemas.bundle import BundleDatabase
from schemas.config import DatabaseConfig
from schemas.identity import fingerprint
from tests.api.conftest import STATIC_TOKEN, ApiCluster, start_api_cluster
from tests.dataplane.support import LoopThread
from tests.fixtures.pg import client_env, run_psql
from tests.tsh.conftest import DEV_ROLE, PASSWORD, Tsh, cluster_settings, user_yaml

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    cluster: ApiCluster
    pg: EmbeddedPostgres
    thread: LoopThread
    web: tuple[str, int]

    @property
    def proxy(self) -> str:
        return f"127.0.0.1:{self.web[1]}"


def _tctl(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = tctl.main(list(argv))
    assert code == 0, out.getvalue()
    return out.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("tsh-e2e")
    cluster = start_api_cluster(base / "auth", cluster_settings())
    data_dir = str(cluster.data_dir)
    cluster.commit({
        "roles/dev.yaml": DEV_ROLE,
        "users/alice.yaml": user_yaml("alice", ["dev"], ["alice"], ["metrics"]),
    })
    cluster.signup("alice")

    # PostgreSQL as seed 001's self-hosted section sets it up: files from tctl auth sign.
    tls_dir = base / "pg-tls"
    tls_dir.mkdir()
    _tctl("auth", "sign", "--format=db", "--host=localhost,127.0.0.1",
          f"--out={tls_dir / 'server'}", "--ttl=24h", f"--data-dir={data_dir}")
    pg = EmbeddedPostgres.temporary(
        port=free_tcp_port(),
        tls=ServerTLS(tls_dir / "server.crt", tls_dir / "server.key", tls_dir / "server.cas"),
        fsync=False,
    )
    thread = LoopThread("tsh-e2e-dataplane")
    stop = asyncio.Event()
    services: list[object] = []
    try:
        pg.start()
        pg.create_role("alice")
        pg.create_database("metrics", owner="alice")
        aurora = {"name": "aurora", "description": "AWS Aurora",
                  "uri": f"127.0.0.1:{pg.port}", "labels": {"env": "dev"}}
        pin = fingerprint(x509.load_pem_x509_certificate(cluster.host_ca))
        api = f"127.0.0.1:{cluster.port}"

        async def start() -> tuple[str, int]:
            db_link = await ClusterLink.connect(
                base / "agent", api, "db", token=STATIC_TOKEN, ca_pin=pin,
                databases=[DatabaseConfig(protocol="postgres", **aurora)],
            )
            proxy_link = await ClusterLink.connect(
                base / "proxy", api, "proxy", token=STATIC_TOKEN, ca_pin=pin,
                dns_names=["localhost"], ip_addresses=["127.0.0.1"],
            )
            for link in (db_link, proxy_link):
                services.append(asyncio.ensure_future(link.run(stop)))
            while db_link.feed.current is None or proxy_link.feed.current is None:
                await asyncio.sleep(0.02)
            assert db_link.db_certs is not None
            agent = AgentService(
                credentials=db_link.credentials,
                bundles=db_link.feed,
                databases=StaticDatabases([BundleDatabase(**aurora)]),
                db_certs=db_link.db_certs,
            )
            await agent.start()
            proxy = ProxyService(
                credentials=proxy_link.credentials,
                bundles=proxy_link.feed,
                web_addr=("127.0.0.1", 0),
                tunnel_addr=None,
                api_upstream=("127.0.0.1", cluster.port),
                local_agent=agent,
            )
            await proxy.start()
            services.extend([agent, proxy])
            assert proxy.web_address is not None
            return proxy.web_address

        web = thread.run(start())
        yield Stack(cluster, pg, thread, web)
    finally:

        async def shutdown() -> None:
            for service in reversed(services):
                if isinstance(service, ProxyService | AgentService):
                    await service.stop()
            stop.set()
            await asyncio.gather(*(s for s in services if isinstance(s, asyncio.Future)),
                                 return_exceptions=True)

        with contextlib.suppress(Exception):
            thread.run(shutdown(), timeout=30)
        thread.stop()
        pg.destroy()
        cluster.running.shutdown()


def test_seed_001_connect_through_the_proxy(tsh: Tsh, stack: Stack) -> None:
    # The user's own pg_service.conf, which must survive.
    own = b"# mine\n[elsewhere]\nhost=/nonexistent\n"
    tsh.service_file.write_bytes(own)

    login = tsh("login", "--insecure", f"--proxy={stack.proxy}", "--user=alice",
                stdin=f"{PASSWORD}\n")
    assert login.code == 0, login.err
    assert "Cluster:      root" in login.out

    ls = tsh("db", "ls")
    assert ls.code == 0, ls.err
    assert ls.out.splitlines() == [
        "Name   Description Labels",
        "------ ----------- -------",
        "aurora AWS Aurora  env=dev",
    ]

    db_login = tsh("db", "login", "aurora")
    assert db_login.code == 0, db_login.err
    assert 'psql "service=root-aurora user=alice dbname=metrics"' in db_login.out
    assert tsh.service_file.read_bytes().startswith(own)

    env = {"PGSERVICEFILE": str(tsh.service_file), "HOME": str(tsh.home)}
    done = run_psql("service=root-aurora",
                    "select current_user, current_database(), ssl from pg_stat_ssl "
                    "where pid = pg_backend_pid()", env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "alice|metrics|t"
    # Seed 001's form, with the user and database spelled out.
    spelled = run_psql("service=root-aurora user=alice dbname=metrics", "select 42", env=env,
                       timeout=60)
    assert spelled.returncode == 0, spelled.stderr
    assert spelled.stdout.strip() == "42"

    # The connection settings for GUI clients and shells work as they are printed.
    cmd = tsh("db", "config", "--format", "cmd").out.strip()
    shell = subprocess.run(["sh", "-c", f"{cmd} -X -At -c 'select 7'"], capture_output=True,
                           text=True, env=client_env(), timeout=60, check=False)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip() == "7"
    exports = tsh("db", "env").out.strip()
    shell = subprocess.run(["sh", "-c", f"{exports}; psql -X -At -c 'select current_user'"],
                           capture_output=True, text=True, env=client_env(), timeout=60,
                           check=False)
    assert shell.returncode == 0, shell.stderr
    assert shell.stdout.strip() == "alice"

    assert tsh("db", "logout").code == 0
    assert tsh.service_file.read_bytes() == own
    gone = run_psql("service=root-aurora", "select 1", env=env, timeout=60)
    assert gone.returncode != 0
    assert 'definition of service "root-aurora" not found' in gone.stderr


def test_db_connect_runs_psql_logging_in_first(tmp_path: Path, stack: Stack) -> None:
    env = client_env({
        "TELEPORT_HOME": str(tmp_path / "tsh"),
        "HOME": str(tmp_path),
        "PGSERVICEFILE": str(tmp_path / "pg_service.conf"),
    })
    tsh_bin = str(Path(sys.executable).parent / "tsh")
    login = subprocess.run(
        [tsh_bin, "login", "--insecure", f"--proxy={stack.proxy}", "--user=alice"],
        input=f"{PASSWORD}\n", capture_output=True, text=True, env=env, timeout=60,
        check=False,
    )
    assert login.returncode == 0, login.stderr
    connect = subprocess.run(
        [tsh_bin, "db", "connect", "aurora", "--", "-X", "-At", "-c", "select current_user"],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
        check=False,
    )
    assert connect.returncode == 0, connect.stderr
    assert "Logged in to database aurora." in connect.stderr
    assert connect.stdout.strip() == "alice"
    assert os.path.exists(tmp_path / "pg_service.conf")
    # psql's own failure is psql's exit code: tsh is no longer there.
    failing = subprocess.run(
        [tsh_bin, "db", "connect", "aurora", "--", "-X", "-c", "select * from nowhere"],
        capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL,
        check=False,
    )
    assert failing.returncode != 0
    assert 'relation "nowhere" does not exist' in failing.stderr
    assert "Logged in to database" not in failing.stderr  # the login was reused
