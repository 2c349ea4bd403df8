"""Build the services a `teleport start` plan asks for, as (name, run(stop)) pairs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

from control.audit_store import in_process_post, in_process_store
from control.ca import host_ca_pin
from control.service import ControlPlane
from control.settings import ApiSettings, ControlSettings, SourceSettings
from control.tokens import TokenStore
from dataplane.audit import SendJson
from dataplane.cluster.identity import CredentialsError, JoinError, load_credentials
from dataplane.runtime import (
    AgentConfigError,
    JoinOptions,
    NodeBusy,
    build_agent,
    build_proxy,
    public_addr,
    tunnel_public_addr,
)
from launcher.start import Plan, StartError
from schemas.durations import parse_duration

Service = tuple[str, Callable[[asyncio.Event], Awaitable[None]]]


def control_settings(plan: Plan) -> ControlSettings:
    auth = plan.config.auth_service
    repo = auth.policy.repository
    if repo == "hosted":
        source = SourceSettings(kind="hosted", branch=auth.policy.branch)
    elif "://" in repo or repo.startswith("git@"):
        source = SourceSettings(
            kind="remote",
            url=repo,
            branch=auth.policy.branch,
            pull_interval_seconds=int(parse_duration(auth.policy.pull_interval).total_seconds()),
        )
    else:
        source = SourceSettings(kind="local", path=repo, branch=auth.policy.branch)
    proxy = plan.config.proxy_service
    tunnel = tunnel_public_addr(proxy, plan.nodename)
    proxy_addrs = list(proxy.public_addr) or (
        [public_addr(proxy.web_listen_addr, plan.nodename)] if "proxy" in plan.roles else []
    )
    return ControlSettings(
        cluster_name=plan.cluster_name,
        source=source,
        bundle_ttl_seconds=int(parse_duration(auth.bundle_ttl).total_seconds()),
        api_addr=auth.listen_addr,
        api=ApiSettings(
            nodename=plan.nodename,
            public_addrs=list(auth.public_addr),
            proxy_addrs=proxy_addrs,
            tunnel_addrs=[tunnel] if "proxy" in plan.roles else [],
            static_tokens=list(auth.tokens),
            second_factor=auth.authentication.second_factor,
        ),
    )


async def run_services(services: list[Service], stop: asyncio.Event) -> None:
    """Run the services until `stop` is set or one of them fails (which stops the others),
    then raise the first failure. The control plane stops last: the proxy and the agent of
    this process stop while it still answers, so the agent delivers its last audit events
    and nothing logs a control plane that went away first."""
    auth_stop = asyncio.Event()
    tasks = [
        asyncio.create_task(run(auth_stop if name == "auth" else stop), name=name)
        for name, run in services
    ]
    stopper = asyncio.create_task(stop.wait(), name="stop")
    await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    stop.set()
    # A failing role sets `stop` itself, so failures are looked for in every result, not
    # only in what finished first.
    results = await asyncio.gather(*(t for t in tasks if t.get_name() != "auth"),
                                   return_exceptions=True)
    auth_stop.set()
    results += await asyncio.gather(*(t for t in tasks if t.get_name() == "auth"),
                                    return_exceptions=True)
    stopper.cancel()
    for result in results:
        if isinstance(result, Exception):
            raise result


async def build_services(plan: Plan, plane: ControlPlane | None = None) -> list[Service]:
    """The services of the plan, started far enough for each other to use: the control
    plane's API listens before this process's proxy and agent join it. `plane`: a control
    plane the caller already started (the demo prepares policy before the rest)."""
    services: list[Service] = []
    auth_addr: str | None = None
    if "auth" in plan.roles:
        if plane is None:
            plane = ControlPlane(plan.data_dir, control_settings(plan))
        try:
            await plane.start()
        except (ValueError, OSError) as exc:
            raise StartError(str(exc)) from None
        services.append(("auth", plane.run))
        assert plane.api is not None and plane.api.address is not None
        host, port = plane.api.address
        auth_addr = f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
    data_roles = [r for r in ("db", "proxy") if r in plan.roles]
    if not data_roles:
        return services

    if plane is None:
        if not plan.auth_servers:
            raise StartError(
                "the proxy and db roles join a cluster: give --auth-server (the auth server, "
                "or a proxy's web address) and --token"
            )
        join = JoinOptions(
            data_dir=plan.data_dir,
            auth_addr=plan.auth_servers[0],
            token=plan.token,
            ca_pin=plan.ca_pin,
            # Seed 001's join has no pin: trust on first use, with join()'s loud warning.
            insecure_first_join=plan.ca_pin is None,
            nodename=plan.nodename,
        )
    else:
        assert auth_addr is not None
        join = JoinOptions(
            data_dir=plan.data_dir,
            auth_addr=auth_addr,
            token=_local_token(plan.data_dir, data_roles),
            ca_pin=host_ca_pin(plan.data_dir),
            nodename=plan.nodename,
        )

    proxy_config = plan.config.proxy_service
    local_tunnel = (
        tunnel_public_addr(proxy_config, plan.nodename) if "proxy" in plan.roles else None
    )
    try:
        agent = None
        if "db" in plan.roles:
            agent = await build_agent(
                join,
                plan.config.db_service,
                local_tunnel_addr=local_tunnel,
                local_audit=_in_process_audit(plane),
            )
            services.append(("db", agent.run))
        if "proxy" in plan.roles:
            proxy = await build_proxy(
                join,
                proxy_config,
                api=_in_process_api(plane),
                local_agent=agent.service if agent is not None else None,  # type: ignore[arg-type]
            )
            services.append(("proxy", proxy.run))
    except (JoinError, CredentialsError, NodeBusy, AgentConfigError) as exc:
        raise StartError(str(exc)) from None
    return services


def _local_token(data_dir: Path, roles: list[str]) -> str | None:
    """A join token (valid 10 minutes, usable by both) for this process's own proxy and
    agent, minted only when they have no valid earlier join to load."""
    needed = []
    for role in roles:
        creds = load_credentials(data_dir / role, role)  # type: ignore[arg-type]
        if creds is None or creds.expired():
            needed.append(role)
    if not needed:
        return None
    token, _ = TokenStore(data_dir).add(needed, ttl=timedelta(minutes=10), single_use=False)  # type: ignore[arg-type]
    return token


def _in_process_audit(plane: ControlPlane | None) -> Callable[[str], SendJson] | None:
    """The local agent's audit batches go straight to this process's audit store; the
    events it built itself are not parsed again."""
    if plane is None or plane.api is None:
        return None
    store = plane.api.audit
    return lambda host_id: SendJson(
        in_process_post(store, host_id), in_process_store(store, host_id)
    )


def _in_process_api(plane: ControlPlane | None):  # type: ignore[no-untyped-def]
    if plane is None or plane.api is None:
        return None
    api = plane.api

    async def hand_over(sock: socket.socket, _peer: str) -> None:
        await api.accept_socket(sock)

    return hand_over
