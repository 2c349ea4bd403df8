"""`tctl status`: which commit and serial are in force, how the last attempt went, agents."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from datetime import datetime

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
    if args.format == "json":
        out = state.model_dump(mode="json")
        out["running"] = running
        out["source"] = make_source(data_dir, settings).describe()
        print(json.dumps(out, indent=2))
        return 0
    print(f"Cluster:        {settings.cluster_name}")
    print(f"Control plane:  {'running' if running else 'not running'} ({data_dir})")
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
    if state.agents:
        counts = Counter(state.agents.values())
        parts = [f"{n} on serial {s}" for s, n in sorted(counts.items(), reverse=True)]
        print(f"Agents:         {len(state.agents)} ({', '.join(parts)})")
    else:
        print("Agents:         none reporting")
    return 0
