"""The embedded PostgreSQL of the quick start and of the tests: one local cluster in a data area.

`EmbeddedPostgres` creates a cluster once (initdb), configures it for TLS with client
certificate authentication on loopback, starts it, waits until it accepts connections, stops
it, and runs administrative SQL as the superuser over the unix socket inside its data area.

Layout of a data area (everything in it belongs to the OS user the server runs as):

    <area>/pgdata/            the cluster; teleport_db.conf and pg_hba.conf are rewritten at
                              every start from this object's settings
    <area>/tls/               copies of the server certificate, key (0600) and client CA
    <area>/run/               the unix socket; 0700, so only the server's OS user and root
                              can reach it (that is what makes `local ... trust` safe)
    <area>/log/postgresql.log the server log, appended to

PostgreSQL refuses to run as root. When this process is root, initdb and postgres run as the
`postgres` OS user (or `nobody` when there is none) and the data area is handed to that user;
otherwise they run as the current user. Every directory above the data area must be
searchable by that user: `temporary()` makes a dedicated 0711 directory for that purpose.

This module must never: let anyone authenticate over the network without a certificate or a
password (no `trust` for host lines), run the server as root, leave a server process behind
after `stop()`, or write a private key or a password to a log or an error message.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

DEFAULT_LIB_ROOT = Path("/usr/lib/postgresql")
SERVER_PROGRAMS = ("initdb", "postgres")
LOOPBACK_NETWORKS = ("127.0.0.1/32", "::1/128")
# sun_path holds 108 bytes on Linux, the terminating NUL included.
UNIX_SOCKET_PATH_MAX = 107
CONFIG_FILE = "teleport_db.conf"
INSTALL_HINT = (
    "install the PostgreSQL server with `apt-get install postgresql` (Debian/Ubuntu), "
    "or put the directory holding initdb and postgres on PATH"
)

AuthMethod = Literal["cert", "scram-sha-256", "md5", "password", "reject"]
SettingValue = str | int | float | bool


class EmbeddedPostgresError(Exception):
    """Something about the embedded PostgreSQL went wrong; the message says what to do."""


class PostgresNotFound(EmbeddedPostgresError):
    """The PostgreSQL programs are not installed where we look for them."""


class DataAreaUnreachable(EmbeddedPostgresError):
    """The OS user the server runs as cannot reach the data area."""


class PostgresStartError(EmbeddedPostgresError):
    """The server did not come up; the message carries the end of its log."""


class AdminSQLError(EmbeddedPostgresError):
    """SQL run as the superuser over the unix socket failed."""


# --------------------------------------------------------------------------- programs


@dataclass(frozen=True)
class PostgresBinaries:
    """Where the programs are: initdb and postgres from one installation, and psql."""

    initdb: Path
    postgres: Path
    psql: Path


def _version_key(name: str) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(\.\d+)*", name):
        return None
    return tuple(int(part) for part in name.split("."))


def _versioned_bin_dirs(lib_root: Path) -> list[Path]:
    """`<lib_root>/<version>/bin` directories, highest version first."""
    try:
        entries = list(lib_root.iterdir())
    except OSError:
        return []
    keyed = [(key, entry) for entry in entries if (key := _version_key(entry.name)) is not None]
    return [entry / "bin" for _key, entry in sorted(keyed, reverse=True)]


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_binaries(
    search_path: str | None = None, lib_root: Path = DEFAULT_LIB_ROOT
) -> PostgresBinaries:
    """Find initdb, postgres and psql: on PATH first, then in the highest `lib_root/<v>/bin`.

    `search_path` defaults to `$PATH`. initdb and postgres come from one directory (initdb
    insists on running the postgres that sits beside it); psql may come from elsewhere.
    """
    path = os.environ.get("PATH", os.defpath) if search_path is None else search_path
    server_dir: Path | None = None
    on_path = {name: shutil.which(name, path=path) for name in (*SERVER_PROGRAMS, "psql")}
    if on_path["initdb"] and on_path["postgres"]:
        server_dir = Path(on_path["initdb"]).parent
        if not _executable(server_dir / "postgres"):
            # initdb and postgres on PATH but in different directories: follow initdb.
            server_dir = Path(on_path["initdb"]).resolve().parent
    if server_dir is None or not _executable(server_dir / "postgres"):
        server_dir = next(
            (d for d in _versioned_bin_dirs(lib_root)
             if all(_executable(d / name) for name in SERVER_PROGRAMS)),
            None,
        )
    if server_dir is None:
        missing = [name for name in SERVER_PROGRAMS if not on_path[name]] or list(SERVER_PROGRAMS)
        raise PostgresNotFound(
            f"PostgreSQL server programs not found: {', '.join(missing)} "
            f"(looked on PATH and in {lib_root}/<version>/bin); {INSTALL_HINT}"
        )
    psql = Path(on_path["psql"]) if on_path["psql"] else server_dir / "psql"
    if not _executable(psql):
        raise PostgresNotFound(
            f"psql not found (looked on PATH and in {server_dir}); install it with "
            "`apt-get install postgresql-client`, or put its directory on PATH"
        )
    return PostgresBinaries(
        initdb=server_dir / "initdb", postgres=server_dir / "postgres", psql=psql
    )


# --------------------------------------------------------------------------- OS user


@dataclass(frozen=True)
class ServerUser:
    """The OS account initdb and postgres run as."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def for_this_process(cls) -> ServerUser:
        """Ourselves, unless we are root: then `postgres`, or `nobody` when there is none."""
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, tuple(os.getgroups()))
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
            return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, groups)
        raise EmbeddedPostgresError(
            "running as root, and PostgreSQL refuses to run as root, but there is neither a "
            "`postgres` nor a `nobody` OS user to run it as; create one (`useradd --system "
            "postgres`) or run as an ordinary user"
        )

    @property
    def switches(self) -> bool:
        """True when subprocesses must change to this user (we are root, it is not)."""
        return os.geteuid() == 0 and self.uid != 0

    def subprocess_options(self) -> dict[str, object]:
        if not self.switches:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": list(self.groups)}

    def can_search(self, directory: Path) -> bool:
        """Whether this user may pass through `directory` (the x bit that applies to it)."""
        st = directory.stat()
        if self.uid == 0:
            return True
        if st.st_uid == self.uid:
            return bool(st.st_mode & stat.S_IXUSR)
        if st.st_gid == self.gid or st.st_gid in self.groups:
            return bool(st.st_mode & stat.S_IXGRP)
        return bool(st.st_mode & stat.S_IXOTH)

    def give(self, path: Path) -> None:
        """Make `path` belong to this user (a no-op unless we are root)."""
        if self.switches:
            os.chown(path, self.uid, self.gid)


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ServerTLS:
    """The server's certificate and key, and the CA that client certificates must chain to."""

    cert_file: Path
    key_file: Path
    ca_file: Path


_HBA_NAME = re.compile(r"[A-Za-z0-9_.\-@+]+")


def _hba_names(names: Sequence[str], what: str) -> str:
    if not names:
        raise ValueError(f"a pg_hba rule needs at least one {what} (or 'all')")
    out = []
    for name in names:
        if name == "all":
            out.append("all")
        elif _HBA_NAME.fullmatch(name):
            out.append(f'"{name}"')
        else:
            raise ValueError(
                f"{what} name {name!r} cannot go in pg_hba.conf: use letters, digits and _.-@+"
            )
    return ",".join(out)


@dataclass(frozen=True)
class HostRule:
    """One pg_hba host rule, written for both loopback networks (127.0.0.1/32 and ::1/128).

    `tls_only=True` makes it a `hostssl` line; `False` a `host` line, which also matches
    plain-text connections and is only meant for tests of password methods over TCP.
    """

    method: AuthMethod
    users: tuple[str, ...] = ("all",)
    databases: tuple[str, ...] = ("all",)
    tls_only: bool = True

    def __post_init__(self) -> None:
        if self.method == "cert" and not self.tls_only:
            raise ValueError("the cert method needs TLS: use tls_only=True")
        if self.method not in ("cert", "scram-sha-256", "md5", "password", "reject"):
            raise ValueError(f"unknown pg_hba method {self.method!r}")
        _hba_names(self.users, "user")
        _hba_names(self.databases, "database")

    def lines(self) -> list[str]:
        kind = "hostssl" if self.tls_only else "host"
        dbs = _hba_names(self.databases, "database")
        users = _hba_names(self.users, "user")
        return [f"{kind:<8}{dbs:<16}{users:<16}{net:<24}{self.method}" for net in LOOPBACK_NETWORKS]


CERT_ONLY: tuple[HostRule, ...] = (HostRule("cert"),)


def _setting(value: SettingValue) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int | float):
        return str(value)
    if "\n" in value or "\0" in value:
        raise ValueError(f"a PostgreSQL setting cannot hold a newline or NUL: {value!r}")
    return "'" + value.replace("'", "''") + "'"


def quote_ident(name: str) -> str:
    """An SQL identifier, double-quoted."""
    if "\0" in name or not name:
        raise ValueError(f"not a valid SQL identifier: {name!r}")
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    """An SQL string literal (standard_conforming_strings is on, the default)."""
    if "\0" in text:
        raise ValueError("an SQL string cannot contain NUL")
    return "'" + text.replace("'", "''") + "'"


def free_tcp_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (someone may take it before we bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _clean_env() -> dict[str, str]:
    """Our environment without libpq's PG* variables, which would redirect our programs."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PG")}


def _write_file(path: Path, data: bytes, mode: int, owner: ServerUser) -> None:
    """Write `data` to `path` atomically, with `mode` and `owner` from the first byte."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        if owner.switches:
            os.fchown(fd, owner.uid, owner.gid)
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _pid_alive(pid: int) -> bool:
    """Whether `pid` is a running process; a zombie (exited, not yet reaped) is not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no /proc here: signal 0 is all we can go by
    state = next((line for line in status.splitlines() if line.startswith("State:")), "")
    return "Z" not in state.split()[1:2]


# --------------------------------------------------------------------------- the server


class EmbeddedPostgres:
    """One PostgreSQL cluster under `data_dir`, created on first use and run on demand.

    `tls=None` runs without TLS; then only `host` rules (`tls_only=False`) can match.
    `fsync=False` turns off fsync, synchronous_commit and full_page_writes: for tests and
    throwaway demos only, a crash may lose or corrupt the data.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int,
        tls: ServerTLS | None,
        listen_addresses: str = "127.0.0.1",
        host_rules: Sequence[HostRule] = CERT_ONLY,
        max_connections: int = 200,
        shared_buffers: str = "32MB",
        fsync: bool = True,
        superuser: str = "postgres",
        settings: Mapping[str, SettingValue] | None = None,
        start_timeout: float = 30.0,
        binaries: PostgresBinaries | None = None,
        user: ServerUser | None = None,
    ) -> None:
        self.data_dir = Path(os.path.abspath(data_dir))
        self.port = port
        self.tls = tls
        self.listen_addresses = listen_addresses
        self.host_rules = tuple(host_rules)
        self.max_connections = max_connections
        self.shared_buffers = shared_buffers
        self.fsync = fsync
        self.superuser = superuser
        self.settings = dict(settings or {})
        self.start_timeout = start_timeout
        self.binaries = binaries if binaries is not None else find_binaries()
        self.user = user if user is not None else ServerUser.for_this_process()
        self.last_start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._temp_base: Path | None = None
        needs_tls = [rule for rule in self.host_rules if rule.tls_only and rule.method != "reject"]
        if tls is None and needs_tls:
            raise ValueError(
                "hostssl rules need TLS: pass tls=ServerTLS(...) or use tls_only=False rules"
            )

    @classmethod
    def temporary(
        cls, *, prefix: str = "teleport-db-pg-", parent: Path | None = None, **options: object
    ) -> Self:
        """A server in a new directory of its own under the temp dir, removed by `destroy()`.

        The directory is 0711 so that the server's OS user can pass through it even when the
        caller's own temporary directories (pytest's, for one) are private to root.
        """
        base = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
        try:
            # Others may pass through (to the 0700 data area inside), not list or write.
            os.chmod(base, 0o711)  # noqa: S103
            server = cls(base / "pg", **options)  # type: ignore[arg-type]
        except BaseException:
            shutil.rmtree(base, ignore_errors=True)
            raise
        server._temp_base = base
        return server

    # ---------------------------------------------------------------- paths

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def socket_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "log" / "postgresql.log"

    @property
    def host(self) -> str:
        """The first address the server listens on, for building connection strings."""
        return self.listen_addresses.split(",")[0].strip()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres({str(self.data_dir)!r}, port={self.port})"

    # ---------------------------------------------------------------- creation

    def _check_reachable(self) -> None:
        """Every existing directory above the data area must be searchable by the server user."""
        for directory in reversed(self.data_dir.parents):
            if not directory.exists():
                break
            if not self.user.can_search(directory):
                st = directory.stat()
                raise DataAreaUnreachable(
                    f"the PostgreSQL data area {self.data_dir} is out of reach of the OS user "
                    f"{self.user.name!r} that runs the server: {directory} has mode "
                    f"{stat.filemode(st.st_mode)} (owner uid {st.st_uid}); put the data area "
                    "under a directory that user can enter (for example a 0711 directory in "
                    "the temp directory, which EmbeddedPostgres.temporary() makes), or "
                    "`chmod o+x` the directories above it"
                )

    def _prepare_area(self) -> None:
        self._check_reachable()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.user.give(self.data_dir)
        for sub in (self.tls_dir, self.socket_dir, self.log_file.parent):
            sub.mkdir(mode=0o700, exist_ok=True)
            os.chmod(sub, 0o700)
            self.user.give(sub)

    @property
    def initialized(self) -> bool:
        return (self.pgdata / "PG_VERSION").is_file()

    def init(self) -> bool:
        """Create the cluster if there is none yet; True when it was created now."""
        self._prepare_area()
        if self.initialized:
            return False
        staging = self.data_dir / "pgdata.initdb"
        shutil.rmtree(staging, ignore_errors=True)
        cmd = [
            str(self.binaries.initdb),
            "--pgdata", str(staging),
            "--username", self.superuser,
            "--encoding", "UTF8",
            "--no-locale",
            "--auth-local", "trust",
            "--auth-host", "reject",
            "--no-sync",
            "--no-instructions",
        ]
        done = subprocess.run(
            cmd,
            cwd=self.data_dir,
            env=_clean_env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            **self.user.subprocess_options(),  # type: ignore[arg-type]
        )
        if done.returncode != 0:
            shutil.rmtree(staging, ignore_errors=True)
            output = (done.stdout + done.stderr).strip().splitlines()[-15:]
            raise EmbeddedPostgresError(
                f"initdb failed for {self.pgdata} (exit {done.returncode}):\n"
                + "\n".join(output)
            )
        conf = staging / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as out:
            out.write(
                "\n# Everything below comes from teleport-db's EmbeddedPostgres; "
                f"{CONFIG_FILE} is rewritten at every start.\n"
                f"include '{CONFIG_FILE}'\n"
            )
        staging.rename(self.pgdata)
        return True

    # ---------------------------------------------------------------- configuration

    def _install_tls(self) -> dict[str, str]:
        if self.tls is None:
            return {"ssl": "off"}
        copies = {
            "ssl_cert_file": (self.tls.cert_file, self.tls_dir / "server.crt", 0o644),
            "ssl_key_file": (self.tls.key_file, self.tls_dir / "server.key", 0o600),
            "ssl_ca_file": (self.tls.ca_file, self.tls_dir / "ca.crt", 0o644),
        }
        out = {"ssl": "on", "ssl_min_protocol_version": "TLSv1.2"}
        for setting, (source, target, mode) in copies.items():
            try:
                data = Path(source).read_bytes()
            except OSError as exc:
                raise EmbeddedPostgresError(
                    f"cannot read the {setting} for PostgreSQL from {source}: {exc.strerror}; "
                    "check the path given in ServerTLS"
                ) from None
            _write_file(target, data, mode, self.user)
            out[setting] = str(target)
        return out

    def _settings(self, tls_settings: Mapping[str, str]) -> dict[str, SettingValue]:
        values: dict[str, SettingValue] = {
            "listen_addresses": self.listen_addresses,
            "port": self.port,
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": self.max_connections,
            "shared_buffers": self.shared_buffers,
            "password_encryption": "scram-sha-256",
            "logging_collector": False,
            "log_destination": "stderr",
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "lc_messages": "C",
        }
        for key, raw in tls_settings.items():
            values[key] = raw == "on" if key == "ssl" else raw
        if not self.fsync:
            values.update(fsync=False, synchronous_commit=False, full_page_writes=False)
        values.update(self.settings)
        return values

    def _write_config(self) -> None:
        values = self._settings(self._install_tls())
        lines = [
            "# Written by teleport-db's EmbeddedPostgres at every start; edits are overwritten.",
            *(f"{key} = {_setting(value)}" for key, value in values.items()),
            # An octal mode, written bare: the socket is for the server's OS user (and root).
            "unix_socket_permissions = 0700",
        ]
        _write_file(self.pgdata / CONFIG_FILE, ("\n".join(lines) + "\n").encode(), 0o600, self.user)
        hba = [
            "# Written by teleport-db's EmbeddedPostgres at every start; edits are overwritten.",
            f"# The unix socket lives in {self.socket_dir} (0700): only the server's OS user",
            "# and root can reach it, which is what makes trust safe there. Nothing on the",
            "# network is trusted; a connection no line matches is refused.",
            "local   all             all                                     trust",
        ]
        for rule in self.host_rules:
            hba.extend(rule.lines())
        _write_file(self.pgdata / "pg_hba.conf", ("\n".join(hba) + "\n").encode(), 0o600, self.user)

    # ---------------------------------------------------------------- running

    def _pid_file_lines(self) -> list[str]:
        try:
            return (self.pgdata / "postmaster.pid").read_text().splitlines()
        except (OSError, UnicodeDecodeError):
            return []

    def _postmaster_of_this_area(self, pid: int) -> bool:
        """Whether `pid` is a live process working in our cluster (guards against pid reuse)."""
        if not _pid_alive(pid):
            return False
        try:
            return Path(os.readlink(f"/proc/{pid}/cwd")) == self.pgdata.resolve()
        except OSError:
            return not Path("/proc/self").exists()  # no /proc here: trust the pid file

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs (started by us or by another process)."""
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        lines = self._pid_file_lines()
        if lines and lines[0].strip().isdigit():
            pid = int(lines[0])
            if self._postmaster_of_this_area(pid):
                return pid
        return None

    def is_running(self) -> bool:
        return self.pid is not None

    def log_tail(self, lines: int = 30, since: int = 0) -> str:
        """The last `lines` lines of the server log written after byte offset `since`."""
        try:
            with self.log_file.open("rb") as log:
                log.seek(since)
                data = log.read()
        except OSError:
            return "(no server log yet)"
        text = data.decode("utf-8", "replace").rstrip("\n")
        return "\n".join(text.splitlines()[-lines:]) if text else "(the server log is empty)"

    def _check_socket_path(self) -> None:
        sock = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(sock).encode()) > UNIX_SOCKET_PATH_MAX:
            raise EmbeddedPostgresError(
                f"the unix socket path {sock} is longer than the {UNIX_SOCKET_PATH_MAX} bytes "
                "the system allows; choose a shorter data directory"
            )

    def start(self) -> None:
        """Create the cluster if needed, write its configuration, start it, wait until ready."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._reap()
        self._check_socket_path()
        began = time.monotonic()
        self.init()
        running = self.pid
        if running is not None:
            raise PostgresStartError(
                f"a PostgreSQL server (pid {running}) already runs on {self.pgdata}; stop it "
                f"first (EmbeddedPostgres.stop(), or `kill -INT {running}`)"
            )
        self._write_config()
        if not self.log_file.exists():
            _write_file(self.log_file, b"", 0o600, self.user)
        log_start = self.log_file.stat().st_size
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(self.binaries.postgres), "-D", str(self.pgdata)],
                cwd=self.pgdata,
                env=_clean_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self.user.subprocess_options(),  # type: ignore[arg-type]
            )
        deadline = began + self.start_timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise PostgresStartError(
                    f"PostgreSQL on port {self.port} ({self.data_dir}) exited with code {code} "
                    f"while starting; the end of {self.log_file}:\n{self.log_tail(since=log_start)}"
                )
            lines = self._pid_file_lines()
            if (
                len(lines) >= 8
                and lines[0].strip() == str(self._proc.pid)
                and lines[7].strip() == "ready"
            ):
                break
            if time.monotonic() > deadline:
                self._halt(self._proc.pid, grace=5.0)
                raise PostgresStartError(
                    f"PostgreSQL on port {self.port} ({self.data_dir}) was not ready after "
                    f"{self.start_timeout:.0f}s; the end of {self.log_file}:\n"
                    f"{self.log_tail(since=log_start)}"
                )
            time.sleep(0.02)
        self.last_start_seconds = time.monotonic() - began

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        if self._proc is not None and self._proc.pid == pid:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        while _pid_alive(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _halt(self, pid: int, grace: float) -> None:
        """Fast shutdown (SIGINT); after `grace` seconds immediate (SIGQUIT), then SIGKILL."""
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            if self._wait_gone(pid, wait):
                break
        else:
            raise EmbeddedPostgresError(
                f"PostgreSQL (pid {pid}) on {self.pgdata} did not exit even after SIGKILL"
            )
        self._reap()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server with a fast shutdown (sessions are ended); a no-op when stopped.

        Works on a server started by another process from the same data area, too.
        """
        pid = self.pid
        if pid is not None:
            self._halt(pid, grace=timeout)
        self._reap()

    def restart(self) -> None:
        self.stop()
        self.start()

    def reload(self) -> None:
        """Rewrite the configuration and TLS files and have the server re-read them (SIGHUP)."""
        pid = self.pid
        if pid is None:
            raise EmbeddedPostgresError(f"PostgreSQL on {self.pgdata} is not running; start it")
        self._write_config()
        os.kill(pid, signal.SIGHUP)

    def destroy(self) -> None:
        """Stop the server and delete its data area (and the directory `temporary()` made)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)
        if self._temp_base is not None:
            shutil.rmtree(self._temp_base, ignore_errors=True)
            self._temp_base = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- administration

    def psql_admin(self, sql: str, database: str = "postgres", timeout: float = 60.0) -> str:
        """Run SQL as the superuser over the unix socket; its unaligned, tuples-only output.

        The SQL goes to psql on standard input (never on the command line, where other users
        could read it), and the first error stops it and raises AdminSQLError.
        """
        if not self.is_running():
            raise AdminSQLError(f"PostgreSQL on {self.pgdata} is not running; call start() first")
        cmd = [
            str(self.binaries.psql), "-X", "-q", "-A", "-t",
            "-v", "ON_ERROR_STOP=1",
            "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.superuser,
            "-d", database,
            "-f", "-",
        ]
        done = subprocess.run(
            cmd, input=sql, capture_output=True, text=True, env=_clean_env(),
            timeout=timeout, check=False,
        )
        if done.returncode != 0:
            raise AdminSQLError(
                f"SQL as {self.superuser} on database {database!r} of {self!r} failed: "
                f"{done.stderr.strip() or f'psql exited with {done.returncode}'}"
            )
        return done.stdout

    def create_role(
        self, name: str, *, superuser: bool = False, login: bool = True, password: str | None = None
    ) -> None:
        """Create the role, or bring an existing one to these attributes."""
        attrs = ["SUPERUSER" if superuser else "NOSUPERUSER", "LOGIN" if login else "NOLOGIN"]
        attrs.append("PASSWORD NULL" if password is None else f"PASSWORD {quote_literal(password)}")
        # Names and the password reach the SQL only through quote_literal / quote_ident.
        lit, ident = quote_literal(name), quote_ident(name)
        sql = (
            f"SELECT format('CREATE ROLE %I', {lit}) WHERE NOT EXISTS "  # noqa: S608
            f"(SELECT 1 FROM pg_roles WHERE rolname = {lit}) \\gexec\n"
            f"ALTER ROLE {ident} WITH {' '.join(attrs)};\n"
        )
        try:
            self.psql_admin(sql)
        except AdminSQLError as exc:
            message = str(exc)
            if password:
                message = message.replace(password, "***")
            raise AdminSQLError(message) from None

    def create_database(self, name: str, owner: str | None = None) -> None:
        """Create the database (owned by `owner`, default the superuser) unless it exists."""
        owner = owner or self.superuser
        lit, ident = quote_literal(name), quote_ident(name)
        sql = (
            f"SELECT format('CREATE DATABASE %I OWNER %I', {lit}, {quote_literal(owner)}) "  # noqa: S608
            f"WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = {lit}) "
            "\\gexec\n"
            f"ALTER DATABASE {ident} OWNER TO {quote_ident(owner)};\n"
        )
        self.psql_admin(sql)
