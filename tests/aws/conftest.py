"""Fixtures of the AWS tests: an AWS environment isolated from the machine, test credentials,
and the "RDS root CA" with the stand-in's server certificate.

`aws_env` (function): every AWS_* variable of the caller removed; AWS_CONFIG_FILE and
AWS_SHARED_CREDENTIALS_FILE point at empty files in a temp directory (the test writes
them to give profiles), HOME too, and AWS_EC2_METADATA_DISABLED=true, so boto3's default
chain can only find what the test puts there. Tests set credentials in the environment
or in those files: these are test keys, never real ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from botocore.credentials import Credentials

from tests.fixtures.certs import IssuedCert, LocalCA

# AWS's documentation example key pair; it signs nothing real.
TEST_KEY = Credentials("AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
OTHER_KEY = Credentials("AKIAI44QH8DHBEXAMPLE", "je7MtGbClwBF/2Zp9Utk/h3yCo8nvbEXAMPLEKEY")


@dataclass
class AwsEnv:
    """The isolated AWS configuration of one test."""

    monkeypatch: pytest.MonkeyPatch
    config_file: Path
    credentials_file: Path

    def use_environment(self, credentials: Credentials) -> None:
        self.monkeypatch.setenv("AWS_ACCESS_KEY_ID", credentials.access_key)
        self.monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", credentials.secret_key)
        if credentials.token is not None:
            self.monkeypatch.setenv("AWS_SESSION_TOKEN", credentials.token)

    def write_credentials(self, **profiles: Credentials) -> None:
        """The shared credentials file with one section per profile."""
        lines = []
        for name, creds in profiles.items():
            lines += [
                f"[{name}]",
                f"aws_access_key_id = {creds.access_key}",
                f"aws_secret_access_key = {creds.secret_key}",
            ]
            if creds.token is not None:
                lines.append(f"aws_session_token = {creds.token}")
        self.credentials_file.write_text("\n".join(lines) + "\n")


@pytest.fixture
def aws_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AwsEnv:
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    home = tmp_path / "home"
    home.mkdir()
    config = tmp_path / "aws-config"
    credentials = tmp_path / "aws-credentials"
    config.write_text("")
    credentials.write_text("")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return AwsEnv(monkeypatch, config, credentials)


@dataclass(frozen=True)
class RdsPki:
    """A stand-in for the RDS root CA, and the certificate the stand-in presents."""

    ca: LocalCA
    server: IssuedCert


@pytest.fixture(scope="session")
def rds_pki(tmp_path_factory: pytest.TempPathFactory) -> RdsPki:
    ca = LocalCA(tmp_path_factory.mktemp("rds-ca"), "test stand-in for the RDS root CA")
    return RdsPki(ca=ca, server=ca.issue_server(file_stem="rds-endpoint"))
