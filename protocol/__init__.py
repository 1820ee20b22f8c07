"""The wire contract of Zhilian: topics, envelope, columnar batch codec, signing, the signal catalogue.

Pure code over bytes (sans-I/O): nothing here opens a socket, a port or a database, and nothing here imports
another Zhilian package.
"""

from protocol.batch import Batch, DecodedBatch, decode_batch, encode_batch
from protocol.catalogue import Catalogue, Signal, SignalType, load_catalogue
from protocol.envelope import (
    MAX_ENVELOPE_BYTES,
    PROTOCOL_VERSION,
    Envelope,
    Flags,
    Kind,
    SignedEnvelope,
    parse_envelope,
    seal_envelope,
)
from protocol.errors import (
    CatalogueError,
    DecodeError,
    EncodeError,
    ProtocolError,
    SignatureError,
    TopicError,
)
from protocol.signing import DeviceKey, key_id_for, load_public_key

__all__ = [
    "MAX_ENVELOPE_BYTES",
    "PROTOCOL_VERSION",
    "Batch",
    "Catalogue",
    "CatalogueError",
    "DecodeError",
    "DecodedBatch",
    "DeviceKey",
    "EncodeError",
    "Envelope",
    "Flags",
    "Kind",
    "ProtocolError",
    "Signal",
    "SignalType",
    "SignatureError",
    "SignedEnvelope",
    "TopicError",
    "decode_batch",
    "encode_batch",
    "key_id_for",
    "load_catalogue",
    "load_public_key",
    "parse_envelope",
    "seal_envelope",
]
