"""schemas.audit.EventWriter: the agent's data path writes events without models, and what
it writes must be, byte for byte, what `encode_event` writes for the model of the same event
(the control plane stores those bytes and hashes them; a reader parses them back)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.audit import (
    BindEvent,
    CloseEvent,
    EncodedEvent,
    EventWriter,
    ExecuteEvent,
    FunctionCallEvent,
    Outcome,
    ParseEvent,
    QueryEvent,
    SessionEndEvent,
    SessionStartEvent,
    datetime_of,
    encode_event,
)

texts = st.text(max_size=40)  # any Unicode but lone surrogates, control characters included
maybe_texts = st.none() | texts
ints = st.integers(min_value=-(2**63), max_value=2**63 - 1)
contexts = st.fixed_dictionaries(
    {
        "cluster": texts, "session_id": texts, "user": texts, "roles": st.lists(texts),
        "db_service": texts, "db_name": texts, "db_user": texts,
    },
    optional={"client_addr": texts, "agent": texts},
)
outcomes = st.builds(
    Outcome,
    status=st.sampled_from(["ok", "error"]),
    command_tag=maybe_texts,
    rows=st.none() | ints,
    sqlstate=maybe_texts,
    message=maybe_texts,
)
times = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1),
    timezones=st.just(UTC) | st.builds(timezone, st.timedeltas(
        min_value=timedelta(hours=-23), max_value=timedelta(hours=23)
    ).map(lambda d: timedelta(minutes=d // timedelta(minutes=1)))),
)
common = {"id": texts, "time": times}
optional_common = {"shortened": maybe_texts}
by_class = {
    SessionStartEvent: ({"success": st.booleans()}, {"reason": maybe_texts}),
    SessionEndEvent: (
        {"duration_ms": ints, "bytes_from_client": ints, "bytes_from_server": ints},
        {"reason": texts},
    ),
    QueryEvent: (
        {"query": texts},
        {"truncated": st.booleans(), "outcome": st.none() | outcomes,
         "outcomes": st.lists(outcomes, max_size=3)},
    ),
    ParseEvent: (
        {"statement_name": texts, "query": texts},
        {"truncated": st.booleans(), "outcome": st.none() | outcomes},
    ),
    BindEvent: (
        {"statement_name": texts, "portal_name": texts},
        {"parameters": st.lists(maybe_texts, max_size=4),
         "parameter_formats": st.lists(st.sampled_from(["text", "binary"]), max_size=4),
         "outcome": st.none() | outcomes},
    ),
    ExecuteEvent: (
        {"portal_name": texts},
        {"statement_name": maybe_texts, "query": maybe_texts,
         "parameters": st.lists(maybe_texts, max_size=4), "outcome": st.none() | outcomes},
    ),
    CloseEvent: ({"target": st.sampled_from(["statement", "portal"]), "name": texts}, {}),
    FunctionCallEvent: (
        {"function_oid": st.integers(min_value=0, max_value=2**32 - 1)},
        {"arguments": st.lists(maybe_texts, max_size=4), "outcome": st.none() | outcomes},
    ),
}


@st.composite
def events(draw: st.DrawFn) -> tuple[dict, type, dict]:
    cls = draw(st.sampled_from(sorted(by_class, key=lambda c: c.__name__)))
    required, optional = by_class[cls]
    values = draw(st.fixed_dictionaries(
        {**common, **required}, optional={**optional_common, **optional}
    ))
    return draw(contexts), cls, values


@settings(max_examples=400, deadline=None)
@given(events())
def test_every_event_is_written_as_encode_event_writes_its_model(
    case: tuple[dict, type, dict],
) -> None:
    context, cls, values = case
    written = EventWriter(context).encode(cls, values)
    model = cls(**context, **values)
    assert written == EncodedEvent(model.id, model.type, encode_event(model))
    assert written.model() == model


@settings(max_examples=300, deadline=None)
@given(
    contexts, texts, st.integers(min_value=0, max_value=2**62), texts, st.booleans(),
    st.lists(outcomes, max_size=3),
)
def test_a_query_event_written_field_by_field_is_its_models_json(
    context: dict, event_id: str, time_ns: int, query: str, truncated: bool,
    results: list[Outcome],
) -> None:
    writer = EventWriter(context)
    written = writer.query(event_id, time_ns, query, truncated, results)
    model = QueryEvent(
        **context, id=event_id, time=datetime_of(time_ns), query=query, truncated=truncated,
        outcome=results[-1] if results else None, outcomes=results,
    )
    assert written.json == encode_event(model)
    assert (written.id, written.type) == (event_id, "db.session.query")
    # The same second again (the writer keeps its text) and a whole second (no fraction).
    again = writer.query(event_id, time_ns + 1000, query, truncated, results)
    assert again.model().time == datetime_of(time_ns + 1000)
    whole = time_ns - time_ns % 1_000_000_000
    assert writer.query(event_id, whole, query, truncated, results).model().time == \
        datetime_of(whole)


def test_a_lone_surrogate_is_refused_so_that_the_model_can_say_what_is_wrong() -> None:
    writer = EventWriter({"cluster": "c", "session_id": "s", "user": "u", "db_service": "d",
                          "db_name": "n", "db_user": "u"})
    with pytest.raises(ValueError, match="surrogate"):
        writer.query("id", 0, "SELECT '\udcff'", False, [])
    with pytest.raises(ValueError, match="surrogate"):
        writer.encode(ParseEvent, {"id": "i", "time": datetime.now(UTC),
                                   "statement_name": "\ud800", "query": "q"})


def test_id_and_time_must_be_given_and_unknown_value_types_are_refused() -> None:
    writer = EventWriter({"cluster": "c", "session_id": "s", "user": "u", "db_service": "d",
                          "db_name": "n", "db_user": "u"})
    with pytest.raises(KeyError, match="'time'"):
        writer.encode(CloseEvent, {"id": "i", "target": "portal", "name": ""})
    with pytest.raises(TypeError, match="float"):
        writer.encode(FunctionCallEvent, {"id": "i", "time": datetime.now(UTC),
                                          "function_oid": 1.5})
