"""Persistent state of the signer: the certificate repository (a deterministic state machine).

`Repository.apply(index, entry)` takes a log entry, `encode(command)`'s bytes, and answers a
typed result; see docs/repository.md.
"""

from storage.check import ConsistencyReport
from storage.commands import (
    COMMAND_TYPES,
    IMPORT_OPS,
    MAX_IMPORT_ENTRY_BYTES,
    BeginImport,
    CertifyOpenpgp,
    Command,
    FinishImport,
    ImportCommand,
    ImportedCertificate,
    ImportX509,
    Invalid,
    IssueX509,
    Noop,
    PublishCrl,
    RecordCrl,
    RevokeX509,
    SetMeta,
    decode,
    encode,
)
from storage.crl import crl_block_rows
from storage.errors import InvalidArgument, RepositoryError
from storage.imports import ImportState
from storage.layout import serial_bytes
from storage.repository import DEFAULT_MAP_SIZE, CertificateRecord, Repository, RevokedEntry
from storage.results import (
    AlreadyRevoked,
    Certified,
    CrlPublished,
    CrlRecorded,
    Done,
    Duplicate,
    ImportProgress,
    Issued,
    MetaSet,
    Reason,
    Rejected,
    Replayed,
    RequestRecord,
    RequestResult,
    Result,
    Revocation,
    Revoked,
)
from storage.schema import MIGRATIONS, SCHEMA_VERSION

__all__ = [
    "COMMAND_TYPES",
    "DEFAULT_MAP_SIZE",
    "IMPORT_OPS",
    "MAX_IMPORT_ENTRY_BYTES",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "AlreadyRevoked",
    "BeginImport",
    "CertificateRecord",
    "Certified",
    "CertifyOpenpgp",
    "Command",
    "ConsistencyReport",
    "CrlPublished",
    "CrlRecorded",
    "Done",
    "Duplicate",
    "FinishImport",
    "ImportCommand",
    "ImportProgress",
    "ImportState",
    "ImportX509",
    "ImportedCertificate",
    "Invalid",
    "InvalidArgument",
    "IssueX509",
    "Issued",
    "MetaSet",
    "Noop",
    "PublishCrl",
    "Reason",
    "RecordCrl",
    "Rejected",
    "Replayed",
    "Repository",
    "RepositoryError",
    "RequestRecord",
    "RequestResult",
    "Result",
    "Revocation",
    "RevokeX509",
    "Revoked",
    "RevokedEntry",
    "SetMeta",
    "crl_block_rows",
    "decode",
    "encode",
    "serial_bytes",
]
