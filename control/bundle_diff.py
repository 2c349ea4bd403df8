"""What changed between two bundles, said in access terms, and a readable bundle listing.

Used by `tctl bundle diff A B` and `tctl bundle show`. Serial and times are left out of the
diff: they change on every re-sign while access stays the same.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from schemas.bundle import Bundle, BundleConditions, BundleDatabase, BundleRole, BundleUser
from schemas.durations import format_duration
from schemas.rbac import labels_match


def _fmt_labels(labels: Mapping[str, Any]) -> str:
    parts = []
    for k, v in sorted(labels.items()):
        value = ",".join(v) if isinstance(v, list) else str(v)
        parts.append(f"{k}={value}")
    return " ".join(parts) or "(none)"


def _list_change(name: str, old: Sequence[str], new: Sequence[str]) -> list[str]:
    added = [x for x in new if x not in old]
    removed = [x for x in old if x not in new]
    out = []
    if added:
        out.append(f"{name}: added {', '.join(repr(x) for x in added)}")
    if removed:
        out.append(f"{name}: removed {', '.join(repr(x) for x in removed)}")
    return out


def _conditions_change(prefix: str, old: BundleConditions, new: BundleConditions) -> list[str]:
    out = []
    if old.db_labels != new.db_labels:
        out.append(
            f"{prefix}.db_labels: {_fmt_labels(old.db_labels)} -> {_fmt_labels(new.db_labels)}"
        )
    out += _list_change(f"{prefix}.db_users", old.db_users, new.db_users)
    out += _list_change(f"{prefix}.db_names", old.db_names, new.db_names)
    return out


def _role_change(old: BundleRole, new: BundleRole) -> list[str]:
    out = _conditions_change("allow", old.allow, new.allow)
    out += _conditions_change("deny", old.deny, new.deny)
    if old.max_session_ttl_seconds != new.max_session_ttl_seconds:
        out.append(
            f"max_session_ttl: {_ttl(old.max_session_ttl_seconds)} -> "
            f"{_ttl(new.max_session_ttl_seconds)}"
        )
    return out


def _user_change(old: BundleUser, new: BundleUser) -> list[str]:
    out = _list_change("roles", old.roles, new.roles)
    for trait in sorted(set(old.traits) | set(new.traits)):
        out += _list_change(f"traits.{trait}", old.traits.get(trait, []), new.traits.get(trait, []))
    return out


def _db_change(old: BundleDatabase, new: BundleDatabase) -> list[str]:
    out = []
    for field in ("uri", "protocol", "aws_region", "ca_cert_file", "tls_mode", "description"):
        a, b = getattr(old, field), getattr(new, field)
        if a != b:
            out.append(f"{field}: {a!r} -> {b!r}")
    if old.labels != new.labels:
        out.append(f"labels: {_fmt_labels(old.labels)} -> {_fmt_labels(new.labels)}")
    return out


def _ttl(seconds: int | None) -> str:
    return format_duration(timedelta(seconds=seconds)) if seconds else "(cluster default)"


def _section(
    title: str, kind: str, old: Mapping[str, Any], new: Mapping[str, Any], fn
) -> list[str]:
    lines: list[str] = []
    for name in sorted(set(old) | set(new)):
        if name not in old:
            lines.append(f"  + {kind}/{name} (new)")
        elif name not in new:
            lines.append(f"  - {kind}/{name} (removed)")
        else:
            changes = fn(old[name], new[name])
            if changes:
                lines.append(f"  ~ {kind}/{name}")
                lines.extend(f"      {c}" for c in changes)
    return [f"{title}:", *lines] if lines else []


def _reach(bundle: Bundle) -> dict[str, set[str]]:
    """For each user, the databases their roles' allow labels select (for the summary)."""
    out: dict[str, set[str]] = {}
    for user in bundle.users.values():
        roles = [bundle.roles[r] for r in user.roles if r in bundle.roles]
        out[user.name] = {
            db.name
            for db in bundle.databases.values()
            if any(labels_match(r.allow.db_labels, db.labels) for r in roles)
        }
    return out


def diff_bundles(old: Bundle, new: Bundle) -> list[str]:
    lines = [
        f"serial {old.serial} (commit {old.commit[:12]}) -> serial {new.serial} "
        f"(commit {new.commit[:12]})"
    ]
    body: list[str] = []
    cluster_changes = []
    for field in ("certificate_ttl_seconds", "max_session_ttl_seconds"):
        a, b = getattr(old.cluster, field), getattr(new.cluster, field)
        if a != b:
            cluster_changes.append(f"{field.removesuffix('_seconds')}: {_ttl(a)} -> {_ttl(b)}")
    if old.cluster.disconnect_expired_cert != new.cluster.disconnect_expired_cert:
        cluster_changes.append(
            f"disconnect_expired_cert: {old.cluster.disconnect_expired_cert} -> "
            f"{new.cluster.disconnect_expired_cert}"
        )
    if cluster_changes:
        body += ["Cluster:", *(f"  ~ {c}" for c in cluster_changes)]
    body += _section("Roles", "role", old.roles, new.roles, _role_change)
    body += _section("Users", "user", old.users, new.users, _user_change)
    body += _section("Databases", "db", old.databases, new.databases, _db_change)
    if old.cas != new.cas:
        body.append("Certificate authorities: changed (rotation)")

    before, after = _reach(old), _reach(new)
    reach: list[str] = []
    for user in sorted(set(before) | set(after)):
        gained = sorted(after.get(user, set()) - before.get(user, set()))
        lost = sorted(before.get(user, set()) - after.get(user, set()))
        if gained:
            reach.append(f"  {user} can now reach: {', '.join(gained)}")
        if lost:
            reach.append(f"  {user} can no longer reach: {', '.join(lost)}")
    if reach:
        body += ["Reach (databases in the bundle selected by each user's roles):", *reach]
    if not body:
        body = ["No access changes (same policy; re-signed)."]
    return lines + body


def _conditions_lines(kind: str, c: BundleConditions) -> Iterable[str]:
    if c.is_empty():
        return []
    return [
        f"    {kind}:",
        f"      db_labels: {_fmt_labels(c.db_labels)}",
        f"      db_users:  {', '.join(c.db_users) or '(none)'}",
        f"      db_names:  {', '.join(c.db_names) or '(none)'}",
    ]


def describe_bundle(bundle: Bundle, key_id: str | None = None) -> list[str]:
    c = bundle.cluster
    lines = [
        f"Cluster:    {c.name}",
        f"Serial:     {bundle.serial}",
        f"Commit:     {bundle.commit}",
        f"Issued:     {bundle.issued_at.isoformat()}",
        f"Expires:    {bundle.expires_at.isoformat()}",
    ]
    if key_id:
        lines.append(f"Signed by:  key {key_id}")
    lines += [
        f"Settings:   certificate_ttl {_ttl(c.certificate_ttl_seconds)}, max_session_ttl "
        f"{_ttl(c.max_session_ttl_seconds)}, disconnect_expired_cert "
        f"{str(c.disconnect_expired_cert).lower()}",
        "",
        f"Roles ({len(bundle.roles)}):",
    ]
    for role in bundle.roles.values():
        ttl = f" (max_session_ttl {_ttl(role.max_session_ttl_seconds)})"
        lines.append(f"  {role.name}{ttl if role.max_session_ttl_seconds else ''}")
        lines += _conditions_lines("allow", role.allow)
        lines += _conditions_lines("deny", role.deny)
    lines += ["", f"Users ({len(bundle.users)}):"]
    for user in bundle.users.values():
        traits = "; ".join(f"{k}={','.join(v)}" for k, v in user.traits.items())
        lines.append(
            f"  {user.name}: roles {', '.join(user.roles)}" + (f"; {traits}" if traits else "")
        )
    lines += ["", f"Databases ({len(bundle.databases)}):"]
    for db in bundle.databases.values():
        extra = f", aws region {db.aws_region}" if db.aws_region else ""
        lines.append(f"  {db.name}: {db.protocol} {db.uri}{extra}; labels {_fmt_labels(db.labels)}")
    lines += [
        "",
        f"CAs: user {len(bundle.cas.user)}, host {len(bundle.cas.host)}, db {len(bundle.cas.db)}",
    ]
    return lines
