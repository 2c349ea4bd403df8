"""Dynamic labels: real commands (no shell), periods, failures, hangs, and what RBAC sees."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dataplane.cluster.labels import DynamicLabels, run_label_command
from schemas.bundle import Bundle, BundleCluster, BundleConditions, BundleRole, BundleUser
from schemas.config import DatabaseConfig, LabelCommand
from schemas.rbac import AccessRequest, decide
from tests.cluster.helpers import run

PY = sys.executable


def db(name: str = "aurora", labels: dict[str, str] | None = None,
       commands: list[LabelCommand] | None = None) -> DatabaseConfig:
    return DatabaseConfig(name=name, protocol="postgres", uri="localhost:5432",
                          labels=labels or {}, commands=commands or [])


def counter_command(path: Path) -> list[str]:
    """A command that counts its runs in `path` and prints the count."""
    code = (
        "import pathlib,sys; p=pathlib.Path(sys.argv[1]); "
        "n=int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n)); print(n)"
    )
    return [PY, "-c", code, str(path)]


def test_seed_000_time_label_runs_date_without_a_shell() -> None:
    labels = DynamicLabels([db(labels={"env": "stage"}, commands=[
        LabelCommand(name="time", command=["date", "+%H:%M:%S"], period="1m"),
    ])])
    assert labels.labels("aurora") == {"env": "stage"}  # before the first run: static only
    run(labels.refresh())
    got = labels.labels("aurora")
    assert got["env"] == "stage"
    assert re.fullmatch(r"\d\d:\d\d:\d\d", got["time"])
    assert labels.errors("aurora") == {}
    [info] = labels.database_infos()
    assert info.name == "aurora" and info.labels == got


def test_arguments_are_not_expanded_by_a_shell() -> None:
    value = run(run_label_command(["echo", "$HOME", "*", "`id`", ";", "true"], 5, 4096))
    assert value == "$HOME * `id` ; true"


def test_labels_update_every_period(tmp_path: Path) -> None:
    labels = DynamicLabels([db(labels={"env": "prod"}, commands=[
        LabelCommand(name="runs", command=counter_command(tmp_path / "n"), period="1s"),
    ])])
    seen: list[tuple[str, dict[str, str], float]] = []
    labels.subscribe(lambda name, value: seen.append((name, value, time.monotonic())))

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(labels.run(stop))
        while len(seen) < 3:
            await asyncio.sleep(0.05)
        stop.set()
        await task

    run(main())
    values = [v["runs"] for _, v, _ in seen]
    assert values[:3] == ["1", "2", "3"]
    assert all(name == "aurora" and v["env"] == "prod" for name, v, _ in seen)
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(seen)]
    assert all(0.8 < gap < 3.0 for gap in gaps[:2]), gaps


def test_failing_command_leaves_the_label_absent_and_logs_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    flag = tmp_path / "healthy"
    flag.write_text("yes")
    code = ("import pathlib,sys; t=pathlib.Path(sys.argv[1]).read_text(); "
            "print(t) if t == 'yes' else sys.exit('replica lag too high')")
    labels = DynamicLabels([db(labels={"env": "prod"}, commands=[
        LabelCommand(name="healthy", command=[PY, "-c", code, str(flag)], period="1m"),
    ])])
    run(labels.refresh())
    assert labels.labels("aurora") == {"env": "prod", "healthy": "yes"}

    flag.write_text("no")
    with caplog.at_level(logging.WARNING, "teleport.cluster.labels"):
        run(labels.refresh())
        run(labels.refresh())
    # the last good value is dropped, not kept
    assert labels.labels("aurora") == {"env": "prod"}
    why = labels.errors("aurora")["healthy"]
    assert "exited with status 1" in why and "replica lag too high" in why
    # logged once per change of reason, not every period
    assert sum("healthy" in r.getMessage() for r in caplog.records) == 1

    flag.write_text("yes")
    run(labels.refresh())
    assert labels.labels("aurora")["healthy"] == "yes"
    assert labels.errors("aurora") == {}


def test_a_label_that_cannot_be_computed_matches_no_allow_rule(tmp_path: Path) -> None:
    """Fail closed: an allow rule on the label (even `*`) stops matching while it fails."""
    now = datetime.now(UTC)
    bundle = Bundle(
        cluster=BundleCluster(name="c", certificate_ttl_seconds=3600,
                              max_session_ttl_seconds=3600),
        serial=1, commit="0" * 40, issued_at=now, expires_at=now + timedelta(hours=1),
        roles={"oncall": BundleRole(name="oncall", allow=BundleConditions(
            db_labels={"healthy": ["*"]}, db_users=["*"], db_names=["*"]))},
        users={"alice": BundleUser(name="alice", roles=["oncall"])},
    )
    flag = tmp_path / "ok"
    labels = DynamicLabels([db(commands=[
        LabelCommand(name="healthy", command=["cat", str(flag)], period="1m"),
    ])])

    def allowed() -> bool:
        return decide(bundle, AccessRequest("alice", "aurora", labels.labels("aurora"),
                                            "alice", "postgres")).allowed

    flag.write_text("yes\n")
    run(labels.refresh())
    assert allowed()
    flag.unlink()  # cat fails: no value
    run(labels.refresh())
    assert "healthy" not in labels.labels("aurora")
    assert not allowed()


def test_hanging_command_is_killed_with_its_children(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    code = (
        "import subprocess,sys,time,pathlib; "
        "c=subprocess.Popen([sys.executable,'-c','import time; time.sleep(60)']); "
        "pathlib.Path(sys.argv[1]).write_text(str(c.pid)); time.sleep(60)"
    )
    labels = DynamicLabels([db(commands=[
        LabelCommand(name="slow", command=[PY, "-c", code, str(pidfile)], period="1m"),
    ])], timeout=1.0)
    started = time.monotonic()
    run(labels.refresh())
    assert time.monotonic() - started < 5
    assert "did not finish within 1s and was killed" in labels.errors("aurora")["slow"]
    assert "slow" not in labels.labels("aurora")
    child = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the command's child process outlived the timeout"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["/nonexistent/labeller"], "command not found"),
        ([PY, "-c", "print('x' * 10000)"], "printed more than 4096 bytes"),
        ([PY, "-c", "import sys; sys.stdout.buffer.write(b'\\xff\\xfe')"], "not UTF-8"),
        ([PY, "-c", "import os,signal; os.kill(os.getpid(), signal.SIGTERM)"],
         "killed by signal 15"),
    ],
)
def test_each_kind_of_failure_says_what_happened(argv: list[str], expected: str) -> None:
    labels = DynamicLabels([db(commands=[LabelCommand(name="x", command=argv, period="1m")])])
    run(labels.refresh())
    assert "x" not in labels.labels("aurora")
    assert expected in labels.errors("aurora")["x"]


def test_a_command_writing_a_lot_to_stderr_does_not_block() -> None:
    code = "import sys; sys.stderr.write('e' * 1_000_000); print('done')"
    assert run(run_label_command([PY, "-c", code], 10, 4096)) == "done"


def test_configuration_mistakes_are_refused_by_the_config_model() -> None:
    with pytest.raises(ValueError, match="has the name of a static label"):
        db(labels={"env": "a"}, commands=[LabelCommand(name="env", command=["true"], period="1m")])
    with pytest.raises(ValueError, match="shortest allowed is 1s"):
        LabelCommand(name="t", command=["true"], period="10ms")
    with pytest.raises(ValueError, match="two commands set label"):
        db(commands=[LabelCommand(name="t", command=["true"], period="1m"),
                     LabelCommand(name="t", command=["true"], period="1m")])
    assert DynamicLabels([]).labels("unknown") == {}


def test_default_timeout_is_the_period_capped_at_30s() -> None:
    labels = DynamicLabels([db(commands=[
        LabelCommand(name="a", command=["true"], period="2s"),
        LabelCommand(name="b", command=["true"], period="1h"),
    ])])
    assert [c.timeout for c in labels.commands] == [2.0, 30.0]
