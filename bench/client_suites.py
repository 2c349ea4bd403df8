"""Run a PostgreSQL client library's own test suite directly and through both paths, and
show where the outcomes differ.

    python -m bench.client_suites [--version X.Y.Z] [--keep]

The suite is asyncpg's (its source distribution carries its tests, and they accept a
running server through the PG* variables). The cluster is the one of
`bench.dataplane_bench` (one PostgreSQL with TLS and cert auth; an all-in-one `teleport
start` and a separate proxy and agent); the suite then runs three times, as the same
database user:
- direct-TLS: PGHOST/PGPORT of PostgreSQL, a db-CA client certificate;
- all-in-one and distributed: the proxy's address and the files `tsh db login` wrote.
The suite needs a superuser and other database names (it creates types, extensions and
databases), so for this run the db user is made a superuser and the role allows every db
user and db name (a push to the cluster's policy repository, as an administrator would).
asyncpg is installed, with pytest, in a venv of its own under the run's directory (from
PyPI, or the machine's pip configuration).

Printed: passed / failed / errors / skipped per path, then every test whose outcome
through a path differs from direct, with the failure's first line. Tests that fail
directly too (they want a standby server, or the server's own files) show up in the counts
only.
"""

from __future__ import annotations

import argparse
import configparser
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

from bench.dataplane_bench import Bench, prepare, run, wait_answers

SUITE_TIMEOUT = 1800
PATHS = ("direct-TLS", "all-in-one", "distributed")
LIBPQ_TO_ENV = {
    "host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
}  # fmt: skip
OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S+)(?: - (.*))?$")
SKIPPED = re.compile(r"^SKIPPED \[(\d+)\] (\S+?:\d+): (.*)$")  # pytest -rA groups skips


def pg_env(conninfo: str, service_file: Path) -> dict[str, str]:
    """PG* variables for a libpq conninfo (`service=...` read from `service_file`)."""
    params = dict(part.split("=", 1) for part in conninfo.split())
    service = params.pop("service", None)
    if service is not None:
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(service_file)
        params = {**dict(parser[service]), **params}
    return {env: params[key] for key, env in LIBPQ_TO_ENV.items() if key in params}


def open_up(b: Bench) -> None:
    """Superuser alice, and a role allowing every db user and db name (pushed like any
    policy change); waits until both proxies let alice into database `postgres`."""
    b.pg.psql_admin("alter role alice superuser")
    env = b.base_env()
    env.update(GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="bench@localhost",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="bench@localhost")
    work = b.root / "policy-work"
    run(["git", "clone", "-q", str(b.root / "cluster" / "policies.git"), str(work)], env)
    path = work / "roles" / "access.yaml"
    role = yaml.safe_load(path.read_text())
    role["spec"]["allow"]["db_users"] = ["*"]
    role["spec"]["allow"]["db_names"] = ["*"]
    path.write_text(yaml.safe_dump(role, sort_keys=False))
    run(["git", "-C", str(work), "commit", "-qam", "client suites: any db user and name"], env)
    run(["git", "-C", str(work), "push", "-q", "origin", "HEAD"], env)
    for name in ("all-in-one", "distributed"):
        target = b.targets[name]
        wait_answers(target, 30, f"{target.conninfo} dbname=postgres")


def fetch_asyncpg(root: Path, version: str | None) -> tuple[Path, Path]:
    """A venv with asyncpg (and pytest), and the tests of the same version's sdist."""
    venv = root / "suite-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    wanted = f"asyncpg=={version}" if version else "asyncpg"
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, wanted, "pytest", "distro"], check=True, timeout=600)
    installed = subprocess.run(
        [str(py), "-c", "import asyncpg; print(asyncpg.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    dl = root / "sdist"
    subprocess.run(
        [str(py), "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-binary", ":all:", f"asyncpg=={installed}", "-d", str(dl)],
        check=True, timeout=600,
    )  # fmt: skip
    (archive,) = dl.glob("asyncpg-*.tar.gz")
    suite = root / "asyncpg-suite"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name]
        tar.extractall(suite, members=members, filter="data")
    (top,) = suite.iterdir()
    print(f"asyncpg {installed}: {sum(1 for _ in (top / 'tests').glob('test_*.py'))} test "
          "files", flush=True)
    return py, top


def run_suite(py: Path, suite: Path, env: dict[str, str], log: Path) -> dict[str, str]:
    """test id -> 'PASSED' / 'FAILED: first line' / ... from one run of the suite."""
    argv = [
        str(py), "-m", "pytest", "tests", "-p", "no:cacheprovider", "--import-mode=importlib",
        "-q", "-rA", "--tb=line", "-o", "addopts=",
    ]  # fmt: skip
    with log.open("w") as out:
        subprocess.run(argv, cwd=suite, env=env, stdout=out, stderr=subprocess.STDOUT,
                       timeout=SUITE_TIMEOUT, check=False)
    return parse_log(log)


def parse_log(log: Path) -> dict[str, str]:
    """The outcome of every test in a `pytest -rA` log."""
    outcomes: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        match = OUTCOME.match(line)
        if match:
            kind, test, why = match.groups()
            outcomes[test] = kind if not why else f"{kind}: {why[:160]}"
            continue
        skipped = SKIPPED.match(line)
        if skipped:  # one entry per skipped test, keyed by where the skip was decided
            count, where, why = skipped.groups()
            for i in range(int(count)):
                outcomes[f"{where}#{i}"] = f"SKIPPED: {why[:160]}"
    if not outcomes:
        raise RuntimeError(f"the suite reported nothing: see {log}")
    return outcomes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", help="asyncpg version (default: the newest)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="client-suites-"))
    print(f"run directory: {root}", flush=True)
    b = prepare(root)
    try:
        open_up(b)
        py, suite = fetch_asyncpg(root, args.version)
        results: dict[str, dict[str, str]] = {}
        for name in PATHS:
            target = b.targets[name]
            env = {k: v for k, v in b.base_env().items() if k != "PGSERVICEFILE"}
            env.update(pg_env(target.conninfo, Path(target.env["PGSERVICEFILE"])))
            started = time.monotonic()
            results[name] = run_suite(py, suite, env, root / f"suite-{name}.log")
            print(f"{name}: done in {time.monotonic() - started:.0f} s", flush=True)
    finally:
        b.stop()
        b.pg.stop()
        b.pg.destroy()
    report(results)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(results: dict[str, dict[str, str]]) -> None:
    kinds = ("PASSED", "FAILED", "ERROR", "SKIPPED")
    print("\n| path | " + " | ".join(k.lower() for k in kinds) + " | differs from direct |")
    print("| --- |" + " --- |" * (len(kinds) + 1))
    direct = results["direct-TLS"]
    for name, outcomes in results.items():
        counts = [sum(1 for o in outcomes.values() if o.split(":")[0] == k) for k in kinds]
        differs = sum(
            1 for t in set(direct) | set(outcomes)
            if direct.get(t, "").split(":")[0] != outcomes.get(t, "").split(":")[0]
        )  # fmt: skip
        print(f"| {name} | " + " | ".join(map(str, counts)) + f" | {differs} |")
    for name, outcomes in results.items():
        if name == "direct-TLS":
            continue
        for test in sorted(set(direct) | set(outcomes)):
            here, there = outcomes.get(test, "missing"), direct.get(test, "missing")
            if here.split(":")[0] != there.split(":")[0]:
                print(f"{name}: {test}: {here} (direct: {there.split(':')[0]})")


if __name__ == "__main__":
    raise SystemExit(main())
