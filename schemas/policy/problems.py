"""Lint diagnostics: one `Problem` per thing wrong (or risky) in a policy repository.

A problem says where (repository-relative path, 1-based line and column), what resource and
field it concerns, what is wrong and what to do next. `str(problem)` is the one-line form
`path:line:col: KIND/NAME: field.path: message`; parts that are empty (a problem about the
whole repository has no line; a YAML syntax error has no resource) are left out.

`RULES` is the catalogue of rule ids: every problem carries one, and the SARIF output lists
them. Rule ids are stable: tools and people may filter on them.

This module holds plain data only: it never reads files or formats for a particular tool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]

# rule id -> (default severity, one-line description)
RULES: dict[str, tuple[Severity, str]] = {
    "file-encoding": ("error", "A policy file is not valid UTF-8 text."),
    "file-too-large": ("error", "A policy file is larger than the per-file limit."),
    "file-symlink": ("error", "A policy file is a symbolic link; links are not followed."),
    "empty-file": ("warning", "A policy file holds no resource."),
    "yaml-syntax": ("error", "The file is not valid YAML."),
    "yaml-duplicate-key": ("error", "A mapping names the same key twice."),
    "yaml-key": ("error", "A mapping key is not a plain string."),
    "yaml-alias": ("error", "A YAML alias is recursive or expands to too much data."),
    "yaml-tag": ("error", "An explicit YAML tag other than the core ones (!!binary, !custom)."),
    "not-a-mapping": ("error", "A document is not a mapping of kind, version, metadata, spec."),
    "unknown-kind": ("error", "A document's kind is not one of role, user, db, cluster."),
    "wrong-folder": ("error", "A resource is in the folder of another kind."),
    "missing-field": ("error", "A required field is missing."),
    "unknown-field": ("error", "A field the resource does not have (a typo, or misplaced)."),
    "invalid-type": ("error", "A value has the wrong type (text, number, list, mapping)."),
    "invalid-value": ("error", "A value is not allowed here."),
    "invalid-name": ("error", "A resource name, label key or trait name has bad characters."),
    "invalid-template": ("error", "A template variable is unknown or malformed."),
    "invalid-regex": ("error", "A ^...$ regular expression does not compile."),
    "invalid-duration": ("error", "A TTL is not a valid duration."),
    "invalid-address": ("error", "A database address is not host:port."),
    "unsupported-version": ("error", "The resource version is not supported."),
    "unsupported-protocol": ("error", "The database protocol is not supported."),
    "refused-field": ("error", "A field that is not allowed in the policy repository."),
    "aws-region-missing": ("error", "An AWS RDS/Aurora database has no region."),
    "duplicate-name": ("error", "Two resources of one kind have the same name."),
    "unknown-role": ("error", "A user names a role that does not exist."),
    "cluster-missing": ("error", "The repository has no cluster.yaml."),
    "cluster-duplicate": ("error", "The repository has more than one cluster resource."),
    "wildcard-db-users": ("warning", "A role allows every database user and denies none."),
    "unused-role": ("warning", "No user has this role."),
    "trait-pattern": ("warning", "A trait value looks like a pattern, but traits are literal."),
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One diagnostic. Lines and columns are 1-based; 0 means "the whole file"."""

    path: str
    line: int
    col: int
    severity: Severity
    resource: str  # "role/dba", or "" when the problem is not about one resource
    field: str  # "spec.allow.db_labels.env", or "" when it is about the whole resource
    message: str
    rule: str

    @property
    def location(self) -> str:
        """`path:line:col`, `path:line` or `path`, as much as is known."""
        out = self.path
        if self.line > 0:
            out += f":{self.line}"
            if self.col > 0:
                out += f":{self.col}"
        return out

    def render(self, *, severity: bool = False) -> str:
        """The one-line form; with `severity`, `error:`/`warning:` follows the location."""
        parts = [self.location]
        if severity:
            parts.append(self.severity)
        parts.extend(p for p in (self.resource, self.field) if p)
        parts.append(self.message)
        return ": ".join(parts)

    def __str__(self) -> str:
        return self.render()

    @property
    def sort_key(self) -> tuple[str, int, int, str, str]:
        return (self.path, self.line, self.col, self.rule, self.message)
