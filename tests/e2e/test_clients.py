"""Clients beyond psql, through the product's proxy exactly as directly: psycopg's pipeline
mode, binary COPY in, binary results, a server-side cursor, a server error's SQLSTATE, and
the connection's own information (server version, ParameterStatus, backend pid); pg_dump and
pg_restore, parallel ones included; the startup parameter `replication`."""

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


def _connect_outcome(dsn: str, **options: str) -> str:
    """What psycopg's libpq says of a connection: the protocol and user, or its error's
    first line (without the address, which differs between the two paths)."""
    try:
        with psycopg.connect(dsn, connect_timeout=10, **options) as conn:
            user = conn.execute("select current_user").fetchone()
            return f"protocol {conn.info.pgconn.protocol_version}, {user}"
    except psycopg.OperationalError as exc:
        return str(exc).splitlines()[0].rsplit(" failed: ", 1)[-1]


@pytest.mark.parametrize("options", [
    {"max_protocol_version": "latest"},
    {"max_protocol_version": "3.2"},
    {"min_protocol_version": "3.2"},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_libpq_18_protocol_negotiation_goes_as_directly(
    cluster: E2ECluster, alice: Person, options: dict[str, str]
) -> None:
    """libpq 18 (psycopg's) asking for protocol 3.2: PostgreSQL 15 answers
    NegotiateProtocolVersion with 3.0 and libpq goes on with 3.0, or stops with its own
    message when 3.2 is the least it accepts. Through the proxy exactly the same."""
    assert cluster.pg is not None
    if psycopg.pq.version() < 180000:
        pytest.skip(f"psycopg's libpq is {psycopg.pq.version()}: no protocol 3.2 to ask for")
    direct = f"host={cluster.pg.socket_dir} port={cluster.pg.port} user=alice dbname=bench"
    with alice.libpq_env():
        through = _connect_outcome(alice.dsn("bench"), **options)
    assert through == _connect_outcome(direct, **options)
    if "min_protocol_version" in options:
        assert "server only supports protocol version 3.0" in through
    else:
        assert through == "protocol 3, ('alice',)"


def test_direct_tls_of_postgresql_17_clients_through_the_proxy(
    cluster: E2ECluster, alice: Person
) -> None:
    """`sslnegotiation=direct` (libpq 17+): TLS from the first byte with the ALPN protocol
    "postgresql", on the web port that also serves the API (`tsh` logged in through it)."""
    if psycopg.pq.version() < 170000:
        pytest.skip(f"psycopg's libpq is {psycopg.pq.version()}: no direct TLS")
    with alice.libpq_env():
        assert _connect_outcome(alice.dsn("bench"), sslnegotiation="direct") == (
            "protocol 3, ('alice',)"
        )


@pytest.mark.parametrize("value", ["false", "off", "0"])
def test_replication_false_is_an_ordinary_session_as_directly(
    cluster: E2ECluster, alice: Person, value: str
) -> None:
    """PostgreSQL reads `replication` as a boolean: false is an ordinary session. A
    replication connection proper is refused by the proxy with a message of its own."""
    assert cluster.pg is not None
    direct = f"host={cluster.pg.socket_dir} port={cluster.pg.port} user=alice dbname=bench"
    assert _connect_outcome(direct, replication=value) == "protocol 3, ('alice',)"
    with alice.libpq_env():
        assert _connect_outcome(alice.dsn("bench"), replication=value) == (
            "protocol 3, ('alice',)"
        )
        refused = _connect_outcome(alice.dsn("bench"), replication="database")
    assert "replication connections are not supported through teleport-db" in refused
