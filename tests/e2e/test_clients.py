"""psycopg features beyond psql's, through the product's proxy exactly as directly: pipeline
mode, binary COPY in, binary results, a server-side cursor, a server error's SQLSTATE, and
the connection's own information (server version, ParameterStatus, backend pid)."""

from __future__ import annotations

import psycopg
import pytest

from tests.e2e.cluster import E2ECluster, Person

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
