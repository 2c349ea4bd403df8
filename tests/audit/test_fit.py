"""schemas.audit.fit_event: an event whose JSON is over the size limit is cut to fit, saying
what was left out, and never loses who, where, when or the outcome's status."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from control.tctl.audit_cmd import format_event
from schemas.audit import (
    MAX_EVENT_BYTES,
    MAX_TEXT,
    BindEvent,
    ExecuteEvent,
    Outcome,
    QueryEvent,
    encode_event,
    fit_event,
    parse_event,
)

CONTEXT: dict[str, Any] = {
    "cluster": "example",
    "session_id": "s-1",
    "user": "alice",
    "roles": ["dba"],
    "db_service": "pg",
    "db_name": "postgres",
    "db_user": "alice",
    "client_addr": "127.0.0.1:5000",
    "agent": "agent-1",
}
KEPT = (*CONTEXT, "id", "time", "type")


def fitted(event: Any, limit: int = MAX_EVENT_BYTES) -> tuple[Any, bytes]:
    new, data = fit_event(event, encode_event(event), limit)
    assert len(data) <= limit
    assert data == encode_event(new)
    stored = parse_event(data)  # what the control plane validates
    for name in KEPT:
        assert getattr(stored, name) == getattr(event, name), name
    return new, data


def test_an_event_within_the_limit_is_left_as_it_is() -> None:
    event = QueryEvent(**CONTEXT, query="select 1", outcome=Outcome(status="ok", rows=1))
    data = encode_event(event)
    assert fit_event(event, data) == (event, data)
    assert json.loads(data)["shortened"] is None


def test_a_bind_of_many_parameters_keeps_the_first_with_their_formats() -> None:
    # 16,000 NULLs: what a 64 KiB Bind payload can hold (4 bytes each), 80 KB of JSON.
    event = BindEvent(
        **CONTEXT, statement_name="s", portal_name="",
        parameters=[None] * 16_000, parameter_formats=["text"] * 16_000,
    )
    new, _ = fitted(event, 32 * 1024)
    assert len(new.parameters) == len(new.parameter_formats) == 1024
    assert new.shortened is not None
    assert "parameters: the first 1024 of 16000 kept" in new.shortened


def test_text_that_json_escapes_sixfold_is_cut_to_fit() -> None:
    # A control character is six bytes of JSON (\u0001): 60,000 of them are 360 KB.
    value = "\x01" * 60_000
    event = BindEvent(
        **CONTEXT, statement_name="", portal_name="", parameters=[value, "small"],
        parameter_formats=["text", "text"],
        outcome=Outcome(status="ok"),
    )
    assert len(encode_event(event)) > 2 * MAX_EVENT_BYTES
    new, _ = fitted(event)
    first = new.parameters[0]
    assert first.startswith("\x01") and first.endswith("…(truncated)")
    assert len(first) < len(value)
    assert new.parameters[1] == "small"
    assert new.outcome == Outcome(status="ok")
    assert "parameters: texts cut to" in new.shortened
    assert "the longest was 60000" in new.shortened


def test_a_query_of_thousands_of_statements_keeps_its_text_and_first_outcomes() -> None:
    query = "select 1;" * 7000  # 63,000 characters, one outcome per statement
    event = QueryEvent(
        **CONTEXT, query=query,
        outcomes=[Outcome(status="ok", command_tag="SELECT 1", rows=1)] * 7000,
    )
    assert len(encode_event(event)) > MAX_EVENT_BYTES
    new, _ = fitted(event)
    assert new.query == query  # the outcomes were the excess: the statement text is whole
    assert new.truncated is False
    assert 0 < len(new.outcomes) < 7000
    assert new.outcomes[0] == event.outcomes[0]
    assert "outcomes: the first" in new.shortened


def test_a_huge_error_message_is_cut_but_its_sqlstate_kept() -> None:
    message = "x" * (4 * MAX_TEXT)  # RAISE EXCEPTION with a long text
    event = ExecuteEvent(
        **CONTEXT, portal_name="", query="select f()",
        outcome=Outcome(status="error", sqlstate="P0001", message=message),
    )
    new, _ = fitted(event, 16 * 1024)
    assert new.outcome.status == "error" and new.outcome.sqlstate == "P0001"
    assert new.outcome.message.endswith("…(truncated)")
    assert "outcome message cut to" in new.shortened


def test_a_cut_query_is_marked_truncated() -> None:
    event = QueryEvent(**CONTEXT, query="\x02" * MAX_TEXT)
    new, _ = fitted(event)
    assert new.truncated is True
    assert new.query.endswith("…(truncated)")
    assert new.shortened.startswith(f"{len(encode_event(event))} bytes of JSON")


_text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=3000)


@settings(max_examples=60, deadline=None)
@given(
    query=_text,
    params=st.lists(st.one_of(st.none(), _text), max_size=200),
    messages=st.lists(_text, max_size=200),
    limit=st.integers(min_value=2048, max_value=64 * 1024),
)
def test_any_event_fits_any_limit(
    query: str, params: list[str | None], messages: list[str], limit: int
) -> None:
    execute = ExecuteEvent(
        **CONTEXT, portal_name="p", query=query * 20, parameters=params,
        outcome=Outcome(status="error", sqlstate="XX000", message=(messages or [""])[0] * 10),
    )
    fitted(execute, limit)
    many = QueryEvent(
        **CONTEXT, query=query,
        outcomes=[Outcome(status="error", sqlstate="42601", message=m) for m in messages],
    )
    new, _ = fitted(many, limit)
    assert all(o.sqlstate == "42601" for o in new.outcomes)


def test_tctl_audit_search_text_says_an_event_was_shortened() -> None:
    event = QueryEvent(**CONTEXT, query="select 1;" * 7000,
                       outcomes=[Outcome(status="ok", command_tag="SELECT 1", rows=1)] * 7000)
    new, _ = fitted(event)
    line = format_event(new)
    assert line.endswith(f"[shortened: {new.shortened}]")
    assert "[shortened" not in format_event(event)
