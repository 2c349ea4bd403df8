"""The hosts that heartbeat: proxies and db agents, what they serve, which bundle they run.

The API records each heartbeat here (host id, role, bundle serial, the databases a db agent
serves with their labels, static and dynamic, as the agent computes them, and the addresses
a proxy is reached at). A host that misses `missed` heartbeats in a row (3 x 10 s by
default) is forgotten: its databases disappear from `tsh db ls` and its addresses from the
tunnel list.

The databases people see are the ones an agent serves, with that agent's labels; when
several agents serve one database, each agent's labels are kept apart, so that an RBAC check
can be made against each of them (an agent enforces its own labels again anyway).

For `tctl status` the inventory is written to `<data_dir>/run/agents.json` (only the
reconciler writes state.json) whenever a host joins, leaves or changes serial, and at least
once per heartbeat interval so readers can tell a fresh file from a stale one.

Kept in memory. A restarted control plane takes back the hosts of the last agents.json
(`restore`) as if each had just heartbeated: they get one forget window to heartbeat again.
Without that, the first heartbeats after a restart would be answered with no proxies (the
proxies' own beats come up to one interval later), and agents would drop their tunnels.
Never holds secrets.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from schemas.api import DatabaseInfo, Heartbeat
from transport.files import write_atomic

AGENTS_FILE = Path("run") / "agents.json"
DEFAULT_INTERVAL = timedelta(seconds=10)
DEFAULT_MISSED = 3
MAX_HOSTS = 10000


@dataclass
class HostRecord:
    host_id: str
    role: str
    serial: int
    databases: list[DatabaseInfo]
    public_addr: str | None
    tunnel_addr: str | None
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class ServedDatabase:
    """One database as one agent serves it."""

    host_id: str
    info: DatabaseInfo
    last_seen: datetime


class InventoryFull(Exception):
    """More hosts than MAX_HOSTS heartbeat; the new one is refused."""


@dataclass
class Inventory:
    interval: timedelta = DEFAULT_INTERVAL
    missed: int = DEFAULT_MISSED
    _hosts: dict[str, HostRecord] = field(default_factory=dict)
    dirty: bool = False

    @property
    def forget_after(self) -> timedelta:
        return self.interval * self.missed

    def heartbeat(self, beat: Heartbeat, now: datetime) -> None:
        record = self._hosts.get(beat.host_id)
        if record is None:
            if len(self._hosts) >= MAX_HOSTS:
                self.expire(now)
                if len(self._hosts) >= MAX_HOSTS:
                    raise InventoryFull(
                        f"the control plane already tracks {MAX_HOSTS} hosts; retire some"
                    )
            self._hosts[beat.host_id] = HostRecord(
                beat.host_id,
                beat.role,
                beat.serial,
                list(beat.databases),
                beat.public_addr,
                beat.tunnel_addr,
                now,
                now,
            )
            self.dirty = True
            return
        if record.serial != beat.serial or record.role != beat.role:
            self.dirty = True
        record.role = beat.role
        record.serial = beat.serial
        record.databases = list(beat.databases)
        record.public_addr = beat.public_addr
        record.tunnel_addr = beat.tunnel_addr
        record.last_seen = now

    def restore(self, written: AgentsFile, now: datetime) -> int:
        """Take back the hosts of agents.json as written by an earlier run, each as if it
        had heartbeated at `now` (a host already heard from is kept as it is). Returns how
        many were taken back."""
        restored = 0
        for host_id, entry in written.agents.items():
            if host_id in self._hosts or len(self._hosts) >= MAX_HOSTS:
                continue
            self._hosts[host_id] = HostRecord(
                host_id,
                entry.role,
                entry.serial,
                list(entry.served),
                entry.public_addr,
                entry.tunnel_addr,
                entry.last_seen,
                now,
            )
            restored += 1
        if restored:
            self.dirty = True
        return restored

    def expire(self, now: datetime) -> list[str]:
        """Forget hosts that missed `missed` heartbeats; their ids."""
        gone = [h for h, r in self._hosts.items() if now - r.last_seen > self.forget_after]
        for host_id in gone:
            del self._hosts[host_id]
        if gone:
            self.dirty = True
        return gone

    def hosts(self, now: datetime) -> list[HostRecord]:
        return sorted(
            (r for r in self._hosts.values() if now - r.last_seen <= self.forget_after),
            key=lambda r: r.host_id,
        )

    def get(self, host_id: str, now: datetime) -> HostRecord | None:
        record = self._hosts.get(host_id)
        if record is None or now - record.last_seen > self.forget_after:
            return None
        return record

    def databases(self, now: datetime) -> dict[str, list[ServedDatabase]]:
        """Database name -> each agent that serves it (most recently seen first)."""
        out: dict[str, list[ServedDatabase]] = {}
        for record in self.hosts(now):
            if record.role != "db":
                continue
            for info in record.databases:
                out.setdefault(info.name, []).append(
                    ServedDatabase(record.host_id, info, record.last_seen)
                )
        for served in out.values():
            served.sort(key=lambda s: s.last_seen, reverse=True)
        return dict(sorted(out.items()))

    def proxy_addrs(self, now: datetime) -> list[str]:
        return _unique(r.public_addr for r in self.hosts(now) if r.role == "proxy")

    def tunnel_addrs(self, now: datetime) -> list[str]:
        return _unique(r.tunnel_addr for r in self.hosts(now) if r.role == "proxy")


def _unique(values: Iterable[str | None]) -> list[str]:
    out: list[str] = []
    for v in values:
        if v and v not in out:
            out.append(v)
    return out


# --- run/agents.json ------------------------------------------------------------------------


class AgentEntry(BaseModel):
    role: str
    serial: int
    last_seen: datetime
    databases: list[str] = Field(default_factory=list)
    # What a restarted control plane needs to answer as before (`Inventory.restore`).
    public_addr: str | None = None
    tunnel_addr: str | None = None
    served: list[DatabaseInfo] = Field(default_factory=list)


class AgentsFile(BaseModel):
    written_at: datetime
    heartbeat_interval_seconds: float
    missed: int
    agents: dict[str, AgentEntry] = Field(default_factory=dict)

    def fresh(self, now: datetime | None = None) -> bool:
        """Whether the writer was alive recently enough for the list to be believed."""
        now = now or datetime.now(UTC)
        limit = timedelta(seconds=self.heartbeat_interval_seconds * self.missed)
        return now - self.written_at <= limit


def write_agents(data_dir: Path, inventory: Inventory, now: datetime) -> None:
    body = AgentsFile(
        written_at=now,
        heartbeat_interval_seconds=inventory.interval.total_seconds(),
        missed=inventory.missed,
        agents={
            r.host_id: AgentEntry(
                role=r.role,
                serial=r.serial,
                last_seen=r.last_seen,
                databases=[d.name for d in r.databases],
                public_addr=r.public_addr,
                tunnel_addr=r.tunnel_addr,
                served=list(r.databases),
            )
            for r in inventory.hosts(now)
        },
    )
    path = Path(data_dir) / AGENTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, body.model_dump_json(indent=1).encode() + b"\n")
    inventory.dirty = False


def read_agents(data_dir: Path) -> AgentsFile | None:
    """The last inventory written, or None (no file, or unreadable)."""
    path = Path(data_dir) / AGENTS_FILE
    try:
        return AgentsFile.model_validate_json(path.read_bytes())
    except (FileNotFoundError, ValidationError, ValueError):
        return None
