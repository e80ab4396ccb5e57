"""What `apply` answers: one frozen class per outcome, and the reasons a command is rejected.

A rejection is data, never an exception, and its `Reason` is the repository's own; the signer
host maps reasons to wire codes (signer/server/errors.py). Results of request commands are
stored in `requests` (docs/repository.md §3) so that a retry gets the first answer: `record`
and `from_record` keep that stored map byte for byte what it always was.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

from storage.layout import serial_bytes, serial_int


class Reason(StrEnum):
    """Why a command was rejected."""

    MALFORMED = "malformed"  # not a command: shape, type, range (docs/repository.md §4)
    UNKNOWN_OP = "unknown_op"
    BAD_REASON = "bad_reason"  # a revocation reason that is not an RFC 5280 CRLReason
    REQUEST_ID_CONFLICT = "request_id_conflict"  # the id was used for another request
    UNKNOWN_CERTIFICATE = "unknown_certificate"  # revoking a serial never issued
    SERIAL_TAKEN = "serial_taken"  # another certificate of the issuer has this serial
    CRL_NUMBER_NOT_NEWER = "crl_number_not_newer"
    CRL_MISMATCH = "crl_mismatch"  # a publish_crl that does not fit the published state
    META_CONFLICT = "meta_conflict"  # set_meta: the stored value is not the expected one
    IMPORT_CONFLICT = "import_conflict"  # an import that does not fit the issuer's state
    AUDIT_MISMATCH = "audit_mismatch"  # a signed tree head that is not this audit tree's


@dataclass(frozen=True)
class Issued:
    status: ClassVar[str] = "issued"
    request_id: str
    issuer: bytes
    serial: int
    profile: str
    not_before: int
    not_after: int
    issued_at: int
    index: int  # the log index that recorded it


@dataclass(frozen=True)
class Revocation:
    """A certificate's revocation as the repository recorded it."""

    status: ClassVar[str] = "revocation"
    request_id: str | None  # the revoke request that revoked it; None: imported revoked
    issuer: bytes
    serial: int
    seq: int  # the issuer's revocation sequence number
    reason: int | None
    revoked_at: int
    invalidity_date: int | None


@dataclass(frozen=True)
class AlreadyRevoked(Revocation):
    """A revoke request for a certificate revoked before: the first revocation (not recorded
    under this request id, which stays free)."""

    status: ClassVar[str] = "already_revoked"


@dataclass(frozen=True)
class Revoked(Revocation):
    status: ClassVar[str] = "revoked"
    index: int


@dataclass(frozen=True)
class Certified:
    status: ClassVar[str] = "certified"
    request_id: str
    fingerprint: bytes
    uids: tuple[str, ...]
    expires: int
    certified_at: int
    index: int


@dataclass(frozen=True)
class CrlRecorded:
    status: ClassVar[str] = "recorded"
    issuer: bytes
    crl_number: int
    this_update: int
    next_update: int


@dataclass(frozen=True)
class CrlPublished:
    status: ClassVar[str] = "published"
    issuer: bytes
    crl_number: int
    this_update: int
    next_update: int
    revocation_seq: int
    entries: int
    added: int  # how many entries joined with this CRL
    removed: int  # how many left


@dataclass(frozen=True)
class CrlNumberRaised:
    """An issuer's CRL numbers now start at `floor` at the lowest (it never goes down)."""

    status: ClassVar[str] = "raised"
    issuer: bytes
    floor: int


@dataclass(frozen=True)
class MetaSet:
    status: ClassVar[str] = "recorded"
    name: str


@dataclass(frozen=True)
class ImportProgress:
    """Where an import stands after a begin_import, import_x509 or finish_import."""

    status: ClassVar[str] = "import"
    import_id: str
    issuer: bytes
    batches: int
    applied_batches: int
    certificates: int
    applied_certificates: int
    finished: bool
    fresh: bool  # this command changed the state (False: it had been applied before)


@dataclass(frozen=True)
class Done:
    """A noop was applied."""

    status: ClassVar[str] = "ok"


RequestResult = Issued | Revoked | Certified  # what a request id records


@dataclass(frozen=True)
class Duplicate:
    """The request id was recorded before with the same request: its first result."""

    status: ClassVar[str] = "duplicate"
    original: RequestResult


@dataclass(frozen=True)
class Rejected:
    status: ClassVar[str] = "rejected"
    reason: Reason
    message: str  # deterministic: a replay recomputes it word for word


@dataclass(frozen=True)
class Replayed:
    """An index at or below the applied one whose first result is not cheap to know."""

    status: ClassVar[str] = "replayed"


Result = (
    Issued
    | Revoked
    | AlreadyRevoked
    | Certified
    | CrlRecorded
    | CrlPublished
    | CrlNumberRaised
    | MetaSet
    | ImportProgress
    | Done
    | Duplicate
    | Rejected
    | Replayed
)


@dataclass(frozen=True)
class RequestRecord:
    """A recorded request (`requests`): which op, the client's digest, and its first result."""

    request_id: str
    op: str
    request_digest: bytes
    index: int
    result: RequestResult


_RECORDED: dict[str, type[RequestResult]] = {
    cls.status: cls for cls in (Issued, Revoked, Certified)
}


def record(result: RequestResult) -> dict[str, Any]:
    """The stored map of a result: `status` first, then the fields in order, the serial as
    20 bytes (msgpack ints stop at 64 bits), lists as arrays."""
    stored: dict[str, Any] = {"status": result.status}
    for field in dataclasses.fields(result):
        value = getattr(result, field.name)
        if field.name == "serial":
            value = serial_bytes(value)
        elif isinstance(value, tuple):
            value = list(value)
        stored[field.name] = value
    return stored


def from_record(stored: dict[str, Any]) -> RequestResult:
    cls = _RECORDED[stored["status"]]
    values = {k: v for k, v in stored.items() if k != "status"}
    if "serial" in values:
        values["serial"] = serial_int(values["serial"])
    if "uids" in values:
        values["uids"] = tuple(values["uids"])
    return cls(**values)
