"""Reading policy from a git commit's tree: `control.gitsource` and `tctl lint --rev`.

Real repositories in tmp_path, made with the real git; nothing is mocked.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from control.gitsource import GitSourceError, find_repository, read_policy_files
from schemas.policy.loader import MAX_FILE_BYTES, load_policy
from tests.policy.conftest import EXAMPLES, git, run_tctl, write_tree

GOOD = {str(p.relative_to(EXAMPLES)): p.read_bytes() for p in EXAMPLES.rglob("*.yaml")}
BROKEN_ROLE = b"kind: role\nversion: v5\nmetadata:\n  name: developer\nspec:\n  alow: {}\n"


def test_reads_only_the_layout_from_the_commit(git_repo: Callable[..., Path]) -> None:
    repo = git_repo({**GOOD, "README.md": "hello", "roles/notes.txt": "x", "other/x.yaml": "y"})
    snapshot = read_policy_files(repo, "HEAD")
    assert snapshot.commit == git(repo, "rev-parse", "HEAD")
    assert set(snapshot.files) == set(GOOD)
    assert snapshot.files["roles/dba.yaml"] == GOOD["roles/dba.yaml"]
    assert snapshot.problems == []
    assert load_policy(snapshot.files).policy is not None


def test_rev_ignores_uncommitted_and_later_changes(
    git_repo: Callable[..., Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = git_repo(GOOD)
    # A later commit breaks a role ...
    write_tree(repo, {"roles/developer.yaml": BROKEN_ROLE})
    git(repo, "commit", "-q", "-am", "break developer")
    # ... and an uncommitted edit breaks a user, another adds an untracked broken file.
    write_tree(repo, {"users/bob.yaml": "kind: user\n", "databases/new.yaml": "- x\n"})
    monkeypatch.chdir(repo)

    code, out, _ = run_tctl(capsys, "lint", "--rev", "HEAD~1")
    first = git(repo, "rev-parse", "HEAD~1")
    assert code == 0, out
    assert out == f"0 errors, 0 warnings in 8 files at commit {first[:12]} (HEAD~1)\n"

    code, out, _ = run_tctl(capsys, "lint", "--rev", "HEAD", ".")
    assert code == 1
    assert out.splitlines()[0] == (
        "roles/developer.yaml:6:3: error: role/developer: spec.alow: unknown field; "
        "did you mean `allow`?"
    )
    assert "users/bob.yaml" not in out and "databases/new.yaml" not in out

    code, out, _ = run_tctl(capsys, "lint", ".")  # the working tree: all three
    assert code == 1
    assert "roles/developer.yaml:6:3" in out
    assert "users/bob.yaml" in out and "databases/new.yaml" in out


def test_rev_on_a_folder_inside_a_repository(
    git_repo: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo = git_repo({f"infra/policy/{k}": v for k, v in GOOD.items()} | {"roles/x.yaml": "- 1"})
    code, out, _ = run_tctl(capsys, "lint", "--rev", "main", str(repo / "infra" / "policy"))
    assert code == 0, out
    assert "in 8 files" in out
    snapshot = read_policy_files(repo, "main", subdir="infra/policy")
    assert set(snapshot.files) == set(GOOD)
    assert find_repository(repo / "infra" / "policy") == (repo.resolve(), "infra/policy")


def test_bare_repository(git_repo: Callable[..., Path], tmp_path: Path) -> None:
    repo = git_repo(GOOD)
    bare = tmp_path / "policies.git"
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(repo), str(bare)], check=True, capture_output=True
    )
    snapshot = read_policy_files(bare, "refs/heads/main")
    assert set(snapshot.files) == set(GOOD)
    assert find_repository(bare) == (bare.resolve(), "")


def test_problem_paths_carry_the_folder_given(
    git_repo: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo = git_repo({f"policies/{k}": v for k, v in GOOD.items()})
    write_tree(repo, {"policies/roles/developer.yaml": BROKEN_ROLE})
    git(repo, "commit", "-q", "-am", "break")
    code, out, _ = run_tctl(capsys, "lint", "--rev", "HEAD", str(repo / "policies"))
    assert code == 1
    assert out.startswith(f"{repo}/policies/roles/developer.yaml:6:3: error: ")


def test_large_files_and_symlinks_are_problems_not_reads(git_repo: Callable[..., Path]) -> None:
    big = b"kind: role\n" + b"# padding\n" * (MAX_FILE_BYTES // 10 + 1)
    repo = git_repo({**GOOD, "roles/big.yaml": big})
    os.symlink("../users/alice.yaml", repo / "roles" / "link.yaml")
    os.symlink("../roles", repo / "users" / "more")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "big and links")
    snapshot = read_policy_files(repo, "HEAD")
    assert "roles/big.yaml" not in snapshot.files
    assert "roles/link.yaml" not in snapshot.files
    assert sorted((p.path, p.rule) for p in snapshot.problems) == [
        ("roles/big.yaml", "file-too-large"),
        ("roles/link.yaml", "file-symlink"),
        ("users/more", "file-symlink"),
    ]
    message = next(p.message for p in snapshot.problems if p.rule == "file-too-large")
    assert f"{len(big)} bytes, over the limit of {MAX_FILE_BYTES}" in message


@pytest.mark.parametrize("rev", ["nope", "HEAD~5", "0" * 40, "-n", "HEAD --all"])
def test_unknown_revision_is_exit_2(
    git_repo: Callable[..., Path], capsys: pytest.CaptureFixture[str], rev: str
) -> None:
    repo = git_repo(GOOD)
    with pytest.raises(GitSourceError):
        read_policy_files(repo, rev)
    code, out, err = run_tctl(capsys, "lint", f"--rev={rev}", str(repo))
    assert code == 2
    assert out == ""
    assert err.startswith("tctl: error: ")
    assert "revision" in err
    assert "Traceback" not in err


def test_empty_repository_says_so(
    git_repo: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    repo = git_repo()
    code, _, err = run_tctl(capsys, "lint", "--rev", "HEAD", str(repo))
    assert code == 2
    assert (
        err
        == f"tctl: error: unknown revision 'HEAD' in {repo} (the repository has no commits yet)\n"
    )


def test_not_a_repository_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(GitSourceError, match="is not a git repository"):
        read_policy_files(tmp_path, "HEAD")
    code, out, err = run_tctl(capsys, "lint", "--rev", "HEAD", str(tmp_path))
    assert code == 2
    assert out == ""
    assert err == f"tctl: error: {tmp_path} is not in a git repository (needed for --rev)\n"


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _children() -> int:
    me = str(os.getpid())
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[1] == me:  # fields: state, ppid, ...
            count += 1
    return count


@pytest.mark.slow
def test_no_fd_or_process_leak_over_500_reads(git_repo: Callable[..., Path]) -> None:
    if shutil.which("git") is None or not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs git and /proc")
    repo = git_repo(GOOD)
    # No gc.collect(): the helpers must be gone when each call returns, not when the
    # garbage collector gets round to a reference cycle.
    gc.disable()
    try:
        for _ in range(5):
            read_policy_files(repo, "HEAD")
        fds, children = _fds(), _children()
        for _ in range(495):
            snapshot = read_policy_files(repo, "HEAD")
    finally:
        gc.enable()
    assert len(snapshot.files) == len(GOOD)
    assert _fds() <= fds
    assert _children() <= children
