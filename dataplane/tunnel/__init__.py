"""The reverse tunnel between proxies and db agents, and what both sides share.

- `frames`: the length-prefixed JSON frames (sans-IO codec);
- `server`: the proxy's end (`TunnelServer`: agent links, warm pools, sessions, cancels);
- `client`: the agent's end (`TunnelClient`, one `ProxyLink` per proxy);
- `hosts`: the Protocols of the services' collaborators, TLS contexts, peer checks;
- `routing`: db user / db name of a session from its certificate and startup;
- `accept`: raw-socket accepting for listeners that choose per connection.
"""
