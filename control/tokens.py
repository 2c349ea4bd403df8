"""Join tokens: what a proxy or a db agent presents once to get its host certificate.

Two kinds:
- static, from `auth_service.tokens` in teleport.yaml (`"proxy,node,database:cbdeeab9-..."`),
  valid as long as the configuration lists them; `db` and `database` mean the same role,
  `node` is accepted and grants nothing here (this product has no SSH nodes);
- dynamic, from `tctl tokens add`, in `<data_dir>/tokens.json` (0600): stored as their
  SHA-256 only, with typed roles, an expiry, optionally single-use (removed by the join that
  uses it), and the `--db-*` flags given to `tctl tokens add` (kept only to print the
  `teleport start` command again). A dynamic token is shown to people by its id: the first
  12 hex digits of its SHA-256, which reveal nothing usable.

Every comparison is constant-time and walks every candidate. Changes to tokens.json happen
under an exclusive lock (`tokens.lock`), shared by tctl and the running API.

This module never logs a token, and never writes one to disk unhashed.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from transport.files import exclusive_lock, write_private

TOKENS_FILE = "tokens.json"
LOCK_FILE = "tokens.lock"
DEFAULT_TTL = timedelta(minutes=30)
ID_LENGTH = 12

TokenRole = Literal["proxy", "db", "node", "auth"]
_ROLE_NAMES: dict[str, TokenRole] = {
    "proxy": "proxy",
    "db": "db",
    "database": "db",
    "node": "node",
    "auth": "auth",
}
JOINABLE_ROLES = ("proxy", "db")


def normalize_roles(text: str | list[str]) -> list[TokenRole]:
    """`"proxy,database"` -> `["proxy", "db"]`; ValueError names an unknown role."""
    parts = text.split(",") if isinstance(text, str) else text
    roles: list[TokenRole] = []
    for part in parts:
        name = part.strip().lower()
        if not name:
            continue
        role = _ROLE_NAMES.get(name)
        if role is None:
            raise ValueError(
                f"unknown role {part.strip()!r}; use {', '.join(sorted(_ROLE_NAMES))}"
            )
        if role not in roles:
            roles.append(role)
    if not roles:
        raise ValueError("a join token needs at least one role (e.g. db or proxy)")
    return roles


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def token_id(token: str) -> str:
    return token_sha256(token)[:ID_LENGTH]


class DbTokenInfo(BaseModel):
    """The `--db-*` flags of `tctl tokens add`, for printing the agent's start command."""

    name: str | None = None
    protocol: str | None = None
    uri: str | None = None
    aws_region: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class DynamicToken(BaseModel):
    id: str
    token_sha256: str
    roles: list[TokenRole]
    created_at: datetime
    expires_at: datetime
    single_use: bool = False
    db: DbTokenInfo | None = None


class TokensFile(BaseModel):
    version: Literal[1] = 1
    tokens: list[DynamicToken] = Field(default_factory=list)


@dataclass(frozen=True)
class StaticToken:
    roles: tuple[TokenRole, ...]
    token: str

    @property
    def shown(self) -> str:
        """What tctl shows: enough to recognise it, not enough to use it."""
        return self.token[:4] + "…" if len(self.token) > 8 else "…"


@dataclass(frozen=True)
class TokenUse:
    """A token accepted for a join: which kind and, for dynamic ones, its id."""

    kind: Literal["static", "dynamic"]
    id: str
    roles: tuple[TokenRole, ...]


class JoinRefused(Exception):
    """The token cannot join this role. `status` is the HTTP status to answer with."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


def parse_static(entries: list[str]) -> list[StaticToken]:
    """`auth_service.tokens` entries, `roles:token` each; ValueError says which is wrong."""
    out: list[StaticToken] = []
    for entry in entries:
        roles, sep, token = entry.rpartition(":")
        if not sep or not roles or not token:
            raise ValueError(
                f"static token entry {entry[:6]}… must be 'roles:token', e.g. 'db,proxy:SECRET'"
            )
        out.append(StaticToken(tuple(normalize_roles(roles)), token))
    return out


def _now(now: datetime | None) -> datetime:
    value = now or datetime.now(UTC)
    if value.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return value.astimezone(UTC)


class TokenStore:
    def __init__(self, data_dir: Path, static: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / TOKENS_FILE
        self.static = parse_static(static or [])

    def _load(self) -> TokensFile:
        try:
            return TokensFile.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return TokensFile()

    def _save(self, data: TokensFile) -> None:
        write_private(self.path, data.model_dump_json(indent=1).encode() + b"\n")

    def _lock(self) -> AbstractContextManager[None]:
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        return exclusive_lock(self.data_dir / LOCK_FILE)

    # -- tctl ------------------------------------------------------------------------------

    def add(
        self,
        roles: list[TokenRole],
        ttl: timedelta = DEFAULT_TTL,
        *,
        single_use: bool = False,
        db: DbTokenInfo | None = None,
        now: datetime | None = None,
    ) -> tuple[str, DynamicToken]:
        """A new dynamic token: (the token, the only time it is seen; its stored record)."""
        if ttl <= timedelta(0):
            raise ValueError("a join token's TTL must be positive")
        at = _now(now)
        token = secrets.token_hex(16)
        record = DynamicToken(
            id=token_id(token),
            token_sha256=token_sha256(token),
            roles=roles,
            created_at=at,
            expires_at=at + ttl,
            single_use=single_use,
            db=db,
        )
        with self._lock():
            data = self._load()
            data.tokens = [t for t in data.tokens if t.expires_at > at] + [record]
            self._save(data)
        return token, record

    def dynamic(self, now: datetime | None = None) -> list[DynamicToken]:
        """The dynamic tokens that have not expired, oldest first."""
        at = _now(now)
        with self._lock():
            return [t for t in self._load().tokens if t.expires_at > at]

    def remove(self, token_or_id: str) -> DynamicToken | None:
        """Remove the dynamic token given itself or by its id (a unique prefix of at least
        6 hex digits will do); None if nothing matched. ValueError if ambiguous."""
        wanted = token_or_id.strip()
        digest = token_sha256(wanted)
        with self._lock():
            data = self._load()
            exact = [t for t in data.tokens if hmac.compare_digest(t.token_sha256, digest)]
            matches = exact or (
                [t for t in data.tokens if t.id.startswith(wanted.lower())]
                if len(wanted) >= 6
                else []
            )
            if not matches:
                return None
            if len(matches) > 1:
                raise ValueError(
                    f"{wanted!r} matches {len(matches)} tokens; give more of the id"
                )
            data.tokens = [t for t in data.tokens if t is not matches[0]]
            self._save(data)
            return matches[0]

    # -- join ------------------------------------------------------------------------------

    def use(self, token: str, role: str, now: datetime | None = None) -> TokenUse:
        """Accept `token` for joining as `role` or raise JoinRefused. A single-use token is
        removed here; a token refused for its role is not used up."""
        at = _now(now)
        digest = token_sha256(token)
        static_match: StaticToken | None = None
        for static in self.static:  # compare digests: equal lengths, constant time
            if hmac.compare_digest(token_sha256(static.token), digest):
                static_match = static
        if static_match is not None:
            self._check_role(static_match.roles, role)
            return TokenUse("static", "static", static_match.roles)
        with self._lock():
            data = self._load()
            found: DynamicToken | None = None
            for record in data.tokens:
                if hmac.compare_digest(record.token_sha256, digest):
                    found = record
            if found is None:
                raise JoinRefused(
                    401,
                    "invalid_token",
                    "the join token is not valid (mistyped, removed, or already used); "
                    "create one with `tctl tokens add --type=" + role + "`",
                )
            if found.expires_at <= at:
                data.tokens = [t for t in data.tokens if t.expires_at > at]
                self._save(data)
                raise JoinRefused(
                    401,
                    "expired_token",
                    f"the join token expired at {found.expires_at:%Y-%m-%d %H:%M:%S} UTC; "
                    f"create a new one with `tctl tokens add --type={role}`",
                )
            self._check_role(tuple(found.roles), role)
            if found.single_use:
                data.tokens = [t for t in data.tokens if t is not found]
                self._save(data)
            return TokenUse("dynamic", found.id, tuple(found.roles))

    @staticmethod
    def _check_role(roles: tuple[TokenRole, ...], role: str) -> None:
        if role not in roles:
            raise JoinRefused(
                403,
                "wrong_token_role",
                f"this join token is for role(s) {', '.join(roles)}, not {role}; use a token "
                f"created with `tctl tokens add --type={role}`",
            )
