"""Benchmark: lint a large generated policy repository.

    python -m bench.lint_bench [--users 10000] [--roles 1000] [--databases 10000] [--runs 3]
                               [--no-git] [--no-compare]

Generates, in a temporary directory, a repository of one file per resource (by default
10,000 users, 1,000 roles, 10,000 databases, as issue 2 asks), checks that it lints clean,
then measures:
- `read_policy_dir` (reading the files) and `load_policy` (parse + validate + cross-checks)
  in this process, best and median of `--runs`;
- the same `load_policy` with PyYAML's pure-Python composer instead of libyaml's, as the
  comparison measured in the same run (skip with `--no-compare`);
- the whole `tctl lint DIR` as a subprocess: wall time and peak memory (ru_maxrss of that
  child alone, from wait4);
- `tctl lint --rev HEAD` on the same tree committed to git (skip with `--no-git`).

The target of issue 2 is under 5 s for the whole `tctl lint` on this repository. Benchmarks
never run as timed assertions in the test suite.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from control.lint import read_policy_dir
from schemas.policy import yamlsource
from schemas.policy.loader import load_policy

ENVS = ["dev", "stage", "prod"]
TEAMS = ["payments", "search", "growth", "infra", "data", "mobile", "web", "ml"]


def generate(root: Path, users: int, roles: int, databases: int) -> int:
    """Write the repository; every role is used, no warning is expected. Returns files."""
    for folder in ("roles", "users", "databases"):
        (root / folder).mkdir(parents=True)
    (root / "cluster.yaml").write_text(
        "kind: cluster\nversion: v1\nmetadata:\n  name: bench\nspec:\n"
        "  certificate_ttl: 12h\n  max_session_ttl: 30h\n  disconnect_expired_cert: true\n"
    )
    for i in range(roles):
        team, env = TEAMS[i % len(TEAMS)], ENVS[i % len(ENVS)]
        (root / "roles" / f"role-{i:05d}.yaml").write_text(
            f"kind: role\nversion: v5\nmetadata:\n  name: role-{i:05d}\n"
            f"  description: {team} engineers on {env}\nspec:\n  allow:\n    db_labels:\n"
            f"      env: [{env}]\n      team: '{team}'\n"
            f"    db_users: [viewer, editor, '{{{{internal.db_users}}}}']\n"
            f"    db_names: [main, 'metrics_*', '^{team}_[a-z]+$']\n"
            "  deny:\n    db_users: [postgres]\n"
            "  options:\n    max_session_ttl: 8h\n"
        )
    for i in range(users):
        first, second = i % roles, (i * 7 + 3) % roles
        (root / "users" / f"user-{i:05d}.yaml").write_text(
            f"kind: user\nversion: v2\nmetadata:\n  name: user-{i:05d}\n"
            f"  description: User number {i}\nspec:\n"
            f"  roles: [role-{first:05d}, role-{second:05d}]\n"
            f"  traits:\n    db_users: [u{i:05d}]\n    db_names: [main, scratch_{i:05d}]\n"
        )
    for i in range(databases):
        team, env = TEAMS[i % len(TEAMS)], ENVS[i % len(ENVS)]
        aws = (
            f"  uri: db-{i:05d}.abcdefghijkl.us-west-2.rds.amazonaws.com:5432\n"
            "  aws:\n    region: us-west-2\n"
            if i % 4 == 0
            else f"  uri: pg-{i:05d}.{team}.internal:5432\n"
        )
        (root / "databases" / f"db-{i:05d}.yaml").write_text(
            f"kind: db\nversion: v3\nmetadata:\n  name: db-{i:05d}\n"
            f"  description: {team} database {i}\n  labels:\n    env: {env}\n"
            f"    team: {team}\nspec:\n  protocol: postgres\n{aws}"
            "  tls:\n    mode: verify-full\n"
        )
    return 1 + users + roles + databases


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times), result


def run_child(argv: list[str]) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS in MiB (this child alone), exit code, last line of output."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert child.stdout is not None
    out = child.stdout.read()
    # Reap it ourselves: wait4 gives this child's own rusage (ru_maxrss in KiB on Linux).
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    child.stdout.close()
    lines = out.decode().strip().splitlines() or [""]
    return elapsed, usage.ru_maxrss / 1024, child.returncode, lines[-1]


def git(repo: Path, *args: str) -> None:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
    }
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lint_bench", description=__doc__)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--roles", type=int, default=1_000)
    parser.add_argument("--databases", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-git", action="store_true", help="skip the --rev measurement")
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the pure-Python composer comparison"
    )
    args = parser.parse_args(argv)
    tctl = str(Path(sys.executable).parent / "tctl")
    rows: list[tuple[str, str, str]] = []

    with tempfile.TemporaryDirectory(prefix="lint-bench-") as tmp:
        root = Path(tmp) / "policy"
        start = time.perf_counter()
        count = generate(root, args.users, args.roles, args.databases)
        print(
            f"generated {count} files ({args.users} users, {args.roles} roles, "
            f"{args.databases} databases) in {time.perf_counter() - start:.1f} s; "
            f"libyaml: {yaml.__with_libyaml__}; runs: {args.runs}"
        )

        best, median, read = timed(lambda: read_policy_dir(root), args.runs)
        files = read[0]  # type: ignore[index]
        rows.append(("read_policy_dir", f"{best:.2f} / {median:.2f}", "-"))

        best, median, result = timed(lambda: load_policy(files), args.runs)
        problems = result.problems  # type: ignore[attr-defined]
        if result.policy is None or problems:  # type: ignore[attr-defined]
            print("the generated repository does not lint clean:", *problems[:5], sep="\n")
            return 1
        rows.append(("load_policy (libyaml composer)", f"{best:.2f} / {median:.2f}", "-"))

        if not args.no_compare:
            original = yamlsource._Loader
            yamlsource._Loader = yamlsource._PyLoader
            try:
                best, median, _ = timed(lambda: load_policy(files), 1)
            finally:
                yamlsource._Loader = original
            rows.append(("load_policy (pure-Python composer)", f"{best:.2f}", "-"))

        times, peaks = [], []
        for _ in range(args.runs):
            elapsed, peak, code, last = run_child([tctl, "lint", str(root)])
            if code != 0:
                print(f"tctl lint exited {code}: {last}")
                return 1
            times.append(elapsed)
            peaks.append(peak)
        rows.append(
            (
                "tctl lint DIR (subprocess)",
                f"{min(times):.2f} / {statistics.median(times):.2f}",
                f"{max(peaks):.0f}",
            )
        )

        if not args.no_git:
            git(root, "init", "-q")
            git(root, "add", "-A")
            git(root, "commit", "-q", "-m", "bench")
            times, peaks = [], []
            for _ in range(args.runs):
                elapsed, peak, code, last = run_child([tctl, "lint", "--rev", "HEAD", str(root)])
                if code != 0:
                    print(f"tctl lint --rev exited {code}: {last}")
                    return 1
                times.append(elapsed)
                peaks.append(peak)
            rows.append(
                (
                    "tctl lint --rev HEAD (subprocess)",
                    f"{min(times):.2f} / {statistics.median(times):.2f}",
                    f"{max(peaks):.0f}",
                )
            )

    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}}  {'seconds (best / median)':>24}  {'peak RSS MiB':>12}")
    for what, seconds, peak in rows:
        print(f"{what:<{width}}  {seconds:>24}  {peak:>12}")
    print(f"\ntarget: tctl lint under 5 s; last summary line: {last}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
