"""`apply`'s handlers: one per command, each inside the batch's write transaction.

Handlers check everything before their first write, so a rejection writes nothing but its
audit record (storage/audit.py: every applied entry but a no-op leaves one); the applied index
moves. Nothing here reads a clock, draws randomness or depends on anything local:
the same (index, entry) sequence gives the same state and the same results on every replica.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from storage.audit import apply_tree_head, record_applied, record_invalid
from storage.commands import (
    BeginImport,
    CertifyOpenpgp,
    Command,
    FinishImport,
    ImportX509,
    Invalid,
    IssueX509,
    Noop,
    PublishCrl,
    RaiseCrlNumber,
    RecordAudit,
    RecordCrl,
    RecordTreeHead,
    RequestCommand,
    RevokeX509,
    SetMeta,
    decode,
    encode,
)
from storage.crl import apply_publish_crl, apply_raise_crl_number, apply_record_crl
from storage.imports import apply_begin_import, apply_finish_import, apply_import_x509, importing
from storage.layout import cert_key, openpgp_key, revseq_key, serial_bytes
from storage.results import (
    AlreadyRevoked,
    Certified,
    Done,
    Duplicate,
    Issued,
    MetaSet,
    Reason,
    Rejected,
    Replayed,
    RequestResult,
    Result,
    Revocation,
    Revoked,
    from_record,
    record,
)
from storage.writer import Writer

_R = TypeVar("_R", bound=Revocation)


def apply_entry(w: Writer, index: int, entry: bytes | Command) -> Result:
    """Apply one log entry (or a command, encoded first: the same path) at `index`."""
    if index <= w.applied:
        return _replay(w, index, entry)
    w.applied = index
    w.dirty = True
    try:
        command = _decoded(entry)
    except Invalid as invalid:
        record_invalid(w, index, entry, invalid.reason)
        return Rejected(invalid.reason, invalid.message)
    result = _HANDLERS[type(command)](w, index, command)
    record_applied(w, index, command, result)
    return result


def _decoded(entry: bytes | Command) -> Command:
    if isinstance(entry, bytes):
        return decode(entry)
    try:
        data = encode(entry)
    except (TypeError, ValueError, OverflowError, AttributeError):
        raise Invalid(Reason.MALFORMED, "the command cannot be encoded as a log entry") from None
    return decode(data)


# --------------------------------------------------------------------------- requests


def _conflict(request_id: str, stored: dict[str, Any]) -> Rejected:
    message = (
        f"request id {request_id!r} was already used at index {stored['index']} "
        f"for a different {stored['op']} request"
    )
    return Rejected(Reason.REQUEST_ID_CONFLICT, message)


def _known_request(w: Writer, command: RequestCommand) -> Duplicate | Rejected | None:
    """Idempotency: the duplicate or conflict result if the request id is already recorded."""
    stored = w.get("requests", command.request_id.encode("utf-8"))
    if stored is None:
        return None
    if stored["op"] != command.op or stored["request_digest"] != command.request_digest:
        return _conflict(command.request_id, stored)
    return Duplicate(from_record(stored["result"]))


def _record_request(w: Writer, index: int, command: RequestCommand, result: RequestResult) -> None:
    stored = {
        "op": command.op,
        "request_digest": command.request_digest,
        "index": index,
        "result": record(result),
    }
    w.put("requests", command.request_id.encode("utf-8"), stored)


def _replay(w: Writer, index: int, entry: bytes | Command) -> Result:
    """The result an already-applied index gave the first time, where that is cheap to know.

    Validation is pure, so its rejections are recomputed; for request commands the request index
    tells whether `index` recorded the request (its result), came after it (duplicate) or met a
    recorded conflicting request (conflict). Anything else is `Replayed`. Nothing is written.
    """
    try:
        command = _decoded(entry)
    except Invalid as invalid:
        return Rejected(invalid.reason, invalid.message)
    if not isinstance(command, IssueX509 | RevokeX509 | CertifyOpenpgp):
        return Replayed()
    stored = w.get("requests", command.request_id.encode("utf-8"))
    if stored is None or stored["index"] > index:
        return Replayed()
    if stored["op"] != command.op or stored["request_digest"] != command.request_digest:
        return _conflict(command.request_id, stored) if stored["index"] < index else Replayed()
    result = from_record(stored["result"])
    return result if stored["index"] == index else Duplicate(result)


# --------------------------------------------------------------------------- X.509


def _apply_issue(w: Writer, index: int, c: IssueX509) -> Result:
    known = _known_request(w, c)
    if known is not None:
        return known
    refused = importing(w, c.issuer)
    if refused is not None:
        return refused
    key = cert_key(c.issuer, c.serial)
    if w.has("certs", key):
        message = f"serial {c.serial:#x} is already used by another certificate of this issuer"
        return Rejected(Reason.SERIAL_TAKEN, message)
    cert = {
        "request_id": c.request_id,
        "request_digest": c.request_digest,
        "profile": c.profile,
        "not_before": c.not_before,
        "not_after": c.not_after,
        "issued_at": c.issued_at,
        "revocation_seq": None,
        "der": c.der,
    }
    result = Issued(
        c.request_id,
        c.issuer,
        c.serial,
        c.profile,
        c.not_before,
        c.not_after,
        c.issued_at,
        index,
    )
    w.put("certs", key, cert)
    w.bump(c.issuer, w.issuer_counters(c.issuer), certificates=1)
    _record_request(w, index, c, result)
    return result


def revocation_of(issuer: bytes, serial: int, entry: list[Any], kind: type[_R]) -> _R:
    """The public view of a `revoked` value (see `_revoked_value` for the positions); an
    imported revocation has no request id (None)."""
    seq, revoked_at, reason, invalidity_date, _not_after, request_id, _crl_entry = entry
    return kind(request_id, issuer, serial, seq, reason, revoked_at, invalidity_date)


def _revoked_value(seq: int, c: RevokeX509, not_after: int) -> list[Any]:
    """`revoked` values are arrays (cheap to decode when walking millions for a CRL)."""
    return [seq, c.revoked_at, c.reason, c.invalidity_date, not_after, c.request_id, c.crl_entry]


def _apply_revoke(w: Writer, index: int, c: RevokeX509) -> Result:
    known = _known_request(w, c)
    if known is not None:
        return known
    refused = importing(w, c.issuer)
    if refused is not None:
        return refused
    key = cert_key(c.issuer, c.serial)
    cert = w.get("certs", key)
    if cert is None:
        message = f"no certificate with serial {c.serial:#x} for this issuer"
        return Rejected(Reason.UNKNOWN_CERTIFICATE, message)
    if cert["revocation_seq"] is not None:
        return revocation_of(c.issuer, c.serial, w.get("revoked", key), AlreadyRevoked)
    counters = w.issuer_counters(c.issuer)
    seq = counters["revocation_seq"] + 1
    w.put("revoked", key, _revoked_value(seq, c, cert["not_after"]))
    w.put("revseq", revseq_key(c.issuer, seq), serial_bytes(c.serial))
    w.put("certs", key, {**cert, "revocation_seq": seq})
    w.bump(c.issuer, counters, revoked=1, revocation_seq=1)
    result = Revoked(
        c.request_id, c.issuer, c.serial, seq, c.reason, c.revoked_at, c.invalidity_date, index
    )
    _record_request(w, index, c, result)
    return result


# --------------------------------------------------------------------------- OpenPGP, others


def _apply_certify(w: Writer, index: int, c: CertifyOpenpgp) -> Result:
    known = _known_request(w, c)
    if known is not None:
        return known
    stored = {
        "uids": list(c.uids),
        "expires": c.expires,
        "certified_at": c.certified_at,
        "result": c.result,
    }
    w.put("openpgp", openpgp_key(c.fingerprint, c.request_id), stored)
    result = Certified(c.request_id, c.fingerprint, tuple(c.uids), c.expires, c.certified_at, index)
    _record_request(w, index, c, result)
    return result


def _apply_publish(w: Writer, index: int, c: PublishCrl) -> Result:
    """No CRL of an issuer while its history is imported (its membership is being built)."""
    refused = importing(w, c.issuer)
    return refused if refused is not None else apply_publish_crl(w, index, c)


def _apply_noop(w: Writer, index: int, c: Noop) -> Result:
    return Done()


def _apply_set_meta(w: Writer, index: int, c: SetMeta) -> Result:
    """Compare-and-set of an opaque value, stored as given (the log owner's record)."""
    key = c.name.encode("utf-8")
    stored = w.txn.get(key, db=w.dbs["meta"])
    if (None if stored is None else bytes(stored)) != c.expected:
        return Rejected(Reason.META_CONFLICT, f"meta {c.name!r} does not hold the expected value")
    w.txn.put(key, c.value, db=w.dbs["meta"])
    return MetaSet(c.name)


_HANDLERS: dict[type[Any], Callable[[Writer, int, Any], Result]] = {
    IssueX509: _apply_issue,
    RevokeX509: _apply_revoke,
    RecordCrl: apply_record_crl,
    PublishCrl: _apply_publish,
    RaiseCrlNumber: apply_raise_crl_number,
    CertifyOpenpgp: _apply_certify,
    Noop: _apply_noop,
    SetMeta: _apply_set_meta,
    BeginImport: apply_begin_import,
    ImportX509: apply_import_x509,
    FinishImport: apply_finish_import,
    RecordAudit: _apply_noop,  # its events are its audit records
    RecordTreeHead: apply_tree_head,
}
