"""Client-side TLS for the MQTT transport (mutual TLS): one `ssl.SSLContext` from a CA file, a client certificate
and its private key.

Shared by the edge agent and the bridge, which may not import each other.  The private key is refused when group
or others can access it, for the same reason `DeviceKey.load` refuses a signing key: on a board a world-readable
key is a key every process can impersonate the vehicle with.
"""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

from protocol.signing import KeyFileError


class TlsConfigError(KeyFileError):
    """TLS files that are missing, malformed, mismatched or too widely readable."""

    reason = "bad_tls_config"


def client_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """Verify the broker against `ca` (hostname included) and present `cert`/`key` as this client's identity."""
    key = Path(key)
    try:
        mode = key.stat().st_mode
    except OSError as exc:
        raise TlsConfigError(f"cannot read TLS key file {key}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsConfigError(f"TLS key file {key} is accessible by group/others; chmod 600 it")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError(f"cannot load TLS files (ca={ca}, cert={cert}, key={key}): {exc}") from None
    return ctx


def optional_client_context(
    ca: str | Path | None, cert: str | Path | None, key: str | Path | None
) -> ssl.SSLContext | None:
    """None when no TLS file is given; all three or none, so a half-configured client fails at start, not later."""
    given = [p for p in (ca, cert, key) if p is not None]
    if not given:
        return None
    if ca is None or cert is None or key is None:
        raise TlsConfigError("TLS needs all three of ca, cert and key")
    return client_context(ca, cert, key)
