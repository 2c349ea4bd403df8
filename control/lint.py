"""`tctl lint`'s engine: read a policy repository, validate it, print the problems.

Two sources: a directory as it is on disk (`lint_directory`), or the tree of one git commit
(`lint_revision`: never the working tree, so uncommitted edits and later commits play no
part). Both end in `schemas.policy.loader.load_policy`, the same check the control plane and
the pre-receive hook run, so a clean lint means the control plane will accept the commit.

Problem paths are shown the way the person named the repository: `tctl lint policies/`
prints `policies/roles/dba.yaml:9:5: ...`, which is also what CI annotations need (paths
from the repository root, where CI runs).

Output formats (`FORMATTERS`):
- `text`: one problem per line, `path:line:col: severity: KIND/NAME: field: message`, then
  a summary line such as `2 errors, 1 warning in 14 files`.
- `json`: one object, stable (fields are only ever added):
  `{"format": "teleport-db-lint/1", "source": {"path", "rev", "commit"},
  "summary": {"files", "errors", "warnings"}, "problems": [{"path", "line", "col",
  "severity", "rule", "resource", "field", "message"}]}`; `rev` and `commit` are null for
  a directory; `line`/`col` are 1-based, 0 for a problem about a whole file.
- `github`: GitHub Actions workflow commands, `::error file=...,line=...,col=...,title=...::`
  (and `::warning`), then the summary line.
- `sarif`: SARIF 2.1.0 with the rule catalogue (`schemas.policy.problems.RULES`), one result
  per problem, physical locations relative to the repository root.

Reading a directory never follows symbolic links and never reads a file over the size
limit: both become problems, as in the git reader.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import quote

from schemas.policy.loader import (
    CLUSTER_FILES,
    FOLDERS,
    MAX_FILE_BYTES,
    load_policy,
    policy_kind,
    symlinked,
    too_large,
)
from schemas.policy.problems import RULES, Problem

JSON_FORMAT = "teleport-db-lint/1"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
TOOL_NAME = "tctl lint"


class LintInputError(Exception):
    """The repository cannot be read at all (missing, not a directory, unreadable)."""


@dataclass(frozen=True)
class LintReport:
    """Problems of one repository, with paths as the person named them."""

    problems: list[Problem]
    files: int
    path: str  # the repository as given on the command line
    rev: str | None = None
    commit: str | None = None

    @property
    def errors(self) -> int:
        return sum(1 for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> int:
        return sum(1 for p in self.problems if p.severity == "warning")

    def exit_code(self, *, strict: bool = False) -> int:
        """0 clean, 1 on errors (and on warnings when strict)."""
        return 1 if self.errors or (strict and self.warnings) else 0

    def summary(self) -> str:
        def count(n: int, word: str) -> str:
            return f"{n} {word}{'' if n == 1 else 's'}"

        out = (
            f"{count(self.errors, 'error')}, {count(self.warnings, 'warning')} "
            f"in {count(self.files, 'file')}"
        )
        if self.commit:
            out += f" at commit {self.commit[:12]} ({self.rev})"
        return out


def read_policy_dir(root: Path) -> tuple[dict[str, bytes], list[Problem], int]:
    """The policy files under `root`: contents, problems of files not read, files seen."""
    if not root.exists():
        raise LintInputError(f"{root} does not exist")
    if not root.is_dir():
        raise LintInputError(
            f"{root} is not a directory: give the root of a policy repository (the folder "
            "with cluster.yaml)"
        )
    files: dict[str, bytes] = {}
    problems: list[Problem] = []
    seen = 0

    def take(path: Path, rel: str) -> None:
        nonlocal seen
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise LintInputError(f"cannot read {path}: {exc.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            seen += 1
            problems.append(symlinked(rel))
            return
        if not stat.S_ISREG(st.st_mode) or policy_kind(rel) is None:
            return
        seen += 1
        if st.st_size > MAX_FILE_BYTES:
            problems.append(too_large(rel, st.st_size))
            return
        try:
            with open(path, "rb") as f:
                # Sized from the stat: a 1 MiB read buffer per file, shrunk afterwards,
                # fragments the heap (80 MB for 21,000 small files).
                data = f.read(st.st_size + 1)
                if len(data) > st.st_size:  # it grew since the stat: read the rest
                    data += f.read(MAX_FILE_BYTES + 1 - len(data))
        except OSError as exc:
            raise LintInputError(f"cannot read {path}: {exc.strerror}") from None
        if len(data) > MAX_FILE_BYTES:
            problems.append(too_large(rel, len(data)))
            return
        files[rel] = data

    for name in CLUSTER_FILES:
        take(root / name, name)
    for folder in FOLDERS:
        top = root / folder
        if top.is_symlink():
            seen += 1
            problems.append(symlinked(folder))
            continue
        if not top.is_dir():
            continue

        def walk_error(exc: OSError) -> None:
            raise LintInputError(f"cannot read {exc.filename}: {exc.strerror}")

        for dirpath, dirnames, filenames in os.walk(top, onerror=walk_error):
            base = Path(dirpath)
            rel_base = base.relative_to(root).as_posix()
            for d in sorted(dirnames):
                if (base / d).is_symlink():
                    seen += 1
                    problems.append(symlinked(f"{rel_base}/{d}"))
            for filename in sorted(filenames):
                take(base / filename, f"{rel_base}/{filename}")
    return files, problems, seen


def _display_prefix(path: str) -> str:
    norm = os.path.normpath(path)
    return "" if norm == "." else norm.replace(os.sep, "/") + "/"


def _finish(
    path: str,
    files: dict[str, bytes],
    read_problems: list[Problem],
    seen: int,
    rev: str | None = None,
    commit: str | None = None,
) -> LintReport:
    result = load_policy(files, unread=[p.path for p in read_problems])
    prefix = _display_prefix(path)
    problems = sorted([*read_problems, *result.problems], key=lambda p: p.sort_key)
    if prefix:
        problems = [replace(p, path=prefix + p.path) for p in problems]
    return LintReport(problems, seen, path, rev, commit)


def lint_directory(path: str) -> LintReport:
    """Lint the policy repository in directory `path`, as the files are on disk."""
    files, problems, seen = read_policy_dir(Path(path))
    return _finish(path, files, problems, seen)


def lint_revision(path: str, rev: str) -> LintReport:
    """Lint the tree of commit `rev` of the repository holding `path` (or of its folder
    `path` inside that repository), ignoring the working tree entirely."""
    # GitPython is imported only when a commit is linted: a directory lint starts faster.
    from control.gitsource import (  # noqa: PLC0415
        GitSourceError,
        find_repository,
        read_policy_files,
    )

    target = Path(path)
    if not target.exists():
        raise LintInputError(f"{path} does not exist")
    found = find_repository(target)
    if found is None:
        raise LintInputError(f"{path} is not in a git repository (needed for --rev)")
    repo, subdir = found
    try:
        snapshot = read_policy_files(repo, rev, subdir=subdir)
    except GitSourceError as exc:
        raise LintInputError(str(exc)) from None
    seen = len(snapshot.files) + len(snapshot.problems)
    return _finish(path, snapshot.files, snapshot.problems, seen, rev, snapshot.commit)


# --- formats ------------------------------------------------------------------------------


def format_text(report: LintReport) -> str:
    lines = [p.render(severity=True) for p in report.problems]
    lines.append(report.summary())
    return "\n".join(lines) + "\n"


def problem_dict(p: Problem) -> dict[str, Any]:
    return {
        "path": p.path,
        "line": p.line,
        "col": p.col,
        "severity": p.severity,
        "rule": p.rule,
        "resource": p.resource,
        "field": p.field,
        "message": p.message,
    }


def format_json(report: LintReport) -> str:
    doc = {
        "format": JSON_FORMAT,
        "source": {"path": report.path, "rev": report.rev, "commit": report.commit},
        "summary": {"files": report.files, "errors": report.errors, "warnings": report.warnings},
        "problems": [problem_dict(p) for p in report.problems],
    }
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _gh_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _gh_prop(text: str) -> str:
    return _gh_data(text).replace(":", "%3A").replace(",", "%2C")


def _detail(p: Problem) -> str:
    """The problem without its location: `KIND/NAME: field: message`."""
    return ": ".join(part for part in (p.resource, p.field, p.message) if part)


def format_github(report: LintReport) -> str:
    lines = []
    for p in report.problems:
        props = [f"file={_gh_prop(p.path)}"]
        if p.line:
            props.append(f"line={p.line}")
            if p.col:
                props.append(f"col={p.col}")
        props.append(f"title={_gh_prop(f'{TOOL_NAME} ({p.rule})')}")
        lines.append(f"::{p.severity} {','.join(props)}::{_gh_data(_detail(p))}")
    lines.append(report.summary())
    return "\n".join(lines) + "\n"


def _version() -> str:
    try:
        return metadata.version("teleport-db")
    except metadata.PackageNotFoundError:
        return "0"


def format_sarif(report: LintReport) -> str:
    rule_ids = sorted(RULES)
    index = {rule: i for i, rule in enumerate(rule_ids)}
    rules = [
        {
            "id": rule,
            "name": "".join(word.capitalize() for word in rule.split("-")),
            "shortDescription": {"text": RULES[rule][1]},
            "defaultConfiguration": {"level": RULES[rule][0]},
        }
        for rule in rule_ids
    ]
    results = []
    for p in report.problems:
        location: dict[str, Any] = {
            "artifactLocation": {"uri": quote(p.path), "uriBaseId": "%SRCROOT%"}
        }
        if p.line:
            region = {"startLine": p.line}
            if p.col:
                region["startColumn"] = p.col
            location["region"] = region
        result: dict[str, Any] = {
            "ruleId": p.rule,
            "level": p.severity,
            "message": {"text": _detail(p)},
            "locations": [{"physicalLocation": location}],
        }
        if p.rule in index:
            result["ruleIndex"] = index[p.rule]
        results.append(result)
    run: dict[str, Any] = {
        "tool": {
            "driver": {
                "name": TOOL_NAME,
                "version": _version(),
                "rules": rules,
            }
        },
        "columnKind": "unicodeCodePoints",
        "results": results,
    }
    if report.commit:
        run["properties"] = {"rev": report.rev, "commit": report.commit}
    doc = {"$schema": SARIF_SCHEMA, "version": "2.1.0", "runs": [run]}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


FORMATTERS: dict[str, Callable[[LintReport], str]] = {
    "text": format_text,
    "json": format_json,
    "github": format_github,
    "sarif": format_sarif,
}
