"""Logging for the long-running commands (`teleport start`, `teleport-agent run`).

`teleport.log` in teleport.yaml sets the level (`severity`) and where lines go (`output`:
stderr, stdout, or a file path, appended to); `--debug` wins over the severity. One line per
event: time, level, component, message. Never logs secrets: that is each caller's duty.
"""

from __future__ import annotations

import logging
import sys

LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO, "WARN": logging.WARNING,
          "WARNING": logging.WARNING, "ERROR": logging.ERROR}  # fmt: skip


def configure_logging(debug: bool, severity: str = "INFO", output: str = "stderr") -> None:
    if output == "stderr":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    elif output == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.FileHandler(output, encoding="utf-8")
    handler.setFormatter(
        logging.Formatter(
            "%(asctime)s %(levelname)-5s [%(name)s] %(message)s", datefmt="%Y-%m-%dT%H:%M:%S"
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else LEVELS[severity.upper()])
    # watchfiles logs every change it sees at INFO: our own log lines say what it meant.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
