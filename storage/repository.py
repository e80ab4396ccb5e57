"""The certificate repository: a deterministic state machine over LMDB.

Writes go through ONE entry point, `Repository.apply(index, command)` (and `apply_batch`, the same
thing for several commands in one transaction), like the FSM of hashicorp/raft. Every replica that
applies the same (index, command) sequence ends in byte-identical state with identical results, so
nothing inside apply reads a clock, draws randomness or depends on anything local: serials, times,
DER and pre-encoded CRL entries are decided by the caller and carried in the command.

The applied index is stored in the same LMDB write transaction as the change it belongs to, so a
crash leaves either both or neither. A bad command is rejected as data (never raised); only a real
storage failure raises `SignerError(REPOSITORY_ERROR)`. docs/repository.md describes the format
byte by byte.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import lmdb
import msgpack

from signer.errors import ErrorCode, SignerError

SCHEMA_VERSION = 1
DEFAULT_MAP_SIZE = 64 << 30  # 64 GiB of address space; the file grows only as pages are used
ISSUER_SIZE = 20
SERIAL_SIZE = 20
SEQ_SIZE = 8
SERIAL_LIMIT = 2**159  # exclusive; RFC 5280 allows 20 octets, positive
CRL_NUMBER_LIMIT = 2**159  # exclusive; RFC 5280 allows 20 octets, non-negative
TIME_LIMIT = 2**63  # exclusive; keeps every time a msgpack int64
INDEX_LIMIT = 2**63
MAX_REQUEST_ID_BYTES = 256
MAX_DIGEST_BYTES = 64
MAX_TEXT_BYTES = 1024
MAX_UIDS = 100
FINGERPRINT_SIZES = (20, 32)  # OpenPGP v4 (SHA-1) and v5/v6 (SHA-256)
CRL_REASONS = frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 10})  # RFC 5280 CRLReason; 7 is unused

# Sub-databases, in the order content_digest and check_consistency walk them (sorted by name).
DB_NAMES = ("certs", "crls", "issuers", "meta", "openpgp", "requests", "revoked", "revseq")
META_SCHEMA_VERSION = b"schema_version"
META_APPLIED_INDEX = b"applied_index"
DATA_FILE = "data.mdb"
RESTORE_TEMP = "data.mdb.restoring"

REQUEST_OPS = frozenset({"issue_x509", "revoke_x509", "certify_openpgp"})
REPLAYED: dict[str, Any] = {"status": "replayed"}
MAX_REPORTED_PROBLEMS = 1000

Dbs = dict[str, Any]  # sub-database name -> LMDB handle


# --------------------------------------------------------------------------- encoding helpers


def _pack(obj: Any) -> bytes:
    """msgpack with the wire conventions (bin for bytes); maps keep the insertion order we build."""
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def serial_bytes(serial: int) -> bytes:
    """A serial as 20 big-endian bytes, so LMDB's byte order is serial order."""
    return serial.to_bytes(SERIAL_SIZE, "big")


def serial_int(data: bytes) -> int:
    return int.from_bytes(data, "big")


def cert_key(issuer: bytes, serial: int) -> bytes:
    """Key of `certs` and `revoked`: issuer key id (20) || serial (20, big-endian)."""
    return issuer + serial_bytes(serial)


def revseq_key(issuer: bytes, seq: int) -> bytes:
    """Key of `revseq`: issuer key id (20) || revocation sequence number (8, big-endian)."""
    return issuer + seq.to_bytes(SEQ_SIZE, "big")


def openpgp_key(fingerprint: bytes, request_id: str) -> bytes:
    """Key of `openpgp`: len(fingerprint) (1) || fingerprint || request id (UTF-8)."""
    return bytes([len(fingerprint)]) + fingerprint + request_id.encode("utf-8")


def _store_result(result: dict[str, Any]) -> dict[str, Any]:
    """Results carry int serials, which msgpack cannot hold past 64 bits: store them as bin20."""
    if "serial" not in result:
        return result
    return {k: serial_bytes(v) if k == "serial" else v for k, v in result.items()}


def _load_result(stored: dict[str, Any]) -> dict[str, Any]:
    if "serial" not in stored:
        return stored
    return {k: serial_int(v) if k == "serial" else v for k, v in stored.items()}


def _storage_error(action: str, exc: BaseException) -> SignerError:
    if isinstance(exc, lmdb.MapFullError):
        detail = "the LMDB map is full: reopen the repository with a larger map_size"
        return SignerError(ErrorCode.REPOSITORY_ERROR, f"{action} failed: {detail}")
    return SignerError(ErrorCode.REPOSITORY_ERROR, f"{action} failed: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- command validation


class _Invalid(Exception):
    """Internal: a command that cannot be applied. apply() turns it into a rejection result."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def result(self) -> dict[str, Any]:
        return rejection(self.code, self.message)


def rejection(code: ErrorCode, message: str) -> dict[str, Any]:
    return {"status": "rejected", "code": code.value, "message": message}


def _bad(message: str) -> _Invalid:
    return _Invalid(ErrorCode.BAD_ARGUMENTS, message)


def _int_in(name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{name} must be an int")
    if not low <= value < high:
        raise _bad(f"{name} is out of range")
    return int(value)


def _utf8(name: str, value: Any, max_bytes: int) -> str:
    if not isinstance(value, str):
        raise _bad(f"{name} must be a str")
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise _bad(f"{name} is not encodable as UTF-8") from None
    if not 1 <= size <= max_bytes:
        raise _bad(f"{name} must be 1 to {max_bytes} bytes of UTF-8")
    return str(value)


def _bytes(name: str, value: Any, sizes: range | tuple[int, ...]) -> bytes:
    if not isinstance(value, bytes):
        raise _bad(f"{name} must be bytes")
    if len(value) not in sizes:
        raise _bad(f"{name} has a wrong length ({len(value)} bytes)")
    return bytes(value)


def _v_request_id(name: str, value: Any) -> str:
    return _utf8(name, value, MAX_REQUEST_ID_BYTES)


def _v_text(name: str, value: Any) -> str:
    return _utf8(name, value, MAX_TEXT_BYTES)


def _v_digest(name: str, value: Any) -> bytes:
    return _bytes(name, value, range(1, MAX_DIGEST_BYTES + 1))


def _v_issuer(name: str, value: Any) -> bytes:
    return _bytes(name, value, (ISSUER_SIZE,))


def _v_fingerprint(name: str, value: Any) -> bytes:
    return _bytes(name, value, FINGERPRINT_SIZES)


def _v_blob(name: str, value: Any) -> bytes:
    if not isinstance(value, bytes) or not value:
        raise _bad(f"{name} must be non-empty bytes")
    return bytes(value)


def _v_serial(name: str, value: Any) -> int:
    return _int_in(name, value, 1, SERIAL_LIMIT)


def _v_crl_number(name: str, value: Any) -> int:
    return _int_in(name, value, 0, CRL_NUMBER_LIMIT)


def _v_time(name: str, value: Any) -> int:
    return _int_in(name, value, 0, TIME_LIMIT)


def _v_optional_time(name: str, value: Any) -> int | None:
    return None if value is None else _v_time(name, value)


def _v_reason(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value not in CRL_REASONS:
        raise _Invalid(ErrorCode.BAD_REASON, f"{name} must be None or an RFC 5280 CRLReason code")
    return int(value)


def _v_uids(name: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_UIDS:
        raise _bad(f"{name} must be a list of 1 to {MAX_UIDS} str")
    return [_v_text(f"{name}[{i}]", uid) for i, uid in enumerate(value)]


_Validator = Callable[[str, Any], Any]

_REQUEST_FIELDS: dict[str, _Validator] = {"request_id": _v_request_id, "request_digest": _v_digest}

COMMAND_FIELDS: dict[str, dict[str, _Validator]] = {
    "issue_x509": {
        **_REQUEST_FIELDS,
        "issuer": _v_issuer,
        "serial": _v_serial,
        "der": _v_blob,
        "profile": _v_text,
        "not_before": _v_time,
        "not_after": _v_time,
        "issued_at": _v_time,
    },
    "revoke_x509": {
        **_REQUEST_FIELDS,
        "issuer": _v_issuer,
        "serial": _v_serial,
        "reason": _v_reason,
        "revoked_at": _v_time,
        "invalidity_date": _v_optional_time,
        "crl_entry": _v_blob,
    },
    "record_crl": {
        "issuer": _v_issuer,
        "crl_number": _v_crl_number,
        "this_update": _v_time,
        "next_update": _v_time,
        "der": _v_blob,
    },
    "certify_openpgp": {
        **_REQUEST_FIELDS,
        "fingerprint": _v_fingerprint,
        "uids": _v_uids,
        "expires": _v_time,
        "certified_at": _v_time,
        "result": _v_blob,
    },
    "noop": {},
}


def validate_command(command: Any) -> tuple[str, dict[str, Any]]:
    """Check a command's shape and types; return (op, normalised fields) or raise `_Invalid`.

    Pure and deterministic: the same command gives the same answer on every replica, so a replay
    can recompute a validation rejection exactly.
    """
    if not isinstance(command, dict):
        raise _bad("command must be a dict")
    op = command.get("op")
    if not isinstance(op, str):
        raise _bad("command field 'op' must be a str")
    spec = COMMAND_FIELDS.get(op)
    if spec is None:
        raise _Invalid(ErrorCode.UNKNOWN_COMMAND, f"unknown op {op[:64]!r}")
    if not all(isinstance(key, str) for key in command):
        raise _bad("command field names must be str")
    extra = sorted(set(command) - set(spec) - {"op"})
    if extra:
        raise _bad(f"unknown field(s) for {op}: {', '.join(name[:64] for name in extra[:5])}")
    missing = [name for name in spec if name not in command]
    if missing:
        raise _bad(f"missing field(s) for {op}: {', '.join(missing)}")
    fields = {name: check(name, command[name]) for name, check in spec.items()}
    _check_cross_fields(op, fields)
    return op, fields


def _check_cross_fields(op: str, fields: dict[str, Any]) -> None:
    if op == "issue_x509" and fields["not_after"] < fields["not_before"]:
        raise _bad("not_after is before not_before")
    if op == "record_crl" and fields["next_update"] < fields["this_update"]:
        raise _bad("next_update is before this_update")


# --------------------------------------------------------------------------- write side


class _Writer:
    """One LMDB write transaction plus the running applied index of a batch."""

    def __init__(self, txn: lmdb.Transaction, dbs: Dbs, applied: int):
        self.txn = txn
        self.dbs = dbs
        self.applied = applied
        self.dirty = False

    def get(self, db: str, key: bytes) -> Any:
        raw = self.txn.get(key, db=self.dbs[db])
        return None if raw is None else _unpack(raw)

    def put(self, db: str, key: bytes, value: Any) -> None:
        self.txn.put(key, _pack(value), db=self.dbs[db])

    def issuer_counters(self, issuer: bytes) -> dict[str, int]:
        return self.get("issuers", issuer) or _new_counters()

    def bump(self, issuer: bytes, counters: dict[str, int], **increments: int) -> None:
        updated = {k: v + increments.get(k, 0) for k, v in counters.items()}
        self.put("issuers", issuer, updated)


def _new_counters() -> dict[str, int]:
    return {"certificates": 0, "revoked": 0, "revocation_seq": 0}


def _conflict(request_id: str, record: dict[str, Any]) -> dict[str, Any]:
    message = (
        f"request id {request_id!r} was already used at index {record['index']} "
        f"for a different {record['op']} request"
    )
    return rejection(ErrorCode.REQUEST_ID_CONFLICT, message)


def _known_request(w: _Writer, op: str, fields: dict[str, Any]) -> dict[str, Any] | None:
    """Idempotency: the duplicate or conflict result if the request id is already recorded."""
    record = w.get("requests", fields["request_id"].encode("utf-8"))
    if record is None:
        return None
    if record["op"] != op or record["request_digest"] != fields["request_digest"]:
        return _conflict(fields["request_id"], record)
    return {**_load_result(record["result"]), "status": "duplicate"}


def _record_request(
    w: _Writer, index: int, op: str, fields: dict[str, Any], result: dict[str, Any]
) -> None:
    record = {
        "op": op,
        "request_digest": fields["request_digest"],
        "index": index,
        "result": _store_result(result),
    }
    w.put("requests", fields["request_id"].encode("utf-8"), record)


def _apply_issue(w: _Writer, index: int, f: dict[str, Any]) -> dict[str, Any]:
    known = _known_request(w, "issue_x509", f)
    if known is not None:
        return known
    key = cert_key(f["issuer"], f["serial"])
    if w.txn.get(key, db=w.dbs["certs"]) is not None:
        message = f"serial {f['serial']:#x} is already used by another certificate of this issuer"
        return rejection(ErrorCode.REPOSITORY_ERROR, message)
    cert = {
        "request_id": f["request_id"],
        "request_digest": f["request_digest"],
        "profile": f["profile"],
        "not_before": f["not_before"],
        "not_after": f["not_after"],
        "issued_at": f["issued_at"],
        "revocation_seq": None,
        "der": f["der"],
    }
    result = {
        "status": "issued",
        "request_id": f["request_id"],
        "issuer": f["issuer"],
        "serial": f["serial"],
        "profile": f["profile"],
        "not_before": f["not_before"],
        "not_after": f["not_after"],
        "issued_at": f["issued_at"],
        "index": index,
    }
    w.put("certs", key, cert)
    w.bump(f["issuer"], w.issuer_counters(f["issuer"]), certificates=1)
    _record_request(w, index, "issue_x509", f, result)
    return result


def _revocation_summary(issuer: bytes, serial: int, entry: list[Any]) -> dict[str, Any]:
    """The public view of a `revoked` value (see `_revoked_value` for the positions)."""
    seq, revoked_at, reason, invalidity_date, _not_after, request_id, _crl_entry = entry
    return {
        "request_id": request_id,
        "issuer": issuer,
        "serial": serial,
        "seq": seq,
        "reason": reason,
        "revoked_at": revoked_at,
        "invalidity_date": invalidity_date,
    }


def _revoked_value(seq: int, f: dict[str, Any], not_after: int) -> list[Any]:
    """`revoked` values are arrays (cheap to decode when walking millions for a CRL)."""
    return [
        seq,
        f["revoked_at"],
        f["reason"],
        f["invalidity_date"],
        not_after,
        f["request_id"],
        f["crl_entry"],
    ]


def _apply_revoke(w: _Writer, index: int, f: dict[str, Any]) -> dict[str, Any]:
    known = _known_request(w, "revoke_x509", f)
    if known is not None:
        return known
    issuer, serial = f["issuer"], f["serial"]
    key = cert_key(issuer, serial)
    cert = w.get("certs", key)
    if cert is None:
        message = f"no certificate with serial {serial:#x} for this issuer"
        return rejection(ErrorCode.UNKNOWN_CERTIFICATE, message)
    if cert["revocation_seq"] is not None:
        existing = _revocation_summary(issuer, serial, w.get("revoked", key))
        return {"status": "already_revoked", **existing}
    counters = w.issuer_counters(issuer)
    seq = counters["revocation_seq"] + 1
    entry = _revoked_value(seq, f, cert["not_after"])
    w.put("revoked", key, entry)
    w.put("revseq", revseq_key(issuer, seq), serial_bytes(serial))
    w.put("certs", key, {**cert, "revocation_seq": seq})
    w.bump(issuer, counters, revoked=1, revocation_seq=1)
    result = {"status": "revoked", **_revocation_summary(issuer, serial, entry), "index": index}
    _record_request(w, index, "revoke_x509", f, result)
    return result


def _apply_record_crl(w: _Writer, index: int, f: dict[str, Any]) -> dict[str, Any]:
    stored = w.get("crls", f["issuer"])
    if stored is not None and f["crl_number"] <= serial_int(stored["crl_number"]):
        message = (
            f"crl_number {f['crl_number']} is not greater than the stored "
            f"{serial_int(stored['crl_number'])}"
        )
        return rejection(ErrorCode.REPOSITORY_ERROR, message)
    crl = {
        "crl_number": serial_bytes(f["crl_number"]),
        "this_update": f["this_update"],
        "next_update": f["next_update"],
        "der": f["der"],
    }
    w.put("crls", f["issuer"], crl)
    return {
        "status": "recorded",
        "issuer": f["issuer"],
        "crl_number": f["crl_number"],
        "this_update": f["this_update"],
        "next_update": f["next_update"],
    }


def _apply_certify(w: _Writer, index: int, f: dict[str, Any]) -> dict[str, Any]:
    known = _known_request(w, "certify_openpgp", f)
    if known is not None:
        return known
    record = {
        "uids": f["uids"],
        "expires": f["expires"],
        "certified_at": f["certified_at"],
        "result": f["result"],
    }
    w.put("openpgp", openpgp_key(f["fingerprint"], f["request_id"]), record)
    result = {
        "status": "certified",
        "request_id": f["request_id"],
        "fingerprint": f["fingerprint"],
        "uids": list(f["uids"]),
        "expires": f["expires"],
        "certified_at": f["certified_at"],
        "index": index,
    }
    _record_request(w, index, "certify_openpgp", f, result)
    return result


def _apply_noop(w: _Writer, index: int, f: dict[str, Any]) -> dict[str, Any]:
    return {"status": "ok"}


_HANDLERS: dict[str, Callable[[_Writer, int, dict[str, Any]], dict[str, Any]]] = {
    "issue_x509": _apply_issue,
    "revoke_x509": _apply_revoke,
    "record_crl": _apply_record_crl,
    "certify_openpgp": _apply_certify,
    "noop": _apply_noop,
}


def _apply_one(w: _Writer, index: int, command: Any) -> dict[str, Any]:
    """Apply one command inside the batch transaction.

    Handlers check everything before their first write, so a rejection writes nothing; only the
    applied index moves.
    """
    if index <= w.applied:
        return _replay_result(w, index, command)
    w.applied = index
    w.dirty = True
    try:
        op, fields = validate_command(command)
    except _Invalid as invalid:
        return invalid.result()
    return _HANDLERS[op](w, index, fields)


def _replay_result(w: _Writer, index: int, command: Any) -> dict[str, Any]:
    """The result an already-applied index gave the first time, where that is cheap to know.

    Validation is pure, so its rejections are recomputed; for request commands the request index
    tells whether `index` recorded the request (its result), came after it (duplicate) or met a
    recorded conflicting request (conflict). Anything else gives {"status": "replayed"}.
    """
    try:
        op, fields = validate_command(command)
    except _Invalid as invalid:
        return invalid.result()
    if op not in REQUEST_OPS:
        return dict(REPLAYED)
    record = w.get("requests", fields["request_id"].encode("utf-8"))
    if record is None or record["index"] > index:
        return dict(REPLAYED)
    if record["op"] != op or record["request_digest"] != fields["request_digest"]:
        return (
            _conflict(fields["request_id"], record) if record["index"] < index else dict(REPLAYED)
        )
    result = _load_result(record["result"])
    return result if record["index"] == index else {**result, "status": "duplicate"}


# --------------------------------------------------------------------------- schema and migrations


def _migrate_0_to_1(txn: lmdb.Transaction, dbs: Dbs) -> None:
    """Version 0 (pre-release) had no `issuers` sub-database: rebuild the per-issuer counters."""
    txn.drop(dbs["issuers"], delete=False)
    counters: dict[bytes, dict[str, int]] = {}
    for key, raw in txn.cursor(dbs["certs"]):
        entry = counters.setdefault(bytes(key[:ISSUER_SIZE]), _new_counters())
        entry["certificates"] += 1
        seq = _unpack(raw)["revocation_seq"]
        if seq is not None:
            entry["revoked"] += 1
            entry["revocation_seq"] = max(entry["revocation_seq"], seq)
    for issuer in sorted(counters):
        txn.put(issuer, _pack(counters[issuer]), db=dbs["issuers"])


# MIGRATIONS[v] upgrades a store from version v to v + 1, inside the opening write transaction.
MIGRATIONS: dict[int, Callable[[lmdb.Transaction, Dbs], None]] = {0: _migrate_0_to_1}


def _refuse(path: Path, message: str) -> SignerError:
    return SignerError(ErrorCode.REPOSITORY_ERROR, f"repository {path}: {message}")


def _prepare_schema(path: Path, txn: lmdb.Transaction, dbs: Dbs) -> None:
    """Initialise an empty store, migrate an older one in order, refuse a newer or unknown one."""
    meta = dbs["meta"]
    raw = txn.get(META_SCHEMA_VERSION, db=meta)
    if raw is None:
        if any(txn.stat(db)["entries"] for db in dbs.values()):
            raise _refuse(path, "holds data but no schema version; refusing to guess its format")
        txn.put(META_SCHEMA_VERSION, _pack(SCHEMA_VERSION), db=meta)
        txn.put(META_APPLIED_INDEX, _pack(0), db=meta)
        return
    version = _unpack(raw)
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise _refuse(path, f"unreadable schema version {version!r}")
    if version > SCHEMA_VERSION:
        raise _refuse(
            path,
            f"schema version {version} is newer than this software supports ({SCHEMA_VERSION}); "
            "upgrade the signer",
        )
    for step in range(version, SCHEMA_VERSION):
        migrate = MIGRATIONS.get(step)
        if migrate is None:
            raise _refuse(path, f"no migration from schema version {step} to {step + 1}")
        migrate(txn, dbs)
    txn.put(META_SCHEMA_VERSION, _pack(SCHEMA_VERSION), db=meta)


# --------------------------------------------------------------------------- read-side types


class RevokedEntry(NamedTuple):
    """One revoked certificate as CRL building needs it: a tuple, no per-entry dict."""

    serial: int
    revoked_at: int
    reason: int | None
    invalidity_date: int | None
    not_after: int
    crl_entry: bytes
    seq: int


def _revoked_entry(key: bytes, raw: bytes) -> RevokedEntry:
    seq, revoked_at, reason, invalidity_date, not_after, _request_id, crl_entry = _unpack(raw)
    return RevokedEntry(
        serial_int(key[ISSUER_SIZE:]),
        revoked_at,
        reason,
        invalidity_date,
        not_after,
        crl_entry,
        seq,
    )


@dataclass
class ConsistencyReport:
    """Outcome of `check_consistency`: `ok` is True iff `problems` is empty."""

    problems: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    truncated: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, problem: str) -> None:
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(problem)
        else:
            self.truncated += 1


def _check_arg_issuer(issuer: Any) -> bytes:
    if not isinstance(issuer, bytes) or len(issuer) != ISSUER_SIZE:
        raise SignerError(ErrorCode.BAD_ARGUMENTS, "issuer must be 20 bytes")
    return issuer


def _check_arg_serial(serial: Any) -> int:
    if not isinstance(serial, int) or isinstance(serial, bool) or not 1 <= serial < SERIAL_LIMIT:
        raise SignerError(ErrorCode.BAD_ARGUMENTS, "serial must be an int in [1, 2**159)")
    return int(serial)


def _check_index(index: Any) -> int:
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index < INDEX_LIMIT:
        raise SignerError(ErrorCode.BAD_ARGUMENTS, "apply index must be an int in [1, 2**63)")
    return int(index)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the repository


class Repository:
    """The certificate repository in an LMDB environment directory.

    Reads may run from any thread at any time (LMDB MVCC: readers never block the writer). Writes
    (apply, apply_batch, restore) are serialised by an in-process lock.
    """

    def __init__(self, path: Path, map_size: int = DEFAULT_MAP_SIZE):
        self.path = Path(path)
        self.map_size = map_size
        self._lock = threading.Lock()
        self._env: lmdb.Environment | None = None
        self._dbs: Dbs = {}
        self._open()

    # ----------------------------------------------------------------- lifecycle

    def _open(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / RESTORE_TEMP).unlink(missing_ok=True)  # a restore that died before swap
        except OSError as exc:
            raise _storage_error(f"opening repository {self.path}", exc) from exc
        try:
            env = lmdb.open(
                str(self.path),
                map_size=self.map_size,
                subdir=True,
                max_dbs=len(DB_NAMES) + 2,
                sync=True,
                metasync=True,
                writemap=False,
                map_async=False,
                lock=True,
            )
        except lmdb.Error as exc:
            raise _storage_error(f"opening repository {self.path}", exc) from exc
        try:
            with env.begin(write=True) as txn:
                dbs = {name: env.open_db(name.encode(), txn=txn) for name in DB_NAMES}
                _prepare_schema(self.path, txn, dbs)
        except lmdb.Error as exc:
            env.close()
            raise _storage_error(f"opening repository {self.path}", exc) from exc
        except BaseException:
            env.close()
            raise
        self._env, self._dbs = env, dbs

    def close(self) -> None:
        """Close the environment; idempotent. Reads and writes after close raise."""
        with self._lock:
            if self._env is not None:
                self._env.close()
                self._env = None

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _require_env(self) -> lmdb.Environment:
        env = self._env
        if env is None:
            raise SignerError(ErrorCode.REPOSITORY_ERROR, f"repository {self.path} is closed")
        return env

    @contextmanager
    def _reading(self) -> Iterator[lmdb.Transaction]:
        env = self._require_env()
        try:
            with env.begin() as txn:
                yield txn
        except lmdb.Error as exc:
            raise _storage_error("reading the repository", exc) from exc

    # ----------------------------------------------------------------- writes

    def apply(self, index: int, command: dict[str, Any]) -> dict[str, Any]:
        """Apply one command at log position `index`; durable on disk when it returns."""
        return self.apply_batch([(index, command)])[0]

    def apply_batch(self, items: list[tuple[int, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Apply several commands in ONE transaction (one fsync); per-command semantics unchanged.

        A storage failure aborts the whole batch: none of it is applied, and SignerError
        (REPOSITORY_ERROR) is raised.
        """
        checked = [(_check_index(index), command) for index, command in items]
        if not checked:
            return []
        with self._lock:
            env = self._require_env()
            try:
                with env.begin(write=True) as txn:
                    applied = _unpack(txn.get(META_APPLIED_INDEX, db=self._dbs["meta"]))
                    w = _Writer(txn, self._dbs, applied)
                    results = [_apply_one(w, index, command) for index, command in checked]
                    if w.dirty:
                        w.put("meta", META_APPLIED_INDEX, w.applied)
            except lmdb.Error as exc:
                raise _storage_error("applying commands", exc) from exc
        return results

    # ----------------------------------------------------------------- reads

    def schema_version(self) -> int:
        with self._reading() as txn:
            return _unpack(txn.get(META_SCHEMA_VERSION, db=self._dbs["meta"]))

    def last_applied_index(self) -> int:
        """Index of the last applied command (0 for a new repository)."""
        with self._reading() as txn:
            return _unpack(txn.get(META_APPLIED_INDEX, db=self._dbs["meta"]))

    def get_request(self, request_id: str) -> dict[str, Any] | None:
        """The recorded request: request_id, op, request_digest, index and its first result."""
        if not isinstance(request_id, str):
            raise SignerError(ErrorCode.BAD_ARGUMENTS, "request_id must be a str")
        try:
            key = request_id.encode("utf-8")
        except UnicodeEncodeError:
            return None
        if not 1 <= len(key) <= MAX_REQUEST_ID_BYTES:
            return None
        with self._reading() as txn:
            raw = txn.get(key, db=self._dbs["requests"])
        if raw is None:
            return None
        record = _unpack(raw)
        return {
            "request_id": request_id,
            "op": record["op"],
            "request_digest": record["request_digest"],
            "index": record["index"],
            "result": _load_result(record["result"]),
        }

    def get_certificate(self, issuer: bytes, serial: int) -> dict[str, Any] | None:
        """The certificate record, with its revocation summary (or None) joined in."""
        key = cert_key(_check_arg_issuer(issuer), _check_arg_serial(serial))
        with self._reading() as txn:
            raw = txn.get(key, db=self._dbs["certs"])
            revoked = txn.get(key, db=self._dbs["revoked"])
        if raw is None:
            return None
        cert = _unpack(raw)
        revocation = None
        if revoked is not None:
            revocation = _revocation_summary(issuer, serial, _unpack(revoked))
        return {
            "issuer": issuer,
            "serial": serial,
            "request_id": cert["request_id"],
            "request_digest": cert["request_digest"],
            "profile": cert["profile"],
            "not_before": cert["not_before"],
            "not_after": cert["not_after"],
            "issued_at": cert["issued_at"],
            "der": cert["der"],
            "revocation": revocation,
        }

    def serial_exists(self, issuer: bytes, serial: int) -> bool:
        key = cert_key(_check_arg_issuer(issuer), _check_arg_serial(serial))
        with self._reading() as txn:
            return txn.get(key, db=self._dbs["certs"]) is not None

    def iter_revoked(self, issuer: bytes) -> Iterator[RevokedEntry]:
        """Revoked certificates of `issuer` in serial order (holds one read transaction)."""
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["revoked"])
            if not cursor.set_range(issuer):
                return
            for key, raw in cursor:
                if key[:ISSUER_SIZE] != issuer:
                    return
                yield _revoked_entry(key, raw)

    def iter_revocations_since(self, issuer: bytes, seq: int) -> Iterator[RevokedEntry]:
        """Revocations of `issuer` with sequence number > `seq`, in sequence order."""
        issuer = _check_arg_issuer(issuer)
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise SignerError(ErrorCode.BAD_ARGUMENTS, "seq must be an int >= 0")
        if seq >= 2 ** (8 * SEQ_SIZE) - 1:
            return
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["revseq"])
            if not cursor.set_range(revseq_key(issuer, seq + 1)):
                return
            for key, raw in cursor:
                if key[:ISSUER_SIZE] != issuer:
                    return
                revoked_key = issuer + _unpack(raw)
                entry = txn.get(revoked_key, db=self._dbs["revoked"])
                if entry is None:
                    message = (
                        f"revseq {bytes(key).hex()} names no revocation: run check_consistency"
                    )
                    raise SignerError(ErrorCode.REPOSITORY_ERROR, message)
                yield _revoked_entry(revoked_key, entry)

    def revocation_seq(self, issuer: bytes) -> int:
        """The last revocation sequence number assigned for `issuer` (0 if none)."""
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            raw = txn.get(issuer, db=self._dbs["issuers"])
        return 0 if raw is None else _unpack(raw)["revocation_seq"]

    def latest_crl(self, issuer: bytes) -> dict[str, Any] | None:
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            raw = txn.get(issuer, db=self._dbs["crls"])
        if raw is None:
            return None
        crl = _unpack(raw)
        return {
            "issuer": issuer,
            "crl_number": serial_int(crl["crl_number"]),
            "this_update": crl["this_update"],
            "next_update": crl["next_update"],
            "der": crl["der"],
        }

    def iter_openpgp(self, fingerprint: bytes) -> Iterator[dict[str, Any]]:
        """OpenPGP certifications recorded for a key fingerprint, in request-id byte order."""
        if not isinstance(fingerprint, bytes) or len(fingerprint) not in FINGERPRINT_SIZES:
            raise SignerError(ErrorCode.BAD_ARGUMENTS, "fingerprint must be 20 or 32 bytes")
        prefix = bytes([len(fingerprint)]) + fingerprint
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["openpgp"])
            if not cursor.set_range(prefix):
                return
            for key, raw in cursor:
                if key[: len(prefix)] != prefix:
                    return
                record = _unpack(raw)
                yield {
                    "fingerprint": fingerprint,
                    "request_id": bytes(key[len(prefix) :]).decode("utf-8"),
                    **record,
                }

    def counts(self) -> dict[str, Any]:
        """Totals and per-issuer counters (issuer key id -> counters)."""
        with self._reading() as txn:
            totals = {
                "certificates": txn.stat(self._dbs["certs"])["entries"],
                "revoked": txn.stat(self._dbs["revoked"])["entries"],
                "openpgp": txn.stat(self._dbs["openpgp"])["entries"],
                "requests": txn.stat(self._dbs["requests"])["entries"],
                "crls": txn.stat(self._dbs["crls"])["entries"],
            }
            issuers = {bytes(k): _unpack(v) for k, v in txn.cursor(self._dbs["issuers"])}
        return {**totals, "issuers": issuers}

    def content_digest(self, include_applied_index: bool = True) -> bytes:
        """SHA-256 over every key and value of every sub-database, in name then key order.

        Each item is length-framed so no two different contents hash alike. With
        include_applied_index=False the meta `applied_index` entry is skipped: two stores whose
        data agree but whose logs had different numbering then compare equal.
        """
        digest = hashlib.sha256(b"cacert-signer repository content v1\x00")
        with self._reading() as txn:
            for name in DB_NAMES:
                digest.update(b"D" + _frame(name.encode()))
                for key, value in txn.cursor(self._dbs[name]):
                    if name == "meta" and key == META_APPLIED_INDEX and not include_applied_index:
                        continue
                    digest.update(b"K" + _frame(key) + b"V" + _frame(value))
        return digest.digest()

    def check_consistency(self) -> ConsistencyReport:
        """Check that every index agrees with the records; see `_Checker` for the rules."""
        with self._reading() as txn:
            return _Checker(txn, self._dbs).run()

    # ----------------------------------------------------------------- snapshot / restore

    def snapshot(self, path: Path) -> int:
        """Write a compacted consistent copy into directory `path`; return its applied index.

        The copy is taken inside a read transaction, so writers are not blocked.
        """
        path = Path(path)
        env = self._require_env()
        try:
            path.mkdir(parents=True, exist_ok=True)
            if any(path.iterdir()):
                raise SignerError(
                    ErrorCode.REPOSITORY_ERROR, f"snapshot directory {path} not empty"
                )
            with env.begin() as txn:
                applied = _unpack(txn.get(META_APPLIED_INDEX, db=self._dbs["meta"]))
                env.copy(str(path), compact=True, txn=txn)
            _fsync_path(path / DATA_FILE)  # LMDB's copy does not fsync
            _fsync_path(path)
        except (lmdb.Error, OSError) as exc:
            raise _storage_error(f"snapshot to {path}", exc) from exc
        return applied

    def restore(self, snapshot_path: Path) -> int:
        """Replace this repository's contents with a snapshot; return the restored applied index.

        Order: validate the snapshot; copy it to data.mdb.restoring beside data.mdb and fsync;
        close the environment; rename it over data.mdb (atomic); fsync the directory; reopen
        (running migrations if the snapshot is older). A crash before the rename leaves the old
        contents (the leftover temp file is removed at open), after it the new ones. No other
        process may have the repository open meanwhile.
        """
        source = Path(snapshot_path) / DATA_FILE
        applied = _snapshot_applied_index(source)
        with self._lock:
            env = self._require_env()
            temp = self.path / RESTORE_TEMP
            try:
                shutil.copyfile(source, temp)
                _fsync_path(temp)
            except OSError as exc:
                temp.unlink(missing_ok=True)
                raise _storage_error(f"restore from {source}", exc) from exc
            env.close()
            self._env = None
            try:
                os.replace(temp, self.path / DATA_FILE)
                _fsync_path(self.path)
            except OSError as exc:
                self._open()  # the rename did not happen: the old contents are still there
                raise _storage_error(f"restore from {source}", exc) from exc
            self._open()
        return applied


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + bytes(data)


def _snapshot_applied_index(data_file: Path) -> int:
    """Open a snapshot read-only and check it is a repository this software can open."""
    if not data_file.is_file():
        raise SignerError(ErrorCode.REPOSITORY_ERROR, f"no snapshot at {data_file}")
    try:
        env = lmdb.open(
            str(data_file), subdir=False, readonly=True, lock=False, max_dbs=len(DB_NAMES) + 2
        )
    except lmdb.Error as exc:
        raise _storage_error(f"opening snapshot {data_file}", exc) from exc
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            version = _unpack(txn.get(META_SCHEMA_VERSION, db=meta))
            applied = _unpack(txn.get(META_APPLIED_INDEX, db=meta))
    except (lmdb.Error, TypeError, ValueError) as exc:
        raise _storage_error(f"reading snapshot {data_file}", exc) from exc
    finally:
        env.close()
    if not isinstance(version, int) or version > SCHEMA_VERSION or not isinstance(applied, int):
        raise SignerError(
            ErrorCode.REPOSITORY_ERROR,
            f"snapshot {data_file} has schema version {version!r}; this software supports "
            f"up to {SCHEMA_VERSION}",
        )
    return applied


# --------------------------------------------------------------------------- consistency check


class _Checker:
    """Cross-checks every index against the records in one read transaction.

    Rules: each certificate's request is an issue_x509 request naming it; each issue_x509,
    revoke_x509 and certify_openpgp request names an existing record made by it; a certificate is
    revoked iff it has a `revoked` entry with the same seq; each revocation has its `revseq` entry
    and vice versa; per-issuer counters equal what the records count. Memory stays O(issuers).
    """

    def __init__(self, txn: lmdb.Transaction, dbs: Dbs):
        self.txn = txn
        self.dbs = dbs
        self.report = ConsistencyReport()
        self.tally: dict[bytes, dict[str, int]] = {}

    def run(self) -> ConsistencyReport:
        steps = (
            self._meta,
            self._certs,
            self._revoked,
            self._revseq,
            self._requests,
            self._openpgp,
            self._crls,
            self._counters,
        )
        for step in steps:
            try:
                step()
            except Exception as exc:  # a corrupt value must end up in the report, not raise
                self.report.add(f"{step.__name__.lstrip('_')}: {type(exc).__name__}: {exc}")
        return self.report

    def _get(self, db: str, key: bytes) -> Any:
        raw = self.txn.get(key, db=self.dbs[db])
        return None if raw is None else _unpack(raw)

    def _items(self, db: str) -> Iterator[tuple[bytes, Any]]:
        count = 0
        for key, raw in self.txn.cursor(self.dbs[db]):
            count += 1
            try:
                value = _unpack(raw)
            except Exception as exc:
                self.report.add(f"{db} {bytes(key).hex()}: undecodable value ({exc})")
                continue
            yield bytes(key), value
        self.report.checked[db] = count

    def _issuer(self, issuer: bytes) -> dict[str, int]:
        return self.tally.setdefault(issuer, _new_counters())

    def _meta(self) -> None:
        version = self._get("meta", META_SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            self.report.add(f"meta: schema version {version!r}, expected {SCHEMA_VERSION}")
        applied = self._get("meta", META_APPLIED_INDEX)
        if not isinstance(applied, int) or applied < 0:
            self.report.add(f"meta: bad applied index {applied!r}")

    def _certs(self) -> None:
        for key, cert in self._items("certs"):
            label = f"certs {key.hex()}"
            if len(key) != ISSUER_SIZE + SERIAL_SIZE:
                self.report.add(f"{label}: key is not issuer(20)||serial(20)")
                continue
            issuer, serial = key[:ISSUER_SIZE], serial_int(key[ISSUER_SIZE:])
            self._issuer(issuer)["certificates"] += 1
            request = self._get("requests", cert["request_id"].encode("utf-8"))
            if request is None or request["op"] != "issue_x509":
                self.report.add(f"{label}: its request {cert['request_id']!r} is not recorded")
            elif _load_result(request["result"]).get("serial") != serial or (
                request["result"].get("issuer") != issuer
            ):
                self.report.add(f"{label}: request {cert['request_id']!r} names another cert")
            self._cert_revocation(label, key, cert)

    def _cert_revocation(self, label: str, key: bytes, cert: dict[str, Any]) -> None:
        revoked = self._get("revoked", key)
        seq = cert["revocation_seq"]
        if seq is None and revoked is not None:
            self.report.add(f"{label}: not marked revoked but listed in revoked")
        elif seq is not None and revoked is None:
            self.report.add(f"{label}: marked revoked (seq {seq}) but missing from revoked")
        elif seq is not None and revoked[0] != seq:
            self.report.add(f"{label}: revocation seq {seq} but revoked says {revoked[0]}")
        elif revoked is not None and revoked[4] != cert["not_after"]:
            self.report.add(f"{label}: revoked not_after differs from the certificate's")

    def _revoked(self) -> None:
        for key, entry in self._items("revoked"):
            label = f"revoked {key.hex()}"
            issuer, serial_raw = key[:ISSUER_SIZE], key[ISSUER_SIZE:]
            seq, request_id = entry[0], entry[5]
            counters = self._issuer(issuer)
            counters["revoked"] += 1
            counters["revocation_seq"] = max(counters["revocation_seq"], seq)
            if self._get("certs", key) is None:
                self.report.add(f"{label}: no such certificate")
            if self._get("revseq", revseq_key(issuer, seq)) != serial_raw:
                self.report.add(f"{label}: revseq {seq} does not point back to it")
            request = self._get("requests", request_id.encode("utf-8"))
            if request is None or request["op"] != "revoke_x509":
                self.report.add(f"{label}: its request {request_id!r} is not recorded")

    def _revseq(self) -> None:
        for key, serial_raw in self._items("revseq"):
            seq = int.from_bytes(key[ISSUER_SIZE:], "big")
            entry = self._get("revoked", key[:ISSUER_SIZE] + serial_raw)
            if entry is None or entry[0] != seq:
                self.report.add(f"revseq {key.hex()}: no revoked entry with seq {seq}")

    def _requests(self) -> None:
        for key, request in self._items("requests"):
            label = f"requests {key.decode('utf-8', 'replace')!r}"
            result = request["result"]
            op = request["op"]
            if result.get("index") != request["index"]:
                self.report.add(f"{label}: result index differs from the record's")
            if op in ("issue_x509", "revoke_x509"):
                target = cert_key(result["issuer"], serial_int(result["serial"]))
                db = "certs" if op == "issue_x509" else "revoked"
                record = self._get(db, target)
                made_by = None if record is None else _made_by(op, record)
                if made_by != key.decode("utf-8"):
                    self.report.add(f"{label}: its {db} record is missing or not made by it")
            elif op == "certify_openpgp":
                target = openpgp_key(result["fingerprint"], key.decode("utf-8"))
                if self._get("openpgp", target) is None:
                    self.report.add(f"{label}: its openpgp record is missing")
            else:
                self.report.add(f"{label}: unknown op {op!r}")

    def _openpgp(self) -> None:
        for key, _record in self._items("openpgp"):
            size = key[0]
            request_id = key[1 + size :].decode("utf-8")
            request = self._get("requests", request_id.encode("utf-8"))
            if request is None or request["op"] != "certify_openpgp":
                self.report.add(f"openpgp {key.hex()}: its request {request_id!r} is not recorded")

    def _crls(self) -> None:
        for key, crl in self._items("crls"):
            if len(key) != ISSUER_SIZE or len(crl["crl_number"]) != SERIAL_SIZE:
                self.report.add(f"crls {key.hex()}: malformed key or crl_number")

    def _counters(self) -> None:
        stored = {key: value for key, value in self._items("issuers")}
        for issuer in sorted(set(stored) | set(self.tally)):
            expected = self.tally.get(issuer, _new_counters())
            if stored.get(issuer) != expected:
                self.report.add(
                    f"issuers {issuer.hex()}: counters {stored.get(issuer)} but records "
                    f"give {expected}"
                )


def _made_by(op: str, record: Any) -> str | None:
    """Request id that created a certs (dict) or revoked (array) record."""
    return record["request_id"] if op == "issue_x509" else record[5]
