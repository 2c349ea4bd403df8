"""A cluster of the product's own processes, for end-to-end tests that stop and kill them.

`E2ECluster.create(root)` sets up what an operator would, with the real command lines:
- `teleport start --roles=auth --config auth.yaml` (its own data dir, a static join token);
- PostgreSQL 15 with TLS and client-certificate authentication only, its server files from
  `tctl auth sign --format=db` (seed 001's "Self-Hosted PostgreSQL");
- `teleport-agent run --role=proxy` and `teleport-agent run --role=db`, each with its own
  data dir, joined with the static token and `--ca-pin` (read from `tctl status`);
- people (`Person`): `tctl users add`, the signup line it prints run as is (the password on
  standard input), `tsh db login`, and psql / pgbench / psycopg through `service=...` from
  the `pg_service.conf` of their own home.

Every service is a `ServiceProcess`: a restartable child process whose output goes to a
log file under the cluster's root, stopped (SIGTERM) or killed (SIGKILL) by its own pid.
`E2ECluster.heal()` brings back whatever a test stopped.

Test scaffolding only. It never reaches into a running service's memory: what it knows of
the cluster comes from the command lines, their output, and files an operator could read
(logs, the audit log, the hosted repository).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from launcher.embedded_postgres import EmbeddedPostgres, ServerTLS

BIN = Path(sys.executable).parent
CLUSTER = "e2e"
SERVICE = "pg"  # the database service name (`tsh db ls`)
PASSWORD = "e2e: correct horse battery staple"
START_TIMEOUT = 60.0


class ClusterError(AssertionError):
    """A step of the setup or of a test's operation did not do what it should."""


def free_ports(count: int) -> list[int]:
    """`count` distinct loopback ports free right now (held together while choosing)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_for(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """Call `check` until it returns something true; that value. Fails naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def base_env() -> dict[str, str]:
    """Our environment without PG* variables, with the product's commands first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run(
    argv: Sequence[str],
    env: dict[str, str],
    *,
    stdin: str | None = None,
    timeout: float = 120.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command line to its end; with `check`, a non-zero exit fails with its output."""
    done = subprocess.run(
        list(argv),
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise ClusterError(
            f"$ {' '.join(argv)}\nexit {done.returncode}\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-3000:]}"
        )
    return done


class ServiceProcess:
    """One long-running service command, restartable, its output appended to `log_path`."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str],
        log_path: Path,
        ready: Callable[[], bool],
    ) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_path
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0
        self.start_mark = 0  # log offset where the latest start's output begins

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the command and wait until `ready()`; fails with the log's end if it exits."""
        if self.running():
            raise ClusterError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        mark = self.start_mark = self.log_size()
        self._log = self.log_path.open("ab")
        self._log.write(f"\n==== e2e: starting {self.name} ====\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest does not reach it; we stop it
        )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self.ready():
            if self.proc.poll() is not None:
                raise ClusterError(
                    f"{self.name} exited with code {self.proc.returncode} while starting:\n"
                    f"{self.log_text(mark)[-4000:]}"
                )
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"{self.name} was not ready after {timeout:.0f}s:\n"
                    f"{self.log_text(mark)[-4000:]}"
                )
            time.sleep(0.05)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, as an operator's `systemctl stop`; SIGKILL after `timeout`. Exit code."""
        return self._end(signal.SIGTERM, timeout)

    def kill(self) -> int | None:
        """SIGKILL: the process gets no chance to clean up."""
        return self._end(signal.SIGKILL, 10.0)

    def _end(self, sig: signal.Signals, timeout: float) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._close_log()
        return proc.returncode

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except FileNotFoundError:
            return 0

    def log_text(self, since: int = 0) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(
        self, pattern: str, since: int, timeout: float = 20.0, interval: float = 0.005
    ) -> tuple[re.Match[str], float]:
        """Wait for a log line matching `pattern` written after offset `since`: the match
        and the monotonic time it was first seen (polled every `interval` seconds)."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.log_text(since))
            if found is not None:
                return found, time.monotonic()
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"no line matching {pattern!r} in {self.log_path} after {timeout:.0f}s:\n"
                    f"{self.log_text(since)[-3000:]}"
                )
            time.sleep(interval)


@dataclass
class Person:
    """Someone using the cluster from their own home: tsh profile, pg_service.conf."""

    name: str
    home: Path
    cluster: E2ECluster
    db_users: list[str]
    db_names: list[str]

    @property
    def env(self) -> dict[str, str]:
        env = base_env()
        env.update(
            HOME=str(self.home),
            TELEPORT_HOME=str(self.home / ".tsh"),
            PGSERVICEFILE=str(self.home / ".pg_service.conf"),
        )
        return env

    @property
    def service(self) -> str:
        """The pg_service.conf section `tsh db login` writes."""
        return f"{CLUSTER}-{SERVICE}"

    def dsn(self, dbname: str | None = None, db_user: str | None = None, **extra: str) -> str:
        """`service=e2e-pg user=... dbname=...` as `tsh db login` tells people to connect."""
        parts = [
            f"service={self.service}",
            f"user={db_user or self.db_users[0]}",
            f"dbname={dbname or self.db_names[0]}",
        ]
        parts.extend(f"{key}={value}" for key, value in extra.items())
        return " ".join(parts)

    def tsh(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return run([str(BIN / "tsh"), *args], self.env, stdin=stdin, check=check, timeout=timeout)

    def login(self) -> subprocess.CompletedProcess[str]:
        return self.tsh(
            "login", f"--proxy=localhost:{self.cluster.web_port}", f"--user={self.name}",
            f"--ca-pin={self.cluster.ca_pin}", stdin=PASSWORD + "\n",
        )  # fmt: skip

    def psql(
        self,
        *args: str,
        dbname: str | None = None,
        dsn: str | None = None,
        stdin: str | None = None,
        timeout: float = 60,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """psql -X -At with `args` (`-c SQL`, ...) through the proxy as `tsh db login` set
        up (or with `dsn`)."""
        argv = ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", *args, dsn or self.dsn(dbname)]
        return run(argv, self.env, stdin=stdin, timeout=timeout, check=check)

    def query(self, sql: str, dbname: str | None = None) -> str:
        """One query through the proxy; its output. Fails with psql's error."""
        done = self.psql("-c", sql, dbname=dbname)
        if done.returncode != 0:
            raise ClusterError(f"psql -c {sql!r} as {self.name} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def open_psql(self, dbname: str | None = None) -> PsqlPipe:
        """A psql session kept open, fed through a pipe (see `PsqlPipe`)."""
        return PsqlPipe(self, dbname)

    def db_config(self) -> dict[str, str]:
        """`tsh db config --format=json`: host, port and the certificate files."""
        return json.loads(self.tsh("db", "config", "--format=json", SERVICE).stdout)

    @contextlib.contextmanager
    def libpq_env(self) -> Iterator[None]:
        """PGSERVICEFILE in this process's environment, for psycopg, while in the block."""
        before = os.environ.get("PGSERVICEFILE")
        os.environ["PGSERVICEFILE"] = self.env["PGSERVICEFILE"]
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("PGSERVICEFILE", None)
            else:
                os.environ["PGSERVICEFILE"] = before


class PsqlPipe:
    """A long-lived psql session as a person keeps one open: psql reads SQL from a pipe
    (its standard input) and answers on its standard output, read by threads so that a
    test can wait for an answer, or for psql's end, with a timeout."""

    def __init__(self, person: Person, dbname: str | None = None, dsn: str | None = None) -> None:
        self.proc = subprocess.Popen(
            ["psql", "-X", "-At", dsn or person.dsn(dbname)],
            env=person.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self.ended_at: float | None = None
        threading.Thread(target=self._read_out, daemon=True).start()
        self._err = threading.Thread(target=self._read_err, daemon=True)
        self._err.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
        self.proc.wait()
        self.ended_at = time.monotonic()

    def send(self, sql: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(sql.rstrip().rstrip(";") + ";\n")
        self.proc.stdin.flush()

    def ask(self, sql: str, timeout: float = 15.0) -> str:
        """Run one query that answers one line; that line. Fails with psql's errors."""
        self.send(sql)
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise ClusterError(f"psql did not answer {sql!r} in {timeout:.0f}s") from None
        if line is None:
            self.wait_end(5)
            raise ClusterError(
                f"psql ended (exit {self.proc.returncode}) instead of "
                f"answering {sql!r}:\n{''.join(self.stderr)}"
            )
        return line

    def wait_end(self, timeout: float) -> int:
        """Wait for psql to exit; its exit code (the stderr reader has read everything)."""
        self._err.join(timeout)
        if self._err.is_alive():
            raise ClusterError(f"psql still runs after {timeout:.0f}s:\n{''.join(self.stderr)}")
        assert self.proc.returncode is not None
        return self.proc.returncode

    @property
    def errors(self) -> str:
        return "".join(self.stderr)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> PsqlPipe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class E2ECluster:
    root: Path
    auth_port: int
    web_port: int
    tunnel_port: int
    token: str
    pg: EmbeddedPostgres | None = None
    auth: ServiceProcess | None = None
    proxy: ServiceProcess | None = None
    agent: ServiceProcess | None = None
    ca_pin: str = ""
    people: dict[str, Person] = field(default_factory=dict)
    extra: list[ServiceProcess] = field(default_factory=list)

    # -- paths and commands ---------------------------------------------------------------

    @property
    def auth_dir(self) -> Path:
        return self.root / "auth"

    @property
    def audit_dir(self) -> Path:
        return self.auth_dir / "audit"

    @property
    def repo(self) -> Path:
        return self.auth_dir / "policies.git"

    @property
    def admin_env(self) -> dict[str, str]:
        env = base_env()
        env["TELEPORT_DATA_DIR"] = str(self.auth_dir)
        env["HOME"] = str(self.root / "admin")
        return env

    def tctl(
        self, *args: str, check: bool = True, stdin: str | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [str(BIN / "tctl"), *args], self.admin_env, stdin=stdin, check=check, timeout=timeout
        )

    def git(self, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        env = self.admin_env
        env.update(
            GIT_AUTHOR_NAME="e2e admin", GIT_AUTHOR_EMAIL="admin@e2e.test",
            GIT_COMMITTER_NAME="e2e admin", GIT_COMMITTER_EMAIL="admin@e2e.test",
        )  # fmt: skip
        done = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise ClusterError(f"git {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    # -- setting up -----------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path) -> E2ECluster:
        root.mkdir(parents=True, exist_ok=True)
        (root / "admin").mkdir(exist_ok=True)
        auth, web, tunnel = free_ports(3)
        cluster = cls(root, auth, web, tunnel, token="e2e-" + secrets.token_hex(16))
        try:
            cluster._setup()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def _write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def _setup(self) -> None:
        auth_yaml = self._write(
            "auth.yaml",
            f"""teleport:
  nodename: localhost
  data_dir: {self.auth_dir}
auth_service:
  enabled: yes
  cluster_name: {CLUSTER}
  listen_addr: 127.0.0.1:{self.auth_port}
  tokens: ["proxy,db:{self.token}"]
proxy_service:
  enabled: no
  public_addr: localhost:{self.web_port}
""",
        )
        self.auth = ServiceProcess(
            "auth",
            [str(BIN / "teleport"), "start", "--roles=auth", "--config", str(auth_yaml)],
            base_env(),
            self.root / "auth.log",
            ready=lambda: port_open(self.auth_port),
        )
        self.auth.start()
        status = self.tctl("status").stdout
        pin = re.search(r"CA pin:\s+(sha256:[0-9a-f]{64})", status)
        if pin is None:
            raise ClusterError(f"tctl status shows no CA pin:\n{status}")
        self.ca_pin = pin.group(1)

        # PostgreSQL as seed 001 sets it up: files from tctl auth sign, cert auth only.
        certs = self.root / "pg-tls"
        certs.mkdir()
        self.tctl("auth", "sign", "--format=db", "--host=localhost",
                  f"--out={certs / 'server'}", "--ttl=24h")  # fmt: skip
        (pg_port,) = free_ports(1)
        self.pg = EmbeddedPostgres.temporary(
            prefix="e2e-pg-",
            port=pg_port,
            tls=ServerTLS(certs / "server.crt", certs / "server.key", certs / "server.cas"),
            fsync=False,
            max_connections=100,
        )
        self.pg.start()
        for role in ("alice", "bob"):
            self.pg.create_role(role)
        self.pg.create_database("bench", owner="alice")

        self.proxy = self.data_service(
            "proxy", self.web_port, self.tunnel_port, ready_port=self.web_port
        )
        self.proxy.start()
        self.agent = ServiceProcess(
            "agent",
            [
                str(BIN / "teleport-agent"),
                "run",
                "--role=db",
                "--data-dir",
                str(self.root / "agent"),
                *self.join_flags(),
                f"--db-name={SERVICE}",
                "--db-protocol=postgres",
                f"--db-uri=localhost:{self.pg.port}",
                "--labels=env=e2e",
            ],
            base_env(),
            self.root / "agent.log",
            ready=self._agent_ready,
        )
        self.agent.start()

    def join_flags(self) -> list[str]:
        return [
            f"--auth-server=127.0.0.1:{self.auth_port}",
            f"--token={self.token}",
            f"--ca-pin={self.ca_pin}",
        ]

    def data_service(
        self,
        name: str,
        web: int,
        tunnel: int,
        *,
        ready_port: int,
        extra_yaml: str = "",
    ) -> ServiceProcess:
        """A `teleport-agent run --role=proxy` with its own config and data dir."""
        config = self._write(
            f"{name}.yaml",
            f"""teleport:
  nodename: localhost
proxy_service:
  enabled: yes
  web_listen_addr: 127.0.0.1:{web}
  tunnel_listen_addr: 127.0.0.1:{tunnel}
  public_addr: localhost:{web}
  tunnel_public_addr: 127.0.0.1:{tunnel}
{extra_yaml}""",
        )
        return ServiceProcess(
            name,
            [
                str(BIN / "teleport-agent"),
                "run",
                "--role=proxy",
                "--config",
                str(config),
                "--data-dir",
                str(self.root / name),
                *self.join_flags(),
            ],
            base_env(),
            self.root / f"{name}.log",
            ready=lambda: port_open(ready_port),
        )

    def _agent_ready(self) -> bool:
        """Since its latest start, the agent has a bundle in force and a tunnel to the proxy
        (its log says both)."""
        assert self.agent is not None
        text = self.agent.log_text(self.agent.start_mark)
        return "is in force" in text and re.search(r"tunnel to proxy \S+ is up", text) is not None

    def add_person(self, name: str, db_users: Sequence[str], db_names: Sequence[str]) -> Person:
        """`tctl users add`, the signup line it prints (password on stdin), `tsh db login`."""
        home = self.root / "home" / name
        home.mkdir(parents=True)
        person = Person(name, home, self, list(db_users), list(db_names))
        out = self.tctl(
            "users", "add", name, f"--db-users={','.join(db_users)}",
            f"--db-names={','.join(db_names)}",
        ).stdout  # fmt: skip
        signup = re.search(rf"(tsh login --proxy=\S+ --user={name} .*--signup-token=\S+)", out)
        if signup is None:
            raise ClusterError(f"tctl users add printed no signup line:\n{out}")
        argv = signup.group(1).split()
        wait_for(
            f"{name}'s signup through the proxy",
            lambda: (
                run(
                    [str(BIN / argv[0]), *argv[1:]], person.env, stdin=PASSWORD + "\n", check=False
                ).returncode
                == 0
            ),
            timeout=30,
            interval=0.3,
        )
        wait_for(
            f"database {SERVICE} in {name}'s tsh db ls",
            lambda: re.search(rf"^{SERVICE}\s", person.tsh("db", "ls").stdout, re.MULTILINE),
            timeout=30,
            interval=0.3,
        )
        person.tsh("db", "login", SERVICE)
        self.people[name] = person
        return person

    # -- operating ------------------------------------------------------------------------

    def services(self) -> list[ServiceProcess]:
        return [s for s in (self.auth, self.proxy, self.agent, *self.extra) if s is not None]

    def heal(self) -> None:
        """Start again whatever a test stopped: PostgreSQL, control plane, proxy, agent."""
        assert self.pg is not None
        if not self.pg.is_running():
            self.pg.start()
        for service in (self.auth, self.proxy, self.agent):
            if service is not None and not service.running():
                service.start()

    def wait_serving(self, person: Person, timeout: float = 30.0) -> float:
        """Wait until `person` gets a query through; seconds it took."""
        started = time.monotonic()
        wait_for(
            f"a query of {person.name} through the proxy",
            lambda: person.psql("-c", "select 1", timeout=15).returncode == 0,
            timeout=timeout,
            interval=0.1,
        )
        return time.monotonic() - started

    def wait_agent_has_policy_in_force(self, timeout: float = 30.0) -> int:
        """Wait until every proxy and agent of the cluster reports the bundle the control
        plane has in force (`tctl status`; a `tctl users add` reaches them a moment after
        the commit); its serial."""

        def everywhere() -> int | None:
            status = self.tctl("status").stdout
            serial = re.search(r"In force:\s+serial (\d+)", status)
            hosts = re.search(r"Agents:\s+(\d+) \((\d+) on serial (\d+)\)$", status, re.M)
            running = [s for s in self.services() if s is not self.auth and s.running()]
            if serial and hosts and hosts.group(1) == hosts.group(2) == str(
                len(running)
            ) and hosts.group(3) == serial.group(1):
                return int(serial.group(1))
            return None

        return wait_for("every proxy and agent on the bundle in force", everywhere, timeout, 0.5)

    def audit_events(self, *filters: str) -> list[dict[str, Any]]:
        """`tctl audit search --format json --limit 0` with `filters` (e.g. --type=...)."""
        out = self.tctl(
            "audit", "search", "--format=json", "--limit=0", *filters, timeout=300
        ).stdout
        return json.loads(out)

    def close(self) -> None:
        """Stop every process and remove PostgreSQL's data area."""
        for service in reversed(self.services()):
            with contextlib.suppress(Exception):
                service.stop()
        if self.pg is not None:
            with contextlib.suppress(Exception):
                self.pg.destroy()
