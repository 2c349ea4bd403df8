"""`tctl db iam-policy`: the IAM policy an agent's AWS identity needs for an RDS/Aurora database.

    tctl db iam-policy NAME [--account-id ID] [--resource-id ID] [--region REGION]
                            [--data-dir DIR]

Prints seed 001's policy (Allow `rds-db:connect` on
`arn:<partition>:rds-db:<region>:<account-id>:dbuser:<resource-id>/*`) as JSON on stdout,
ready for `aws iam create-policy --policy-document file://...`. The region is the
database's `spec.aws.region` in the bundle in force; `--region` gives it for a database
that only an agent's teleport.yaml or `--db-aws-region` defines. `<account-id>` and
`<resource-id>` stay placeholders unless given; what is left to fill in is said on stderr,
so stdout is always exactly the JSON document.

Exit codes: 0 printed; 1 the database or its region is wrong (not in the bundle, no AWS
region, a region AWS does not have, `--region` contradicting the bundle); 2 usage and I/O.
Reads the data dir only; never contacts AWS.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from control.state import load_state
from control.tctl import UsageError, add_data_dir_argument, data_dir_of
from control.tctl.bundle_cmd import load_kept, store_and_key
from schemas.bundle import Bundle
from schemas.policy.models import AWS_REGION_RE
from transport.aws_regions import partition_of, rds_regions

ACCOUNT_PLACEHOLDER = "<account-id>"
RESOURCE_PLACEHOLDER = "<resource-id>"
_ACCOUNT_ID = re.compile(r"^\d{12}$")
_RESOURCE_ID = re.compile(r"^(db|cluster)-[A-Za-z0-9]+$")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "db",
        help="database helpers (the IAM policy of an RDS/Aurora database)",
        description="Helpers for the databases the cluster serves.",
    )
    dsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    iam = dsub.add_parser(
        "iam-policy",
        help="print the IAM policy a db agent needs to log in to an RDS/Aurora database",
        description="Print the IAM policy (JSON) that allows rds-db:connect on an RDS or "
        "Aurora database with IAM authentication; attach it to the AWS identity of the db "
        "agents that serve the database. The region comes from the bundle in force, or "
        "--region.",
    )
    iam.add_argument("name", metavar="NAME", help="the database's name (metadata.name)")
    iam.add_argument(
        "--account-id",
        metavar="ID",
        help="the 12-digit AWS account the database is in (default: a placeholder)",
    )
    iam.add_argument(
        "--resource-id",
        metavar="ID",
        help="the database's resource id from the RDS console's Configuration tab: db-... "
        "for an RDS instance, cluster-... for an Aurora cluster (default: a placeholder)",
    )
    iam.add_argument(
        "--region",
        metavar="REGION",
        help="the database's AWS region, for a database that is not in the policy (defined "
        "by an agent's teleport.yaml or --db-aws-region)",
    )
    add_data_dir_argument(iam)
    iam.set_defaults(func=run_iam_policy)


def iam_policy(region: str, account_id: str | None, resource_id: str | None) -> dict[str, object]:
    """Seed 001's policy document for `region`, placeholders where a value is not given."""
    partition = partition_of(region)
    account = account_id or ACCOUNT_PLACEHOLDER
    resource = resource_id or RESOURCE_PLACEHOLDER
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["rds-db:connect"],
                "Resource": [f"arn:{partition}:rds-db:{region}:{account}:dbuser:{resource}/*"],
            }
        ],
    }


class _Refused(Exception):
    """The database or its region is wrong: exit code 1 with this message."""


def run_iam_policy(args: argparse.Namespace) -> int:
    if args.account_id is not None and not _ACCOUNT_ID.match(args.account_id):
        raise UsageError(f"--account-id {args.account_id!r} is not a 12-digit AWS account id")
    if args.resource_id is not None and not _RESOURCE_ID.match(args.resource_id):
        raise UsageError(
            f"--resource-id {args.resource_id!r} is not an RDS resource id: it is db-... for "
            "an RDS instance or cluster-... for an Aurora cluster (RDS console, the "
            "database's Configuration tab, 'Resource id')"
        )
    if args.region is not None and not AWS_REGION_RE.match(args.region):
        raise UsageError(f"--region {args.region!r} is not an AWS region name (e.g. us-west-1)")
    try:
        region, notes = _region_of(args)
    except _Refused as exc:
        print(f"tctl: error: {exc}", file=sys.stderr)
        return 1
    if region not in rds_regions():
        print(
            f"tctl: error: {region!r} is not an AWS region that RDS is in (as far as this "
            "boto3 knows); fix the database's spec.aws.region or --region",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(iam_policy(region, args.account_id, args.resource_id), indent=2))
    missing = [
        f"{placeholder} (--{flag})"
        for placeholder, flag, given in (
            (ACCOUNT_PLACEHOLDER, "account-id", args.account_id),
            (RESOURCE_PLACEHOLDER, "resource-id", args.resource_id),
        )
        if given is None
    ]
    if missing:
        notes.append(f"fill in {' and '.join(missing)} before creating the policy")
    for note in notes:
        print(f"tctl: note: {note}", file=sys.stderr)
    return 0


def _bundle_in_force(args: argparse.Namespace) -> Bundle | None:
    store, keys, cluster = store_and_key(args)
    in_force = load_state(data_dir_of(args) / "state.json").in_force
    if in_force is None:
        return None
    return load_kept(store, keys, cluster, in_force.serial)


def _region_of(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The region to print and notes for stderr; `_Refused` when the two sources disagree
    or neither has one."""
    name = args.name
    if args.region is not None and not data_dir_of(args, must_exist=False).is_dir():
        return args.region, [f"database {name!r} not looked up (no data dir): using --region"]
    try:
        bundle = _bundle_in_force(args)
    except UsageError as exc:
        if args.region is not None:
            return args.region, [f"database {name!r} not looked up ({exc}): using --region"]
        raise UsageError(f"{exc}; or give the database's region with --region") from None
    where = f"the bundle in force (serial {bundle.serial})" if bundle else "any bundle"
    spec = bundle.databases.get(name) if bundle else None
    if spec is None:
        if args.region is not None:
            return args.region, [f"database {name!r} is not in {where}: using --region"]
        aws = sorted(n for n, d in (bundle.databases.items() if bundle else ()) if d.aws_region)
        known = f" (its AWS databases: {', '.join(aws)})" if aws else ""
        raise _Refused(
            f"database {name!r} is not in {where}{known}; if only an agent's teleport.yaml "
            "or --db-aws-region defines it, give its region with --region"
        )
    if spec.aws_region is None:
        if args.region is not None:
            return args.region, [
                f"database {name!r} has no spec.aws.region in {where}: using --region; the "
                "agent signs IAM tokens only for databases with a region"
            ]
        raise _Refused(
            f"database {name!r} has no spec.aws.region in {where}: the agent logs in to it "
            "with client certificates, not IAM tokens; set spec.aws.region in its file if it "
            "is an RDS/Aurora database, or pass --region"
        )
    if args.region is not None and args.region != spec.aws_region:
        raise _Refused(
            f"--region {args.region} contradicts {where}, where database {name!r} is in "
            f"{spec.aws_region}; drop --region, or fix spec.aws.region in the policy"
        )
    return spec.aws_region, []
