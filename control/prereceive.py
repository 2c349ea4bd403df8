"""The hosted repository's `pre-receive` hook: lint a push before it lands.

git runs it in the bare repository with the pushed objects in quarantine, and feeds one line
per ref: `<old> <new> <refname>`. Pushes to the policy branch are linted exactly as the
control plane will reconcile them; on any error the whole push is refused and the problems
are printed with `file:line:col`, which git shows the person pushing as `remote:` lines.
Other branches and tags are accepted unchecked (they are not policy), but the policy branch
can never be deleted.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

from control.reconcile import evaluate_commit

ZERO = "0" * 40
SHOWN_ERRORS = 50


def check_push(lines: list[str], repo: Path, branch: str, cluster: str | None, out: TextIO) -> int:
    status = 0
    for line in lines:
        parts = line.split()
        if len(parts) != 3:
            continue
        _old, new, ref = parts
        if ref != f"refs/heads/{branch}":
            continue
        if new == ZERO:
            print(f"teleport: the policy branch {branch!r} cannot be deleted", file=out)
            status = 1
            continue
        evaluation = evaluate_commit(repo, new, cluster)
        for warning in evaluation.warnings:
            print(f"warning: {warning}", file=out)
        if evaluation.errors:
            count = len(evaluation.errors)
            print(
                f"teleport: push refused: commit {new[:12]} has {count} policy "
                f"error{'s' if count != 1 else ''}; the policy in force is unchanged",
                file=out,
            )
            for error in evaluation.errors[:SHOWN_ERRORS]:
                print(error, file=out)
            if count > SHOWN_ERRORS:
                print(f"... and {count - SHOWN_ERRORS} more (run `tctl lint`)", file=out)
            status = 1
        else:
            print(f"teleport: commit {new[:12]} is valid policy; publishing it", file=out)
    return status


def main() -> int:
    branch = os.environ.get("TELEPORT_POLICY_BRANCH", "main")
    cluster = os.environ.get("TELEPORT_CLUSTER_NAME") or None
    lines = sys.stdin.read().splitlines()
    try:
        return check_push(lines, Path.cwd(), branch, cluster, sys.stderr)
    except Exception as exc:  # a hook that crashes must still refuse, and say why
        print(f"teleport: push refused: the policy check failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
