"""The control plane's HTTPS API: people log in and get certificates, hosts join, renew,
fetch bundles and heartbeat. Paths and bodies are `schemas.api`; the server is
`control.api.server.ApiServer` on `transport.http`.

Modules: `server` (TLS, routing, lifecycle), `state` (what handlers share, and who is
calling), `people` and `hosts` (the endpoints), `bundlefeed` (the bundle long poll);
login attempts are bounded by `transport.ratelimit`'s token buckets.
"""

from control.api.server import ApiServer, read_api_address

__all__ = ["ApiServer", "read_api_address"]
