"""The published bundles under `<data_dir>/bundles/`: one file per serial, the newest kept.

Files are written atomically (temporary file, then rename), so an agent or `tctl` that reads
one never sees it half-written. `current.bundle` is always a whole copy of the bundle in
force. The last `keep` bundles stay for `tctl bundle show` and `tctl bundle diff`.
"""

from __future__ import annotations

import re
from pathlib import Path

from transport.files import ensure_dir, write_atomic

_NAME = re.compile(r"^(\d{10})\.bundle$")
CURRENT = "current.bundle"


class BundleStore:
    def __init__(self, directory: Path, keep: int = 50) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def path(self, serial: int) -> Path:
        return self.directory / f"{serial:010d}.bundle"

    def publish(self, serial: int, data: bytes) -> Path:
        ensure_dir(self.directory, 0o755)
        path = self.path(serial)
        write_atomic(path, data)
        write_atomic(self.directory / CURRENT, data)
        self._prune()
        return path

    def serials(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def read(self, serial: int) -> bytes:
        path = self.path(serial)
        if not path.exists():
            kept = self.serials()
            have = f"{kept[0]}..{kept[-1]}" if kept else "none"
            raise FileNotFoundError(f"no bundle with serial {serial} (kept: {have})")
        return path.read_bytes()

    def read_current(self) -> bytes | None:
        path = self.directory / CURRENT
        return path.read_bytes() if path.exists() else None

    def _prune(self) -> None:
        for serial in self.serials()[: -self.keep]:
            self.path(serial).unlink(missing_ok=True)
