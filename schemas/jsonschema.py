"""JSON Schemas of the policy kinds, generated from the pydantic models and checked in.

    python -m schemas.jsonschema --write   regenerate schemas/json/<kind>.schema.json
    python -m schemas.jsonschema --check   exit 1 if the checked-in files are stale

for the four kinds: role, user, db and cluster.

Editors with yaml-language-server complete and check policy files against them; a policy
file opts in with a modeline on its first line, e.g. for `policies/roles/dba.yaml`:

    # yaml-language-server: $schema=../../schemas/json/role.schema.json

The models stay the truth: the schemas only help a person while typing (they cannot say that
a regular expression compiles or that a role exists; `tctl lint` does). The generated text is
deterministic (sorted keys), so a stale file shows up as a diff and in the tests.

This module writes files only when run with `--write`; importing it does no I/O.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from schemas.policy.models import KINDS

SCHEMA_DIR = Path(__file__).resolve().parent / "json"
DIALECT = "https://json-schema.org/draft/2020-12/schema"

TITLES = {
    "role": "teleport-db role (kind: role, version: v5)",
    "user": "teleport-db user (kind: user, version: v2)",
    "db": "teleport-db database (kind: db, version: v3)",
    "cluster": "teleport-db cluster (kind: cluster, version: v1)",
}


def _close_pattern_maps(node: Any) -> None:
    """A mapping whose keys have a pattern (labels, traits) accepts no other key."""
    if isinstance(node, dict):
        if "patternProperties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close_pattern_maps(value)
    elif isinstance(node, list):
        for value in node:
            _close_pattern_maps(value)


def schema_for(kind: str) -> dict[str, Any]:
    model = KINDS[kind]
    schema = model.model_json_schema(mode="validation")
    _close_pattern_maps(schema)
    description = schema.get("description", "")
    schema.update(
        {
            "$schema": DIALECT,
            "title": TITLES[kind],
            "description": (
                f"{description} Generated from schemas/policy/models.py "
                "(python -m schemas.jsonschema --write); check files with `tctl lint`."
            ).strip(),
        }
    )
    return schema


def rendered() -> dict[Path, str]:
    """Every schema file's path and exact expected text."""
    return {
        SCHEMA_DIR / f"{kind}.schema.json": json.dumps(
            schema_for(kind), indent=2, sort_keys=True, ensure_ascii=False
        )
        + "\n"
        for kind in KINDS
    }


def stale() -> list[Path]:
    """Schema files that are missing or differ from what the models generate."""
    out = []
    for path, text in rendered().items():
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            out.append(path)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m schemas.jsonschema",
        description="Generate or check the JSON Schemas of the policy kinds in schemas/json/.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="(re)write the schema files")
    mode.add_argument("--check", action="store_true", help="exit 1 when a file is stale")
    args = parser.parse_args(argv)
    if args.write:
        SCHEMA_DIR.mkdir(exist_ok=True)
        for path, text in rendered().items():
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
        return 0
    outdated = stale()
    for path in outdated:
        print(f"{path} is stale", file=sys.stderr)
    if outdated:
        print("regenerate with: python -m schemas.jsonschema --write", file=sys.stderr)
        return 1
    print(f"{len(KINDS)} schemas up to date in {SCHEMA_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
