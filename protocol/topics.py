"""MQTT topics of the contract: `ev/{vin}/telemetry|alert|status|cmd|cmd/ack`.

A device may publish only under its own `ev/{vin}/`; the cloud checks that the topic's VIN equals the envelope's.
"""

from __future__ import annotations

import enum
import re

from protocol.errors import TopicError

# Uppercase letters and digits only, so a VIN can never smuggle MQTT wildcards or level separators.  ISO 3779
# VINs are 17 characters; Chinese e-bike frame codes are often shorter, so 8..32 is accepted.
VIN_RE = re.compile(r"^[A-Z0-9]{8,32}$")
PREFIX = "ev"


class Channel(enum.StrEnum):
    TELEMETRY = "telemetry"
    ALERT = "alert"
    STATUS = "status"
    CMD = "cmd"
    CMD_ACK = "cmd/ack"


def validate_vin(vin: str) -> str:
    if not isinstance(vin, str) or not VIN_RE.match(vin):
        raise TopicError(f"invalid VIN {vin!r}: expected 8-32 characters A-Z 0-9")
    return vin


def topic(vin: str, channel: Channel) -> str:
    return f"{PREFIX}/{validate_vin(vin)}/{channel.value}"


def subscription(channel: Channel) -> str:
    """Wildcard filter matching `channel` for every vehicle."""
    return f"{PREFIX}/+/{channel.value}"


def parse_topic(name: str) -> tuple[str, Channel]:
    """Split `ev/{vin}/{channel}` into its VIN and channel; raises TopicError otherwise."""
    parts = name.split("/", 2)
    if len(parts) != 3 or parts[0] != PREFIX:
        raise TopicError(f"topic {name!r} is not under {PREFIX}/{{vin}}/")
    vin = validate_vin(parts[1])
    try:
        channel = Channel(parts[2])
    except ValueError:
        raise TopicError(f"topic {name!r} has unknown channel {parts[2]!r}") from None
    return vin, channel
