"""Audit delivery on the agent's side: `AuditShipper` (the `AuditSink` the agent emits to)
sends events to the control plane in batches and spools them to disk while it cannot.

Never blocks or raises into the data path; never drops an event it could keep.
"""

from dataplane.audit.shipper import (
    REJECT_STATUSES,
    AuditShipper,
    AuditSpoolError,
    BatchRejected,
    SendJson,
    ShipperStats,
)

__all__ = [
    "REJECT_STATUSES",
    "AuditShipper",
    "AuditSpoolError",
    "BatchRejected",
    "SendJson",
    "ShipperStats",
]
