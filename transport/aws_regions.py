"""AWS regions as botocore's own endpoint data knows them, for both planes: `tctl db
iam-policy` (the partition of an ARN) and the agent's RDS token signer (a region that does
not exist is an error before any signing). Read once per process, from the files botocore
ships: no profile, credentials or network involved, so a broken profile never hides a bad
region."""

from __future__ import annotations

from functools import cache

from botocore.loaders import create_loader
from botocore.regions import EndpointResolver


@cache
def _resolver() -> EndpointResolver:
    return EndpointResolver(create_loader().load_data("endpoints"))


@cache
def rds_regions() -> frozenset[str]:
    """Every region in which botocore lists RDS, across all partitions."""
    resolver = _resolver()
    regions: set[str] = set()
    for partition in resolver.get_available_partitions():
        regions.update(resolver.get_available_endpoints("rds", partition))
    return frozenset(regions)


def partition_of(region: str) -> str:
    """The partition of `region` ("aws", "aws-cn", "aws-us-gov", ...) for ARNs."""
    return str(_resolver().get_partition_for_region(region))
