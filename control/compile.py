"""Compile a validated policy commit into a `Bundle`.

Everything an agent needs is resolved here so that it does no re-validation: label values
are lists, durations are seconds, names are keys. The same commit always compiles to the
same content; only the serial and the times differ (`Bundle.content_digest` shows it).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from schemas.bundle import (
    Bundle,
    BundleCAs,
    BundleCluster,
    BundleConditions,
    BundleDatabase,
    BundleRole,
    BundleUser,
)
from schemas.durations import parse_duration
from schemas.policy.models import Database, Policy, Role, RoleConditions, User


def _seconds(text: str) -> int:
    return int(parse_duration(text).total_seconds())


def _conditions(c: RoleConditions) -> BundleConditions:
    return BundleConditions(
        db_labels={k: list(v) for k, v in sorted(c.db_labels.items())},
        db_names=list(c.db_names),
        db_users=list(c.db_users),
    )


def compile_role(role: Role) -> BundleRole:
    ttl = role.spec.options.max_session_ttl
    return BundleRole(
        name=role.metadata.name,
        allow=_conditions(role.spec.allow),
        deny=_conditions(role.spec.deny),
        max_session_ttl_seconds=_seconds(ttl) if ttl else None,
    )


def compile_user(user: User) -> BundleUser:
    return BundleUser(
        name=user.metadata.name,
        roles=list(user.spec.roles),
        traits={k: list(v) for k, v in sorted(user.spec.traits.items())},
    )


def compile_database(db: Database) -> BundleDatabase:
    return BundleDatabase(
        name=db.metadata.name,
        description=db.metadata.description,
        labels=dict(sorted(db.metadata.labels.items())),
        protocol=db.spec.protocol,
        uri=db.spec.uri,
        ca_cert_file=db.spec.ca_cert_file,
        aws_region=db.spec.aws.region if db.spec.aws else None,
        tls_mode=db.spec.tls.mode,
    )


def compile_policy(
    policy: Policy,
    *,
    commit: str,
    serial: int,
    issued_at: datetime,
    ttl: timedelta,
    cas: BundleCAs,
) -> Bundle:
    spec = policy.cluster.spec
    return Bundle(
        cluster=BundleCluster(
            name=policy.cluster.name,
            certificate_ttl_seconds=_seconds(spec.certificate_ttl),
            max_session_ttl_seconds=_seconds(spec.max_session_ttl),
            disconnect_expired_cert=spec.disconnect_expired_cert,
        ),
        serial=serial,
        commit=commit,
        issued_at=issued_at,
        expires_at=issued_at + ttl,
        roles={name: compile_role(r) for name, r in sorted(policy.roles.items())},
        users={name: compile_user(u) for name, u in sorted(policy.users.items())},
        databases={name: compile_database(d) for name, d in sorted(policy.databases.items())},
        cas=cas,
    )
