"""The control plane's bundle signing key: Ed25519, created at first start, 0600 on disk.

The private key never leaves `<data_dir>/keys/bundle-signing.key`; agents receive the
public key (and its key id) when they join.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from transport.files import ensure_dir, write_private

KEY_PATH = Path("keys") / "bundle-signing.key"


class SigningKeyError(Exception):
    """The key on disk cannot be used; the message says which file and why."""


def load_or_create_signing_key(data_dir: Path) -> Ed25519PrivateKey:
    path = Path(data_dir) / KEY_PATH
    if path.exists():
        return load_signing_key(path)
    ensure_dir(path.parent)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_private(path, pem)
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise SigningKeyError(
            f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise SigningKeyError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningKeyError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key
