"""Failures below the signer host, mapped to the documented wire codes in ONE place.

The repository rejects commands with its own reasons (`storage.Reason`) and raises its own
exceptions (`storage.RepositoryError`, `storage.InvalidArgument`); replication raises its own
(`replication.errors`). Whatever the signer answers, on the serial line (dispatch.py) or on the
control socket (control.py), goes through `wire_error` or `rejection_error`, so a code never
depends on which layer failed or on message text (docs/protocol.md lists the codes).
"""

from __future__ import annotations

from replication.errors import (
    ApplyFailed,
    ClockBehind,
    EntryTooLarge,
    MembershipConflict,
    MembershipRefused,
    NoQuorum,
    NotCommitted,
    QueueFull,
    ReplicationError,
)
from signer.errors import ErrorCode, SignerError
from storage.errors import InvalidArgument, RepositoryError
from storage.results import Reason, Rejected

REJECTION_CODES: dict[Reason, ErrorCode] = {
    Reason.MALFORMED: ErrorCode.BAD_ARGUMENTS,
    Reason.UNKNOWN_OP: ErrorCode.UNKNOWN_COMMAND,
    Reason.BAD_REASON: ErrorCode.BAD_REASON,
    Reason.REQUEST_ID_CONFLICT: ErrorCode.REQUEST_ID_CONFLICT,
    Reason.UNKNOWN_CERTIFICATE: ErrorCode.UNKNOWN_CERTIFICATE,
    Reason.SERIAL_TAKEN: ErrorCode.REPOSITORY_ERROR,
    Reason.CRL_NUMBER_NOT_NEWER: ErrorCode.REPOSITORY_ERROR,
    Reason.CRL_MISMATCH: ErrorCode.REPOSITORY_ERROR,
    Reason.META_CONFLICT: ErrorCode.REPOSITORY_ERROR,
    Reason.IMPORT_CONFLICT: ErrorCode.IMPORT_CONFLICT,
    Reason.AUDIT_MISMATCH: ErrorCode.REPOSITORY_ERROR,
}

# Most specific first: the first class an exception is an instance of gives its code.
EXCEPTION_CODES: tuple[tuple[type[Exception], ErrorCode], ...] = (
    (InvalidArgument, ErrorCode.BAD_ARGUMENTS),
    (RepositoryError, ErrorCode.REPOSITORY_ERROR),
    (NoQuorum, ErrorCode.NO_QUORUM),  # also Fenced
    (NotCommitted, ErrorCode.NOT_COMMITTED),
    (ClockBehind, ErrorCode.CLOCK_BEHIND),
    (QueueFull, ErrorCode.BUSY),
    (EntryTooLarge, ErrorCode.INPUT_TOO_LARGE),
    (ApplyFailed, ErrorCode.REPOSITORY_ERROR),  # also JournalFailed (a full disk)
    (MembershipRefused, ErrorCode.BAD_ARGUMENTS),
    (MembershipConflict, ErrorCode.REPOSITORY_ERROR),
    (ReplicationError, ErrorCode.INTERNAL_ERROR),
)


def rejection_error(rejected: Rejected) -> SignerError:
    """The wire error of a command the repository rejected."""
    return SignerError(REJECTION_CODES[rejected.reason], rejected.message)


def wire_error(exc: BaseException) -> SignerError | None:
    """The wire error of a failure the signer answers with a code; None for anything else (a
    bug: the caller answers `internal_error` and logs it)."""
    if isinstance(exc, SignerError):
        return exc
    for family, code in EXCEPTION_CODES:
        if isinstance(exc, family):
            error = SignerError(code, str(exc))
            error.__cause__ = exc
            return error
    return None
