"""`tctl audit`: read the control plane's audit log, check that nobody changed it, prune it.

    tctl audit verify [--data-dir DIR]
        Re-reads every record of <data_dir>/audit and checks the hash chain. Exit 0 when the
        log is intact, 1 with the first bad file:line and why (an altered, removed or
        reordered line, a removed day file, records missing at the end).
    tctl audit search [--type T] [--user U] [--db D] [--since S] [--until S] [--limit N]
                      [--format text|json] [--data-dir DIR]
        Events in the order the control plane received them: text is one line each (time,
        type, user, db service/name/user, the query or outcome), json is the events.
    tctl audit prune --keep DURATION [--dry-run] [--data-dir DIR]
        Retention: deletes the day files of records that arrived before the last DURATION
        (90d, 2160h), never the newest file, and notes where the log now starts
        (RETENTION.json) so that `verify` tells pruning from tampering.

It reads the files directly (the control plane need not be running, and may be: `prune`
never touches the file it appends to). Only `prune` changes the log, and only by deleting
whole day files. Text output escapes control characters: a query cannot drive the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from control.audit_store import (
    DEFAULT_DEDUPE_WINDOW,
    day_files,
    prunable,
    prune_log,
    read_retention,
    search_log,
    verify_log,
)
from control.tctl import UsageError, add_data_dir_argument, data_dir_of
from schemas.audit import (
    AuditEvent,
    BindEvent,
    CloseEvent,
    ExecuteEvent,
    FunctionCallEvent,
    Outcome,
    ParseEvent,
    QueryEvent,
    SessionEndEvent,
    SessionStartEvent,
)
from schemas.durations import DurationError, parse_duration

DEFAULT_LIMIT = 1000
QUERY_WIDTH = 200

SEARCH_EPILOG = """\
--since and --until take a duration back from now (30m, 12h, 168h) or a UTC time
(2024-05-01, 2024-05-01T10:00:00Z; a time without a zone is UTC).
--type takes an event type (db.session.query) or a dotted prefix of types
(db.session.postgres matches parse, bind, execute, close and function calls).
--db is the database service name (the name in `tsh db ls`).

exit status: 0 (also when nothing matches), 2 usage error or unreadable data dir
"""

VERIFY_EPILOG = """\
exit status:
  0  the log is intact
  1  the log was changed: the first bad file:line is printed with the reason
  2  usage error, or the data dir cannot be read
"""

PRUNE_EPILOG = """\
Day files hold the records that arrived on one UTC day; --keep 90d deletes those of days
before the one 90 days ago. The newest file always stays, whatever its day. RETENTION.json
then says which record the log starts at, so `tctl audit verify` accepts the shorter log and
still finds anything else removed. Archive the files first if you must keep them longer.

Below 7 days, a batch an agent sends again after a control plane restart may no longer be
recognised as a duplicate (the control plane rebuilds its index of event ids from the last
7 days of files): the command says so and goes on.

exit status: 0 (also when there is nothing to delete), 2 usage error or unreadable data dir
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "audit",
        help="search the audit log, verify its hash chain, prune old days",
        description="Search database session events (who ran which query where), check "
        "that the audit log was not changed, and delete its oldest days (retention).",
    )
    asub = p.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    verify = asub.add_parser(
        "verify",
        help="check the audit log's hash chain",
        description="Re-read every record of the audit log and check its hash chain, from "
        "the first day file to the last record the control plane confirmed.",
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_dir_argument(verify)
    verify.set_defaults(func=run_verify)

    search = asub.add_parser(
        "search",
        help="find audit events",
        description="Print the audit events that match every filter given, oldest first.",
        epilog=SEARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    search.add_argument("--type", metavar="T", help="event type, or a dotted prefix of types")
    search.add_argument("--user", metavar="U", help="Teleport user name")
    search.add_argument("--db", metavar="D", help="database service name")
    search.add_argument("--since", metavar="S", help="events at or after: 30m, 12h, or a time")
    search.add_argument("--until", metavar="S", help="events at or before: 30m, 12h, or a time")
    search.add_argument(
        "--limit", metavar="N", type=int, default=DEFAULT_LIMIT,
        help=f"print at most N events, the oldest first (default {DEFAULT_LIMIT}; 0: all)",
    )
    search.add_argument("--format", choices=["text", "json"], default="text")
    add_data_dir_argument(search)
    search.set_defaults(func=run_search)

    prune = asub.add_parser(
        "prune",
        help="delete the oldest day files of the audit log (retention)",
        description="Delete the day files of records that arrived before the last --keep, "
        "and note where the log now starts so that `tctl audit verify` still passes.",
        epilog=PRUNE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    prune.add_argument(
        "--keep", metavar="DURATION", required=True,
        help="how much of the log to keep, counted back from today: 90d, 2160h (at least 1d)",
    )
    prune.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted, delete nothing"
    )
    add_data_dir_argument(prune)
    prune.set_defaults(func=run_prune)


def _audit_dir(args: argparse.Namespace) -> Path:
    return data_dir_of(args) / "audit"


# -- verify -------------------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    directory = _audit_dir(args)
    if not directory.is_dir():
        print(f"No audit log in {directory} yet: nothing to verify.")
        return 0
    report = verify_log(directory)
    lines = []
    if report.ok:
        if report.records == 0:
            lines.append(f"Audit log {directory}: no records yet.")
        else:
            lines.append(
                f"Audit log {directory} is intact: {report.records} record(s), seq "
                f"{report.first_seq} to {report.last_seq}, in {report.files} day file(s)."
            )
    else:
        first = report.problems[0]
        lines.append(f"Audit log {directory} was changed: {first}")
        lines.extend(f"  {problem}" for problem in report.problems[1:20])
        more = report.problem_count - min(len(report.problems), 20)
        if more > 0:
            lines.append(f"  ... and {more} more problem(s)")
        lines.append(
            f"{report.problem_count} problem(s) in {report.records} record(s) of "
            f"{report.files} day file(s); the first is at {first.path}:{first.line}."
        )
    lines.extend(f"note: {note}" for note in report.notes)
    _write("".join(f"{line}\n" for line in lines))
    return 0 if report.ok else 1


# -- prune --------------------------------------------------------------------------------


def _keep(text: str) -> timedelta:
    """--keep: whole days (`90d`) or a duration (`2160h`)."""
    days = text.strip()
    try:
        if days.endswith("d") and days[:-1].isdigit():
            return timedelta(days=int(days[:-1]))
        return parse_duration(text)
    except (DurationError, OverflowError):
        raise UsageError(
            f"--keep {text!r} is not a length of time: give days (90d) or hours (2160h)"
        ) from None


def run_prune(args: argparse.Namespace) -> int:
    keep = _keep(args.keep)
    if keep < timedelta(days=1):
        raise UsageError(
            f"--keep {args.keep}: keep at least one day (1d); the file of today is being "
            "written"
        )
    directory = _audit_dir(args)
    if not directory.is_dir():
        print(f"No audit log in {directory} yet: nothing to prune.")
        return 0
    # A day file holds one UTC day of arrivals: those of days before the one `keep` ago
    # all arrived more than `keep` ago.
    try:
        before = (datetime.now(UTC) - keep).date()
    except OverflowError:  # longer than the calendar goes back: keep everything
        before = date.min
    if keep < DEFAULT_DEDUPE_WINDOW:
        print(
            f"tctl: warning: keeping less than {DEFAULT_DEDUPE_WINDOW.days} days: after the "
            "next control plane restart, a batch an agent sends again from before "
            f"{before.isoformat()} is no longer recognised as a duplicate",
            file=sys.stderr,
        )
    files = day_files(directory)
    try:
        sizes = {path: path.stat().st_size for _day, path in files}
        removed = prune_log(directory, before, dry_run=args.dry_run)
    except OSError as exc:
        raise UsageError(
            f"cannot prune the audit log in {directory}: {exc.strerror or exc} "
            f"({exc.filename}); run tctl as the user the control plane runs as"
        ) from None
    if not removed:
        if not files:
            why = "no day files yet"
        elif prunable(files, before):
            why = (f"the files from {before.isoformat()} on hold no record yet, so where the "
                   "log would start cannot be noted; nothing was deleted")
        elif files[0][0] < before:
            why = f"its only day file before {before.isoformat()} is the newest, which stays"
        else:
            why = f"its oldest day file is {files[0][0].isoformat()}, within the {args.keep} kept"
        print(f"Nothing to prune in {directory}: {why}.")
        return 0
    size = _bytes(sum(sizes.get(path, 0) for path in removed))
    span = f"{removed[0].stem} to {removed[-1].stem}" if len(removed) > 1 else removed[0].stem
    if args.dry_run:
        print(
            f"Would delete {len(removed)} day file(s) of {directory}, {span} ({size}); "
            "nothing was changed (--dry-run)."
        )
        return 0
    retention = read_retention(directory)
    start = f"; the log now starts at seq {retention[0]}" if retention is not None else ""
    print(
        f"Deleted {len(removed)} day file(s) of {directory}, {span} ({size}){start}. "
        "`tctl audit verify` accepts it (RETENTION.json)."
    )
    return 0


# -- search -------------------------------------------------------------------------------


def parse_when(text: str, flag: str, now: datetime | None = None) -> datetime:
    """A duration back from now (`30m`) or a time (`2024-05-01T10:00:00Z`), as UTC."""
    now = now or datetime.now(UTC)
    try:
        return now - parse_duration(text)
    except DurationError:
        pass
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{flag} {text!r} is neither a duration (30m, 12h, 168h for a week) nor a time "
            "(2024-05-01 or 2024-05-01T10:00:00Z)"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def run_search(args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise UsageError(f"--limit {args.limit}: give a number of events, or 0 for all")
    since = parse_when(args.since, "--since") if args.since else None
    until = parse_when(args.until, "--until") if args.until else None
    if since is not None and until is not None and until < since:
        raise UsageError("--until is before --since: nothing can match; swap them")
    directory = _audit_dir(args)
    limit = args.limit or None
    # One more than asked for tells whether the output was cut.
    events = search_log(
        directory, args.type, args.user, args.db, since, until,
        None if limit is None else limit + 1,
    )
    cut = limit is not None and len(events) > limit
    events = events[:limit] if limit is not None else events
    if args.format == "json":
        body = json.dumps([e.model_dump(mode="json") for e in events], indent=2,
                          ensure_ascii=False)
        _write(body + "\n")
    else:
        _write("".join(format_event(e) + "\n" for e in events))
    if cut:
        print(
            f"tctl: showing the first {limit} matching events; narrow the search with "
            "--since/--type/--user/--db or raise --limit (0: all)",
            file=sys.stderr,
        )
    return 0


def _clean(text: str, width: int = QUERY_WIDTH) -> str:
    """One printable line: whitespace runs become one space, control characters escaped."""
    text = " ".join(text.split())
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        else:
            out.append(ch.encode("unicode_escape").decode("ascii"))
    cleaned = "".join(out)
    if len(cleaned) > width:
        cleaned = cleaned[: width - 3] + "..."
    return cleaned


def _outcome(outcome: Outcome | None) -> str:
    if outcome is None:
        return ""
    if outcome.status == "error":
        code = f" {outcome.sqlstate}" if outcome.sqlstate else ""
        return f" -> ERROR{code}: {_clean(outcome.message or '', 120)}"
    tag = _clean(outcome.command_tag or "ok", 60)
    rows = f" ({outcome.rows} row{'s' if outcome.rows != 1 else ''})" \
        if outcome.rows is not None else ""
    return f" -> {tag}{rows}"


def _params(values: list[str | None]) -> str:
    shown = ", ".join("NULL" if v is None else repr(_clean(v, 40)) for v in values[:10])
    if len(values) > 10:
        shown += f", ... ({len(values)} in all)"
    return f"[{shown}]"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def _what(event: AuditEvent) -> str:
    """The query or the outcome of one event, in words."""
    match event:
        case SessionStartEvent():
            if event.success:
                return "session started"
            return f"session refused: {_clean(event.reason or 'no reason given')}"
        case SessionEndEvent():
            return (
                f"session ended after {event.duration_ms / 1000:.1f}s (from client "
                f"{_bytes(event.bytes_from_client)}, from server "
                f"{_bytes(event.bytes_from_server)}): {_clean(event.reason)}"
            )
        case QueryEvent():
            outcomes = event.outcomes or ([event.outcome] if event.outcome else [])
            return _clean(event.query) + "".join(_outcome(o) for o in outcomes)
        case ParseEvent():
            name = event.statement_name or "(unnamed)"
            return f"parse {_clean(name, 60)}: {_clean(event.query)}{_outcome(event.outcome)}"
        case BindEvent():
            return (
                f"bind {_clean(event.statement_name or '(unnamed)', 60)} "
                f"{_params(event.parameters)}{_outcome(event.outcome)}"
            )
        case ExecuteEvent():
            what = _clean(event.query) if event.query else _clean(event.portal_name or
                                                                  "(unnamed portal)")
            params = f" {_params(event.parameters)}" if event.parameters else ""
            return f"execute {what}{params}{_outcome(event.outcome)}"
        case CloseEvent():
            return f"close {event.target} {_clean(event.name or '(unnamed)', 60)}"
        case FunctionCallEvent():
            return (
                f"function {event.function_oid} {_params(event.arguments)}"
                f"{_outcome(event.outcome)}"
            )
    return ""


def format_event(event: AuditEvent) -> str:
    """`time type user service/name/db_user what` on one line."""
    when = event.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"
    where = "/".join(_clean(part, 64) for part in (event.db_service, event.db_name,
                                                    event.db_user))
    line = f"{when}  {event.type}  {_clean(event.user, 64)}  {where}  {_what(event)}"
    if event.shortened:
        line += f"  [shortened: {_clean(event.shortened, 200)}]"
    return line


def _write(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `tctl audit search | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
