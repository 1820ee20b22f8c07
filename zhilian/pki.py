"""A development/test PKI for the MQTT transport's mutual TLS: one CA, a broker certificate, client certificates.

Client certificates carry the identity Mosquitto uses as the MQTT username (`use_identity_as_username`), which the
ACL substitutes for `%u`: a device's CN is its VIN, a cloud service's CN is its service name ("zhilian-bridge").
Production fleets would issue these from a real CA (an HSM-backed one, at manufacturing); this module exists so
tests, the demo and a first deployment need nothing but `cryptography`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import TopicError
from protocol.topics import validate_vin

BRIDGE_CN = "zhilian-bridge"
CA_CERT, CA_KEY = "ca.crt", "ca.key"
# Service identities are lowercase names; they can never look like a VIN (uppercase) nor contain MQTT wildcards
# or separators, which would widen the `ev/%u/#` ACL pattern.
_SERVICE_CN = re.compile(r"^[a-z][a-z0-9-]{1,63}$")


class PkiError(Exception):
    """A CA directory that is incomplete or unreadable, or an identity that cannot be issued."""


@dataclass(frozen=True, slots=True)
class CertFiles:
    cert: Path
    key: Path


@dataclass(frozen=True, slots=True)
class Ca:
    cert: Path
    key: Path
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, directory: str | Path) -> Ca:
        d = Path(directory)
        try:
            cert = x509.load_pem_x509_certificate((d / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((d / CA_KEY).read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot load the CA from {d}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{d / CA_KEY} is not an EC private key")
        return cls(d / CA_CERT, d / CA_KEY, cert, key)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    tmp = path.with_name(path.name + ".tmp")
    # Created 0600 (not chmod-ed after the fact), so the key is never readable by others, even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    # Backdated a little: a board whose clock lags the CA's by minutes must still accept the broker's certificate.
    return now - dt.timedelta(hours=1), now + dt.timedelta(days=days)


def make_ca(directory: str | Path, common_name: str = "Zhilian dev CA", days: int = 3650) -> Ca:
    """Create `ca.crt` and `ca.key` (0600) in `directory`; refuses to overwrite an existing CA key."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if (d / CA_KEY).exists():
        raise PkiError(f"{d / CA_KEY} exists; refusing to overwrite a CA key")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before, not_after = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(d / CA_KEY, key)
    _write_cert(d / CA_CERT, cert)
    return Ca(d / CA_CERT, d / CA_KEY, cert, key)


def _issue(
    ca: Ca,
    directory: Path,
    stem: str,
    common_name: str,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    days: int,
) -> CertFiles:
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = _validity(days)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.private_key.public_key()), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca.private_key, hashes.SHA256())
    files = CertFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    _write_key(files.key, key)
    _write_cert(files.cert, cert)
    return files


def issue_server_cert(
    ca: Ca, directory: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 825
) -> CertFiles:
    """The broker's certificate (`server.crt`/`server.key`), valid for `hosts` (IP addresses or DNS names)."""
    if not hosts:
        raise PkiError("a server certificate needs at least one host")
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return _issue(ca, Path(directory), "server", hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans, days)


def check_client_identity(common_name: str) -> str:
    """A VIN (a device) or a lowercase service name such as "zhilian-bridge"; anything else is refused."""
    if _SERVICE_CN.match(common_name):
        return common_name
    try:
        return validate_vin(common_name)
    except TopicError:
        raise PkiError(
            f"client identity {common_name!r} is neither a VIN nor a service name ([a-z][a-z0-9-]+)"
        ) from None


def issue_client_cert(ca: Ca, directory: str | Path, common_name: str, days: int = 825) -> CertFiles:
    """A client certificate `{CN}.crt`/`{CN}.key` whose subject CN becomes the MQTT username at the broker."""
    cn = check_client_identity(common_name)
    return _issue(ca, Path(directory), cn, cn, ExtendedKeyUsageOID.CLIENT_AUTH, [], days)
