"""The control plane's settings as last started, kept in `<data_dir>/control.json`.

`teleport start --roles=auth` writes them; `tctl` reads them to act on the same data dir
(which repository is policy, which cluster) without being told again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from control.files import write_atomic

FILE = "control.json"


class SourceSettings(BaseModel):
    kind: Literal["hosted", "local", "remote"] = "hosted"
    path: str | None = None  # local repository (kind local)
    url: str | None = None  # remote to pull from (kind remote)
    branch: str = "main"
    pull_interval_seconds: int = 30


class ControlSettings(BaseModel):
    cluster_name: str
    source: SourceSettings = SourceSettings()
    bundle_ttl_seconds: int = 24 * 3600
    api_addr: str | None = None  # where the API listens, for tctl against a live cluster


def load_settings(data_dir: Path) -> ControlSettings | None:
    path = Path(data_dir) / FILE
    if not path.exists():
        return None
    return ControlSettings.model_validate_json(path.read_bytes())


def save_settings(data_dir: Path, settings: ControlSettings) -> None:
    write_atomic(Path(data_dir) / FILE, settings.model_dump_json(indent=1).encode() + b"\n")
