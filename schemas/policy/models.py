"""The resources of the policy language as strict pydantic models.

Four kinds, in the seeds' resource format (`kind`, `version`, `metadata`, `spec`):
`role` (v5), `user` (v2), `db` (v3) and `cluster` (v1, one per repository). Every model
forbids unknown fields, so a typo is an error and never silently widens access.

These models validate plain values (already parsed from YAML). Mapping errors back to a file,
line and column is the loader's job (`schemas.policy.loader`). This module never reads files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    field_validator,
    model_validator,
)

from schemas.durations import DurationError, parse_duration

# --- shared pieces ----------------------------------------------------------------------

NAME_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62}[A-Za-z0-9])?$"
LABEL_KEY_PATTERN = r"^(\*|[A-Za-z0-9]([A-Za-z0-9/._:-]{0,62}[A-Za-z0-9])?)$"

# A template is `{{namespace.name}}`, optionally with literal text around it.
TEMPLATE_RE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
TEMPLATE_VAR_RE = re.compile(r"^(internal|external)\.([A-Za-z_][A-Za-z0-9_-]*)$")
INTERNAL_VARIABLES = {"db_names", "db_users"}


class PolicyValueError(ValueError):
    """A validation failure that knows its lint rule id and, optionally, a finer position.

    Pydantic keeps the exception in the error's context, so the loader can read `rule` (the
    `schemas.policy.problems.RULES` id) and `at` (a location relative to the validated
    object, e.g. `("uri",)` for a model validator that blames one field); `on_key` points
    the problem at that key rather than its value. It is a ValueError: code that does not
    care sees an ordinary validation error.
    """

    def __init__(
        self, message: str, *, rule: str, at: tuple[str, ...] = (), on_key: bool = False
    ) -> None:
        super().__init__(message)
        self.rule = rule
        self.at = at
        self.on_key = on_key


class StrictModel(BaseModel):
    """Base of every policy model: unknown fields are errors, values keep their YAML types."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _check_duration(value: str) -> str:
    try:
        if parse_duration(value) <= timedelta(0):
            raise PolicyValueError(
                f"duration {value!r} must be greater than zero", rule="invalid-duration"
            )
    except DurationError as exc:
        raise PolicyValueError(str(exc), rule="invalid-duration") from None
    return value


def _duration_input(value: Any) -> Any:
    """YAML reads `ttl: 12` as a number: say which unit is missing, not "expected text"."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        raise PolicyValueError(
            f"duration {value} has no unit; write e.g. {value}s, {value}m or {value}h",
            rule="invalid-duration",
        )
    return value


Duration = Annotated[
    str,
    BeforeValidator(_duration_input),
    AfterValidator(_check_duration),
    Field(
        description="A duration such as 30m, 12h or 1h30m (units: s, m, h).",
        examples=["12h", "30m"],
        json_schema_extra={"pattern": r"^([0-9]*\.?[0-9]+(ns|us|µs|ms|s|m|h))+$"},
    ),
]

ResourceName = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        description="Letters, digits, '.', '_' and '-'; starts and ends with a letter or digit.",
    ),
]


def _check_regex_value(value: str) -> str:
    """A value wrapped in ^...$ is a regular expression: it must compile."""
    if value.startswith("^") and value.endswith("$") and len(value) >= 2:
        try:
            re.compile(value)
        except re.error as exc:
            raise PolicyValueError(
                f"regular expression {value!r} does not compile: {exc}", rule="invalid-regex"
            ) from None
    return value


def check_template(value: str) -> str:
    """Templates must name a known namespace and variable; unbalanced braces are errors."""
    for match in TEMPLATE_RE.finditer(value):
        expr = match.group(1)
        var = TEMPLATE_VAR_RE.match(expr)
        if var is None:
            raise PolicyValueError(
                f"unknown template {match.group(0)!r}: use {{{{internal.db_names}}}}, "
                "{{internal.db_users}} or {{external.NAME}}",
                rule="invalid-template",
            )
        namespace, name = var.groups()
        if namespace == "internal" and name not in INTERNAL_VARIABLES:
            raise PolicyValueError(
                f"unknown template variable 'internal.{name}': internal has only "
                "db_names and db_users",
                rule="invalid-template",
            )
    rest = TEMPLATE_RE.sub("", value)
    if "{{" in rest or "}}" in rest:
        raise PolicyValueError(
            f"unbalanced template braces in {value!r}: write {{{{namespace.name}}}}",
            rule="invalid-template",
        )
    return value


LabelValue = Annotated[str, AfterValidator(_check_regex_value)]
MatchValue = Annotated[str, AfterValidator(check_template), AfterValidator(_check_regex_value)]
LabelKey = Annotated[str, Field(pattern=LABEL_KEY_PATTERN)]


def _one_or_many(value: Any) -> Any:
    """`env: prod` and `env: [prod, stage]` mean the same; normalize to a list."""
    if isinstance(value, str):
        return [value]
    return value


LabelSelector = dict[
    LabelKey,
    Annotated[
        list[LabelValue],
        # The JSON Schema shows what a person may write: one value or a list of them.
        BeforeValidator(_one_or_many, json_schema_input_type=str | list[str]),
    ],
]


class Metadata(StrictModel):
    """Name, description and labels of a resource."""

    name: ResourceName
    description: str = ""
    labels: dict[LabelKey, str] = Field(default_factory=dict)


# --- role -------------------------------------------------------------------------------


class RoleConditions(StrictModel):
    """What a role allows or denies: databases by label, and db names and users inside them."""

    db_labels: LabelSelector = Field(
        default_factory=dict,
        description="Label selector: every key must match; a key's values are alternatives. "
        "'*': '*' matches every database; '*' inside a value is a glob; ^...$ is a regex.",
    )
    db_names: list[MatchValue] = Field(
        default_factory=list,
        description="Database names inside an instance; '*' matches any; templates allowed.",
    )
    db_users: list[MatchValue] = Field(
        default_factory=list,
        description="Database accounts; '*' matches any; templates allowed.",
    )


class RoleOptions(StrictModel):
    """Session options of a role."""

    max_session_ttl: Duration | None = None


class RoleSpec(StrictModel):
    """Allow and deny rules of a role; deny rules win and match greedily."""

    allow: RoleConditions = Field(default_factory=RoleConditions)
    deny: RoleConditions = Field(default_factory=RoleConditions)
    options: RoleOptions = Field(default_factory=RoleOptions)


class Role(StrictModel):
    """A role (seed 003): which databases, db users and db names it allows or denies."""

    kind: Literal["role"]
    version: Literal["v5"]
    metadata: Metadata
    spec: RoleSpec

    @field_validator("version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> Any:
        if value in ("v3", "v4"):
            raise PolicyValueError(
                f"role version {value} is not supported; use v5 (the database fields "
                "db_labels, db_names and db_users are the same)",
                rule="unsupported-version",
            )
        return value


# --- user -------------------------------------------------------------------------------


class UserSpec(StrictModel):
    """The roles a user has, and traits that feed role templates."""

    roles: list[ResourceName] = Field(min_length=1)
    traits: dict[
        Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")],
        list[str],
    ] = Field(
        default_factory=dict,
        description="db_names and db_users feed {{internal.*}}; any other list feeds "
        "{{external.NAME}}.",
    )


class User(StrictModel):
    """A person (or robot) who logs in with tsh."""

    kind: Literal["user"]
    version: Literal["v2"]
    metadata: Metadata
    spec: UserSpec


# --- database ---------------------------------------------------------------------------

HOST_PORT_RE = re.compile(
    r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(?P<port>\d{1,5})$"
)
AWS_REGION_RE = re.compile(r"^[a-z]{2,4}(-gov|-iso[a-z]*)?-[a-z]+-\d{1,2}$")


def _check_host_port(value: str) -> str:
    m = HOST_PORT_RE.match(value)
    if m is None:
        raise PolicyValueError(
            f"{value!r} is not host:port (e.g. db.example.com:5432)", rule="invalid-address"
        )
    port = int(m.group("port"))
    if not 1 <= port <= 65535:
        raise PolicyValueError(
            f"port {port} in {value!r} is out of range 1-65535", rule="invalid-address"
        )
    return value


def split_host_port(value: str) -> tuple[str, int]:
    """Split a validated `host:port` (IPv6 hosts in brackets) into host and port."""
    m = HOST_PORT_RE.match(value)
    if m is None:
        raise ValueError(f"{value!r} is not host:port")
    return m.group("host").strip("[]"), int(m.group("port"))


HostPort = Annotated[str, AfterValidator(_check_host_port), Field(examples=["db.example.com:5432"])]

# Host names of AWS RDS and Aurora endpoints (the commercial and the China partitions).
RDS_ENDPOINT_SUFFIXES = (".rds.amazonaws.com", ".rds.amazonaws.com.cn")


def rds_endpoint(host: str) -> bool:
    """Whether `host` is an RDS/Aurora endpoint name (any case, a final dot allowed)."""
    return host.lower().rstrip(".").endswith(RDS_ENDPOINT_SUFFIXES)


class DatabaseAWS(StrictModel):
    """AWS RDS/Aurora settings: the agent signs IAM authentication tokens."""

    region: Annotated[str, Field(pattern=AWS_REGION_RE.pattern, examples=["us-east-1"])]


class DatabaseTLS(StrictModel):
    """How the agent verifies the database server's certificate."""

    mode: Literal["verify-full", "verify-ca"] = Field(
        default="verify-full",
        description="verify-full checks the chain and the host name; verify-ca only the chain.",
    )


class DatabaseSpec(StrictModel):
    """Where the database is and how the agent connects to it."""

    protocol: Literal["postgres"]
    uri: HostPort
    ca_cert_file: str | None = Field(
        default=None, description="CA bundle on the agent host, e.g. the RDS root CA."
    )
    aws: DatabaseAWS | None = None
    tls: DatabaseTLS = Field(default_factory=DatabaseTLS)

    @field_validator("protocol", mode="before")
    @classmethod
    def _known_protocol(cls, value: Any) -> Any:
        if value == "mysql":
            raise PolicyValueError(
                "protocol mysql is not supported yet; use postgres", rule="unsupported-protocol"
            )
        return value

    @model_validator(mode="before")
    @classmethod
    def _refuse_label_commands(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("dynamic_labels", "commands"):
                if key in data:
                    raise PolicyValueError(
                        f"{key} are not allowed in the policy repository: they would let "
                        "anyone who can push run commands on agent hosts; define them in "
                        "the agent's own teleport.yaml (db_service.databases[].commands)",
                        rule="refused-field",
                        at=(key,),
                        on_key=True,
                    )
        return data

    @model_validator(mode="after")
    def _rds_needs_region(self) -> DatabaseSpec:
        host, _ = split_host_port(self.uri)
        if rds_endpoint(host) and self.aws is None:
            raise PolicyValueError(
                f"{host} is an AWS RDS/Aurora endpoint: set spec.aws.region so the agent "
                "can sign IAM authentication tokens",
                rule="aws-region-missing",
                at=("uri",),
            )
        return self


class Database(StrictModel):
    """A database the agents proxy (kind db); labels are what roles select on."""

    kind: Literal["db"]
    version: Literal["v3"]
    metadata: Metadata
    spec: DatabaseSpec


# --- cluster ----------------------------------------------------------------------------


class ClusterSpec(StrictModel):
    """Certificate lifetimes of the cluster."""

    certificate_ttl: Duration = Field(
        default="12h", description="Default lifetime of user certificates."
    )
    max_session_ttl: Duration = Field(
        default="30h", description="No certificate outlives this, whatever a role says."
    )
    disconnect_expired_cert: StrictBool = Field(
        default=False, description="End a live session when its certificate expires."
    )


class Cluster(StrictModel):
    """The cluster this repository describes (cluster.yaml; exactly one)."""

    kind: Literal["cluster"]
    version: Literal["v1"]
    metadata: Metadata
    spec: ClusterSpec = Field(default_factory=ClusterSpec)

    @property
    def name(self) -> str:
        return self.metadata.name


KINDS: dict[str, type[StrictModel]] = {
    "role": Role,
    "user": User,
    "db": Database,
    "cluster": Cluster,
}


@dataclass(frozen=True)
class Policy:
    """A whole, valid policy repository at one commit."""

    cluster: Cluster
    roles: dict[str, Role] = field(default_factory=dict)
    users: dict[str, User] = field(default_factory=dict)
    databases: dict[str, Database] = field(default_factory=dict)
