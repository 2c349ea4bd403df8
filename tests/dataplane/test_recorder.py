"""SessionRecorder: scanned client and server messages to audit events, with outcomes.

The streams are real protocol bytes (encoded by the codec) cut at arbitrary places and fed
through the same MessageScanners the agent uses, so what is tested is what runs.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane.agent.audit import (
    CLIENT_CAPTURE,
    CLIENT_REPORT,
    SERVER_CAPTURE,
    SERVER_REPORT,
    MemoryAuditSink,
    SessionRecorder,
)
from dataplane.postgres import MessageScanner, ScannedMessage, encode
from dataplane.postgres import messages as m
from dataplane.postgres.errors import error_response
from schemas.audit import MAX_TEXT, parse_event

CONTEXT = {
    "cluster": "example", "session_id": "s1", "user": "alice", "roles": ["dba"],
    "db_service": "pg", "db_name": "main", "db_user": "alice", "client_addr": "127.0.0.1:5",
    "agent": "agent-1",
}  # fmt: skip


class Session:
    def __init__(self, max_payload: int = 64 * 1024) -> None:
        self.sink = MemoryAuditSink()
        self.recorder = SessionRecorder(self.sink, dict(CONTEXT))
        self.client = MessageScanner(CLIENT_CAPTURE, report=CLIENT_REPORT,
                                     max_payload=max_payload)
        self.server = MessageScanner(SERVER_CAPTURE, report=SERVER_REPORT)

    def send(self, *messages: Any, cut: int = 0) -> None:
        data = b"".join(encode(x) for x in messages)
        for piece in pieces(data, cut):
            self.recorder.client_messages(self.client.feed(piece))

    def answer(self, *messages: Any, cut: int = 0) -> None:
        data = b"".join(encode(x) for x in messages)
        for piece in pieces(data, cut):
            self.recorder.server_messages(self.server.feed(piece))

    def events(self, kind: str | None = None) -> list[Any]:
        return [e for e in self.sink.events if kind is None or e.type.endswith(kind)]


def pieces(data: bytes, cut: int) -> list[bytes]:
    if not cut:
        return [data]
    return [data[i : i + cut] for i in range(0, len(data), cut)]


def error(code: str, text: str) -> m.ErrorResponse:
    return error_response(code, text)


@settings(deadline=None, max_examples=50)
@given(st.integers(0, 40))
def test_simple_queries_with_several_statements_and_an_error(cut: int) -> None:
    s = Session()
    s.send(m.Query("select 1; select 1/0; select 3"), cut=cut)
    s.answer(
        m.RowDescription(()), m.DataRow((b"1",)), m.CommandComplete("SELECT 1"),
        error("22012", "division by zero"), m.ReadyForQuery("I"), cut=cut,
    )
    s.send(m.Query("insert into t values (1), (2)"), cut=cut)
    s.answer(m.CommandComplete("INSERT 0 2"), m.ReadyForQuery("I"), cut=cut)
    first, second = s.events("query")
    assert first.query == "select 1; select 1/0; select 3"
    assert [(o.status, o.command_tag, o.sqlstate) for o in first.outcomes] == [
        ("ok", "SELECT 1", None), ("error", None, "22012")
    ]
    assert first.outcome.sqlstate == "22012"
    assert (second.outcome.command_tag, second.outcome.rows) == ("INSERT 0 2", 2)
    for event in s.events():
        parse_event(event.model_dump_json())  # every event is valid on the wire


def test_extended_protocol_batch_with_named_statement_and_portal() -> None:
    s = Session()
    s.send(
        m.Parse("stmt", "select $1::int + $2", (23, 0)),
        m.Describe("S", "stmt"),
        m.Sync(),
    )
    s.answer(m.ParseComplete(), m.ParameterDescription((23, 23)), m.NoData(),
             m.ReadyForQuery("I"))
    s.send(
        m.Bind("p1", "stmt", (0, 1), (b"41", b"\x00\x00\x00\x01"), ()),
        m.Execute("p1", 0),
        m.Close("P", "p1"),
        m.Sync(),
    )
    s.answer(m.BindComplete(), m.DataRow((b"42",)), m.CommandComplete("SELECT 1"),
             m.CloseComplete(), m.ReadyForQuery("I"))
    (parse,) = s.events("parse")
    assert (parse.statement_name, parse.query, parse.outcome.status) == (
        "stmt", "select $1::int + $2", "ok"
    )
    (bind,) = s.events("bind")
    assert bind.parameters == ["41", "AAAAAQ=="]
    assert bind.parameter_formats == ["text", "binary"]
    (execute,) = s.events("execute")
    assert (execute.portal_name, execute.statement_name, execute.query) == (
        "p1", "stmt", "select $1::int + $2"
    )
    assert execute.parameters == ["41", "AAAAAQ=="]
    assert execute.outcome.command_tag == "SELECT 1"
    (close,) = s.events("close")
    assert (close.target, close.name) == ("portal", "p1")


def test_an_error_skips_the_rest_of_the_batch_up_to_sync() -> None:
    s = Session()
    s.send(
        m.Parse("", "select nope"), m.Bind("", ""), m.Execute(""), m.Sync(),
        m.Parse("", "select 2"), m.Bind("", ""), m.Execute(""), m.Sync(),
    )
    s.answer(error("42703", 'column "nope" does not exist'), m.ReadyForQuery("I"),
             m.ParseComplete(), m.BindComplete(), m.CommandComplete("SELECT 1"),
             m.ReadyForQuery("I"))
    parses, binds, executes = s.events("parse"), s.events("bind"), s.events("execute")
    assert parses[0].outcome.sqlstate == "42703"
    assert binds[0].outcome.message.startswith("not executed")
    assert executes[0].outcome.message.startswith("not executed")
    assert (parses[1].outcome.status, binds[1].outcome.status) == ("ok", "ok")
    assert executes[1].outcome.command_tag == "SELECT 1"


def test_portal_suspended_empty_query_and_function_calls() -> None:
    s = Session()
    s.send(m.Bind("cur", "s"), m.Execute("cur", 10), m.Sync())
    s.answer(m.BindComplete(), m.PortalSuspended(), m.ReadyForQuery("T"))
    s.send(m.Query(""))
    s.answer(m.EmptyQueryResponse(), m.ReadyForQuery("I"))
    s.send(m.FunctionCall(1598, (0,), (b"abc",), 0))
    s.answer(m.FunctionCallResponse(b"x"), m.ReadyForQuery("I"))
    assert s.events("execute")[0].outcome.command_tag == "portal suspended"
    assert s.events("query")[0].outcome.command_tag == ""
    (function,) = s.events("function")
    assert (function.function_oid, function.arguments, function.outcome.status) == (
        1598, ["abc"], "ok"
    )


def test_copy_data_never_reaches_the_recorder() -> None:
    s = Session()
    s.send(m.Query("copy t from stdin"))
    s.answer(m.CopyInResponse(0, ()))
    s.send(m.CopyData(b"secret row 1\n"), m.CopyData(b"secret row 2\n"), m.CopyDone())
    s.answer(m.CommandComplete("COPY 2"), m.ReadyForQuery("I"))
    s.send(m.Query("copy t to stdout"))
    s.answer(m.CopyOutResponse(0, ()), m.CopyData(b"secret out\n"), m.CopyDone(),
             m.CommandComplete("COPY 1"), m.ReadyForQuery("I"))
    dumped = "".join(e.model_dump_json() for e in s.events())
    assert "secret" not in dumped
    assert [e.outcome.rows for e in s.events("query")] == [2, 1]


def test_long_queries_and_parameters_are_cut_and_marked() -> None:
    s = Session(max_payload=1000)
    s.send(m.Query("select '" + "q" * 5000 + "'"))
    s.send(m.Bind("", "", (), (b"p" * 3000,)))
    s.answer(m.CommandComplete("SELECT 1"), m.ReadyForQuery("I"), m.BindComplete())
    (query,) = s.events("query")
    assert query.truncated and len(query.query) == 1000
    s.send(m.Sync())
    s.answer(m.ReadyForQuery("I"))
    (bind,) = s.events("bind")
    assert bind.parameters[0].endswith("…(truncated)")
    big = Session()
    big.send(m.Bind("", "", (), (b"v" * (MAX_TEXT + 10),)), m.Sync())
    big.answer(m.BindComplete(), m.ReadyForQuery("I"))
    value = big.events("bind")[0].parameters[0]
    assert value.endswith("…(truncated)") and len(value) <= MAX_TEXT + 20


def test_requests_without_answers_are_flushed_at_the_end() -> None:
    s = Session()
    s.send(m.Query("select pg_sleep(100)"))
    s.recorder.session_end(10, 20, "revoked")
    query, end = s.events()
    assert query.outcome is None and query.query == "select pg_sleep(100)"
    assert (end.bytes_from_client, end.bytes_from_server, end.reason) == (10, 20, "revoked")


@settings(deadline=None, max_examples=200)
@given(st.lists(st.binary(max_size=60), max_size=8), st.lists(st.binary(max_size=60), max_size=8))
def test_garbage_payloads_never_raise_into_the_relay(
    client: list[bytes], server: list[bytes]
) -> None:
    s = Session()
    for payload in client:
        for code in b"QPBECFSX":
            s.recorder.client_messages([ScannedMessage(bytes([code]), payload, len(payload))])
    for payload in server:
        for code in b"CEVZ123Is":
            s.recorder.server_messages([ScannedMessage(bytes([code]), payload, len(payload))])
    s.recorder.session_end(0, 0, "done")
    for event in s.events():
        parse_event(event.model_dump_json())


# -- at rest: whether a session left its server with nothing under way (server reuse) --------


def test_at_rest_only_when_every_request_is_answered_outside_a_transaction() -> None:
    s = Session()
    assert s.recorder.at_rest  # nothing asked yet
    s.send(m.Query("select 1"))
    assert not s.recorder.at_rest  # waiting for the answer
    s.answer(m.CommandComplete("SELECT 1"), m.ReadyForQuery("I"))
    assert s.recorder.at_rest
    s.send(m.Query("begin"))
    s.answer(m.CommandComplete("BEGIN"), m.ReadyForQuery("T"))
    assert not s.recorder.at_rest  # inside a transaction
    s.send(m.Query("select x"))
    s.answer(error("42703", "no x"), m.ReadyForQuery("E"))
    assert not s.recorder.at_rest  # inside a failed one
    s.send(m.Query("rollback"))
    s.answer(m.CommandComplete("ROLLBACK"), m.ReadyForQuery("I"))
    assert s.recorder.at_rest


def test_at_rest_waits_for_the_sync_of_the_extended_protocol() -> None:
    s = Session()
    s.send(m.Parse("", "select $1"), m.Bind("", "", (), (b"1",)), m.Describe("P"),
           m.Execute(""))
    assert not s.recorder.at_rest  # no Sync yet: an implicit transaction may be open
    s.answer(m.ParseComplete(), m.BindComplete(), m.NoData(), m.CommandComplete("SELECT 1"))
    assert not s.recorder.at_rest
    s.send(m.Sync())
    assert not s.recorder.at_rest
    s.answer(m.ReadyForQuery("I"))
    assert s.recorder.at_rest
    s.send(m.Describe("S", "named"))  # a Describe alone starts a transaction too
    assert not s.recorder.at_rest
    s.send(m.Sync())
    s.answer(m.NoData(), m.ReadyForQuery("I"))
    assert s.recorder.at_rest


def test_at_rest_not_in_the_middle_of_a_copy_or_after_a_fatal_error() -> None:
    s = Session()
    s.send(m.Query("copy t from stdin"), m.CopyData(b"1\n"))
    assert not s.recorder.at_rest
    s.send(m.CopyDone())
    s.answer(m.CommandComplete("COPY 1"), m.ReadyForQuery("I"))
    assert s.recorder.at_rest
    s.answer(error("57P01", "terminating connection due to administrator command"))
    assert not s.recorder.at_rest


# -- database and role commands: the agent's kept server connections go (server reuse) -----


@pytest.mark.parametrize(
    "sql",
    [
        "DROP DATABASE scratch",
        "drop database if exists scratch",
        "  Alter\n  DataBase scratch RENAME TO other",
        "create database copy template scratch",
        "select 1; drop database scratch",
        "ALTER ROLE alice NOLOGIN",
        "alter user alice set search_path = elsewhere",
        "drop role if exists bob",
        "REVOKE CONNECT ON DATABASE main FROM public",
    ],
)
def test_database_and_role_commands_are_told_in_both_protocols(sql: str) -> None:
    told: list[str] = []
    for protocol, messages in (("simple", [m.Query(sql)]),
                               ("extended", [m.Parse("", sql), m.Sync()])):
        s = Session()
        s.recorder.on_cluster_command = lambda: told.append(protocol)  # noqa: B023
        s.send(*messages)
    assert told == ["simple", "extended"]


@pytest.mark.parametrize(
    "sql",
    [
        "select current_database()",
        "select datname from pg_database",
        "create table database_notes (x int)",
        "alter table databases rename to database_list",
        "select current_user, session_user",
        "select * from users where role = 'admin'",
        "create role carol",
        "grant connect on database main to carol",
    ],
)
def test_other_statements_naming_a_database_or_role_are_not(sql: str) -> None:
    # (one quoting "drop database" in a string is told: that costs a login, nothing else)
    s = Session()
    told: list[str] = []
    s.recorder.on_cluster_command = lambda: told.append("told")
    s.send(m.Query(sql), m.Parse("", sql), m.Sync())
    assert told == []
