"""Dynamic labels: a db agent's label values computed by commands it runs (seed 000).

    db_service:
      databases:
      - name: aurora
        labels: {env: stage}
        commands:
        - name: time
          command: ["date", "+%H:%M:%S"]
          period: 1m

Each command runs at start and then every `period`, without a shell (argv as written, no
expansion), stdin from /dev/null, in its own process group, with a timeout (by default the
smaller of the period and 30 s; a command still running then is killed with its children).
Its standard output, decoded as UTF-8 and stripped of surrounding white space, is the
label's value until the next run.

A command that fails (cannot start, exits non-zero, is killed by the timeout, prints more
than `max_output` bytes or text that is not UTF-8) leaves its label WITHOUT a value until a
later run succeeds: the label is absent from `labels()`, and the reason is kept in
`errors()` and logged (once per change of reason, not every period). The value from an
earlier successful run is dropped on purpose: RBAC fails closed, so an allow rule that
selects on this label (even `key: '*'`) no longer matches while its value cannot be
computed, and access it would grant is withheld. The flip side, documented for policy
authors: a deny rule keyed on a dynamic label does not match while that label is absent,
so deny on static labels, or on a dynamic label whose command cannot fail quietly.

Static and dynamic labels of one database share one namespace: a command may not use the
name of a static label (refused when the agent starts). The commands come only from the
agent's own configuration file, never from the policy repository or the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from schemas.api import DatabaseInfo
from schemas.config import DatabaseConfig
from schemas.durations import parse_duration

log = logging.getLogger("teleport.cluster.labels")

DEFAULT_MAX_TIMEOUT_S = 30.0
DEFAULT_MAX_OUTPUT = 4096
_MAX_PARALLEL = 4
_STDERR_KEPT = 512

LabelsListener = Callable[[str, dict[str, str]], None]


@dataclass(frozen=True)
class LabelCommandSpec:
    database: str
    name: str
    argv: tuple[str, ...]
    period: float
    timeout: float


class CommandFailed(Exception):
    """One run of a label command produced no value; the message says why."""


class DynamicLabels:
    """Static plus command-computed labels of the databases in an agent's configuration."""

    def __init__(
        self,
        databases: Sequence[DatabaseConfig],
        *,
        timeout: float | None = None,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> None:
        self._static: dict[str, dict[str, str]] = {}
        self._info: dict[str, DatabaseConfig] = {}
        self.commands: list[LabelCommandSpec] = []
        for db in databases:
            if db.name in self._static:
                raise ValueError(f"database {db.name!r} is configured twice")
            self._static[db.name] = dict(db.labels)
            self._info[db.name] = db
            # One source per label and sane periods are checked by schemas.config.
            for cmd in db.commands:
                period = parse_duration(cmd.period).total_seconds()
                limit = timeout if timeout is not None else min(period, DEFAULT_MAX_TIMEOUT_S)
                self.commands.append(
                    LabelCommandSpec(db.name, cmd.name, tuple(cmd.command), period, limit)
                )
        self.max_output = max_output
        self._values: dict[tuple[str, str], str] = {}
        self._errors: dict[tuple[str, str], str] = {}
        self._listeners: list[LabelsListener] = []
        self._slots = asyncio.Semaphore(_MAX_PARALLEL)
        self.runs = 0

    # --- reading ---------------------------------------------------------------------------

    def labels(self, database: str) -> dict[str, str]:
        """Static labels merged with the dynamic ones that currently have a value; {} for a
        database this agent's configuration does not list."""
        merged = dict(self._static.get(database, {}))
        for (db, name), value in self._values.items():
            if db == database:
                merged[name] = value
        return merged

    def errors(self, database: str) -> dict[str, str]:
        """Dynamic labels of `database` without a value, and why."""
        return {name: why for (db, name), why in self._errors.items() if db == database}

    def database_infos(self) -> list[DatabaseInfo]:
        """The configured databases with their current labels, as heartbeats carry them."""
        return [
            DatabaseInfo(name=name, description=db.description, protocol=db.protocol,
                         labels=self.labels(name))
            for name, db in self._info.items()
        ]

    def subscribe(self, callback: LabelsListener) -> None:
        """`callback(database, labels)` whenever a database's merged labels change."""
        self._listeners.append(callback)

    # --- running ---------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run every command now and then every period, until `stop` is set."""
        tasks = [asyncio.create_task(self._loop(spec, stop), name=f"label-{spec.name}")
                 for spec in self.commands]
        try:
            await stop.wait()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def refresh(self) -> None:
        """Run every command once now (all of them, in parallel up to a small limit)."""
        await asyncio.gather(*(self.update(spec) for spec in self.commands))

    async def _loop(self, spec: LabelCommandSpec, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            started = loop.time()
            await self.update(spec)
            wait = spec.period - (loop.time() - started)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, wait)):
                    await stop.wait()

    async def update(self, spec: LabelCommandSpec) -> None:
        """Run one command and record its value or its failure."""
        key = (spec.database, spec.name)
        before = self.labels(spec.database)
        async with self._slots:
            try:
                value = await run_label_command(spec.argv, spec.timeout, self.max_output)
            except CommandFailed as exc:
                reason = str(exc)
                self._values.pop(key, None)
                if self._errors.get(key) != reason:
                    log.warning(
                        "dynamic label %s of database %s has no value: %s; allow rules that "
                        "select on it do not match until the command succeeds",
                        spec.name, spec.database, reason,
                    )
                self._errors[key] = reason
            else:
                if key in self._errors:
                    log.info("dynamic label %s of database %s has a value again",
                             spec.name, spec.database)
                    del self._errors[key]
                self._values[key] = value
            finally:
                self.runs += 1
        after = self.labels(spec.database)
        if after != before:
            for callback in list(self._listeners):
                try:
                    callback(spec.database, after)
                except Exception:
                    log.exception("a label listener failed for database %s", spec.database)


async def run_label_command(argv: Sequence[str], timeout: float, max_output: int) -> str:
    """Run `argv` (no shell) and return its stripped UTF-8 output; CommandFailed otherwise."""
    shown = " ".join(argv)
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except FileNotFoundError:
        raise CommandFailed(f"`{shown}`: command not found") from None
    except PermissionError:
        raise CommandFailed(f"`{shown}`: permission denied (is it executable?)") from None
    except OSError as exc:
        raise CommandFailed(f"`{shown}` could not start: {exc.strerror or exc}") from None
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(timeout):
            (out, out_over), (err, _), code = await asyncio.gather(
                _read_bounded(proc.stdout, max_output),
                _read_bounded(proc.stderr, _STDERR_KEPT),
                proc.wait(),
            )
    except TimeoutError:
        _kill_group(proc)
        await proc.wait()
        raise CommandFailed(f"`{shown}` did not finish within {timeout:g}s and was killed"
                            ) from None
    except BaseException:
        _kill_group(proc)
        with contextlib.suppress(Exception):
            await asyncio.shield(proc.wait())
        raise
    if code != 0:
        detail = err.decode("utf-8", "replace").strip().splitlines()
        why = f": {detail[0][:200]}" if detail else ""
        status = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise CommandFailed(f"`{shown}` {status}{why}")
    if out_over:
        raise CommandFailed(f"`{shown}` printed more than {max_output} bytes")
    try:
        return out.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CommandFailed(f"`{shown}` printed bytes that are not UTF-8 text") from None


async def _read_bounded(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    """Read to EOF keeping at most `limit` bytes (the rest is drained, so the child never
    blocks on a full pipe); (kept, whether there was more)."""
    kept = bytearray()
    over = False
    while chunk := await stream.read(64 * 1024):
        room = limit - len(kept)
        if len(chunk) > room:
            over = True
        if room > 0:
            kept += chunk[:room]
    return bytes(kept), over


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
