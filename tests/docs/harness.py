"""Run the guides in docs/ as a reader would: every ```` ```sh ```` block, in order, in one shell.

What a page may hold, and what the test does with it:

- ```` ```sh ```` blocks are run. A block whose lines start with `$ ` holds commands (the text
  after `$ `) each followed by the output it shows; a block without any `$ ` line holds only
  commands (one per line, `#` comments ignored). A command continues on the next line after
  a trailing backslash, and through the body of a here-document (`<<'EOF'` ... `EOF`).
- A command must exit 0, unless its line ends with a comment `# exits N`: it must then exit
  with N (an error shown on purpose). A command ending in `&` runs in the background, as in
  a shell: the test waits until the output lines shown under it have appeared, and stops it
  (SIGTERM) when the page is done.
- Shown output is compared loosely: each shown line must appear in the real output (stdout
  and stderr together, as a terminal shows them), in the same order, after collapsing runs
  of whitespace; `...` inside a line stands for any text, and a line that is only `...`
  stands for lines left out.
- Every other fenced block must say what it is (`text`, `yaml`, `json`, `sql`, `ini`,
  `conf`): `bash`, `shell`, `console` or a bare fence are refused, so that no shell block is
  left unchecked by accident. Illustrative commands (AWS, an editor, another host) go in
  ```` ```text ```` blocks, and the page says why they are not run.
- An HTML comment right before a block, invisible on the rendered page, tells the test
  more: `<!-- docs-test: file=NAME -->` writes the block's text to NAME (relative to the
  shell's working directory at that point), as the page asks the reader to save it;
  `<!-- docs-test: retry=SECONDS -->` runs an `sh` block again until it passes or the time
  is up, for what the cluster does "within a second" (a push reaching every agent).

The page's commands run against the world the page describes, with the substitutions of
`Substitutions` (documented there): the demo cluster's ports and directories, `sudo`, and
placeholders such as `<token>` that a reader copies from earlier output.

This module must never: run a page's command anywhere but in the page's own shell and
working directory, pass a command that failed or whose shown output is missing, or end a
process it did not start (it stops the page's background commands by their process ids and
the page's shell by its own process group).
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RUN_LANGS = {"sh"}
SHOWN_LANGS = {"text", "yaml", "json", "sql", "ini", "conf"}
REFUSED_LANGS = {"", "bash", "shell", "console", "zsh", "shell-session", "sh-session"}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_HEREDOC = re.compile(r"<<(-?)\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\2")
_EXITS = re.compile(r"\s#\s*exits\s+(\d+)\b[^\n]*$")


class PageError(Exception):
    """The page is malformed for the harness; the message names the page line."""


# --- parsing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One command of an `sh` block, with the output the page shows under it."""

    text: str
    line: int
    output: tuple[str, ...] = ()
    exit_code: int = 0
    background: bool = False


@dataclass(frozen=True)
class Block:
    """One fenced block of a page."""

    line: int
    lang: str
    body: str
    directives: Mapping[str, str] = field(default_factory=dict)

    @property
    def runs(self) -> bool:
        return self.lang in RUN_LANGS

    def commands(self) -> list[Command]:
        return parse_commands(self.body, self.line + 1)


def parse_blocks(text: str) -> list[Block]:
    """The fenced blocks of a Markdown page, with the directives just before each."""
    lines = text.split("\n")
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        indent = len(match["indent"])
        fence = match["fence"]
        lang = (match["info"].split() or [""])[0].lower()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            stripped = lines[i].strip()
            if stripped.startswith(fence[0] * len(fence)) and set(stripped) == {fence[0]}:
                break
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        else:
            raise PageError(f"line {start + 1}: code block is never closed")
        blocks.append(Block(start + 1, lang, "\n".join(body), _directives_before(lines, start)))
        i += 1
    return blocks


def _directives_before(lines: Sequence[str], fence_index: int) -> dict[str, str]:
    j = fence_index - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    out: dict[str, str] = {}
    while j >= 0:
        match = _DIRECTIVE.match(lines[j])
        if match is None:
            break
        for item in match["body"].split():
            key, _, value = item.partition("=")
            out[key] = value
        j -= 1
    return out


def parse_commands(body: str, first_line: int = 1) -> list[Command]:
    """The commands of an `sh` block (see the module docstring for the format)."""
    lines = body.split("\n")
    prompted = any(line.startswith("$ ") or line == "$" for line in lines)
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if prompted and not (line.startswith("$ ") or line == "$"):
            if line.strip():
                raise PageError(
                    f"line {first_line + i}: output line {line!r} comes before any `$ ` command"
                )
            i += 1
            continue
        if not prompted and (not line.strip() or line.lstrip().startswith("#")):
            i += 1
            continue
        start = i
        parts = [line[2:] if prompted else line]
        i += 1
        while parts[-1].endswith("\\") and i < len(lines):
            parts.append(lines[i])
            i += 1
        logical = "\n".join(parts)
        for strip_tabs, _quote, word in _HEREDOC.findall(logical):
            while True:
                if i >= len(lines):
                    raise PageError(
                        f"line {first_line + start}: here-document {word!r} is never closed"
                    )
                parts.append(lines[i])
                i += 1
                if (lines[i - 1].lstrip("\t") if strip_tabs else lines[i - 1]) == word:
                    break
        output: list[str] = []
        if prompted:
            while i < len(lines) and not (lines[i].startswith("$ ") or lines[i] == "$"):
                output.append(lines[i])
                i += 1
        exits = _EXITS.search(logical)
        code_part = _EXITS.sub("", logical).rstrip() if exits else logical.rstrip()
        background = code_part.endswith("&") and not code_part.endswith("&&")
        text = "\n".join(parts)
        if exits:
            text = text.replace(logical, code_part, 1)
        if background:
            text = text.replace(code_part, code_part[:-1].rstrip(), 1)
        commands.append(
            Command(
                text=text,
                line=first_line + start,
                output=tuple(o for o in output if o.strip()),
                exit_code=int(exits.group(1)) if exits else 0,
                background=background,
            )
        )
    return commands


# --- comparing output ----------------------------------------------------------------------


def normalize(line: str) -> str:
    return " ".join(line.split())


def line_matches(shown: str, real: str) -> bool:
    """Whether a shown output line matches a real one: whitespace collapsed, `...` = any."""
    pos = 0
    actual = normalize(real)
    for part in (normalize(p) for p in normalize(shown).split("...")):
        if not part:
            continue
        found = actual.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    return True


def missing_lines(shown: Sequence[str], real: Sequence[str]) -> list[str]:
    """The shown lines not found in `real`, each looked for after the previous match."""
    missing: list[str] = []
    at = 0
    for want in shown:
        if normalize(want) in ("", "..."):
            continue
        for j in range(at, len(real)):
            if line_matches(want, real[j]):
                at = j + 1
                break
        else:
            missing.append(want)
    return missing


# --- substitutions -------------------------------------------------------------------------


@dataclass
class Substitutions:
    """What the test replaces in a page's commands, files and shown output, and why.

    | in the page                 | replaced by                           | why               |
    | --------------------------- | ------------------------------------- | ----------------- |
    | `/tmp/teleport-demo`        | the test's demo data dir              | side by side      |
    | `/tmp/teleport-pg`          | a dir the postgres user can reach     | a page's own PG   |
    | `/var/lib/teleport` (also   | the same path under a test directory  | a page's own      |
    | in `/var/lib/teleport-db`)  |                                       | `teleport start`  |
    | `3080` `3081` `3082` `3083` | a block of free ports: web, tunnel,   | the demo's ports  |
    |                             | auth API, PostgreSQL                  |                   |
    | `3024` `3025`               | two more free ports                   | seed 001's ports  |
    | `5433`                      | another free port                     | a page's own PG   |
    | `sudo -u postgres `         | `runuser -u postgres -- `             | root, no sudo     |
    | `sudo `                     | nothing                               | tests run as root |
    | `<token>`                   | the last `The invite token: T` shown  | `tctl tokens add` |
    | `<signup-token>`            | the last `--signup-token=T` shown     | `tctl users add`  |
    | `<ca-pin>`                  | the last `sha256:<64 hex>` shown      | `tctl status` ... |
    | `<cluster>`                 | `root`                                | the demo's name   |

    Ports are replaced as whole numbers only. A placeholder used before the output that
    defines it was shown is an error of the page.
    """

    demo_dir: str
    pg_dir: str
    ports: Mapping[int, int]
    var_lib: str = "/var/lib"
    seen: list[str] = field(default_factory=list)

    CAPTURES = {
        "token": re.compile(r"The invite token: (\S+)"),
        "signup-token": re.compile(r"--signup-token=(\S+)"),
        "ca-pin": re.compile(r"(sha256:[0-9a-f]{64})"),
    }

    def __post_init__(self) -> None:
        numbers = "|".join(str(p) for p in sorted(self.ports))
        self._port = re.compile(rf"(?<![\d.])({numbers})(?![\d])")

    def captured(self, name: str) -> str | None:
        pattern = self.CAPTURES[name]
        for line in reversed(self.seen):
            found = pattern.findall(line)
            if found:
                return found[-1]
        return None

    def apply(self, text: str, where: str = "") -> str:
        text = text.replace("/tmp/teleport-demo", self.demo_dir)
        text = text.replace("/tmp/teleport-pg", self.pg_dir)
        text = text.replace("/var/lib/teleport", f"{self.var_lib}/teleport")
        text = self._port.sub(lambda m: str(self.ports[int(m.group(1))]), text)
        text = text.replace("sudo -u postgres ", "runuser -u postgres -- ")
        text = re.sub(r"(?<![\w-])sudo ", "", text)
        text = text.replace("<cluster>", "root")
        for name in self.CAPTURES:
            if f"<{name}>" in text:
                value = self.captured(name)
                if value is None:
                    raise PageError(f"{where}: <{name}> is used before any output showed it")
                text = text.replace(f"<{name}>", value)
        return text


# --- the page's shell ----------------------------------------------------------------------


@dataclass
class Result:
    exit_code: int
    output: list[str]
    pid: int | None = None


class ShellError(Exception):
    """The shell did not answer in time or went away; the message has its output so far."""


class Shell:
    """One bash for a whole page: `cd`, variables and background jobs carry over, as in a
    terminal. Standard error goes where standard output goes."""

    def __init__(self, cwd: Path, env: Mapping[str, str]) -> None:
        self._mark = f"__docs_test_{secrets.token_hex(6)}__"
        self._stdin_dir = cwd.parent / f".stdin-{secrets.token_hex(4)}"
        self._stdin_dir.mkdir(mode=0o700)
        self.proc = subprocess.Popen(
            ["bash", "--noprofile", "--norc"],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True, name="docs-shell")
        self._reader.start()
        self.background: list[int] = []
        self._send("exec 2>&1\n")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", errors="replace").rstrip("\n"))
        self._lines.put(None)

    def _send(self, script: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(script.encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise ShellError("the page's shell has exited") from None

    def _stdin_file(self, data: str | None) -> str:
        if data is None:
            return "/dev/null"
        path = self._stdin_dir / secrets.token_hex(4)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)
        return str(path)

    def run(self, text: str, stdin: str | None, timeout: float, background: bool) -> Result:
        source = self._stdin_file(stdin)
        if background:
            # A simple command in the background: $! is the command's own process.
            script = f"{text} < {source} &\nprintf '\\n{self._mark} 0 %s\\n' \"$!\"\n"
        else:
            script = f"{{ {text}\n}} < {source}\nprintf '\\n{self._mark} %s\\n' \"$?\"\n"
        self._send(script)
        output: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            line = self._next(deadline, output, text)
            if line.startswith(self._mark):
                fields = line.split()
                if output and output[-1] == "":
                    output.pop()  # the newline printed before the mark
                pid = int(fields[2]) if background else None
                if pid is not None:
                    self.background.append(pid)
                return Result(int(fields[1]), output, pid)
            output.append(line)

    def _next(self, deadline: float, so_far: list[str], what: str) -> str:
        try:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise ShellError(
                f"`{what}` did not finish in time; its output so far:\n" + "\n".join(so_far)
            ) from None
        if line is None:
            raise ShellError(f"the shell exited during `{what}`:\n" + "\n".join(so_far))
        return line

    def read_until(
        self, done: Callable[[list[str]], bool], timeout: float, pid: int | None = None
    ) -> list[str]:
        """More output (from background commands) until `done(lines)`, the timeout, or (with
        `pid`) that process has exited and its last output was read."""
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while not done(lines) and time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.2)
            except queue.Empty:
                if pid is not None and not _alive(pid):
                    break
                continue
            if line is None:
                break
            lines.append(line)
        return lines

    def drain(self) -> list[str]:
        lines: list[str] = []
        with contextlib.suppress(queue.Empty):
            while True:
                line = self._lines.get_nowait()
                if line is None:
                    break
                lines.append(line)
        return lines

    def close(self, grace: float = 30.0) -> None:
        """Stop background commands (newest first, SIGTERM, then SIGKILL), then the shell."""
        for pid in reversed(self.background):
            _stop_pid(pid, grace)
        with contextlib.suppress(ShellError, OSError):
            self._send("exit\n")
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # Whatever is left in the shell's own process group (a pipeline's helper) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for path in self._stdin_dir.iterdir():
            path.unlink()
        self._stdin_dir.rmdir()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _stop_pid(pid: int, grace: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- running a page ------------------------------------------------------------------------


@dataclass
class PageRun:
    """Runs one page's blocks in order in one shell, checking each command."""

    page: Path
    shell: Shell
    subs: Substitutions
    stdin_for: Callable[[str], str | None]
    timeout: float = 90.0
    background_timeout: float = 90.0
    transcript: list[str] = field(default_factory=list)
    _started: float = 0.0

    def where(self, line: int) -> str:
        return f"{self.page.name}:{line}"

    def run(self) -> None:
        self._started = time.monotonic()
        blocks = parse_blocks(self.page.read_text())
        for block in blocks:
            if block.lang in REFUSED_LANGS:
                raise PageError(
                    f"{self.where(block.line)}: a ```{block.lang} block: mark shell blocks "
                    "```sh (run by the tests) or ```text (not run), and other blocks by "
                    "their language"
                )
            if block.lang not in RUN_LANGS | SHOWN_LANGS:
                raise PageError(f"{self.where(block.line)}: unknown block language {block.lang!r}")
            if "file" in block.directives:
                self._write_file(block)
            if block.runs:
                self._run_block(block)

    def _write_file(self, block: Block) -> None:
        name = self.subs.apply(block.directives["file"], self.where(block.line))
        target = Path(name)
        if not target.is_absolute():
            # Where the page's shell is now (after its `cd`s).
            target = Path(os.readlink(f"/proc/{self.shell.proc.pid}/cwd")) / target
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(self.subs.apply(block.body, self.where(block.line)) + "\n")

    def _run_block(self, block: Block) -> None:
        retry = float(block.directives.get("retry") or 0)
        deadline = time.monotonic() + retry
        while True:
            try:
                for command in block.commands():
                    self._run_command(command)
                return
            except CommandFailed:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.5)

    def _run_command(self, command: Command) -> None:
        where = self.where(command.line)
        text = self.subs.apply(command.text, where)
        shown = [self.subs.apply(line, where) for line in command.output]
        self.transcript.append(f"[{time.monotonic() - self._started:6.1f}s] $ {text}")
        if command.background:
            result = self.shell.run(text, self.stdin_for(text), 30, background=True)
            out = list(result.output)
            out += self.shell.read_until(
                lambda more: not missing_lines(shown, out + more),
                self.background_timeout,
                result.pid,
            )
            if result.pid is not None and not _alive(result.pid) and missing_lines(shown, out):
                out.append("[the background command has exited]")
        else:
            result = self.shell.run(text, self.stdin_for(text), self.timeout, background=False)
            out = result.output
        self.transcript.extend(out)
        self.subs.seen.extend(out)
        if not command.background and result.exit_code != command.exit_code:
            raise CommandFailed(
                f"{where}: `{text}` exited {result.exit_code}, the page expects "
                f"{command.exit_code}\n--- its output:\n" + "\n".join(out)
            )
        missing = missing_lines(shown, out)
        if missing:
            raise CommandFailed(
                f"{where}: `{text}` did not show these lines of the page:\n  "
                + "\n  ".join(missing)
                + "\n--- its output:\n"
                + "\n".join(out)
            )


class CommandFailed(AssertionError):
    """A command of the page failed, or did not show what the page says it shows."""


@contextlib.contextmanager
def postgres_area(prefix: str) -> Iterator[Path]:
    """A directory under /tmp that the postgres OS user can reach (0711 all the way), for a
    page's own PostgreSQL; servers left running in it are stopped afterwards."""
    import shutil  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        for pid_file in base.rglob("postmaster.pid"):
            subprocess.run(
                ["runuser", "-u", "postgres", "--", "pg_ctl", "-D", str(pid_file.parent),
                 "stop", "-m", "immediate"],
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)
