"""Ed25519 behind protocol.ed25519: both backends (cryptography; the system libcrypto through ctypes) against RFC 8032
and against each other, the strict key-file codec of the libcrypto path, backend selection, and the agent process
signing and verifying without `cryptography` in memory."""

from __future__ import annotations

import asyncio
import base64
import ctypes
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import aiomqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edge_agent
from protocol import DeviceKey, Kind, ed25519, parse_envelope
from protocol.commands import AckStatus, Command, decode_ack, decode_status, new_command_id, seal_command
from protocol.errors import SignatureError
from protocol.signing import KeyFileError
from tests.conftest import wait_until
from zhilian.broker import MosquittoProcess

ROOT = Path(__file__).resolve().parents[1]
BACKEND_NAMES = [ed25519.LIBCRYPTO, ed25519.CRYPTOGRAPHY, ed25519.LIBSODIUM]

# RFC 8032, section 7.1: TEST 1, 2, 3, 1024 (a 1023-byte message) and SHA(abc) — (seed, public, message, signature).
RFC8032 = {
    "test1": (
        "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        "",
        (
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
            "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        ),
    ),
    "test2": (
        "4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        "72",
        (
            "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da"
            "085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"
        ),
    ),
    "test3": (
        "c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        "af82",
        (
            "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac"
            "18ff9b538d16f290ae67f760984dc6594a7c15e9716ed28dc027beceea1ec40a"
        ),
    ),
    "test1024": (
        "f5e5767cf153319517630f226876b86c8160cc583bc013744c6bf255f5cc0ee5",
        "278117fc144c72340f67d0f2316e8386ceffbf2b2428c9c51fef7c597f1d426e",
        (
            "08b8b2b733424243760fe426a4b54908632110a66c2f6591eabd3345e3e4eb98fa6e264bf09efe12ee50f8f54e9f77b1"
            "e355f6c50544e23fb1433ddf73be84d879de7c0046dc4996d9e773f4bc9efe5738829adb26c81b37c93a1b270b20329d"
            "658675fc6ea534e0810a4432826bf58c941efb65d57a338bbd2e26640f89ffbc1a858efcb8550ee3a5e1998bd177e93a"
            "7363c344fe6b199ee5d02e82d522c4feba15452f80288a821a579116ec6dad2b3b310da903401aa62100ab5d1a36553e"
            "06203b33890cc9b832f79ef80560ccb9a39ce767967ed628c6ad573cb116dbefefd75499da96bd68a8a97b928a8bbc10"
            "3b6621fcde2beca1231d206be6cd9ec7aff6f6c94fcd7204ed3455c68c83f4a41da4af2b74ef5c53f1d8ac70bdcb7ed1"
            "85ce81bd84359d44254d95629e9855a94a7c1958d1f8ada5d0532ed8a5aa3fb2d17ba70eb6248e594e1a2297acbbb39d"
            "502f1a8c6eb6f1ce22b3de1a1f40cc24554119a831a9aad6079cad88425de6bde1a9187ebb6092cf67bf2b13fd65f270"
            "88d78b7e883c8759d2c4f5c65adb7553878ad575f9fad878e80a0c9ba63bcbcc2732e69485bbc9c90bfbd62481d9089b"
            "eccf80cfe2df16a2cf65bd92dd597b0707e0917af48bbb75fed413d238f5555a7a569d80c3414a8d0859dc65a46128ba"
            "b27af87a71314f318c782b23ebfe808b82b0ce26401d2e22f04d83d1255dc51addd3b75a2b1ae0784504df543af8969b"
            "e3ea7082ff7fc9888c144da2af58429ec96031dbcad3dad9af0dcbaaaf268cb8fcffead94f3c7ca495e056a9b47acdb7"
            "51fb73e666c6c655ade8297297d07ad1ba5e43f1bca32301651339e22904cc8c42f58c30c04aafdb038dda0847dd988d"
            "cda6f3bfd15c4b4c4525004aa06eeff8ca61783aacec57fb3d1f92b0fe2fd1a85f6724517b65e614ad6808d6f6ee34df"
            "f7310fdc82aebfd904b01e1dc54b2927094b2db68d6f903b68401adebf5a7e08d78ff4ef5d63653a65040cf9bfd4aca7"
            "984a74d37145986780fc0b16ac451649de6188a7dbdf191f64b5fc5e2ab47b57f7f7276cd419c17a3ca8e1b939ae49e4"
            "88acba6b965610b5480109c8b17b80e1b7b750dfc7598d5d5011fd2dcc5600a32ef5b52a1ecc820e308aa342721aac09"
            "43bf6686b64b2579376504ccc493d97e6aed3fb0f9cd71a43dd497f01f17c0e2cb3797aa2a2f256656168e6c496afc5f"
            "b93246f6b1116398a346f1a641f3b041e989f7914f90cc2c7fff357876e506b50d334ba77c225bc307ba537152f3f161"
            "0e4eafe595f6d9d90d11faa933a15ef1369546868a7f3a45a96768d40fd9d03412c091c6315cf4fde7cb68606937380d"
            "b2eaaa707b4c4185c32eddcdd306705e4dc1ffc872eeee475a64dfac86aba41c0618983f8741c5ef68d3a101e8a3b8ca"
            "c60c905c15fc910840b94c00a0b9d0"
        ),
        (
            "0aab4c900501b3e24d7cdf4663326a3a87df5e4843b2cbdb67cbf6e460fec350"
            "aa5371b1508f9f4528ecea23c436d94b5e8fcd4f681e30a6ac00a9704a188a03"
        ),
    ),
    "test_sha_abc": (
        "833fe62409237b9d62ec77587520911e9a759cec1d19755b7da901b96dca3d42",
        "ec172b93ad5e563bf4932c70e1245034c35467ef2efd4d64ebf819683467e2bf",
        (
            "ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
            "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f"
        ),
        (
            "dc2a4459e7369633a52b1bf277839a00201009a3efbf3ecb69bea2186c26b589"
            "09351fc9ac90b3ecfdfbc7c66431e0303dca179c138ac17ad9bef1177331a704"
        ),
    ),
}


@pytest.fixture(params=BACKEND_NAMES)
def backend(request: pytest.FixtureRequest) -> ed25519.Ed25519Backend:
    # Both must load on the machines this project supports; a skip here would hide exactly what this file tests.
    return ed25519.load_backend(request.param)


LIBCRYPTO = ed25519.load_backend(ed25519.LIBCRYPTO)
CRYPTOGRAPHY = ed25519.load_backend(ed25519.CRYPTOGRAPHY)
LIBSODIUM = ed25519.load_backend(ed25519.LIBSODIUM)
ALL = (LIBCRYPTO, CRYPTOGRAPHY, LIBSODIUM)


# --- RFC 8032 ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(RFC8032))
def test_rfc8032_vectors(backend: ed25519.Ed25519Backend, name: str) -> None:
    seed, public, message, signature = (bytes.fromhex(h) for h in RFC8032[name])
    key = backend.private_key(seed)
    assert key.public_raw == public
    assert key.sign(message) == signature
    assert key.seed() == seed
    backend.verify(public, signature, message)
    device = DeviceKey.from_seed(seed, backend)
    assert device.backend is backend and device.sign(message) == signature
    with pytest.raises(SignatureError):
        backend.verify(public, signature, message + b"\x00")


def test_the_1023_byte_message_is_the_rfcs() -> None:
    assert len(bytes.fromhex(RFC8032["test1024"][2])) == 1023


# --- the backends agree --------------------------------------------------------------------------------

seeds = st.binary(min_size=32, max_size=32)
messages = st.binary(max_size=2048)


@given(seeds, messages)
def test_all_backends_sign_alike_and_verify_each_other(seed: bytes, message: bytes) -> None:
    keys = [backend.private_key(seed) for backend in ALL]
    assert len({key.public_raw for key in keys}) == 1
    signatures = [key.sign(message) for key in keys]
    assert len(set(signatures)) == 1  # Ed25519 is deterministic
    for backend in ALL:
        for key, signature in zip(keys, signatures, strict=True):
            backend.verify(key.public_raw, signature, message)


@given(seeds, messages, st.integers(0, 8 * ed25519.SIGNATURE_LEN - 1))
def test_a_flipped_signature_bit_fails_on_all(seed: bytes, message: bytes, bit: int) -> None:
    key = LIBCRYPTO.private_key(seed)
    bad = bytearray(key.sign(message))
    bad[bit // 8] ^= 1 << (bit % 8)
    for backend in ALL:
        with pytest.raises(SignatureError, match="does not verify"):
            backend.verify(key.public_raw, bytes(bad), message)


@given(seeds, messages, messages)
def test_another_message_fails_on_all(seed: bytes, message: bytes, other: bytes) -> None:
    if other == message:
        other = message + b"\x01"
    key = CRYPTOGRAPHY.private_key(seed)
    signature = key.sign(message)
    for backend in ALL:
        with pytest.raises(SignatureError):
            backend.verify(key.public_raw, signature, other)


@given(st.binary(max_size=80).filter(lambda b: len(b) != 64), st.binary(max_size=40).filter(lambda b: len(b) != 32))
def test_wrong_lengths_are_signature_errors(signature: bytes, public: bytes) -> None:
    key = LIBCRYPTO.private_key(b"\x01" * 32)
    for backend in ALL:
        with pytest.raises(SignatureError, match="does not verify"):
            backend.verify(key.public_raw, signature, b"m")
        with pytest.raises(SignatureError, match="32 bytes"):
            backend.verify(public, key.sign(b"m"), b"m")
        with pytest.raises(SignatureError, match="32 bytes"):
            backend.check_public(public)


def test_libcrypto_failures_leave_no_error_for_the_ssl_module() -> None:
    # Errors OpenSSL queues on a failure are per thread; left there, Python's ssl would report them with its next
    # failure. OpenSSL 3.0 queues none for a wrong signature, but does when it refuses a key (a 31-byte one here,
    # which `verify` refuses before OpenSSL sees it, so the EVP layer is called directly).
    lib = ctypes.CDLL(LIBCRYPTO.library.split(" (")[0])
    peek = lib.ERR_peek_error
    peek.restype, peek.argtypes = ctypes.c_ulong, []
    key = LIBCRYPTO.private_key(b"\x02" * 32)
    with pytest.raises(SignatureError):
        LIBCRYPTO.verify(key.public_raw, bytes(64), b"message")
    assert peek() == 0
    assert isinstance(LIBCRYPTO, ed25519.LibcryptoBackend)
    for private in (False, True):
        with pytest.raises(SignatureError, match="refused"):
            LIBCRYPTO.lib.new_pkey(b"\x01" * 31, private=private)
        assert peek() == 0


def test_the_libcrypto_backend_is_the_copy_ssl_maps() -> None:
    import _ssl

    mapped = {
        line.split()[-1]
        for line in Path("/proc/self/maps").read_text().splitlines()
        if len(line.split()) == 6 and "libcrypto" in line.split()[-1]
    }
    path = LIBCRYPTO.library.split(" (")[0]
    assert path in mapped, (path, mapped)
    linked = subprocess.run(["ldd", _ssl.__file__], capture_output=True, text=True, check=True).stdout
    assert os.path.realpath(path) in {os.path.realpath(p) for p in linked.split() if "libcrypto" in p}


def test_a_library_without_openssl_is_a_clear_error() -> None:
    libc = ctypes.CDLL("libc.so.6")
    with pytest.raises(ed25519.Ed25519Unavailable, match="not OpenSSL's libcrypto"):
        ed25519._Libcrypto(libc, "libc.so.6")


# --- key files ---------------------------------------------------------------------------------------------


def test_key_files_are_unchanged_and_interchangeable(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    seed = bytes(range(32))
    written_by_cryptography = Ed25519PrivateKey.from_private_bytes(seed).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert ed25519.pkcs8_pem(seed) == written_by_cryptography
    for writer in (LIBCRYPTO, CRYPTOGRAPHY):
        path = tmp_path / f"{writer.name}.key"
        DeviceKey.from_seed(seed, writer).save(path)
        assert path.read_bytes() == written_by_cryptography
        assert path.stat().st_mode & 0o777 == 0o600
        for reader in (LIBCRYPTO, CRYPTOGRAPHY):
            loaded = DeviceKey.load(path, reader)
            assert loaded.backend is reader and loaded.public_raw == CRYPTOGRAPHY.private_key(seed).public_raw
        path.chmod(0o640)
        for reader in (LIBCRYPTO, CRYPTOGRAPHY):
            with pytest.raises(KeyFileError, match="chmod 600"):
                DeviceKey.load(path, reader)


VALID_DER = ed25519.pkcs8_der(b"\x2a" * 32)


@given(
    st.one_of(
        st.binary(max_size=100),
        st.integers(0, len(VALID_DER) - 1).map(lambda n: VALID_DER[:n]),
        st.binary(min_size=1, max_size=40).map(lambda tail: VALID_DER + tail),
        st.tuples(st.integers(0, len(VALID_DER) - 1), st.integers(0, 255)).map(
            lambda iv: VALID_DER[: iv[0]] + bytes([iv[1]]) + VALID_DER[iv[0] + 1 :]
        ),
    )
)
def test_the_strict_parser_takes_the_rfc8410_layout_and_nothing_else(der: bytes) -> None:
    if len(der) == 48 and der[:16] == VALID_DER[:16]:
        assert ed25519.seed_from_pkcs8_der(der) == der[16:]  # a header byte "changed" to itself, or a new seed
        return
    with pytest.raises(ed25519.KeyEncodingError):
        ed25519.seed_from_pkcs8_der(der)


def _pem(label: str, der: bytes) -> bytes:
    return f"-----BEGIN {label}-----\n{base64.b64encode(der).decode()}\n-----END {label}-----\n".encode()


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_pem("ENCRYPTED PRIVATE KEY", VALID_DER), "encrypted keys are not supported"),
        (_pem("PUBLIC KEY", VALID_DER), "expected 'PRIVATE KEY'"),
        (_pem("PRIVATE KEY", VALID_DER[:-1]), "PKCS#8"),
        (_pem("PRIVATE KEY", VALID_DER) * 2, "more than one block"),
        (_pem("PRIVATE KEY", VALID_DER).replace(b"\n-----END", b"\nProc-Type: 4,ENCRYPTED\n-----END"), "headers"),
        (_pem("PRIVATE KEY", VALID_DER)[:-20], "END line"),
        (_pem("PRIVATE KEY", VALID_DER).replace(b"MC4", b"M!4"), "not base64"),
        ("-----BEGIN PRIVATE KEY-----\nMC4é\n-----END PRIVATE KEY-----\n".encode(), "non-ASCII"),
        (b"", "not a PEM file"),
        (b"\x30\x2e" + VALID_DER[2:], "not a PEM file"),  # DER where PEM belongs
    ],
)
def test_the_strict_pem_reader_names_what_is_wrong(data: bytes, match: str) -> None:
    with pytest.raises(ed25519.KeyEncodingError, match=match):
        ed25519.seed_from_pkcs8_pem(data)


def test_whitespace_around_the_pem_block_is_fine() -> None:
    pem = _pem("PRIVATE KEY", VALID_DER).replace(b"\n", b"\r\n")
    assert ed25519.seed_from_pkcs8_pem(b"\n  " + pem + b"\n\n") == b"\x2a" * 32


@pytest.mark.parametrize("algorithm", ["p256", "x25519", "ed448"])
def test_another_algorithms_key_file_is_a_key_file_error(tmp_path: Path, algorithm: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, x25519

    other: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey | ed448.Ed448PrivateKey
    if algorithm == "p256":
        other = ec.generate_private_key(ec.SECP256R1())
    elif algorithm == "x25519":
        other = x25519.X25519PrivateKey.generate()
    else:
        other = ed448.Ed448PrivateKey.generate()
    path = tmp_path / "other.key"
    path.write_bytes(
        other.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    for backend in (LIBCRYPTO, CRYPTOGRAPHY):
        with pytest.raises(KeyFileError, match="not an Ed25519 key"):
            DeviceKey.load(path, backend)


@settings(max_examples=50, deadline=None)  # file I/O per example: its timing is not what this tests
@given(st.binary(max_size=120))
def test_a_garbage_key_file_is_a_key_file_error_on_both(tmp_path_factory: pytest.TempPathFactory, der: bytes) -> None:
    path = tmp_path_factory.mktemp("garbage") / "device.key"
    path.write_bytes(_pem("PRIVATE KEY", der))
    path.chmod(0o600)
    for backend in (LIBCRYPTO, CRYPTOGRAPHY):
        with pytest.raises(KeyFileError, match="does not hold"):
            DeviceKey.load(path, backend)


# A point of order 2 (y = -1, x = 0): OpenSSL takes it as a public key, libsodium refuses it, both when a key is
# registered (`check_public`) and when a signature is verified under it. No generated key is one.
SMALL_ORDER_POINT = (2**255 - 19 - 1).to_bytes(32, "little")


def test_libsodium_refuses_a_small_order_public_key_that_openssl_takes() -> None:
    CRYPTOGRAPHY.check_public(SMALL_ORDER_POINT)
    with pytest.raises(SignatureError, match="invalid public key"):
        LIBSODIUM.check_public(SMALL_ORDER_POINT)
    with pytest.raises(SignatureError, match="does not verify"):
        LIBSODIUM.verify(SMALL_ORDER_POINT, bytes(64), b"m")


# --- selection ---------------------------------------------------------------------------------------------


def test_the_agent_prefers_libcrypto_and_the_rest_libsodium(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ed25519.BACKEND_ENV, raising=False)
    assert ed25519.select_backend(ed25519.AGENT_PREFERENCE) is LIBCRYPTO
    assert ed25519.select_backend() is LIBSODIUM
    assert ed25519.default_backend() is LIBSODIUM
    skipped: list[str] = []
    got = ed25519.select_backend(("no-such-backend", ed25519.CRYPTOGRAPHY), lambda name, _: skipped.append(name))
    assert got is CRYPTOGRAPHY and skipped == ["no-such-backend"]
    with pytest.raises(ed25519.Ed25519Unavailable, match=r"no Ed25519 backend available.*no-such-backend"):
        ed25519.select_backend(("no-such-backend",))


def test_the_environment_overrides_every_preference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ed25519.BACKEND_ENV, ed25519.CRYPTOGRAPHY)
    assert ed25519.select_backend(ed25519.AGENT_PREFERENCE) is CRYPTOGRAPHY
    monkeypatch.setenv(ed25519.BACKEND_ENV, ed25519.LIBCRYPTO)
    assert ed25519.default_backend() is LIBCRYPTO
    monkeypatch.setenv(ed25519.BACKEND_ENV, "nacl")
    with pytest.raises(ed25519.Ed25519Unavailable, match=f"{ed25519.BACKEND_ENV}=nacl: unknown Ed25519 backend"):
        ed25519.select_backend(ed25519.AGENT_PREFERENCE)


def test_the_agent_version_is_pyprojects() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["version"] == edge_agent.AGENT_VERSION


# --- the agent process -------------------------------------------------------------------------------------

VIN = "LZHTESTED25519AGT"


def _mapped(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if len(line.split()) == 6}


@pytest.mark.integration
@pytest.mark.parametrize("forced", [None, ed25519.CRYPTOGRAPHY])
def test_the_agent_process_signs_and_verifies_without_cryptography(
    tmp_path: Path, mosquitto: MosquittoProcess, forced: str | None
) -> None:
    """`zhilian agent run` publishes its signed status, verifies a signed command and acks it — with the
    cryptography package nowhere in its memory, unless the environment asks for that backend."""
    asyncio.run(_agent_process(tmp_path, mosquitto, forced))


async def _agent_process(tmp_path: Path, broker: MosquittoProcess, forced: str | None) -> None:
    device, cloud = DeviceKey.generate(CRYPTOGRAPHY), DeviceKey.generate(CRYPTOGRAPHY)
    key_file, cloud_keys, config = tmp_path / "device.key", tmp_path / "cloud.pub", tmp_path / "agent.toml"
    device.save(key_file)
    cloud_keys.write_text(base64.b64encode(cloud.public_raw).decode() + "\n")
    config.write_text(
        "[agent]\n"
        f'vin = "{VIN}"\nkey_file = "{key_file}"\nstate_dir = "{tmp_path / "state"}"\n'
        f'broker_host = "{broker.host}"\nbroker_port = {broker.port}\ncloud_key_file = "{cloud_keys}"\n'
        "status_interval_s = 1.0\n"
    )
    env = {k: v for k, v in os.environ.items() if k != ed25519.BACKEND_ENV}
    if forced:
        env[ed25519.BACKEND_ENV] = forced
    statuses: list[int] = []
    acks: list[tuple[bytes, AckStatus]] = []
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "zhilian", "agent", "run", "--config", str(config), "--log-level", "info",
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        async with aiomqtt.Client(broker.host, broker.port, identifier="ed25519-test") as client:
            await client.subscribe(f"ev/{VIN}/status", qos=1)
            await client.subscribe(f"ev/{VIN}/cmd/ack", qos=1)

            async def collect() -> None:
                async for message in client.messages:
                    assert isinstance(message.payload, bytes)
                    # Signed by the agent's backend, verified here by cryptography's.
                    env_ = parse_envelope(message.payload).verify(device.public_raw)
                    if env_.kind is Kind.STATUS and decode_status(env_.body).online:
                        statuses.append(env_.boot)
                    elif env_.kind is Kind.COMMAND_ACK:
                        ack = decode_ack(env_.body)
                        acks.append((ack.command_id, ack.status))

            collector = asyncio.create_task(collect())
            try:
                await wait_until(lambda: bool(statuses) or proc.returncode is not None, timeout=30)
                assert proc.returncode is None, log_path.read_text()
                now = int(time.time() * 1000)
                cid = new_command_id()
                command = Command(VIN, cid, now, now + 60_000, "lock", {}, cloud.key_id)
                await client.publish(f"ev/{VIN}/cmd", seal_command(command, cloud), qos=1)
                await wait_until(lambda: bool(acks), timeout=20)
                assert acks == [(cid, AckStatus.DONE)], acks
                mapped = _mapped(proc.pid)
            finally:
                collector.cancel()
                await asyncio.gather(collector, return_exceptions=True)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
    text = log_path.read_text()
    bindings = {p for p in mapped if f"{os.sep}cryptography{os.sep}" in p}
    if forced:
        assert bindings, "the cryptography backend was asked for, yet its binding is not mapped"
        assert '"backend": "cryptography"' in text
    else:
        assert not bindings, bindings
        assert '"backend": "libcrypto"' in text, text
        assert [p for p in mapped if "libcrypto" in p], "libcrypto is not mapped"
