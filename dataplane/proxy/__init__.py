"""The proxy: the web port's listener, the PostgreSQL frontend and its client TLS, cancel
keys, the service.

Public face: `ProxyService` (see `dataplane.proxy.service`).
"""

from dataplane.proxy.service import ApiForwarder, ProxyService

__all__ = ["ApiForwarder", "ProxyService"]
