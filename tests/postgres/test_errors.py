"""ErrorResponse builders: PostgreSQL's field order, and what a client decodes from them."""

from __future__ import annotations

import pytest

from dataplane.postgres import (
    BACKEND,
    MessageDecoder,
    encode,
    error_response,
    errors,
    fatal,
    notice_response,
)
from dataplane.postgres import messages as m


def test_fatal_error_has_postgresql_fields_in_order_and_round_trips() -> None:
    err = fatal(
        errors.INVALID_AUTHORIZATION_SPECIFICATION,
        'access to database "aurora" denied for user "alice"',
        detail="No role of alice allows db_name aurora.",
        hint="Ask an administrator for a role that allows it.",
    )
    assert list(err.fields) == ["S", "V", "C", "M", "D", "H"]
    assert (err.severity, err.sqlstate) == ("FATAL", "28000")
    wire = encode(err)
    assert wire.startswith(b"E") and b"SFATAL\0VFATAL\0C28000\0M" in wire
    decoder = MessageDecoder(BACKEND)
    decoder.receive_data(wire)
    assert decoder.next_message() == err


def test_optional_fields_are_left_out_and_severity_is_chosen() -> None:
    err = error_response(errors.QUERY_CANCELED, "canceling statement due to user request")
    assert err.fields == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "57014",
        "M": "canceling statement due to user request",
    }
    note = notice_response("session will end at certificate expiry", severity="WARNING")
    assert isinstance(note, m.NoticeResponse)
    assert (note.severity, note.sqlstate, note.detail) == ("WARNING", "00000", None)


def test_a_malformed_sqlstate_is_refused() -> None:
    with pytest.raises(ValueError, match="SQLSTATE must be 5 ASCII letters or digits"):
        fatal("2800", "x")
