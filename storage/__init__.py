"""Persistent state of the signer: the certificate repository (a deterministic state machine)."""

from storage.repository import (
    COMMAND_FIELDS,
    DEFAULT_MAP_SIZE,
    MIGRATIONS,
    SCHEMA_VERSION,
    ConsistencyReport,
    Repository,
    RevokedEntry,
    validate_command,
)

__all__ = [
    "COMMAND_FIELDS",
    "DEFAULT_MAP_SIZE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ConsistencyReport",
    "Repository",
    "RevokedEntry",
    "validate_command",
]
