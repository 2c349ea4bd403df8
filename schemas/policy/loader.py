"""A policy repository's files to a validated `Policy`, or to problems with positions.

`load_policy(files)` takes repository-relative paths and their bytes (read by the caller from
a directory or from a git commit's tree) and returns a `LoadResult`: the `Policy` when there
is no error, and every problem found, sorted by path, line and column.

Layout of a policy repository:

    cluster.yaml            exactly one (or cluster.yml), the cluster resource
    roles/**/*.yaml|yml     role resources
    users/**/*.yaml|yml     user resources
    databases/**/*.yaml|yml db resources

Any other file is ignored. A file may hold several documents separated by `---`.

Each document is parsed once (`schemas.policy.yamlsource`) into plain values and positions,
validated by the strict models (`schemas.policy.models`), and every pydantic error is mapped
back to `file:line:col`: "missing" errors point at the parent key, unknown fields at the
offending key, everything else at the value. Then the cross-resource checks run: duplicate
names, users naming roles that do not exist, one cluster. Two warnings flag risky policy: a
role allowing every database user with no deny rule, and a role no user has.

This module is sans-IO: it never reads a file, a clock or the network.
"""

from __future__ import annotations

import difflib
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from schemas.policy.models import (
    AWS_REGION_RE,
    KINDS,
    LABEL_KEY_PATTERN,
    NAME_PATTERN,
    Cluster,
    Database,
    Policy,
    PolicyValueError,
    Role,
    User,
)
from schemas.policy.problems import Problem, Severity
from schemas.policy.yamlsource import Document, Path, Position, parse_yaml
from schemas.rbac import is_pattern

MAX_FILE_BYTES = 1 << 20  # 1 MiB per policy file

CLUSTER_FILES = ("cluster.yaml", "cluster.yml")
FOLDERS: dict[str, str] = {"roles": "role", "users": "user", "databases": "db"}
FOLDER_OF_KIND: dict[str, str] = {
    "role": "roles/",
    "user": "users/",
    "db": "databases/",
    "cluster": "cluster.yaml",
}
_NOUN = {"role": "role", "user": "user", "db": "database", "cluster": "cluster"}


def policy_kind(path: str) -> str | None:
    """The kind of resource a repository path holds, or None if it is not a policy file."""
    if path in CLUSTER_FILES:
        return "cluster"
    folder, sep, rest = path.partition("/")
    if not sep or folder not in FOLDERS or not rest.endswith((".yaml", ".yml")):
        return None
    return FOLDERS[folder]


def is_policy_folder(path: str) -> bool:
    """Whether a repository-relative directory can hold policy files (to prune walks)."""
    return path.split("/", 1)[0] in FOLDERS


def too_large(path: str, size: int) -> Problem:
    """The problem for a policy file over `MAX_FILE_BYTES` (the reader skips it)."""
    return Problem(
        path,
        0,
        0,
        "error",
        "",
        "",
        f"the file is {size} bytes, over the limit of {MAX_FILE_BYTES} bytes per policy "
        "file; split it into several files",
        "file-too-large",
    )


def symlinked(path: str) -> Problem:
    """The problem for a symbolic link where policy files live (readers never follow one)."""
    return Problem(
        path,
        0,
        0,
        "error",
        "",
        "",
        "the file is a symbolic link; links are not followed: put the file itself here",
        "file-symlink",
    )


@dataclass(frozen=True)
class LoadResult:
    """The policy (None when there is any error) and every problem, sorted."""

    policy: Policy | None
    problems: list[Problem]
    files: int = 0  # policy files read

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


# --- pydantic errors to problems ---------------------------------------------------------

_PATTERNS = {
    NAME_PATTERN: (
        "is not a valid name: use letters, digits, '.', '_' and '-', start and end with a "
        "letter or digit, at most 64 characters",
        "invalid-name",
    ),
    LABEL_KEY_PATTERN: (
        "is not a valid label key: use letters, digits, '/', '.', '_', ':' and '-', start "
        "and end with a letter or digit, at most 64 characters (or '*' for any label)",
        "invalid-name",
    ),
    AWS_REGION_RE.pattern: ("is not an AWS region such as us-east-1", "invalid-value"),
}
_TRAIT_NAME = "is not a valid trait name: use letters, digits, '_' and '-', starting with a letter"

_TYPE_ERRORS = {
    "string_type": "expected text",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "bool_type": "expected true or false",
}


def _shorten(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def describe(value: Any) -> str:
    """How a person would name a value they wrote in YAML."""
    if value is None:
        return "an empty value"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"the number {_shorten(repr(value))}"
    if isinstance(value, str):
        return f"the text {_shorten(value)!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _type_hint(value: Any, expected: str) -> str:
    if expected == "expected text" and isinstance(value, bool):
        return (
            "; YAML reads true/false, yes/no and on/off as booleans: quote the value "
            "to keep it as text"
        )
    if expected == "expected text" and isinstance(value, int | float):
        return "; quote the value to keep it as text"
    if expected == "expected text" and isinstance(value, list | dict):
        return "; write a single value"
    if expected == "expected a list" and isinstance(value, str):
        return f"; write [{value}] for a list of one"
    if expected == "expected a mapping" and value is None:
        return "; add the fields under it, or remove the key"
    return ""


def _unwrap(t: Any) -> Any:
    while True:
        origin = get_origin(t)
        if origin is Annotated:
            t = get_args(t)[0]
        elif origin is Union or origin is types.UnionType:
            args = [a for a in get_args(t) if a is not type(None)]
            if len(args) != 1:
                return t
            t = args[0]
        else:
            return t


def _model_at(model: type[BaseModel], loc: Path) -> type[BaseModel] | None:
    """The model class validating the mapping at `loc` inside `model`, if there is one."""
    t: Any = model
    for part in loc:
        t = _unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            if not isinstance(part, str) or part not in t.model_fields:
                return None
            t = t.model_fields[part].annotation
        elif get_origin(t) is list:
            t = get_args(t)[0]
        elif get_origin(t) is dict:
            t = get_args(t)[1]
        else:
            return None
    t = _unwrap(t)
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def field_path(loc: Path) -> str:
    """`("spec", "roles", 0)` -> `spec.roles[0]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _nearest(doc: Document, loc: Path) -> Position:
    """The value position of `loc`, or of its longest prefix present in the document."""
    for n in range(len(loc), -1, -1):
        pos = doc.value_position(loc[:n])
        if pos is not None:
            return pos
    return doc.start


@dataclass
class _Context:
    path: str
    doc: Document
    model: type[BaseModel]
    resource: str
    problems: list[Problem]

    def add(
        self, pos: Position, loc: Path, message: str, rule: str, severity: Severity = "error"
    ) -> None:
        self.problems.append(
            Problem(
                self.path,
                pos.line,
                pos.col,
                severity,
                self.resource,
                field_path(loc),
                message,
                rule,
            )
        )


def _report(ctx: _Context, err: Mapping[str, Any]) -> None:
    """One pydantic error as a problem, pointed at the right line and column."""
    doc = ctx.doc
    loc: Path = tuple(err["loc"])
    kind: str = err["type"]
    value = err.get("input")
    context = err.get("ctx") or {}
    on_key = False
    if loc and loc[-1] == "[key]":
        loc = loc[:-1]
        on_key = True
        value = loc[-1]

    if kind == "missing":
        parent = loc[:-1]
        pos = doc.key_position(parent) if parent else doc.start
        where = f"under `{field_path(parent)}`" if parent else "at the top of the document"
        ctx.add(
            pos or _nearest(doc, parent),
            loc,
            f"missing required field: add `{loc[-1]}:` {where}",
            "missing-field",
        )
        return

    if kind == "extra_forbidden":
        allowed = _model_at(ctx.model, loc[:-1])
        names = sorted(allowed.model_fields) if allowed is not None else []
        message = "unknown field"
        close = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean `{close[0]}`?"
        elif names:
            message += f"; expected one of: {', '.join(names)}"
        ctx.add(doc.key_position(loc) or _nearest(doc, loc), loc, message, "unknown-field")
        return

    error = context.get("error")
    if isinstance(error, PolicyValueError):
        loc = loc + error.at
        if loc and isinstance(loc[-1], int) and doc.value_position(loc) is None:
            loc = loc[:-1]  # `env: prod` validated as `env: [prod]`: blame the scalar
        pos = doc.key_position(loc) if error.on_key else None
        ctx.add(pos or _nearest(doc, loc), loc, str(error), error.rule)
        return

    pos = (doc.key_position(loc) if on_key else None) or _nearest(doc, loc)
    if kind in _TYPE_ERRORS:
        expected = _TYPE_ERRORS[kind]
        message = f"{expected}, got {describe(value)}{_type_hint(value, expected)}"
        ctx.add(pos, loc, message, "invalid-type")
    elif kind == "literal_error":
        expected = str(context.get("expected", ""))
        field = loc[-1] if loc else ""
        rule = {"version": "unsupported-version", "protocol": "unsupported-protocol"}.get(
            str(field), "invalid-value"
        )
        ctx.add(pos, loc, f"expected {expected}, got {describe(value)}", rule)
    elif kind == "string_pattern_mismatch":
        text, rule = _PATTERNS.get(str(context.get("pattern")), (_TRAIT_NAME, "invalid-name"))
        ctx.add(pos, loc, f"{_shorten(str(value))!r} {text}", rule)
    elif kind == "too_short" and loc == ("spec", "roles"):
        ctx.add(
            pos, loc, "a user needs at least one role: list it under spec.roles", "invalid-value"
        )
    elif kind == "too_short":
        ctx.add(pos, loc, f"expected at least {context.get('min_length')} item(s)", "invalid-value")
    else:
        message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        ctx.add(pos, loc, message, "invalid-value")


# --- documents ------------------------------------------------------------------------


@dataclass(slots=True)
class _Declared:
    """Where a resource's name was written, for cross-resource checks."""

    path: str
    pos: Position
    resource: str


@dataclass
class _State:
    problems: list[Problem] = field(default_factory=list)
    roles: dict[str, Role] = field(default_factory=dict)
    users: dict[str, User] = field(default_factory=dict)
    databases: dict[str, Database] = field(default_factory=dict)
    clusters: list[tuple[Cluster, _Declared]] = field(default_factory=list)
    cluster_docs: list[_Declared] = field(default_factory=list)
    declared: dict[tuple[str, str], _Declared] = field(default_factory=dict)
    # role name -> [(path, position, resource, index)] of users naming it
    role_refs: dict[str, list[tuple[str, Position, str, int]]] = field(default_factory=dict)
    role_decl: dict[str, _Declared] = field(default_factory=dict)
    # Kinds with a file that could not be read whole: names of that kind may be missing,
    # so "does not exist" and "no user has" would be guesses.
    unreadable: set[str] = field(default_factory=set)


def _resource_label(kind: str, value: dict[str, Any]) -> tuple[str, str | None]:
    metadata = value.get("metadata")
    name = metadata.get("name") if isinstance(metadata, dict) else None
    if isinstance(name, str) and name:
        return f"{kind}/{name}", name
    return kind, None


def _document(state: _State, path: str, folder_kind: str, doc: Document) -> None:
    value = doc.value
    where = FOLDER_OF_KIND[folder_kind]
    if not isinstance(value, dict):
        state.problems.append(
            Problem(
                path,
                doc.start.line,
                doc.start.col,
                "error",
                "",
                "",
                f"a resource is a mapping with kind, version, metadata and spec; "
                f"this document is {describe(value)}",
                "not-a-mapping",
            )
        )
        return
    declared_kind = value.get("kind", folder_kind)
    kind = declared_kind if isinstance(declared_kind, str) and declared_kind in KINDS else None
    resource, name = _resource_label(kind or folder_kind, value)
    if kind is None:
        if name is not None:  # it was meant to be one: users naming it are not wrong too
            state.declared.setdefault((folder_kind, name), _Declared(path, doc.start, resource))
        pos = doc.value_position(("kind",)) or doc.start
        if isinstance(declared_kind, str):
            shown = repr(_shorten(declared_kind))
        else:
            shown = describe(declared_kind)
        state.problems.append(
            Problem(
                path,
                pos.line,
                pos.col,
                "error",
                resource,
                "kind",
                f"unknown kind {shown}: resources in {where} are `kind: {folder_kind}`",
                "unknown-kind",
            )
        )
        return
    if kind != folder_kind:
        pos = doc.value_position(("kind",)) or doc.start
        state.problems.append(
            Problem(
                path,
                pos.line,
                pos.col,
                "error",
                resource,
                "kind",
                f"a {_NOUN[kind]} does not belong in {where}: move it to "
                f"{FOLDER_OF_KIND[kind]}, or fix the kind",
                "wrong-folder",
            )
        )
        return

    name_pos = doc.value_position(("metadata", "name")) or doc.start
    declared = _Declared(path, name_pos, resource)
    if kind == "cluster":
        state.cluster_docs.append(declared)
    elif name is not None:
        first = state.declared.get((kind, name))
        if first is None:
            state.declared[(kind, name)] = declared
        else:
            state.problems.append(
                Problem(
                    path,
                    name_pos.line,
                    name_pos.col,
                    "error",
                    resource,
                    "metadata.name",
                    f"{_NOUN[kind]} {name!r} is already defined at "
                    f"{first.path}:{first.pos.line}:{first.pos.col}; rename or remove one",
                    "duplicate-name",
                )
            )
    if kind == "user":
        spec = value.get("spec")
        roles = spec.get("roles") if isinstance(spec, dict) else None
        if isinstance(roles, list):
            for i, role in enumerate(roles):
                if isinstance(role, str):
                    pos = doc.value_position(("spec", "roles", i)) or doc.start
                    state.role_refs.setdefault(role, []).append((path, pos, resource, i))

    model = KINDS[kind]
    try:
        obj = model.model_validate(value)
    except ValidationError as exc:
        ctx = _Context(path, doc, model, resource, state.problems)
        for err in exc.errors(include_url=False):
            _report(ctx, err)
        return

    if isinstance(obj, Role):
        if name not in state.role_decl:
            state.role_decl[obj.metadata.name] = declared
            state.roles[obj.metadata.name] = obj
        if "*" in obj.spec.allow.db_users and not obj.spec.deny.db_users:
            loc: Path = ("spec", "allow", "db_users", obj.spec.allow.db_users.index("*"))
            ctx = _Context(path, doc, model, resource, state.problems)
            ctx.add(
                _nearest(doc, loc),
                loc[:-1],
                "allows every database user ('*') and denies none: add spec.deny.db_users "
                "(e.g. [postgres]) so superuser accounts stay out of reach",
                "wildcard-db-users",
                "warning",
            )
    elif isinstance(obj, User):
        state.users.setdefault(obj.metadata.name, obj)
        for trait, values in obj.spec.traits.items():
            for i, text in enumerate(values):
                if is_pattern(text):
                    loc = ("spec", "traits", trait, i)
                    _Context(path, doc, model, resource, state.problems).add(
                        _nearest(doc, loc),
                        loc,
                        f"{text!r} is taken literally: a role template never turns a trait "
                        "into a wildcard or a regular expression; write the pattern in the "
                        "role instead"
                        + (f" ({trait}: ['*'] allows every one)"
                           if trait in ("db_users", "db_names") else ""),
                        "trait-pattern",
                        "warning",
                    )
    elif isinstance(obj, Database):
        state.databases.setdefault(obj.metadata.name, obj)
    elif isinstance(obj, Cluster):
        state.clusters.append((obj, declared))


def _cross_checks(state: _State, cluster_files: list[str]) -> None:
    add = state.problems.append
    if not cluster_files:
        # An unread cluster file (too large, a link) was reported by the reader.
        if "cluster" not in state.unreadable:
            add(
                Problem(
                    "cluster.yaml",
                    0,
                    0,
                    "error",
                    "",
                    "",
                    "the repository has no cluster.yaml: add one at its root (kind: cluster, "
                    "version: v1, metadata.name: the cluster's name)",
                    "cluster-missing",
                )
            )
    elif len(cluster_files) > 1:
        add(
            Problem(
                cluster_files[1],
                0,
                0,
                "error",
                "",
                "",
                f"both {cluster_files[0]} and {cluster_files[1]} exist; keep exactly one",
                "cluster-duplicate",
            )
        )
    elif len(state.cluster_docs) > 1:
        first = state.cluster_docs[0]
        for extra in state.cluster_docs[1:]:
            add(
                Problem(
                    extra.path,
                    extra.pos.line,
                    extra.pos.col,
                    "error",
                    extra.resource,
                    "",
                    f"a second cluster resource (the first is at {first.path}:"
                    f"{first.pos.line}:{first.pos.col}); a repository describes one cluster",
                    "cluster-duplicate",
                )
            )
    elif not state.cluster_docs and not any(
        p.path == cluster_files[0] and p.severity == "error" for p in state.problems
    ):
        add(
            Problem(
                cluster_files[0],
                0,
                0,
                "error",
                "",
                "",
                "the file holds no cluster resource: write kind: cluster, version: v1, "
                "metadata.name",
                "cluster-missing",
            )
        )

    role_names = sorted(name for kind, name in state.declared if kind == "role")
    known = set(role_names)
    for role, refs in state.role_refs.items():
        if role in known or "role" in state.unreadable:
            continue
        close = difflib.get_close_matches(role, role_names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "add it in roles/"
        for path, pos, resource, i in refs:
            add(
                Problem(
                    path,
                    pos.line,
                    pos.col,
                    "error",
                    resource,
                    f"spec.roles[{i}]",
                    f"role {role!r} does not exist; {hint}",
                    "unknown-role",
                )
            )
    for name, decl in state.role_decl.items():
        if name not in state.role_refs and "user" not in state.unreadable:
            add(
                Problem(
                    decl.path,
                    decl.pos.line,
                    decl.pos.col,
                    "warning",
                    decl.resource,
                    "metadata.name",
                    "no user has this role: give it to a user in users/, or remove it",
                    "unused-role",
                )
            )


# YAML problems after which every document of the file was still read.
_KEEPS_DOCUMENTS = {"yaml-duplicate-key", "yaml-key"}
_M = TypeVar("_M", bound=BaseModel)


def load_policy(files: Mapping[str, bytes], unread: Iterable[str] = ()) -> LoadResult:
    """Validate a policy repository given as `{relative path: bytes}`.

    `unread` names policy files the caller could not read (too large, symbolic links; the
    caller reports those): names they may define are unknown, so no "does not exist" or
    "no user has" problem is raised for their kind.
    """
    state = _State()
    for path in unread:
        kind = policy_kind(path) or FOLDERS.get(path.split("/", 1)[0])
        if kind is not None:
            state.unreadable.add(kind)
    cluster_files: list[str] = []
    count = 0
    for path in sorted(files):
        folder_kind = policy_kind(path)
        if folder_kind is None:
            continue
        count += 1
        data = files[path]
        if folder_kind == "cluster":
            cluster_files.append(path)
        if len(data) > MAX_FILE_BYTES:
            state.problems.append(too_large(path, len(data)))
            state.unreadable.add(folder_kind)
            continue
        parsed = parse_yaml(data, path)
        state.problems.extend(parsed.problems)
        if any(p.rule not in _KEEPS_DOCUMENTS for p in parsed.problems):
            state.unreadable.add(folder_kind)
        if not parsed.documents and not parsed.problems and folder_kind != "cluster":
            state.problems.append(
                Problem(
                    path,
                    0,
                    0,
                    "warning",
                    "",
                    "",
                    "the file holds no resource; remove it or add one",
                    "empty-file",
                )
            )
        for doc in parsed.documents:
            _document(state, path, folder_kind, doc)
    _cross_checks(state, cluster_files)

    problems = sorted(state.problems, key=lambda p: p.sort_key)
    policy = None
    if not any(p.severity == "error" for p in problems) and len(state.clusters) == 1:
        policy = Policy(
            cluster=state.clusters[0][0],
            roles=state.roles,
            users=state.users,
            databases=state.databases,
        )
    return LoadResult(policy, problems, count)


def validate_yaml(
    data: bytes | str, path: str, model: type[_M], resource: str = ""
) -> tuple[_M | None, list[Problem]]:
    """Validate a single-document YAML file (such as `teleport.yaml`) with `model`.

    The same positions and messages as policy files: every problem points at its line and
    column. Returns the model, or None and the problems.
    """
    parsed = parse_yaml(data, path)
    problems = list(parsed.problems)
    if problems:
        return None, sorted(problems, key=lambda p: p.sort_key)
    if len(parsed.documents) != 1 or not isinstance(parsed.documents[0].value, dict):
        found = "no document" if not parsed.documents else "not a single mapping"
        problem = Problem(
            path,
            1,
            1,
            "error",
            resource,
            "",
            f"expected one mapping, found {found}",
            "yaml-structure",
        )
        return None, [problem]
    doc = parsed.documents[0]
    try:
        return model.model_validate(doc.value), []
    except ValidationError as exc:
        ctx = _Context(path, doc, model, resource, problems)
        for err in exc.errors():
            _report(ctx, err)
        return None, sorted(problems, key=lambda p: p.sort_key)
