"""The codec: exact wire bytes, round trips for every message, and clear errors for bad input."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.postgres import (
    BACKEND,
    FRONTEND,
    LocalProtocolError,
    MessageDecoder,
    MessageTooLarge,
    RemoteProtocolError,
    StartupDecoder,
    UnsupportedProtocolVersion,
    decode_body,
    encode,
)
from dataplane.postgres import messages as m
from tests.postgres import strategies as s

# ----------------------------------------------------------------- helpers


def decode_all(decoder: MessageDecoder, chunks: list[bytes]) -> list[object]:
    out = []
    for chunk in chunks:
        decoder.receive_data(chunk)
        while (msg := decoder.next_message()) is not None:
            out.append(msg)
    decoder.receive_eof()
    while (msg := decoder.next_message()) is not None:
        out.append(msg)
    assert decoder.at_eof
    return out


def one(side: m.Message, data: bytes, **kw: object) -> object:
    decoder = MessageDecoder(side, **kw)  # type: ignore[arg-type]
    decoder.receive_data(data)
    return decoder.next_message()


def frame(code: bytes, payload: bytes) -> bytes:
    return code + struct.pack("!i", len(payload) + 4) + payload


# ----------------------------------------------------------------- exact bytes (from the docs)


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (m.SSLRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
        (m.GSSENCRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
        (
            m.CancelRequest(7, 0xDEADBEEF),
            b"\x00\x00\x00\x10\x04\xd2\x16\x2e\0\0\0\x07\xde\xad\xbe\xef",
        ),
        (
            m.StartupMessage({"user": "alice", "database": "db"}),
            b"\x00\x00\x00\x20\x00\x03\x00\x00user\0alice\0database\0db\0\0",
        ),
        (m.Query("SELECT 1"), b"Q\x00\x00\x00\x0dSELECT 1\0"),
        (m.Sync(), b"S\x00\x00\x00\x04"),
        (m.Terminate(), b"X\x00\x00\x00\x04"),
        (m.Execute("", 0), b"E\x00\x00\x00\x09\0\x00\x00\x00\x00"),
        (m.Describe("P", ""), b"D\x00\x00\x00\x06P\0"),
        (
            m.Bind("", "s1", (1,), (b"\x00\x00\x00\x2a", None), (0,)),
            b"B\x00\x00\x00\x1e\0s1\0\x00\x01\x00\x01\x00\x02\x00\x00\x00\x04\x00\x00\x00\x2a"
            b"\xff\xff\xff\xff\x00\x01\x00\x00",
        ),
        (
            m.Parse("", "SELECT $1", (23,)),
            b"P\x00\x00\x00\x15\0SELECT $1\0\x00\x01\x00\x00\x00\x17",
        ),
        (m.AuthenticationOk(), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
        (m.AuthenticationMD5Password(b"abcd"), b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd"),
        (
            m.AuthenticationSASL(("SCRAM-SHA-256",)),
            b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\0\0",
        ),
        (m.ReadyForQuery("I"), b"Z\x00\x00\x00\x05I"),
        (m.BackendKeyData(1234, 5678), b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\x00\x00\x16\x2e"),
        (m.DataRow((b"1", None)), b"D\x00\x00\x00\x0f\x00\x02\x00\x00\x00\x011\xff\xff\xff\xff"),
        (m.CommandComplete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\0"),
        (
            m.ErrorResponse({"S": "FATAL", "C": "28000", "M": "no"}),
            b"E\x00\x00\x00\x17SFATAL\0C28000\0Mno\0\0",
        ),
        (m.CopyOutResponse(0, (0, 0)), b"H\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00"),
    ],
    ids=lambda x: type(x).__name__ if not isinstance(x, bytes) else "",
)
def test_encode_writes_the_documented_bytes(message: m.Message, wire: bytes) -> None:
    assert encode(message) == wire


# ----------------------------------------------------------------- round trips


def test_every_message_class_has_a_strategy() -> None:
    classes = {
        obj
        for obj in vars(m).values()
        if isinstance(obj, type) and dataclasses.is_dataclass(obj) and hasattr(obj, "type_code")
    }
    covered = set(s.STARTUP) | set(s.FRONTEND) | set(s.AUTH_RESPONSES) | set(s.BACKEND)
    assert classes == covered


@settings(deadline=None)
@given(st.lists(s.frontend_message, max_size=8), st.data())
def test_frontend_messages_round_trip_in_any_chunking(messages: list, data: st.DataObject) -> None:
    stream = b"".join(encode(msg) for msg in messages)
    chunks = data.draw(s.split(stream))
    assert decode_all(MessageDecoder(FRONTEND), chunks) == messages


@settings(deadline=None)
@given(st.lists(s.backend_message, max_size=8), st.data())
def test_backend_messages_round_trip_in_any_chunking(messages: list, data: st.DataObject) -> None:
    stream = b"".join(encode(msg) for msg in messages)
    chunks = data.draw(s.split(stream))
    assert decode_all(MessageDecoder(BACKEND), chunks) == messages


@settings(deadline=None)
@given(st.one_of(*s.AUTH_RESPONSES.values()))
def test_password_and_sasl_responses_round_trip_when_the_caller_says_which(msg: object) -> None:
    decoder = MessageDecoder(FRONTEND)
    decoder.expect_auth_response(type(msg))  # type: ignore[arg-type]
    decoder.receive_data(encode(msg))  # type: ignore[arg-type]
    assert decoder.next_message() == msg


def test_a_p_message_decodes_as_the_expected_kind() -> None:
    wire = encode(m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"))
    decoder = MessageDecoder(FRONTEND)
    decoder.receive_data(wire)
    decoder.expected_auth_response = m.SASLInitialResponse
    assert decoder.next_message() == m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc")
    decoder.expect_auth_response(m.SASLResponse)
    decoder.receive_data(encode(m.SASLResponse(b"c=biws,r=abc,p=xyz")))
    assert decoder.next_message() == m.SASLResponse(b"c=biws,r=abc,p=xyz")
    with pytest.raises(LocalProtocolError, match="PasswordMessage, SASLInitialResponse"):
        decoder.expect_auth_response(m.Query)  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="PasswordMessage, SASLInitialResponse"):
        decoder.expected_auth_response = m.Sync  # type: ignore[assignment]
    assert decoder.expected_auth_response is m.SASLResponse


@settings(deadline=None)
@given(
    st.booleans(),
    st.booleans(),
    st.one_of(s.STARTUP[m.StartupMessage], s.STARTUP[m.CancelRequest]),
    st.lists(s.frontend_message, max_size=3),
    st.data(),
)
def test_startup_packets_round_trip_then_hand_over_to_the_message_decoder(
    gss: bool, ssl: bool, last: object, after: list, data: st.DataObject
) -> None:
    packets: list[object] = [m.GSSENCRequest()] * gss + [m.SSLRequest()] * ssl + [last]
    decoder = StartupDecoder()
    rest = MessageDecoder(FRONTEND)
    seen = []
    later = []
    for i, packet in enumerate(packets):
        wire = encode(packet)  # type: ignore[arg-type]
        if i == len(packets) - 1:  # a client may pipeline messages after its StartupMessage
            wire += b"".join(encode(msg) for msg in after)
        for chunk in data.draw(s.split(wire)):
            if decoder.finished:  # the server switches decoders once startup is done
                later.append(chunk)
                continue
            decoder.receive_data(chunk)
            while (msg := decoder.next_message()) is not None:
                seen.append(msg)
    assert seen == packets
    assert decoder.finished
    rest.receive_data(decoder.take_unprocessed())
    assert decode_all(rest, later) == after


def test_text_in_another_client_encoding_survives_a_round_trip() -> None:
    latin1 = "caf\xe9".encode("latin-1")  # not UTF-8
    msg = one(FRONTEND, frame(b"Q", b"SELECT '" + latin1 + b"'\0"))
    assert isinstance(msg, m.Query)
    assert encode(msg) == frame(b"Q", b"SELECT '" + latin1 + b"'\0")


def test_decode_body_decodes_one_payload_found_elsewhere() -> None:
    wire = encode(m.Bind("p", "s", (0,), (b"42",), ()))
    assert decode_body(FRONTEND, b"B", wire[5:]) == m.Bind("p", "s", (0,), (b"42",), ())
    assert decode_body(BACKEND, b"D", encode(m.DataRow((None,)))[5:]) == m.DataRow((None,))
    with pytest.raises(RemoteProtocolError, match="unknown message type b'Z' from the client"):
        decode_body(FRONTEND, b"Z", b"I")


def test_error_and_notice_fields_are_readable_by_name() -> None:
    err = m.ErrorResponse(
        {"S": "FEHLER", "V": "ERROR", "C": "42501", "M": "permission denied", "D": "d", "H": "h"}
    )
    assert (err.severity, err.sqlstate, err.message, err.detail, err.hint) == (
        "ERROR",
        "42501",
        "permission denied",
        "d",
        "h",
    )
    assert str(err) == "ERROR: permission denied (SQLSTATE 42501)\nDETAIL: d\nHINT: h"
    notice = m.NoticeResponse({"S": "NOTICE", "M": "hello"})
    assert (notice.severity, notice.sqlstate, notice.detail) == ("NOTICE", None, None)


def test_reprs_of_password_and_sasl_messages_hide_their_secrets() -> None:
    assert "hunter2" not in repr(m.PasswordMessage("hunter2"))
    proof = b"c=biws,r=abc,p=secretproof"
    assert repr(m.SASLResponse(proof)) == "SASLResponse(data=<26 bytes>)"
    assert "secret" not in repr(m.SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=secret"))


# ----------------------------------------------------------------- errors from the wire


def test_unknown_type_byte_is_reported_at_once() -> None:
    decoder = MessageDecoder(FRONTEND)
    decoder.receive_data(b"\x07")
    with pytest.raises(RemoteProtocolError, match=r"unknown message type b'\\x07' from the client"):
        decoder.next_message()


def test_a_backend_type_from_the_client_is_unknown() -> None:
    with pytest.raises(RemoteProtocolError, match="unknown message type b'Z' from the client"):
        one(FRONTEND, encode(m.ReadyForQuery("I")))
    with pytest.raises(RemoteProtocolError, match="unknown message type b'Q' from the server"):
        one(BACKEND, encode(m.Query("x")))


def test_length_below_four_is_refused() -> None:
    with pytest.raises(RemoteProtocolError, match="Query message from the client has length 3"):
        one(FRONTEND, b"Q\x00\x00\x00\x03")
    with pytest.raises(RemoteProtocolError, match="has length -1"):
        one(BACKEND, b"D\xff\xff\xff\xff")


def test_length_over_the_limit_is_refused_before_the_body_arrives() -> None:
    decoder = MessageDecoder(FRONTEND)
    decoder.receive_data(b"Q" + struct.pack("!i", 2147483000))
    with pytest.raises(MessageTooLarge) as caught:
        decoder.next_message()
    assert "message of 2147483000 bytes exceeds the limit of 1073741824 bytes" in str(caught.value)
    assert (caught.value.size, caught.value.limit, caught.value.sqlstate) == (
        2147483000,
        1 << 30,
        "08P01",
    )
    with pytest.raises(
        MessageTooLarge, match="DataRow message of 101 bytes exceeds the limit of 100"
    ):
        one(BACKEND, b"D" + struct.pack("!i", 101), max_message_size=100)


def test_a_broken_decoder_keeps_raising_the_same_error() -> None:
    decoder = MessageDecoder(BACKEND)
    decoder.receive_data(b"?\x00\x00\x00\x04")
    with pytest.raises(RemoteProtocolError) as first:
        decoder.next_message()
    with pytest.raises(RemoteProtocolError) as second:
        decoder.next_message()
    assert first.value is second.value
    with pytest.raises(RemoteProtocolError):
        decoder.receive_data(b"more")


@pytest.mark.parametrize(
    ("side", "wire", "problem"),
    [
        (
            FRONTEND,
            frame(b"Q", b"SELECT 1"),
            "malformed Query message: query text is not terminated",
        ),
        (FRONTEND, frame(b"S", b"x"), "malformed Sync message: 1 unexpected bytes after the last"),
        (
            FRONTEND,
            frame(b"B", b"\0\0\x00\x00\x75\x30" + b"\x00" * 12),
            "malformed Bind message: declares 30000 parameter values but only 12 bytes remain",
        ),
        (
            FRONTEND,
            frame(b"B", b"\0\0\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),
            "length of parameter values 1 is -2",
        ),
        (
            FRONTEND,
            frame(b"B", b"\0\0\x00\x00\x00\x01\x00\x00\x00\x09abc\x00\x00"),
            "parameter values 1 needs 9 bytes but only 5 remain",
        ),
        (FRONTEND, frame(b"B", b"\0\0\xff\xff"), "negative number of parameter format codes"),
        (FRONTEND, frame(b"D", b"Xname\0"), "Describe kind must be 'S' (statement) or 'P'"),
        (FRONTEND, frame(b"E", b"\0\x00\x00"), "row limit needs 4 bytes but only 2 remain"),
        (BACKEND, frame(b"Z", b"Q"), "transaction status must be 'I', 'T' or 'E'"),
        (BACKEND, frame(b"R", b"\x00\x00\x00\x2a"), "unknown authentication request code 42"),
        (BACKEND, frame(b"R", b"\x00\x00\x00\x05ab"), "MD5 salt needs 4 bytes but only 2 remain"),
        (BACKEND, frame(b"T", b"\x7f\xff"), "declares 32767 columns but only 0 bytes remain"),
        (BACKEND, frame(b"T", b"\x00\x01" + b"a" * 19), "column name is not terminated"),
        (BACKEND, frame(b"E", b"SERROR\0"), "field code needs 1 bytes but only 0 remain"),
        (
            BACKEND,
            frame(b"v", b"\x00\x00\x00\x00\x7f\xff\xff\xff"),
            "declares 2147483647 unrecognized options but only 0 bytes remain",
        ),
        (BACKEND, frame(b"K", b"\x00\x00\x00\x01"), "secret key needs 4 bytes"),
    ],
)
def test_malformed_fields_are_named(side: m.Message, wire: bytes, problem: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        one(side, wire)
    assert problem in str(caught.value)


def test_end_of_stream_inside_a_message_is_an_error_and_at_a_boundary_is_not() -> None:
    decoder = MessageDecoder(BACKEND)
    decoder.receive_data(encode(m.ReadyForQuery("I")) + encode(m.CommandComplete("SELECT 1"))[:7])
    assert decoder.next_message() == m.ReadyForQuery("I")
    assert decoder.next_message() is None
    decoder.receive_data(b"")  # empty data is not the end of the stream
    assert decoder.next_message() is None
    decoder.receive_eof()
    with pytest.raises(
        RemoteProtocolError,
        match=r"server closed the connection inside a CommandComplete message \(6 of 13 bytes\)",
    ):
        decoder.next_message()
    clean = MessageDecoder(FRONTEND)
    clean.receive_data(encode(m.Sync()))
    clean.receive_eof()
    assert clean.next_message() == m.Sync()
    assert clean.next_message() is None
    assert clean.at_eof
    with pytest.raises(LocalProtocolError, match=r"after receive_eof\(\)"):
        clean.receive_data(b"S")


def test_the_buffer_holds_at_most_one_maximum_message_plus_one_chunk() -> None:
    limit = 1000
    decoder = MessageDecoder(FRONTEND, max_message_size=limit)
    wire = encode(m.CopyData(b"x" * (limit - 4)))  # exactly the limit
    for i in range(0, len(wire), 64):
        decoder.receive_data(wire[i : i + 64])
        assert decoder.buffered <= limit + 1
        msg = decoder.next_message()
    assert msg == m.CopyData(b"x" * (limit - 4))
    # a caller that never drains is stopped instead of growing the buffer without bound
    greedy = MessageDecoder(FRONTEND, max_message_size=limit)
    with pytest.raises(LocalProtocolError, match="call next_message"):
        for _ in range(limit):
            greedy.receive_data(encode(m.Sync()))
    assert greedy.buffered <= limit + 5 + 5


# ----------------------------------------------------------------- startup packets


def startup(wire: bytes, **kw: int) -> object:
    decoder = StartupDecoder(**kw)
    decoder.receive_data(wire)
    return decoder.next_message()


def test_startup_message_parameters_and_defaults() -> None:
    msg = startup(encode(m.StartupMessage({"user": "alice", "application_name": "psql"})))
    assert isinstance(msg, m.StartupMessage)
    assert (msg.user, msg.database, msg.parameters["application_name"]) == (
        "alice",
        "alice",
        "psql",
    )


@pytest.mark.parametrize(("major", "minor"), [(2, 0), (1, 0), (4, 0), (7, 1)])
def test_other_protocol_versions_get_a_clear_error(major: int, minor: int) -> None:
    wire = struct.pack("!ii", 9, (major << 16) | minor) + b"\0"
    with pytest.raises(UnsupportedProtocolVersion) as caught:
        startup(wire)
    assert f"unsupported frontend protocol {major}.{minor}: this server supports 3.0 only" in str(
        caught.value
    )
    assert caught.value.sqlstate == "0A000"


@pytest.mark.parametrize("minor", [1, 2, 0xFFFF])
def test_newer_minor_versions_of_protocol_3_are_read_for_negotiation(minor: int) -> None:
    # libpq 18 asks for 3.2 (max_protocol_version); the server answers
    # NegotiateProtocolVersion and both go on with 3.0.
    wire = encode(m.StartupMessage({"user": "alice", "_pq_.test_option": "on"}, minor))
    assert wire[4:8] == struct.pack("!i", (3 << 16) | minor)
    msg = startup(wire)
    assert isinstance(msg, m.StartupMessage)
    assert msg.minor_version == minor
    assert msg.protocol_options == ("_pq_.test_option",)
    assert msg.parameters == {"user": "alice", "_pq_.test_option": "on"}


def test_a_3_0_startup_has_no_protocol_options() -> None:
    msg = startup(encode(m.StartupMessage({"user": "alice", "options": "-c x=1"})))
    assert isinstance(msg, m.StartupMessage)
    assert (msg.minor_version, msg.protocol_options) == (0, ())


def test_negotiate_protocol_version_carries_the_whole_version_number() -> None:
    # PostgreSQL sends its newest protocol as (3 << 16) | minor: libpq 18 reads a bare
    # minor (0) as "server requested downgrade to pre-3.0 protocol version" and gives up.
    message = m.NegotiateProtocolVersion(m.PROTOCOL_3_0, ("_pq_.a", "_pq_.b"))
    wire = encode(message)
    assert wire == b"v" + struct.pack("!iii", 4 + 8 + 14, 0x30000, 2) + b"_pq_.a\0_pq_.b\0"
    decoder = MessageDecoder(BACKEND)
    decoder.receive_data(wire)
    assert decoder.next_message() == message


@pytest.mark.parametrize("minor", [-1, 0x10000])
def test_a_startup_minor_version_out_of_range_is_our_bug(minor: int) -> None:
    with pytest.raises(LocalProtocolError, match=r"minor version must be 0\.\.65535"):
        encode(m.StartupMessage({"user": "a"}, minor))


def test_message_decoder_hands_over_what_follows_the_last_message() -> None:
    # The agent's upstream login reads typed messages up to ReadyForQuery and relays the
    # rest raw: nothing after it may be lost or decoded.
    ready = encode(m.ReadyForQuery("I"))
    after = encode(m.NoticeResponse({"S": "NOTICE", "M": "x"})) + b"D\x00\x00"  # cut short
    decoder = MessageDecoder(BACKEND)
    decoder.receive_data(encode(m.ParameterStatus("a", "b")) + ready + after)
    assert decoder.next_message() == m.ParameterStatus("a", "b")
    assert decoder.next_message() == m.ReadyForQuery("I")
    assert decoder.buffered == len(after)
    assert decoder.take_unprocessed() == after
    assert decoder.buffered == 0
    assert decoder.take_unprocessed() == b""
    assert decoder.next_message() is None


@pytest.mark.parametrize(
    ("wire", "problem"),
    [
        (b"\x00\x00\x00\x04", "invalid startup packet length 4"),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01",
            "startup message of 369295618 bytes exceeds the limit of 10000",
        ),
        (
            b"\x00\x00\x00\x0c\x04\xd2\x16\x2e\0\0\0\x01",
            "malformed CancelRequest message: secret key needs 4",
        ),
        (
            b"\x00\x00\x00\x0c\x04\xd2\x16\x2fabcd",
            "malformed SSLRequest message: 4 unexpected bytes",
        ),
        (b"\x00\x00\x00\x0e\x00\x03\x00\x00user\0a", "value of parameter 'user' is not terminated"),
        (
            b"\x00\x00\x00\x17\x00\x03\x00\x00user\0a\0user\0b\0\0",
            "malformed StartupMessage message: parameter 'user' is given twice",
        ),
        (b"\x00\x00\x00\x0f\x00\x03\x00\x00user\0a\0", "parameter name is not terminated"),
        (b"\x00\x00\x00\x0b\x00\x03\x00\x00\0xy", "2 unexpected bytes after the last field"),
    ],
)
def test_malformed_startup_packets_are_named(wire: bytes, problem: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        startup(wire)
    assert problem in str(caught.value)


def test_bytes_sent_with_an_ssl_request_are_refused() -> None:
    # CVE-2021-23214: plain text queued before the TLS handshake could come from a man in the middle
    wire = encode(m.SSLRequest()) + encode(m.StartupMessage({"user": "mallory"}))
    with pytest.raises(RemoteProtocolError, match="sent 22 bytes after its SSLRequest"):
        startup(wire)


def test_startup_decoder_limits_and_states() -> None:
    with pytest.raises(
        MessageTooLarge, match="startup message of 101 bytes exceeds the limit of 100"
    ):
        startup(struct.pack("!ii", 101, m.PROTOCOL_3_0), max_startup_size=100)
    decoder = StartupDecoder()
    decoder.receive_data(encode(m.CancelRequest(1, 2)))
    assert decoder.next_message() == m.CancelRequest(1, 2)
    assert decoder.finished and decoder.next_message() is None
    with pytest.raises(LocalProtocolError, match="feed further data to a MessageDecoder"):
        decoder.receive_data(b"Q")
    cut = StartupDecoder()
    cut.receive_data(encode(m.StartupMessage({"user": "a"}))[:9])
    assert cut.next_message() is None
    cut.receive_eof()
    with pytest.raises(
        RemoteProtocolError,
        match=r"client closed the connection inside a startup packet \(9 of 16 bytes\)",
    ):
        cut.next_message()


# ----------------------------------------------------------------- errors on our side


@pytest.mark.parametrize(
    ("message", "problem"),
    [
        (m.Query("SELECT '\0'"), "Query text contains a NUL byte"),
        (m.StartupMessage({"": "x"}), "parameter names must not be empty"),
        (m.Bind("", "", (), (None,) * 40000, ()), "cannot encode Bind"),
        (m.Execute("", 2**31), "cannot encode Execute"),
        (m.BackendKeyData(-1, 0), "cannot encode BackendKeyData"),
        (m.ReadyForQuery("X"), "ReadyForQuery status must be 'I', 'T' or 'E'"),  # type: ignore[arg-type]
        (m.Describe("X"), "Describe kind must be 'S' (statement) or 'P' (portal)"),  # type: ignore[arg-type]
        (m.AuthenticationMD5Password(b"abc"), "salt must be 4 bytes, not 3"),
        (m.AuthenticationSASL(("",)), "mechanism names must not be empty"),
        (m.ErrorResponse({"SS": "x"}), "field code 'SS' must be one character"),
        (m.FieldDescription("x"), "FieldDescription is not a PostgreSQL protocol message"),
    ],
)
def test_encoding_something_the_protocol_cannot_carry_is_a_local_error(
    message: object, problem: str
) -> None:
    with pytest.raises(LocalProtocolError) as caught:
        encode(message)  # type: ignore[arg-type]
    assert problem in str(caught.value)


def test_decoder_arguments_are_checked() -> None:
    with pytest.raises(LocalProtocolError, match="side must be FRONTEND or BACKEND"):
        MessageDecoder("frontend")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="max_message_size must be"):
        MessageDecoder(FRONTEND, max_message_size=3)
