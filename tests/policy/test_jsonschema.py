"""The checked-in JSON Schemas (`schemas/json/`) match the models and help in editors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jsonschema
import pytest
import yaml

from schemas import jsonschema as generator
from tests.policy.conftest import CASES, EXAMPLES

SCHEMAS = {
    kind: json.loads((generator.SCHEMA_DIR / f"{kind}.schema.json").read_text())
    for kind in ("role", "user", "db", "cluster")
}
MODELINE = re.compile(r"^# yaml-language-server: \$schema=(\S+)$", re.MULTILINE)


def validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(SCHEMAS[kind])


def test_checked_in_schemas_are_up_to_date() -> None:
    stale = generator.stale()
    assert not stale, f"stale: {stale}; run: python -m schemas.jsonschema --write"


def test_check_fails_when_stale_and_write_fixes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "json"
    shutil.copytree(generator.SCHEMA_DIR, copy)
    monkeypatch.setattr(generator, "SCHEMA_DIR", copy)
    assert generator.main(["--check"]) == 0
    role = copy / "role.schema.json"
    role.write_text(role.read_text().replace('"const": "role"', '"const": "rol"'))
    (copy / "db.schema.json").unlink()
    assert generator.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert f"{role} is stale" in err and "db.schema.json is stale" in err
    assert "python -m schemas.jsonschema --write" in err
    assert generator.main(["--write"]) == 0
    assert generator.main(["--check"]) == 0


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
def test_schemas_are_valid_and_carry_kind_and_version(kind: str) -> None:
    schema = SCHEMAS[kind]
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"].startswith("teleport-db ")
    assert schema["description"]
    assert schema["properties"]["kind"]["const"] == kind
    assert (
        schema["properties"]["version"]["const"]
        == {
            "role": "v5",
            "user": "v2",
            "db": "v3",
            "cluster": "v1",
        }[kind]
    )
    assert schema["additionalProperties"] is False


def test_every_example_file_names_its_schema_and_validates_against_it() -> None:
    files = sorted(EXAMPLES.rglob("*.yaml"))
    assert len(files) == 8
    for path in files:
        text = path.read_text()
        match = MODELINE.search(text.splitlines()[0])
        assert match, f"{path} has no yaml-language-server modeline on its first line"
        schema_path = (path.parent / match.group(1)).resolve()
        assert schema_path.parent == generator.SCHEMA_DIR
        kind = yaml.safe_load(text)["kind"]
        assert schema_path.name == f"{kind}.schema.json"
        errors = [e.message for e in validator(kind).iter_errors(yaml.safe_load(text))]
        assert errors == [], path


def test_schemas_catch_what_an_editor_should_flag() -> None:
    role = yaml.safe_load((EXAMPLES / "roles" / "developer.yaml").read_text())
    role["spec"]["allow"]["db_lables"] = role["spec"]["allow"].pop("db_labels")
    assert not validator("role").is_valid(role)
    one_value = {
        "kind": "role",
        "version": "v5",
        "metadata": {"name": "r"},
        "spec": {"allow": {"db_labels": {"env": "dev"}}},
    }
    assert validator("role").is_valid(one_value)  # `env: dev` is a list of one
    one_value["spec"]["allow"]["db_labels"] = {"bad key": "x"}
    assert not validator("role").is_valid(one_value)
    db = yaml.safe_load((EXAMPLES / "databases" / "local.yaml").read_text())
    db["spec"]["dynamic_labels"] = {}
    assert not validator("db").is_valid(db)
    cluster = yaml.safe_load((CASES / "ttl-invalid-and-zero" / "cluster.yaml").read_text())
    cluster["spec"] = {"certificate_ttl": "8hours"}
    assert not validator("cluster").is_valid(cluster)
    cluster["spec"] = {"certificate_ttl": "1h30m"}
    assert validator("cluster").is_valid(cluster)
