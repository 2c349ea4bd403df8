"""Revocation by `git push`: an administrator clones the hosted policy repository, removes
alice, and pushes. The control plane publishes the new bundle; the db agent activates it
and ends alice's open psql sessions within a second, with the FATAL error psql prints; the
audit log's session end says why. The push is reverted afterwards (another push)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cluster import E2ECluster, Person, PsqlPipe, wait_for

pytestmark = pytest.mark.slow

REVOKED = (
    "FATAL:  access to database 'pg' as db user 'alice' was revoked: user 'alice' is not in "
    "the policy in force (commit "
)


@pytest.fixture
def policy(cluster: E2ECluster, tmp_path: Path) -> Iterator[Path]:
    """A clone of the hosted repository; what the test pushed is reverted (pushed) after."""
    clone = tmp_path / "policy"
    cluster.git("clone", "-q", str(cluster.repo), str(clone), cwd=tmp_path)
    first = cluster.git("rev-parse", "HEAD", cwd=clone).stdout.strip()
    yield clone
    cluster.git("pull", "-q", "--ff-only", cwd=clone)
    changed = cluster.git("diff", "--name-only", first, "HEAD", cwd=clone).stdout.split()
    if changed:
        cluster.git("checkout", first, "--", *changed, cwd=clone)
        cluster.git("add", "-A", cwd=clone)
        cluster.git("commit", "-q", "-m", "Give alice her access back", cwd=clone)
        cluster.git("push", "-q", "origin", "HEAD:main", cwd=clone)
        cluster.wait_serving(cluster.people["alice"], timeout=30)


def backend_pid(session: PsqlPipe) -> int:
    return int(session.ask("select pg_backend_pid()"))


def test_a_git_push_that_removes_alice_ends_her_open_sessions_within_a_second(
    cluster: E2ECluster, alice: Person, bob: Person, policy: Path
) -> None:
    assert cluster.agent is not None and cluster.pg is not None
    busy = alice.open_psql()
    idle = alice.open_psql()
    others = bob.open_psql()
    try:
        assert busy.ask("select 'alice, busy'") == "alice, busy"
        idle_pid = backend_pid(idle)
        assert others.ask("select 'bob'") == "bob"
        busy.send("select pg_sleep(30)")

        cluster.git("rm", "-q", "users/alice.yaml", cwd=policy)
        cluster.git("commit", "-q", "-m", "alice leaves the team", cwd=policy)
        commit = cluster.git("rev-parse", "HEAD", cwd=policy).stdout.strip()
        mark = cluster.agent.log_size()
        pushed = cluster.git("push", "origin", "HEAD:main", cwd=policy)
        pushed_at = time.monotonic()
        assert "rejected" not in pushed.stderr, pushed.stderr

        # Activation on the agent: its log line (polled every 5 ms) names the pushed commit.
        found, activated_at = cluster.agent.wait_log(
            rf"bundle serial (\d+) \(commit {commit[:12]}\) is in force", mark, timeout=15
        )
        serial = int(found.group(1))
        assert busy.wait_end(5) == 2
        assert busy.ended_at is not None
        took = busy.ended_at - activated_at
        assert took < 1.0, f"alice's busy session ended {took:.2f}s after the activation"
        assert REVOKED + commit[:12] in busy.errors, busy.errors
        print(f"push to end of alice's session: {busy.ended_at - pushed_at:.2f}s")

        # Her idle session is gone from PostgreSQL too, and psql shows why at its next query.
        idle_gone = (
            f"select count(*) from pg_stat_activity where pid = {idle_pid} and usename = 'alice'"
        )
        wait_for(
            "alice's idle backend to end",
            lambda: cluster.pg.psql_admin(idle_gone).strip() == "0",
            timeout=max(0.1, activated_at + 1.0 - time.monotonic()),
            interval=0.02,
        )
        idle.send("select 'still there?'")
        assert idle.wait_end(5) == 2
        assert REVOKED + commit[:12] in idle.errors, idle.errors
        assert (
            f"HINT:  the policy in force (commit {commit[:12]}, serial {serial}) no longer "
            "allows this session"
        ) in idle.errors

        # bob is not affected, and alice cannot start a new session.
        assert others.ask("select 'bob, still'") == "bob, still"
        refused = alice.psql("-c", "select 1")
        assert refused.returncode == 2
        assert "access denied to 'alice'" in refused.stderr, refused.stderr
    finally:
        for session in (busy, idle, others):
            session.close()

    status = cluster.tctl("status").stdout
    assert re.search(rf"In force:\s+serial {serial}, commit {commit[:12]}", status), status

    ends = wait_for(
        "the audit events of alice's revoked sessions",
        lambda: (
            (
                found := [
                    e
                    for e in cluster.audit_events(
                        "--type=db.session.end", "--user=alice", "--since=5m"
                    )
                    if "was revoked" in e["reason"]
                ]
            )
            and len(found) >= 2
            and found
        ),
        timeout=30,
        interval=0.5,
    )
    for end in ends[-2:]:
        assert end["reason"] == (
            "access to database 'pg' as db user 'alice' was revoked: user 'alice' is not in "
            f"the policy in force (commit {commit[:12]}, serial {serial})"
        )
