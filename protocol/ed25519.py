"""Ed25519 (RFC 8032) behind one small interface, with three interchangeable backends.

- `libsodium`: PyNaCl's bundled libsodium. The cloud prefers it (`DEFAULT_PREFERENCE`): it verifies a signature in
  about half OpenSSL's time (≈ 60 against ≈ 115 µs here), and the cloud verifies every message it ingests.
  libsodium is the stricter verifier: it also refuses public keys and signature points of small order, which no
  honestly generated key or signature has.
- `cryptography`: the `cryptography` package, next outside the agent.
- `libcrypto`: the system OpenSSL (1.1.1 or 3.x) through ctypes — the very copy Python's `ssl` module links, which
  asyncio and TLS map into the process anyway. The edge agent prefers it (`AGENT_PREFERENCE`): `cryptography`
  bundles a second OpenSSL in its Rust binding, ≈ 8 MB of the board's RSS budget (BENCHMARKS.md, agent footprint).

Ed25519 is deterministic, so all produce the same signature for the same key and message; each verifies the
other's. A backend is chosen by `select_backend(preference)`; the environment variable `ZHILIAN_ED25519_BACKEND`
(`libcrypto` or `cryptography`) overrides every preference (for tests, or to rule a library out on a board) and,
being explicit, never falls back. `load_backend` runs a self-test (RFC 8032, section 7.1, test 1) before it hands a
backend out, so a library that cannot do Ed25519 (a FIPS-only provider, say) is reported as unavailable instead of
failing the first signature.

Private keys are stored as PEM "PRIVATE KEY" (PKCS#8, RFC 5958) with the fixed RFC 8410 layout for Ed25519 — what
`cryptography` and `openssl genpkey -algorithm ed25519` write. The libcrypto backend parses that layout itself,
strictly (`seed_from_pkcs8_pem`): anything else — an encrypted key, another algorithm, the v1 form with attributes
or an embedded public key, trailing bytes — is a `KeyEncodingError`. The `cryptography` backend keeps that
library's own loader.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import os
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from protocol.errors import ProtocolError, SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SEED_LEN = 32
PUBLIC_KEY_LEN = 32
SIGNATURE_LEN = 64

BACKEND_ENV = "ZHILIAN_ED25519_BACKEND"
LIBCRYPTO = "libcrypto"
CRYPTOGRAPHY = "cryptography"
LIBSODIUM = "libsodium"
BACKENDS = (LIBCRYPTO, CRYPTOGRAPHY, LIBSODIUM)
# The agent: one OpenSSL in the process (the one `ssl` maps) rather than two. Everything else: the fastest verifier.
AGENT_PREFERENCE = (LIBCRYPTO, CRYPTOGRAPHY)
DEFAULT_PREFERENCE = (LIBSODIUM, CRYPTOGRAPHY, LIBCRYPTO)

# RFC 8410: PrivateKeyInfo{ version 0, AlgorithmIdentifier{ id-Ed25519 1.3.101.112 }, OCTET STRING{ OCTET STRING
# { 32-byte seed } } }: a fixed 16-byte header before the seed, 48 bytes in all.
_ED25519_OID = bytes.fromhex("06032b6570")
_PKCS8_HEADER = bytes.fromhex("302e020100300506032b657004220420")
_PEM_LABEL = "PRIVATE KEY"

# RFC 8032, section 7.1, TEST 1 (empty message): the self-test every backend passes before it is used.
_SELF_TEST_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
_SELF_TEST_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
_SELF_TEST_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)


class Ed25519Unavailable(ProtocolError):
    """The requested Ed25519 backend cannot be used here (library missing, too old, or failing its self-test)."""

    reason = "ed25519_unavailable"


class KeyEncodingError(ProtocolError):
    """Bytes that are not an unencrypted PEM/PKCS#8 Ed25519 private key in the RFC 8410 layout."""

    reason = "bad_key_encoding"


# --- the interface -------------------------------------------------------------------------------------------


class PrivateKey(ABC):
    """An Ed25519 private key held by one backend."""

    backend: Ed25519Backend
    public_raw: bytes  # the 32-byte public key

    @abstractmethod
    def sign(self, message: bytes) -> bytes:
        """The 64-byte signature of `message`."""

    @abstractmethod
    def seed(self) -> bytes:
        """The 32-byte private key (RFC 8032's seed), for writing the key file."""


class Ed25519Backend(ABC):
    name: str
    library: str  # what implements it, for logs: a module or a shared library's path

    @abstractmethod
    def private_key(self, seed: bytes) -> PrivateKey:
        """The key for a 32-byte seed (`_check_seed` first)."""

    @abstractmethod
    def _verify(self, public_raw: bytes, signature: bytes, message: bytes) -> bool:
        """True iff `signature` verifies; lengths are checked by `verify`."""

    @abstractmethod
    def _check_public(self, public_raw: bytes) -> None:
        """Raise SignatureError if the library refuses `public_raw` (32 bytes) as a public key."""

    def generate(self) -> PrivateKey:
        return self.private_key(os.urandom(SEED_LEN))

    def load_private_pem(self, data: bytes) -> PrivateKey:
        """A private key from an unencrypted PEM file's bytes; KeyEncodingError if it is not one."""
        return self.private_key(seed_from_pkcs8_pem(data))

    def check_public(self, public_raw: bytes) -> None:
        """Raise SignatureError unless `public_raw` is usable as an Ed25519 public key."""
        if len(public_raw) != PUBLIC_KEY_LEN:
            raise SignatureError(f"an Ed25519 public key is {PUBLIC_KEY_LEN} bytes")
        self._check_public(bytes(public_raw))

    def verify(self, public_raw: bytes, signature: bytes, message: bytes) -> None:
        """Raise SignatureError unless `signature` is a valid signature of `message` under `public_raw`."""
        self.check_public(public_raw)
        if len(signature) != SIGNATURE_LEN or not self._verify(bytes(public_raw), bytes(signature), bytes(message)):
            raise SignatureError("signature does not verify")

    def self_test(self) -> None:
        """Raise Ed25519Unavailable unless this backend reproduces RFC 8032 test 1 and rejects a tampered copy."""
        try:
            key = self.private_key(_SELF_TEST_SEED)
            signature = key.sign(b"")
            good = self._verify(_SELF_TEST_PUBLIC, _SELF_TEST_SIGNATURE, b"")
            tampered = self._verify(_SELF_TEST_PUBLIC, _SELF_TEST_SIGNATURE, b"\x00")
        except ProtocolError as exc:
            raise Ed25519Unavailable(f"{self.name} ({self.library}) failed the Ed25519 self-test: {exc}") from None
        if key.public_raw != _SELF_TEST_PUBLIC or signature != _SELF_TEST_SIGNATURE or not good or tampered:
            raise Ed25519Unavailable(f"{self.name} ({self.library}) gives wrong Ed25519 results (RFC 8032 test 1)")

    def __repr__(self) -> str:
        return f"<Ed25519 backend {self.name}: {self.library}>"


def _check_seed(seed: bytes) -> bytes:
    if len(seed) != SEED_LEN:
        raise ProtocolError(f"an Ed25519 seed is {SEED_LEN} bytes")
    return bytes(seed)


# --- key file codec (PEM / PKCS#8, RFC 8410 layout) ----------------------------------------------------------


def pkcs8_der(seed: bytes) -> bytes:
    return _PKCS8_HEADER + _check_seed(seed)


def seed_from_pkcs8_der(der: bytes) -> bytes:
    """The seed of a PKCS#8 Ed25519 key in the fixed RFC 8410 layout; KeyEncodingError for anything else."""
    if len(der) == len(_PKCS8_HEADER) + SEED_LEN and der.startswith(_PKCS8_HEADER):
        return bytes(der[len(_PKCS8_HEADER) :])
    if _ED25519_OID not in der:
        raise KeyEncodingError("not an Ed25519 key (no id-Ed25519 algorithm identifier)")
    raise KeyEncodingError(
        f"not the {len(_PKCS8_HEADER) + SEED_LEN}-byte PKCS#8 v1 layout of an Ed25519 key (RFC 8410), "
        f"got {len(der)} bytes"
    )


def pkcs8_pem(seed: bytes) -> bytes:
    """The PEM file for `seed`: the bytes `cryptography` writes for PKCS8 + NoEncryption."""
    body = base64.b64encode(pkcs8_der(seed)).decode("ascii")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return ("\n".join([f"-----BEGIN {_PEM_LABEL}-----", *lines, f"-----END {_PEM_LABEL}-----"]) + "\n").encode()


def seed_from_pkcs8_pem(data: bytes) -> bytes:
    """Strict: one PEM block labelled PRIVATE KEY (whitespace around it allowed, no headers, nothing else)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise KeyEncodingError("not a PEM file (non-ASCII bytes)") from None
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) < 3 or not (lines[0].startswith("-----BEGIN ") and lines[0].endswith("-----")):
        raise KeyEncodingError("not a PEM file")
    label = lines[0][len("-----BEGIN ") : -len("-----")]
    if label != _PEM_LABEL:
        hint = " (encrypted keys are not supported)" if "ENCRYPTED" in label else ""
        raise KeyEncodingError(f"PEM block is {label!r}, expected {_PEM_LABEL!r}{hint}")
    if lines[-1] != f"-----END {_PEM_LABEL}-----":
        raise KeyEncodingError("PEM block is not terminated by its END line, or is followed by more text")
    body = "".join(lines[1:-1])
    if ":" in body or "-" in body:
        raise KeyEncodingError("PEM headers or more than one block are not supported")
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyEncodingError(f"PEM body is not base64: {exc}") from None
    return seed_from_pkcs8_der(der)


# --- backend: cryptography -----------------------------------------------------------------------------------


class _CryptographyKey(PrivateKey):
    def __init__(self, backend: Ed25519Backend, key: Ed25519PrivateKey) -> None:
        from cryptography.hazmat.primitives import serialization

        self.backend = backend
        self._key = key
        self.public_raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def seed(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )


class CryptographyBackend(Ed25519Backend):
    name = CRYPTOGRAPHY

    def __init__(self) -> None:
        try:
            import cryptography
            from cryptography.hazmat.primitives.asymmetric import ed25519  # noqa: F401  (fails here, not later)
        except ImportError as exc:
            raise Ed25519Unavailable(f"the cryptography package cannot be imported: {exc}") from None
        self.library = f"cryptography {cryptography.__version__}"

    def private_key(self, seed: bytes) -> PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return _CryptographyKey(self, Ed25519PrivateKey.from_private_bytes(_check_seed(seed)))

    def load_private_pem(self, data: bytes) -> PrivateKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyEncodingError(f"not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyEncodingError("not an Ed25519 key")
        return _CryptographyKey(self, key)

    def _check_public(self, public_raw: bytes) -> None:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(public_raw)
        except ValueError as exc:
            raise SignatureError(f"invalid public key: {exc}") from None

    def _verify(self, public_raw: bytes, signature: bytes, message: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


# --- backend: libsodium (PyNaCl) ------------------------------------------------------------------------------


class _SodiumKey(PrivateKey):
    def __init__(self, backend: Ed25519Backend, seed: bytes) -> None:
        from nacl.bindings import crypto_sign_seed_keypair

        self.backend = backend
        self._seed = seed
        self.public_raw, self._secret = crypto_sign_seed_keypair(seed)

    def sign(self, message: bytes) -> bytes:
        from nacl.bindings import crypto_sign

        return bytes(crypto_sign(message, self._secret)[:SIGNATURE_LEN])

    def seed(self) -> bytes:
        return self._seed


class LibsodiumBackend(Ed25519Backend):
    name = LIBSODIUM

    def __init__(self) -> None:
        try:
            import nacl
            from nacl.bindings import crypto_core_ed25519_is_valid_point, crypto_sign_open
        except ImportError as exc:
            raise Ed25519Unavailable(f"PyNaCl (libsodium) cannot be imported: {exc}") from None
        self.library = f"libsodium (PyNaCl {nacl.__version__})"
        self._open = crypto_sign_open
        self._valid_point = crypto_core_ed25519_is_valid_point

    def private_key(self, seed: bytes) -> PrivateKey:
        return _SodiumKey(self, _check_seed(seed))

    def _check_public(self, public_raw: bytes) -> None:
        if not self._valid_point(public_raw):
            raise SignatureError("invalid public key: not a point of the curve's main subgroup, or of small order")

    def verify(self, public_raw: bytes, signature: bytes, message: bytes) -> None:
        """As the base class's, without the full point check per signature (a scalar multiplication, ≈ 50 µs, as
        much as the verification): libsodium's verification itself refuses non-canonical and small-order keys, and
        keys are checked in full once, where they are registered (`check_public`)."""
        if len(public_raw) != PUBLIC_KEY_LEN:
            raise SignatureError(f"an Ed25519 public key is {PUBLIC_KEY_LEN} bytes")
        if len(signature) != SIGNATURE_LEN or not self._verify(bytes(public_raw), bytes(signature), bytes(message)):
            raise SignatureError("signature does not verify")

    def _verify(self, public_raw: bytes, signature: bytes, message: bytes) -> bool:
        from nacl.exceptions import BadSignatureError

        try:
            self._open(signature + message, public_raw)
        except BadSignatureError:
            return False
        return True


# --- backend: the system libcrypto through ctypes ------------------------------------------------------------

_EVP_PKEY_ED25519 = 1087  # NID_ED25519, the same in OpenSSL 1.1.1 and 3.x
_OPENSSL_1_1_1 = 0x1010100F  # OPENSSL_VERSION_NUMBER of 1.1.1 release; Ed25519 through EVP arrived there


def _ssl_linked_handle() -> ctypes.CDLL | None:
    """The `_ssl` extension as a ctypes handle: dlsym through it searches `_ssl` and the libraries it links, i.e.
    the libcrypto `import ssl` mapped. None if `ssl` is not importable or `_ssl` is built into the interpreter."""
    try:
        import _ssl
    except ImportError:
        return None
    path = getattr(_ssl, "__file__", None)
    if not path:
        return None
    try:
        return ctypes.CDLL(path)
    except OSError:
        return None


def _mapped_file(address: int) -> str | None:
    """The file mapped at `address` in this process (Linux /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                start, _, end = fields[0].partition("-")
                if int(start, 16) <= address < int(end, 16):
                    return fields[5].strip() if len(fields) == 6 else None
    except (OSError, ValueError, IndexError):
        return None
    return None


class _Libcrypto:
    """The EVP functions Ed25519 needs, resolved once, with their C signatures."""

    _REQUIRED = (
        "EVP_PKEY_new_raw_private_key",
        "EVP_PKEY_new_raw_public_key",
        "EVP_PKEY_get_raw_public_key",
        "EVP_PKEY_free",
        "EVP_MD_CTX_new",
        "EVP_MD_CTX_free",
        "EVP_DigestSignInit",
        "EVP_DigestSign",
        "EVP_DigestVerifyInit",
        "EVP_DigestVerify",
        "ERR_clear_error",
    )

    def __init__(self, handle: ctypes.CDLL, origin: str) -> None:
        missing = [name for name in self._REQUIRED if not hasattr(handle, name)]
        version_fn = _first_symbol(handle, "OpenSSL_version_num", "SSLeay")  # 1.1.0+ and 3.x; before 1.1.0
        if version_fn is None:
            raise Ed25519Unavailable(f"{origin} is not OpenSSL's libcrypto (no OpenSSL_version_num)")
        version_fn.restype = ctypes.c_ulong
        version_fn.argtypes = []
        self.version_number = int(version_fn())
        if self.version_number < _OPENSSL_1_1_1 or missing:
            raise Ed25519Unavailable(
                f"{origin}: OpenSSL {self.version_number:#x} lacks Ed25519 through EVP "
                f"(needs 1.1.1 or later; missing {', '.join(missing) or 'nothing'})"
            )
        text_fn = _first_symbol(handle, "OpenSSL_version")
        self.version = f"{self.version_number:#x}"
        if text_fn is not None:
            text_fn.restype = ctypes.c_char_p
            text_fn.argtypes = [ctypes.c_int]
            self.version = (text_fn(0) or b"").decode("ascii", "replace")
        p, sz, u8 = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p
        # OpenSSL 3.0 renamed EVP_PKEY_id to EVP_PKEY_get_id (the old name is a macro there, not a symbol).
        self.pkey_id = _declare(handle, ("EVP_PKEY_get_id", "EVP_PKEY_id"), ctypes.c_int, [p], origin)
        self.new_private = _declare(handle, ("EVP_PKEY_new_raw_private_key",), p, [ctypes.c_int, p, u8, sz], origin)
        self.new_public = _declare(handle, ("EVP_PKEY_new_raw_public_key",), p, [ctypes.c_int, p, u8, sz], origin)
        self.get_public = _declare(
            handle, ("EVP_PKEY_get_raw_public_key",), ctypes.c_int, [p, u8, ctypes.POINTER(sz)], origin
        )
        self.pkey_free = _declare(handle, ("EVP_PKEY_free",), None, [p], origin)
        self.ctx_new = _declare(handle, ("EVP_MD_CTX_new",), p, [], origin)
        self.ctx_free = _declare(handle, ("EVP_MD_CTX_free",), None, [p], origin)
        self.sign_init = _declare(handle, ("EVP_DigestSignInit",), ctypes.c_int, [p, p, p, p, p], origin)
        self.sign = _declare(handle, ("EVP_DigestSign",), ctypes.c_int, [p, u8, ctypes.POINTER(sz), u8, sz], origin)
        self.verify_init = _declare(handle, ("EVP_DigestVerifyInit",), ctypes.c_int, [p, p, p, p, p], origin)
        self.verify = _declare(handle, ("EVP_DigestVerify",), ctypes.c_int, [p, u8, sz, u8, sz], origin)
        self.clear_errors = _declare(handle, ("ERR_clear_error",), None, [], origin)
        # Where the functions really are (which file is mapped there), for the logs.
        address = ctypes.cast(self.new_private, ctypes.c_void_p).value  # type: ignore[arg-type]
        self.path = _mapped_file(address) if address else None

    def new_pkey(self, raw: bytes, *, private: bool) -> int:
        make = self.new_private if private else self.new_public
        pkey: int | None = make(_EVP_PKEY_ED25519, None, raw, len(raw))
        if not pkey:
            self.clear_errors()  # never leave our failure on the thread's queue for the ssl module to report
            raise SignatureError(f"libcrypto refused the Ed25519 {'private' if private else 'public'} key")
        if self.pkey_id(pkey) != _EVP_PKEY_ED25519:
            self.pkey_free(pkey)
            raise Ed25519Unavailable("libcrypto made a key of another type for EVP_PKEY_ED25519")
        return pkey

    def raw_public(self, pkey: int) -> bytes:
        buf = ctypes.create_string_buffer(PUBLIC_KEY_LEN)
        size = ctypes.c_size_t(PUBLIC_KEY_LEN)
        if self.get_public(pkey, buf, ctypes.byref(size)) != 1 or size.value != PUBLIC_KEY_LEN:
            self.clear_errors()
            raise SignatureError("libcrypto could not derive the Ed25519 public key")
        return buf.raw

    def digest_sign(self, pkey: int, message: bytes) -> bytes:
        ctx: int | None = self.ctx_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            buf = ctypes.create_string_buffer(SIGNATURE_LEN)
            size = ctypes.c_size_t(SIGNATURE_LEN)
            # Ed25519 is one-shot with no separate digest: a NULL EVP_MD, then EVP_DigestSign over the message.
            if (
                self.sign_init(ctx, None, None, None, pkey) != 1
                or self.sign(ctx, buf, ctypes.byref(size), message, len(message)) != 1
                or size.value != SIGNATURE_LEN
            ):
                self.clear_errors()
                raise SignatureError("libcrypto failed to sign")
            return buf.raw
        finally:
            self.ctx_free(ctx)

    def digest_verify(self, pkey: int, signature: bytes, message: bytes) -> bool:
        ctx: int | None = self.ctx_new()
        if not ctx:
            raise MemoryError("EVP_MD_CTX_new failed")
        try:
            if self.verify_init(ctx, None, None, None, pkey) != 1:
                self.clear_errors()
                raise SignatureError("libcrypto could not start a verification")
            ok = int(self.verify(ctx, signature, len(signature), message, len(message))) == 1
            if not ok:
                self.clear_errors()  # a bad signature queues an error in OpenSSL; it is not one for `ssl`
            return ok
        finally:
            self.ctx_free(ctx)


def _first_symbol(handle: ctypes.CDLL, *names: str) -> Any:
    for name in names:
        try:
            return getattr(handle, name)
        except AttributeError:
            continue
    return None


def _declare(
    handle: ctypes.CDLL, names: tuple[str, ...], restype: Any, argtypes: list[Any], origin: str
) -> Callable[..., Any]:
    fn = _first_symbol(handle, *names)
    if fn is None:
        raise Ed25519Unavailable(f"{origin} has none of {', '.join(names)}")
    fn.restype = restype
    fn.argtypes = argtypes
    return fn  # type: ignore[no-any-return]


class _LibcryptoKey(PrivateKey):
    def __init__(self, backend: LibcryptoBackend, seed: bytes) -> None:
        lib = backend.lib
        self.backend = backend
        self._seed = seed
        self._pkey = lib.new_pkey(seed, private=True)
        weakref.finalize(self, lib.pkey_free, self._pkey)  # freed with this object, whichever thread drops it
        self.public_raw = lib.raw_public(self._pkey)
        self._lib = lib

    def sign(self, message: bytes) -> bytes:
        return self._lib.digest_sign(self._pkey, bytes(message))

    def seed(self) -> bytes:
        return self._seed


class LibcryptoBackend(Ed25519Backend):
    """OpenSSL's libcrypto: preferably the copy the `_ssl` extension links (already mapped, so no new RSS), else
    the one `ctypes.util.find_library('crypto')` names."""

    name = LIBCRYPTO

    def __init__(self) -> None:
        tried: list[str] = []
        handle = _ssl_linked_handle()
        lib: _Libcrypto | None = None
        if handle is not None:
            try:
                lib = _Libcrypto(handle, "the libcrypto _ssl links")
            except Ed25519Unavailable as exc:
                tried.append(str(exc))
        if lib is None:
            from ctypes.util import find_library  # runs ldconfig: only when `_ssl` gave us nothing

            found = find_library("crypto")
            if found is None:
                tried.append("ctypes.util.find_library('crypto') finds no libcrypto")
            else:
                try:
                    lib = _Libcrypto(ctypes.CDLL(found), found)
                except (OSError, Ed25519Unavailable) as exc:
                    tried.append(str(exc))
        if lib is None:
            raise Ed25519Unavailable("no usable libcrypto: " + "; ".join(tried))
        self.lib = lib
        self.library = f"{lib.path or 'libcrypto'} ({lib.version})"

    def private_key(self, seed: bytes) -> PrivateKey:
        return _LibcryptoKey(self, _check_seed(seed))

    def _check_public(self, public_raw: bytes) -> None:
        self.lib.pkey_free(self.lib.new_pkey(public_raw, private=False))

    def _verify(self, public_raw: bytes, signature: bytes, message: bytes) -> bool:
        pkey = self.lib.new_pkey(public_raw, private=False)
        try:
            return self.lib.digest_verify(pkey, signature, message)
        finally:
            self.lib.pkey_free(pkey)


# --- selection -----------------------------------------------------------------------------------------------

_FACTORIES: dict[str, Callable[[], Ed25519Backend]] = {
    LIBCRYPTO: LibcryptoBackend,
    CRYPTOGRAPHY: CryptographyBackend,
    LIBSODIUM: LibsodiumBackend,
}
_loaded: dict[str, Ed25519Backend | Ed25519Unavailable] = {}
_lock = threading.Lock()


def load_backend(name: str) -> Ed25519Backend:
    """The named backend, self-tested, loaded once per process; Ed25519Unavailable (every time) if it cannot be."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise Ed25519Unavailable(f"unknown Ed25519 backend {name!r}; choose one of {', '.join(BACKENDS)}")
    with _lock:
        got = _loaded.get(name)
        if got is None:
            try:
                backend = factory()
                backend.self_test()
                got = backend
            except Ed25519Unavailable as exc:
                got = exc
            _loaded[name] = got
    if isinstance(got, Ed25519Unavailable):
        raise Ed25519Unavailable(str(got))
    return got


def select_backend(
    preference: Sequence[str] = DEFAULT_PREFERENCE,
    on_skip: Callable[[str, Ed25519Unavailable], None] | None = None,
) -> Ed25519Backend:
    """The first backend of `preference` that loads, unless `ZHILIAN_ED25519_BACKEND` names one: then that one or
    Ed25519Unavailable. `on_skip(name, error)` hears about every preferred backend passed over."""
    forced = os.environ.get(BACKEND_ENV, "").strip()
    if forced:
        try:
            return load_backend(forced)
        except Ed25519Unavailable as exc:
            raise Ed25519Unavailable(f"{BACKEND_ENV}={forced}: {exc}") from None
    errors: list[str] = []
    for name in preference:
        try:
            return load_backend(name)
        except Ed25519Unavailable as exc:
            errors.append(str(exc))
            if on_skip is not None:
                on_skip(name, exc)
    raise Ed25519Unavailable("no Ed25519 backend available: " + "; ".join(errors or ["none preferred"]))


def default_backend() -> Ed25519Backend:
    """What signing uses when no backend is given: `DEFAULT_PREFERENCE`, subject to `ZHILIAN_ED25519_BACKEND`."""
    return select_backend(DEFAULT_PREFERENCE)
