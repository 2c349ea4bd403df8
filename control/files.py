"""Kept while the control plane's modules move to `transport.files` (the shared copy)."""

from transport.files import PRIVATE, PUBLIC, ensure_dir, write_atomic, write_private

__all__ = ["PRIVATE", "PUBLIC", "ensure_dir", "write_atomic", "write_private"]
