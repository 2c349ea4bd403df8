"""MessageScanner agrees with the full decoder on boundaries, captures what it is asked for,
and never buffers a payload it was not asked for."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.postgres import (
    BACKEND,
    FRONTEND,
    MessageDecoder,
    MessageScanner,
    MessageTooLarge,
    RemoteProtocolError,
    decode_body,
    encode,
)
from dataplane.postgres import messages as m
from tests.postgres import strategies as s


def boundaries(wire_messages: list[bytes]) -> set[int]:
    ends, offset = {0}, 0
    for wire in wire_messages:
        offset += len(wire)
        ends.add(offset)
    return ends


@settings(deadline=None, max_examples=200)
@given(
    st.sampled_from([FRONTEND, BACKEND]),
    st.data(),
    st.binary(max_size=6),
    st.binary(max_size=4),
    st.integers(0, 30),
)
def test_scanner_agrees_with_the_decoder_for_any_stream_and_any_chunking(
    side: object, data: st.DataObject, capture: bytes, report: bytes, max_payload: int
) -> None:
    strategy = s.frontend_message if side is FRONTEND else s.backend_message
    messages = data.draw(st.lists(strategy, max_size=10))
    wires = [encode(msg) for msg in messages]
    stream = b"".join(wires)
    ends = boundaries(wires)

    decoder = MessageDecoder(side)  # type: ignore[arg-type]
    decoder.receive_data(stream)
    decoded = []
    while (msg := decoder.next_message()) is not None:
        decoded.append(msg)
    assert decoded == messages

    scanner = MessageScanner(capture, report=report, max_payload=max_payload)
    found = []
    offset = 0
    for chunk in data.draw(s.split(stream)):
        found += scanner.feed(chunk if len(chunk) % 2 else memoryview(chunk))
        offset += len(chunk)
        assert scanner.at_boundary == (offset in ends)
        if scanner.bytes_to_boundary is not None:
            assert offset + scanner.bytes_to_boundary in ends

    expected = []
    for wire in wires:
        code, payload = wire[:1], wire[5:]
        if code[0] in capture:
            expected.append((code, payload[:max_payload], len(payload)))
        elif code[0] in report:
            expected.append((code, None, len(payload)))
    assert [tuple(x) for x in found] == expected


def test_audit_use_case_queries_and_outcomes_come_back_decodable() -> None:
    client = MessageScanner(b"QPBEC")
    server = MessageScanner(b"CEZ")
    to_server = b"".join(
        encode(x)
        for x in [
            m.Parse("s1", "SELECT $1::int", (23,)),
            m.Bind("", "s1", (0,), (b"7",), ()),
            m.Execute(),
            m.Sync(),
        ]
    )
    to_client = b"".join(
        encode(x)
        for x in [
            m.ParseComplete(),
            m.BindComplete(),
            m.DataRow((b"7",)),
            m.CommandComplete("SELECT 1"),
            m.ReadyForQuery("I"),
        ]
    )
    sent = [decode_body(FRONTEND, x.type_code, x.payload) for x in client.feed(to_server)]
    assert sent == [
        m.Parse("s1", "SELECT $1::int", (23,)),
        m.Bind("", "s1", (0,), (b"7",), ()),
        m.Execute(),
    ]
    got = [decode_body(BACKEND, x.type_code, x.payload) for x in server.feed(to_client)]
    assert got == [m.CommandComplete("SELECT 1"), m.ReadyForQuery("I")]


def test_a_query_over_the_cap_is_reported_truncated_and_never_buffered_whole() -> None:
    scanner = MessageScanner(b"Q", max_payload=100)
    big = encode(m.Query("SELECT '" + "x" * 100_000 + "'"))
    found = []
    for i in range(0, len(big), 1000):
        found += scanner.feed(big[i : i + 1000])
        capture = scanner._capture  # the only buffer the scanner has
        assert capture is None or len(capture) <= 100
    assert len(found) == 1
    (msg,) = found
    assert msg.type_code == b"Q" and msg.truncated
    assert msg.payload == big[5:105]
    assert msg.size == len(big) - 5
    assert scanner.at_boundary


def test_skipped_messages_are_walked_not_copied() -> None:
    # 10 MB of DataRows split across chunks: nothing is reported, nothing is held.
    rows = encode(m.DataRow((b"x" * 1000,))) * 10_000
    scanner = MessageScanner(b"CZ")
    for i in range(0, len(rows), 65536):
        assert scanner.feed(memoryview(rows)[i : i + 65536]) == []
        assert scanner._capture is None and len(scanner._header) < 5
    assert scanner.at_boundary


def test_boundary_tracking_inside_a_long_message() -> None:
    scanner = MessageScanner(b"")
    wire = encode(m.CopyData(b"y" * 95))  # 100 bytes on the wire
    scanner.feed(wire[:3])
    assert not scanner.at_boundary and scanner.bytes_to_boundary is None
    scanner.feed(wire[3:40])
    assert not scanner.at_boundary and scanner.bytes_to_boundary == 60
    scanner.feed(wire[40:] + encode(m.CopyDone()))
    assert scanner.at_boundary and scanner.bytes_to_boundary == 0


def test_bad_lengths_stop_the_scanner() -> None:
    scanner = MessageScanner(b"Q", side="client")
    with pytest.raises(RemoteProtocolError, match="message b'Q' from the client has length 2"):
        scanner.feed(b"Q\x00\x00\x00\x02")
    with pytest.raises(RemoteProtocolError):  # broken for good
        scanner.feed(encode(m.Sync()))
    small = MessageScanner(b"", max_message_size=1000, side="server")
    with pytest.raises(
        MessageTooLarge,
        match="b'd' message of 1001 bytes exceeds the limit of 1000 bytes \\(sent by the server\\)",
    ):
        small.feed(encode(m.Sync()) + b"d" + struct.pack("!i", 1001))
