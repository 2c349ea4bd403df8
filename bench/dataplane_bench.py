"""Benchmark the data path against direct PostgreSQL and pgbouncer, all in one run.

    python -m bench.dataplane_bench [--seconds 15] [--rounds 3] [--copy-mb 1024]
                                    [--idle 1000] [--only tps,latency,copy,idle]

Everything is the product as people run it, as separate processes on this machine:
- direct-TLS: pgbench to PostgreSQL over TLS with a client certificate (cert auth);
- pgbouncer-TLS: Debian's pgbouncer (session pooling) with client TLS and cert auth,
  talking to PostgreSQL over its local socket (installed with apt-get when missing);
- distributed: `teleport start --roles=auth`, `teleport-agent run --role=proxy` and
  `teleport-agent run --role=db` as three processes, TLS on every leg (client -> proxy,
  proxy -> agent over the reverse tunnel, agent -> PostgreSQL);
- all-in-one: `teleport start --roles=proxy,auth,db`, one process: the proxy hands the
  connection to the agent in-process (TLS client -> proxy and agent -> PostgreSQL).
Users log in with the real `tsh login` / `tsh db login`, and pgbench and psql connect with
`service=...` as seed 001 shows.

Measured (medians of `--rounds` interleaved rounds; ratios to direct-TLS of the same run):
- `pgbench -S -n -j 2` TPS at 1, 8 and 32 clients, and `-C -c 8` connections per second;
- per-transaction latency p50/p99 at 1 client (pgbench's log);
- `COPY (...) TO STDOUT` of --copy-mb MB through each path, MB/s;
- the agent's resident memory with --idle idle sessions open through the proxy;
- at 8 clients, the CPU time per transaction of each path's processes and of the rest of
  the machine (pgbench, PostgreSQL, the kernel), and the share left idle: where the time
  goes, and so why the ratios are what they are on this machine.
Targets of issue 5: distributed >= 0.25x direct-TLS TPS at 8 clients; all-in-one >= 0.35x;
`-C` >= 0.5x direct-TLS connections per second; COPY >= 0.5x direct throughput.
The agents run with their defaults, so with `-C` (a client that reconnects) they keep the
server connection of each session that ended cleanly for the next one
(db_service.server_idle_timeout, 3 s), as pgbouncer keeps its server connections.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from control.ca import CertificateAuthority, certificate_pem
from launcher.embedded_postgres import EmbeddedPostgres, HostRule, ServerTLS, free_tcp_port
from transport.tls import new_private_key, private_key_pem

BIN = Path(sys.executable).parent
PASSWORD = "bench password 1"
TOKEN = "bench-static-token-0123456789abcdef"


def run(
    argv: list[str] | str, env: dict[str, str], *, stdin: str | None = None, timeout: int = 600
) -> str:
    proc = subprocess.run(
        argv,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        shell=isinstance(argv, str),
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"a service exited early (code {proc.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear in {timeout}s")
        time.sleep(0.1)


@dataclass
class Target:
    """One way to reach the database: a name and the libpq conninfo pgbench/psql use."""

    name: str
    conninfo: str
    env: dict[str, str]
    pid: int | None = None  # the process whose memory is measured (agent)
    # The processes of this path (name -> pid) whose CPU time is counted per transaction
    # (see `cpu_table`).
    processes: dict[str, int] = field(default_factory=dict)


@dataclass
class Bench:
    root: Path
    pg: EmbeddedPostgres
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    targets: dict[str, Target] = field(default_factory=dict)

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        return env

    def spawn(self, argv: list[str], log: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        out = (self.root / f"{log}.log").open("wb")
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


# --- setting up each path ------------------------------------------------------------------
# One cluster: `teleport start --roles=proxy,auth,db` (the all-in-one path, database
# `bench`) is also the control plane; a second proxy and agent, `teleport-agent run`
# processes joined to it, serve database `bench-dist` (the distributed path). One db CA
# signs PostgreSQL's certificate and every agent's client certificates.


def cluster_config(path: Path, web: int, tunnel: int, auth: int | None) -> None:
    auth_part = (
        f"""auth_service:
  enabled: yes
  cluster_name: bench
  listen_addr: 127.0.0.1:{auth}
  tokens: ["proxy,db:{TOKEN}"]
"""
        if auth
        else ""
    )
    path.write_text(
        f"""teleport:
  nodename: localhost
{auth_part}proxy_service:
  enabled: yes
  web_listen_addr: 127.0.0.1:{web}
  tunnel_listen_addr: 127.0.0.1:{tunnel}
  public_addr: localhost:{web}
  tunnel_public_addr: 127.0.0.1:{tunnel}
"""
    )


def prepare(root: Path) -> Bench:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["TELEPORT_HOME"] = str(root / "tsh")
    env["PGSERVICEFILE"] = str(root / "pg_service.conf")
    data = root / "cluster"
    certs = root / "certs"
    certs.mkdir()
    web, tunnel, auth, web2, tunnel2, pg_port = free_ports(6)

    # The cluster first: its db CA signs PostgreSQL's certificate (seed 001's tctl auth sign).
    cluster_config(root / "teleport.yaml", web, tunnel, auth)
    argv = [
        str(BIN / "teleport"), "start", "--roles=proxy,auth,db", "--config",
        str(root / "teleport.yaml"), "--data-dir", str(data), "--db-name=bench",
        "--db-protocol=postgres", f"--db-uri=localhost:{pg_port}", "--labels=env=bench",
    ]  # fmt: skip
    b = Bench(root, pg=None)  # type: ignore[arg-type]
    allinone = b.spawn(argv, "allinone", env)
    wait_file(data / "run" / "api.json", allinone)
    run(
        [str(BIN / "tctl"), "auth", "sign", "--format=db", "--host=localhost",
         f"--out={certs / 'server'}", "--ttl=24h", f"--data-dir={data}"],
        env,
    )  # fmt: skip
    _client_cert(data, certs)
    b.pg = start_postgres(certs, pg_port)

    # The distributed path: a proxy and an agent of their own, joined with a token.
    status = run([str(BIN / "tctl"), "status", "--data-dir", str(data)], env)
    pin = re.search(r"(sha256:[0-9a-f]{64})", status)
    assert pin is not None, status
    common = [f"--auth-server=127.0.0.1:{auth}", f"--token={TOKEN}", f"--ca-pin={pin.group(1)}"]
    cluster_config(root / "proxy.yaml", web2, tunnel2, None)
    proxy = b.spawn(
        [str(BIN / "teleport-agent"), "run", "--role=proxy", "--config", str(root / "proxy.yaml"),
         "--data-dir", str(root / "proxy"), *common],
        "dist-proxy", env,
    )  # fmt: skip
    agent = b.spawn(
        [str(BIN / "teleport-agent"), "run", "--role=db", "--data-dir", str(root / "agent"),
         "--db-name=bench-dist", "--db-protocol=postgres", f"--db-uri=localhost:{pg_port}",
         "--labels=env=bench", *common],
        "dist-agent", env,
    )  # fmt: skip

    login(env, data, ["bench", "bench-dist"])
    b.targets["direct-TLS"] = Target("direct-TLS", _direct(pg_port, certs, "alice"), env)
    b.targets["pgbouncer-TLS"] = start_pgbouncer(b, certs, env)
    b.targets["distributed"] = Target(
        "distributed",
        f"service=bench-bench-dist host=localhost port={web2} user=alice dbname=bench",
        env,
        pid=agent.pid,
        # The all-in-one process is the distributed path's control plane: it takes in the
        # agent's audit events, one per transaction here.
        processes={"proxy": proxy.pid, "agent": agent.pid, "teleport start": allinone.pid},
    )
    b.targets["all-in-one"] = Target(
        "all-in-one",
        "service=bench-bench user=alice dbname=bench",
        env,
        pid=allinone.pid,
        processes={"teleport start": allinone.pid},
    )
    run(["pgbench", "-i", "-s", "10", "-q", b.targets["direct-TLS"].conninfo], env, timeout=900)
    return b


def start_postgres(certs: Path, port: int) -> EmbeddedPostgres:
    pg = EmbeddedPostgres.temporary(
        prefix="bench-pg-",
        port=port,
        tls=ServerTLS(certs / "server.crt", certs / "server.key", certs / "server.cas"),
        fsync=False,
        max_connections=1300,
        shared_buffers="256MB",
        host_rules=(HostRule("cert"),),
        settings={"max_prepared_transactions": 16},  # client suites test two-phase commit
    )
    pg.start()
    pg.create_role("alice")
    pg.create_database("bench", owner="alice")
    return pg


def _client_cert(data_dir: Path, certs: Path) -> None:
    """A db-CA client certificate for alice (CN = alice) for the direct and pgbouncer
    clients, as an agent gets one."""
    ca = CertificateAuthority.load(data_dir, "db")
    key = new_private_key()
    cert = ca.issue_db_client(key.public_key(), "alice", timedelta(hours=24))
    (certs / "alice.crt").write_bytes(certificate_pem(cert))
    fd = os.open(certs / "alice.key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_key_pem(key))


def _direct(port: int, certs: Path, user: str) -> str:
    return (
        f"host=localhost hostaddr=127.0.0.1 port={port} user={user} dbname=bench "
        f"sslmode=verify-full sslrootcert={certs / 'server.cas'} "
        f"sslcert={certs / 'alice.crt'} sslkey={certs / 'alice.key'}"
    )


def login(env: dict[str, str], data_dir: Path, databases: list[str]) -> None:
    """alice signs up (tctl users add's line), then tsh db login to each database."""
    out = run(
        [str(BIN / "tctl"), "users", "add", "alice", "--db-names=bench", "--db-users=alice",
         f"--data-dir={data_dir}"],
        env,
    )  # fmt: skip
    signup = re.search(r"(tsh login --proxy=\S+ --user=alice .*--signup-token=\S+)", out)
    assert signup is not None, out
    _retry(lambda: run(signup.group(1), env, stdin=PASSWORD + "\n"), "alice's signup")
    for name in databases:
        _retry(
            lambda name=name: _require(name in run([str(BIN / "tsh"), "db", "ls"], env)),
            f"an agent serving {name}",
        )
        run([str(BIN / "tsh"), "db", "login", name], env)


def wait_answers(target: Target, timeout: float = 30, conninfo: str | None = None) -> None:
    """Until psql gets an answer through `target` (with `conninfo` in place of its own)."""
    deadline = time.monotonic() + timeout
    while True:
        done = subprocess.run(
            ["psql", "-X", "-At", "-c", "select 1", conninfo or target.conninfo],
            env=target.env, capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip
        if done.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name} does not answer: {done.stderr.strip()}")
        time.sleep(0.3)


def _require(ok: bool) -> None:
    if not ok:
        raise RuntimeError("not yet")


def _retry(fn: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fn()
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}") from None
            time.sleep(0.3)


def apt_install(package: str, what: str, env: dict[str, str]) -> None:
    """Install a Debian package the benchmark needs and the machine lacks."""
    print(f"installing Debian's {package} ({what}) ...", flush=True)
    run(f"DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {package}", env)


def start_pgbouncer(b: Bench, certs: Path, env: dict[str, str]) -> Target:
    if shutil.which("pgbouncer") is None and not Path("/usr/sbin/pgbouncer").exists():
        apt_install("pgbouncer", "the pooler compared with", env)
    exe = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    root = Path(tempfile.mkdtemp(prefix="bench-pgbouncer-"))
    port = free_tcp_port()
    for name in ("server.crt", "server.key", "server.cas"):
        shutil.copy(certs / name, root / name)
    (root / "userlist.txt").write_text('"alice" ""\n')
    (root / "pgbouncer.ini").write_text(
        f"""[databases]
bench = host={b.pg.socket_dir} port={b.pg.port} dbname=bench user=alice
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = cert
auth_file = {root / "userlist.txt"}
pool_mode = session
max_client_conn = 2000
default_pool_size = 100
client_tls_sslmode = verify-full
client_tls_key_file = {root / "server.key"}
client_tls_cert_file = {root / "server.crt"}
client_tls_ca_file = {root / "server.cas"}
logfile = {root / "pgbouncer.log"}
pidfile = {root / "pgbouncer.pid"}
"""
    )
    # pgbouncer refuses root; as PostgreSQL's own OS user it can use the local socket.
    user = b.pg.user
    os.chmod(root, 0o755)
    for path in [root, *root.iterdir()]:
        os.chown(path, user.uid, user.gid)
    os.chmod(root / "server.key", 0o600)
    as_root = os.geteuid() == 0
    proc = subprocess.Popen(
        [exe, str(root / "pgbouncer.ini")],
        user=user.uid if as_root else None,
        group=user.gid if as_root else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    b.procs.append(proc)
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"pgbouncer did not start; see {root / 'pgbouncer.log'}")
        time.sleep(0.1)
    conninfo = _direct(port, certs, "alice")
    return Target("pgbouncer-TLS", conninfo, env, processes={"pgbouncer": proc.pid})


# --- measurements --------------------------------------------------------------------------


def pgbench_select(
    t: Target, seconds: int, clients: int, extra: Sequence[str] = ()
) -> tuple[float, int]:
    """TPS and the number of transactions processed of one `pgbench -S -j 2` run."""
    out = run(
        ["pgbench", "-n", "-S", "-c", str(clients), "-j", "2", "-T", str(seconds), *extra,
         t.conninfo],
        t.env, timeout=seconds * 4 + 60,
    )  # fmt: skip
    tps = re.search(r"tps = ([0-9.]+)", out)
    done = re.search(r"number of transactions actually processed: (\d+)", out)
    if tps is None or done is None:
        raise RuntimeError(f"unexpected pgbench output:\n{out}")
    return float(tps.group(1)), int(done.group(1))


def latency(t: Target, seconds: int, workdir: Path) -> tuple[float, float]:
    logdir = workdir / f"lat-{t.name}"
    logdir.mkdir(exist_ok=True)
    run(
        ["pgbench", "-n", "-S", "-c", "1", "-j", "1", "-T", str(seconds), "-l",
         "--log-prefix", str(logdir / "log"), t.conninfo],
        t.env, timeout=seconds * 4 + 60,
    )  # fmt: skip
    values = []
    for path in logdir.glob("log*"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                values.append(int(parts[2]) / 1000.0)  # µs -> ms
        path.unlink()
    values.sort()
    return values[len(values) // 2], values[min(len(values) - 1, int(len(values) * 0.99))]


def copy_rate(t: Target, mb: int) -> float:
    rows = mb * 1024  # 1 KiB rows
    sql = f"COPY (SELECT repeat('x', 1020) FROM generate_series(1, {rows})) TO STDOUT"
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["psql", "-X", "-c", sql, t.conninfo],
        env=t.env,
        stdout=subprocess.DEVNULL,  # psql writes the rows; nothing is kept in memory here
        stderr=subprocess.PIPE,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"COPY through {t.name} failed: {proc.stderr.decode()[-1000:]}")
    return rows * 1021 / elapsed / 1e6  # 1020 characters and a newline per row


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time used so far, in clock ticks: by each named process (user and system, all
    its threads) and by the whole machine (`busy` of `total`, every CPU)."""

    processes: dict[str, int]
    busy: int
    total: int

    @classmethod
    def take(cls, pids: dict[str, int]) -> CpuSnapshot:
        processes = {}
        for name, pid in pids.items():
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()  # from field 3, the state
            processes[name] = int(fields[11]) + int(fields[12])  # utime, stime
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        idle = cpu[3] + cpu[4]  # idle, iowait
        return cls(processes, sum(cpu) - idle, sum(cpu))


@dataclass(frozen=True)
class CpuUse:
    """One run's CPU time per transaction, in µs: each of the path's processes, and the
    rest of the machine (pgbench, PostgreSQL, and the kernel's work outside the named
    processes); `idle` is the share of all CPUs' time left unused."""

    processes: dict[str, float]
    rest: float
    idle: float

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot, transactions: int) -> CpuUse:
        def per_txn(ticks: int) -> float:
            return ticks / TICKS_PER_SECOND / max(transactions, 1) * 1e6

        used = {n: per_txn(after.processes[n] - ticks) for n, ticks in before.processes.items()}
        busy = per_txn(after.busy - before.busy)
        idle = 1 - (after.busy - before.busy) / max(after.total - before.total, 1)
        return cls(used, busy - sum(used.values()), idle)


def idle_sessions(t: Target, count: int) -> tuple[float, float, float]:
    import psycopg  # noqa: PLC0415 - a test dependency, only this measurement needs it

    assert t.pid is not None
    before = rss_mb(t.pid)
    env_backup = dict(os.environ)
    os.environ["PGSERVICEFILE"] = t.env["PGSERVICEFILE"]
    conns = []
    t0 = time.perf_counter()
    try:
        for _ in range(count):
            conns.append(psycopg.connect(t.conninfo))
        opened = time.perf_counter() - t0
        time.sleep(2)
        after = rss_mb(t.pid)
        with conns[-1].cursor() as cur:
            cur.execute("select 1")
    finally:
        for c in conns:
            c.close()
        os.environ.clear()
        os.environ.update(env_backup)
    return before, after, opened


# --- the run -------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--copy-mb", type=int, default=1024)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--only", default="tps,latency,copy,idle")
    args = parser.parse_args()
    only = set(args.only.split(","))

    root = Path(tempfile.mkdtemp(prefix="bench-dataplane-"))
    print(f"working in {root}", flush=True)
    bench: Bench | None = None
    try:
        bench = prepare(root)
        targets = bench.targets
        order = ["direct-TLS", "pgbouncer-TLS", "distributed", "all-in-one"]
        if "tps" in only:
            tps_table(targets, order, args)
        if "latency" in only:
            print("\nLatency at 1 client (pgbench -S -c 1), ms", flush=True)
            print(f"{'path':<16}{'p50':>8}{'p99':>8}")
            for name in order:
                p50, p99 = latency(targets[name], args.seconds, root)
                print(f"{name:<16}{p50:>8.3f}{p99:>8.3f}", flush=True)
        if "copy" in only:
            copy_table(targets, args)
        if "idle" in only:
            print(f"\nAgent memory with {args.idle} idle sessions through the proxy", flush=True)
            for name in ("distributed", "all-in-one"):
                before, after, opened = idle_sessions(targets[name], args.idle)
                print(
                    f"{name:<16} RSS {before:.0f} MB -> {after:.0f} MB "
                    f"({(after - before) * 1024 / args.idle:.1f} KB per session); "
                    f"{args.idle} sessions opened in {opened:.1f}s",
                    flush=True,
                )
    finally:
        if bench is not None:
            bench.stop()
            if bench.pg is not None:
                bench.pg.stop()
                bench.pg.destroy()
        print(f"\nlogs and files: {root}")


def tps_table(
    targets: dict[str, Target],
    order: list[str],
    args: argparse.Namespace,
) -> None:
    cases: list[tuple[str, int, list[str]]] = [
        ("c1", 1, []),
        ("c8", 8, []),
        ("c32", 32, []),
        ("-C c8", 8, ["-C"]),
    ]
    results: dict[tuple[str, str], list[float]] = {}
    cpu: dict[str, list[CpuUse]] = {}
    for rnd in range(args.rounds):
        for case, clients, extra in cases:
            # Interleave: each case runs every path back to back, rotating the order.
            rotated = order[rnd % len(order) :] + order[: rnd % len(order)]
            for name in rotated:
                target = targets[name]
                before = CpuSnapshot.take(target.processes) if case == "c8" else None
                tps, done = pgbench_select(target, args.seconds, clients, extra)
                if before is not None:
                    after = CpuSnapshot.take(target.processes)
                    cpu.setdefault(name, []).append(CpuUse.between(before, after, done))
                results.setdefault((name, case), []).append(tps)
                print(f"  round {rnd + 1} {case:<6} {name:<14} {tps:>9.0f}", flush=True)
    print(
        f"\npgbench -S -n -j 2, {args.seconds}s per run, median of {args.rounds} interleaved "
        "rounds (TPS; -C: connections/s); ratio to direct-TLS in brackets"
    )
    header = f"{'path':<16}" + "".join(f"{c[0]:>18}" for c in cases)
    print(header)
    for name in order:
        cells = []
        for case, _, _ in cases:
            value = median(results[(name, case)])
            base = median(results[("direct-TLS", case)])
            cells.append(f"{value:>10.0f} ({value / base:4.2f}x)")
        print(f"{name:<16}" + "".join(f"{c:>18}" for c in cells), flush=True)
    cpu_table(cpu, order, {n: median(results[(n, "c8")]) for n in order})


def cpu_table(cpu: dict[str, list[CpuUse]], order: list[str], tps: dict[str, float]) -> None:
    """Where the CPU time of a transaction goes on each path, at 8 clients: what sets the
    ratios above. A path's own processes cost what the others do not; `rest` grows with
    each TCP leg (the kernel's work for it) and `idle` with each process to wake."""
    names = list(dict.fromkeys(p for name in order for p in cpu[name][0].processes))
    print(
        f"\nCPU time per transaction at 8 clients, µs (medians of {len(cpu[order[0]])} rounds; "
        "user and system time from /proc)\nrest: pgbench, PostgreSQL and the kernel's work "
        "outside the named processes; idle: the share of all CPUs' time unused.\n"
        "For distributed, `teleport start` is its control plane, taking in one audit event "
        "per transaction."
    )
    print(
        f"{'path':<16}{'TPS':>7}"
        + "".join(f"{n:>16}" for n in names)
        + f"{'rest':>8}{'total':>8}{'idle':>7}"
    )
    for name in order:
        uses = cpu[name]
        cells = []
        for process in names:
            values = [u.processes[process] for u in uses if process in u.processes]
            cells.append(f"{median(values):>16.1f}" if values else f"{'-':>16}")
        rest = median([u.rest for u in uses])
        total = median([u.rest + sum(u.processes.values()) for u in uses])
        idle = median([u.idle for u in uses])
        print(
            f"{name:<16}{tps[name]:>7.0f}"
            + "".join(cells)
            + f"{rest:>8.1f}{total:>8.1f}{idle:>7.1%}",
            flush=True,
        )


def copy_table(targets: dict[str, Target], args: argparse.Namespace) -> None:
    print(f"\nCOPY ... TO STDOUT of {args.copy_mb} MB through psql, MB/s", flush=True)
    rates: dict[str, list[float]] = {}
    names = ["direct-TLS", "distributed", "all-in-one"]
    for _ in range(max(1, args.rounds)):
        for name in names:
            rates.setdefault(name, []).append(copy_rate(targets[name], args.copy_mb))
    base = median(rates["direct-TLS"])
    for name in names:
        value = median(rates[name])
        print(f"{name:<16}{value:>8.0f} MB/s ({value / base:4.2f}x)", flush=True)


if __name__ == "__main__":
    main()
