"""`teleport demo`: the quick start, from nothing to a psql prompt through the proxy.

On one machine, in one command, it runs seed 001's Getting Started with a local PostgreSQL
standing in for Aurora: it starts an embedded PostgreSQL (TLS with the files of `tctl auth
sign --format=db`, client-certificate authentication only), the control plane hosting the
example `policies/` repository, the proxy and a database agent (as `teleport start
--roles=proxy,auth,db --db-name=local ...` would); adds alice with seed 001's `tctl users add`;
logs her in with `tsh login`; shows `tsh db ls`; runs `tsh db login local` and a psql query
through `service=root-local`; shows the audit events; then prints what to try next and
stays up until Ctrl-C. `--smoke` does the same and exits 0 or 1 (CI runs it).

Every step runs the real command line (tctl, tsh, psql) as a subprocess and shows it. The
demo's state lives under its data dir (default `./.demo`): cluster data, alice's `tsh`
profile and a `pg_service.conf`, so nothing in the user's home is touched. Each run starts
afresh: a data dir the demo made before is wiped; any other non-empty directory is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

from control import hosted
from control.ca import host_ca_pin
from control.service import ControlPlane
from launcher.embedded_postgres import EmbeddedPostgres, EmbeddedPostgresError, ServerTLS
from launcher.services import build_services, control_settings, run_services
from launcher.start import Plan, StartError, setup_logging
from schemas.config import FileConfig, load_config
from transport.process import freeze_startup_heap, install_event_loop

MARKER = ".teleport-demo"
CLUSTER = "root"
POLICIES = Path(__file__).resolve().parent.parent / "policies"
STEP_TIMEOUT = 60.0


class DemoFailed(Exception):
    """A step did not do what it should; the message says which and shows its output."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the quick start: a local cluster, PostgreSQL, and a psql query through it",
        description="Start an embedded PostgreSQL, the control plane with the example policy "
        "repository, a proxy and a database agent on this machine; add alice, log her in, "
        "and run a psql query through the proxy, showing each command. Then it stays up "
        "until Ctrl-C so you can try more (it prints what).",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(".demo"),
        help="where the demo keeps its state (default ./.demo; wiped at each start)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=3080,
        help="the proxy's web port; the demo also uses the three ports after it "
        "(tunnel, auth API, PostgreSQL). Default 3080",
    )
    p.add_argument("--smoke", action="store_true", help="run the steps, then stop: exit 0 or 1")
    p.add_argument("-d", "--debug", action="store_true", help="log the services at debug level")
    p.set_defaults(func=run)


# --- output --------------------------------------------------------------------------------


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(number: int, text: str) -> None:
    say(f"\n[{number}] {text}")


def shown(argv: list[str]) -> str:
    return " ".join(shlex.quote(a) if a != "" else "''" for a in argv)


# --- the demo ------------------------------------------------------------------------------


class Demo:
    def __init__(self, data_dir: Path, port: int, smoke: bool) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port
        self.smoke = smoke
        self.password = "demo-" + secrets.token_urlsafe(9)
        self.bin = Path(sys.executable).parent
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "TELEPORT_HOME": str(self.data_dir / "tsh"),
            "TELEPORT_DATA_DIR": str(self.data_dir),
            "PGSERVICEFILE": str(self.data_dir / "pg_service.conf"),
        }
        for var in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE", "PGSSLMODE"):
            self.env.pop(var, None)
        self.pg: EmbeddedPostgres | None = None
        self.services: asyncio.Task[None] | None = None  # the cluster's services, running

    @property
    def web(self) -> str:
        return f"localhost:{self.port}"

    # -- setup ---------------------------------------------------------------------------

    def fresh_data_dir(self) -> None:
        d = self.data_dir
        if d.exists() and any(d.iterdir()):
            if not (d / MARKER).exists():
                raise DemoFailed(
                    f"{d} is not empty and was not made by teleport demo; choose another --data-dir"
                )
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        (d / MARKER).write_text("made by teleport demo; wiped at its next start\n")

    def config(self) -> FileConfig:
        p = self.port
        text = f"""
teleport:
  nodename: localhost
  data_dir: {self.data_dir}
auth_service:
  enabled: yes
  cluster_name: {CLUSTER}
  listen_addr: 127.0.0.1:{p + 2}
proxy_service:
  enabled: yes
  web_listen_addr: 127.0.0.1:{p}
  tunnel_listen_addr: 127.0.0.1:{p + 1}
  public_addr: localhost:{p}
db_service:
  enabled: yes
  databases:
  - name: local
    description: Local PostgreSQL standing in for Aurora
    protocol: postgres
    uri: localhost:{p + 3}
    labels:
      env: dev
ssh_service:
  enabled: no
"""
        return load_config(Path("demo.yaml"), text)

    async def run_cmd(
        self, argv: list[str], *, stdin: str | None = None, show: bool = True, ok: bool = True
    ) -> str:
        if show:
            say(f"  $ {shown(argv)}")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        try:
            out, _ = await asyncio.wait_for(
                proc.communicate(stdin.encode() if stdin is not None else None), STEP_TIMEOUT
            )
        except TimeoutError:
            proc.kill()
            raise DemoFailed(f"`{shown(argv)}` did not finish in {STEP_TIMEOUT:.0f}s") from None
        text = out.decode(errors="replace")
        if show:
            for line in text.rstrip("\n").splitlines():
                say(f"    {line}")
        if ok and proc.returncode != 0:
            raise DemoFailed(f"`{shown(argv)}` failed (exit {proc.returncode})")
        return text

    async def wait_until(self, what: str, check, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            await asyncio.sleep(0.05)
        raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")

    # -- the steps -----------------------------------------------------------------------

    def check_ports(self) -> None:
        """Every port the demo listens on is free, before anything (the data dir of a demo
        that runs there already included) is touched."""
        p = self.port
        uses = {p: "the proxy's web port", p + 1: "the tunnel port",
                p + 2: "the control plane's API", p + 3: "the demo's PostgreSQL"}
        for port, what in uses.items():
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind(("127.0.0.1", port))
                except OSError as exc:
                    raise DemoFailed(
                        f"port {port} ({what}) is in use ({exc.strerror}): another teleport "
                        f"demo or program listens there. Stop it, or give the demo other "
                        f"ports: teleport demo --port={p + 1000} --data-dir=<another "
                        f"directory> (it uses --port and the three ports after it)"
                    ) from None

    async def run(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        self.check_ports()
        self.fresh_data_dir()
        config = self.config()
        plan = Plan(
            config=config,
            roles={"auth", "proxy", "db"},
            data_dir=self.data_dir,
            nodename="localhost",
            cluster_name=CLUSTER,
        )

        heading(1, "Control plane: CAs, signing key, and the hosted policy repository")
        plane = ControlPlane(self.data_dir, control_settings(plan))
        await plane.start()
        repo = hosted.repo_path(self.data_dir)
        files = {
            str(path.relative_to(POLICIES)): path.read_bytes()
            for path in sorted(POLICIES.rglob("*.yaml"))
            if path.relative_to(POLICIES).as_posix() != "users/alice.yaml"
        }
        commit = await asyncio.to_thread(
            hosted.commit_files, repo, files, "Example policy (policies/ without alice)"
        )
        say(f"  pushed the example policies/ to {repo} (commit {commit[:12]}), linted by its")
        say("  pre-receive hook; alice is added below with tctl, as in seed 001")

        heading(2, "PostgreSQL with TLS and client-certificate authentication (seed 001)")
        tls_dir = self.data_dir / "postgres-tls"
        tls_dir.mkdir()
        await self.run_cmd(
            [
                "tctl", "auth", "sign", "--format=db", "--host=localhost",
                f"--out={tls_dir / 'server'}", "--ttl=8760h",
            ]
        )  # fmt: skip
        try:
            self.pg = EmbeddedPostgres.temporary(
                prefix="teleport-demo-pg-",
                port=self.port + 3,
                tls=ServerTLS(
                    tls_dir / "server.crt", tls_dir / "server.key", tls_dir / "server.cas"
                ),
                fsync=False,
            )
            await asyncio.to_thread(self.pg.start)
            await asyncio.to_thread(self.pg.create_role, "alice")
        except EmbeddedPostgresError as exc:
            raise DemoFailed(str(exc)) from None
        say(f"  PostgreSQL {self.pg.port} accepts only hostssl ... cert: no passwords anywhere")

        heading(3, "Proxy and database agent, joined to the control plane")
        say(
            f"  as: teleport start --roles=proxy,auth,db --db-name=local --db-protocol=postgres "
            f"--db-uri=localhost:{self.port + 3} --labels=env=dev"
        )
        services = await build_services(plan, plane)
        freeze_startup_heap()
        self.services = asyncio.create_task(run_services(services, stop), name="services")
        api = plane.api
        assert api is not None
        await self.wait_until(
            "the database agent to register database local",
            lambda: "local" in api.state.inventory.databases(api.state.now()),
        )
        say(f"  proxy on {self.web}, database agent serving: local")

        heading(4, "Add alice (seed 001: tctl users add alice root --db-names=postgres ...)")
        out = await self.run_cmd(
            ["tctl", "users", "add", "alice", "root", "--db-names=postgres", "--db-users=alice"]
        )
        match = re.search(r"--signup-token=(\S+)", out)
        if match is None:
            raise DemoFailed("tctl users add printed no signup token")
        token = match.group(1)
        await self.wait_until(
            "the bundle with alice to be published",
            lambda: "alice" in (plane.reconciler.current_bundle().users),  # type: ignore[union-attr]
        )

        heading(5, f"alice sets her password and logs in (her password: {self.password})")
        pin = host_ca_pin(self.data_dir)
        await self.run_cmd(
            ["tsh", "login", f"--proxy={self.web}", "--user=alice", f"--ca-pin={pin}",
             f"--signup-token={token}"],
            stdin=self.password + "\n",
        )  # fmt: skip

        heading(6, "Databases alice may use")
        await self.run_cmd(["tsh", "db", "ls"])

        heading(7, "A certificate for database local, and a psql query through the proxy")
        await self.run_cmd(["tsh", "db", "login", "local"])
        query = (
            "select current_user, ssl as tls_to_postgres, version "
            "from pg_stat_ssl where pid = pg_backend_pid()"
        )
        out = await self.run_cmd(
            ["psql", "service=root-local user=alice dbname=postgres", "-X", "-c", query]
        )
        if not re.search(r"^\s*alice\s*\|\s*t\s*\|\s*TLSv1\.[23]", out, re.MULTILINE):
            raise DemoFailed("the psql query through the proxy did not come back as alice over TLS")
        elapsed = time.monotonic() - started

        heading(8, "The audit log")
        await self.wait_until(
            "the query's audit event",
            lambda: _audit_has_query(self.data_dir),
            timeout=15,
        )
        await self.run_cmd(["tctl", "audit", "search", "--since=10m"])
        say(f"\nThe psql query went through the proxy {elapsed:.1f}s after the demo started.")

    def next_steps(self) -> None:
        pin = host_ca_pin(self.data_dir)
        say(
            f"""
The demo cluster is running. Try it in another terminal:

  export PATH={self.bin}:$PATH TELEPORT_HOME={self.env["TELEPORT_HOME"]} \\
         PGSERVICEFILE={self.env["PGSERVICEFILE"]} TELEPORT_DATA_DIR={self.data_dir}
  tsh login --proxy={self.web} --user=alice --ca-pin={pin}
      (alice's password: {self.password})
  tsh db ls
  tsh db login local
  psql "service=root-local user=alice dbname=postgres"

Access is code: change it with git, and it is enforced within a second.
  git clone {hosted.repo_path(self.data_dir)} policy && cd policy
  # e.g. edit roles/access.yaml, then: git commit -am "..." && git push
  tctl status            # which commit and bundle serial are in force
  tctl bundle diff 2 3   # what changed, in access terms
  tctl audit search --since=1h
  tctl lint .            # what your CI runs

Press Ctrl-C to stop."""
        )

    def cleanup(self) -> None:
        if self.pg is not None:
            try:
                self.pg.stop()
                self.pg.destroy()
            except EmbeddedPostgresError as exc:
                say(f"warning: could not stop the demo's PostgreSQL: {exc}")


def _audit_has_query(data_dir: Path) -> bool:
    for path in sorted((data_dir / "audit").glob("*.jsonl")):
        if '"db.session.query"' in path.read_text(errors="replace"):
            return True
    return False


def run(args: argparse.Namespace) -> int:
    setup_logging(args.debug)
    if not args.debug:
        # The demo shows commands and their output; services only speak up for problems.
        logging.getLogger().setLevel(logging.WARNING)
    install_event_loop()
    demo = Demo(args.data_dir, args.port, args.smoke)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        code = 0
        try:
            await demo.run(stop)
            if not args.smoke:
                demo.next_steps()
                await stop.wait()
                say(f"\nStopping. The demo's cluster data stays in {demo.data_dir}.")
            else:
                say("\nsmoke test passed")
        except (DemoFailed, StartError) as exc:
            say(f"\nteleport demo: FAILED: {exc}")
            code = 1
        except OSError as exc:  # a port taken after check_ports, a disk that is full...
            say(f"\nteleport demo: FAILED: {exc.strerror or exc}")
            code = 1
        finally:
            stop.set()
            if demo.services is not None:
                await asyncio.gather(demo.services, return_exceptions=True)
            await asyncio.to_thread(demo.cleanup)
        return code

    return asyncio.run(main())
