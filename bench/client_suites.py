"""Run PostgreSQL client libraries' own test suites directly and through both paths, and
show where the outcomes differ.

    python -m bench.client_suites [--suite NAME]... [--version X.Y.Z] [--keep]
                                  [--postgres-source TARBALL_OR_URL]

The suites are those of asyncpg (a client in C/Cython), pg8000 (pure Python, its own
protocol code), psycopg2 (on libpq, as psql; run against the psycopg2-binary wheel of
the same version), SQLAlchemy (its backend tests, on psycopg 3: the queries an ORM and a
schema tool send, reflection of every kind of object among them), Django (its whole suite,
some 18,000 tests, by its own runner in two processes: it creates its test databases,
copies them with CREATE DATABASE ... TEMPLATE and drops them, all through the path), and
pgcli and pgspecial
(a terminal client and its backslash commands: the catalog queries GUIs send too). Their
source distributions carry their tests. The cluster is the one of
`bench.dataplane_bench` (one PostgreSQL with TLS and cert auth; an all-in-one `teleport
start` and a separate proxy and agent); each suite then runs three times, as the same
database user:
- direct-TLS: PGHOST/PGPORT of PostgreSQL, a db-CA client certificate;
- all-in-one and distributed: the proxy's address and the files `tsh db login` wrote.
asyncpg's, psycopg2's, pgcli's and pgspecial's tests take the server from the PG*
variables, SQLAlchemy's from `--dburi` (built from them; libpq reads the TLS files from
the variables). pg8000's take it from a fixture
(`db_kwargs`, user postgres with a password): the copy run here gets one that reads the
same PG* variables and builds the TLS context from them, appended to its three conftest
files; its `auth` directories are left out (they need servers set up for password, MD5,
SCRAM and GSS logins, which no path here offers). pgspecial's tests create their database
with the en_US.UTF-8 locale, which this machine may lack: the copy run here asks for
C.UTF-8. Of SQLAlchemy's suite, its dialect, SQL and engine tests run (with
`--backend-only`, about 12,900 tests, 9-10 minutes a path here), in a database of their
own as SQLAlchemy's README asks: its ORM tests send the same kinds of statements through
the same dialect and take ten times as long.
The suites need a superuser and other database names (they create types, extensions and
databases), so for this run the db user is made a superuser and the role allows every db
user and db name (a push to the cluster's policy repository, as an administrator would).
A suite's own databases are dropped before each of its runs, so that no run sees what the
one before left (pgspecial's expected owners change otherwise).
Each library is installed, with pytest, in a venv of its own under the run's directory
(from PyPI, or the machine's pip configuration).

PostgreSQL's own suites (`postgres-regress`, psql on some 200 scripts, and
`postgres-isolation`, concurrent sessions on libpq's asynchronous API) come from the source
of the server's version; see bench/pg_regress.py. Besides each test's verdict, their output
files through each path are compared with the direct run's, byte for byte, and so are
pg_dump's dumps of the regression tests' database and what pg_restore makes of them.

Printed per suite: passed / failed / errors / skipped per path, then every test whose
outcome through a path differs from direct, with the failure's first line. Tests that fail
directly too (they want a standby server, or the server's own files) show up in the counts
only.

SQLAlchemy 2.1.9, pgcli 4.7.1 and pgspecial 2.2.1 (2026-11-23): no test's outcome differs
from direct on either path. Django 5.2.19 (18,177 tests; 336 s directly, 366 s through
the all-in-one, 442 s distributed): none differs but one timed test of XML parsing, with no
database in it, that failed directly (2.09 against at most 2). PostgreSQL 15.18's
regression tests (217) and isolation tests (115), 2026-11-23: every output file through
either path is the direct run's, byte for byte (one test of each fails on every path:
`sequence` expects the bootstrap superuser, `temp-schema-cleanup` a connection without TLS).
The one difference seen (2026-11-22: asyncpg 0.32.0, pg8000 1.31.6, psycopg2 2.9.13):
asyncpg's `test_executemany_server_failure_during_writes` ("should stop early") failed in
3 of 8 runs through the all-in-one and 6 of 8 through the distributed path (never
directly, once in 8 through pgbouncer). The client gets the same error
and nothing is stored, but it sends the whole batch before it notices.
docs/architecture.md ("What a client can tell apart") explains why.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench import pg_regress
from bench.dataplane_bench import Bench, prepare, run, wait_answers

SUITE_TIMEOUT = 1800
PATHS = ("direct-TLS", "all-in-one", "distributed")
LIBPQ_TO_ENV = {
    "host": "PGHOST", "port": "PGPORT", "user": "PGUSER", "dbname": "PGDATABASE",
    "sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
}  # fmt: skip
# A test id may hold spaces (parametrized values): it runs to " - " or the line's end; it
# starts with no space (a captured log line, "ERROR    name: ...", is not an outcome).
OUTCOME = re.compile(r"^(PASSED|FAILED|ERROR|XFAIL|XPASS) (\S.*?)(?: - (.*))?$")
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


@dataclass(frozen=True)
class Suite:
    package: str  # whose sdist carries the tests
    tests: str  # the sdist's test directory, relative to its top
    install: str = ""  # what to install instead of `package` (a wheel of the same code)
    env: tuple[tuple[str, str], ...] = ()  # (variable, PG* variable to copy it from)
    extra: tuple[str, ...] = ()  # what the tests import besides pytest
    ignore: tuple[str, ...] = ()  # pytest --ignore-glob patterns
    options: tuple[str, ...] = ()  # more pytest options
    patch: Callable[[Path], None] | None = None  # points the suite at the PG* variables
    whole: bool = False  # unpack the whole sdist (the suite runs from its own tree)
    paths: tuple[str, ...] = ()  # what to run, when not all of `tests`
    setup: tuple[tuple[str, str], ...] = ()  # (database, SQL) run once as the superuser
    fresh_dbs: tuple[str, ...] = ()  # the suite's own databases, dropped before each run
    path_args: Callable[[dict[str, str]], list[str]] | None = None  # from the PG* variables
    runner: Callable[[Path], list[str]] | None = None  # argv from the venv's python, not pytest
    parse: Callable[[Path], dict[str, str]] | None = None  # the runner's log -> outcomes


PG8000_TARGET = '''

# Appended by teleport-db's bench/client_suites.py: the server under test, from the PG*
# variables (direct, or a teleport-db proxy with the files `tsh db login` wrote).
@pytest.fixture(scope="class")
def db_kwargs():
    import os
    import ssl

    context = ssl.create_default_context(cafile=os.environ["PGSSLROOTCERT"])
    context.load_cert_chain(os.environ["PGSSLCERT"], os.environ["PGSSLKEY"])
    return {
        "user": os.environ["PGUSER"], "password": None, "host": os.environ["PGHOST"],
        "port": int(os.environ["PGPORT"]), "database": os.environ["PGDATABASE"],
        "ssl_context": context,
    }
'''


def point_pg8000(top: Path) -> None:
    for kind in ("dbapi", "legacy", "native"):
        conftest = top / "test" / kind / "conftest.py"
        conftest.write_text(conftest.read_text() + PG8000_TARGET)


def point_pgspecial(top: Path) -> None:
    dbutils = top / "tests" / "dbutils.py"
    dbutils.write_text(dbutils.read_text().replace("'en_US.UTF-8'", "'C.UTF-8'"))


def sqlalchemy_dburi(env: dict[str, str]) -> list[str]:
    return [f"--dburi=postgresql+psycopg://{env['PGUSER']}@{env['PGHOST']}:{env['PGPORT']}"
            "/test"]


DJANGO_SETTINGS = '''"""Written by teleport-db's bench/client_suites.py: the server under test, from
the PG* variables (direct, or a teleport-db proxy; libpq reads the TLS files from them)."""
import os

_server = {"ENGINE": "django.db.backends.postgresql", "HOST": os.environ["PGHOST"],
           "PORT": os.environ["PGPORT"], "USER": os.environ["PGUSER"]}
DATABASES = {"default": {**_server, "NAME": "django"},
             "other": {**_server, "NAME": "django_other"}}
SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
'''
# Django's runner, -v 2: "name (module.Class.name) ... ok", or the verdict on the line after
# when the test has a docstring; "skipped 'why'", "expected failure", "FAIL", "ERROR".
DJANGO_TEST = re.compile(r"^(\w+) \(([\w.]+)\)(.*)$")
DJANGO_VERDICT = re.compile(
    r" \.\.\. (ok|FAIL|ERROR|skipped.*|expected failure|unexpected success)$"
)
DJANGO_KINDS = {"ok": "PASSED", "FAIL": "FAILED", "ERROR": "ERROR", "skipped": "SKIPPED",
                "expected failure": "XFAIL", "unexpected success": "XPASS"}  # fmt: skip


def point_django(top: Path) -> None:
    (top / "tests" / "test_teleport_db.py").write_text(DJANGO_SETTINGS)


def django_runner(py: Path) -> list[str]:
    # It creates its test databases through the path under test (CREATE DATABASE, then a
    # copy per process with CREATE DATABASE ... TEMPLATE) and drops them at its end.
    return [str(py), "runtests.py", "--settings=test_teleport_db", "--parallel=2", "-v", "2",
            "--noinput"]  # fmt: skip


def parse_django_log(log: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    test = None
    for line in log.read_text(errors="replace").splitlines():
        rest = line
        started = DJANGO_TEST.match(line)
        if started:
            test, rest = started.group(2), started.group(3)
        verdict = DJANGO_VERDICT.search(rest)
        if verdict and test is not None:
            word = verdict.group(1)
            kind = DJANGO_KINDS["skipped" if word.startswith("skipped") else word]
            outcomes[test] = kind if kind != "SKIPPED" else f"SKIPPED: {word[8:160]}"
            test = None
    if not outcomes:
        raise RuntimeError(f"the suite reported nothing: see {log}")
    return outcomes


SUITES = {
    "asyncpg": Suite("asyncpg", "tests", extra=("distro",)),
    "pg8000": Suite("pg8000", "test", extra=("pytest-mock", "pytest-benchmark", "pytz"),
                    ignore=("*/auth/*",), options=("--benchmark-disable",),
                    patch=point_pg8000),
    # libpq underneath, as psql: its tests take host, port and user from the PG* variables
    # and libpq the TLS files; the database is named by PSYCOPG2_TESTDB.
    "psycopg2": Suite("psycopg2", "tests", install="psycopg2-binary",
                      env=(("PSYCOPG2_TESTDB", "PGDATABASE"),)),
    "sqlalchemy": Suite(
        "sqlalchemy", "test", extra=("psycopg[binary]", "greenlet"), whole=True,
        paths=("test/dialect", "test/sql", "test/engine"),
        options=("--import-mode=prepend", "--backend-only"),
        # A database of its own, as its README asks: reflection tests list every table.
        setup=(("postgres", "create database test owner alice"),
               ("test", "create schema test_schema; create schema test_schema_2; "
                "create extension hstore; create extension citext")),
        path_args=sqlalchemy_dburi,
    ),
    # psycopg 3 on libpq; their conftest files import modules beside them.
    "pgcli": Suite("pgcli", "tests", extra=("psycopg[binary]", "sshtunnel"),
                   ignore=("*/tests/features/*",), options=("--import-mode=prepend",),
                   fresh_dbs=("_test_db",)),
    # The whole of Django's own suite on its PostgreSQL backend (psycopg 3), run by its own
    # runner; an app whose optional library is missing (Pillow, selenium, ...) skips.
    "django": Suite("django", "tests", extra=("psycopg[binary]", "psycopg-pool", "tblib"),
                    patch=point_django, runner=django_runner,
                    parse=parse_django_log),
    "pgspecial": Suite("pgspecial", "tests", extra=("psycopg[binary]", "configobj"),
                       options=("--import-mode=prepend",), patch=point_pgspecial,
                       fresh_dbs=("_test_db", "_foreign_test_db")),
}


def fetch(root: Path, suite: Suite, version: str | None) -> tuple[Path, Path]:
    """A venv with the library (and pytest), and the tests of the same version's sdist."""
    venv = root / f"{suite.package}-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    name = suite.install or suite.package
    wanted = f"{name}=={version}" if version else name
    pip = [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, wanted, "pytest", *suite.extra], check=True, timeout=600)
    installed = subprocess.run(
        [str(py), "-c", "from importlib.metadata import version; "
         f"print(version({name!r}))"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    dl = root / f"{suite.package}-sdist"
    subprocess.run(
        [str(py), "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-binary", ":all:", f"{suite.package}=={installed}", "-d", str(dl)],
        check=True, timeout=600,
    )  # fmt: skip
    (archive,) = dl.glob(f"{suite.package}-*.tar.gz")
    unpacked = root / f"{suite.package}-suite"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if suite.whole or f"/{suite.tests}/" in m.name]
        tar.extractall(unpacked, members=members, filter="data")
    (top,) = unpacked.iterdir()
    if suite.patch is not None:
        suite.patch(top)
    files = sum(1 for _ in (top / suite.tests).rglob("test*.py"))
    print(f"{suite.package} {installed}: {files} test files", flush=True)
    return py, top


def run_suite(py: Path, suite: Suite, top: Path, env: dict[str, str], log: Path
              ) -> dict[str, str]:
    """test id -> 'PASSED' / 'FAILED: first line' / ... from one run of the suite."""
    if suite.runner is not None:  # its own runner, from its test directory
        argv, cwd = suite.runner(py), top / suite.tests
    else:
        argv, cwd = [
            str(py), "-m", "pytest", *(suite.paths or (suite.tests,)), "-p", "no:cacheprovider",
            "--import-mode=importlib", "-q", "-rA", "--tb=line", "-o", "addopts=",
            *(f"--ignore-glob={pattern}" for pattern in suite.ignore), *suite.options,
            *(suite.path_args(env) if suite.path_args else ()),
        ], top  # fmt: skip
    with log.open("w") as out:
        subprocess.run(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                       timeout=SUITE_TIMEOUT, check=False)
    return (suite.parse or parse_log)(log)


def path_env(b: Bench, name: str) -> dict[str, str]:
    """The environment of a suite run through `name`: its PG* variables."""
    target = b.targets[name]
    env = {k: v for k, v in b.base_env().items() if k != "PGSERVICEFILE"}
    env.update(pg_env(target.conninfo, Path(target.env["PGSERVICEFILE"])))
    return env


def run_postgres_suite(b: Bench, tree: pg_regress.PostgresTree, suite_name: str,
                       results: dict[str, dict[str, str]]) -> list[str]:
    """One of PostgreSQL's own suites through each path; what to print besides the table:
    how its outputs (and its database's dumps) compare with direct's."""
    suite = pg_regress.SUITES[suite_name]
    outputs = b.root / suite_name
    for name in PATHS:
        started = time.monotonic()
        results[name] = pg_regress.run_regress(tree, suite, path_env(b, name), outputs / name,
                                               b.root / f"{suite_name}-{name}.log")
        print(f"{suite_name}, {name}: done in {time.monotonic() - started:.0f} s", flush=True)
    notes = [
        f"{name}: output not byte for byte the direct run's: "
        f"{', '.join(pg_regress.differing_outputs(outputs / PATHS[0], outputs / name)) or 'none'}"
        for name in PATHS[1:]
    ]
    if suite.dumped:
        started = time.monotonic()
        dumps = pg_regress.dump_checks(tree, {name: path_env(b, name) for name in PATHS},
                                       suite.dbname, b.root / f"{suite_name}-dumps")
        print(f"{suite_name}: dumped and restored in {time.monotonic() - started:.0f} s",
              flush=True)  # fmt: skip
        notes += [
            f"{name}: pg_dump, pg_dump -Fd -j 2 and pg_restore -j 2 of database "
            f"{suite.dbname!r}; differs from direct: {what or 'nothing'}"
            for name, what in dumps.items()
        ]
    return notes


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
    parser.add_argument("--suite", choices=sorted(SUITES) + sorted(pg_regress.SUITES),
                        action="append", help="which suite (repeatable; default: all)")
    parser.add_argument("--version", help="the library's version (default: the newest); "
                        "with one --suite of a library only")
    parser.add_argument("--postgres-source", metavar="TARBALL_OR_URL",
                        help="the source of the server's PostgreSQL version, for its own "
                        "suites (default: Debian's source package)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    args = parser.parse_args()
    names = args.suite or sorted(SUITES) + sorted(pg_regress.SUITES)
    if args.version and (len(names) != 1 or names[0] not in SUITES):
        parser.error("--version needs exactly one --suite, of a library")
    root = Path(tempfile.mkdtemp(prefix="client-suites-"))
    print(f"run directory: {root}", flush=True)
    b = prepare(root)
    all_results: dict[str, dict[str, dict[str, str]]] = {}
    notes: dict[str, list[str]] = {}  # PostgreSQL's suites: how outputs compare with direct's
    tree: pg_regress.PostgresTree | None = None
    try:
        open_up(b)
        for suite_name in names:
            results = all_results[suite_name] = {}
            if suite_name in pg_regress.SUITES:
                if tree is None:
                    tree = pg_regress.prepare_tree(root, b.pg.binaries.postgres.resolve().parent,
                                                   args.postgres_source)  # fmt: skip
                notes[suite_name] = run_postgres_suite(b, tree, suite_name, results)
                continue
            suite = SUITES[suite_name]
            py, top = fetch(root, suite, args.version)
            for database, sql in suite.setup:
                b.pg.psql_admin(sql, database=database)
            for name in PATHS:
                for db in suite.fresh_dbs:
                    b.pg.psql_admin(f'drop database if exists "{db}" with (force)')
                env = path_env(b, name)
                env.update((variable, env[source]) for variable, source in suite.env)
                started = time.monotonic()
                log = root / f"{suite_name}-{name}.log"
                results[name] = run_suite(py, suite, top, env, log)
                print(f"{suite_name}, {name}: done in {time.monotonic() - started:.0f} s",
                      flush=True)
    finally:
        b.stop()
        b.pg.stop()
        b.pg.destroy()
    for suite_name, results in all_results.items():
        print(f"\n{suite_name}'s suite")
        report(results)
        for note in notes.get(suite_name, ()):
            print(note)
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


def report(results: dict[str, dict[str, str]]) -> None:
    kinds = ("PASSED", "FAILED", "ERROR", "SKIPPED")
    print("| path | " + " | ".join(k.lower() for k in kinds) + " | differs from direct |")
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
