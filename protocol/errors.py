"""Typed errors of the wire contract. Every decoder in `protocol` raises only subclasses of ProtocolError."""


class ProtocolError(Exception):
    """Base of every error raised by the protocol package.

    `reason` is a short, stable, machine-friendly label (used as a metrics label by consumers).
    """

    reason = "protocol_error"


class DecodeError(ProtocolError):
    """Bytes that are not a well-formed message of the expected kind."""

    reason = "malformed"


class EncodeError(ProtocolError):
    """Values that cannot be represented on the wire (wrong type, overflow, unknown signal)."""

    reason = "unencodable"


class SignatureError(ProtocolError):
    """A signature that does not verify against the expected key."""

    reason = "bad_signature"


class UnsupportedVersionError(DecodeError):
    """An envelope of a protocol version this code does not speak."""

    reason = "unsupported_version"


class TopicError(ProtocolError):
    """A topic that does not follow the `ev/{vin}/...` scheme, or an invalid VIN."""

    reason = "bad_topic"


class CatalogueError(ProtocolError):
    """A signal catalogue file that is inconsistent (duplicate names or ids, bad types, missing fields)."""

    reason = "bad_catalogue"
