"""The cost of audit on the data path: `pgbench -S -c 8 -j 2`, audit on vs off, one run.

    python -m bench.audit_bench [--seconds 15] [--rounds 3] [--clients 8] [--scale 10]
                                [--baseline DIR]
    python -m bench.audit_bench --micro

The product has no switch to turn audit off, on purpose: every session through a db agent
is recorded and shipped to the control plane. So "off" is measured with the data-path test
harness (`tests/dataplane/node.py`): the same ProxyService and AgentService classes in
their own processes, over the same reverse tunnel and TLS legs, without the product's
cluster link (joins, heartbeats, bundle feed) and with the audit sink chosen by its config.
Four targets share one PostgreSQL (TLS, cert auth):

- direct-TLS            pgbench to PostgreSQL itself: the ceiling;
- harness, audit off    proxy + agent processes (harness), no audit sink: nothing is
                        parsed beside the copy, no event is built;
- harness, audit count  the same, each event built (side parse, outcome tracking, the
                        pydantic model) and counted, never stored: the recording cost;
- product, audit on     `teleport start --roles=auth`, `teleport-agent run --role=proxy`
                        and `--role=db` (the tests/e2e cluster): events shipped in batches
                        through the agent's disk spool to the control plane, which dedupes,
                        hash-chains and fsyncs them to the day file.

With `--baseline DIR` (the top directory of another checkout of the product, e.g. made with
`git worktree add /tmp/base <commit>`), a fifth target, "product, baseline", is a second
product cluster whose processes run that checkout's code (`PYTHONPATH=DIR`): a change to the
product is measured against what it replaces in the same run, TPS and CPU per transaction
of each process side by side.

`--micro` measures the audit pipeline's own pieces in this process instead, with no
PostgreSQL and no network: CPU per event of the control plane's `AuditStore.append_body`
(validate the body, serialize each event, chain, write, fsync; 320-event batches as agents
send them), of `verify_log` per record, and of the agent's `AuditShipper` from `emit` to the
request body (the network not counted).

Rounds are interleaved (each round runs every target, the order rotated), and the table
shows each target's median TPS, its ratio to direct-TLS and to "harness, audit off". The
audit overhead is the drop from "harness, audit off" to "harness, audit count" (recording)
and to "product, audit on" (recording, shipping and storing, plus what else the product
process does). The control plane's log is counted before and after, to show that every
product transaction was stored.

Never asserts anything: numbers for people to read. The machine may be shared; compare
targets within one run only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.dataplane_bench import Target, pgbench_select, wait_answers
from control.audit_store import INDEX_FILE, AuditStore, day_files, verify_log
from control.ca import certificate_pem
from dataplane.audit import AuditShipper, SendJson
from launcher.embedded_postgres import ServerTLS
from schemas.api import AuditAck, AuditBatch
from schemas.audit import AuditEvent
from tests.audit.conftest import numbered_events
from tests.dataplane.node import start_node
from tests.dataplane.support import Pki, conninfo_for, make_bundle, role, sign, write_private
from tests.e2e.cluster import E2ECluster, base_env, run
from tests.fixtures.pg import conninfo
from transport.tls import new_private_key, private_key_pem

ORDER = ["direct-TLS", "harness, audit off", "harness, audit count", "product, audit on"]
OFF = "harness, audit off"
PRODUCT = "product, audit on"
BASELINE = "product, baseline"


class Setup:
    """The product's cluster, the harness's processes, and the targets pgbench runs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.cluster: E2ECluster | None = None
        self.baseline: E2ECluster | None = None
        self.nodes: list[subprocess.Popen[str]] = []
        self.targets: dict[str, Target] = {}
        self.pids: dict[str, dict[str, int | None]] = {}  # target -> process name -> pid

    def start(self, scale: int) -> None:
        self.cluster = cluster = E2ECluster.create(self.root / "cluster")
        assert cluster.pg is not None and cluster.agent is not None
        alice = cluster.add_person("alice", ["alice"], ["bench"])
        pg_tls = cluster.root / "pg-tls"

        # The harness has CAs of its own: PostgreSQL also trusts its db CA for client
        # certificates, and its agent verifies PostgreSQL with the cluster's server.cas.
        pki = Pki(self.root / "pki")
        clients_ca = self.root / "pg-client-cas.pem"
        clients_ca.write_bytes((pg_tls / "server.cas").read_bytes() + pki.db_ca_file.read_bytes())
        cluster.pg.tls = ServerTLS(pg_tls / "server.crt", pg_tls / "server.key", clients_ca)
        cluster.pg.reload()
        time.sleep(1)

        key = new_private_key()
        cert = pki.cas.db.issue_db_client(key.public_key(), "alice", timedelta(hours=4))
        (self.root / "alice.crt").write_bytes(certificate_pem(cert))
        write_private(self.root / "alice.key", private_key_pem(key))
        env = base_env()
        direct = conninfo(
            host="localhost", hostaddr="127.0.0.1", port=cluster.pg.port, user="alice",
            dbname="bench", sslmode="verify-full", sslrootcert=str(pg_tls / "server.cas"),
            sslcert=str(self.root / "alice.crt"), sslkey=str(self.root / "alice.key"),
            gssencmode="disable",
        )  # fmt: skip
        print(f"pgbench -i -s {scale} ...", flush=True)
        run(["pgbench", "-i", "-s", str(scale), "-q", direct], env, timeout=900)
        self.targets["direct-TLS"] = Target("direct-TLS", direct, env)

        signing = Ed25519PrivateKey.generate()
        bundle = make_bundle(pki, serial=1, roles=[role("admin")], users={"alice": ["admin"]})
        (self.root / "bundle").write_bytes(sign(bundle, signing))
        public = signing.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        route = pki.route_cert("alice", ["admin"], "pg")
        for audit, name in (("none", OFF), ("count", "harness, audit count")):
            common = {
                "pki_base": str(pki.base),
                "bundle": str(self.root / "bundle"),
                "signing_public": base64.b64encode(public).decode(),
                "audit": audit,
                "databases": [
                    {
                        "name": "pg",
                        "uri": f"localhost:{cluster.pg.port}",
                        "ca_cert_file": str(pg_tls / "server.cas"),
                    }
                ],
            }
            proxy, ports = start_node(
                {**common, "role": "proxy", "host_id": f"proxy-{audit}",
                 "tunnel": ["127.0.0.1", 0]},
                self.root, f"proxy-{audit}",
            )  # fmt: skip
            self.nodes.append(proxy)
            agent, _ = start_node(
                {**common, "role": "agent", "host_id": f"agent-{audit}",
                 "proxies": [f"127.0.0.1:{ports['tunnel']}"]},
                self.root, f"agent-{audit}",
            )  # fmt: skip
            self.nodes.append(agent)
            dsn = conninfo_for(ports["web"], route, pki.host_ca_file, "alice", "bench")
            self.targets[name] = Target(name, dsn, env)
            self.pids[name] = {"proxy": proxy.pid, "agent": agent.pid}
        self.targets["product, audit on"] = Target(
            "product, audit on", alice.dsn("bench"), alice.env, pid=cluster.agent.pid
        )
        self.pids["product, audit on"] = {s.name: s.pid for s in cluster.services()}
        for target in self.targets.values():  # every path answers before measuring
            wait_answers(target)

    def start_baseline(self, checkout: Path, scale: int) -> None:
        """A second product cluster running the code of `checkout`: its processes inherit
        PYTHONPATH from our environment while they are started."""
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(checkout)
        try:
            self.baseline = cluster = E2ECluster.create(self.root / "baseline")
            alice = cluster.add_person("alice", ["alice"], ["bench"])
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
        print(f"pgbench -i -s {scale} (baseline, through its proxy) ...", flush=True)
        run(["pgbench", "-i", "-s", str(scale), "-q", alice.dsn("bench")], alice.env, timeout=900)
        target = Target(BASELINE, alice.dsn("bench"), alice.env)
        wait_answers(target)
        self.targets[BASELINE] = target
        self.pids[BASELINE] = {s.name: s.pid for s in cluster.services()}

    def stored_events(self, cluster: E2ECluster | None = None) -> int:
        cluster = cluster or self.cluster
        assert cluster is not None
        return sum(path.read_bytes().count(b"\n") for path in cluster.audit_dir.glob("*.jsonl"))

    def cpu(self, target: str) -> dict[str, float]:
        """CPU seconds so far of the processes serving `target` (none for direct-TLS)."""
        return {name: cpu_seconds(pid) for name, pid in self.pids.get(target, {}).items()}

    def stop(self) -> None:
        for proc in self.nodes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.nodes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        for cluster in (self.cluster, self.baseline):
            if cluster is not None:
                cluster.close()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (/proc/PID/stat), 0 if unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def settled(count: Callable[[], int], timeout: float = 60) -> int:
    """`count()` once it stopped growing for 2 s (the agent's spool has drained)."""
    deadline = time.monotonic() + timeout
    last = count()
    while time.monotonic() < deadline:
        time.sleep(2)
        now = count()
        if now == last:
            return now
        last = now
    return last


def micro(batches: int = 40, per_batch: int = 320) -> None:
    """Per-event CPU of the pipeline's pieces (see `--micro` in the module docstring)."""
    events = numbered_events(batches * per_batch)
    groups = [events[i * per_batch : (i + 1) * per_batch] for i in range(batches)]
    bodies = [AuditBatch(events=group).model_dump_json().encode() for group in groups]
    with tempfile.TemporaryDirectory(prefix="bench-audit-micro-") as tmp:
        cpu = []
        with AuditStore(Path(tmp) / "audit") as store:
            for body in bodies:
                started = time.process_time()
                store.append_body(body, "agent-1")
                cpu.append(time.process_time() - started)
        print(f"control plane, AuditStore.append_body: {_us(statistics.median(cpu), per_batch)}"
              f" us/event ({per_batch}-event batches, fsync included)")
        started = time.process_time()
        report = verify_log(Path(tmp) / "audit")
        print(f"verify_log: {_us(time.process_time() - started, report.records)} us/record "
              f"({report.records} records, {'intact' if report.ok else 'NOT intact'})")
        print(_restart(Path(tmp) / "audit"))
        costs = [asyncio.run(_ship(Path(tmp) / f"spool-{i}", events, per_batch))
                 for i in range(3)]
        print(f"agent, AuditShipper: {statistics.median(costs):.1f} us/event "
              "(emit to request body, no network)")


def _restart(directory: Path) -> str:
    """How long the control plane's store takes to open the log in `directory`: from its
    index checkpoint (INDEX.json, written at close), then rebuilding the index from the
    day files (the checkpoint removed)."""
    size = sum(path.stat().st_size for _, path in day_files(directory))

    def opened() -> float:
        started = time.perf_counter()
        AuditStore(directory).close()
        return time.perf_counter() - started

    with_checkpoint = statistics.median(opened() for _ in range(3))
    rebuilt = []
    for _ in range(3):
        (directory / INDEX_FILE).unlink()
        rebuilt.append(opened())
    return (f"control plane start, audit log of {size / 1e6:.1f} MB: "
            f"{with_checkpoint * 1e3:.1f} ms from the index checkpoint, "
            f"{statistics.median(rebuilt) * 1e3:.1f} ms rebuilding the index from the files")


async def _ship(spool: Path, events: list[AuditEvent], per_batch: int) -> float:
    async def post(body: bytes) -> AuditAck:
        return AuditAck(accepted=body.count(b'"id":'))

    shipper = AuditShipper(SendJson(post), spool, batch_events=per_batch, batch_bytes=1 << 30,
                           max_memory_events=len(events) + 1, interval=0.0)
    await shipper.start()
    started = time.process_time()
    for event in events:
        shipper.emit(event)
    if not await shipper.flush(120):
        raise RuntimeError("the shipper did not deliver every event")
    used = time.process_time() - started
    await shipper.close()
    return used / len(events) * 1e6


def _us(seconds: float, count: int) -> str:
    return f"{seconds / count * 1e6:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=15, help="per pgbench run (15)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (3)")
    parser.add_argument("--clients", type=int, default=8, help="pgbench -c (8)")
    parser.add_argument("--scale", type=int, default=10, help="pgbench -i -s (10)")
    parser.add_argument("--baseline", metavar="DIR", type=Path,
                        help="another checkout of the product, run as a second product cluster")
    parser.add_argument("--micro", action="store_true",
                        help="only the pipeline's pieces in this process (no PostgreSQL)")
    args = parser.parse_args()
    if args.micro:
        micro()
        return
    order = ORDER + ([BASELINE] if args.baseline else [])
    if args.baseline and not (args.baseline / "control" / "audit_store.py").is_file():
        parser.error(f"--baseline {args.baseline}: not the top directory of a checkout of "
                     "the product (no control/audit_store.py there)")

    root = Path(tempfile.mkdtemp(prefix="bench-audit-"))
    print(f"working in {root}", flush=True)
    setup = Setup(root)
    results: dict[str, list[float]] = {name: [] for name in order}
    done: dict[str, int] = {}
    cpu: dict[str, dict[str, float]] = {}
    try:
        setup.start(args.scale)
        if args.baseline:
            setup.start_baseline(args.baseline.resolve(), args.scale)
        before = setup.stored_events()
        before_baseline = setup.stored_events(setup.baseline) if setup.baseline else 0
        for rnd in range(args.rounds):
            rotated = order[rnd % len(order) :] + order[: rnd % len(order)]
            for name in rotated:
                before_cpu = setup.cpu(name)
                tps, processed = pgbench_select(setup.targets[name], args.seconds, args.clients)
                results[name].append(tps)
                done[name] = done.get(name, 0) + processed
                for process, seconds in setup.cpu(name).items():
                    used = cpu.setdefault(name, {})
                    used[process] = used.get(process, 0.0) + seconds - before_cpu[process]
                print(f"  round {rnd + 1}  {name:<22} {tps:>9.0f} TPS", flush=True)
        stored = settled(setup.stored_events) - before
        stored_baseline = (
            settled(lambda: setup.stored_events(setup.baseline)) - before_baseline
            if setup.baseline else 0
        )  # fmt: skip
    finally:
        setup.stop()

    medians = {name: statistics.median(values) for name, values in results.items()}
    print(
        f"\npgbench -S -n -c {args.clients} -j 2, {args.seconds}s per run, median of "
        f"{args.rounds} interleaved rounds"
    )
    print(f"{'target':<24}{'TPS':>10}{'vs direct':>12}{'vs audit off':>14}   runs")
    for name in order:
        value = medians[name]
        runs = ", ".join(f"{v:.0f}" for v in results[name])
        print(
            f"{name:<24}{value:>10.0f}{value / medians['direct-TLS']:>11.2f}x"
            f"{value / medians[OFF]:>13.2f}x   [{runs}]"
        )
    recording = 1 - medians["harness, audit count"] / medians[OFF]
    total = 1 - medians["product, audit on"] / medians[OFF]
    print(
        f"\naudit overhead: building the events costs {recording:.1%} of the audit-off TPS "
        f"(harness count vs off); the product, which also ships and stores them, runs "
        f"{total:.1%} below the audit-off harness"
    )
    sessions = args.rounds * (args.clients + 1)  # pgbench opens one more to check tables
    print(
        f"control plane log: {stored} records stored while the product ran "
        f"{done[PRODUCT]} "
        f"transactions (one query event each) in {sessions} sessions (a start and an end "
        f"event each, and pgbench's few queries when it checks the tables)"
    )
    if args.baseline:
        print(f"baseline's log: {stored_baseline} records stored while it ran "
              f"{done[BASELINE]} transactions")
    print("\nCPU per transaction of the processes on the path (microseconds):")
    for name in order[1:]:
        shown = ", ".join(
            f"{process} {seconds / done[name] * 1e6:.0f}" for process, seconds in cpu[name].items()
        )
        print(f"  {name:<22} {shown}")
    if args.baseline:
        per = {name: {p: s / done[name] * 1e6 for p, s in cpu[name].items()}
               for name in (PRODUCT, BASELINE)}
        changes = ", ".join(
            f"{process} {per[BASELINE][process]:.0f} -> {per[PRODUCT][process]:.0f}"
            for process in per[PRODUCT] if process in per[BASELINE]
        )
        print(f"\nthis checkout against the baseline ({args.baseline}): "
              f"{medians[PRODUCT] / medians[BASELINE]:.2f}x TPS; CPU per transaction (us) "
              f"{changes}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
