"""Sans-I/O sampling core: collects samples into columnar batches and seals them into signed envelopes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from protocol import Batch, Catalogue, DeviceKey, Envelope, Flags, Kind, seal_envelope
from protocol.batch import batch_from_rows
from protocol.topics import Channel, topic

Value = float | int | bool | str


@dataclass(frozen=True, slots=True)
class Sealed:
    """A signed message ready to publish."""

    topic: str
    payload: bytes
    seq: int
    kind: Kind
    samples: int


class Batcher:
    """Accumulates (timestamp, values) samples; `drain()` hands them over as one columnar batch.

    Bounded: past `max_samples` the oldest pending sample is dropped and counted (rare: the flusher moves the
    batch to the durable spool every batch interval).
    """

    def __init__(self, catalogue: Catalogue, max_samples: int = 3600) -> None:
        self._catalogue = catalogue
        self._rows: list[tuple[int, dict[str, Value]]] = []
        self._max = max_samples
        self.dropped = 0
        self.unknown_signals: dict[str, int] = {}

    def add(self, ts_ms: int, values: Mapping[str, Value]) -> None:
        clean: dict[str, Value] = {}
        for name, value in values.items():
            if name in self._catalogue:
                clean[name] = value
            else:
                self.unknown_signals[name] = self.unknown_signals.get(name, 0) + 1
        if self._rows and ts_ms < self._rows[-1][0]:
            # Clock stepped backwards (GNSS time vs board clock); keep order by clamping, never reorder history.
            ts_ms = self._rows[-1][0]
        if self._rows and ts_ms == self._rows[-1][0]:
            self._rows[-1][1].update(clean)
            return
        self._rows.append((ts_ms, clean))
        if len(self._rows) > self._max:
            del self._rows[0]
            self.dropped += 1

    def __len__(self) -> int:
        return len(self._rows)

    def drain(self) -> Batch | None:
        if not self._rows:
            return None
        rows, self._rows = self._rows, []
        return batch_from_rows(rows)


class Sealer:
    """Turns batches into signed envelopes with this boot's strictly increasing sequence numbers."""

    def __init__(self, vin: str, key: DeviceKey, boot: int) -> None:
        self.vin = vin
        self.boot = boot
        self._key = key
        self._next_seq = 0

    @property
    def next_seq(self) -> int:
        return self._next_seq

    def seal_body(
        self, body: bytes, samples: int, now_ms: int, kind: Kind = Kind.TELEMETRY, flags: Flags = Flags.NONE
    ) -> Sealed:
        """Seal an already encoded batch body (the spool keeps bodies and seals them at their first send)."""
        env = Envelope(self.vin, self._key.key_id, self.boot, self._next_seq, now_ms, kind, flags, body)
        payload = seal_envelope(env, self._key)
        seq = self._next_seq
        self._next_seq += 1
        return Sealed(topic_for(self.vin, kind), payload, seq, kind, samples)


def topic_for(vin: str, kind: Kind) -> str:
    return topic(vin, Channel.ALERT if kind is Kind.ALERT else Channel.TELEMETRY)


__all__ = ["Batcher", "Sealed", "Sealer", "topic_for"]
