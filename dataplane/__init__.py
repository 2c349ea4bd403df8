"""The data plane: proxy, reverse tunnel, db agent, PostgreSQL wire protocol and `tsh`.

Stateless: everything it keeps on disk (bundle cache, certificates, audit spool) can be lost
and rebuilt. Never imports the control plane; the two meet through `schemas` and the network."""
