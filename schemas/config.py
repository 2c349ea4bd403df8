"""`teleport.yaml`: the configuration file of `teleport start` and `teleport-agent run`.

The seeds' format: sections `teleport`, `auth_service`, `proxy_service`, `db_service`, and
`ssh_service` (accepted only disabled: this product has no SSH service). `enabled` takes
"yes"/"no" as in the seeds, or true/false. Unknown keys are errors, with the file, line and
column (the policy loader's YAML positions are reused for that).

Dynamic label commands (`db_service.databases[].commands`) belong here, in an agent's own
file, never in the policy repository: only who runs the agent decides what it executes.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from schemas.durations import parse_duration
from schemas.policy.loader import validate_yaml
from schemas.policy.models import (
    AWS_REGION_RE,
    LABEL_KEY_PATTERN,
    NAME_PATTERN,
    Duration,
    HostPort,
    PolicyValueError,
    rds_endpoint,
    split_host_port,
)

DEFAULT_DATA_DIR = "/var/lib/teleport"
DEFAULT_AUTH_LISTEN = "0.0.0.0:3025"
DEFAULT_WEB_LISTEN = "0.0.0.0:3080"
DEFAULT_TUNNEL_LISTEN = "0.0.0.0:3024"


def _yes_no(value: Any) -> Any:
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("yes", "true", "on", "1"):
            return True
        if lowered in ("no", "false", "off", "0"):
            return False
        raise ValueError(f'expected "yes" or "no", got {value!r}')
    return value


YesNo = Annotated[bool, BeforeValidator(_yes_no)]


def _listify(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


class ConfigModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LogConfig(ConfigModel):
    output: str = Field(default="stderr", description="stderr, stdout, or a file to append to")
    severity: Literal["DEBUG", "INFO", "WARN", "WARNING", "ERROR"] = "INFO"


class TeleportSection(ConfigModel):
    nodename: str | None = None
    data_dir: str | None = Field(
        default=None,
        description=f"where this host keeps its state (default {DEFAULT_DATA_DIR}); the "
        "--data-dir flag wins over it, and it wins over $TELEPORT_DATA_DIR",
    )
    auth_token: str | None = Field(default=None, description="join token, or a path to a file")
    auth_servers: Annotated[list[HostPort], BeforeValidator(_listify)] = Field(default_factory=list)
    ca_pin: str | None = Field(
        default=None, description="sha256:<hex> of the host CA, checked when joining"
    )
    log: LogConfig = Field(default_factory=LogConfig)


class PolicyConfig(ConfigModel):
    """Where the control plane reads policy: its hosted repository (default), a repository
    on this host, or a remote it pulls."""

    repository: str = Field(
        default="hosted",
        description='"hosted" (<data_dir>/policies.git), a local path, or a git URL',
    )
    branch: str = "main"
    pull_interval: Duration = "30s"


class AuthenticationConfig(ConfigModel):
    type: Literal["local"] = "local"
    second_factor: Literal["off", "otp", "optional"] = "off"


class AuthService(ConfigModel):
    enabled: YesNo = True
    cluster_name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    listen_addr: HostPort = DEFAULT_AUTH_LISTEN
    public_addr: Annotated[list[HostPort], BeforeValidator(_listify)] = Field(default_factory=list)
    tokens: list[str] = Field(
        default_factory=list,
        description='static join tokens "roles:token", e.g. "proxy,node,database:cbdeeab9-..."',
    )
    authentication: AuthenticationConfig = Field(default_factory=AuthenticationConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    bundle_ttl: Duration = "24h"

    @field_validator("tokens")
    @classmethod
    def _token_format(cls, tokens: list[str]) -> list[str]:
        for entry in tokens:
            roles, sep, secret = entry.rpartition(":")
            if not sep or not roles or not secret:
                raise ValueError(
                    f'token {entry!r} must be "roles:token", e.g. "proxy,database:secret"'
                )
            unknown = set(roles.split(",")) - {"proxy", "node", "db", "database", "auth"}
            if unknown:
                raise ValueError(f"unknown role(s) {', '.join(sorted(unknown))} in token entry")
        return tokens


class ProxyService(ConfigModel):
    enabled: YesNo = True
    listen_addr: HostPort | None = Field(
        default=None, description="SSH proxy address in Teleport; accepted and unused here"
    )
    web_listen_addr: HostPort = DEFAULT_WEB_LISTEN
    tunnel_listen_addr: HostPort = DEFAULT_TUNNEL_LISTEN
    public_addr: Annotated[list[HostPort], BeforeValidator(_listify)] = Field(default_factory=list)
    tunnel_public_addr: HostPort | None = None
    postgres_listen_addr: HostPort | None = None
    postgres_public_addr: HostPort | None = None
    https_cert_file: str | None = None
    https_key_file: str | None = None

    @field_validator("https_cert_file", "https_key_file")
    @classmethod
    def _own_https_certificates(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "a certificate of your own for the web port is not supported yet: the "
                "proxy presents a certificate from the cluster's host CA (clients pin it "
                "with tsh login --ca-pin); remove this key"
            )
        return value
    client_idle_timeout: Duration | None = None


MIN_LABEL_PERIOD = timedelta(seconds=1)


class LabelCommand(ConfigModel):
    name: Annotated[str, Field(pattern=LABEL_KEY_PATTERN)]
    command: Annotated[list[str], Field(min_length=1)]
    period: Duration = "1m"

    @field_validator("period")
    @classmethod
    def _not_too_often(cls, value: str) -> str:
        if parse_duration(value) < MIN_LABEL_PERIOD:
            raise ValueError(f"period {value} is too short; the shortest allowed is 1s")
        return value


class DatabaseAWSConfig(ConfigModel):
    region: Annotated[str, Field(pattern=AWS_REGION_RE.pattern)]


class DatabaseConfig(ConfigModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str = ""
    protocol: str
    uri: HostPort
    ca_cert_file: str | None = None
    aws: DatabaseAWSConfig | None = None
    labels: dict[Annotated[str, Field(pattern=LABEL_KEY_PATTERN)], str] = Field(
        default_factory=dict
    )
    commands: list[LabelCommand] = Field(
        default_factory=list, description="dynamic labels: command output refreshed every period"
    )
    tls_mode: Literal["verify-full", "verify-ca"] = "verify-full"

    @field_validator("protocol")
    @classmethod
    def _protocol(cls, value: str) -> str:
        if value == "mysql":
            raise ValueError("protocol mysql is not supported yet; use postgres")
        if value != "postgres":
            raise ValueError(f"unknown protocol {value!r}; use postgres")
        return value

    @model_validator(mode="after")
    def _one_source_per_label(self) -> DatabaseConfig:
        seen: set[str] = set()
        for i, command in enumerate(self.commands):
            if command.name in self.labels:
                raise PolicyValueError(
                    f"dynamic label {command.name!r} has the name of a static label; "
                    "rename one of them",
                    rule="duplicate-label",
                    at=("commands", i, "name"),
                )
            if command.name in seen:
                raise PolicyValueError(
                    f"two commands set label {command.name!r}; keep one",
                    rule="duplicate-label",
                    at=("commands", i, "name"),
                )
            seen.add(command.name)
        return self

    @model_validator(mode="after")
    def _rds_needs_region(self) -> DatabaseConfig:
        host, _ = split_host_port(self.uri)
        if rds_endpoint(host) and self.aws is None:
            raise PolicyValueError(
                f"{host} is an AWS RDS/Aurora endpoint: set aws.region (or --db-aws-region) "
                "so the agent can sign IAM authentication tokens",
                rule="rds-needs-region",
                at=("uri",),
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _seed_000_names(cls, data: Any) -> Any:
        """The early design draft (seed 000) wrote endpoint/ca_path/region: accept them."""
        if isinstance(data, dict):
            data = dict(data)
            for old, new in (("endpoint", "uri"), ("ca_path", "ca_cert_file")):
                if old in data and new not in data:
                    data[new] = data.pop(old)
            if "region" in data and "aws" not in data:
                data["aws"] = {"region": data.pop("region")}
            if data.get("auth") == "aws-iam":
                data.pop("auth")
        return data


class ResourceSelector(ConfigModel):
    labels: dict[str, Annotated[list[str], BeforeValidator(_listify)]]


def _zero_is_off(value: Any) -> Any:
    """`0`, `"0"`, `off` or `no` for a timeout that may be turned off: None (off)."""
    if value is False or (not isinstance(value, bool) and value in (0, "0", "off", "no")):
        return None
    return value


# A duration, or 0 / "0" / off (stored as None): the feature it times is off.
DurationOrOff = Annotated[Duration | None, BeforeValidator(_zero_is_off)]


class DbService(ConfigModel):
    enabled: YesNo = True
    databases: list[DatabaseConfig] = Field(default_factory=list)
    resources: list[ResourceSelector] = Field(
        default_factory=list,
        description="also serve the bundle's databases whose labels match a selector",
    )
    # Below the 5 s PostgreSQL waits in CREATE, ALTER and DROP DATABASE for the database's
    # other connections to go, so that such a statement sent around an agent (directly, or
    # through another agent) succeeds. The agent's default is read from here.
    server_idle_timeout: DurationOrOff = Field(
        "3s",
        description=(
            "keep the server connection of a session that ended cleanly this long, reset "
            "with DISCARD ALL, for the next session of the same user with the same db "
            "user, db name and options when that client reconnects (two sessions within "
            "this time); 0 closes every server connection with its session. Above 5s, a DROP "
            "DATABASE sent around the agent can fail while a kept connection is left"
        ),
    )


class SshService(ConfigModel):
    enabled: YesNo = False

    @field_validator("enabled")
    @classmethod
    def _off(cls, value: bool) -> bool:
        if value:
            raise ValueError('teleport-db has no SSH service: set ssh_service.enabled to "no"')
        return value


class FileConfig(ConfigModel):
    version: str | None = None
    teleport: TeleportSection = Field(default_factory=TeleportSection)
    auth_service: AuthService = Field(default_factory=lambda: AuthService(enabled=False))
    proxy_service: ProxyService = Field(default_factory=lambda: ProxyService(enabled=False))
    db_service: DbService = Field(default_factory=lambda: DbService(enabled=False))
    ssh_service: SshService = Field(default_factory=SshService)


class ConfigError(Exception):
    """The configuration file is wrong; the message has `file:line:col` for each problem."""


def load_config(path: Path, text: str | bytes | None = None) -> FileConfig:
    """Read and validate a teleport.yaml, reporting each problem with its position."""
    try:
        source = text if text is not None else Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    value, problems = validate_yaml(source, str(path), FileConfig)
    if value is None:
        raise ConfigError("\n".join(str(p) for p in problems))
    return value


def resolve_data_dir(flag: str | None, config: FileConfig, env_value: str | None) -> Path:
    """The data dir: --data-dir, else the file's `teleport.data_dir`, else
    $TELEPORT_DATA_DIR (`env_value`), else /var/lib/teleport; always absolute (a relative
    one is taken from the current directory once, so later child processes agree on it)."""
    chosen = flag or config.teleport.data_dir or env_value or DEFAULT_DATA_DIR
    return Path(chosen).expanduser().absolute()
