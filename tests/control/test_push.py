"""The user story of issue 3: a git push becomes a signed bundle; a broken push is refused."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from control.bundles import BundleStore
from control.signing import load_signing_key
from schemas.bundle import key_id, verify_bundle
from tests.control.conftest import RunningControlPlane, git

DBA = """\
kind: role
version: v5
metadata:
  name: dba
spec:
  allow:
    db_labels:
      env: prod
    db_users: ["*"]
    db_names: ["*"]
  deny:
    db_users: [postgres]
"""

BROKEN = """\
kind: role
version: v5
metadata:
  name: broken
spec:
  allow:
    db_labels:
      env: prod
    db_userz: ["*"]
"""


def _commit(clone: Path, path: str, text: str, message: str) -> str:
    target = clone / path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    git("add", path, cwd=clone)
    git("commit", "--quiet", "-m", message, cwd=clone)
    return git("rev-parse", "HEAD", cwd=clone).stdout.strip()


def _verified_current(cp: RunningControlPlane):
    data = BundleStore(cp.data_dir / "bundles").read_current()
    assert data is not None
    pub = load_signing_key(cp.data_dir / "keys" / "bundle-signing.key").public_key()
    return verify_bundle(data, {key_id(pub): pub}, "root", 0, datetime.now(UTC))


def test_valid_push_is_published_with_its_commit(
    control_plane: RunningControlPlane, policy_clone: Path
) -> None:
    before = control_plane.state().in_force
    assert before is not None
    sha = _commit(policy_clone, "roles/dba.yaml", DBA, "Add the dba role")
    push = git("push", "origin", "HEAD:main", cwd=policy_clone)
    assert "is valid policy" in push.stderr

    state = control_plane.wait_for(lambda s: s.in_force is not None and s.in_force.commit == sha)
    assert state.in_force is not None and state.in_force.serial > before.serial
    bundle = _verified_current(control_plane)
    assert bundle.commit == sha
    assert bundle.serial == state.in_force.serial
    assert bundle.roles["dba"].deny.db_users == ["postgres"]
    assert bundle.cas.user and bundle.cas.host and bundle.cas.db


def test_invalid_push_is_rejected_with_file_line_col(
    control_plane: RunningControlPlane, policy_clone: Path
) -> None:
    before = control_plane.state().in_force
    _commit(policy_clone, "roles/broken.yaml", BROKEN, "A typo")
    push = git("push", "origin", "HEAD:main", cwd=policy_clone, check=False)
    assert push.returncode != 0
    assert "remote: teleport: push refused" in push.stderr
    assert "remote: roles/broken.yaml:9:5: role/broken: spec.allow.db_userz:" in push.stderr
    assert "[remote rejected]" in push.stderr
    # Nothing moved: same branch head, same bundle in force.
    bare = control_plane.data_dir / "policies.git"
    head = git("rev-parse", "refs/heads/main", cwd=bare).stdout.strip()
    assert head == before.commit
    assert control_plane.state().in_force == before


def test_deleting_the_policy_branch_is_refused(
    control_plane: RunningControlPlane, policy_clone: Path
) -> None:
    push = git("push", "origin", ":main", cwd=policy_clone, check=False)
    assert push.returncode != 0
    assert "cannot be deleted" in push.stderr


def test_an_invalid_commit_that_lands_anyway_keeps_the_last_good_bundle(
    control_plane: RunningControlPlane, policy_clone: Path
) -> None:
    before = control_plane.state().in_force
    sha = _commit(policy_clone, "roles/broken.yaml", BROKEN, "Around the hook")
    # A force-push around the hook: disable it, as an admin with shell access could.
    hook = control_plane.data_dir / "policies.git" / "hooks" / "pre-receive"
    hook.rename(hook.with_suffix(".off"))
    try:
        git("push", "origin", "HEAD:main", cwd=policy_clone)
    finally:
        hook.with_suffix(".off").rename(hook)
    state = control_plane.wait_for(
        lambda s: s.last_attempt is not None and s.last_attempt.commit == sha
    )
    assert state.last_attempt is not None
    assert state.last_attempt.result == "failed"
    assert any("roles/broken.yaml:9:5" in e for e in state.last_attempt.errors)
    assert state.in_force == before
    assert _verified_current(control_plane).commit == before.commit
