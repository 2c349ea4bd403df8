"""How much the relay's side scanner costs per chunk (not a test: prints numbers, asserts none).

    .venv/bin/python -m tests.postgres.scanner_timing

Chunks as the relay sees them: one pgbench -S round trip per chunk (simple and prepared
protocol), and 64 KiB chunks cut from long DataRow and CopyData streams, messages straddling
the chunk borders. The full decoder is timed on the same bytes for comparison.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from dataplane.postgres import BACKEND, FRONTEND, MessageDecoder, MessageScanner, encode
from dataplane.postgres import messages as m

CLIENT_CAPTURE = b"QPBECF"
SERVER_CAPTURE = b"CEZ1"

ACCOUNTS_ROW = m.DataRow((b"123456", b"2", b"-4711", b" " * 84))  # pgbench_accounts, filler
INT_ROW = m.DataRow((b"1",))


def wire(*messages: object) -> bytes:
    return b"".join(encode(x) for x in messages)  # type: ignore[arg-type]


def per_call(fn: Callable[[], object], budget: float = 0.5) -> float:
    """Median-of-5 nanoseconds per call of fn."""
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        spent = time.perf_counter() - start
        if spent > budget / 5:
            break
        n *= 2
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        runs.append((time.perf_counter() - start) / n * 1e9)
    return sorted(runs)[2]


def chunked(stream: bytes, size: int) -> list[bytes]:
    return [stream[i : i + size] for i in range(0, len(stream), size)]


def stream_ns(chunks: list[bytes], make: Callable[[], Callable[[bytes], object]]) -> float:
    def run() -> None:
        feed = make()
        for chunk in chunks:
            feed(chunk)

    return per_call(run, budget=1.0) / len(chunks)


def decoder_feed(side: object) -> Callable[[], Callable[[bytes], object]]:
    def make() -> Callable[[bytes], object]:
        decoder = MessageDecoder(side)  # type: ignore[arg-type]

        def feed(chunk: bytes) -> None:
            decoder.receive_data(chunk)
            while decoder.next_message() is not None:
                pass

        return feed

    return make


def main() -> None:
    simple_q = wire(m.Query("SELECT abalance FROM pgbench_accounts WHERE aid = 4242;"))
    simple_r = wire(
        m.RowDescription((m.FieldDescription("abalance", 16396, 3, 23, 4, -1, 0),)),
        m.DataRow((b"-4711",)),
        m.CommandComplete("SELECT 1"),
        m.ReadyForQuery("I"),
    )
    prep_q = wire(m.Bind("", "P0_1", (), (b"4242",), (0,)), m.Execute("", 0), m.Sync())
    prep_r = wire(
        m.BindComplete(),
        m.DataRow((b"-4711",)),
        m.CommandComplete("SELECT 1"),
        m.ReadyForQuery("I"),
    )
    rows_big = chunked(wire(*[ACCOUNTS_ROW] * 40_000), 65536)
    rows_small = chunked(wire(*[INT_ROW] * 300_000), 65536)
    lines = [m.CopyData(b"%d\t1\t0\t%s\n" % (i, b" " * 84)) for i in range(40_000)]
    copy = chunked(wire(*lines), 65536)

    client = MessageScanner(CLIENT_CAPTURE)
    server = MessageScanner(SERVER_CAPTURE)
    print(f"{'chunk':58} {'scanner ns':>11} {'decoder ns':>11}")
    for label, chunk, scanner, side in [
        ("pgbench -S simple, client chunk (Query)", simple_q, client, FRONTEND),
        ("pgbench -S simple, server chunk (T D C Z)", simple_r, server, BACKEND),
        ("pgbench -S prepared, client chunk (B E S)", prep_q, client, FRONTEND),
        ("pgbench -S prepared, server chunk (2 D C Z)", prep_r, server, BACKEND),
    ]:
        decoder = MessageDecoder(side)

        def full(decoder: MessageDecoder = decoder, chunk: bytes = chunk) -> None:
            decoder.receive_data(chunk)
            while decoder.next_message() is not None:
                pass

        scan = per_call(lambda s=scanner, c=chunk: s.feed(c))
        print(f"{label:58} {scan:11.0f} {per_call(full):11.0f}")
    for label, chunks, side in [
        (f"64 KiB of DataRows, accounts rows ({len(encode(ACCOUNTS_ROW))} B)", rows_big, BACKEND),
        (f"64 KiB of DataRows, one int column ({len(encode(INT_ROW))} B)", rows_small, BACKEND),
        ("64 KiB of CopyData (COPY pgbench_accounts TO STDOUT)", copy, BACKEND),
    ]:
        scan = stream_ns(chunks, lambda: MessageScanner(SERVER_CAPTURE).feed)
        full = stream_ns(chunks, decoder_feed(side))
        mb_s = 65536 / scan * 1e3
        print(f"{label:58} {scan:11.0f} {full:11.0f}   scanner {mb_s:,.0f} MB/s")


if __name__ == "__main__":
    main()
