"""Performance sanity of the data path (not a test; nothing here is asserted):
`python -m tests.dataplane.bench_paths [--seconds 10] [--clients 8] [--rounds 2]`.

Starts a real PostgreSQL (TLS, cert auth), a proxy and a db agent as separate processes
(TLS on every leg), and an all-in-one process (proxy + agent, in-process hand-over), then
runs `pgbench -S -j 2` against direct-with-TLS, the distributed path and the all-in-one,
interleaved, and prints TPS with ratios to direct-with-TLS (medians of the rounds).
`--audit none` measures without audit. The lead's formal benchmark lives in bench/.
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control.ca import certificate_pem
from launcher.embedded_postgres import EmbeddedPostgres, ServerTLS, free_tcp_port
from tests.dataplane.support import Pki, conninfo_for, make_bundle, role, sign, write_private
from tests.fixtures.pg import client_env, conninfo
from transport.tls import new_private_key, private_key_pem


def start_node(
    config: dict[str, Any], directory: Path, name: str
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.dataplane.node", str(path)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2],
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{name} did not start")
    return proc, json.loads(line)


def pgbench(dsn: str, seconds: int, clients: int, extra: list[str]) -> float:
    done = subprocess.run(
        ["pgbench", "-n", "-S", "-c", str(clients), "-j", "2", "-T", str(seconds), *extra, dsn],
        capture_output=True, text=True, env=client_env(), check=False,
    )
    match = re.search(r"tps = ([0-9.]+) \(", done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"pgbench failed: {done.stderr[-2000:]}")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--audit", choices=["count", "none"], default="count")
    parser.add_argument("--extra", default="", help="more pgbench arguments, e.g. '-M prepared'")
    args = parser.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="h8-bench-"))
    pki = Pki(base / "pki")
    crt, key, ca = pki.db_server_files(base / "tls")
    server = EmbeddedPostgres.temporary(
        port=free_tcp_port(), tls=ServerTLS(crt, key, ca), fsync=False, max_connections=200
    )
    procs: list[subprocess.Popen[str]] = []
    try:
        server.start()
        server.create_role("alice")
        server.create_database("bench", owner="alice")
        ckey = new_private_key()
        ccert = pki.cas.db.issue_db_client(ckey.public_key(), "alice", timedelta(hours=2))
        (base / "alice.crt").write_bytes(certificate_pem(ccert))
        write_private(base / "alice.key", private_key_pem(ckey))
        direct = conninfo(
            host="localhost", hostaddr="127.0.0.1", port=server.port, user="alice",
            dbname="bench", sslmode="verify-full", sslrootcert=str(pki.db_ca_file),
            sslcert=str(base / "alice.crt"), sslkey=str(base / "alice.key"),
            gssencmode="disable",
        )  # fmt: skip
        subprocess.run(["pgbench", "-i", "-s", "10", "-q", direct], check=True,
                       capture_output=True, env=client_env())
        signing = Ed25519PrivateKey.generate()
        bundle = make_bundle(pki, serial=1, roles=[role("admin")], users={"alice": ["admin"]})
        (base / "bundle").write_bytes(sign(bundle, signing))
        public = base64.b64encode(
            signing.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        ).decode()
        common = {
            "pki_base": str(pki.base), "bundle": str(base / "bundle"),
            "signing_public": public, "audit": args.audit,
            "databases": [{"name": "pg", "uri": f"127.0.0.1:{server.port}"}],
        }  # fmt: skip
        proxy, proxy_ports = start_node(
            {**common, "role": "proxy", "host_id": "proxy-1", "tunnel": ["127.0.0.1", 0]},
            base, "proxy",
        )
        procs.append(proxy)
        agent, _ = start_node(
            {**common, "role": "agent", "host_id": "agent-1",
             "proxies": [f"127.0.0.1:{proxy_ports['tunnel']}"]},
            base, "agent",
        )  # fmt: skip
        procs.append(agent)
        allinone, all_ports = start_node(
            {**common, "role": "all", "host_id": "all-1"}, base, "all"
        )
        procs.append(allinone)
        cert = pki.route_cert("alice", ["admin"], "pg")
        targets = {
            "direct, TLS": direct,
            "distributed": conninfo_for(proxy_ports["web"], cert, pki.host_ca_file, "alice",
                                        "bench"),
            "all-in-one": conninfo_for(all_ports["web"], cert, pki.host_ca_file, "alice",
                                       "bench"),
        }
        time.sleep(1.0)  # the agent's pool
        extra = args.extra.split()
        results: dict[str, list[float]] = {name: [] for name in targets}
        for _ in range(args.rounds):
            for name, dsn in targets.items():
                results[name].append(pgbench(dsn, args.seconds, args.clients, extra))
        base_tps = statistics.median(results["direct, TLS"])
        print(f"pgbench -S -c {args.clients} -j 2 -T {args.seconds} {args.extra} "
              f"(audit {args.audit}), medians of {args.rounds}")
        for name, values in results.items():
            med = statistics.median(values)
            shown = ", ".join(f"{v:.0f}" for v in values)
            print(f"  {name:<14} {med:9.0f} TPS  x{med / base_tps:.2f}   [{shown}]")
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        server.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
