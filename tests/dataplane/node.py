"""Run a proxy, a db agent, or both in one process (all-in-one), for tests and benchmarks
that need separate processes: `python -m tests.dataplane.node CONFIG.json`.

CONFIG (JSON): role ("proxy" | "agent" | "all"), pki_base (a `support.Pki` directory: the
real CAs), host_id, bundle (path of a signed bundle), signing_public (base64 of the raw
Ed25519 public key), databases ([{name, uri, labels}]), proxies (["host:port"]), web /
tunnel ([host, port]), audit ("none" | "count"), pool_size, tunnel_options (the agent's
ProxyLink timing knobs, e.g. conftest.FAST_LINK to match a proxy's FAST_TUNNEL).

Prints one JSON line with the bound ports once serving, then runs until SIGTERM or SIGINT.
`start_node(config, directory, name)` starts one and returns the process and its ports.
Test and benchmark scaffolding only (bench/audit_bench.py).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import uvloop

from dataplane.agent import AgentService, StaticDatabases
from dataplane.proxy import ProxyService
from schemas.audit import AuditEvent, EncodedEvent
from schemas.bundle import BundleDatabase, public_key_from_b64
from tests.dataplane.support import DbCerts, Feed, Pki


def start_node(
    config: dict[str, Any], directory: Path, name: str
) -> tuple[subprocess.Popen[str], dict[str, int]]:
    """Run this module on `config` (written to DIRECTORY/NAME.json) in a process of its own;
    the process and the ports it printed once serving."""
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


class CountingSink:
    """Counts audit events (a benchmark must not keep them all in memory)."""

    def __init__(self) -> None:
        self.count = 0

    def emit(self, event: AuditEvent | EncodedEvent) -> None:
        self.count += 1


async def main(config: dict[str, Any]) -> None:
    pki = Pki(Path(config["pki_base"]))
    feed = Feed(public_key_from_b64(config["signing_public"]))
    feed.activate(Path(config["bundle"]).read_bytes())
    role = config["role"]
    host_id = config["host_id"]
    audit = CountingSink() if config.get("audit", "count") == "count" else None
    services: list[Any] = []
    agent = None
    if role in ("agent", "all"):
        agent = AgentService(
            credentials=pki.host(host_id + ("-db" if role == "all" else ""), "db"),
            bundles=feed,
            databases=StaticDatabases(BundleDatabase(**db) for db in config["databases"]),
            db_certs=DbCerts(pki.cas),
            audit=audit,
            proxies=config.get("proxies", []) if role == "agent" else [],
            pool_size=int(config.get("pool_size", 8)),
            tunnel_options=config.get("tunnel_options"),
        )
        await agent.start()
        services.append(agent)
    ports: dict[str, int] = {}
    if role in ("proxy", "all"):
        proxy = ProxyService(
            credentials=pki.host(host_id, "proxy"),
            bundles=feed,
            web_addr=tuple(config.get("web", ["127.0.0.1", 0])),  # type: ignore[arg-type]
            tunnel_addr=tuple(config["tunnel"]) if config.get("tunnel") else None,  # type: ignore[arg-type]
            local_agent=agent if role == "all" else None,
            audit=audit,
        )
        await proxy.start()
        services.append(proxy)
        ports["web"] = proxy.web_address[1] if proxy.web_address else 0
        ports["tunnel"] = proxy.tunnel_address[1] if proxy.tunnel_address else 0
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps(ports), flush=True)
    await stop.wait()
    for service in reversed(services):
        await service.stop()


if __name__ == "__main__":
    uvloop.run(main(json.loads(Path(sys.argv[1]).read_text())))
