"""`tctl lint` on directories: output formats, exit codes, what it refuses to read."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest

from control.lint import lint_directory, read_policy_dir
from schemas.policy.loader import MAX_FILE_BYTES
from schemas.policy.problems import RULES
from tests.policy.conftest import CASES, EXAMPLES, HERE, run_tctl, write_tree

SARIF_SCHEMA = json.loads((HERE / "data" / "sarif-schema-2.1.0.json").read_text())
# Errors and a warning, in two files, one with a ':' in a message.
MIXED = CASES / "unknown-role"


def sarif_errors(doc: dict) -> list[str]:
    validator_class = jsonschema.validators.validator_for(SARIF_SCHEMA)
    validator = validator_class(SARIF_SCHEMA, format_checker=validator_class.FORMAT_CHECKER)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """A copy of a broken case under a folder name with a space, as CI checkouts may have."""
    target = tmp_path / "my policies"
    shutil.copytree(MIXED, target)
    return target


def test_examples_are_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_tctl(capsys, "lint", str(EXAMPLES), "--strict")
    assert (code, err) == (0, "")
    assert out == "0 errors, 0 warnings in 8 files\n"


def test_text_paths_keep_the_folder_given(
    mixed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(mixed.parent)
    code, out, _ = run_tctl(capsys, "lint", "my policies/")
    assert code == 1
    expected = "".join(
        f"my policies/{line}\n" if ": " in line and not line[0].isdigit() else f"{line}\n"
        for line in (MIXED / "expected.txt").read_text().splitlines()
    )
    assert out == expected


def test_strict_fails_on_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    case = CASES / "warnings-wildcard-and-unused-role"
    assert run_tctl(capsys, "lint", str(case))[0] == 0
    code, out, _ = run_tctl(capsys, "lint", "--strict", str(case))
    assert code == 1
    assert out.endswith("0 errors, 4 warnings in 6 files\n")


def test_json_format(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_tctl(capsys, "lint", "--format", "json", str(mixed))
    assert code == 1
    doc = json.loads(out)
    assert doc["format"] == "teleport-db-lint/1"
    assert doc["source"] == {"path": str(mixed), "rev": None, "commit": None}
    assert doc["summary"] == {"files": 4, "errors": 2, "warnings": 1}
    assert doc["problems"][1] == {
        "path": f"{mixed}/users/alice.yaml",
        "line": 6,
        "col": 11,
        "severity": "error",
        "rule": "unknown-role",
        "resource": "user/alice",
        "field": "spec.roles[0]",
        "message": "role 'developr' does not exist; did you mean 'developer'?",
    }
    assert [p["severity"] for p in doc["problems"]] == ["warning", "error", "error"]


def test_json_clean(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_tctl(capsys, "lint", "--format=json", str(EXAMPLES))
    assert code == 0
    doc = json.loads(out)
    assert doc["problems"] == []
    assert doc["summary"] == {"files": 8, "errors": 0, "warnings": 0}


def test_github_format(
    mixed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(mixed.parent)
    code, out, _ = run_tctl(capsys, "lint", "--format", "github", "my policies")
    assert code == 1
    assert out.splitlines() == [
        "::warning file=my policies/roles/developer.yaml,line=4,col=9,"
        "title=tctl lint (unused-role)::role/developer: metadata.name: no user has this role: "
        "give it to a user in users/, or remove it",
        "::error file=my policies/users/alice.yaml,line=6,col=11,title=tctl lint (unknown-role)"
        "::user/alice: spec.roles[0]: role 'developr' does not exist; did you mean 'developer'?",
        "::error file=my policies/users/alice.yaml,line=6,col=21,title=tctl lint (unknown-role)"
        "::user/alice: spec.roles[1]: role 'auditor' does not exist; add it in roles/",
        "2 errors, 1 warning in 4 files",
    ]


def test_github_escapes_properties_and_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(CASES / "no-cluster-file", tmp_path / "a,b:c%d")
    monkeypatch.chdir(tmp_path)
    _, out, _ = run_tctl(capsys, "lint", "--format", "github", "a,b:c%d")
    first = out.splitlines()[0]
    assert first.startswith(
        "::error file=a%2Cb%3Ac%25d/cluster.yaml,title=tctl lint (cluster-missing)::"
    )


def test_sarif_validates_against_the_sarif_2_1_0_schema(
    mixed: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(mixed.parent)
    code, out, _ = run_tctl(capsys, "lint", "--format", "sarif", "my policies")
    assert code == 1
    doc = json.loads(out)
    assert sarif_errors(doc) == []
    run = doc["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == sorted(RULES)
    results = run["results"]
    assert [(r["ruleId"], r["level"]) for r in results] == [
        ("unused-role", "warning"),
        ("unknown-role", "error"),
        ("unknown-role", "error"),
    ]
    second = results[1]
    assert rules[second["ruleIndex"]]["id"] == "unknown-role"
    location = second["locations"][0]["physicalLocation"]
    assert location == {
        "artifactLocation": {"uri": "my%20policies/users/alice.yaml", "uriBaseId": "%SRCROOT%"},
        "region": {"startLine": 6, "startColumn": 11},
    }


@pytest.mark.parametrize("case", ["no-cluster-file", "yaml-tab-indent", "file-empty"])
def test_sarif_of_more_cases_validates(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = run_tctl(capsys, "lint", "--format", "sarif", str(CASES / case))
    doc = json.loads(out)
    assert sarif_errors(doc) == []
    assert doc["runs"][0]["results"]


def test_sarif_clean_run_and_a_broken_document_is_caught(
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = run_tctl(capsys, "lint", "--format", "sarif", str(EXAMPLES))
    doc = json.loads(out)
    assert sarif_errors(doc) == []
    assert doc["runs"][0]["results"] == []
    # The schema check is not vacuous: a wrong level is refused.
    doc["runs"][0]["results"] = [{"message": {"text": "x"}, "level": "fatal"}]
    assert sarif_errors(doc)


def test_every_rule_emitted_by_the_cases_is_catalogued(
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = set()
    for case in sorted(p for p in CASES.iterdir() if p.is_dir()):
        _, out, _ = run_tctl(capsys, "lint", "--format", "json", str(case))
        seen |= {p["rule"] for p in json.loads(out)["problems"]}
    # Files too large or symlinked are not kept as case files; the tests below cover them.
    assert seen == set(RULES) - {"file-too-large", "file-symlink"}


def test_symlinks_and_large_files_are_reported_not_read(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES, repo)
    outside = tmp_path / "secret.yaml"
    outside.write_text("kind: role\n")
    os.symlink(outside, repo / "roles" / "linked.yaml")
    os.symlink(tmp_path, repo / "users" / "elsewhere")
    (repo / "databases" / "big.yaml").write_bytes(b"#" * (MAX_FILE_BYTES + 1))
    files, problems, seen = read_policy_dir(repo)
    assert "roles/linked.yaml" not in files and "databases/big.yaml" not in files
    assert [(p.path, p.rule) for p in problems] == [
        ("roles/linked.yaml", "file-symlink"),
        ("users/elsewhere", "file-symlink"),
        ("databases/big.yaml", "file-too-large"),
    ]
    assert seen == 11
    report = lint_directory(str(repo))
    assert report.errors == 3
    assert report.warnings == 0  # unread files make "no user has this role" a guess


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["lint", "/nonexistent/policies"], "tctl: error: /nonexistent/policies does not exist\n"),
        (
            ["lint", str(EXAMPLES / "cluster.yaml")],
            f"tctl: error: {EXAMPLES / 'cluster.yaml'} is not a directory: give the root of "
            "a policy repository (the folder with cluster.yaml)\n",
        ),
    ],
)
def test_unreadable_input_is_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_tctl(capsys, *argv)
    assert (code, out, err) == (2, "", message)


def test_unreadable_file_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """A file tctl may not read is an I/O error (exit 2), not a lint result.

    Root reads every file, so as root the check runs tctl as an unprivileged user.
    """
    tctl = Path(sys.executable).parent / "tctl"
    work = Path(tempfile.mkdtemp(prefix="tctl-lint-perm-"))
    try:
        work.chmod(0o755)
        repo = work / "repo"
        shutil.copytree(EXAMPLES, repo)
        (repo / "roles" / "dba.yaml").chmod(0)
        if os.geteuid() != 0:
            code, out, err = run_tctl(capsys, "lint", str(repo))
        else:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                pytest.skip("running as root and there is no unprivileged user to switch to")
            done = subprocess.run(
                [
                    "setpriv",
                    f"--reuid={user.pw_uid}",
                    f"--regid={user.pw_gid}",
                    "--clear-groups",
                    tctl,
                    "lint",
                    str(repo),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            code, out, err = done.returncode, done.stdout, done.stderr
        assert (code, out) == (2, "")
        assert err == (
            f"tctl: error: cannot read {repo / 'roles' / 'dba.yaml'}: Permission denied\n"
        )
    finally:
        shutil.rmtree(work)


def test_bad_usage_is_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_tctl(capsys, "lint", "--format", "xml", str(EXAMPLES))
    assert code == 2
    assert out == ""
    assert "invalid choice: 'xml'" in err


def test_help_explains_formats_exit_codes_and_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run_tctl(capsys, "lint", "--help")
    assert code == 0
    for text in (
        "--rev REV",
        "--strict",
        "github",
        "sarif",
        "teleport-db-lint/1",
        "exit status:",
        "tctl lint --rev HEAD~1 .",
        "roles/**/*.yaml",
    ):
        assert text in out


def test_real_subprocess(tmp_path: Path) -> None:
    tctl = Path(sys.executable).parent / "tctl"
    assert tctl.exists(), "the tctl console script is installed with the package"
    repo = tmp_path / "repo"
    shutil.copytree(EXAMPLES, repo)
    clean = subprocess.run([tctl, "lint", str(repo)], capture_output=True, text=True, check=False)
    assert (clean.returncode, clean.stdout, clean.stderr) == (
        0,
        "0 errors, 0 warnings in 8 files\n",
        "",
    )
    write_tree(repo, {"users/carol.yaml": "kind: user\nversion: v2\nmetadata:\n  name: carol\n"})
    broken = subprocess.run(
        [tctl, "lint", "--format", "github", "."],
        capture_output=True,
        text=True,
        cwd=repo,
        check=False,
    )
    assert broken.returncode == 1
    assert broken.stdout.splitlines()[0] == (
        "::error file=users/carol.yaml,line=1,col=1,title=tctl lint (missing-field)"
        "::user/carol: spec: missing required field: add `spec:` at the top of the document"
    )
    assert "Traceback" not in broken.stderr
