"""The layer rules of docs/architecture.md, checked on every module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = {"schemas", "transport", "control", "dataplane", "launcher"}
ALLOWED = {
    "schemas": {"schemas"},
    "transport": {"schemas", "transport"},
    "control": {"schemas", "transport", "control"},
    "dataplane": {"schemas", "transport", "dataplane"},
    "launcher": OURS,
}
# Sans-IO modules: they turn bytes into objects and back, and never wait or touch the network.
SANS_IO = ["dataplane/postgres", "schemas/policy"]
IO_MODULES = {"asyncio", "socket", "ssl", "selectors", "uvloop", "subprocess", "time"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_their_layer_allows(package: str) -> None:
    wrong = []
    for path in _modules(package):
        for name in _imports(path):
            top = name.split(".")[0]
            if top in OURS and top not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "layer rule broken:\n" + "\n".join(wrong)


@pytest.mark.parametrize("folder", SANS_IO)
def test_sans_io_modules_do_no_io(folder: str) -> None:
    wrong = []
    for path in _modules(folder):
        for name in _imports(path):
            if name.split(".")[0] in IO_MODULES:
                wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "sans-IO module does I/O:\n" + "\n".join(wrong)
