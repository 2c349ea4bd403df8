"""`tctl reconcile`: compile and publish the policy branch now, instead of on the next push."""

from __future__ import annotations

import argparse
import json
import secrets
import time

from control.service import control_plane_running, make_reconciler
from control.settings import load_settings
from control.tctl import UsageError, add_data_dir_argument, data_dir_of
from control.watch import DONE_FILE, request_path
from transport.files import write_atomic

WAIT_S = 60.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reconcile",
        help="read the policy branch and publish a bundle now",
        description="Force a reconcile: read the policy branch's newest commit, lint it, and "
        "publish a new bundle if it is valid (the last good bundle stays otherwise). With a "
        "running control plane the request goes to it; without one, tctl does it itself.",
    )
    add_data_dir_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    data_dir = data_dir_of(args)
    settings = load_settings(data_dir)
    if settings is None:
        raise UsageError(f"{data_dir} has no control.json: it was never used by teleport start")
    if control_plane_running(data_dir):
        outcome = _ask_running(data_dir)
    else:
        outcome = str(make_reconciler(data_dir, settings).run_once(force=True))
    print(f"reconcile: {outcome}")
    return 1 if outcome.startswith(("failed", "error")) else 0


def _ask_running(data_dir) -> str:  # type: ignore[no-untyped-def]
    req = request_path(data_dir)
    done = req.parent / DONE_FILE
    nonce = secrets.token_hex(8)
    write_atomic(req, nonce.encode())
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if done.exists():
            try:
                answer = json.loads(done.read_text())
            except ValueError:
                answer = {}
            if answer.get("nonce") == nonce:
                return str(answer.get("outcome"))
        time.sleep(0.05)
    raise UsageError(f"the control plane did not answer within {WAIT_S:.0f}s; see its log")
