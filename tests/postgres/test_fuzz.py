"""Arbitrary and damaged bytes never crash or hang a decoder: only ProtocolError comes out.

"Never hang" is checked by construction: each loop below is bounded by the bytes fed, and a
decoder that returned a message without consuming input would fail the `progress` asserts.
pytest-timeout backs this up.
"""

from __future__ import annotations

import contextlib
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.postgres import (
    BACKEND,
    FRONTEND,
    MessageDecoder,
    MessageScanner,
    ProtocolError,
    StartupDecoder,
    decode_body,
    encode,
)
from dataplane.postgres import messages as m
from tests.postgres import strategies as s

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
sides = st.sampled_from([FRONTEND, BACKEND])
auth_kinds = st.sampled_from([m.PasswordMessage, m.SASLInitialResponse, m.SASLResponse])
limits = st.sampled_from([4, 16, 300, 1 << 30])


def drain(decoder: MessageDecoder | StartupDecoder, chunks: list[bytes]) -> list[object]:
    """Feed chunks as a server loop would; stop at the first ProtocolError."""
    out: list[object] = []
    try:
        for chunk in chunks:
            decoder.receive_data(chunk)
            if isinstance(decoder, MessageDecoder):
                assert decoder.buffered <= decoder.max_message_size + 1 + len(chunk)
            for _ in range(len(chunk) + 1):  # each message consumes at least 5 bytes
                before = decoder.buffered if isinstance(decoder, MessageDecoder) else None
                msg = decoder.next_message()
                if msg is None:
                    break
                if before is not None:
                    assert decoder.buffered < before, "a message was returned without progress"
                out.append(msg)
            else:
                raise AssertionError("next_message() kept returning messages: a hang")
        decoder.receive_eof()
        while decoder.next_message() is not None:
            pass
    except ProtocolError:
        pass
    return out


@FUZZ
@given(sides, auth_kinds, limits, st.binary(max_size=300), st.data())
def test_arbitrary_bytes_never_crash_the_message_decoder(
    side: object, kind: type, limit: int, stream: bytes, data: st.DataObject
) -> None:
    decoder = MessageDecoder(side, max_message_size=limit)  # type: ignore[arg-type]
    decoder.expect_auth_response(kind)
    drain(decoder, data.draw(s.split(stream)))


@FUZZ
@given(st.sampled_from(sorted(set(b"QPBEDCSHXdcfFp"))), auth_kinds, st.binary(max_size=60))
def test_any_payload_under_a_valid_frontend_header_decodes_or_fails_cleanly(
    code: int, kind: type, payload: bytes
) -> None:
    with contextlib.suppress(ProtocolError):
        decode_body(FRONTEND, bytes([code]), payload, kind)


@FUZZ
@given(st.sampled_from(sorted(set(b"RSKZENCTDI123nstGHWAvVdc"))), st.binary(max_size=60))
def test_any_payload_under_a_valid_backend_header_decodes_or_fails_cleanly(
    code: int, payload: bytes
) -> None:
    # Authentication requests are mostly a 4-byte code then data: aim at the known codes too.
    if code == ord("R") and payload[:1] == b"\0":
        payload = struct.pack("!i", payload[1] % 14 if len(payload) > 1 else 0) + payload[2:]
    with contextlib.suppress(ProtocolError):
        decode_body(BACKEND, bytes([code]), payload)


@FUZZ
@given(
    st.sampled_from(
        [m.PROTOCOL_3_0, m.PROTOCOL_3_0 | 2, m.SSL_REQUEST_CODE, m.GSSENC_REQUEST_CODE,
         m.CANCEL_REQUEST_CODE]
    ),
    st.binary(max_size=80),
    st.binary(max_size=40),
    st.data(),
)
def test_arbitrary_startup_packets_never_crash_the_startup_decoder(
    code: int, body: bytes, garbage: bytes, data: st.DataObject
) -> None:
    wire = struct.pack("!ii", len(body) + 8, code) + body + garbage
    decoder = StartupDecoder()
    drain(decoder, data.draw(s.split(wire)))
    # whatever it finished with, the rest goes to a MessageDecoder without crashing either
    if decoder.finished:
        drain(MessageDecoder(FRONTEND), [decoder.take_unprocessed()])


@FUZZ
@given(st.binary(max_size=200), st.data())
def test_arbitrary_bytes_never_crash_the_startup_decoder(
    stream: bytes, data: st.DataObject
) -> None:
    drain(
        StartupDecoder(max_startup_size=data.draw(st.sampled_from([8, 64, 10_000]))),
        data.draw(s.split(stream)),
    )


@st.composite
def damaged(draw: st.DrawFn, messages: st.SearchStrategy) -> bytes:
    """A valid stream with a few bytes flipped, cut out or inserted."""
    stream = bytearray(
        b"".join(encode(x) for x in draw(st.lists(messages, min_size=1, max_size=6)))
    )
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "cut", "insert"]))
        at = draw(st.integers(0, max(0, len(stream) - 1)))
        if action == "flip" and stream:
            stream[at] = draw(st.integers(0, 255))
        elif action == "cut":
            del stream[at : at + draw(st.integers(1, 8))]
        else:
            stream[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(stream)


@FUZZ
@given(st.data())
def test_damaged_streams_never_crash_any_decoder_or_the_scanner(data: st.DataObject) -> None:
    side = data.draw(sides)
    stream = data.draw(damaged(s.frontend_message if side is FRONTEND else s.backend_message))
    chunks = data.draw(s.split(stream))
    drain(MessageDecoder(side, max_message_size=data.draw(limits)), chunks)
    scanner = MessageScanner(b"QPBECTZ", report=b"D", max_payload=data.draw(st.integers(0, 50)))
    try:
        for chunk in chunks:
            scanner.feed(chunk)
    except ProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=300), st.data())
def test_arbitrary_bytes_never_crash_the_scanner(stream: bytes, data: st.DataObject) -> None:
    scanner = MessageScanner(
        data.draw(st.binary(max_size=5)),
        report=data.draw(st.binary(max_size=5)),
        max_payload=data.draw(st.integers(0, 20)),
        max_message_size=data.draw(limits),
    )
    fed = 0
    try:
        for chunk in data.draw(s.split(stream)):
            found = scanner.feed(memoryview(chunk))
            fed += len(chunk)
            assert len(found) <= fed  # at most one message per 5 bytes, in fact
    except ProtocolError:
        pass
