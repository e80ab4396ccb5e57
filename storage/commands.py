"""Log commands: what the signer decided, one frozen class per operation, and their one codec.

A command carries every decision (serials, times, DER, signatures) so that applying it is
deterministic. `encode` turns a command into the bytes of a log entry; `decode` turns log bytes
back into a command and is the one place commands are validated: it is pure, so every replica,
and every replay, rejects a bad entry in exactly the same words (`Invalid`).

The encoding (docs/repository.md §4) is one msgpack map: `op` first, then the fields in the
order of the class. Serials and CRL numbers (up to 2**159, past msgpack's 64-bit ints) travel
as `bin` of 20 bytes, big-endian, as they are stored; everything else is msgpack as it is.
`encode` is faithful, not a validator: a field of the wrong type is encoded as what it is and
`decode` rejects it.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import msgpack

from storage.layout import (
    OWN_META_PREFIXES,
    RESERVED_META,
    SERIAL_SIZE,
    pack,
    serial_bytes,
    serial_int,
)
from storage.results import Reason

SERIAL_LIMIT = 2**159  # exclusive; RFC 5280 allows 20 octets, positive
CRL_NUMBER_LIMIT = 2**159  # exclusive; RFC 5280 allows 20 octets, non-negative
TIME_LIMIT = 2**63  # exclusive; keeps every time a msgpack int64
SEQ_LIMIT = 2**64
MAX_REQUEST_ID_BYTES = 256
MAX_DIGEST_BYTES = 64
MAX_TEXT_BYTES = 1024
MAX_UIDS = 100
FINGERPRINT_SIZES = (20, 32)  # OpenPGP v4 (SHA-1) and v5/v6 (SHA-256)
CRL_REASONS = frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 10})  # RFC 5280 CRLReason; 7 is unused
MAX_META_NAME_BYTES = 64
MAX_META_BYTES = 1 << 20
MAX_IMPORT_ENTRY_BYTES = 32 * 1024  # an import batch, encoded: small log entries only
MAX_REMOVED = 1000  # serials leaving one CRL (~22 KB): the rest leave with the next ones
MAX_IMPORT_ID_BYTES = 64
MAX_SUBJECT_BYTES = 4096
MAX_FILE_BYTES = 1024
BATCH_LIMIT = 2**32
IMPORT_STATUSES = ("V", "R", "E")  # openssl ca's index.txt: valid, revoked, marked expired


# --------------------------------------------------------------------------- the commands


@dataclass(frozen=True)
class IssueX509:
    """A certificate the CA signed: recorded once per request id."""

    op: ClassVar[str] = "issue_x509"
    request_id: str
    request_digest: bytes
    issuer: bytes  # the issuer's 20-byte key identifier
    serial: int
    der: bytes
    profile: str
    not_before: int  # Unix seconds UTC, like every time here
    not_after: int
    issued_at: int


@dataclass(frozen=True)
class RevokeX509:
    """A revocation the CA decided, with its CRL entry already encoded."""

    op: ClassVar[str] = "revoke_x509"
    request_id: str
    request_digest: bytes
    issuer: bytes
    serial: int
    reason: int | None  # RFC 5280 CRLReason
    revoked_at: int
    invalidity_date: int | None
    crl_entry: bytes


@dataclass(frozen=True)
class RecordCrl:
    """A CRL kept as the issuer's latest, without membership or history (the key ceremony's)."""

    op: ClassVar[str] = "record_crl"
    issuer: bytes
    crl_number: int
    this_update: int
    next_update: int
    der: bytes


@dataclass(frozen=True)
class PublishCrl:
    """A CRL the signer made: what is needed to follow its membership and to rebuild its DER
    byte for byte (docs/crl.md), not the DER itself, so that the log entry stays small."""

    op: ClassVar[str] = "publish_crl"
    issuer: bytes
    crl_number: int
    this_update: int
    next_update: int
    revocation_seq: int  # revocations up to this sequence number are decided for this CRL
    removed: tuple[int, ...]  # serials leaving with it, ascending
    entries: int
    removed_before: int | None
    expired_certs_on_crl: int | None
    signature_algorithm: bytes
    signature: bytes
    sha256: bytes  # of the DER
    size: int  # the DER's length


@dataclass(frozen=True)
class RaiseCrlNumber:
    """The issuer's next CRL numbers are at least `at_least` (never lowered): after a restore
    from a backup, past any number published since the backup (storage/restore.py)."""

    op: ClassVar[str] = "raise_crl_number"
    issuer: bytes
    at_least: int
    reason: str


@dataclass(frozen=True)
class CertifyOpenpgp:
    """An OpenPGP certification the CA made: recorded once per request id."""

    op: ClassVar[str] = "certify_openpgp"
    request_id: str
    request_digest: bytes
    fingerprint: bytes
    uids: tuple[str, ...]
    expires: int
    certified_at: int
    result: bytes


@dataclass(frozen=True)
class Noop:
    """Moves the applied index only."""

    op: ClassVar[str] = "noop"


@dataclass(frozen=True)
class SetMeta:
    """Compare-and-set of a named value kept for the log's owner (replication's cluster record):
    `value` is stored under `name` if the stored value is `expected` (None: absent). Opaque to
    the repository; applied atomically with the applied index and carried by snapshots."""

    op: ClassVar[str] = "set_meta"
    name: str
    expected: bytes | None
    value: bytes


class ImportedCertificate(NamedTuple):
    """One certificate of an earlier CA's history (openssl ca's index.txt, the WebDB), with
    everything decided: its CRL entry encoded, whether the imported CRL lists it. A tuple:
    an import builds and decodes millions of them."""

    serial: int
    not_before: int | None  # None: only the index was there, not the certificate
    not_after: int
    subject: bytes  # as the earlier CA wrote it (openssl's one-line form), byte for byte
    file: bytes  # index.txt's file name column (usually b"unknown")
    status: str  # "V", "R" or "E" as index.txt says
    revoked_at: int | None
    reason: int | None  # 0: an explicit "unspecified" (left out of the CRL entry)
    invalidity_date: int | None
    crl_entry: bytes | None  # for a revoked one
    listed: bool  # on the imported CRL: revoked and not expired before its cut
    der: bytes | None  # the certificate, when its file was imported


@dataclass(frozen=True)
class BeginImport:
    """An import of an issuer's history starts: what it will bring and the CRL it continues.

    The issuer must have no certificate and no published CRL yet. `crl_number` is the earlier
    CA's last CRL number; `crl_time` the thisUpdate of the CRL the import stands for (its
    entries: the revocations marked `listed`); `removed_before` what that CRL's retention let go
    (docs/crl.md §3)."""

    op: ClassVar[str] = "begin_import"
    import_id: str  # names the input: the same input resumes the same import
    issuer: bytes
    batches: int
    certificates: int
    revoked: int
    listed: int
    crl_number: int
    crl_time: int
    removed_before: int | None
    started_at: int
    source: str  # what was imported, for the record


@dataclass(frozen=True)
class ImportX509:
    """One batch of an import, in serial order after the batch before it (at most
    MAX_IMPORT_ENTRY_BYTES encoded)."""

    op: ClassVar[str] = "import_x509"
    import_id: str
    issuer: bytes
    batch: int  # 1, 2, ...
    certificates: tuple[ImportedCertificate, ...]


@dataclass(frozen=True)
class FinishImport:
    """Every batch is in: the imported CRL becomes the issuer's last published one."""

    op: ClassVar[str] = "finish_import"
    import_id: str
    issuer: bytes


class AuditEvent(NamedTuple):
    """Something the signer saw that no other command records (a request refused before any
    commit, an operator's action): `detail` is a flat map of small values, no secret."""

    event: str  # one of AUDIT_EVENTS
    time: int
    detail: dict[str, Any]


@dataclass(frozen=True)
class RecordAudit:
    """Audit records the signer host decided (refusals, batched; operator actions)."""

    op: ClassVar[str] = "record_audit"
    events: tuple[AuditEvent, ...]


@dataclass(frozen=True)
class RecordTreeHead:
    """A tree head the audit key signed: kept if `root` is the audit tree's root at `size`."""

    op: ClassVar[str] = "record_tree_head"
    size: int
    timestamp: int
    root: bytes
    algorithm: str
    signature: bytes


Command = (
    IssueX509
    | RevokeX509
    | RecordCrl
    | PublishCrl
    | RaiseCrlNumber
    | CertifyOpenpgp
    | Noop
    | SetMeta
    | BeginImport
    | ImportX509
    | FinishImport
    | RecordAudit
    | RecordTreeHead
)
RequestCommand = IssueX509 | RevokeX509 | CertifyOpenpgp  # idempotent by request id
ImportCommand = BeginImport | ImportX509 | FinishImport
COMMAND_TYPES: dict[str, type[Command]] = {
    cls.op: cls
    for cls in (
        IssueX509,
        RevokeX509,
        RecordCrl,
        PublishCrl,
        RaiseCrlNumber,
        CertifyOpenpgp,
        Noop,
        SetMeta,
        BeginImport,
        ImportX509,
        FinishImport,
        RecordAudit,
        RecordTreeHead,
    )
}
REQUEST_OPS = frozenset({IssueX509.op, RevokeX509.op, CertifyOpenpgp.op})
IMPORT_OPS = frozenset({BeginImport.op, ImportX509.op, FinishImport.op})
AUDIT_EVENTS = frozenset({"refused", "operator"})
MAX_AUDIT_EVENTS = 64
MAX_AUDIT_DETAIL = 16  # fields per event
MAX_AUDIT_BYTES = 8 * 1024  # an audit command, encoded: well under the log's entry bound
BIG_INT_FIELDS = frozenset({"serial", "crl_number", "at_least"})  # carried as 20-byte bin
BIG_INT_LISTS = frozenset({"removed"})


class Invalid(Exception):
    """A log entry that is not a valid command: `apply` turns it into a rejection."""

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


# --------------------------------------------------------------------------- encoding


def encode(command: Command) -> bytes:
    """The log entry of a command (raises ValueError or TypeError when msgpack cannot hold a
    field, such as a str that is not UTF-8 or an int past 64 bits in a plain int field)."""
    fields: dict[str, Any] = {"op": command.op}
    for field in dataclasses.fields(command):
        value = getattr(command, field.name)
        if field.name in BIG_INT_FIELDS:
            value = _big_to_wire(value)
        elif field.name in BIG_INT_LISTS and isinstance(value, list | tuple):
            value = [_big_to_wire(item) for item in value]
        elif field.name == "certificates" and isinstance(value, list | tuple):
            value = [_imported_to_wire(item) for item in value]
        elif field.name == "events" and isinstance(value, list | tuple):
            value = [list(item) if isinstance(item, AuditEvent) else item for item in value]
        elif isinstance(value, tuple):
            value = list(value)
        fields[field.name] = value
    return pack(fields)


def _big_to_wire(value: Any) -> Any:
    if type(value) is int and 0 <= value < 2 ** (8 * SERIAL_SIZE):
        return serial_bytes(value)
    return value  # not a 20-byte number: encoded as it is, and refused by decode


def _imported_to_wire(item: Any) -> Any:
    """An imported certificate as an array in field order (millions of them: no field names)."""
    if not isinstance(item, ImportedCertificate):
        return item  # refused by decode
    return [_big_to_wire(item[0]), *item[1:]]


def decode(entry: bytes) -> Command:
    """The command in a log entry, validated; raises `Invalid` (deterministically)."""
    if not isinstance(entry, bytes):
        raise _bad("a log entry must be bytes")
    try:
        fields = msgpack.unpackb(entry, raw=False, strict_map_key=False)
    except Exception:
        raise _bad("the log entry is not one msgpack value") from None
    command = from_fields(fields)
    if isinstance(command, ImportX509) and len(entry) > MAX_IMPORT_ENTRY_BYTES:
        raise _bad(f"an import batch is {len(entry)} bytes, over {MAX_IMPORT_ENTRY_BYTES}")
    if isinstance(command, RecordAudit) and len(entry) > MAX_AUDIT_BYTES:
        raise _bad(f"audit records of {len(entry)} bytes, over {MAX_AUDIT_BYTES}")
    return command


def from_fields(fields: Any) -> Command:
    """A command from its decoded map (wire form: 20-byte serials); raises `Invalid`."""
    if not isinstance(fields, dict):
        raise _bad("command must be a map")
    op = fields.get("op")
    if not isinstance(op, str):
        raise _bad("command field 'op' must be a str")
    cls = COMMAND_TYPES.get(op)
    if cls is None:
        raise Invalid(Reason.UNKNOWN_OP, f"unknown op {op[:64]!r}")
    if not all(isinstance(key, str) for key in fields):
        raise _bad("command field names must be str")
    if op == PublishCrl.op and "der" in fields and "size" not in fields:
        fields = _publish_crl_with_der(fields)
    spec = _SPECS[op]
    extra = sorted(set(fields) - set(spec) - {"op"})
    if extra:
        raise _bad(f"unknown field(s) for {op}: {', '.join(name[:64] for name in extra[:5])}")
    missing = [name for name in spec if name not in fields]
    if missing:
        raise _bad(f"missing field(s) for {op}: {', '.join(missing)}")
    values = {name: check(name, fields[name]) for name, check in spec.items()}
    command = cls(**values)
    _check_cross_fields(command)
    return command


def _publish_crl_with_der(fields: dict[str, Any]) -> dict[str, Any]:
    """A `publish_crl` of schema 2 and before carried the DER: read as its size (what the
    repository keeps of it since schema 3), so that replays give every replica one state."""
    der = _v_blob("der", fields["der"])
    return {**{k: v for k, v in fields.items() if k != "der"}, "size": len(der)}


def _check_cross_fields(command: Command) -> None:
    if isinstance(command, IssueX509) and command.not_after < command.not_before:
        raise _bad("not_after is before not_before")
    if isinstance(command, RecordCrl | PublishCrl) and command.next_update < command.this_update:
        raise _bad("next_update is before this_update")
    if isinstance(command, BeginImport) and not (
        command.listed <= command.revoked <= command.certificates
    ):
        raise _bad("listed <= revoked <= certificates does not hold")


# --------------------------------------------------------------------------- field rules


def _bad(message: str) -> Invalid:
    return Invalid(Reason.MALFORMED, message)


def _int_in(name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{name} must be an int")
    if not low <= value < high:
        raise _bad(f"{name} is out of range")
    return int(value)


def _utf8(name: str, value: Any, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise _bad(f"{name} must be a str")
    size = len(value.encode("utf-8"))  # decoded from msgpack: always valid UTF-8
    if not 1 <= size <= max_bytes:
        raise _bad(f"{name} must be 1 to {max_bytes} bytes of UTF-8")
    return value


def _bytes(name: str, value: Any, sizes: range | tuple[int, ...]) -> bytes:
    if not isinstance(value, bytes):
        raise _bad(f"{name} must be bytes")
    if len(value) not in sizes:
        raise _bad(f"{name} has a wrong length ({len(value)} bytes)")
    return value


def _big(name: str, value: Any, low: int, high: int) -> int:
    """A serial or CRL number: 20 bytes big-endian on the log, an int in the command."""
    if not isinstance(value, bytes) or len(value) != SERIAL_SIZE:
        raise _bad(f"{name} must be a number as 20 bytes, big-endian")
    number = serial_int(value)
    if not low <= number < high:
        raise _bad(f"{name} is out of range")
    return number


def _v_request_id(name: str, value: Any) -> str:
    return _utf8(name, value, MAX_REQUEST_ID_BYTES)


def _v_text(name: str, value: Any) -> str:
    return _utf8(name, value, MAX_TEXT_BYTES)


def _v_digest(name: str, value: Any) -> bytes:
    return _bytes(name, value, range(1, MAX_DIGEST_BYTES + 1))


def _v_issuer(name: str, value: Any) -> bytes:
    return _bytes(name, value, (20,))


def _v_fingerprint(name: str, value: Any) -> bytes:
    return _bytes(name, value, FINGERPRINT_SIZES)


def _v_blob(name: str, value: Any) -> bytes:
    if not isinstance(value, bytes) or not value:
        raise _bad(f"{name} must be non-empty bytes")
    return value


def _v_serial(name: str, value: Any) -> int:
    return _big(name, value, 1, SERIAL_LIMIT)


def _v_crl_number(name: str, value: Any) -> int:
    return _big(name, value, 0, CRL_NUMBER_LIMIT)


def _v_time(name: str, value: Any) -> int:
    return _int_in(name, value, 0, TIME_LIMIT)


def _v_optional_time(name: str, value: Any) -> int | None:
    return None if value is None else _v_time(name, value)


def _v_reason(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value not in CRL_REASONS:
        raise Invalid(Reason.BAD_REASON, f"{name} must be None or an RFC 5280 CRLReason code")
    return int(value)


def _v_seq(name: str, value: Any) -> int:
    return _int_in(name, value, 0, SEQ_LIMIT)


def _v_sha256(name: str, value: Any) -> bytes:
    return _bytes(name, value, (32,))


def _v_size(name: str, value: Any) -> int:
    return _int_in(name, value, 1, 2**32)


def _v_serial_list(name: str, value: Any) -> tuple[int, ...]:
    """Serials in strictly ascending order (so a list is one set, in one canonical order)."""
    if not isinstance(value, list) or len(value) > MAX_REMOVED:
        raise _bad(f"{name} must be a list of at most {MAX_REMOVED} serials")
    serials = [_v_serial(f"{name}[{i}]", serial) for i, serial in enumerate(value)]
    if any(a >= b for a, b in itertools.pairwise(serials)):
        raise _bad(f"{name} must be strictly ascending")
    return tuple(serials)


def _v_uids(name: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_UIDS:
        raise _bad(f"{name} must be a list of 1 to {MAX_UIDS} str")
    return tuple(_v_text(f"{name}[{i}]", uid) for i, uid in enumerate(value))


def _v_meta_name(name: str, value: Any) -> str:
    text = _utf8(name, value, MAX_META_NAME_BYTES)
    if text in RESERVED_META or text.startswith(OWN_META_PREFIXES):
        raise _bad(f"{name} {text!r} is the repository's own")
    return text


def _v_meta_value(name: str, value: Any) -> bytes:
    if not isinstance(value, bytes) or not 1 <= len(value) <= MAX_META_BYTES:
        raise _bad(f"{name} must be 1 to {MAX_META_BYTES} bytes")
    return value


def _v_optional_meta_value(name: str, value: Any) -> bytes | None:
    return None if value is None else _v_meta_value(name, value)


def _v_import_id(name: str, value: Any) -> str:
    return _utf8(name, value, MAX_IMPORT_ID_BYTES)


def _v_batch(name: str, value: Any) -> int:
    return _int_in(name, value, 1, BATCH_LIMIT)


def _v_batches(name: str, value: Any) -> int:
    return _int_in(name, value, 1, BATCH_LIMIT)


def _optional_bytes(name: str, value: Any) -> bytes | None:
    return None if value is None else _v_blob(name, value)


def _v_imported(name: str, value: Any) -> tuple[ImportedCertificate, ...]:
    """A batch's certificates: 1 or more, each an array in field order, serials ascending."""
    if not isinstance(value, list) or not value:
        raise _bad(f"{name} must be a non-empty list")
    certificates = tuple(
        _imported_fast(item) or _imported(f"{name}[{i}]", item) for i, item in enumerate(value)
    )
    if any(a.serial >= b.serial for a, b in itertools.pairwise(certificates)):
        raise _bad(f"{name} must be in strictly ascending serial order")
    return certificates


_IMPORTED_FIELDS = len(ImportedCertificate._fields)


def _imported_fast(value: Any) -> ImportedCertificate | None:
    """The usual record, checked in a few expressions (an import decodes millions); None sends
    it to `_imported`, which accepts exactly the same records and says what is wrong."""
    if type(value) is not list or len(value) != _IMPORTED_FIELDS:
        return None
    serial, not_before, not_after, subject, file, status, *rest = value
    revoked_at, reason, invalidity, crl_entry, listed, der = rest
    if not (
        type(serial) is bytes
        and len(serial) == SERIAL_SIZE
        and type(not_after) is int
        and 0 <= not_after < TIME_LIMIT
        and (not_before is None or (type(not_before) is int and 0 <= not_before <= not_after))
        and type(subject) is bytes
        and len(subject) <= MAX_SUBJECT_BYTES
        and type(file) is bytes
        and len(file) <= MAX_FILE_BYTES
        and type(listed) is bool
        and (der is None or (type(der) is bytes and len(der) > 0))
    ):
        return None
    if status == "R":
        if not (
            type(revoked_at) is int
            and 0 <= revoked_at < TIME_LIMIT
            and (reason is None or (type(reason) is int and reason in CRL_REASONS))
            and (invalidity is None or (type(invalidity) is int and 0 <= invalidity < TIME_LIMIT))
            and type(crl_entry) is bytes
            and len(crl_entry) > 0
        ):
            return None
    elif status not in IMPORT_STATUSES or (revoked_at, reason, invalidity, crl_entry, listed) != (
        None,
        None,
        None,
        None,
        False,
    ):
        return None
    number = serial_int(serial)
    if not 1 <= number < SERIAL_LIMIT:
        return None
    return ImportedCertificate(number, not_before, not_after, subject, file, status, *rest)


def _imported(name: str, value: Any) -> ImportedCertificate:
    if not isinstance(value, list) or len(value) != _IMPORTED_FIELDS:
        raise _bad(f"{name} must be an array of {_IMPORTED_FIELDS} fields")
    serial, not_before, not_after, subject, file, status, *rest = value
    revoked_at, reason, invalidity, crl_entry, listed, der = rest
    if status not in IMPORT_STATUSES:
        raise _bad(f"{name}: status must be V, R or E")
    if not isinstance(listed, bool):
        raise _bad(f"{name}: listed must be true or false")
    certificate = ImportedCertificate(
        serial=_v_serial(f"{name}.serial", serial),
        not_before=_v_optional_time(f"{name}.not_before", not_before),
        not_after=_v_time(f"{name}.not_after", not_after),
        subject=_bytes(f"{name}.subject", subject, range(MAX_SUBJECT_BYTES + 1)),
        file=_bytes(f"{name}.file", file, range(MAX_FILE_BYTES + 1)),
        status=status,
        revoked_at=_v_optional_time(f"{name}.revoked_at", revoked_at),
        reason=_v_reason(f"{name}.reason", reason),
        invalidity_date=_v_optional_time(f"{name}.invalidity_date", invalidity),
        crl_entry=_optional_bytes(f"{name}.crl_entry", crl_entry),
        listed=listed,
        der=_optional_bytes(f"{name}.der", der),
    )
    revoked = status == "R"
    if (certificate.revoked_at is None) == revoked or (certificate.crl_entry is None) == revoked:
        raise _bad(f"{name}: a revocation time and CRL entry go with status R, and only with it")
    if not revoked and (certificate.reason, certificate.invalidity_date, listed) != (
        None,
        None,
        False,
    ):
        raise _bad(f"{name}: reason, invalidity date and listed go with status R only")
    if certificate.not_before is not None and certificate.not_before > certificate.not_after:
        raise _bad(f"{name}: not_after is before not_before")
    return certificate


def _v_audit_events(name: str, value: Any) -> tuple[AuditEvent, ...]:
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_AUDIT_EVENTS:
        raise _bad(f"{name} must be a list of 1 to {MAX_AUDIT_EVENTS} events")
    return tuple(_v_audit_event(f"{name}[{i}]", item) for i, item in enumerate(value))


def _v_audit_event(name: str, value: Any) -> AuditEvent:
    if not isinstance(value, list) or len(value) != 3:
        raise _bad(f"{name} must be [event, time, detail]")
    event, time, detail = value
    if event not in AUDIT_EVENTS:
        raise _bad(f"{name}: event must be one of {', '.join(sorted(AUDIT_EVENTS))}")
    if not isinstance(detail, dict) or len(detail) > MAX_AUDIT_DETAIL:
        raise _bad(f"{name}: detail must be a map of at most {MAX_AUDIT_DETAIL} fields")
    for key, item in detail.items():
        _utf8(f"{name} detail key", key, MAX_META_NAME_BYTES)
        if key in ("v", "index", "event", "time"):
            raise _bad(f"{name}: detail key {key!r} is the record's own")
        if not (
            item is None
            or (type(item) is int and -(2**63) <= item < 2**63)
            or (type(item) is str and len(item.encode("utf-8")) <= MAX_TEXT_BYTES)
            or (type(item) is bytes and len(item) <= MAX_DIGEST_BYTES)
        ):
            raise _bad(f"{name}: detail {key[:64]!r} must be nil, an int, short text or bytes")
    return AuditEvent(event, _v_time(f"{name}.time", time), detail)


def _v_algorithm(name: str, value: Any) -> str:
    if value not in ("rsa-pkcs1-sha256", "ecdsa-sha256"):
        raise _bad(f"{name} must be rsa-pkcs1-sha256 or ecdsa-sha256")
    return str(value)


def _v_signature(name: str, value: Any) -> bytes:
    return _bytes(name, value, range(1, 1025))


_Rule = Callable[[str, Any], Any]
_REQUEST: dict[str, _Rule] = {"request_id": _v_request_id, "request_digest": _v_digest}
_SPECS: dict[str, dict[str, _Rule]] = {
    IssueX509.op: {
        **_REQUEST,
        "issuer": _v_issuer,
        "serial": _v_serial,
        "der": _v_blob,
        "profile": _v_text,
        "not_before": _v_time,
        "not_after": _v_time,
        "issued_at": _v_time,
    },
    RevokeX509.op: {
        **_REQUEST,
        "issuer": _v_issuer,
        "serial": _v_serial,
        "reason": _v_reason,
        "revoked_at": _v_time,
        "invalidity_date": _v_optional_time,
        "crl_entry": _v_blob,
    },
    RecordCrl.op: {
        "issuer": _v_issuer,
        "crl_number": _v_crl_number,
        "this_update": _v_time,
        "next_update": _v_time,
        "der": _v_blob,
    },
    PublishCrl.op: {
        "issuer": _v_issuer,
        "crl_number": _v_crl_number,
        "this_update": _v_time,
        "next_update": _v_time,
        "revocation_seq": _v_seq,
        "removed": _v_serial_list,
        "entries": _v_seq,
        "removed_before": _v_optional_time,
        "expired_certs_on_crl": _v_optional_time,
        "signature_algorithm": _v_blob,
        "signature": _v_blob,
        "sha256": _v_sha256,
        "size": _v_size,
    },
    RaiseCrlNumber.op: {
        "issuer": _v_issuer,
        "at_least": _v_crl_number,
        "reason": _v_text,
    },
    CertifyOpenpgp.op: {
        **_REQUEST,
        "fingerprint": _v_fingerprint,
        "uids": _v_uids,
        "expires": _v_time,
        "certified_at": _v_time,
        "result": _v_blob,
    },
    Noop.op: {},
    SetMeta.op: {
        "name": _v_meta_name,
        "expected": _v_optional_meta_value,
        "value": _v_meta_value,
    },
    BeginImport.op: {
        "import_id": _v_import_id,
        "issuer": _v_issuer,
        "batches": _v_batches,
        "certificates": _v_seq,
        "revoked": _v_seq,
        "listed": _v_seq,
        "crl_number": _v_crl_number,
        "crl_time": _v_time,
        "removed_before": _v_optional_time,
        "started_at": _v_time,
        "source": _v_text,
    },
    ImportX509.op: {
        "import_id": _v_import_id,
        "issuer": _v_issuer,
        "batch": _v_batch,
        "certificates": _v_imported,
    },
    FinishImport.op: {
        "import_id": _v_import_id,
        "issuer": _v_issuer,
    },
    RecordAudit.op: {"events": _v_audit_events},
    RecordTreeHead.op: {
        "size": _v_seq,
        "timestamp": _v_time,
        "root": _v_sha256,
        "algorithm": _v_algorithm,
        "signature": _v_signature,
    },
}
