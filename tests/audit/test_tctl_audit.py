"""`tctl audit verify` and `tctl audit search` on a real data dir."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from control.audit_store import AuditStore
from control.tctl import UsageError, main
from control.tctl.audit_cmd import parse_when
from schemas.audit import BindEvent, ExecuteEvent, Outcome, ParseEvent
from tests.audit.conftest import (
    Clock,
    format1_log,
    numbered_events,
    query_event,
    session_end,
    session_start,
)

NOW = datetime.now(UTC)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A data dir whose audit log holds a small session of each kind of event."""
    common = {"cluster": "example", "session_id": "s9", "user": "dave", "roles": ["dev"],
              "db_service": "aurora", "db_name": "app", "db_user": "app"}
    events = [
        session_start("bob"),
        query_event("select *\nfrom accounts", time=NOW - timedelta(hours=3)),
        query_event("selec 1", user="carol", db_service="local", db_name="app", db_user="ro",
                    outcome=Outcome(status="error", sqlstate="42601",
                                    message='syntax error at or near "selec"')),
        query_event("select '\x1b[31mred\x1b[0m'", user="eve"),
        ParseEvent(**common, statement_name="s1", query="select $1::int"),
        BindEvent(**common, statement_name="s1", portal_name="", parameters=["42", None],
                  parameter_formats=["text", "text"]),
        ExecuteEvent(**common, portal_name="", statement_name="s1", query="select $1::int",
                     parameters=["42", None],
                     outcome=Outcome(status="ok", command_tag="SELECT 1", rows=1)),
        session_start("mallory", success=False, reason="no role allows db user postgres"),
        session_end("bob"),
    ]
    with AuditStore(tmp_path / "audit") as store:
        store.append(events, "agent-1")
    return tmp_path


def tctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# -- verify --------------------------------------------------------------------------------


def test_verify_exit_0_when_intact(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = tctl(capsys, "audit", "verify", "--data-dir", str(data_dir))
    assert code == 0
    assert out == (f"Audit log {data_dir / 'audit'} is intact: 9 record(s), seq 1 to 9, in 1 "
                   "day file(s).\n")


def test_verify_exit_1_names_the_first_bad_line(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (path,) = (data_dir / "audit").glob("*.jsonl")
    text = path.read_text()
    path.write_text(text.replace("select *", "select 1", 1))  # one line edited
    code, out, _ = tctl(capsys, "audit", "verify", "--data-dir", str(data_dir))
    assert code == 1
    first = out.splitlines()[0]
    assert first == (f"Audit log {data_dir / 'audit'} was changed: {path}:2: its hash does "
                     "not match its content: the record was altered")
    assert out.splitlines()[-1] == (f"1 problem(s) in 9 record(s) of 1 day file(s); the first "
                                    f"is at {path}:2.")


def test_verify_and_search_read_a_log_continued_from_the_earlier_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = tmp_path / "audit"
    audit.mkdir()
    old = [query_event("select 'written by an earlier version'", user="frank")]
    format1_log(audit, old, "2024-04-30T10:00:00.000000Z")
    with AuditStore(audit, clock=Clock()) as store:
        store.append([query_event("select 'written now'", user="frank")], "agent-1")
    code, out, _ = tctl(capsys, "audit", "verify", "--data-dir", str(tmp_path))
    assert code == 0
    assert out == (
        f"Audit log {audit} is intact: 2 record(s), seq 1 to 2, in 2 day file(s).\n"
        "note: 1 record(s) are in the format of earlier versions (sorted keys, the hash over "
        "the parsed record) and were checked as such\n"
    )
    code, out, _ = tctl(capsys, "audit", "search", "--user", "frank", "--data-dir",
                        str(tmp_path))
    assert code == 0
    assert [line.split("  ")[-1] for line in out.splitlines()] == [
        "select 'written by an earlier version' -> SELECT 1 (1 row)",
        "select 'written now' -> SELECT 1 (1 row)",
    ]


def test_verify_without_a_log_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = tctl(capsys, "audit", "verify", "--data-dir", str(tmp_path))
    assert code == 0 and "nothing to verify" in out


def test_verify_a_missing_data_dir_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = tctl(capsys, "audit", "verify", "--data-dir", str(tmp_path / "nope"))
    assert code == 2 and "does not exist" in err


def test_verify_through_the_installed_command(data_dir: Path) -> None:
    tctl_bin = Path(sys.executable).parent / "tctl"
    ok = subprocess.run([tctl_bin, "audit", "verify", "--data-dir", data_dir],
                        check=False, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    (path,) = (data_dir / "audit").glob("*.jsonl")
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:4] + lines[5:]))
    bad = subprocess.run([tctl_bin, "audit", "verify", "--data-dir", data_dir],
                         check=False, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert f"{path}:5: seq 6 follows seq 4" in bad.stdout
    assert "Traceback" not in bad.stderr


# -- search --------------------------------------------------------------------------------


def test_search_text_one_line_per_event(data_dir: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    code, out, err = tctl(capsys, "audit", "search", "--data-dir", str(data_dir))
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 9
    parts = [line.split("  ") for line in lines]
    assert [p[1] for p in parts] == [
        "db.session.start", "db.session.query", "db.session.query", "db.session.query",
        "db.session.postgres.statements.parse", "db.session.postgres.statements.bind",
        "db.session.postgres.statements.execute", "db.session.start", "db.session.end",
    ]
    assert parts[1][2:] == ["alice", "aurora/postgres/alice",
                            "select * from accounts -> SELECT 1 (1 row)"]
    assert parts[2][2:] == ["carol", "local/app/ro",
                            'selec 1 -> ERROR 42601: syntax error at or near "selec"']
    assert "\x1b" not in out and "\\x1b[31mred" in lines[3]
    assert parts[5][4] == "bind s1 ['42', NULL]"
    assert parts[6][4] == "execute select $1::int ['42', NULL] -> SELECT 1 (1 row)"
    assert parts[7][4] == "session refused: no role allows db user postgres"
    assert parts[8][4] == ("session ended after 1.5s (from client 300 B, from server 4.2 kB): "
                           "client disconnected")
    time_text = parts[1][0]
    assert datetime.strptime(time_text, "%Y-%m-%d %H:%M:%S.%fZ")


def test_search_filters_and_json(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = tctl(capsys, "audit", "search", "--data-dir", str(data_dir), "--type",
                        "db.session.query", "--db", "local", "--format", "json")
    assert code == 0
    (event,) = json.loads(out)
    assert (event["user"], event["query"], event["outcome"]["sqlstate"]) == (
        "carol", "selec 1", "42601")
    code, out, _ = tctl(capsys, "audit", "search", "--data-dir", str(data_dir), "--user",
                        "dave", "--type", "db.session.postgres", "--format", "json")
    assert [e["type"].rsplit(".", 1)[1] for e in json.loads(out)] == [
        "parse", "bind", "execute"]
    code, out, _ = tctl(capsys, "audit", "search", "--data-dir", str(data_dir), "--since",
                        "2h", "--user", "alice", "--format", "json")
    assert json.loads(out) == []  # alice's query was 3 hours ago
    code, out, _ = tctl(capsys, "audit", "search", "--data-dir", str(data_dir), "--since",
                        "4h", "--user", "alice", "--format", "json")
    assert len(json.loads(out)) == 1


def test_search_limit_says_when_it_cut(data_dir: Path, capsys: pytest.CaptureFixture[str]
                                       ) -> None:
    code, out, err = tctl(capsys, "audit", "search", "--data-dir", str(data_dir), "--limit", "2")
    assert code == 0 and len(out.splitlines()) == 2
    assert "showing the first 2 matching events" in err
    code, out, err = tctl(capsys, "audit", "search", "--data-dir", str(data_dir), "--limit", "0")
    assert len(out.splitlines()) == 9 and err == ""


@pytest.mark.parametrize("since", ["yesterday", "12", "2024-13-01"])
def test_search_bad_since_is_a_usage_error(
    data_dir: Path, capsys: pytest.CaptureFixture[str], since: str
) -> None:
    code, _, err = tctl(capsys, "audit", "search", "--data-dir", str(data_dir), "--since", since)
    assert code == 2
    assert err.startswith(f"tctl: error: --since {since!r} is neither a duration")


def test_parse_when() -> None:
    now = datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert parse_when("90m", "--since", now) == datetime(2024, 5, 1, 10, 30, tzinfo=UTC)
    assert parse_when("2024-04-30", "--since", now) == datetime(2024, 4, 30, tzinfo=UTC)
    assert parse_when("2024-04-30T10:00:00+02:00", "--since", now) == datetime(
        2024, 4, 30, 8, tzinfo=UTC)
    with pytest.raises(UsageError):
        parse_when("soon", "--until", now)


def test_search_reads_across_days(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock(datetime.now(UTC) - timedelta(days=2))
    with AuditStore(tmp_path / "audit", clock=clock) as store:
        for _ in range(3):
            store.append(numbered_events(2, time=clock.now))
            clock.advance(days=1)
    code, out, _ = tctl(capsys, "audit", "search", "--data-dir", str(tmp_path), "--since",
                        "36h", "--format", "json")
    assert code == 0 and len(json.loads(out)) == 4


# -- prune ----------------------------------------------------------------------------------


def days_ago_log(tmp_path: Path, *days_ago: int) -> list[Path]:
    """A data dir whose audit log has 2 records arriving on each of `days_ago` (oldest
    first): its day files."""
    now = datetime.now(UTC)
    clock = Clock(now - timedelta(days=days_ago[0]))
    with AuditStore(tmp_path / "audit", clock=clock) as store:
        for ago in days_ago:
            clock.now = now - timedelta(days=ago)
            store.append(numbered_events(2, time=clock.now))
    return sorted((tmp_path / "audit").glob("*.jsonl"))


def test_prune_deletes_old_days_and_verify_still_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = days_ago_log(tmp_path, 20, 10, 2, 0)
    assert len(files) == 4
    code, out, err = tctl(capsys, "audit", "prune", "--keep", "7d", "--dry-run",
                          "--data-dir", str(tmp_path))
    assert code == 0 and err == ""
    assert out.startswith(f"Would delete 2 day file(s) of {tmp_path / 'audit'}, "
                          f"{files[0].stem} to {files[1].stem} (")
    assert sorted((tmp_path / "audit").glob("*.jsonl")) == files  # a dry run changes nothing

    code, out, err = tctl(capsys, "audit", "prune", "--keep", "7d", "--data-dir", str(tmp_path))
    assert code == 0 and err == ""
    assert "Deleted 2 day file(s)" in out and "the log now starts at seq 5" in out
    assert sorted((tmp_path / "audit").glob("*.jsonl")) == files[2:]

    code, out, _ = tctl(capsys, "audit", "verify", "--data-dir", str(tmp_path))
    assert code == 0, out
    assert "seq 5 to 8" in out and "removed by retention" in out
    code, out, _ = tctl(capsys, "audit", "search", "--data-dir", str(tmp_path), "--format",
                        "json")
    assert code == 0 and len(json.loads(out)) == 4

    code, out, _ = tctl(capsys, "audit", "prune", "--keep", "7d", "--data-dir", str(tmp_path))
    assert code == 0
    assert out == (f"Nothing to prune in {tmp_path / 'audit'}: its oldest day file is "
                   f"{files[2].stem}, within the 7d kept.\n")


def test_prune_keeps_the_newest_file_and_warns_inside_the_dedupe_window(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = days_ago_log(tmp_path, 30)
    code, out, err = tctl(capsys, "audit", "prune", "--keep", "3d", "--data-dir", str(tmp_path))
    assert code == 0
    assert "its only day file before" in out and "is the newest, which stays" in out
    assert "keeping less than 7 days" in err and "no longer recognised as a duplicate" in err
    assert sorted((tmp_path / "audit").glob("*.jsonl")) == files


@pytest.mark.parametrize(
    ("keep", "message"),
    [("12h", "keep at least one day"), ("soon", "--keep 'soon'")],
)
def test_prune_refuses_a_bad_keep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], keep: str, message: str
) -> None:
    files = days_ago_log(tmp_path, 20, 0)
    code, out, err = tctl(capsys, "audit", "prune", "--keep", keep, "--data-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert err.startswith("tctl: error: ") and message in err
    assert sorted((tmp_path / "audit").glob("*.jsonl")) == files


def test_prune_without_a_log_yet(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = tctl(capsys, "audit", "prune", "--keep", "90d", "--data-dir", str(tmp_path))
    assert code == 0 and "nothing to prune" in out


def test_prune_deletes_nothing_when_the_kept_files_hold_no_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = days_ago_log(tmp_path, 20)
    newest = tmp_path / "audit" / f"{datetime.now(UTC).date().isoformat()}.jsonl"
    newest.write_bytes(b"")  # a first write that a crash cut, say
    code, out, _ = tctl(capsys, "audit", "prune", "--keep", "7d", "--data-dir", str(tmp_path))
    assert code == 0 and "hold no record yet" in out and "nothing was deleted" in out
    assert sorted((tmp_path / "audit").glob("*.jsonl")) == [*files, newest]
