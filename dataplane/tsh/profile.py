"""The login profile on this machine: what `tsh login` got, and what `tsh db login` added.

Layout under `$TELEPORT_HOME` (default `~/.tsh`); every directory 0700, every file 0600
from its first byte (keys never exist with wider permissions, not even for a moment)::

    current-profile              the name of the profile tsh commands use
    .lock                        held while a command changes profiles or pg_service.conf
    profiles/<proxy>/            one per proxy address (`localhost_3080`)
        profile.json             proxy, user, cluster, roles, valid until, how it was trusted
        key.pem                  the login key (ECDSA P-256), made here, never sent
        cert.pem                 the user certificate from `tsh login`
        host-ca.pem              the host CA the proxy is verified with (psql's sslrootcert)
        user-ca.pem              the user CA (to check the certificates we are given)
        db/<name>.key            the key of a database certificate (0600)
        db/<name>.pk8            the same key as PKCS#8 DER, for JDBC (0600)
        db/<name>.crt            the route certificate `tsh db login` got
        db/<name>.json           db user, db name, valid until, the pg_service.conf section

A profile belongs to one proxy address and one user. Nothing here talks to the network;
nothing here ever prints or logs a key.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from dataplane.tsh.errors import SESSION_EXPIRED, TshError, UsageError
from transport.files import exclusive_lock, write_private

DEFAULT_HOME = "~/.tsh"
CURRENT = "current-profile"
LOCK = ".lock"
PROFILES = "profiles"
_UNSAFE = re.compile(r"[^A-Za-z0-9.-]")
_DB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")


def tsh_home(env: Mapping[str, str] | None = None) -> Path:
    """`$TELEPORT_HOME`, else `~/.tsh`."""
    env = os.environ if env is None else env
    given = env.get("TELEPORT_HOME")
    return Path(given).expanduser() if given else Path(DEFAULT_HOME).expanduser()


def profile_name(proxy: str) -> str:
    """A directory name for a proxy address: `localhost:3080` -> `localhost_3080`."""
    return _UNSAFE.sub("_", proxy)


def now_utc() -> datetime:
    return datetime.now(UTC)


def _ensure_private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ProfileData(_Model):
    """What `profile.json` holds."""

    version: int = 1
    proxy: str
    user: str
    cluster: str
    roles: list[str]
    expires: datetime
    trust: str = "pinned"  # how the proxy was first trusted: "system", "insecure", "ca-pin"
    postgres_addr: str  # host:port psql connects to


class DbLogin(_Model):
    """What `db/<name>.json` holds."""

    name: str
    # Defaults written to the pg_service.conf section (None: psql's user/dbname decide).
    db_user: str | None = None
    db_name: str | None = None
    # What the certificate's route binds; a bound value must be used as is.
    route_db_user: str | None = None
    route_db_name: str | None = None
    expires: datetime
    service: str  # the pg_service.conf section
    service_file: str  # the file it was written to


class Profile:
    """One profile directory. `load` reads it; `save` writes `profile.json`."""

    def __init__(self, home: Path, name: str, data: ProfileData) -> None:
        self.home = home
        self.name = name
        self.data = data

    # -- paths --------------------------------------------------------------------------

    @property
    def dir(self) -> Path:
        return self.home / PROFILES / self.name

    @property
    def key_path(self) -> Path:
        return self.dir / "key.pem"

    @property
    def cert_path(self) -> Path:
        return self.dir / "cert.pem"

    @property
    def host_ca_path(self) -> Path:
        return self.dir / "host-ca.pem"

    @property
    def user_ca_path(self) -> Path:
        return self.dir / "user-ca.pem"

    @property
    def db_dir(self) -> Path:
        return self.dir / "db"

    def db_key_path(self, name: str) -> Path:
        return self.db_dir / f"{check_db_name(name)}.key"

    def db_key_der_path(self, name: str) -> Path:
        """The database key again, as PKCS#8 DER: pgjdbc's `sslkey` reads only that."""
        return self.db_dir / f"{check_db_name(name)}.pk8"

    def db_cert_path(self, name: str) -> Path:
        return self.db_dir / f"{check_db_name(name)}.crt"

    def _db_record_path(self, name: str) -> Path:
        return self.db_dir / f"{check_db_name(name)}.json"

    # -- state --------------------------------------------------------------------------

    @property
    def expired(self) -> bool:
        return self.data.expires <= now_utc()

    def login_hint(self) -> str:
        return f"tsh login --proxy={self.data.proxy} --user={self.data.user}"

    def require_valid(self) -> Profile:
        """This profile, or TshError with the expiry message when its login has expired."""
        if self.expired:
            raise TshError(f"{SESSION_EXPIRED} ({self.login_hint()})")
        return self

    def service_name(self, database: str) -> str:
        return f"{self.data.cluster}-{database}"

    # -- writing ------------------------------------------------------------------------

    def save(self) -> None:
        _ensure_private_dir(self.dir)
        write_private(self.dir / "profile.json", self.data.model_dump_json(indent=2).encode())

    def write_file(self, path: Path, data: bytes) -> None:
        _ensure_private_dir(path.parent)
        write_private(path, data)

    # -- database logins ----------------------------------------------------------------

    def db_logins(self) -> dict[str, DbLogin]:
        found: dict[str, DbLogin] = {}
        if not self.db_dir.is_dir():
            return found
        for path in sorted(self.db_dir.glob("*.json")):
            try:
                record = DbLogin.model_validate_json(path.read_bytes())
            except (OSError, ValidationError):
                continue
            found[record.name] = record
        return found

    def save_db_login(self, record: DbLogin) -> None:
        data = record.model_dump_json(indent=2).encode()
        self.write_file(self._db_record_path(record.name), data)

    def forget_db_login(self, name: str) -> None:
        for path in (
            self._db_record_path(name),
            self.db_cert_path(name),
            self.db_key_path(name),
            self.db_key_der_path(name),
        ):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def check_db_name(name: str) -> str:
    if not _DB_NAME.match(name):
        raise UsageError(
            f"{name!r} is not a database name: names are letters, digits, '.', '_' and '-'; "
            "`tsh db ls` lists them"
        )
    return name


class ProfileStore:
    """The profiles under one tsh home."""

    def __init__(self, home: Path | None = None) -> None:
        self.home = Path(home) if home is not None else tsh_home()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the home's lock: one tsh at a time changes profiles and pg_service.conf."""
        _ensure_private_dir(self.home)
        with exclusive_lock(self.home / LOCK):
            yield

    def names(self) -> list[str]:
        root = self.home / PROFILES
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "profile.json").is_file())

    def load(self, name: str) -> Profile | None:
        path = self.home / PROFILES / name / "profile.json"
        try:
            data = ProfileData.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValidationError:
            raise TshError(
                f"{path} is damaged; remove {path.parent} (or run `tsh logout`) and log in again"
            ) from None
        return Profile(self.home, name, data)

    def current_name(self) -> str | None:
        try:
            name = (self.home / CURRENT).read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def current(self) -> Profile | None:
        name = self.current_name()
        return self.load(name) if name else None

    def require_current(self) -> Profile:
        """The profile tsh commands use; TshError when there is none."""
        profile = self.current()
        if profile is None:
            raise TshError(
                "you are not logged in: run `tsh login --proxy=HOST:PORT --user=NAME` first"
            )
        return profile

    def set_current(self, name: str | None) -> None:
        if name is None:
            with contextlib.suppress(FileNotFoundError):
                (self.home / CURRENT).unlink()
            return
        _ensure_private_dir(self.home)
        write_private(self.home / CURRENT, f"{name}\n".encode())

    def new(self, data: ProfileData) -> Profile:
        return Profile(self.home, profile_name(data.proxy), data)
