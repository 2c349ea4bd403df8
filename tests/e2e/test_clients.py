"""Clients beyond psql, through the product's proxy exactly as directly: psycopg's pipeline
mode, binary COPY in, binary results, a server-side cursor, a server error's SQLSTATE, and
the connection's own information (server version, ParameterStatus, backend pid); pg_dump and
pg_restore, parallel ones included."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest

from tests.e2e.cluster import E2ECluster, Person, run

pytestmark = pytest.mark.slow


def test_psycopg_pipeline_binary_copy_and_server_cursors(
    cluster: E2ECluster, alice: Person
) -> None:
    assert cluster.pg is not None
    with alice.libpq_env(), psycopg.connect(alice.dsn(), autocommit=True) as conn:
        with conn.pipeline() as pipeline:
            cursors = [conn.execute("select %s::int * 2", [i]) for i in range(200)]
            pipeline.sync()
        assert [c.fetchone() for c in cursors] == [(2 * i,) for i in range(200)]

        conn.execute("create temp table t (a int, b text, c bytea)")
        with conn.cursor().copy("copy t from stdin (format binary)") as copy:
            copy.set_types(["int4", "text", "bytea"])
            for i in range(1000):
                copy.write_row((i, f"r{i}", bytes([i % 256]) * 10))
        assert conn.execute("select count(*), sum(a) from t").fetchone() == (1000, 499500)
        rows = conn.execute("select a, b, c from t order by a", binary=True).fetchall()
        assert rows[5] == (5, "r5", b"\x05" * 10) and len(rows) == 1000

        named = conn.cursor(name="server_side")
        with conn.transaction():
            named.execute("select generate_series(1, 10000)")
            first = named.fetchmany(500)
            rest = sum(1 for _ in named)
        assert (len(first), rest) == (500, 9500)

        with pytest.raises(psycopg.errors.DivisionByZero) as failed:
            conn.execute("select 1/0")
        assert failed.value.diag.sqlstate == "22012"

        direct_version = int(cluster.pg.psql_admin("show server_version_num").strip())
        assert conn.info.server_version == direct_version
        assert conn.info.parameter_status("server_encoding") == "UTF8"
        assert conn.execute("select pg_backend_pid()").fetchone() == (conn.info.backend_pid,)


def _dump(argv: list[str], env: dict[str, str]) -> str:
    """pg_dump's SQL without its per-run \\restrict key lines."""
    out = run(["pg_dump", "--schema=dump_src", "--no-sync", *argv], env).stdout
    return "\n".join(line for line in out.splitlines() if not line.startswith(("\\restrict",
                                                                               "\\unrestrict")))


def test_pg_dump_and_parallel_pg_restore_through_the_proxy(
    cluster: E2ECluster, alice: Person, tmp_path: Path
) -> None:
    """pg_dump gives through the proxy what it gives directly; a directory dump made with
    -j 2 (several sessions sharing one exported snapshot) restores with pg_restore -j 2."""
    assert cluster.pg is not None
    alice.query(
        "drop schema if exists dump_src cascade; create schema dump_src; "
        "create table dump_src.t (id serial primary key, j jsonb, b bytea, note text); "
        "insert into dump_src.t (j, b, note) select jsonb_build_object('g', g), "
        "decode(md5(g::text), 'hex'), 'ünïcödé ' || g from generate_series(1, 20000) g; "
        "create view dump_src.v as select count(*) from dump_src.t; "
        "create function dump_src.f(int) returns int language sql as 'select $1 + 1'; "
        "comment on table dump_src.t is 'dumped through the proxy'",
        dbname="bench",
    )
    direct = (
        f"host={cluster.pg.socket_dir} port={cluster.pg.port} user=postgres dbname=bench"
    )
    through = _dump(["-d", alice.dsn("bench")], alice.env)
    assert "dumped through the proxy" in through and "ünïcödé 20000" in through
    assert through == _dump(["-d", direct], alice.env)

    archive = tmp_path / "dir"
    run(["pg_dump", "--schema=dump_src", "-Fd", "-j", "2", "-f", str(archive), "-d",
         alice.dsn("bench")], alice.env)  # fmt: skip
    alice.query("drop schema dump_src cascade", dbname="bench")
    run(["pg_restore", "-j", "2", "-d", alice.dsn("bench"), str(archive)], alice.env)
    assert _dump(["-d", alice.dsn("bench")], alice.env) == through
    alice.query("drop schema dump_src cascade", dbname="bench")
