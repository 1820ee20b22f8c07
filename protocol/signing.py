"""Device and cloud keys: Ed25519 by default.

A key id is the first 8 bytes of SHA-256 over the raw 32-byte public key; envelopes carry it so the verifier can
pick the right key (and keys can rotate).  Private keys live in PEM files readable by their owner only (0600).
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from protocol.errors import ProtocolError, SignatureError

KEY_ID_LEN = 8


class KeyFileError(ProtocolError):
    """A key file that is missing, unreadable, malformed or too widely readable."""

    reason = "bad_key_file"


def key_id_for(public_raw: bytes) -> bytes:
    return hashlib.sha256(public_raw).digest()[:KEY_ID_LEN]


def load_public_key(public_raw: bytes) -> Ed25519PublicKey:
    if len(public_raw) != 32:
        raise SignatureError("an Ed25519 public key is 32 bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(public_raw)
    except ValueError as exc:
        raise SignatureError(f"invalid public key: {exc}") from None


def verify(public_raw: bytes, signature: bytes, message: bytes) -> None:
    """Raise SignatureError unless `signature` is a valid signature of `message` under `public_raw`."""
    key = load_public_key(public_raw)
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None


class DeviceKey:
    """A private signing key with its public half and key id."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = key_id_for(self.public_raw)

    @classmethod
    def generate(cls) -> DeviceKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> DeviceKey:
        """Deterministic key from a 32-byte seed — for test vectors only."""
        if len(seed) != 32:
            raise ProtocolError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def save(self, path: str | Path) -> None:
        """Write the private key as PEM, created with mode 0600 (never world- or group-readable)."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, pem)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> DeviceKey:
        """Load a PEM private key; refuses files that group or others can read."""
        path = Path(path)
        try:
            st = path.stat()
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"key file {path} is accessible by group/others; chmod 600 it")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"key file {path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"key file {path} does not hold an Ed25519 key")
        return cls(key)
