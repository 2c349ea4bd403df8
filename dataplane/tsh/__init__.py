"""`tsh`: the user's command line: log in, list databases, get database certificates.

- `cli`: the parser and `main(argv)`; subcommand modules register themselves;
- `login`: `tsh login` (with signup), `tsh logout`, `tsh status`;
- `db`: `tsh db ls | login | logout | config | env | connect`;
- `client`: HTTPS to the proxy (trust, pinning, certificate checks), `schemas/api.py` bodies;
- `profile`: the files under `~/.tsh` (or `$TELEPORT_HOME`), keys 0600;
- `pgservice`: editing `~/.pg_service.conf` without touching the user's own bytes;
- `session`, `prompt`, `errors`: what the commands share.

Keys are made on this machine and never leave it; nothing here logs a secret.
"""
