"""`tctl users`: add, list, remove users and reset their credentials (on the local data dir).

    tctl users add NAME [LOGINS] [--roles=a,b] [--db-names=..] [--db-users=..] [--ttl=1h]
        Commits users/NAME.yaml to the hosted policy repository through its pre-receive hook
        (the same lint as a push: a refused file is shown, and nothing changes), then prints
        a one-time signup token and the `tsh login` line that uses it. Without --roles the
        user gets the `access` role the hosted repository starts with; --db-names and
        --db-users become the traits that role's templates read; LOGINS (comma-separated,
        seed 001's `root`) the `logins` trait.
    tctl users ls                 users on the policy branch, with password and lock state
    tctl users rm NAME            removes the user's file (a commit) and their secrets
    tctl users reset NAME         new signup token; clears password, TOTP and lockout

Git holds who a user is and what they may do; `<data_dir>/secrets/users.json` holds the
password hash and TOTP secret, which never go to git. This command never prints a password
hash or a TOTP secret; a signup token is printed once, when made, and stored hashed.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from control import hosted
from control.ca import host_ca_pin
from control.service import control_plane_running
from control.settings import ControlSettings, load_settings
from control.state import load_state
from control.tctl import UsageError, add_data_dir_argument, data_dir_of
from control.users import DEFAULT_SIGNUP_TTL, SecretsStore
from schemas.durations import DurationError, format_duration, parse_duration
from schemas.policy.models import NAME_PATTERN
from schemas.policy.yamlsource import parse_yaml

DEFAULT_ROLE = "access"
DEFAULT_PROXY_PORT = 3080
_NAME = re.compile(NAME_PATTERN)


def guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Files or git that cannot be used are a usage error (exit 2) with the reason, never a
    traceback. (Shared with `tctl tokens`; `control.tctl.main` could do this for all.)"""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or "").strip().splitlines()
            raise UsageError(
                f"git failed ({' '.join(map(str, exc.cmd[:3]))}): "
                f"{detail[-1] if detail else 'exit code ' + str(exc.returncode)}"
            ) from None
        except PermissionError as exc:
            raise UsageError(
                f"cannot access {exc.filename}: permission denied; run tctl as the user the "
                "auth service runs as (usually root)"
            ) from None
        except OSError as exc:
            raise UsageError(f"cannot access {exc.filename or 'a file'}: {exc.strerror}") from None

    return run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "users",
        help="add, list and remove users; reset their password",
        description="Manage users: their YAML in the hosted policy repository, and their "
        "credentials in the data dir.",
    )
    usub = p.add_subparsers(dest="users_command", metavar="ACTION", required=True)

    add = usub.add_parser(
        "add",
        help="add a user and print a one-time signup token",
        description="Commit users/NAME.yaml to the hosted policy repository (linted exactly "
        "as a push is) and print a one-time signup token with the tsh line that uses it.",
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "logins", metavar="LOGINS", nargs="?", default="", help="comma-separated OS logins"
    )
    add.add_argument(
        "--roles", default="", help=f"comma-separated roles (default: {DEFAULT_ROLE})"
    )
    add.add_argument("--db-names", default="", help="comma-separated database names (trait)")
    add.add_argument("--db-users", default="", help="comma-separated database users (trait)")
    add.add_argument("--ttl", default=None, help="how long the signup token is valid (1h)")
    add_data_dir_argument(add)
    add.set_defaults(func=guarded(run_add))

    ls = usub.add_parser("ls", help="list users", description="List the users on the policy "
                         "branch with their roles, and whether a password is set or locked.")
    ls.add_argument("--format", choices=["text", "json"], default="text")
    add_data_dir_argument(ls)
    ls.set_defaults(func=guarded(run_ls))

    rm = usub.add_parser("rm", help="remove a user", description="Remove the user's file "
                         "from the policy repository (a commit) and their credentials.")
    rm.add_argument("name", metavar="NAME")
    add_data_dir_argument(rm)
    rm.set_defaults(func=guarded(run_rm))

    reset = usub.add_parser(
        "reset",
        help="clear a user's password and second factor; print a new signup token",
        description="Clear the password, TOTP and lockout of a user and print a new "
        "one-time signup token.",
    )
    reset.add_argument("name", metavar="NAME")
    reset.add_argument("--ttl", default=None, help="how long the signup token is valid (1h)")
    add_data_dir_argument(reset)
    reset.set_defaults(func=guarded(run_reset))


# --- helpers ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BranchUser:
    name: str
    path: str
    roles: list[str]
    alone: bool  # the only document in its file


def _settings(data_dir: Path) -> ControlSettings:
    settings = load_settings(data_dir)
    if settings is None:
        raise UsageError(
            f"{data_dir} has no control.json: start the control plane once "
            "(teleport start --roles=auth) or pass the right --data-dir"
        )
    return settings


def _hosted_repo(data_dir: Path, settings: ControlSettings, action: str) -> Path:
    if settings.source.kind != "hosted":
        where = settings.source.url or settings.source.path or "another repository"
        raise UsageError(
            f"policy for this cluster comes from {where}, not the hosted repository: "
            f"{action} users/NAME.yaml there and push"
        )
    repo = hosted.repo_path(data_dir)
    if not (repo / "HEAD").exists():
        raise UsageError(f"{repo} does not exist: start the control plane once first")
    return repo


def _print_warning(line: str) -> None:
    """A lint warning the policy repository's hook gave about the file tctl wrote."""
    print(f"tctl: {line}", file=sys.stderr)


def _list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _ttl(text: str | None) -> timedelta:
    if text is None:
        return DEFAULT_SIGNUP_TTL
    try:
        ttl = parse_duration(text)
    except DurationError as exc:
        raise UsageError(f"--ttl: {exc}") from None
    if ttl <= timedelta(0):
        raise UsageError(f"--ttl must be positive, got {text!r}")
    return ttl


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise UsageError(
            f"{name!r} is not a valid user name: use letters, digits, '.', '_' and '-' "
            "(at most 64), starting and ending with a letter or digit"
        )


def branch_users(repo: Path, branch: str) -> dict[str, BranchUser]:
    """The user resources on the policy branch, by name (read leniently: a broken file
    elsewhere does not hide the others)."""
    found: dict[str, BranchUser] = {}
    for path in hosted.list_files(repo, "users", branch):
        if not path.endswith((".yaml", ".yml")):
            continue
        data = hosted.read_file(repo, path, branch)
        if data is None:
            continue
        documents = parse_yaml(data, path).documents
        for doc in documents:
            value = doc.value
            if not isinstance(value, dict) or value.get("kind") != "user":
                continue
            meta = value.get("metadata")
            spec = value.get("spec")
            name = meta.get("name") if isinstance(meta, dict) else None
            if not isinstance(name, str):
                continue
            roles = spec.get("roles") if isinstance(spec, dict) else None
            found[name] = BranchUser(
                name,
                path,
                [str(r) for r in roles] if isinstance(roles, list) else [],
                len(documents) == 1,
            )
    return found


def user_yaml(name: str, roles: list[str], traits: dict[str, list[str]]) -> bytes:
    spec: dict[str, object] = {"roles": roles}
    if traits:
        spec["traits"] = traits
    document = {"kind": "user", "version": "v2", "metadata": {"name": name}, "spec": spec}
    body = yaml.safe_dump(document, sort_keys=False, default_flow_style=None, allow_unicode=True)
    header = (
        "# yaml-language-server: $schema=../../schemas/json/user.schema.json\n"
        "# Added by `tctl users add`. Credentials are not here: they live on the auth host.\n"
    )
    return (header + body).encode()


def proxy_address(settings: ControlSettings) -> str:
    if settings.api.proxy_addrs:
        return settings.api.proxy_addrs[0]
    return f"{settings.api.nodename}:{DEFAULT_PROXY_PORT}"


def signup_instructions(
    name: str, token: str, ttl: timedelta, settings: ControlSettings, pin: str
) -> str:
    return (
        f"Signup token for {name} (valid {format_duration(ttl)}, usable once):\n\n"
        f"  {token}\n\n"
        f"Give it to {name}, who sets a password (and, if asked, a second factor) and logs "
        "in with:\n\n"
        f"  tsh login --proxy={proxy_address(settings)} --user={name} --ca-pin={pin} "
        f"--signup-token={token}\n"
    )


# --- commands --------------------------------------------------------------------------------


def run_add(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    settings = _settings(data_dir)
    name = args.name
    _check_name(name)
    ttl = _ttl(args.ttl)
    repo = _hosted_repo(data_dir, settings, "add")
    branch = settings.source.branch
    existing = branch_users(repo, branch).get(name)
    if existing is not None:
        raise UsageError(
            f"user {name!r} already exists ({existing.path}); to give them a new signup "
            f"token run `tctl users reset {name}`, to change roles edit the file and push"
        )
    roles = _list(args.roles) or [DEFAULT_ROLE]
    traits: dict[str, list[str]] = {}
    for trait, text in (
        ("logins", args.logins),
        ("db_names", args.db_names),
        ("db_users", args.db_users),
    ):
        values = _list(text)
        if values:
            traits[trait] = values
    path = f"users/{name}.yaml"
    try:
        commit = hosted.commit_files(
            repo,
            {path: user_yaml(name, roles, traits)},
            f"tctl users add {name}",
            branch=branch,
            warn=_print_warning,
        )
    except hosted.PushRejected as exc:
        print(
            f"tctl: user {name!r} was not added: the policy repository refused {path}:",
            file=sys.stderr,
        )
        for line in str(exc).splitlines():
            print(f"  {line}", file=sys.stderr)
        return 1
    token = SecretsStore(data_dir).reset(name, ttl)
    print(f"User {name!r} added: {path}, commit {commit[:12]}, roles {', '.join(roles)}.")
    print(f"{in_force_note(data_dir, commit)}\n")
    print(signup_instructions(name, token, ttl, settings, host_ca_pin(data_dir)), end="")
    return 0


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if value else ""


def _policy_repo(data_dir: Path, settings: ControlSettings) -> Path:
    if settings.source.kind == "hosted":
        return hosted.repo_path(data_dir)
    if settings.source.kind == "local" and settings.source.path:
        return Path(settings.source.path)
    return data_dir / "mirror.git"


def run_ls(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    settings = _settings(data_dir)
    users = branch_users(_policy_repo(data_dir, settings), settings.source.branch)
    store = SecretsStore(data_dir)
    listed = [(users[name], store.status(name)) for name in sorted(users)]
    if args.format == "json":
        rows = [
            {
                "name": user.name,
                "roles": user.roles,
                "file": user.path,
                "password_set": status.password_set,
                "totp_enrolled": status.totp_enrolled,
                "locked_until": _iso(status.locked_until),
                "signup_expires": _iso(status.signup_expires),
            }
            for user, status in listed
        ]
        print(json.dumps({"users": rows}, indent=2))
        return 0
    if not listed:
        print("No users on the policy branch; add one with `tctl users add NAME`.")
        return 0
    table = [("User", "Roles", "Password", "Second factor", "Locked until")]
    for user, status in listed:
        if status.password_set:
            credential = "set"
        elif status.signup_expires:
            credential = f"signup pending (until {_when(status.signup_expires)})"
        else:
            credential = "not set"
        table.append(
            (
                user.name,
                ",".join(user.roles) or "-",
                credential,
                "totp" if status.totp_enrolled else "-",
                _when(status.locked_until) or "-",
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for i, r in enumerate(table):
        print("  ".join(cell.ljust(widths[j]) for j, cell in enumerate(r)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    return 0


IN_FORCE_WAIT = 5.0  # seconds `tctl users add/rm` wait for the control plane to apply them


def in_force_note(data_dir: Path, commit: str, timeout: float = IN_FORCE_WAIT) -> str:
    """Wait (at most `timeout` s) for the running control plane to put `commit` in force,
    and say how it went: the printed `tsh login` line then works at once."""
    if not control_plane_running(data_dir):
        return ("The control plane is not running: the change is in force once it starts "
                "(`tctl status` tells).")
    deadline = time.monotonic() + timeout
    while True:
        state = load_state(data_dir / "state.json")
        if state.in_force is not None and state.in_force.commit == commit:
            return f"In force: bundle serial {state.in_force.serial}."
        attempt = state.last_attempt
        if attempt is not None and attempt.commit == commit:
            if attempt.result == "unchanged":
                return "In force (the compiled policy did not change)."
            if attempt.result == "failed":
                return (f"NOT in force: the control plane refused commit {commit[:12]} "
                        f"({attempt.error_count} error(s)); `tctl status` shows them.")
        if time.monotonic() >= deadline:
            return (f"Not in force yet after {timeout:.0f} s (the control plane is busy?); "
                    "`tctl status` tells when it is.")
        time.sleep(0.05)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def run_rm(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    settings = _settings(data_dir)
    repo = _hosted_repo(data_dir, settings, "remove the user from")
    user = branch_users(repo, settings.source.branch).get(args.name)
    if user is None:
        raise UsageError(f"user {args.name!r} is not on the policy branch; `tctl users ls`")
    if not user.alone:
        raise UsageError(
            f"{user.path} defines {args.name!r} together with other resources: remove its "
            "document from that file and push"
        )
    try:
        commit = hosted.commit_files(
            repo, {user.path: None}, f"tctl users rm {args.name}", branch=settings.source.branch,
            warn=_print_warning,
        )
    except hosted.PushRejected as exc:
        print(f"tctl: user {args.name!r} was not removed: the policy repository refused the "
              "change:", file=sys.stderr)
        for line in str(exc).splitlines():
            print(f"  {line}", file=sys.stderr)
        return 1
    SecretsStore(data_dir).remove(args.name)
    print(f"User {args.name!r} removed: {user.path} deleted in commit {commit[:12]}; their "
          "password and second factor are erased. Certificates already issued stop working "
          "once the new policy is in force.")
    print(in_force_note(data_dir, commit))
    return 0


def run_reset(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    settings = _settings(data_dir)
    ttl = _ttl(args.ttl)
    repo = _policy_repo(data_dir, settings)
    if args.name not in branch_users(repo, settings.source.branch):
        raise UsageError(f"user {args.name!r} is not on the policy branch; `tctl users ls`")
    token = SecretsStore(data_dir).reset(args.name, ttl)
    print(f"The password, second factor and lockout of {args.name!r} are cleared.\n")
    print(signup_instructions(args.name, token, ttl, settings, host_ca_pin(data_dir)), end="")
    return 0
