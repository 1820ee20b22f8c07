"""Typed errors of the hazard rule engine."""

from __future__ import annotations

from cloud_ingest.errors import IngestError


class RulesConfigError(IngestError):
    """The rules file (or a rule's view of the catalogue) is invalid; the message names the rule and the key."""


class RuleStateError(IngestError):
    """A persisted per-vehicle rule state cannot be restored (unknown version or malformed)."""
