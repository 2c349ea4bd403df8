"""The policy files of one git commit, read from the commit's tree.

`read_policy_files(repo_path, rev)` resolves `rev` with git's own rules (`HEAD~1`, a branch,
a tag, a full or short id), lists the commit's tree and reads the blobs of the policy layout
(`cluster.yaml`/`cluster.yml`, `roles/`, `users/`, `databases/`; see
`schemas.policy.loader`). It reads objects, never a working tree, so uncommitted edits and
later commits do not exist for it; a bare repository works the same, and so does a
pre-receive hook's quarantine (objects are read through `git`, which honours its
environment).

What it refuses to read, it reports as problems in the snapshot rather than reading: files
over `MAX_FILE_BYTES` and symbolic links. A caller must treat those problems like the
loader's (the control plane and `tctl lint` merge both lists).

The control plane calls this on every reconcile for months: each call opens the repository
and closes it again, so no `git cat-file` helper process or file descriptor outlives the
call. It never writes to the repository and never runs a command with a user-supplied
argument that could be taken as an option.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import git

from schemas.policy.loader import (
    CLUSTER_FILES,
    FOLDERS,
    MAX_FILE_BYTES,
    policy_kind,
    symlinked,
    too_large,
)
from schemas.policy.problems import Problem

_SYMLINK_MODE = "120000"


class GitSourceError(Exception):
    """The repository or revision cannot be read; the message says what to check."""


@dataclass(frozen=True)
class PolicySnapshot:
    """The policy files of one commit: repository-relative path -> bytes."""

    commit: str
    files: dict[str, bytes]
    problems: list[Problem] = field(default_factory=list)


def _resolve(repo: git.Repo, repo_path: str | os.PathLike[str], rev: str) -> str:
    if not rev or rev.startswith("-") or "\0" in rev:
        raise GitSourceError(f"{rev!r} is not a revision")
    try:
        sha = repo.git.rev_parse("--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    except git.GitCommandError:
        sha = ""
    if not sha:
        try:
            empty = not repo.git.rev_parse("--verify", "--quiet", "HEAD")
        except git.GitCommandError:
            empty = True
        hint = " (the repository has no commits yet)" if empty else ""
        raise GitSourceError(f"unknown revision {rev!r} in {repo_path}{hint}")
    return str(sha)


def read_policy_files(
    repo_path: str | os.PathLike[str], rev: str = "HEAD", *, subdir: str = ""
) -> PolicySnapshot:
    """Read the policy layout from the tree of commit `rev`.

    `subdir` is the repository folder that holds the policy (`""`: the root); the paths in
    the snapshot are relative to it.
    """
    prefix = subdir.strip("/")
    prefix = f"{prefix}/" if prefix else ""
    try:
        repo = git.Repo(repo_path)
    except (git.NoSuchPathError, git.InvalidGitRepositoryError):
        raise GitSourceError(f"{repo_path} is not a git repository") from None
    with repo:
        commit = _resolve(repo, repo_path, rev)
        specs = [f"{prefix}{name}" for name in (*CLUSTER_FILES, *FOLDERS)]
        listing = repo.git.ls_tree(
            "-r",
            "-l",
            "-z",
            "--full-tree",
            commit,
            "--",
            *specs,
            stdout_as_string=False,
            env={"GIT_LITERAL_PATHSPECS": "1"},
        )
        files: dict[str, bytes] = {}
        problems: list[Problem] = []
        for entry in bytes(listing).split(b"\0"):
            if not entry:
                continue
            meta, _, raw_path = entry.partition(b"\t")
            mode, kind, sha, size = meta.split()
            path = raw_path.decode("utf-8", "replace")
            if kind != b"blob" or not path.startswith(prefix):
                continue  # submodules are not policy
            rel = path[len(prefix) :]
            if mode.decode() == _SYMLINK_MODE:
                # Reported whatever the name: a link to a folder would hide its files.
                problems.append(symlinked(rel))
                continue
            if policy_kind(rel) is None:
                continue
            if int(size) > MAX_FILE_BYTES:
                problems.append(too_large(rel, int(size)))
                continue
            files[rel] = repo.odb.stream(bytes.fromhex(sha.decode())).read()
        return PolicySnapshot(commit, files, problems)


def find_repository(path: Path) -> tuple[Path, str] | None:
    """The repository holding `path` and `path`'s folder inside it, or None.

    A working tree is recognized by its `.git` entry; a bare repository by `HEAD`,
    `objects/` and `refs/` at its root.
    """
    path = path.resolve()
    if (path / "HEAD").is_file() and (path / "objects").is_dir() and (path / "refs").is_dir():
        return path, ""
    for candidate in (path, *path.parents):
        if (candidate / ".git").exists():
            rel = path.relative_to(candidate)
            return candidate, "" if rel == Path() else rel.as_posix()
    return None
