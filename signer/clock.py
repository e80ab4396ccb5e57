"""The one wall clock of the signer: timezone-aware UTC. Components take a clock argument
defaulting to `utcnow`, so tests move time instead of sleeping."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)
