"""Device provisioning: the device's signing key (0600) on its side, the public half registered with the cloud.

`zhilian device provision` creates the key (and optionally the TLS client identity) and registers it;
`zhilian device rotate-key` adds a new key that the cloud accepts alongside the old one, then switches the key file;
`zhilian device revoke-key` retires a key for good. Every step can be re-run after a failure: an existing key file
is reused (never overwritten), and the cloud's key endpoints are idempotent.

httpx is imported only when a command talks to the cloud: the `zhilian` command module (and through it the agent
on a board) imports this module for its CLI group, and httpx alone costs ≈ 0.6 s and 20 MB.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from protocol import DeviceKey
from protocol.errors import ProtocolError, TopicError
from protocol.topics import validate_vin

if TYPE_CHECKING:
    import httpx

log = logging.getLogger("zhilian.provision")

DEVICE_KEY = "device.key"
NEXT_KEY = "device.key.next"  # a rotation's new key until the cloud accepted it
DEFAULT_TIMEOUT_S = 10.0
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


class ProvisionError(Exception):
    """A provisioning step failed; the message says what to do about it."""


@dataclass(frozen=True, slots=True)
class Provisioned:
    vin: str
    key_file: Path
    key_id: str
    new_key: bool  # False: an existing key file was reused (a re-run)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    csr: Path | None = None


@dataclass(frozen=True, slots=True)
class Rotated:
    vin: str
    key_file: Path
    old_key_id: str
    new_key_id: str
    old_revoked: bool


class CloudClient:
    """The few registry endpoints provisioning needs, with their failures turned into ProvisionError."""

    def __init__(self, api: str, api_key: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        import httpx

        if not api.startswith(("http://", "https://")):
            raise ProvisionError(f"--api must be an http(s) URL, not {api!r}")
        self._httpx = httpx
        self._client = httpx.Client(
            base_url=api.rstrip("/"), headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    def __enter__(self) -> CloudClient:
        return self

    def __exit__(self, *_exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        try:
            r: httpx.Response = self._client.request(method, path, json=body)
        except self._httpx.HTTPError as exc:
            raise ProvisionError(f"cannot reach the cloud API ({exc.__class__.__name__}: {exc})") from None
        try:
            payload = r.json()
        except ValueError:
            payload = r.text
        if r.status_code == 401:
            raise ProvisionError("the cloud rejected the API key")
        if r.status_code == 403:
            raise ProvisionError(f"the API key's role may not do this: {_detail(payload)}")
        if r.status_code >= 500:
            raise ProvisionError(f"the cloud API failed ({r.status_code}): {_detail(payload)}; try again later")
        return r.status_code, payload

    def register_device(self, vin: str, public_raw: bytes, label: str | None) -> None:
        code, payload = self._call("POST", "/v1/devices", {"vin": vin, "public_key": _b64(public_raw), "label": label})
        if code == 409:
            raise ProvisionError(
                f"{vin} is already registered with another key: rotate with `zhilian device rotate-key` "
                f"using that key's directory ({_detail(payload)})"
            )
        _expect(code, payload, (201,))

    def add_key(self, vin: str, public_raw: bytes) -> None:
        code, payload = self._call("POST", f"/v1/devices/{vin}/keys", {"public_key": _b64(public_raw)})
        _expect(code, payload, (200, 201))

    def revoke_key(self, vin: str, key_id: str) -> dict[str, Any]:
        if not _KEY_ID.match(key_id):
            raise ProvisionError(f"a key id is 16 lowercase hex digits, not {key_id!r}")
        code, payload = self._call("POST", f"/v1/devices/{vin}/keys/{key_id}/revoke")
        _expect(code, payload, (200,))
        return dict(payload)

    def list_keys(self, vin: str) -> list[dict[str, Any]]:
        code, payload = self._call("GET", f"/v1/devices/{vin}/keys")
        _expect(code, payload, (200,))
        return list(payload)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _detail(payload: Any) -> str:
    detail = payload.get("detail", payload) if isinstance(payload, dict) else payload
    return str(detail)[:300]


def _expect(code: int, payload: Any, ok: tuple[int, ...]) -> None:
    if code not in ok:
        raise ProvisionError(f"the cloud API answered {code}: {_detail(payload)}")


def _vin(vin: str) -> str:
    try:
        return validate_vin(vin)
    except TopicError as exc:
        raise ProvisionError(str(exc)) from None


def _load_or_create(path: Path) -> tuple[DeviceKey, bool]:
    if path.exists():
        try:
            return DeviceKey.load(path), False
        except ProtocolError as exc:
            raise ProvisionError(str(exc)) from None
    key = DeviceKey.generate()
    key.save(path)
    _fsync_dir(path.parent)
    return key, True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _key_dir(out: Path) -> Path:
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    return out


def _write_tls_request(out: Path, vin: str) -> tuple[Path, Path]:
    """An EC P-256 TLS client key (0600) and a CSR with CN=VIN, for a production CA to sign."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key_path, csr_path = out / f"{vin}.key", out / f"{vin}.csr"
    if key_path.exists() or csr_path.exists():
        raise ProvisionError(f"{key_path} or {csr_path} exists; refusing to overwrite a TLS identity")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, vin)]))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return key_path, csr_path


def provision(
    cloud: CloudClient,
    vin: str,
    out: Path,
    label: str | None = None,
    tls_ca_dir: Path | None = None,
    tls_csr: bool = False,
) -> Provisioned:
    """Create (or reuse) OUT/device.key and register it as VIN's key; optionally the TLS client identity.

    The key is on disk before the cloud hears of it, so a failed registration is retried with the same key.
    `tls_ca_dir`: issue the client certificate from that dev CA (zhilian keys tls-ca); `tls_csr`: write a key and
    CSR for an external CA instead.
    """
    vin = _vin(vin)
    if tls_ca_dir is not None and tls_csr:
        raise ProvisionError("choose either a CA directory to issue the TLS certificate or a CSR, not both")
    out = _key_dir(out)
    key_path = out / DEVICE_KEY
    key, new = _load_or_create(key_path)
    cloud.register_device(vin, key.public_raw, label)
    log.info("device provisioned", extra={"vin": vin, "key_id": key.key_id.hex(), "new_key": new})
    if tls_ca_dir is not None:
        from zhilian.pki import Ca, PkiError, issue_client_cert

        cert_path = out / f"{vin}.crt"
        if cert_path.exists():
            return Provisioned(vin, key_path, key.key_id.hex(), new, cert_path, out / f"{vin}.key")
        try:
            files = issue_client_cert(Ca.load(tls_ca_dir), out, vin)
        except PkiError as exc:
            raise ProvisionError(str(exc)) from None
        return Provisioned(vin, key_path, key.key_id.hex(), new, files.cert, files.key)
    if tls_csr:
        tls_key, csr = _write_tls_request(out, vin)
        return Provisioned(vin, key_path, key.key_id.hex(), new, None, tls_key, csr)
    return Provisioned(vin, key_path, key.key_id.hex(), new)


def rotate_key(cloud: CloudClient, vin: str, out: Path, revoke_old: bool = False) -> Rotated:
    """Give VIN a new signing key: registered alongside the old one first, then swapped into OUT/device.key.

    The old key stays valid in the cloud (messages the agent spooled under it still verify) until it is revoked —
    here with `revoke_old` (needs an admin API key), or later with `zhilian device revoke-key`.
    """
    vin = _vin(vin)
    key_path, next_path = out / DEVICE_KEY, out / NEXT_KEY
    if not key_path.exists():
        raise ProvisionError(f"{key_path} does not exist: provision the device first")
    try:
        old = DeviceKey.load(key_path)
    except ProtocolError as exc:
        raise ProvisionError(str(exc)) from None
    new, _ = _load_or_create(next_path)
    cloud.add_key(vin, new.public_raw)
    os.replace(next_path, key_path)
    _fsync_dir(out)
    log.info("device key rotated", extra={"vin": vin, "old_key_id": old.key_id.hex(), "key_id": new.key_id.hex()})
    if revoke_old:
        cloud.revoke_key(vin, old.key_id.hex())
    return Rotated(vin, key_path, old.key_id.hex(), new.key_id.hex(), revoke_old)


# -- CLI: `zhilian device ...` (added to the `zhilian` command by zhilian/cli.py) --------------------------------

device_app = typer.Typer(
    help="Device provisioning: signing keys registered with the cloud, TLS identity.", no_args_is_help=True
)
console = Console(soft_wrap=True)  # one line per result, whatever the terminal width: scripts parse it

Vin = Annotated[str, typer.Option("--vin", help="the vehicle's VIN")]
Api = Annotated[str, typer.Option("--api", envvar="ZHILIAN_API", help="ingest API base URL")]
ApiKey = Annotated[
    str, typer.Option("--api-key", envvar="ZHILIAN_API_KEY", help="API key (provision: admin; rotate: operator)")
]
Out = Annotated[Path, typer.Option("--out", help="the device's key directory (device.key, 0600)")]


def _fail(exc: ProvisionError) -> typer.Exit:
    console.print(f"[red]{exc}[/red]")
    return typer.Exit(1)


@device_app.command("provision")
def provision_cmd(
    vin: Vin,
    out: Out,
    api: Api,
    api_key: ApiKey,
    label: Annotated[str | None, typer.Option(help="label shown in the vehicle list")] = None,
    tls_ca_dir: Annotated[
        Path | None, typer.Option(help="issue the MQTT client certificate from this CA (zhilian keys tls-ca)")
    ] = None,
    tls_csr: Annotated[bool, typer.Option(help="write a TLS key + CSR (CN=VIN) for an external CA")] = False,
) -> None:
    """Create the device's signing key in OUT and register it with the cloud (re-runnable)."""
    try:
        with CloudClient(api, api_key) as cloud:
            p = provision(cloud, vin, out, label, tls_ca_dir, tls_csr)
    except ProvisionError as exc:
        raise _fail(exc) from None
    console.print(f"vin={p.vin} key_file={p.key_file} key_id={p.key_id} new_key={p.new_key}")
    if p.tls_cert or p.tls_key:
        console.print(f"tls_cert={p.tls_cert} tls_key={p.tls_key}" + (f" csr={p.csr}" if p.csr else ""))


@device_app.command("rotate-key")
def rotate_key_cmd(
    vin: Vin,
    out: Out,
    api: Api,
    api_key: ApiKey,
    revoke_old: Annotated[bool, typer.Option(help="revoke the old key right away (admin API key)")] = False,
) -> None:
    """Register a new signing key alongside the old one and switch OUT/device.key to it."""
    try:
        with CloudClient(api, api_key) as cloud:
            r = rotate_key(cloud, vin, out, revoke_old)
    except ProvisionError as exc:
        raise _fail(exc) from None
    console.print(f"vin={r.vin} key_file={r.key_file} key_id={r.new_key_id} old_key_id={r.old_key_id}")
    if not r.old_revoked:
        console.print(
            "restart the agent; once its spool has drained, revoke the old key: "
            f"zhilian device revoke-key --vin {r.vin} --key-id {r.old_key_id}"
        )


@device_app.command("revoke-key")
def revoke_key_cmd(
    vin: Vin,
    key_id: Annotated[str, typer.Option("--key-id", help="hex key id to revoke")],
    api: Api,
    api_key: ApiKey,
) -> None:
    """Revoke one of VIN's signing keys: messages signed with it are rejected from now on (admin)."""
    try:
        with CloudClient(api, api_key) as cloud:
            found = cloud.revoke_key(_vin(vin), key_id.strip().lower())
    except ProvisionError as exc:
        raise _fail(exc) from None
    console.print(f"vin={found['vin']} key_id={found['key_id']} revoked_at={found['revoked_at']}")
