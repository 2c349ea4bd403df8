"""Users' secrets: password hashes, TOTP secrets, lockouts and one-time signup tokens.

Who a user is and which roles they have lives in git (`users/NAME.yaml`); what proves they
are that user lives here, in `<data_dir>/secrets/users.json` (0600, directory 0700), never
in git and never in a bundle.

- Passwords: scrypt (`hashlib.scrypt`) with a per-user random salt; the cost parameters
  are stored with each hash so they can be raised later without breaking old hashes.
  Comparison is constant-time. A login for a user without a password costs one scrypt too.
- TOTP (RFC 6238): SHA-1, 6 digits, 30 s steps, the previous and next step accepted for
  clock drift; a code (or an older one) is never accepted twice: the last step used is kept.
- Lockout: `failures` wrong logins in a row lock the account for `lock_seconds`; while
  locked, nothing is checked, not even a right password. A good login clears the count.
- Signup tokens: random, stored as their SHA-256 only, valid `ttl` (1 h by default), single
  use; `tctl users add` / `tctl users reset` create them, `signup` consumes them.

Every change is a read-modify-write of the file under an exclusive lock
(`secrets/users.lock`), so `tctl` and a running API never lose each other's updates.

This module never logs or returns a password, a hash, a TOTP secret (except to the user
enrolling it) or a signup token (except to the admin creating it).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlencode

from pydantic import BaseModel, Field

from transport.files import ensure_dir, exclusive_lock, write_private

SECRETS_DIR = "secrets"
USERS_FILE = "users.json"
LOCK_FILE = "users.lock"

# scrypt cost: 2**15 * 8 * 128 bytes = 32 MiB of memory and tens of milliseconds per hash.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
SALT_BYTES = 16
MIN_PASSWORD_LENGTH = 8

TOTP_DIGITS = 6
TOTP_PERIOD = 30
TOTP_DRIFT_STEPS = 1
TOTP_SECRET_BYTES = 20

DEFAULT_SIGNUP_TTL = timedelta(hours=1)

SecondFactor = Literal["off", "otp", "optional"]


# --- passwords ---------------------------------------------------------------------------


class PasswordHash(BaseModel):
    algorithm: Literal["scrypt"] = "scrypt"
    n: int
    r: int
    p: int
    salt: str  # base64
    hash: str  # base64


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=256 * n * r + (1 << 20),
        dklen=dklen,
    )


def hash_password(
    password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
) -> PasswordHash:
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, n, r, p, SCRYPT_DKLEN)
    return PasswordHash(
        n=n,
        r=r,
        p=p,
        salt=base64.b64encode(salt).decode(),
        hash=base64.b64encode(digest).decode(),
    )


@functools.cache
def _dummy_hash() -> PasswordHash:
    return hash_password(secrets.token_urlsafe(16))


def verify_password(password: str, stored: PasswordHash | None) -> bool:
    """Whether `password` matches `stored`, in constant time. With no stored hash, one
    scrypt is still computed (so unknown users cost as much as known ones) and False
    is returned."""
    if stored is None:
        stored = _dummy_hash()
        matches = False
    else:
        matches = True
    salt = base64.b64decode(stored.salt)
    expected = base64.b64decode(stored.hash)
    actual = _scrypt(password, salt, stored.n, stored.r, stored.p, len(expected))
    return hmac.compare_digest(actual, expected) and matches


def password_problem(password: str, username: str) -> str | None:
    """Why a new password is refused, or None."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"the password must have at least {MIN_PASSWORD_LENGTH} characters"
    if password.strip() != password or not password.isprintable():
        return "the password must not start or end with spaces or contain control characters"
    if password.lower() == username.lower():
        return "the password must not be the user name"
    return None


# --- TOTP (RFC 6238 over RFC 4226) --------------------------------------------------------


def new_totp_secret() -> str:
    """A fresh secret in base32 without padding, as authenticator apps take it."""
    return base64.b32encode(secrets.token_bytes(TOTP_SECRET_BYTES)).decode().rstrip("=")


def _b32decode(secret: str) -> bytes:
    text = secret.strip().replace(" ", "").upper()
    return base64.b32decode(text + "=" * (-len(text) % 8))


def totp_step(now: datetime) -> int:
    return int(now.timestamp()) // TOTP_PERIOD


def totp_code(secret: str, step: int) -> str:
    """The code for time step `step` (HOTP with counter = step, dynamic truncation)."""
    mac = hmac.new(_b32decode(secret), struct.pack(">Q", step), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**TOTP_DIGITS).zfill(TOTP_DIGITS)


def totp_match(secret: str, code: str, now: datetime, last_step: int) -> int | None:
    """The step `code` belongs to (now, one before or one after), if that step is newer
    than `last_step`; else None. Every candidate is compared, in constant time."""
    code = code.strip().replace(" ", "")
    if len(code) != TOTP_DIGITS or not code.isdigit():
        return None
    current = totp_step(now)
    found: int | None = None
    for step in range(current - TOTP_DRIFT_STEPS, current + TOTP_DRIFT_STEPS + 1):
        if hmac.compare_digest(totp_code(secret, step), code) and step > last_step:
            found = step
    return found


def totp_uri(secret: str, username: str, cluster: str) -> str:
    """otpauth:// URI for QR codes (the de facto format authenticator apps read)."""
    label = quote(f"{cluster}:{username}")
    query = urlencode(
        {
            "secret": secret,
            "issuer": cluster,
            "algorithm": "SHA1",
            "digits": TOTP_DIGITS,
            "period": TOTP_PERIOD,
        }
    )
    return f"otpauth://totp/{label}?{query}"


# --- the file ------------------------------------------------------------------------------


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class SignupRecord(BaseModel):
    token_sha256: str
    created_at: datetime
    expires_at: datetime
    totp_pending: str | None = None  # secret shown at signup/start, enrolled at signup


class UserSecrets(BaseModel):
    password: PasswordHash | None = None
    password_set_at: datetime | None = None
    totp_secret: str | None = None
    totp_last_step: int = 0
    failures: int = 0
    locked_until: datetime | None = None
    signup: SignupRecord | None = None


class SecretsFile(BaseModel):
    version: Literal[1] = 1
    users: dict[str, UserSecrets] = Field(default_factory=dict)


@dataclass(frozen=True)
class LockoutPolicy:
    failures: int = 5
    lock_seconds: int = 15 * 60

    @property
    def lock_for(self) -> timedelta:
        return timedelta(seconds=self.lock_seconds)


@dataclass(frozen=True)
class UserStatus:
    """What `tctl users ls` shows of a user's secrets (never the secrets themselves)."""

    password_set: bool
    totp_enrolled: bool
    locked_until: datetime | None
    signup_expires: datetime | None


class LoginRefused(Exception):
    """A login failed. `code` is for programs; `str()` is safe to show to the person.

    Codes: `bad_credentials` (wrong password or unknown user: one message for both),
    `account_locked`, `second_factor_required` (password right, TOTP code missing),
    `second_factor_not_enrolled`.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class SignupRefused(Exception):
    """A signup token is unknown, used, expired, or the new password is refused."""

    def __init__(self, code: str, message: str, field: str = "token") -> None:
        super().__init__(message)
        self.code = code
        self.field = field


BAD_CREDENTIALS = "invalid user name or password"


def _now(now: datetime | None) -> datetime:
    value = now or datetime.now(UTC)
    if value.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return value.astimezone(UTC)


def _when(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def locked_out(record: UserSecrets, now: datetime) -> datetime | None:
    """Until when the account is locked, or None."""
    if record.locked_until is not None and now < record.locked_until:
        return record.locked_until
    return None


def register_failure(record: UserSecrets, policy: LockoutPolicy, now: datetime) -> None:
    if record.locked_until is not None and now >= record.locked_until:
        record.locked_until = None
        record.failures = 0
    record.failures += 1
    if record.failures >= policy.failures:
        record.locked_until = now + policy.lock_for
        record.failures = 0


def locked_message(until: datetime) -> str:
    return (
        f"too many failed logins: the account is locked until {_when(until)}; try again "
        "then, or ask an administrator to run `tctl users reset`"
    )


class SecretsStore:
    """`<data_dir>/secrets/users.json`: read-modify-write under a file lock."""

    def __init__(self, data_dir: Path, lockout: LockoutPolicy | None = None) -> None:
        self.directory = Path(data_dir) / SECRETS_DIR
        self.path = self.directory / USERS_FILE
        self.lockout = lockout or LockoutPolicy()

    # -- plumbing ------------------------------------------------------------------------

    def _load(self) -> SecretsFile:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return SecretsFile()
        return SecretsFile.model_validate_json(data)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[SecretsFile]:
        ensure_dir(self.directory)
        os.chmod(self.directory, 0o700)
        with exclusive_lock(self.directory / LOCK_FILE):
            data = self._load()
            before = data.model_dump_json()
            yield data
            after = data.model_dump_json()
            if after != before:
                write_private(self.path, after.encode() + b"\n")

    def read(self) -> SecretsFile:
        with exclusive_lock(self._lock_path()):
            return self._load()

    def _lock_path(self) -> Path:
        ensure_dir(self.directory)
        return self.directory / LOCK_FILE

    # -- admin (tctl) ---------------------------------------------------------------------

    def reset(
        self, username: str, ttl: timedelta = DEFAULT_SIGNUP_TTL, now: datetime | None = None
    ) -> str:
        """Clear the password, TOTP and lockout of `username` and return a new signup token
        (the only copy: it is stored hashed)."""
        if ttl <= timedelta(0):
            raise ValueError("the signup token TTL must be positive")
        at = _now(now)
        token = secrets.token_urlsafe(24)
        with self._transaction() as data:
            data.users[username] = UserSecrets(
                signup=SignupRecord(
                    token_sha256=_hash_token(token), created_at=at, expires_at=at + ttl
                )
            )
        return token

    def remove(self, username: str) -> bool:
        with self._transaction() as data:
            return data.users.pop(username, None) is not None

    def status(self, username: str, now: datetime | None = None) -> UserStatus:
        at = _now(now)
        record = self.read().users.get(username) or UserSecrets()
        signup = record.signup
        return UserStatus(
            password_set=record.password is not None,
            totp_enrolled=record.totp_secret is not None,
            locked_until=locked_out(record, at),
            signup_expires=signup.expires_at if signup and signup.expires_at > at else None,
        )

    # -- signup --------------------------------------------------------------------------

    @staticmethod
    def _find_signup(data: SecretsFile, token: str, now: datetime) -> tuple[str, UserSecrets]:
        wanted = _hash_token(token)
        found: tuple[str, UserSecrets] | None = None
        for name, record in data.users.items():  # no early exit: same time for every token
            if record.signup is not None and hmac.compare_digest(
                record.signup.token_sha256, wanted
            ):
                found = (name, record)
        if found is None:
            raise SignupRefused(
                "invalid_signup_token",
                "the signup token is not valid (mistyped, or already used); ask an "
                "administrator for a new one (`tctl users reset NAME`)",
            )
        signup = found[1].signup
        assert signup is not None
        if now >= signup.expires_at:
            raise SignupRefused(
                "expired_signup_token",
                f"the signup token expired at {_when(signup.expires_at)}; ask an "
                "administrator for a new one (`tctl users reset NAME`)",
            )
        return found

    def signup_start(
        self,
        token: str,
        second_factor: SecondFactor,
        enroll_totp: bool = False,
        now: datetime | None = None,
    ) -> tuple[str, str | None]:
        """The user a valid token is for, and the TOTP secret to enroll (when the cluster
        requires or offers a second factor, or the user asks for one)."""
        at = _now(now)
        with self._transaction() as data:
            name, record = self._find_signup(data, token, at)
            assert record.signup is not None
            offered = second_factor in ("otp", "optional") or enroll_totp
            if offered and record.signup.totp_pending is None:
                record.signup.totp_pending = new_totp_secret()
            return name, record.signup.totp_pending

    def signup_finish(
        self,
        token: str,
        password: str,
        totp: str | None,
        second_factor: SecondFactor,
        now: datetime | None = None,
    ) -> tuple[str, bool]:
        """Set the password (and enroll TOTP) of the token's user; the token is used up.
        Returns (user name, whether TOTP is now enrolled)."""
        at = _now(now)
        with self._transaction() as data:
            name, record = self._find_signup(data, token, at)
            problem = password_problem(password, name)
            if problem is not None:
                raise SignupRefused("weak_password", problem, field="password")
            signup = record.signup
            assert signup is not None
            pending = signup.totp_pending
            enroll = False
            if second_factor == "otp":
                if pending is None or not totp:
                    raise SignupRefused(
                        "second_factor_required",
                        "this cluster requires a second factor: start the signup again "
                        "(signup/start), add the secret to an authenticator app and send "
                        "its current code",
                        field="totp",
                    )
                enroll = True
            elif totp:
                if pending is None:
                    raise SignupRefused(
                        "no_totp_offered",
                        "no TOTP secret was offered for this signup: call signup/start first",
                        field="totp",
                    )
                enroll = True
            step = 0
            if enroll:
                assert pending is not None and totp is not None
                matched = totp_match(pending, totp, at, 0)
                if matched is None:
                    raise SignupRefused(
                        "bad_totp",
                        "the TOTP code does not match the secret offered at signup/start; "
                        "check the authenticator app and this machine's clock",
                        field="totp",
                    )
                step = matched
            # scrypt under the lock: signups are rare, and the token must be used once.
            data.users[name] = UserSecrets(
                password=hash_password(password),
                password_set_at=at,
                totp_secret=pending if enroll else None,
                totp_last_step=step,
            )
            return name, enroll

    # -- login ---------------------------------------------------------------------------

    def check_login(
        self,
        username: str,
        password: str,
        totp: str | None,
        second_factor: SecondFactor,
        now: datetime | None = None,
    ) -> None:
        """Return if the password (and TOTP code when needed) are right; else raise
        LoginRefused and count the failure. Call only for users in the policy in force."""
        at = _now(now)
        with self._transaction() as data:
            record = data.users.get(username) or UserSecrets()
            until = locked_out(record, at)
            if until is not None:
                raise LoginRefused("account_locked", locked_message(until))
            stored = record.password
        # scrypt outside the lock: tctl and other logins need not wait for it.
        good = verify_password(password, stored)
        with self._transaction() as data:
            record = data.users.setdefault(username, UserSecrets())
            refusal = self._judge(record, username, good, stored, totp, second_factor, at)
        # Raised only now, so that the transaction has saved the failure it counted.
        if refusal is not None:
            raise refusal

    def _judge(
        self,
        record: UserSecrets,
        username: str,
        good: bool,
        checked: PasswordHash | None,
        totp: str | None,
        second_factor: SecondFactor,
        at: datetime,
    ) -> LoginRefused | None:
        """Update `record` with one login attempt; the refusal, or None when it succeeds."""
        until = locked_out(record, at)
        if until is not None:
            return LoginRefused("account_locked", locked_message(until))
        if not good or record.password is None or record.password != checked:
            register_failure(record, self.lockout, at)
            return LoginRefused("bad_credentials", BAD_CREDENTIALS)
        if record.totp_secret is not None:
            if not totp:
                return LoginRefused(
                    "second_factor_required",
                    "a second factor is required: send the current code from your "
                    "authenticator app",
                )
            step = totp_match(record.totp_secret, totp, at, record.totp_last_step)
            if step is None:
                register_failure(record, self.lockout, at)
                return LoginRefused(
                    "bad_totp",
                    "the second factor code is wrong or was already used; wait for the "
                    "next code and check this machine's clock",
                )
            record.totp_last_step = step
        elif second_factor == "otp":
            return LoginRefused(
                "second_factor_not_enrolled",
                f"this cluster requires a second factor and {username!r} has none "
                f"enrolled; ask an administrator to run `tctl users reset {username}` "
                "and sign up again",
            )
        record.failures = 0
        record.locked_until = None
        return None


class PhantomLockouts:
    """Lockout bookkeeping, in memory, for names that are not users: so that trying a name
    that does not exist looks exactly like trying one that does."""

    def __init__(self, policy: LockoutPolicy, max_names: int = 10000) -> None:
        self.policy = policy
        self.max_names = max_names
        self._records: dict[str, UserSecrets] = {}

    def check(self, username: str, now: datetime) -> None:
        record = self._records.get(username)
        if record is not None:
            until = locked_out(record, now)
            if until is not None:
                raise LoginRefused("account_locked", locked_message(until))

    def fail(self, username: str, now: datetime) -> None:
        if username not in self._records and len(self._records) >= self.max_names:
            self._records.pop(next(iter(self._records)))
        register_failure(self._records.setdefault(username, UserSecrets()), self.policy, now)
