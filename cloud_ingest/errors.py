"""Typed errors of the cloud ingest service (everything here is raised by cloud_ingest, never by protocol)."""

from __future__ import annotations


class IngestError(Exception):
    """Base of every error raised by cloud_ingest."""


class StorageError(IngestError):
    """A database or time-series store operation failed; nothing may be acknowledged upstream."""


class DeviceConflict(IngestError):
    """A VIN is already registered with a different public key (keys are never silently replaced)."""


class InvalidDeviceError(IngestError):
    """A registration with an invalid VIN or public key."""


class QueryError(IngestError):
    """A time-series query that cannot be answered as asked (bad limit, bad range)."""


class UnknownSignalError(QueryError):
    """A query named signals the catalogue does not know."""

    def __init__(self, names: list[str]) -> None:
        super().__init__(f"unknown signals: {', '.join(names)}")
        self.names = names
