"""teleport.yaml: the seeds' files load as written; mistakes get file:line:col messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas.config import ConfigError, load_config

DATA = Path(__file__).parent / "data"


def test_seed_001_auth_and_proxy_config() -> None:
    config = load_config(DATA / "seed001_auth_proxy.yaml")
    assert config.auth_service.enabled and config.auth_service.cluster_name == "test"
    assert config.auth_service.tokens == [
        "proxy,node,database:cbdeeab9-6f88-436d-a673-44d14bd86bb7"
    ]
    assert config.proxy_service.web_listen_addr == "0.0.0.0:3080"
    assert config.proxy_service.public_addr == ["teleport.example.com:3080"]
    assert not config.db_service.enabled and not config.ssh_service.enabled


def test_seed_001_database_service_config() -> None:
    config = load_config(DATA / "seed001_db_aurora.yaml")
    assert config.teleport.auth_servers == ["teleport.example.com:3080"]
    (db,) = config.db_service.databases
    assert db.name == "aurora" and db.aws is not None and db.aws.region == "us-east-1"
    assert db.labels == {"env": "dev"}
    assert not config.auth_service.enabled and not config.proxy_service.enabled


def test_seed_000_draft_names_and_dynamic_label_commands() -> None:
    text = """
db_service:
  enabled: "yes"
  databases:
  - name: "postgres-prod"
    protocol: "postgres"
    endpoint: "postgres-rds.xxx.us-east-1.rds.amazonaws.com:5432"
    ca_path: "/opt/rds/rds-ca-2019-root.pem"
    region: "us-east-1"
    auth: "aws-iam"
    labels:
      env: "stage"
    commands:
    - name: "time"
      command: ["date", "+%H:%M:%S"]
      period: "1m"
"""
    (db,) = load_config(Path("teleport.yaml"), text).db_service.databases
    assert db.uri.startswith("postgres-rds") and db.ca_cert_file == "/opt/rds/rds-ca-2019-root.pem"
    assert db.aws is not None and db.aws.region == "us-east-1"
    assert db.commands[0].command == ["date", "+%H:%M:%S"]


def test_mistakes_are_reported_with_positions() -> None:
    text = """\
db_service:
  enabled: maybe
  databases:
  - name: "aurora"
    protocol: "mysql"
    urii: x
ssh_service:
  enabled: "yes"
"""
    with pytest.raises(ConfigError) as info:
        load_config(Path("teleport.yaml"), text)
    assert str(info.value).splitlines() == [
        'teleport.yaml:2:12: db_service.enabled: expected "yes" or "no", got \'maybe\'',
        "teleport.yaml:4:5: db_service.databases[0].uri: missing required field: add `uri:` "
        "under `db_service.databases[0]`",
        "teleport.yaml:5:15: db_service.databases[0].protocol: protocol mysql is not supported "
        "yet; use postgres",
        "teleport.yaml:6:5: db_service.databases[0].urii: unknown field; did you mean `uri`?",
        "teleport.yaml:8:12: ssh_service.enabled: teleport-db has no SSH service: set "
        'ssh_service.enabled to "no"',
    ]


def test_bad_token_entry_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match='must be "roles:token"'):
        load_config(Path("t.yaml"), "auth_service:\n  tokens: [just-a-secret]\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_a_dynamic_label_may_not_shadow_a_static_one() -> None:
    text = """\
db_service:
  databases:
  - name: pg
    protocol: postgres
    uri: localhost:5432
    labels:
      env: dev
    commands:
    - name: env
      command: [hostname]
"""
    with pytest.raises(ConfigError) as info:
        load_config(Path("teleport.yaml"), text)
    assert str(info.value) == (
        "teleport.yaml:9:13: db_service.databases[0].commands[0].name: dynamic label 'env' "
        "has the name of a static label; rename one of them"
    )


def test_server_idle_timeout_defaults_to_three_seconds_and_zero_turns_reuse_off() -> None:
    assert load_config(Path("t.yaml"), "db_service: {}\n").db_service.server_idle_timeout == "3s"
    for off in ("0", '"0"', "off", "no"):
        config = load_config(Path("t.yaml"), f"db_service:\n  server_idle_timeout: {off}\n")
        assert config.db_service.server_idle_timeout is None, off
    config = load_config(Path("t.yaml"), "db_service:\n  server_idle_timeout: 1m\n")
    assert config.db_service.server_idle_timeout == "1m"
    with pytest.raises(ConfigError) as info:
        load_config(Path("t.yaml"), "db_service:\n  server_idle_timeout: soon\n")
    assert str(info.value).startswith("t.yaml:2:24: db_service.server_idle_timeout:")
