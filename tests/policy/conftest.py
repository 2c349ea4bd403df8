"""Helpers for the policy tests: run tctl in-process, build git repositories."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from control.tctl import main as tctl_main

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent
CASES = HERE / "cases"
EXAMPLES = REPO_ROOT / "policies"


def run_tctl(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`tctl ARGV` in this process: exit code, stdout, stderr (argparse exits included)."""
    try:
        code = tctl_main(list(argv))
    except SystemExit as exc:  # argparse usage errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def write_tree(root: Path, files: Mapping[str, str | bytes]) -> None:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
        "HOME": str(repo),
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


@pytest.fixture
def git_repo(tmp_path: Path) -> Callable[..., Path]:
    """A function that makes a real git repository, optionally with a first commit."""

    def make(files: Mapping[str, str | bytes] | None = None, name: str = "repo") -> Path:
        repo = tmp_path / name
        repo.mkdir()
        git(repo, "init", "-q", "-b", "main")
        if files:
            write_tree(repo, files)
            git(repo, "add", "-A")
            git(repo, "commit", "-q", "-m", "first")
        return repo

    return make
