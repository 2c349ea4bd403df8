"""Where the control plane reads policy from.

- `LocalSource`: a repository on this host (the hosted `policies.git`, or any clone); a push
  updates its refs, which the watcher sees at once.
- `RemoteSource` (pull mode): policy on a forge. A bare mirror under the data dir is fetched
  every N seconds (with jitter, so a fleet of control planes does not fetch in step).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

from control.reconcile import SourceError

FETCH_TIMEOUT_S = 60


@dataclass
class LocalSource:
    repo_path: Path
    branch: str = "main"

    def refresh(self) -> None:
        """A local repository is always current."""

    def git_dir(self) -> Path:
        dot_git = self.repo_path / ".git"
        return dot_git if dot_git.is_dir() else self.repo_path

    def describe(self) -> str:
        return f"{self.repo_path} (branch {self.branch})"


@dataclass
class RemoteSource:
    url: str
    mirror: Path
    branch: str = "main"

    @property
    def repo_path(self) -> Path:
        return self.mirror

    def refresh(self) -> None:
        if not (self.mirror / "HEAD").exists():
            self.mirror.parent.mkdir(parents=True, exist_ok=True)
            self._git(["clone", "--quiet", "--mirror", self.url, str(self.mirror)], None)
        else:
            self._git(["fetch", "--quiet", "--prune", "origin"], self.mirror)

    def describe(self) -> str:
        return f"{self.url} (branch {self.branch}, pulled into {self.mirror})"

    def _git(self, args: list[str], cwd: Path | None) -> None:
        try:
            proc = subprocess.run(
                ["git", *args],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=FETCH_TIMEOUT_S,
                check=False,
                env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/bin:/bin:/usr/local/bin"},
            )
        except subprocess.TimeoutExpired:
            raise SourceError(
                f"fetching {self.url} took over {FETCH_TIMEOUT_S}s; the bundle in force stays"
            ) from None
        if proc.returncode != 0:
            detail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no output"
            raise SourceError(f"cannot fetch {self.url}: {detail}")
