"""IAM authentication tokens for AWS RDS and Aurora PostgreSQL, signed with boto3.

An RDS database with IAM authentication takes, as the password of a db user, a SigV4
presigned URL for the `rds-db` service (`host:port/?Action=connect&DBUser=alice&X-Amz-...`)
signed by an AWS identity allowed `rds-db:connect`. The token is valid for 15 minutes and
is checked only when a connection logs in, so the agent signs a fresh one for every
connection: signing is a few HMACs over local credentials, no call to AWS.

`RdsTokenProvider` is the agent's password provider for such databases:
`await provider(database, db_user)` (the `PasswordProvider` shape the upstream connector
calls when the server asks for a password) looks the database up, and when it has an AWS
region returns `generate_db_auth_token(DBHostname, Port, DBUsername, Region)` for the host
and port the agent dials. Credentials come from boto3's default chain: environment, shared
credentials and config files with their profiles (AWS_PROFILE), web identity, SSO,
container credentials, the EC2 instance role. The boto3 Session and its RDS clients are
made once, in a worker thread (finding credentials reads files and may ask the instance
metadata service), and reused; a failure is remembered for `retry_after` seconds so that a
burst of connections does not probe the chain again for each one, then tried afresh (a
credentials file fixed or an instance role attached is picked up without a restart).

Problems become `dataplane.aws.errors` values with a message and a hint: no credentials
(where boto3 looked and what to set), credentials that cannot be used, a region missing,
unknown to boto3, or not the one in the RDS endpoint's name. `preflight(spec)` finds the
settings problems without I/O (and a missing `ca_cert_file`), for the agent to report
before it dials.

This module never logs, prints or keeps a token or a secret: it logs only where the
credentials came from (boto3's method name, e.g. "env" or "iam-role"), and it filters the
DEBUG records of botocore's signer, which would print the signature.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from dataplane.aws.errors import (
    AwsAuthError,
    CredentialsUnusable,
    InvalidRegion,
    NoCredentials,
    RegionMissing,
)
from schemas.bundle import BundleDatabase
from schemas.policy.models import AWS_REGION_RE, RDS_ENDPOINT_SUFFIXES, split_host_port
from transport.aws_regions import rds_regions

if TYPE_CHECKING:  # dataplane.agent imports this module: only the type is needed here
    from dataplane.agent.interfaces import PasswordProvider

__all__ = [
    "RDS_ENDPOINT_SUFFIXES",
    "TOKEN_LIFETIME_SECONDS",
    "RdsTokenProvider",
    "endpoint_region",
    "preflight",
    "settings_problem",
    "token_host",
]

logger = logging.getLogger(__name__)

TOKEN_LIFETIME_SECONDS = 900  # what generate_db_auth_token signs, and what RDS accepts
DEFAULT_RETRY_AFTER = 5.0

# botocore's SigV4 signer logs the canonical request, the string to sign and the signature
# at DEBUG: together they are the token. This filter keeps them out of every log, whatever
# level an operator sets on botocore's loggers.
SIGNER_LOGGER = "botocore.auth"


class _NoSignerDebug(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


def _silence_signer_debug() -> None:
    signer = logging.getLogger(SIGNER_LOGGER)
    if not any(isinstance(f, _NoSignerDebug) for f in signer.filters):
        signer.addFilter(_NoSignerDebug())


DatabaseLookup = Callable[[str], BundleDatabase | None]


def endpoint_region(host: str) -> str | None:
    """The region in an RDS endpoint's name (`x.abc.us-west-1.rds.amazonaws.com`), or None
    for any other host (an IP address, a CNAME of our own, the test stand-in)."""
    name = host.lower().rstrip(".")
    for suffix in RDS_ENDPOINT_SUFFIXES:
        if name.endswith(suffix):
            labels = name[: -len(suffix)].split(".")
            return labels[-1] if len(labels) >= 2 and labels[-1] else None
    return None


def token_host(host: str) -> str:
    """The host as it goes into the token's URL: IPv6 addresses in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _config_paths() -> tuple[str, str]:
    """Where botocore reads the shared config and credentials files (its documented
    defaults, or AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)."""
    config = os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config"
    credentials = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials"
    return os.path.expanduser(config), os.path.expanduser(credentials)


def _where_boto3_looks(profile: str) -> str:
    config, credentials = _config_paths()
    imds = (
        "disabled here by AWS_EC2_METADATA_DISABLED"
        if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true"
        else "instance metadata"
    )
    return (
        "boto3 looked in the environment (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
        f"AWS_SESSION_TOKEN for temporary keys), the shared credentials file {credentials} "
        f"and config file {config} (profile {profile!r}; AWS_PROFILE picks another), web "
        "identity (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN), container credentials "
        f"(AWS_CONTAINER_CREDENTIALS_RELATIVE_URI) and the EC2 instance role ({imds})"
    )


def _policy_pointer(database: str) -> str:
    return f"`tctl db iam-policy {database}` prints the IAM policy it needs"


def preflight(spec: BundleDatabase) -> AwsAuthError | None:
    """What is wrong with an AWS database's settings, found without I/O (None: nothing):
    `settings_problem`'s, or no `ca_cert_file` to verify RDS with. The agent calls it
    before it dials, so the person sees the configuration problem rather than a refused
    token or a failed TLS handshake."""
    problem = settings_problem(spec)
    if problem is None and spec.aws_region is not None and not spec.ca_cert_file:
        problem = AwsAuthError(
            f"database {spec.name!r} has an AWS region but no ca_cert_file: the agent cannot "
            "verify the RDS server's certificate, and sends IAM tokens only to a verified "
            "server",
            "download the RDS CA bundle (https://truststore.pki.rds.amazonaws.com/global/"
            "global-bundle.pem) to the agent host and set spec.ca_cert_file (or --db-ca-cert) "
            "to its path",
        )
    return problem


def settings_problem(spec: BundleDatabase) -> AwsAuthError | None:
    """The region problems of a database, without I/O: an RDS endpoint without a region, a
    region that is not a region name or not the one in the endpoint's name, a uri that is
    not host:port (None: nothing wrong)."""
    try:
        host, _ = split_host_port(spec.uri)
    except ValueError:
        return AwsAuthError(
            f"database {spec.name!r} has uri {spec.uri!r}, which is not host:port",
            "write the database endpoint as host:port, e.g. "
            "mydb.abcdefghijkl.us-west-1.rds.amazonaws.com:5432",
        )
    in_name = endpoint_region(host)
    region = spec.aws_region
    if region is None:
        if in_name is None:
            return None
        return RegionMissing(
            f"database {spec.name!r} at {spec.uri} is an AWS RDS endpoint, but no AWS region "
            "is set for it, so the agent cannot sign an IAM token",
            f"set the region the database is in: `aws: {{region: {in_name}}}` in its spec "
            f"(databases/{spec.name}.yaml), aws.region in the agent's teleport.yaml, or "
            f"--db-aws-region={in_name}",
        )
    if not AWS_REGION_RE.match(region):
        return _unknown_region(spec.name, region, in_name)
    if in_name is not None and in_name != region:
        return InvalidRegion(
            f"AWS region {region!r} of database {spec.name!r} is not the region of its "
            f"endpoint {host}, which is in {in_name}",
            f"RDS refuses a token signed for another region: set spec.aws.region to {in_name} "
            f"(or --db-aws-region={in_name})",
        )
    return None


def _unknown_region(database: str, region: str, example: str | None = None) -> InvalidRegion:
    return InvalidRegion(
        f"AWS region {region!r} of database {database!r} is not a region boto3 knows",
        f"set the region the database is deployed in, e.g. {example or 'us-west-1'}, in its "
        "spec.aws.region (or --db-aws-region); if AWS opened this region recently, upgrade "
        "boto3 on the agent host",
    )


class RdsTokenProvider:
    """Signs RDS IAM tokens for the agent's databases that have an AWS region.

    `lookup(name)` returns the spec of a database the agent serves (None if unknown);
    `fallback` answers for databases without an AWS region (None: no password). Call
    `await provider(database, db_user)`, or `await provider.password_for(spec, db_user)`
    with the spec at hand.
    """

    def __init__(
        self,
        lookup: DatabaseLookup | None = None,
        *,
        fallback: PasswordProvider | None = None,
        profile_name: str | None = None,
        retry_after: float = DEFAULT_RETRY_AFTER,
    ) -> None:
        _silence_signer_debug()
        self._lookup = lookup
        self._fallback = fallback
        self._profile_name = profile_name
        self.retry_after = retry_after
        self._lock = threading.Lock()
        self._session: boto3.Session | None = None
        self._clients: dict[str, Any] = {}
        self._failure: tuple[float, Callable[[str], AwsAuthError]] | None = None
        self.credentials_method: str | None = None  # boto3's name for the source, once found

    def __repr__(self) -> str:
        return (
            f"RdsTokenProvider(profile={self._profile_name!r}, "
            f"credentials={self.credentials_method!r}, regions={sorted(self._clients)!r})"
        )

    # ---------------------------------------------------------------- the async face

    async def __call__(self, database: str, db_user: str) -> str | None:
        spec = self._lookup(database) if self._lookup is not None else None
        if spec is None:
            return await self._fallback(database, db_user) if self._fallback else None
        return await self.password_for(spec, db_user)

    async def password_for(self, spec: BundleDatabase, db_user: str) -> str | None:
        """A fresh IAM token when `spec` is an AWS database, else the fallback's answer."""
        problem = settings_problem(spec)
        if problem is not None:
            raise problem
        if spec.aws_region is None:
            if self._fallback is None:
                return None
            return await self._fallback(spec.name, db_user)
        return await asyncio.to_thread(self.token_blocking, spec, db_user)

    # ---------------------------------------------------------------- the blocking part

    def token_blocking(self, spec: BundleDatabase, db_user: str) -> str:
        """Sign a token for `spec` (which must have an AWS region) and `db_user`.

        Blocking: the first call finds credentials, which reads files and may ask the
        instance metadata service; refreshing temporary credentials may call AWS. Call it
        in a worker thread (`password_for` does).
        """
        problem = settings_problem(spec)
        if problem is not None:
            raise problem
        region = spec.aws_region
        if region is None:
            raise RegionMissing(
                f"database {spec.name!r} has no AWS region",
                "set spec.aws.region (or --db-aws-region) to sign IAM tokens for it",
            )
        host, port = split_host_port(spec.uri)
        client = self._client(spec.name, region)
        try:
            return str(
                client.generate_db_auth_token(
                    DBHostname=token_host(host), Port=port, DBUsername=db_user, Region=region
                )
            )
        except (BotoCoreError, ClientError) as exc:
            # Temporary credentials that could not be refreshed (an expired SSO session, an
            # instance role removed, STS unreachable): forget the session, try again later.
            with self._lock:
                self._forget()
            raise self._unusable(spec.name, str(exc)) from None

    def _client(self, database: str, region: str) -> Any:
        with self._lock:
            self._check_region(database, region)
            if self._failure is not None:
                at, make = self._failure
                if time.monotonic() - at < self.retry_after:
                    raise make(database)
                self._failure = None
            try:
                session = self._get_session()
                client = self._clients.get(region)
                if client is None:
                    client = self._new_client(session, region)
                    self._clients[region] = client
                return client
            except _Remembered as remembered:
                self._forget()
                self._failure = (time.monotonic(), remembered.make)
                raise remembered.make(database) from None

    def _get_session(self) -> boto3.Session:
        if self._session is not None:
            return self._session
        try:
            session = boto3.Session(profile_name=self._profile_name)
            credentials = session.get_credentials()
        except (BotoCoreError, ClientError) as exc:
            detail = str(exc)
            raise _Remembered(lambda database: self._unusable(database, detail)) from None
        if credentials is None:
            profile = session.profile_name
            raise _Remembered(lambda database: self._none_found(database, profile))
        self.credentials_method = str(getattr(credentials, "method", "unknown"))
        logger.info("signing RDS IAM tokens with AWS credentials from %s", self.credentials_method)
        self._session = session
        return session

    def _new_client(self, session: boto3.Session, region: str) -> Any:
        try:
            return session.client("rds", region_name=region)
        except (BotoCoreError, ClientError) as exc:
            detail = str(exc)
            raise _Remembered(lambda database: self._unusable(database, detail)) from None

    def _forget(self) -> None:
        self._session = None
        self._clients.clear()
        self.credentials_method = None

    def _check_region(self, database: str, region: str) -> None:
        if region not in rds_regions():
            raise _unknown_region(database, region)

    # ---------------------------------------------------------------- messages

    def _none_found(self, database: str, profile: str | None) -> NoCredentials:
        return NoCredentials(
            f"the db agent found no AWS credentials to sign an IAM token for database {database!r}",
            f"{_where_boto3_looks(profile or 'default')}. Give the agent host one of these, "
            f"for an AWS identity allowed rds-db:connect: {_policy_pointer(database)}.",
        )

    def _unusable(self, database: str, detail: str) -> CredentialsUnusable:
        config, credentials = _config_paths()
        return CredentialsUnusable(
            f"the db agent's AWS credentials cannot sign an IAM token for database "
            f"{database!r}: {detail}",
            f"fix the AWS configuration on the agent host: the profile (AWS_PROFILE) must "
            f"exist in {config} or {credentials} with both keys, and a credential_process, "
            "SSO session or role it names must work (try `aws sts get-caller-identity` as "
            "the agent's user)",
        )


class _Remembered(Exception):
    """A credentials problem to remember for `retry_after`: `make(database)` builds the
    error for each connection that asks meanwhile."""

    def __init__(self, make: Callable[[str], AwsAuthError]) -> None:
        super().__init__("AWS credentials problem")
        self.make = make
