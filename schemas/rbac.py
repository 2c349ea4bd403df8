"""The RBAC decision: may this user reach this database as this db user and db name?

One pure function, `decide`, used everywhere a decision is taken: the db agent enforces it on
every connection (and re-checks live sessions when a new bundle is activated), the control
plane uses it to filter `tsh db ls` and to refuse database certificates early. It reads
only its arguments: no clock, no I/O, no global state.

Semantics (seeds 001 and 003, and where they are silent, the safe choice):
- Effective roles are the roles named in the user's certificate that the user *still has*
  in the bundle in force; a user no longer in the bundle gets nothing. Traits come from the
  bundle, so a push that changes a user takes effect without new certificates.
- Deny rules are checked first and are greedy. A deny block matches a connection when its
  `db_labels` match the database (a deny without `db_labels` applies to every database) and
  either its `db_users` matches the db user or its `db_names` matches the db name. A deny
  block with labels but no users or names denies those databases entirely.
- Otherwise access needs one role whose allow block matches all three: `db_labels` (an
  allow without labels matches no database; `'*': '*'` matches all), `db_users` and
  `db_names`.
- Label selectors: every key must match; a key's values are alternatives. Values (and
  db_users / db_names entries) match literally, or `*` matches anything, a value with `*`
  inside is a glob, a value wrapped in `^...$` is a regular expression matched in full.
- `{{internal.db_users}}`, `{{internal.db_names}}` and `{{external.NAME}}` expand to the
  user's traits `db_users`, `db_names` and `NAME`; text around the braces is kept; a
  template whose trait is missing or empty expands to nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from schemas.bundle import Bundle, BundleConditions, BundleRole, BundleUser

_TEMPLATE = re.compile(r"\{\{\s*(internal|external)\.([A-Za-z_][A-Za-z0-9_-]*)\s*\}\}")


@dataclass(frozen=True)
class AccessRequest:
    """One connection attempt, or one question asked on the user's behalf."""

    username: str
    database: str
    labels: Mapping[str, str]
    db_user: str
    db_name: str
    # Roles carried by the user's certificate; None means "the roles the user has now"
    # (used by the control plane before any certificate exists).
    cert_roles: Sequence[str] | None = None


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    roles: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return self.allowed


@lru_cache(maxsize=4096)
def _compile(pattern: str) -> re.Pattern[str] | None:
    """A matcher for one value: None means literal comparison."""
    if len(pattern) >= 2 and pattern.startswith("^") and pattern.endswith("$"):
        try:
            return re.compile(pattern)
        except re.error:
            # The compiler refuses bundles with a bad regex; if one arrives anyway, match
            # nothing rather than fail open.
            return re.compile(r"(?!)")
    if "*" in pattern:
        return re.compile("^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$")
    return None


def value_matches(pattern: str, value: str) -> bool:
    if pattern == "*":
        return True
    matcher = _compile(pattern)
    if matcher is None:
        return pattern == value
    return matcher.fullmatch(value) is not None


def labels_match(selector: Mapping[str, Sequence[str]], labels: Mapping[str, str]) -> bool:
    """Every key of the selector must match; `'*': ['*']` matches any database."""
    if not selector:
        return False
    for key, patterns in selector.items():
        if key == "*":
            if "*" not in patterns:
                return False
            continue
        value = labels.get(key)
        if value is None or not any(value_matches(p, value) for p in patterns):
            return False
    return True


def expand_templates(values: Iterable[str], traits: Mapping[str, Sequence[str]]) -> list[str]:
    """Replace template variables by the user's traits: one output per combination.

    A single pass: a trait value is never expanded again, so a trait cannot inject a
    template. A trait value holding `*` or `^...$` is matched literally, never as a pattern.
    """
    out: list[str] = []
    for value in values:
        parts = _TEMPLATE.split(value)  # literal, namespace, name, literal, ...
        if len(parts) == 1:
            out.append(value)
            continue
        combos: list[tuple[str, bool]] = [("", False)]
        for i in range(0, len(parts), 3):
            combos = [(text + parts[i], special) for text, special in combos]
            if i + 2 < len(parts):
                trait_values = traits.get(parts[i + 2], ())
                combos = [
                    (text + v, special or is_pattern(v))
                    for text, special in combos
                    for v in trait_values
                ]
        out.extend("^" + re.escape(text) + "$" if special else text for text, special in combos)
    return out


def is_pattern(text: str) -> bool:
    """Whether a value would match as a pattern (`*`, a glob, `^...$`) in a role."""
    return "*" in text or (text.startswith("^") and text.endswith("$"))


def _list_matches(patterns: Sequence[str], value: str, traits: Mapping[str, Sequence[str]]) -> bool:
    return any(value_matches(p, value) for p in expand_templates(patterns, traits))


def _deny_matches(
    deny: BundleConditions, req: AccessRequest, traits: Mapping[str, Sequence[str]]
) -> str | None:
    """Why this deny block blocks the request, or None."""
    if deny.is_empty():
        return None
    if deny.db_labels and not labels_match(deny.db_labels, req.labels):
        return None
    if not deny.db_users and not deny.db_names:
        return f"database {req.database!r} is denied"
    if deny.db_users and _list_matches(deny.db_users, req.db_user, traits):
        return f"db user {req.db_user!r} is denied"
    if deny.db_names and _list_matches(deny.db_names, req.db_name, traits):
        return f"db name {req.db_name!r} is denied"
    return None


def effective_roles(
    bundle: Bundle, username: str, cert_roles: Sequence[str] | None
) -> tuple[BundleUser | None, list[BundleRole], str]:
    """The user's record and the roles in force for them; the string explains an empty list."""
    user = bundle.users.get(username)
    if user is None:
        why = (
            f"user {username!r} is not in the policy in force (commit "
            f"{bundle.commit[:12]}, serial {bundle.serial})"
        )
        return None, [], why
    names = list(user.roles) if cert_roles is None else [r for r in cert_roles if r in user.roles]
    roles = [bundle.roles[n] for n in names if n in bundle.roles]
    if not roles:
        carried = ", ".join(cert_roles or ()) or "none"
        return (
            user,
            [],
            (
                f"none of the roles in the certificate ({carried}) are still assigned to "
                f"{username!r}; run tsh login again"
            ),
        )
    return user, roles, ""


def decide(bundle: Bundle, req: AccessRequest) -> Decision:
    user, roles, why_none = effective_roles(bundle, req.username, req.cert_roles)
    if user is None or not roles:
        return Decision(False, why_none)
    traits = user.traits
    names = tuple(r.name for r in roles)

    for role in roles:
        why = _deny_matches(role.deny, req, traits)
        if why is not None:
            return Decision(False, f"{why} by role {role.name!r}", (role.name,))

    label_matches = [r for r in roles if labels_match(r.allow.db_labels, req.labels)]
    if not label_matches:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(req.labels.items())) or "no labels"
        return Decision(
            False,
            f"no role of {req.username!r} ({', '.join(names)}) allows database "
            f"{req.database!r} (labels: {shown})",
            names,
        )
    user_matches = [
        r for r in label_matches if _list_matches(r.allow.db_users, req.db_user, traits)
    ]
    if not user_matches:
        return Decision(
            False,
            f"db user {req.db_user!r} is not allowed on database {req.database!r} "
            f"(allowed: {_allowed(label_matches, 'db_users', traits)})",
            names,
        )
    for role in user_matches:
        if _list_matches(role.allow.db_names, req.db_name, traits):
            return Decision(
                True,
                f"role {role.name!r} allows db user {req.db_user!r} and db name "
                f"{req.db_name!r} on database {req.database!r}",
                (role.name,),
            )
    return Decision(
        False,
        f"db name {req.db_name!r} is not allowed on database {req.database!r} for db user "
        f"{req.db_user!r} (allowed: {_allowed(user_matches, 'db_names', traits)})",
        names,
    )


def _allowed(
    roles: Sequence[BundleRole], field_name: str, traits: Mapping[str, Sequence[str]]
) -> str:
    values: list[str] = []
    for role in roles:
        for v in expand_templates(getattr(role.allow, field_name), traits):
            if v not in values:
                values.append(v)
    return ", ".join(values) if values else "none"


def database_visible(
    bundle: Bundle,
    username: str,
    cert_roles: Sequence[str] | None,
    database: str,
    labels: Mapping[str, str],
) -> bool:
    """Whether `tsh db ls` shows the database: some role's allow labels match it and no
    deny block shuts the whole database off."""
    user, roles, _ = effective_roles(bundle, username, cert_roles)
    if user is None or not roles:
        return False
    for role in roles:
        deny = role.deny
        if (
            deny.db_labels
            and not deny.db_users
            and not deny.db_names
            and labels_match(deny.db_labels, labels)
        ):
            return False
    return any(labels_match(r.allow.db_labels, labels) for r in roles)


def allowed_values(
    bundle: Bundle,
    username: str,
    cert_roles: Sequence[str] | None,
    labels: Mapping[str, str],
    field_name: str,
) -> list[str]:
    """The db_users or db_names a user's roles allow on a database (templates expanded),
    for showing defaults and suggestions; the decision itself is always `decide`."""
    user, roles, _ = effective_roles(bundle, username, cert_roles)
    if user is None:
        return []
    matching = [r for r in roles if labels_match(r.allow.db_labels, labels)]
    return [v for v in _allowed(matching, field_name, user.traits).split(", ") if v != "none"]


def max_session_ttl_seconds(bundle: Bundle, roles: Iterable[str]) -> int:
    """The smallest of the roles' max_session_ttl and the cluster maximum."""
    limits = [bundle.cluster.max_session_ttl_seconds]
    for name in roles:
        role = bundle.roles.get(name)
        if role is not None and role.max_session_ttl_seconds:
            limits.append(role.max_session_ttl_seconds)
    return min(limits)
