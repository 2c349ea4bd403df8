"""`tctl status`: which commit and serial are in force, how the last attempt went, agents.

Agents and proxies are read from `<data_dir>/run/agents.json`, which the running API writes
from heartbeats (the reconciler alone writes state.json); a file the API has not refreshed
lately, or one left by a control plane that is not running, counts as no agents reporting.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from datetime import datetime
from pathlib import Path

from control.ca import CAError, host_ca_pin
from control.inventory import read_agents
from control.service import control_plane_running, make_source
from control.settings import load_settings
from control.state import load_state
from control.tctl import UsageError, add_data_dir_argument, data_dir_of


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "status",
        help="show the bundle in force and the last policy commit attempted",
        description="Show the cluster, the commit and serial in force, the last commit "
        "attempted and its result (with its first errors), and how many agents run which "
        "bundle serial.",
    )
    add_data_dir_argument(p)
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=run)


def _t(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S %Z") if value else "-"


def run(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    settings = load_settings(data_dir)
    if settings is None:
        raise UsageError(f"{data_dir} has no control.json: it was never used by teleport start")
    state = load_state(data_dir / "state.json")
    running = control_plane_running(data_dir)
    agents = _agents(data_dir, running, state.agents)
    pin = _ca_pin(data_dir)
    if args.format == "json":
        out = state.model_dump(mode="json")
        out["agents"] = agents
        out["running"] = running
        out["source"] = make_source(data_dir, settings).describe()
        out["ca_pin"] = pin
        print(json.dumps(out, indent=2))
        return 0
    print(f"Cluster:        {settings.cluster_name}")
    print(f"Control plane:  {'running' if running else 'not running'} ({data_dir})")
    if pin:
        print(f"CA pin:         {pin}")
    print(f"Policy source:  {make_source(data_dir, settings).describe()}")
    f = state.in_force
    if f is None:
        print("In force:       nothing yet (no valid commit has been published)")
    else:
        print(
            f"In force:       serial {f.serial}, commit {f.commit[:12]}, published "
            f"{_t(f.published_at)}, expires {_t(f.expires_at)}"
        )
    a = state.last_attempt
    if a is None:
        print("Last attempt:   none")
    else:
        what = a.commit[:12] if a.commit else "(no commit)"
        if a.result == "failed":
            print(
                f"Last attempt:   commit {what} at {_t(a.at)}: FAILED with {a.error_count} "
                "error(s); the bundle in force is unchanged"
            )
            for err in a.errors[:10]:
                print(f"                {err}")
        else:
            print(f"Last attempt:   commit {what} at {_t(a.at)}: ready (serial {a.serial})")
        for w in a.warnings[:5]:
            print(f"                warning: {w}")
    if agents:
        counts = Counter(agents.values())
        parts = [f"{n} on serial {s}" for s, n in sorted(counts.items(), reverse=True)]
        print(f"Agents:         {len(agents)} ({', '.join(parts)})")
    else:
        print("Agents:         none reporting")
    return 0


def _agents(data_dir: Path, running: bool, legacy: dict[str, int]) -> dict[str, int]:
    """Host id -> bundle serial of the proxies and agents heartbeating now."""
    current = read_agents(data_dir)
    if current is None:
        return dict(legacy) if running else {}
    if not running or not current.fresh():
        return {}
    return {host_id: entry.serial for host_id, entry in current.agents.items()}


def _ca_pin(data_dir: Path) -> str | None:
    """The host CA's fingerprint: what `teleport start --ca-pin` expects."""
    try:
        return host_ca_pin(data_dir)
    except CAError:
        return None
