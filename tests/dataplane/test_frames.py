"""Tunnel frames: round trips, limits, and arbitrary bytes that never crash or hang."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dataplane.tunnel.frames import (
    MAX_FRAME,
    BackendKey,
    CancelStart,
    DataHello,
    Dial,
    FrameDecoder,
    FrameError,
    Heartbeat,
    Hello,
    Labels,
    ServedDatabase,
    SessionAck,
    SessionStart,
    encode_frame,
)

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=30)
labels = st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=4)
databases = st.lists(st.builds(ServedDatabase, name=names, labels=labels), max_size=4)
u32 = st.integers(0, 2**32 - 1)
frames = st.one_of(
    st.builds(Hello, host_id=names, databases=databases),
    st.builds(Labels, databases=databases),
    st.just(Heartbeat()),
    st.builds(Dial, count=st.integers(1, 256)),
    st.builds(DataHello, host_id=names),
    st.builds(
        SessionStart,
        session_id=names,
        service=names,
        client_cert=st.binary(max_size=300).map(SessionStart.encode_certificate),
        startup=st.dictionaries(st.text(max_size=20), st.text(max_size=40), max_size=5),
        client_addr=st.text(max_size=40),
        backend_key=st.builds(BackendKey, process_id=u32, secret_key=u32),
    ),
    st.builds(SessionAck, ok=st.booleans(), reason=st.text(max_size=80), retry=st.booleans()),
    st.builds(CancelStart, process_id=u32, secret_key=u32),
)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    out, last = [], 0
    for point in [*points, len(data)]:
        out.append(data[last:point])
        last = point
    return out


@FUZZ
@given(
    st.lists(frames, max_size=6), st.lists(st.integers(0, 5000), max_size=8), st.binary(max_size=50)
)
def test_frames_round_trip_in_any_chunking_and_leave_what_follows(
    sent: list[object], cuts: list[int], raw: bytes
) -> None:
    wire = b"".join(encode_frame(f) for f in sent)  # type: ignore[arg-type]
    decoder = FrameDecoder()
    got: list[object] = []
    for chunk in split(wire, cuts):
        decoder.receive_data(chunk)
        while (frame := decoder.next_frame()) is not None:
            got.append(frame)
    assert got == sent
    decoder.receive_data(raw)
    assert decoder.take_unprocessed() == raw  # raw session bytes after the last frame


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6))
def test_arbitrary_bytes_never_crash_or_hang_the_decoder(data: bytes, cuts: list[int]) -> None:
    decoder = FrameDecoder(max_frame=256)
    try:
        for chunk in split(data, cuts):
            decoder.receive_data(chunk)
            for _ in range(len(data) + 1):  # every frame consumes at least 4 bytes
                if decoder.next_frame() is None:
                    break
            else:
                raise AssertionError("next_frame() kept returning frames: a hang")
            assert decoder.buffered <= 256 + 4 + len(chunk)
    except FrameError:
        pass


@FUZZ
@given(st.dictionaries(st.text(max_size=10), st.one_of(st.text(max_size=10), st.integers()),
                       max_size=4))
def test_any_json_object_decodes_to_a_frame_or_a_frame_error(value: dict[str, object]) -> None:
    body = json.dumps(value).encode()
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack("!I", len(body)) + body)
    try:
        decoder.next_frame()
    except FrameError as exc:
        assert "tunnel frame" in str(exc)


def test_a_length_over_the_limit_is_refused_before_anything_is_buffered() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack("!I", MAX_FRAME + 1) + b"{")
    with pytest.raises(FrameError, match="exceeds the limit of 65536 bytes"):
        decoder.next_frame()
    with pytest.raises(FrameError):  # broken for good
        decoder.receive_data(b"x")


def test_an_oversized_frame_is_refused_on_encoding() -> None:
    frame = SessionAck(ok=False, reason="x" * 4096)
    assert len(encode_frame(frame)) < MAX_FRAME
    start = SessionStart(
        session_id="s",
        service="db",
        client_cert="",
        startup={f"parameter{i}": "v" * 9000 for i in range(8)},
        backend_key=BackendKey(process_id=1, secret_key=2),
    )
    with pytest.raises(ValueError, match="exceeds the tunnel limit"):
        encode_frame(start)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1]", "not a JSON object"),
        (b"\xff", "not valid UTF-8 JSON"),
        (b'{"type": "session-ack"}', "ok: Field required"),
        (b'{"type": "nope"}', "type 'nope'"),
        (b'{"type": "dial", "count": 100000}', "count"),
        (b'{"type": "heartbeat", "extra": 1}', "extra"),
    ],
)
def test_invalid_frames_say_what_is_wrong(body: bytes, message: str) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(struct.pack("!I", len(body)) + body)
    with pytest.raises(FrameError, match=message):
        decoder.next_frame()


def test_client_certificates_travel_as_base64_der() -> None:
    start = SessionStart(
        session_id="s", service="db", client_cert=SessionStart.encode_certificate(b"\x30\x82"),
        startup={}, backend_key=BackendKey(process_id=1, secret_key=2),
    )
    assert start.certificate_der() == b"\x30\x82"
    broken = start.model_copy(update={"client_cert": "***"})
    with pytest.raises(FrameError, match="not valid base64"):
        broken.certificate_der()
