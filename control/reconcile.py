"""One reconcile: from the policy branch's commit to a signed, published bundle.

resolve the branch -> read the commit's tree -> lint -> compile -> sign -> publish.

A commit that fails lint never takes access away: the last good bundle stays in force and
the failure is recorded with its errors. A bundle nearing its expiry is re-signed with a new
serial (same content), so agents never freeze on an old one and never accept a rollback.
Reconciles are serialized across processes by a lock file, so `tctl reconcile` and a running
control plane never publish two bundles with one serial.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Protocol

import git
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from control.bundles import BundleStore
from control.compile import compile_policy
from control.gitsource import read_policy_files
from control.state import MAX_ERRORS, Attempt, InForce, ReconcileState, load_state, save_state
from schemas.bundle import (
    Bundle,
    BundleCAs,
    key_id,
    sign_bundle,
    verify_bundle,
    verify_bundle_signature,
)
from schemas.policy.loader import load_policy
from schemas.policy.models import Policy
from transport.files import exclusive_lock

log = logging.getLogger("teleport.control.reconcile")

DEFAULT_BUNDLE_TTL = timedelta(hours=24)


class PolicySource(Protocol):
    """Where the policy lives: a repository on this host and the branch that is policy."""

    repo_path: Path
    branch: str

    def refresh(self) -> None:
        """Bring the local repository up to date (fetch, for a remote); may raise."""


class SourceError(Exception):
    """The policy branch cannot be resolved; the message says what to check."""


def resolve_branch(repo_path: Path, branch: str) -> str:
    """The commit the policy branch points at. Opens and closes the repository."""
    try:
        with git.Repo(repo_path) as repo:
            return repo.commit(f"refs/heads/{branch}").hexsha
    except (git.NoSuchPathError, git.InvalidGitRepositoryError):
        raise SourceError(f"{repo_path} is not a git repository") from None
    except (git.BadName, ValueError, git.GitCommandError):
        raise SourceError(
            f"branch {branch!r} does not exist in {repo_path} yet (push a commit to it)"
        ) from None


@dataclass
class Evaluation:
    """What lint says of one commit, exactly as the pre-receive hook and reconcile see it."""

    commit: str
    policy: Policy | None
    errors: list[str]
    warnings: list[str]


def evaluate_commit(repo_path: Path, commit: str, cluster_name: str | None) -> Evaluation:
    snapshot = read_policy_files(repo_path, commit)
    result = load_policy(snapshot.files, unread=[p.path for p in snapshot.problems])
    problems = [*snapshot.problems, *result.problems]
    errors = [str(p) for p in problems if p.severity == "error"]
    warnings = [str(p) for p in problems if p.severity == "warning"]
    policy = result.policy
    if policy is not None and cluster_name and policy.cluster.name != cluster_name:
        errors.append(
            f"cluster.yaml: cluster/{policy.cluster.name}: metadata.name: this control "
            f"plane serves cluster {cluster_name!r}; the cluster name cannot change"
        )
    return Evaluation(snapshot.commit, None if errors else policy, errors, warnings)


@dataclass
class Outcome:
    result: str  # "published", "resigned", "unchanged", "failed"
    commit: str | None = None
    serial: int | None = None
    errors: list[str] | None = None

    def __str__(self) -> str:
        parts = [self.result]
        if self.commit:
            parts.append(f"commit {self.commit[:12]}")
        if self.serial:
            parts.append(f"serial {self.serial}")
        if self.errors:
            parts.append(f"{len(self.errors)} error(s): {self.errors[0]}")
        return ", ".join(parts)


class Reconciler:
    def __init__(
        self,
        data_dir: Path,
        source: PolicySource,
        signing_key: Ed25519PrivateKey,
        cluster_name: str,
        cas: Callable[[], BundleCAs],
        bundle_ttl: timedelta = DEFAULT_BUNDLE_TTL,
        on_publish: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.source = source
        self.key = signing_key
        self.cluster_name = cluster_name
        self.cas = cas
        self.bundle_ttl = bundle_ttl
        self.on_publish = on_publish
        self.store = BundleStore(self.data_dir / "bundles")
        self.state_path = self.data_dir / "state.json"

    # -- public ----------------------------------------------------------------------

    def state(self) -> ReconcileState:
        return load_state(self.state_path)

    def run_once(self, *, force: bool = False, now: datetime | None = None) -> Outcome:
        now = now or datetime.now(UTC)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self.data_dir / "reconcile.lock"):
            state = load_state(self.state_path)
            state.cluster = self.cluster_name
            try:
                self.source.refresh()
                commit = resolve_branch(self.source.repo_path, self.source.branch)
            except SourceError as exc:
                outcome = self._fail(state, "", [str(exc)], now)
                save_state(self.state_path, state)
                return outcome

            in_force = state.in_force
            if not force and in_force is not None and in_force.commit == commit:
                if now >= self._resign_at(in_force):
                    outcome = self._resign(state, now)
                else:
                    outcome = Outcome("unchanged", commit, in_force.serial)
                save_state(self.state_path, state)
                return outcome
            last = state.last_attempt
            if not force and last is not None and last.commit == commit and last.result == "failed":
                # Already recorded; the last good bundle stays, but must not expire.
                if in_force is not None and now >= self._resign_at(in_force):
                    outcome = self._resign(state, now)
                    save_state(self.state_path, state)
                    return outcome
                return Outcome("failed", commit, errors=last.errors)

            outcome = self._build(state, commit, now)
            save_state(self.state_path, state)
            return outcome

    def current_bundle(self) -> Bundle | None:
        """The bundle in force, verified with our own key (what agents will see)."""
        data = self.store.read_current()
        if data is None:
            return None
        pub = self.key.public_key()
        return verify_bundle(data, {key_id(pub): pub}, self.cluster_name, 0, datetime.now(UTC))

    # -- steps -----------------------------------------------------------------------

    def _build(self, state: ReconcileState, commit: str, now: datetime) -> Outcome:
        evaluation = evaluate_commit(self.source.repo_path, commit, self.cluster_name)
        errors, warnings, policy = evaluation.errors, evaluation.warnings, evaluation.policy
        if errors or policy is None:
            log.warning(
                "commit %s refused: %d error(s); bundle in force stays (serial %s). First: %s",
                commit[:12],
                len(errors),
                state.in_force.serial if state.in_force else "none",
                errors[0] if errors else "no policy",
            )
            return self._fail(state, commit, errors, now, warnings)
        serial = state.last_serial + 1
        bundle = compile_policy(
            policy, commit=commit, serial=serial, issued_at=now, ttl=self.bundle_ttl, cas=self.cas()
        )
        self._publish(state, bundle, now)
        state.record(
            Attempt(
                commit=commit,
                at=now,
                result="ready",
                serial=serial,
                warnings=warnings[:MAX_ERRORS],
            )
        )
        log.info("published serial %d from commit %s", serial, commit[:12])
        return Outcome("published", commit, serial)

    def _resign(self, state: ReconcileState, now: datetime) -> Outcome:
        current = self.current_bundle_unchecked()
        if current is None:
            return Outcome("unchanged")
        serial = state.last_serial + 1
        bundle = current.model_copy(
            update={
                "serial": serial,
                "issued_at": now,
                "expires_at": now + self.bundle_ttl,
                "cas": self.cas(),
            }
        )
        self._publish(state, bundle, now)
        log.info("re-signed commit %s as serial %d before expiry", bundle.commit[:12], serial)
        return Outcome("resigned", bundle.commit, serial)

    def current_bundle_unchecked(self) -> Bundle | None:
        """The bundle in force regardless of its expiry (for re-signing its content)."""
        data = self.store.read_current()
        if data is None:
            return None
        pub = self.key.public_key()
        return verify_bundle_signature(data, {key_id(pub): pub}, self.cluster_name)

    def _publish(self, state: ReconcileState, bundle: Bundle, now: datetime) -> None:
        data = sign_bundle(bundle, self.key)
        self.store.publish(bundle.serial, data)
        state.last_serial = bundle.serial
        state.in_force = InForce(
            serial=bundle.serial,
            commit=bundle.commit,
            published_at=now,
            expires_at=bundle.expires_at,
            digest=bundle.content_digest(),
        )
        if self.on_publish is not None:
            self.on_publish(bundle.serial, data)

    def _fail(
        self,
        state: ReconcileState,
        commit: str,
        errors: list[str],
        now: datetime,
        warnings: list[str] | None = None,
    ) -> Outcome:
        state.record(
            Attempt(
                commit=commit,
                at=now,
                result="failed",
                errors=errors[:MAX_ERRORS],
                error_count=len(errors),
                warnings=(warnings or [])[:MAX_ERRORS],
            )
        )
        return Outcome("failed", commit or None, errors=errors)

    def _resign_at(self, in_force: InForce) -> datetime:
        # Re-sign at half-life: agents keep a valid bundle through a long control-plane outage.
        return in_force.expires_at - self.bundle_ttl / 2
