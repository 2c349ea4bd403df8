"""`tctl bundle show|diff|verify`: look at published bundles, compare them, check a file."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path

from control.bundle_diff import describe_bundle, diff_bundles
from control.bundles import BundleStore
from control.settings import load_settings
from control.signing import KEY_PATH, SigningKeyError, load_signing_key
from control.state import load_state
from control.tctl import UsageError, add_data_dir_argument, data_dir_of
from schemas.bundle import (
    Bundle,
    BundleRejected,
    key_id,
    public_key_from_b64,
    verify_bundle,
    verify_bundle_signature,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bundle",
        help="show, compare or verify signed policy bundles",
        description="Inspect the signed bundles the control plane publishes.",
    )
    bsub = p.add_subparsers(dest="bundle_command", metavar="ACTION", required=True)

    show = bsub.add_parser(
        "show",
        help="print a published bundle readably",
        description="Print a published bundle (the one in force unless --serial is given).",
    )
    add_data_dir_argument(show)
    show.add_argument("--serial", type=int, help="serial of a kept bundle")
    show.add_argument("--format", choices=["text", "json"], default="text")
    show.set_defaults(func=run_show)

    diff = bsub.add_parser(
        "diff",
        help="show what changed in access terms between two serials",
        description="Compare two kept bundles: roles, users, databases and cluster settings "
        "that changed, and which users gain or lose reach to which databases.",
    )
    add_data_dir_argument(diff)
    diff.add_argument("a", type=int, metavar="A", help="older serial")
    diff.add_argument("b", type=int, metavar="B", help="newer serial")
    diff.set_defaults(func=run_diff)

    verify = bsub.add_parser(
        "verify",
        help="verify a bundle file offline",
        description="Verify a bundle file as an agent would: signature, key id, cluster, "
        "serial and expiry. Exit 0 when valid, 1 when refused (the reason is printed).",
    )
    verify.add_argument("file", type=Path, metavar="FILE")
    add_data_dir_argument(verify)
    verify.add_argument(
        "--key",
        metavar="BASE64",
        help="the bundle verification public key (base64 of the raw 32 bytes); "
        "default: the data dir's signing key",
    )
    verify.add_argument("--cluster", help="expected cluster (default: the data dir's)")
    verify.add_argument(
        "--min-serial", type=int, default=0, help="refuse serials lower than this (rollback)"
    )
    verify.set_defaults(func=run_verify)


def store_and_key(args: argparse.Namespace) -> tuple[BundleStore, dict, str]:
    data_dir = data_dir_of(args)
    settings = load_settings(data_dir)
    if settings is None:
        raise UsageError(f"{data_dir} has no control.json: it was never used by teleport start")
    try:
        pub = load_signing_key(data_dir / KEY_PATH).public_key()
    except (OSError, SigningKeyError) as exc:
        raise UsageError(str(exc)) from None
    return BundleStore(data_dir / "bundles"), {key_id(pub): pub}, settings.cluster_name


def load_kept(store: BundleStore, keys: dict, cluster: str, serial: int) -> Bundle:
    try:
        data = store.read(serial)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    try:  # kept bundles may have expired: show them anyway, signature checked
        return verify_bundle_signature(data, keys, cluster)
    except BundleRejected as exc:
        raise UsageError(f"bundle serial {serial} does not verify: {exc}") from None


def run_show(args: argparse.Namespace) -> int:
    store, keys, cluster = store_and_key(args)
    serial = args.serial
    if serial is None:
        in_force = load_state(data_dir_of(args) / "state.json").in_force
        if in_force is None:
            raise UsageError("no bundle has been published yet")
        serial = in_force.serial
    bundle = load_kept(store, keys, cluster, serial)
    if args.format == "json":
        print(json.dumps(bundle.model_dump(mode="json"), indent=2, sort_keys=True))
    else:
        print("\n".join(describe_bundle(bundle, next(iter(keys)))))
    return 0


def run_diff(args: argparse.Namespace) -> int:
    store, keys, cluster = store_and_key(args)
    old = load_kept(store, keys, cluster, args.a)
    new = load_kept(store, keys, cluster, args.b)
    print("\n".join(diff_bundles(old, new)))
    return 0


def run_verify(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {args.file}: {exc.strerror}") from None
    if args.key:
        try:
            pub = public_key_from_b64(args.key)
        except ValueError as exc:
            raise UsageError(f"--key is not a base64 Ed25519 public key: {exc}") from None
        keys = {key_id(pub): pub}
    else:
        _, keys, _ = store_and_key(args)
    cluster = args.cluster
    if cluster is None:
        settings = load_settings(data_dir_of(args, must_exist=False))
        if settings is None:
            raise UsageError("say which cluster the bundle must be for: --cluster NAME")
        cluster = settings.cluster_name
    try:
        bundle = verify_bundle(data, keys, cluster, args.min_serial, datetime.now(UTC))
    except BundleRejected as exc:
        print(f"REFUSED ({exc.reason}): {exc}")
        return 1
    print(
        f"OK: bundle serial {bundle.serial} of cluster {bundle.cluster.name}, commit "
        f"{bundle.commit[:12]}, signed by key {next(iter(keys))}, expires "
        f"{bundle.expires_at.isoformat()}"
    )
    return 0
