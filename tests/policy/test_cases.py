"""The broken policy repositories of tests/policy/cases/, each with its golden output.

Every case is a small repository; `expected.txt` beside its files is exactly what
`tctl lint` prints for it (run from inside the case, so paths are repository-relative).
To re-record after a deliberate change of wording: `UPDATE_GOLDEN=1 pytest tests/policy`,
then read every diff before committing it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.policy.conftest import CASES, run_tctl

CASE_DIRS = sorted(p for p in CASES.iterdir() if p.is_dir())


def test_there_are_at_least_30_broken_cases() -> None:
    assert len(CASE_DIRS) >= 30


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_case_prints_its_golden_output(
    case: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(case)
    code, out, err = run_tctl(capsys, "lint")
    golden = case / "expected.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        golden.write_text(out, encoding="utf-8")
    assert out == golden.read_text(encoding="utf-8")
    assert err == ""
    assert "Traceback" not in out
    has_errors = any(": error: " in line for line in out.splitlines())
    assert code == (1 if has_errors else 0)


@pytest.mark.parametrize("case", CASE_DIRS, ids=[p.name for p in CASE_DIRS])
def test_case_json_agrees_with_text(
    case: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(case)
    _, out, _ = run_tctl(capsys, "lint", "--format", "json")
    doc = json.loads(out)
    lines = (case / "expected.txt").read_text(encoding="utf-8").splitlines()
    assert len(doc["problems"]) == len(lines) - 1
    for problem, line in zip(doc["problems"], lines, strict=False):
        assert line.startswith(problem["path"])
        assert line.endswith(problem["message"])
        if problem["line"]:
            assert line.startswith(f"{problem['path']}:{problem['line']}:{problem['col']}: ")
