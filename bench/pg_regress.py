"""PostgreSQL's own test suites, run as a client suite (see bench/client_suites.py).

Two suites of the server's source tree, each driven by its own program from the machine's
PostgreSQL client package (`pg_config --pkglibdir`/pgxs/src/test):
- `regress` (pg_regress): the main regression tests, some 200 psql scripts. psql runs each
  one and its whole output (results, errors with their details and hints, notices, COPY,
  `\\crosstabview`, ...) is compared with the expected file, byte for byte;
- `isolation` (pg_isolation_regress): isolationtester drives two to four sessions at once
  on libpq's asynchronous API. It waits for a session to block on a lock, found by the
  process ids libpq reports (BackendKeyData), and checks the notifications' senders.
The tests come from the source of the server's own version (Debian's source package, or
`--postgres-source`). pg_regress also loads C functions built from the same tree
(`regress.c`, compiled against the server's headers) and two contrib modules.

pg_regress drops and creates its database through the path under test, as its users'
test runners do. Each path writes its outputs to a directory of its own; besides each
test's own verdict, every output file is compared with the direct run's.

What the regression tests leave (a database with objects of every kind) is then dumped
and restored with pg_dump and pg_restore through each path, and compared with the same
done directly (`dump_checks`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench.dataplane_bench import apt_install

DEBIAN_POOL = "http://deb.debian.org/debian/pool/main/p"
CONTRIB_MODULES = ("autoinc", "refint")  # what the triggers test loads besides regress.so
RUN_TIMEOUT = 1800
# 'test name ... ok 12 ms' (version 15 and before) or 'ok 3 - name 12 ms' (TAP, 16 on)
OLD_STYLE = re.compile(r"^(?:test |\s+)(\S+)\s+\.\.\. (ok|FAILED|failed \(ignored\))")
TAP_STYLE = re.compile(r"^(not ok|ok)\s+\d+\s+[-+]\s+(\S+)")


@dataclass(frozen=True)
class RegressSuite:
    driver: str  # the program, under pgxs/src/test
    tests: str  # the suite's directory in the source tree
    schedule: str
    dbname: str
    dumped: bool = False  # then pg_dump and pg_restore what its tests left, through each path


SUITES = {
    "postgres-regress": RegressSuite(
        "regress/pg_regress", "src/test/regress", "parallel_schedule", "regression", dumped=True
    ),
    "postgres-isolation": RegressSuite(
        "isolation/pg_isolation_regress", "src/test/isolation", "isolation_schedule",
        "isolation_regression",
    ),
}


@dataclass(frozen=True)
class PostgresTree:
    source: Path  # the unpacked source tree
    bindir: Path  # psql's
    pkglibdir: Path  # the drivers'
    dlpath: Path  # regress.so and the contrib modules the tests load
    version: str


def pg_config(bindir: Path, option: str) -> str:
    done = subprocess.run([str(bindir / "pg_config"), option], capture_output=True, text=True,
                          check=True)  # fmt: skip
    return done.stdout.strip()


def prepare_tree(root: Path, server_bindir: Path, source: str | None) -> PostgresTree:
    """The source of the server's version, unpacked under `root`, and regress.so built."""
    version_line = pg_config(server_bindir, "--version")  # "PostgreSQL 15.18 (Debian ...)"
    match = re.match(r"PostgreSQL (\d+)\.(\d+)", version_line)
    if match is None:
        raise RuntimeError(f"cannot read the server's version from {version_line!r}")
    major, version = match.group(1), f"{match.group(1)}.{match.group(2)}"
    archive = root / f"postgresql-{version}.tar"
    if source is None:
        source = f"{DEBIAN_POOL}/postgresql-{major}/postgresql-{major}_{version}.orig.tar.bz2"
    print(f"PostgreSQL {version}: its tests from {source}", flush=True)
    try:
        if "://" in source:
            with urllib.request.urlopen(source, timeout=120) as answer, archive.open("wb") as out:
                shutil.copyfileobj(answer, out)
        else:
            shutil.copy(source, archive)
    except OSError as exc:
        raise RuntimeError(
            f"cannot fetch PostgreSQL {version}'s source from {source}: {exc}; "
            "give a tarball of it with --postgres-source"
        ) from exc
    with tarfile.open(archive) as tar:
        tar.extractall(root / "postgres-src", filter="data")
    (tree,) = (root / "postgres-src").iterdir()
    # The server, another OS user, reads the tests' data files and writes into their output
    # directories: it may pass through `root` (not list it; the keys there are 0600).
    root.chmod(0o711)
    includes = Path(pg_config(server_bindir, "--includedir-server"))
    if not (includes / "postgres.h").exists():
        apt_install(f"postgresql-server-dev-{major}", "the server's headers", dict(os.environ))
    pkglibdir = Path(pg_config(server_bindir, "--pkglibdir"))
    dlpath = root / "postgres-lib"
    dlpath.mkdir()
    subprocess.run(
        ["cc", "-O2", "-fPIC", "-shared", f"-I{includes}", "-o", str(dlpath / "regress.so"),
         str(tree / "src" / "test" / "regress" / "regress.c")],
        check=True, timeout=300,
    )  # fmt: skip
    for module in CONTRIB_MODULES:
        (dlpath / f"{module}.so").symlink_to(pkglibdir / f"{module}.so")
    return PostgresTree(tree, Path(pg_config(server_bindir, "--bindir")), pkglibdir, dlpath,
                        version)  # fmt: skip


def run_regress(tree: PostgresTree, suite: RegressSuite, env: dict[str, str], out: Path,
                log: Path) -> dict[str, str]:
    """test name -> 'PASSED' or 'FAILED: ...' from one run, its outputs under `out`."""
    results = out / "results"
    results.mkdir(parents=True)
    results.chmod(0o777)  # the server, another OS user, writes there too (COPY TO a file)
    argv = [
        str(tree.pkglibdir / "pgxs" / "src" / "test" / suite.driver),
        f"--inputdir={tree.source / suite.tests}", f"--outputdir={out}",
        f"--bindir={tree.bindir}", f"--dlpath={tree.dlpath}",
        f"--schedule={tree.source / suite.tests / suite.schedule}", f"--dbname={suite.dbname}",
    ]  # fmt: skip
    with log.open("w") as sink:
        subprocess.run(argv, cwd=out, env=without_database(env), stdout=sink,
                       stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT, check=False)
    return parse_log(log)


def without_database(env: dict[str, str]) -> dict[str, str]:
    """The tools name their database themselves."""
    return {k: v for k, v in env.items() if k != "PGDATABASE"}


def parse_log(log: Path) -> dict[str, str]:
    outcomes: dict[str, str] = {}
    for line in log.read_text(errors="replace").splitlines():
        old, tap = OLD_STYLE.match(line), TAP_STYLE.match(line)
        if old:
            name, verdict = old.groups()
            passed = verdict != "FAILED"
        elif tap:
            verdict, name = tap.groups()
            passed = verdict == "ok"
        else:
            continue
        outcomes[name] = "PASSED" if passed else "FAILED: output differs from expected"
    if not outcomes:
        raise RuntimeError(f"the suite reported nothing: see {log}")
    return outcomes


def differing_outputs(direct: Path, other: Path) -> list[str]:
    """Tests whose output through a path is not byte for byte the direct run's."""
    names = {p.name for p in (direct / "results").glob("*.out")}
    names |= {p.name for p in (other / "results").glob("*.out")}
    return sorted(
        name.removesuffix(".out") for name in names
        if not (direct / "results" / name).exists() or not (other / "results" / name).exists()
        or (direct / "results" / name).read_bytes() != (other / "results" / name).read_bytes()
    )  # fmt: skip


# pg_dump 15.14 and later put a random key in each plain dump (\restrict KEY, \unrestrict KEY)
RESTRICT_KEY = re.compile(rb"^\\(un)?restrict \S+$", re.MULTILINE)


def dump_checks(tree: PostgresTree, envs: dict[str, dict[str, str]], dbname: str, work: Path
                ) -> dict[str, str]:
    """pg_dump and pg_restore of what the regression tests left in `dbname`, through each
    path (the first of `envs` is direct): a plain dump, then a directory dump and its
    restore into a new database, both with two jobs (the jobs share the first's snapshot),
    and a direct plain dump of what was restored. Each output is compared with direct's,
    the dump's random \\restrict key aside. Path -> what differs from direct ('' if none)."""
    work.mkdir()
    direct_env = next(iter(envs.values()))
    plain: dict[str, bytes] = {}
    restored: dict[str, bytes] = {}
    for name, path_env in envs.items():
        slug = re.sub(r"\W", "_", name.lower())
        env = without_database(path_env)
        plain[name] = dump(tree, env, dbname, work / f"{slug}.sql")
        copy = f"restored_{slug}"
        subprocess.run(
            [str(tree.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "postgres",
             "-c", "set client_min_messages = warning",
             "-c", f"drop database if exists {copy} with (force)", "-c", f"create database {copy}"],
            env=env, check=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [str(tree.bindir / "pg_dump"), "-Fd", "-j", "2", "-d", dbname,
             "-f", str(work / f"{slug}.dir")],
            env=env, check=True, timeout=RUN_TIMEOUT,
        )  # fmt: skip
        subprocess.run(
            [str(tree.bindir / "pg_restore"), "-j", "2", "--exit-on-error", "-d", copy,
             str(work / f"{slug}.dir")],
            env=env, check=True, timeout=RUN_TIMEOUT,
        )  # fmt: skip
        restored[name] = dump(tree, direct_env, copy, work / f"{slug}-restored.sql")
    first = next(iter(envs))
    return {
        name: ", ".join(
            what for what, outputs in (("plain dump", plain), ("restored copy", restored))
            if outputs[name] != outputs[first]
        )
        for name in envs
        if name != first
    }  # fmt: skip


def dump(tree: PostgresTree, env: dict[str, str], dbname: str, out: Path) -> bytes:
    subprocess.run([str(tree.bindir / "pg_dump"), "-d", dbname, "-f", str(out)],
                   env=without_database(env), check=True, timeout=RUN_TIMEOUT)  # fmt: skip
    return RESTRICT_KEY.sub(b"", out.read_bytes())
