"""Reconcile without the watcher: re-signing, pull mode, serials, leaks, and tctl views."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from control import hosted
from control.service import ControlPlane, make_reconciler
from control.settings import ControlSettings, SourceSettings, load_settings
from control.tctl import main as tctl
from tests.control.conftest import git

ROLE = """\
kind: role
version: v5
metadata:
  name: {name}
spec:
  allow:
    db_labels:
      env: {env}
    db_users: [app]
    db_names: [main]
"""
USER = """\
kind: user
version: v2
metadata:
  name: alice
spec:
  roles: [{roles}]
"""


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    plane = ControlPlane(tmp_path / "data", ControlSettings(cluster_name="root"))
    plane.prepare()
    plane.close()
    return tmp_path / "data"


def _settings(data_dir: Path) -> ControlSettings:
    settings = load_settings(data_dir)
    assert settings is not None
    return settings


def test_first_reconcile_publishes_and_a_second_changes_nothing(data_dir: Path) -> None:
    r = make_reconciler(data_dir, _settings(data_dir))
    first = r.run_once()
    assert first.result == "published" and first.serial == 1
    again = r.run_once()
    assert again.result == "unchanged" and again.serial == 1


def test_resign_before_expiry_keeps_content_and_raises_serial(data_dir: Path) -> None:
    r = make_reconciler(data_dir, _settings(data_dir))
    r.run_once()
    old = r.current_bundle()
    assert old is not None
    later = datetime.now(UTC) + timedelta(hours=13)  # past half of the 24h bundle ttl
    out = r.run_once(now=later)
    assert out.result == "resigned" and out.serial == 2
    new = r.current_bundle_unchecked()
    assert new is not None
    assert new.content_digest() == old.content_digest()
    assert new.expires_at > old.expires_at


def test_serials_only_grow_across_restarts(data_dir: Path) -> None:
    make_reconciler(data_dir, _settings(data_dir)).run_once()
    repo = hosted.repo_path(data_dir)
    hosted.commit_files(
        repo, {"roles/dev.yaml": ROLE.format(name="dev", env="dev").encode()}, "dev"
    )
    out = make_reconciler(data_dir, _settings(data_dir)).run_once()
    assert out.serial == 2


def test_tctl_users_of_the_hosted_repo_cannot_push_errors(data_dir: Path) -> None:
    repo = hosted.repo_path(data_dir)
    with pytest.raises(hosted.PushRejected) as info:
        hosted.commit_files(repo, {"users/alice.yaml": USER.format(roles="nope").encode()}, "x")
    assert "users/alice.yaml:6:11: user/alice: spec.roles[0]" in str(info.value)


def test_pull_mode_fetches_a_remote(tmp_path: Path) -> None:
    forge = tmp_path / "forge"
    forge.mkdir()
    git("init", "--quiet", "--initial-branch=main", cwd=forge)
    (forge / "cluster.yaml").write_text(hosted.INITIAL_CLUSTER.format(cluster="root"))
    (forge / "roles").mkdir()
    (forge / "roles" / "dev.yaml").write_text(ROLE.format(name="dev", env="dev"))
    git("add", "-A", cwd=forge)
    git("commit", "--quiet", "-m", "first", cwd=forge)
    settings = ControlSettings(
        cluster_name="root", source=SourceSettings(kind="remote", url=f"file://{forge}")
    )
    plane = ControlPlane(tmp_path / "data", settings)
    plane.prepare()
    plane.close()
    r = make_reconciler(tmp_path / "data", settings)
    first = r.run_once()
    assert first.result == "published"
    (forge / "roles" / "prod.yaml").write_text(ROLE.format(name="prod", env="prod"))
    git("add", "-A", cwd=forge)
    git("commit", "--quiet", "-m", "second", cwd=forge)
    head = git("rev-parse", "HEAD", cwd=forge).stdout.strip()
    second = r.run_once()
    assert second.result == "published" and second.commit == head
    bundle = r.current_bundle()
    assert bundle is not None and set(bundle.roles) == {"dev", "prod"}


def test_pull_mode_unreachable_remote_keeps_last_good(tmp_path: Path) -> None:
    settings = ControlSettings(
        cluster_name="root",
        source=SourceSettings(kind="remote", url=f"file://{tmp_path}/does-not-exist"),
    )
    plane = ControlPlane(tmp_path / "data", settings)
    plane.prepare()
    plane.close()
    out = make_reconciler(tmp_path / "data", settings).run_once()
    assert out.result == "failed"
    assert out.errors and "cannot fetch" in out.errors[0]


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _children() -> int:
    me = str(os.getpid())
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().split(") ", 1)[1].split()[1] == me:
                        count += 1
            except (FileNotFoundError, IndexError, ProcessLookupError):
                continue
    return count


def test_500_reconciles_leak_no_fds_or_processes(data_dir: Path) -> None:
    r = make_reconciler(data_dir, _settings(data_dir))
    for _ in range(5):
        r.run_once(force=True)
    fds, children = _fds(), _children()
    for _ in range(495):
        r.run_once(force=True)
    assert r.state().last_serial == 500
    assert _fds() <= fds
    assert _children() <= children


def test_tctl_status_bundle_show_diff_and_verify(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r = make_reconciler(data_dir, _settings(data_dir))
    r.run_once()
    repo = hosted.repo_path(data_dir)
    hosted.commit_files(
        repo,
        {
            "roles/dev.yaml": ROLE.format(name="dev", env="dev").encode(),
            "users/alice.yaml": USER.format(roles="dev").encode(),
        },
        "alice joins dev",
    )
    assert r.run_once().serial == 2
    dd = ["--data-dir", str(data_dir)]

    assert tctl(["status", *dd]) == 0
    out = capsys.readouterr().out
    assert "Cluster:        root" in out and "In force:       serial 2" in out

    assert tctl(["bundle", "show", *dd]) == 0
    out = capsys.readouterr().out
    assert "Serial:     2" in out and "alice: roles dev" in out

    assert tctl(["bundle", "diff", "1", "2", *dd]) == 0
    out = capsys.readouterr().out
    assert "+ role/dev (new)" in out and "+ user/alice (new)" in out

    current = data_dir / "bundles" / "current.bundle"
    assert tctl(["bundle", "verify", str(current), *dd]) == 0
    assert capsys.readouterr().out.startswith("OK: bundle serial 2 of cluster root")
    tampered = data_dir / "tampered.bundle"
    tampered.write_bytes(current.read_bytes().replace(b'"payload": "', b'"payload": "AAAA'))
    assert tctl(["bundle", "verify", str(tampered), *dd]) == 1
    assert "REFUSED" in capsys.readouterr().out
    assert tctl(["bundle", "verify", str(current), "--min-serial", "3", *dd]) == 1
    assert "REFUSED (rollback)" in capsys.readouterr().out


def test_tctl_reconcile_without_a_running_control_plane(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tctl(["reconcile", "--data-dir", str(data_dir)]) == 0
    assert "published" in capsys.readouterr().out


def test_tctl_on_a_missing_data_dir_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tctl(["status", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
