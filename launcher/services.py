"""Build the services a `teleport start` plan asks for, as (name, run(stop)) pairs."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from control.service import ControlPlane
from control.settings import ApiSettings, ControlSettings, SourceSettings
from launcher.start import Plan, StartError
from schemas.durations import parse_duration
from schemas.policy.models import split_host_port

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
    tunnel = proxy.tunnel_public_addr or _public(proxy.tunnel_listen_addr, plan.nodename)
    proxy_addrs = list(proxy.public_addr) or (
        [_public(proxy.web_listen_addr, plan.nodename)] if "proxy" in plan.roles else []
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


def _public(listen_addr: str, nodename: str) -> str:
    """A listen address as others dial it: 0.0.0.0 / :: become this host's name."""
    host, port = split_host_port(listen_addr)
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - comparing, not binding
        host = nodename
    return f"{host}:{port}"


async def build_services(plan: Plan) -> list[Service]:
    services: list[Service] = []
    if "auth" in plan.roles:
        plane = ControlPlane(plan.data_dir, control_settings(plan))
        try:
            plane.prepare()
        except (ValueError, OSError) as exc:
            raise StartError(str(exc)) from None
        services.append(("auth", plane.run))
    for role in ("proxy", "db"):
        if role in plan.roles:
            raise StartError(f"the {role} role is not available in this build yet")
    return services
