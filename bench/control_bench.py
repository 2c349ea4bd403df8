"""Benchmark the control plane: push-to-published latency, and compile/sign at scale.

    python -m bench.control_bench [--pushes 50] [--users 10000] [--roles 1000]
                                  [--databases 10000] [--runs 3]

1. Push-to-published: a real `teleport start --roles=auth` process hosts the policy
   repository; 50 real `git push`es each change one role. For each, the time from starting
   `git push` until the control plane's state names that commit as the bundle in force
   (lint in the pre-receive hook, the watcher, read, lint, compile, sign, atomic publish).
   Printed with the `git push` command's own duration beside it.
2. Compile and sign the generated 10,000-user / 1,000-role / 10,000-database repository:
   each stage timed separately (read the commit with GitPython, lint, compile, sign, and
   an agent's verify), best and median of --runs, plus the bundle's size.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bench.lint_bench import generate
from control.compile import compile_policy
from control.gitsource import read_policy_files
from schemas.bundle import BundleCAs, key_id, sign_bundle, verify_bundle
from schemas.policy.loader import load_policy

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "bench",
    "GIT_AUTHOR_EMAIL": "bench@example.com",
    "GIT_COMMITTER_NAME": "bench",
    "GIT_COMMITTER_EMAIL": "bench@example.com",
}
ROLE = """kind: role
version: v5
metadata:
  name: bench-{i}
spec:
  allow:
    db_labels:
      env: [dev]
    db_users: [user{i}]
    db_names: [main]
"""


def git(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, capture_output=True, text=True, check=True
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def push_latency(pushes: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-control-") as tmp:
        root = Path(tmp)
        config = root / "teleport.yaml"
        config.write_text(
            "auth_service:\n  enabled: yes\n  cluster_name: bench\n"
            f"  listen_addr: 127.0.0.1:{free_port()}\n"
        )
        data = root / "data"
        teleport = Path(sys.executable).with_name("teleport")
        proc = subprocess.Popen(
            [
                str(teleport),
                "start",
                "--roles=auth",
                "--config",
                str(config),
                "--data-dir",
                str(data),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            state_path = data / "state.json"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not _in_force(state_path):
                time.sleep(0.02)
            if not _in_force(state_path):
                raise SystemExit("the control plane did not publish its first bundle in 30 s")
            clone = root / "clone"
            git("clone", "--quiet", str(data / "policies.git"), str(clone), cwd=root)
            latencies, push_times = [], []
            for i in range(pushes):
                (clone / "roles").mkdir(exist_ok=True)
                (clone / "roles" / f"bench-{i % 5}.yaml").write_text(ROLE.format(i=i))
                git("add", "-A", cwd=clone)
                git("commit", "--quiet", "-m", f"bench {i}", cwd=clone)
                sha = git("rev-parse", "HEAD", cwd=clone).stdout.strip()
                t0 = time.perf_counter()
                git("push", "--quiet", "origin", "HEAD:main", cwd=clone)
                t_push = time.perf_counter()
                while _in_force(state_path) != sha:
                    if time.perf_counter() - t0 > 30:
                        raise SystemExit(f"push {i} was not published within 30 s")
                    time.sleep(0.002)
                t1 = time.perf_counter()
                latencies.append((t1 - t0) * 1000)
                push_times.append((t_push - t0) * 1000)
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    print(f"\nPush-to-published latency over {pushes} pushes (ms)")
    print(f"{'measure':<36}{'p50':>9}{'p95':>9}{'max':>9}")
    for name, values in (
        ("git push (incl. pre-receive lint)", push_times),
        ("push start -> bundle in force", latencies),
    ):
        print(
            f"{name:<36}{percentile(values, 0.5):>9.0f}{percentile(values, 0.95):>9.0f}"
            f"{max(values):>9.0f}"
        )


def _in_force(state_path: Path) -> str | None:
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    in_force = state.get("in_force") or {}
    return in_force.get("commit")


def timed(fn: Callable[[], object], runs: int) -> tuple[float, float, object]:
    times, result = [], None
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), result


def compile_and_sign(users: int, roles: int, databases: int, runs: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
        repo = Path(tmp) / "repo"
        print(f"\nGenerating {users} users, {roles} roles, {databases} databases ...", flush=True)
        generate(repo, users, roles, databases)
        git("init", "--quiet", "--initial-branch=main", cwd=repo)
        git("add", "-A", cwd=repo)
        git("commit", "--quiet", "-m", "generated", cwd=repo)
        rows = []
        best, med, snapshot = timed(lambda: read_policy_files(repo, "HEAD"), runs)
        rows.append(("read commit (GitPython)", best, med))
        best, med, result = timed(lambda: load_policy(snapshot.files), runs)  # type: ignore[union-attr]
        rows.append(("lint (parse + validate + checks)", best, med))
        policy = result.policy  # type: ignore[union-attr]
        assert policy is not None, "the generated repository must lint clean"
        now = datetime.now(UTC)

        def do_compile() -> object:
            return compile_policy(
                policy,
                commit=snapshot.commit,  # type: ignore[union-attr]
                serial=1,
                issued_at=now,
                ttl=timedelta(hours=24),
                cas=BundleCAs(),
            )

        best, med, bundle = timed(do_compile, runs)
        rows.append(("compile", best, med))
        key = Ed25519PrivateKey.generate()
        best, med, data = timed(lambda: sign_bundle(bundle, key), runs)  # type: ignore[arg-type]
        rows.append(("sign (canonical JSON + Ed25519)", best, med))
        keys = {key_id(key.public_key()): key.public_key()}
        best, med, _ = timed(lambda: verify_bundle(data, keys, "bench", 0, now), runs)  # type: ignore[arg-type]
        rows.append(("verify (what an agent does)", best, med))
    total_best = sum(r[1] for r in rows[:4])
    total_med = sum(r[2] for r in rows[:4])
    print(f"\nCompile and sign: {users} users, {roles} roles, {databases} databases")
    print(f"{'stage':<36}{'best s':>9}{'median s':>10}")
    for name, b, m in rows:
        print(f"{name:<36}{b:>9.2f}{m:>10.2f}")
    print(f"{'read + lint + compile + sign':<36}{total_best:>9.2f}{total_med:>10.2f}")
    print(f"bundle size: {len(data) / 1e6:.1f} MB")  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pushes", type=int, default=50)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--roles", type=int, default=1_000)
    parser.add_argument("--databases", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    push_latency(args.pushes)
    compile_and_sign(args.users, args.roles, args.databases, args.runs)


if __name__ == "__main__":
    main()
