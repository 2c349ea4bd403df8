"""The PostgreSQL JDBC driver (pgjdbc) through the proxy with what `tsh db config
--format=jdbc` prints: TLS with the route certificate and the key as PKCS#8 DER, server-side
prepared statements, batches, a fetch-size cursor, COPY out and in, LISTEN/NOTIFY between two
sessions, and `setQueryTimeout` (pgjdbc's own CancelRequest on a new connection).

Needs a JDK and Debian's libpostgresql-jdbc-java (`.ci/run` installs both)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.cluster import E2ECluster, Person

pytestmark = pytest.mark.slow

PROBE = Path(__file__).parent / "jdbc" / "Probe.java"
DRIVER = Path("/usr/share/java/postgresql.jar")


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`java -cp ...` for the compiled probe."""
    javac, java = shutil.which("javac"), shutil.which("java")
    if javac is None or java is None or not DRIVER.exists():
        pytest.skip(
            "needs javac, java and /usr/share/java/postgresql.jar: apt-get install "
            "default-jdk-headless libpostgresql-jdbc-java (.ci/run does)"
        )
    out = tmp_path_factory.mktemp("jdbc")
    subprocess.run([javac, "-d", str(out), "-cp", str(DRIVER), str(PROBE)], check=True,
                   timeout=120)
    return [java, "-cp", f"{DRIVER}:{out}", "Probe"]


def test_pgjdbc_with_the_url_tsh_prints(
    cluster: E2ECluster, alice: Person, probe: list[str]
) -> None:
    assert cluster.pg is not None
    config = alice.db_config()
    url = (
        config["jdbc_url"]
        .replace("<db user>", alice.db_users[0])
        .replace("<db name>", alice.db_names[0])
    )
    assert url.startswith(f"jdbc:postgresql://{config['host']}:{config['port']}/")
    assert f"sslkey={config['key_pk8']}" in url and "sslmode=verify-full" in url

    done = subprocess.run(
        [*probe, url], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = dict(line.split("=", 1) for line in done.stdout.splitlines())

    version = cluster.pg.psql_admin("show server_version").strip()
    copied = cluster.pg.psql_admin(
        "select md5(string_agg(g || E'\\t' || md5(g::text), E'\\n' order by g) || E'\\n') "
        "from generate_series(1, 20000) g"
    ).strip()
    assert seen == {
        "server_version": version,
        "user": alice.db_users[0],
        "database": alice.db_names[0],
        "ssl": "t",
        "pid_matches": "true",
        "prepared_sum": str(sum(2 * i for i in range(20))),
        "batch": "2000",
        "cursor_rows": "2000",
        "error": "22012",
        "copy_out_rows": "20000",
        "copy_out_md5": copied,
        "copy_in_rows": "20000",
        "copy_in_md5": copied,
        "notify_payload": "hello from jdbc",
        "notify_pid_matches": "true",
        "cancel": "57014",
        "cancel_seconds": seen["cancel_seconds"],
        "after_cancel": "still usable",
        "metadata_tables": "1",
    }
    assert int(seen["cancel_seconds"]) <= 5
