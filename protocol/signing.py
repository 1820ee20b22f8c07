"""Device and cloud keys: Ed25519 by default.

A key id is the first 8 bytes of SHA-256 over the raw 32-byte public key; envelopes carry it so the verifier can
pick the right key (and keys can rotate).  Private keys live in PEM files readable by their owner only (0600).

The cryptography itself is `protocol.ed25519`'s: every function here takes an optional backend and otherwise uses
`ed25519.default_backend()`. The edge agent passes its own (libcrypto preferred), so it never imports
`cryptography`; the cloud keeps the default.
"""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from protocol import ed25519
from protocol.errors import ProtocolError

KEY_ID_LEN = 8


class KeyFileError(ProtocolError):
    """A key file that is missing, unreadable, malformed or too widely readable."""

    reason = "bad_key_file"


def key_id_for(public_raw: bytes) -> bytes:
    return hashlib.sha256(public_raw).digest()[:KEY_ID_LEN]


def load_public_key(public_raw: bytes, backend: ed25519.Ed25519Backend | None = None) -> bytes:
    """`public_raw` if it is usable as an Ed25519 public key; SignatureError otherwise."""
    (backend or ed25519.default_backend()).check_public(public_raw)
    return bytes(public_raw)


def verify(public_raw: bytes, signature: bytes, message: bytes, backend: ed25519.Ed25519Backend | None = None) -> None:
    """Raise SignatureError unless `signature` is a valid signature of `message` under `public_raw`."""
    (backend or ed25519.default_backend()).verify(public_raw, signature, message)


class DeviceKey:
    """A private signing key with its public half and key id."""

    def __init__(self, private: ed25519.PrivateKey) -> None:
        self._private = private
        self.public_raw = private.public_raw
        self.key_id = key_id_for(self.public_raw)

    @property
    def backend(self) -> ed25519.Ed25519Backend:
        return self._private.backend

    @classmethod
    def generate(cls, backend: ed25519.Ed25519Backend | None = None) -> DeviceKey:
        return cls((backend or ed25519.default_backend()).generate())

    @classmethod
    def from_seed(cls, seed: bytes, backend: ed25519.Ed25519Backend | None = None) -> DeviceKey:
        """Deterministic key from a 32-byte seed — for test vectors only."""
        if len(seed) != ed25519.SEED_LEN:
            raise ProtocolError("an Ed25519 seed is 32 bytes")
        return cls((backend or ed25519.default_backend()).private_key(seed))

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def save(self, path: str | Path) -> None:
        """Write the private key as PEM (PKCS#8), created with mode 0600 (never world- or group-readable)."""
        pem = ed25519.pkcs8_pem(self._private.seed())
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
    def load(cls, path: str | Path, backend: ed25519.Ed25519Backend | None = None) -> DeviceKey:
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
            private = (backend or ed25519.default_backend()).load_private_pem(data)
        except ed25519.KeyEncodingError as exc:
            raise KeyFileError(f"key file {path} does not hold an unencrypted PEM Ed25519 private key: {exc}") from None
        return cls(private)
