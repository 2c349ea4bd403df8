"""The policy repository the control plane hosts: `<data_dir>/policies.git`.

A bare repository people clone and push to. Its `pre-receive` hook lints every push to the
policy branch with the same code that reconciles (`control.reconcile.evaluate_commit`) and
rejects it with `file:line:col` errors, which git shows the person pushing as `remote:` lines.
Created at first start with a commit holding `cluster.yaml` and the `access` role (built on
the user's traits, so that `tctl users add alice --db-users=alice` works as in seed 001).

Changes the control plane makes itself (`tctl users add`) are committed in a temporary clone
and pushed, so they pass the very same hook as any other push.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from transport.files import write_atomic

REPO_DIR = "policies.git"
DEFAULT_BRANCH = "main"
AUTHOR = ("teleport", "teleport@localhost")

HOOK_TEMPLATE = """#!/bin/sh
# Installed by teleport-db at each start: lints pushes to the policy branch.
TELEPORT_POLICY_BRANCH={branch}
TELEPORT_CLUSTER_NAME={cluster}
export TELEPORT_POLICY_BRANCH TELEPORT_CLUSTER_NAME
exec {python} -m control.prereceive
"""

INITIAL_CLUSTER = """\
kind: cluster
version: v1
metadata:
  name: {cluster}
spec:
  # Lifetime of certificates from `tsh login`, unless a role or the request asks for less.
  certificate_ttl: 12h
  # No session outlives this.
  max_session_ttl: 30h
  # End live sessions when their certificate expires.
  disconnect_expired_cert: false
"""

INITIAL_ACCESS_ROLE = """\
kind: role
version: v5
metadata:
  name: access
  description: Databases, db users and db names from each user's traits
spec:
  allow:
    db_labels:
      "*": "*"
    db_names: ["{{internal.db_names}}"]
    db_users: ["{{internal.db_users}}"]
"""


class PushRejected(Exception):
    """The hosted repository refused a change; `str()` holds the hook's messages."""


def git(args: list[str], cwd: Path | None = None, check: bool = True, **kw: object) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": AUTHOR[0],
        "GIT_AUTHOR_EMAIL": AUTHOR[1],
        "GIT_COMMITTER_NAME": AUTHOR[0],
        "GIT_COMMITTER_EMAIL": AUTHOR[1],
        "GIT_TERMINAL_PROMPT": "0",
    }
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False, **kw
    )
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc.stdout


def repo_path(data_dir: Path) -> Path:
    return Path(data_dir) / REPO_DIR


def install_hook(repo: Path, cluster: str, branch: str = DEFAULT_BRANCH) -> None:
    hook = repo / "hooks" / "pre-receive"
    text = HOOK_TEMPLATE.format(
        branch=shlex.quote(branch),
        cluster=shlex.quote(cluster),
        python=shlex.quote(sys.executable),
    )
    write_atomic(hook, text.encode(), 0o755)


def init_hosted_repo(data_dir: Path, cluster: str, branch: str = DEFAULT_BRANCH) -> Path:
    """Create the bare repository with its first commit (once), and (re)install the hook."""
    repo = repo_path(data_dir)
    if not (repo / "HEAD").exists():
        repo.mkdir(parents=True, exist_ok=True)
        git(["init", "--quiet", "--bare", f"--initial-branch={branch}", str(repo)])
        # Pushes to a branch checked out nowhere; accept them and keep reflogs for audits.
        git(["config", "core.logAllRefUpdates", "true"], cwd=repo)
        commit_files(
            repo,
            {
                "cluster.yaml": INITIAL_CLUSTER.format(cluster=cluster).encode(),
                "roles/access.yaml": INITIAL_ACCESS_ROLE.encode(),
            },
            "Initial policy: cluster settings and the access role",
            branch=branch,
        )
    install_hook(repo, cluster, branch)
    return repo


def commit_files(
    repo: Path,
    changes: dict[str, bytes | None],
    message: str,
    branch: str = DEFAULT_BRANCH,
    warn: Callable[[str], None] | None = None,
) -> str:
    """Commit `changes` (path -> content, None deletes) on `branch` and push it through the
    hook. Returns the new commit id; raises PushRejected with the hook's output. `warn` is
    given each lint warning the hook printed about a file of `changes`."""
    with tempfile.TemporaryDirectory(prefix="teleport-policy-") as tmp:
        work = Path(tmp) / "work"
        has_branch = bool(git(["ls-remote", "--heads", str(repo), branch]).strip())
        if has_branch:
            git(["clone", "--quiet", "--branch", branch, str(repo), str(work)])
        else:
            git(["init", "--quiet", f"--initial-branch={branch}", str(work)])
            git(["remote", "add", "origin", str(repo)], cwd=work)
        for rel, content in changes.items():
            target = work / rel
            if content is None:
                if target.exists():
                    git(["rm", "--quiet", rel], cwd=work)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(content)
            git(["add", rel], cwd=work)
        if not git(["status", "--porcelain"], cwd=work).strip():
            return git(["rev-parse", "HEAD"], cwd=work).strip()
        git(["commit", "--quiet", "-m", message], cwd=work)
        proc = subprocess.run(
            ["git", "push", "--quiet", "origin", f"HEAD:refs/heads/{branch}"],
            cwd=work,
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise PushRejected(_remote_lines(proc.stderr))
        if warn is not None:
            for line in _remote_lines(proc.stderr).splitlines():
                if line.startswith(tuple(f"warning: {path}:" for path in changes)):
                    warn(line.rstrip())
        return git(["rev-parse", "HEAD"], cwd=work).strip()


def _remote_lines(stderr: str) -> str:
    """The hook's own messages, without git's `remote:` prefixes and push boilerplate."""
    lines = []
    for line in stderr.splitlines():
        if line.startswith("remote: "):
            lines.append(line[len("remote: ") :])
    return "\n".join(lines) or stderr.strip()


def read_file(repo: Path, path: str, branch: str = DEFAULT_BRANCH) -> bytes | None:
    """A file on the policy branch (None when absent)."""
    proc = subprocess.run(
        ["git", "show", f"refs/heads/{branch}:{path}"],
        cwd=repo,
        capture_output=True,
        check=False,
    )
    return proc.stdout if proc.returncode == 0 else None


def list_files(repo: Path, folder: str, branch: str = DEFAULT_BRANCH) -> list[str]:
    out = git(
        ["ls-tree", "-r", "--name-only", f"refs/heads/{branch}", "--", folder],
        cwd=repo,
        check=False,
    )
    return [line for line in out.splitlines() if line]


def clone_url(data_dir: Path) -> str:
    return str(repo_path(data_dir).resolve())
