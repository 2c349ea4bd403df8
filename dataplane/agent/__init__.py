"""The db agent: sessions handed over by proxies, authorized, logged in, relayed, audited.

Public face: `AgentService` (see `dataplane.agent.service`), the collaborator Protocols of
`dataplane.agent.interfaces`, `StaticDatabases`, and `MemoryAuditSink`.
"""

from dataplane.agent.audit import MemoryAuditSink, SessionRecorder
from dataplane.agent.interfaces import StaticDatabases
from dataplane.agent.service import AgentService, LocalAnswer

__all__ = ["AgentService", "LocalAnswer", "MemoryAuditSink", "SessionRecorder", "StaticDatabases"]
