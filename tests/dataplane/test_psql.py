"""psql and pgbench through the proxy and an agent (separate event loops, TLS on every leg)
behave exactly as a direct connection to PostgreSQL: same outputs, byte for byte."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.dataplane.conftest import DataPath
from tests.fixtures.pg import client_env, run_pgbench, run_psql

pytestmark = pytest.mark.slow

QUERIES = """
select aid, bid, abalance, filler from pgbench_accounts order by aid limit 2000;
select count(*), sum(abalance) from pgbench_accounts;
select current_user, current_database(), setting from pg_settings where name = 'DateStyle';
select 1/0 as fails;
select 'after the error' as still_here;
begin; create temporary table t(x int); insert into t select generate_series(1, 5);
select * from t; rollback;
select E'caf\\u00e9 \\u2603 unicode', NULL::text as nothing, 1.5::numeric;
"""


def both(path: DataPath, user: str, dbname: str) -> tuple[str, str]:
    return path.dsn(path.cert(user), user, dbname), path.pg.direct(user, dbname)


def test_queries_give_the_same_output_as_a_direct_connection(path: DataPath) -> None:
    via, direct = both(path, "alice", "bench")
    args = ["-v", "ON_ERROR_STOP=0", "-f", "-"]
    through = run_psql(via, args, input=QUERIES)
    plain = run_psql(direct, args, input=QUERIES)
    assert through.returncode == plain.returncode == 0, through.stderr
    assert through.stdout == plain.stdout
    assert through.stderr.replace(via, "") == plain.stderr.replace(direct, "")
    assert "division by zero" in through.stderr
    assert "after the error" in through.stdout


def test_startup_parameters_reach_the_server(path: DataPath) -> None:
    via = path.dsn(path.cert("alice"), "alice", "main", application_name="through-teleport",
                   options="-c DateStyle=German -c search_path=pg_catalog")
    done = run_psql(via, "show DateStyle; show search_path; show application_name; "
                         "select ssl from pg_stat_ssl where pid = pg_backend_pid()")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["German,", "DMY", "pg_catalog", "through-teleport", "t"]


def test_copy_in_and_out(path: DataPath, tmp_path: Path) -> None:
    via, direct = both(path, "alice", "bench")
    rows = "".join(f"{i},name {i},\"quoted, {i}\"\n" for i in range(20000))
    source = tmp_path / "in.csv"
    source.write_text(rows)
    setup = run_psql(via, "drop table if exists copied; create table copied(i int, a text, b text)")
    assert setup.returncode == 0, setup.stderr
    loaded = run_psql(via, f"\\copy copied from '{source}' csv")
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "COPY 20000"
    out_via = run_psql(via, "\\copy (select * from copied order by i) to stdout csv")
    out_direct = run_psql(direct, "\\copy (select * from copied order by i) to stdout csv")
    assert out_via.returncode == 0, out_via.stderr
    assert out_via.stdout == out_direct.stdout == rows
    bad = run_psql(via, f"\\copy copied(i) from '{source}' csv")
    assert bad.returncode != 0
    assert "extra data after last expected column" in bad.stderr
    again = run_psql(via, "select count(*) from copied")
    assert again.stdout.strip() == "20000"


def _hash_output(dsn: str, sql: str, out: Path) -> tuple[str, int]:
    with out.open("wb") as sink:
        done = subprocess.run(
            ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql, "-d", dsn],
            stdout=sink, stderr=subprocess.PIPE, env=client_env(), timeout=300, check=False,
        )
    assert done.returncode == 0, done.stderr
    digest = hashlib.sha256()
    with out.open("rb") as source:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest(), out.stat().st_size


def test_a_100_mb_result(path: DataPath, tmp_path: Path) -> None:
    via, direct = both(path, "alice", "main")
    sql = "select i, md5(i::text), repeat(chr(65 + i % 26), 1000) from generate_series(1, 100000) i"
    got = _hash_output(via, sql, tmp_path / "via.txt")
    want = _hash_output(direct, sql, tmp_path / "direct.txt")
    assert got == want
    assert got[1] > 100_000_000


def test_listen_notify_across_sessions(path: DataPath) -> None:
    via = path.dsn(path.cert("alice"), "alice", "main")
    result: dict[str, subprocess.CompletedProcess[str]] = {}

    def listener() -> None:
        result["done"] = run_psql(via, ["-c", "LISTEN teleport", "-c", "select pg_sleep(2)",
                                        "-c", "select 'woke'"])

    thread = threading.Thread(target=listener)
    thread.start()
    time.sleep(0.8)
    sent = run_psql(via, "select pg_notify('teleport', 'hello through the tunnel')")
    assert sent.returncode == 0, sent.stderr
    thread.join(30)
    done = result["done"]
    assert done.returncode == 0, done.stderr
    assert 'Asynchronous notification "teleport" with payload "hello through the tunnel"' in (
        done.stdout
    )


@pytest.mark.parametrize("mode", ["prepared", "extended"])
@pytest.mark.parametrize("script", [["-S"], []], ids=["select-only", "tpcb"])
def test_pgbench_through_the_proxy(path: DataPath, mode: str, script: list[str]) -> None:
    via = path.dsn(path.cert("alice"), "alice", "bench")
    done = run_pgbench(via, ["-n", "-M", mode, *script, "-c", "4", "-j", "2", "-T", "2"])
    assert done.returncode == 0, done.stderr
    assert "number of failed transactions: 0" in done.stdout
    processed = int(done.stdout.split("number of transactions actually processed: ")[1].split()[0])
    assert processed > 50
    # Every tpcb transaction moved money atomically: balances still add up to the history.
    check = run_psql(
        via,
        "select (select coalesce(sum(abalance), 0) from pgbench_accounts) = "
        "(select coalesce(sum(delta), 0) from pgbench_history)",
    )
    assert check.stdout.strip() == "t", check.stderr
