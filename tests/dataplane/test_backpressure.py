"""Backpressure end to end: a client that stops reading a huge result makes the whole path
stop, and neither the proxy nor the agent buffers more than a bounded amount."""

from __future__ import annotations

import time

import pytest

from dataplane.postgres import messages as pm
from tests.dataplane import rawclient
from tests.dataplane.conftest import DataPath

pytestmark = pytest.mark.slow

BOUND = 2 * 1024 * 1024  # a few transport buffers (TLS high-water marks), never the result


def test_a_client_that_stops_reading_stalls_the_server_not_our_memory(path: DataPath) -> None:
    proxy = path.proxy_service
    agent_node = path.agents[0]
    agent = agent_node.service
    session = rawclient.connect(path.web_port, path.cert("alice"), path.pki.host_ca_file,
                                "alice", "main")
    try:
        # 1 GB of rows that the client will never read.
        session.send(pm.Query("select repeat('x', 1000) from generate_series(1, 1000000)"))
        samples: list[tuple[int, int, int, int]] = []
        relayed: list[int] = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            proxy_bufs = path.proxy.thread.call(  # type: ignore[union-attr]
                lambda: [r.buffered() for r in proxy.frontend.relays]
            )
            agent_state = agent_node.thread.call(
                lambda: [(s.relay.buffered(), s.relay.bytes_from_server) for s in agent.registry]
            )
            for (pc, ps) in proxy_bufs:
                for (ac, as_), _ in agent_state:
                    samples.append((pc, ps, ac, as_))
            relayed.append(max((n for _, n in agent_state), default=0))
            time.sleep(0.1)
        assert samples, "no live relay was seen"
        worst = max(max(s) for s in samples)
        assert worst < BOUND, f"a transport buffered {worst} bytes"
        # The server is held back: after the first second, almost nothing more gets through.
        assert relayed[-1] < 64 * 1024 * 1024, f"{relayed[-1]} bytes relayed to a stalled client"
        assert relayed[-1] - relayed[len(relayed) // 3] < BOUND
        # ... and the client can still read it all, in order (reading 50 MB of it).
        rows = 0
        while rows < 50_000:
            message = session.read_message()
            if isinstance(message, pm.DataRow):
                assert message.values == (b"x" * 1000,)
                rows += 1
    finally:
        session.close()
