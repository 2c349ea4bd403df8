"""What the control plane knows about its reconciles, kept in `<data_dir>/state.json`.

`tctl status` reads it; the reconciler is its only writer. It names the bundle in force (its
serial and commit), the last commit attempted and how that went (with its first errors), and
the highest serial ever issued, so that serials only grow, across restarts too.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from transport.files import write_atomic

HISTORY = 50
MAX_ERRORS = 20


class Attempt(BaseModel):
    commit: str
    at: datetime
    result: Literal["ready", "failed", "unchanged"]
    errors: list[str] = Field(default_factory=list)
    error_count: int = 0
    warnings: list[str] = Field(default_factory=list)
    serial: int | None = None


class InForce(BaseModel):
    serial: int
    commit: str
    published_at: datetime
    expires_at: datetime
    digest: str


class ReconcileState(BaseModel):
    cluster: str | None = None
    last_serial: int = 0
    in_force: InForce | None = None
    last_attempt: Attempt | None = None
    history: list[Attempt] = Field(default_factory=list)
    # Agents and proxies report which serial they run; the API refreshes this.
    agents: dict[str, int] = Field(default_factory=dict)

    def record(self, attempt: Attempt) -> None:
        self.last_attempt = attempt
        self.history = [*self.history, attempt][-HISTORY:]


def load_state(path: Path) -> ReconcileState:
    if not path.exists():
        return ReconcileState()
    return ReconcileState.model_validate_json(path.read_bytes())


def save_state(path: Path, state: ReconcileState) -> None:
    write_atomic(path, state.model_dump_json(indent=1).encode() + b"\n")
