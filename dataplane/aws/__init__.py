"""AWS RDS and Aurora PostgreSQL with IAM authentication: the agent's side.

- `RdsTokenProvider`: the password provider of databases with an AWS region; a fresh
  boto3-signed IAM token per connection (`tokens.py`);
- `AwsAuthError` and its kinds (`NoCredentials`, `CredentialsUnusable`, `RegionMissing`,
  `InvalidRegion`): problems as message + hint, ready to become a psql ErrorResponse;
- `preflight(spec)`: the settings problems found without I/O (RDS endpoint without region,
  region not matching the endpoint, no CA to verify RDS with), for the agent to report
  before it dials;
- `explain_upstream_auth_failure`: what to check when the database refuses the token.

Nothing here logs or keeps a token or a secret key.
"""

from dataplane.aws.errors import (
    AwsAuthError,
    CredentialsUnusable,
    InvalidRegion,
    NoCredentials,
    RegionMissing,
    explain_upstream_auth_failure,
    sql_identifier,
)
from dataplane.aws.tokens import (
    RDS_ENDPOINT_SUFFIXES,
    TOKEN_LIFETIME_SECONDS,
    RdsTokenProvider,
    endpoint_region,
    preflight,
    settings_problem,
    token_host,
)

__all__ = [
    "RDS_ENDPOINT_SUFFIXES",
    "TOKEN_LIFETIME_SECONDS",
    "AwsAuthError",
    "CredentialsUnusable",
    "InvalidRegion",
    "NoCredentials",
    "RdsTokenProvider",
    "RegionMissing",
    "endpoint_region",
    "explain_upstream_auth_failure",
    "preflight",
    "settings_problem",
    "sql_identifier",
    "token_host",
]
