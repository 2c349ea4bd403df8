"""The guides in docs/ run: every command a page shows is run, and its shown output checked.

Each page runs in a shell of its own, in a fresh working directory and HOME, with the
environment the page states: most pages start `teleport demo` in their first block and
export TELEPORT_DATA_DIR, TELEPORT_HOME and PGSERVICEFILE; configuration.md and audit.md
start their own cluster from configuration files. The test adds only the venv's bin
directory to PATH, a git identity (GIT_AUTHOR_* / GIT_COMMITTER_*) and no PG*, TELEPORT_*
or AWS_* variables. What it replaces in a page (ports, directories, `sudo`, placeholders
such as `<token>`) is the table of `tests.docs.harness.Substitutions`: a page never runs
on fixed ports, in the real HOME or in the real /var/lib/teleport.

Passwords: `tsh login` reads the password from standard input when it is not a terminal.
The test gives it the password a reader would type:

| command                                  | standard input                                  |
| ---------------------------------------- | ----------------------------------------------- |
| `tsh login ... --signup-token=...`       | `PASSWORD` (the new user chooses it)            |
| `tsh login` as alice (or with no --user) | alice's password, as `teleport demo` printed it |
| `tsh login --user=OTHER`                 | `PASSWORD`                                      |
| anything else                            | nothing (/dev/null)                             |

How the harness reads a page (blocks, `$ ` lines, `# exits N`, `&`, `...`, the
`<!-- docs-test: ... -->` directives) is described in `tests/docs/harness.py`; the first
tests below pin that down on small pages of their own, so that a page that drifts from the
product does fail.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

import pytest
from pydantic import BaseModel

from schemas.config import FileConfig
from schemas.policy.problems import RULES
from tests.docs.harness import (
    Block,
    CommandFailed,
    PageError,
    PageRun,
    Shell,
    Substitutions,
    line_matches,
    missing_lines,
    parse_blocks,
    parse_commands,
    postgres_area,
)
from tests.ports import free_port_block

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
PASSWORD = "correct horse battery staple"
# The guides that run; docs/architecture.md is about the code and shows no commands.
PAGES = [
    "self-hosted-postgres.md",
    "rbac.md",
    "configuration.md",
    "ci-lint.md",
    "audit.md",
    "rds-aurora.md",
]
_ALICE_PASSWORD = re.compile(r"alice's password: ([^\s)]+)")


def page_env(home: Path) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "TELEPORT_", "AWS_", "GIT_"))
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        HOME=str(home),
        GIT_AUTHOR_NAME="Docs Reader",
        GIT_AUTHOR_EMAIL="reader@example.com",
        GIT_COMMITTER_NAME="Docs Reader",
        GIT_COMMITTER_EMAIL="reader@example.com",
        LC_ALL="C.UTF-8",
    )
    return env


def stdin_for(subs: Substitutions) -> Callable[[str], str | None]:
    """Standard input for a command, as the table of the module docstring says."""

    def choose(command: str) -> str | None:
        if not re.search(r"\btsh\s+login\b", command):
            return None
        if "--signup-token" in command:
            return PASSWORD + "\n"
        user = re.search(r"--user[= ](\S+)", command)
        if user is None or user.group(1) == "alice":
            for line in reversed(subs.seen):
                found = _ALICE_PASSWORD.search(line)
                if found:
                    return found.group(1) + "\n"
            raise PageError(f"`{command}`: alice's password was never shown (teleport demo)")
        return PASSWORD + "\n"

    return choose


def run_page(page: Path, tmp_path: Path) -> list[str]:
    """Run every block of `page` as the module docstring says; returns the transcript."""
    home = tmp_path / "home"
    home.mkdir()
    base = free_port_block(7)
    with postgres_area("teleport-docs-") as area:
        # The working directory is where the postgres OS user can enter too (pg_ctl and
        # psql run as that user start in it).
        work = area / "work"
        work.mkdir()
        subs = Substitutions(
            demo_dir=str(tmp_path / "teleport-demo"),
            pg_dir=str(area / "teleport-pg"),
            ports={3080: base, 3081: base + 1, 3082: base + 2, 3083: base + 3,
                   3024: base + 4, 3025: base + 5, 5433: base + 6},
            var_lib=str(tmp_path / "var" / "lib"),
        )
        shell = Shell(work, page_env(home))
        run = PageRun(page, shell, subs, stdin_for(subs))
        try:
            run.run()
        except (CommandFailed, PageError) as exc:
            tail = "\n".join(run.transcript[-60:])
            pytest.fail(f"{exc}\n\n--- the page's last commands and output:\n{tail}", False)
        finally:
            shell.close()
    return run.transcript


# --- the harness itself --------------------------------------------------------------------


def test_prompted_block_separates_commands_and_output() -> None:
    body = (
        "$ tctl lint .\n"
        "0 errors, 0 warnings in 9 files\n"
        "$ tsh db login \\\n"
        "    --db-user=bob sales   # exits 1\n"
        "tsh: error: access denied: ...\n"
        "$ teleport start --roles=db &\n"
        "... tunnel to proxy ... is up\n"
        "$ cat > a.yaml <<'EOF'\n"
        "kind: role\n"
        "$ not a command\n"
        "EOF\n"
        "$ echo done\n"
    )
    commands = parse_commands(body, first_line=10)
    assert [c.line for c in commands] == [10, 12, 15, 17, 21]
    assert commands[0].output == ("0 errors, 0 warnings in 9 files",)
    assert commands[1].text == "tsh db login \\\n    --db-user=bob sales"
    assert commands[1].exit_code == 1
    assert commands[1].output == ("tsh: error: access denied: ...",)
    assert commands[2].background and commands[2].text == "teleport start --roles=db"
    assert commands[3].text == "cat > a.yaml <<'EOF'\nkind: role\n$ not a command\nEOF"
    assert commands[3].output == ()
    assert commands[4].text == "echo done" and commands[4].exit_code == 0


def test_bare_block_is_commands_only() -> None:
    commands = parse_commands("# a comment\ngit add roles\n\ngit commit -m x && git push\n")
    assert [c.text for c in commands] == ["git add roles", "git commit -m x && git push"]
    assert all(c.output == () and not c.background for c in commands)


def test_output_before_any_command_is_a_page_error() -> None:
    with pytest.raises(PageError, match="line 3: output line 'stray'"):
        parse_commands("stray\n$ true\n", first_line=3)


def test_blocks_languages_and_directives() -> None:
    page = (
        "Text\n\n"
        "<!-- docs-test: file=agent.yaml -->\n"
        "```yaml\nteleport: {}\n```\n\n"
        "<!-- docs-test: retry=20 -->\n\n"
        "```sh\n$ tsh db ls\n```\n"
        "1. a list\n\n   ```text\n   indented\n   ```\n"
    )
    blocks = parse_blocks(page)
    assert blocks == [
        Block(4, "yaml", "teleport: {}", {"file": "agent.yaml"}),
        Block(10, "sh", "$ tsh db ls", {"retry": "20"}),
        Block(15, "text", "indented", {}),
    ]
    with pytest.raises(PageError, match="never closed"):
        parse_blocks("```sh\n$ true\n")


def test_loose_matching() -> None:
    assert line_matches("Name  Description   Labels", "Name Description Labels  ")
    assert line_matches("tsh login --proxy=... --signup-token=...", "tsh login --proxy=a:1 "
                        "--user=bob --signup-token=XYZ")
    assert not line_matches("serial 3", "serial 4")
    real = ["a", "b", "c"]
    assert missing_lines(["a", "...", "c"], real) == []
    assert missing_lines(["c", "a"], real) == ["a"]  # order matters
    assert missing_lines(["d"], real) == ["d"]


def test_substitutions() -> None:
    subs = Substitutions("/x/demo", "/y/pg", {3080: 41000, 5433: 41010})
    assert subs.apply("tsh login --proxy=localhost:3080 # 30800 13080") == (
        "tsh login --proxy=localhost:41000 # 30800 13080"
    )
    assert subs.apply("sudo -u postgres pg_ctl -D /tmp/teleport-pg/data; sudo tctl x") == (
        "runuser -u postgres -- pg_ctl -D /y/pg/data; tctl x"
    )
    assert subs.apply("ls /tmp/teleport-demo/audit") == "ls /x/demo/audit"
    with pytest.raises(PageError, match="<token> is used before"):
        subs.apply("--token=<token>", "p.md:3")
    subs.seen += ["The invite token: abc123", "pin sha256:" + "ab" * 32]
    assert subs.apply("--token=<token> --ca-pin=<ca-pin>") == (
        "--token=abc123 --ca-pin=sha256:" + "ab" * 32
    )


def _run_tiny_page(tmp_path: Path, text: str) -> list[str]:
    page = tmp_path / "tiny.md"
    page.write_text(text)
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    subs = Substitutions(str(tmp_path / "demo"), str(tmp_path / "pg"), {3080: 3080})
    shell = Shell(work, page_env(tmp_path))
    run = PageRun(page, shell, subs, lambda _c: None, timeout=20, background_timeout=5)
    try:
        run.run()
    finally:
        shell.close(grace=5)
    return run.transcript


def test_tiny_page_passes_with_state_files_and_background(tmp_path: Path) -> None:
    transcript = _run_tiny_page(
        tmp_path,
        "<!-- docs-test: file=conf/a.txt -->\n"
        "```text\nhello from a file\n```\n\n"
        "```sh\n"
        "$ cd conf && export WHO=reader\n"
        "$ cat a.txt; echo \"$WHO\" >&2\n"
        "hello  from a file\n"
        "reader\n"
        "$ ls missing   # exits 2\n"
        "ls: cannot access 'missing': ...\n"
        "$ (sleep 0.2; echo ready; sleep 60) &\n"
        "ready\n"
        "```\n",
    )
    assert "reader" in transcript


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ("$ echo hi\nbye\n", "did not show these lines"),
        ("$ false\n", "exited 1, the page expects 0"),
        ("$ true   # exits 1\n", "exited 0, the page expects 1"),
        ("$ (sleep 0.1; echo other) &\nready\n", "did not show these lines"),
    ],
)
def test_tiny_page_fails_when_the_product_differs(
    tmp_path: Path, block: str, message: str
) -> None:
    with pytest.raises(CommandFailed, match=message):
        _run_tiny_page(tmp_path, f"```sh\n{block}```\n")


def test_unmarked_shell_blocks_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PageError, match="mark shell blocks"):
        _run_tiny_page(tmp_path, "```bash\nrm -rf /nothing-here\n```\n")


# --- the pages -----------------------------------------------------------------------------


def _config_keys(model: type[BaseModel] = FileConfig, prefix: str = "") -> list[str]:
    """Every key of teleport.yaml as a dotted path; `[]` marks a list of mappings."""
    keys = []
    for name, info in model.model_fields.items():
        inner, many = _model_in(info.annotation)
        path = f"{prefix}{name}{'[]' if inner is not None and many else ''}"
        if inner is None:
            keys.append(path)
        else:
            keys.extend(_config_keys(inner, f"{path}."))
    return keys


def _model_in(annotation: object) -> tuple[type[BaseModel] | None, bool]:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _model_in(args[0])
    if origin is list:
        return _model_in(args[0])[0], True
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None):
                return _model_in(arg)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _commands() -> dict[str, list[str]]:
    """Every leaf command of the four programs, with its option strings."""
    from control.tctl import build_parser as tctl  # noqa: PLC0415
    from dataplane.cli import build_parser as agent  # noqa: PLC0415
    from dataplane.tsh.cli import build_parser as tsh  # noqa: PLC0415
    from launcher.cli import build_parser as teleport  # noqa: PLC0415

    found: dict[str, list[str]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs:
            found[name] = [
                o for a in parser._actions for o in a.option_strings if o not in ("-h", "--help")
            ]
        for action in subs:
            for sub_name, sub in action.choices.items():
                walk(sub, f"{name} {sub_name}")

    for build, name in ((teleport, "teleport"), (agent, "teleport-agent"), (tctl, "tctl"),
                        (tsh, "tsh")):
        walk(build(), name)
    return found


def _section(text: str, heading: str) -> str | None:
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("#") and line.lstrip("#").strip() == heading:
            level = len(line) - len(line.lstrip("#"))
            ends = [
                j
                for j in range(i + 1, len(lines))
                if lines[j].startswith("#") and len(lines[j]) - len(lines[j].lstrip("#")) <= level
            ]
            end = ends[0] if ends else len(lines)
            return "\n".join(lines[i + 1 : end])
    return None


def test_ci_lint_page_lists_every_lint_rule() -> None:
    text = (DOCS / "ci-lint.md").read_text()
    missing = [rule for rule in RULES if f"| `{rule}` | {RULES[rule][0]} |" not in text]
    assert missing == [], f"ci-lint.md's rule table lacks: {missing}"


def test_configuration_page_names_every_teleport_yaml_key() -> None:
    text = (DOCS / "configuration.md").read_text()
    keys = _config_keys()
    assert "db_service.databases[].commands[].period" in keys  # the walk reaches down
    missing = [key for key in keys if f"`{key}`" not in text]
    assert missing == [], f"configuration.md does not describe: {missing}"


def test_configuration_page_has_every_command_and_flag() -> None:
    text = (DOCS / "configuration.md").read_text()
    commands = _commands()
    assert "--db-service" in commands["tctl auth sign"]
    problems = []
    for command, options in commands.items():
        section = _section(text, f"`{command}`")
        if section is None:
            problems.append(f"no section `{command}`")
            continue
        problems += [f"{command} {o}" for o in options if o not in section]
    assert problems == [], f"configuration.md lacks: {problems}"


def test_every_guide_is_run_and_linked_from_the_readme() -> None:
    on_disk = {p.name for p in DOCS.glob("*.md")} - {"architecture.md"}
    assert on_disk == set(PAGES)
    readme = (ROOT / "README.md").read_text()
    for name in PAGES:
        assert f"(docs/{name})" in readme, name


@pytest.mark.parametrize("name", PAGES)
def test_page_is_well_formed(name: str) -> None:
    """Fast: every block is marked, every `sh` block parses, placeholders are known ones."""
    blocks = parse_blocks((DOCS / name).read_text())
    assert any(b.runs for b in blocks), f"{name} runs no command"
    for block in blocks:
        assert block.lang not in ("", "bash", "shell", "console"), f"{name}:{block.line}"
        if block.runs:
            for command in block.commands():
                for placeholder in re.findall(r"<([a-z][a-z-]*)>", command.text):
                    assert placeholder in (*Substitutions.CAPTURES, "cluster"), (
                        f"{name}:{command.line}: unknown placeholder <{placeholder}>"
                    )


@pytest.mark.slow
@pytest.mark.parametrize("name", PAGES)
def test_page_commands_run(name: str, tmp_path: Path) -> None:
    run_page(DOCS / name, tmp_path)
