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
import itertools
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
MAX_MEMBERS = 16  # voters named in a set_cluster command
FINGERPRINT_SIZES = (20, 32)  # OpenPGP v4 (SHA-1) and v5/v6 (SHA-256)
CRL_REASONS = frozenset({0, 1, 2, 3, 4, 5, 6, 8, 9, 10})  # RFC 5280 CRLReason; 7 is unused

# Sub-databases, in the order content_digest and check_consistency walk them (sorted by name).
DB_NAMES = (
    "certs",
    "crl_entries",
    "crl_expiry",
    "crl_history",
    "crls",
    "issuers",
    "meta",
    "openpgp",
    "requests",
    "revoked",
    "revseq",
)
META_SCHEMA_VERSION = b"schema_version"
META_APPLIED_INDEX = b"applied_index"
META_CLUSTER = b"cluster"  # replication's cluster identity (set_cluster)
DATA_FILE = "data.mdb"
RESTORE_TEMP = "data.mdb.restoring"

REQUEST_OPS = frozenset({"issue_x509", "revoke_x509", "certify_openpgp"})
REPLAYED: dict[str, Any] = {"status": "replayed"}
MAX_REPORTED_PROBLEMS = 1000
NEW_MEMBERS_BY_SEQ = 10_000  # publish_crl: beyond this many new entries, scan `revoked` in order

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


def crl_expiry_key(issuer: bytes, not_after: int, serial_raw: bytes) -> bytes:
    """Key of `crl_expiry`: issuer (20) || not_after (8, big-endian) || serial (20)."""
    return issuer + not_after.to_bytes(SEQ_SIZE, "big") + serial_raw


def crl_history_key(issuer: bytes, crl_number: int) -> bytes:
    """Key of `crl_history`: issuer (20) || CRL number (20, big-endian)."""
    return issuer + serial_bytes(crl_number)


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


def _v_seq(name: str, value: Any) -> int:
    return _int_in(name, value, 0, 2 ** (8 * SEQ_SIZE))


def _v_sha256(name: str, value: Any) -> bytes:
    return _bytes(name, value, (32,))


def _v_serial_list(name: str, value: Any) -> list[int]:
    """Serials in strictly ascending order (so a list is one set, in one canonical order)."""
    if not isinstance(value, list | tuple):
        raise _bad(f"{name} must be a list of serials")
    serials = [_v_serial(f"{name}[{i}]", serial) for i, serial in enumerate(value)]
    if any(a >= b for a, b in itertools.pairwise(serials)):
        raise _bad(f"{name} must be strictly ascending")
    return serials


def _v_uids(name: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_UIDS:
        raise _bad(f"{name} must be a list of 1 to {MAX_UIDS} str")
    return [_v_text(f"{name}[{i}]", uid) for i, uid in enumerate(value)]


def _v_cluster_id(name: str, value: Any) -> bytes:
    return _bytes(name, value, (16,))


def _v_epoch(name: str, value: Any) -> bytes:
    return _bytes(name, value, (8,))


def _v_generation(name: str, value: Any) -> int:
    return _int_in(name, value, 1, INDEX_LIMIT)


def _v_members(name: str, value: Any) -> list[str]:
    if not isinstance(value, list | tuple) or not 1 <= len(value) <= MAX_MEMBERS:
        raise _bad(f"{name} must be a list of 1 to {MAX_MEMBERS} str")
    members = [_v_text(f"{name}[{i}]", member) for i, member in enumerate(value)]
    if members != sorted(set(members)):
        raise _bad(f"{name} must be sorted and distinct")
    return members


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
    "publish_crl": {
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
    "set_cluster": {
        "cluster_id": _v_cluster_id,
        "generation": _v_generation,
        "epoch": _v_epoch,
        "members": _v_members,
        "event": _v_text,
        "at": _v_time,
    },
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
    if op in ("record_crl", "publish_crl") and fields["next_update"] < fields["this_update"]:
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


def _last_crl_history(txn: lmdb.Transaction, dbs: Dbs, issuer: bytes) -> tuple[int, Any] | None:
    """(crl_number, record) of the issuer's newest `crl_history` entry, or None."""
    cursor = txn.cursor(dbs["crl_history"])
    found = cursor.prev() if cursor.set_range(issuer + b"\xff" * SERIAL_SIZE) else cursor.last()
    if not found or cursor.key()[:ISSUER_SIZE] != issuer:
        return None
    return serial_int(cursor.key()[ISSUER_SIZE:]), _unpack(cursor.value())


def _publish_rejection(
    w: _Writer, f: dict[str, Any], last: tuple[int, Any] | None
) -> dict[str, Any] | None:
    """Why `publish_crl` cannot be applied (a rejection), or None. Reads only."""
    issuer = f["issuer"]
    stored = w.get("crls", issuer)
    if stored is not None and f["crl_number"] <= serial_int(stored["crl_number"]):
        message = (
            f"crl_number {f['crl_number']} is not greater than the stored "
            f"{serial_int(stored['crl_number'])}"
        )
        return rejection(ErrorCode.REPOSITORY_ERROR, message)
    previous_seq, previous_entries = (0, 0)
    if last is not None:
        previous_seq, previous_entries = last[1]["revocation_seq"], last[1]["entries"]
    assigned = w.issuer_counters(issuer)["revocation_seq"]
    if not previous_seq <= f["revocation_seq"] <= assigned:
        message = (
            f"revocation_seq {f['revocation_seq']} is outside [{previous_seq}, {assigned}] "
            "(the last published one, the last assigned one)"
        )
        return rejection(ErrorCode.REPOSITORY_ERROR, message)
    for serial in f["removed"]:
        if _member_expiry_key(w, issuer, serial) is None:
            message = f"serial {serial:#x} is not on the issuer's last published CRL"
            return rejection(ErrorCode.REPOSITORY_ERROR, message)
    expected = previous_entries - len(f["removed"]) + f["revocation_seq"] - previous_seq
    if f["entries"] != expected:
        message = f"entries {f['entries']} but the published state gives {expected}"
        return rejection(ErrorCode.REPOSITORY_ERROR, message)
    return None


def _member_expiry_key(w: _Writer, issuer: bytes, serial: int) -> bytes | None:
    """The `crl_expiry` key of a member of the issuer's last published CRL (None if no member)."""
    revoked = w.get("revoked", cert_key(issuer, serial))
    if revoked is None:
        return None
    key = crl_expiry_key(issuer, revoked[4], serial_bytes(serial))
    return key if w.txn.get(key, db=w.dbs["crl_expiry"]) is not None else None


def _new_members(
    w: _Writer, issuer: bytes, after: int, upto: int
) -> Iterator[tuple[bytes, list[Any]]]:
    """(key, revoked value) of the revocations with seq in (after, upto], in key order: looked up
    by sequence number and sorted when they are few, else read in key order (a first CRL over a
    large history)."""
    if upto - after <= NEW_MEMBERS_BY_SEQ:
        keys = [issuer + w.get("revseq", revseq_key(issuer, s)) for s in range(after + 1, upto + 1)]
        for key in sorted(keys):
            yield key, w.get("revoked", key)
        return
    cursor = w.txn.cursor(w.dbs["revoked"])
    if not cursor.set_range(issuer):
        return
    for key, raw in cursor:
        if key[:ISSUER_SIZE] != issuer:
            return
        entry = _unpack(raw)
        if after < entry[0] <= upto:
            yield bytes(key), entry


# A published CRL's entries are kept in blocks: `crl_entries` maps issuer || first serial of the
# block to [serials (20 bytes each), sizes (4 bytes each), the entries' DER concatenated]. CRL
# building then copies whole blocks; a publication rewrites only the blocks it touches.
CRL_BLOCK_ENTRIES = 128  # entries per block when blocks are (re)written
CRL_BLOCK_LIMIT = 2 * CRL_BLOCK_ENTRIES  # a touched block holding more is split

Row = tuple[bytes, bytes]  # (serial20, crl_entry DER)


def crl_block_rows(serials: bytes, sizes: bytes, entries: bytes) -> list[Row]:
    """The (serial20, entry) rows of one `crl_entries` block, in serial order."""
    rows, position = [], 0
    for i in range(len(serials) // SERIAL_SIZE):
        size = int.from_bytes(sizes[4 * i : 4 * i + 4], "big")
        rows.append(
            (serials[SERIAL_SIZE * i : SERIAL_SIZE * (i + 1)], entries[position : position + size])
        )
        position += size
    return rows


def _has_blocks(w: _Writer, issuer: bytes) -> bool:
    cursor = w.txn.cursor(w.dbs["crl_entries"])
    return cursor.set_range(issuer) and cursor.key()[:ISSUER_SIZE] == issuer


def _put_blocks(w: _Writer, issuer: bytes, rows: list[Row], limit: int) -> None:
    """Write rows (serial order) as blocks: one block when at most `limit`, else blocks of
    CRL_BLOCK_ENTRIES."""
    size = len(rows) if len(rows) <= limit else CRL_BLOCK_ENTRIES
    for start in range(0, len(rows), size or 1):
        chunk = rows[start : start + size]
        value = [
            b"".join(serial for serial, _ in chunk),
            b"".join(len(entry).to_bytes(4, "big") for _, entry in chunk),
            b"".join(entry for _, entry in chunk),
        ]
        w.put("crl_entries", issuer + chunk[0][0], value)


def _stream_blocks(w: _Writer, issuer: bytes, members: Iterator[tuple[bytes, list[Any]]]) -> None:
    """Write an issuer's first blocks from members in key order, CRL_BLOCK_ENTRIES at a time."""
    rows: list[Row] = []
    for key, entry in members:
        rows.append((key[ISSUER_SIZE:], entry[6]))
        if len(rows) == CRL_BLOCK_ENTRIES:
            _put_blocks(w, issuer, rows, CRL_BLOCK_ENTRIES)
            rows = []
    if rows:
        _put_blocks(w, issuer, rows, CRL_BLOCK_ENTRIES)


def _block_for(w: _Writer, issuer: bytes, serial_raw: bytes) -> tuple[bytes | None, bytes | None]:
    """(key, next block's key) of the block whose range holds `serial_raw`: the last block
    starting at or below it, else the issuer's first block; (None, None) when it has none."""
    cursor = w.txn.cursor(w.dbs["crl_entries"])
    target = issuer + serial_raw
    found = cursor.set_range(target)
    at_or_below = (found and cursor.key() == target) or (
        (cursor.prev() if found else cursor.last()) and cursor.key()[:ISSUER_SIZE] == issuer
    )
    if not at_or_below and not (cursor.set_range(issuer) and cursor.key()[:ISSUER_SIZE] == issuer):
        return None, None
    key = bytes(cursor.key())
    upper = bytes(cursor.key()) if cursor.next() else None
    return key, upper if upper is not None and upper[:ISSUER_SIZE] == issuer else None


def _merge_rows(rows: list[Row], changes: list[tuple[bytes, bytes | None]]) -> list[Row]:
    """`rows` with `changes` applied: both in serial order; an entry of None removes the row."""
    merged: list[Row] = []
    i = 0
    for serial, entry in changes:
        while i < len(rows) and rows[i][0] < serial:
            merged.append(rows[i])
            i += 1
        if i < len(rows) and rows[i][0] == serial:
            i += 1  # replaced or removed
        if entry is not None:
            merged.append((serial, entry))
    merged.extend(rows[i:])
    return merged


def _update_members(w: _Writer, issuer: bytes, changes: list[tuple[bytes, bytes | None]]) -> None:
    """Apply membership changes (serial order) block by block; an issuer without blocks gets
    its first ones written straight from the stream."""
    i = 0
    while i < len(changes):
        key, upper = _block_for(w, issuer, changes[i][0])
        j = i
        while j < len(changes) and (upper is None or issuer + changes[j][0] < upper):
            j += 1
        rows = [] if key is None else crl_block_rows(*w.get("crl_entries", key))
        if key is not None:
            w.txn.delete(key, db=w.dbs["crl_entries"])
        _put_blocks(w, issuer, _merge_rows(rows, changes[i:j]), CRL_BLOCK_LIMIT)
        i = j


def _apply_publish_crl(w: _Writer, index: int, f: dict[str, Any]) -> dict[str, Any]:
    """A CRL made by the signer: membership changes, its history record, and the latest CRL.

    The entries of the last published CRL are kept in `crl_entries` (blocks, by serial) and
    `crl_expiry` (by expiry). This CRL removes `removed` and adds every revocation with sequence
    number in (previous revocation_seq, revocation_seq]. Decided by the caller, checked here.
    """
    issuer = f["issuer"]
    last = _last_crl_history(w.txn, w.dbs, issuer)
    refused = _publish_rejection(w, f, last)
    if refused is not None:
        return refused
    previous_seq = 0 if last is None else last[1]["revocation_seq"]
    removed, changes = [], []

    def additions() -> Iterator[tuple[bytes, list[Any]]]:
        return _new_members(w, issuer, previous_seq, f["revocation_seq"])

    for serial in f["removed"]:
        expiry_key = _member_expiry_key(w, issuer, serial)
        w.txn.delete(expiry_key, db=w.dbs["crl_expiry"])
        serial_raw = serial_bytes(serial)
        removed.append([serial_raw, w.get("revoked", issuer + serial_raw)[0]])
        changes.append((serial_raw, None))
    if _has_blocks(w, issuer):
        rows = [(key[ISSUER_SIZE:], entry[6]) for key, entry in additions()]
        _update_members(w, issuer, sorted(changes + rows, key=lambda change: change[0]))
    else:  # a first CRL, maybe over a long history: its blocks streamed, then written together
        _stream_blocks(w, issuer, additions())
    for key, entry in additions():  # after the blocks: their pages stay together in the file
        w.put("crl_expiry", crl_expiry_key(issuer, entry[4], key[ISSUER_SIZE:]), None)
    history = {
        "this_update": f["this_update"],
        "next_update": f["next_update"],
        "revocation_seq": f["revocation_seq"],
        "entries": f["entries"],
        "removed": removed,
        "removed_before": f["removed_before"],
        "expired_certs_on_crl": f["expired_certs_on_crl"],
        "signature_algorithm": f["signature_algorithm"],
        "signature": f["signature"],
        "sha256": f["sha256"],
        "size": len(f["der"]),
    }
    w.put("crl_history", crl_history_key(issuer, f["crl_number"]), history)
    crl = {
        "crl_number": serial_bytes(f["crl_number"]),
        "this_update": f["this_update"],
        "next_update": f["next_update"],
        "der": f["der"],
    }
    w.put("crls", issuer, crl)
    return {
        "status": "recorded",
        "issuer": issuer,
        "crl_number": f["crl_number"],
        "this_update": f["this_update"],
        "next_update": f["next_update"],
        "revocation_seq": f["revocation_seq"],
        "entries": f["entries"],
        "added": f["revocation_seq"] - previous_seq,
        "removed": len(removed),
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


def _apply_set_cluster(w: _Writer, index: int, f: dict[str, Any]) -> dict[str, Any]:
    """Replication's cluster identity: the next generation of the same cluster, or the first."""
    stored = w.get("meta", META_CLUSTER)
    expected = 1 if stored is None else stored["generation"] + 1
    if stored is not None and stored["cluster_id"] != f["cluster_id"]:
        return rejection(ErrorCode.REPOSITORY_ERROR, "set_cluster names another cluster id")
    if f["generation"] != expected:
        message = f"set_cluster generation {f['generation']}, expected {expected}"
        return rejection(ErrorCode.REPOSITORY_ERROR, message)
    history = [] if stored is None else stored["history"]
    record = {
        "cluster_id": f["cluster_id"],
        "generation": f["generation"],
        "epoch": f["epoch"],
        "members": f["members"],
        "event": f["event"],
        "at": f["at"],
        "index": index,
        "history": [*history, [f["generation"], f["epoch"], f["members"]]],
    }
    w.put("meta", META_CLUSTER, record)
    return {"status": "recorded", "generation": f["generation"], "index": index}


_HANDLERS: dict[str, Callable[[_Writer, int, dict[str, Any]], dict[str, Any]]] = {
    "issue_x509": _apply_issue,
    "revoke_x509": _apply_revoke,
    "record_crl": _apply_record_crl,
    "publish_crl": _apply_publish_crl,
    "certify_openpgp": _apply_certify,
    "noop": _apply_noop,
    "set_cluster": _apply_set_cluster,
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


def _history_record(issuer: bytes, crl_number: int, stored: dict[str, Any]) -> dict[str, Any]:
    """The public view of a `crl_history` value: ints for serials, tuples for removed pairs."""
    return {
        "issuer": issuer,
        "crl_number": crl_number,
        **stored,
        "removed": [(serial_int(serial), seq) for serial, seq in stored["removed"]],
    }


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

    def cluster_info(self) -> dict[str, Any] | None:
        """Replication's cluster record (`set_cluster`), or None before the first one."""
        with self._reading() as txn:
            raw = txn.get(META_CLUSTER, db=self._dbs["meta"])
        return None if raw is None else _unpack(raw)

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

    def revocation(self, issuer: bytes, serial: int) -> RevokedEntry | None:
        """The revocation of one certificate (None if it is not revoked)."""
        key = cert_key(_check_arg_issuer(issuer), _check_arg_serial(serial))
        with self._reading() as txn:
            raw = txn.get(key, db=self._dbs["revoked"])
        return None if raw is None else _revoked_entry(key, raw)

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

    def iter_crl_blocks(self, issuer: bytes) -> Iterator[tuple[bytes, bytes, bytes]]:
        """The entries of the issuer's last published CRL, block by block in serial order, as
        (serials, sizes, entries): 20 bytes per serial, 4 per size, the DER concatenated. The
        lean read CRL building walks: a block is copied whole unless something changes in it."""
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["crl_entries"])
            if not cursor.set_range(issuer):
                return
            for key, raw in cursor:
                if key[:ISSUER_SIZE] != issuer:
                    return
                serials, sizes, entries = _unpack(raw)
                yield serials, sizes, entries

    def iter_crl_members(self, issuer: bytes) -> Iterator[Row]:
        """(serial20, crl_entry DER) of every entry on the issuer's last published CRL."""
        for block in self.iter_crl_blocks(issuer):
            yield from crl_block_rows(*block)

    def iter_crl_expiry(self, issuer: bytes) -> Iterator[tuple[int, int]]:
        """(not_after, serial) of the entries on the issuer's last published CRL, earliest
        expiry first: what RFC 5280 retention looks at, without walking the whole list."""
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["crl_expiry"])
            if not cursor.set_range(issuer):
                return
            for key in cursor.iternext(keys=True, values=False):
                if key[:ISSUER_SIZE] != issuer:
                    return
                not_after = int.from_bytes(key[ISSUER_SIZE : ISSUER_SIZE + SEQ_SIZE], "big")
                yield not_after, serial_int(key[ISSUER_SIZE + SEQ_SIZE :])

    def crl_history(self, issuer: bytes, crl_number: int) -> dict[str, Any] | None:
        """What `publish_crl` recorded for one CRL number (None if it was not published so)."""
        issuer = _check_arg_issuer(issuer)
        if not isinstance(crl_number, int) or not 0 <= crl_number < CRL_NUMBER_LIMIT:
            return None
        with self._reading() as txn:
            raw = txn.get(crl_history_key(issuer, crl_number), db=self._dbs["crl_history"])
        return None if raw is None else _history_record(issuer, crl_number, _unpack(raw))

    def last_crl_history(self, issuer: bytes) -> dict[str, Any] | None:
        """The history record of the issuer's newest published CRL, or None."""
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            last = _last_crl_history(txn, self._dbs, issuer)
        return None if last is None else _history_record(issuer, *last)

    def iter_crl_history(self, issuer: bytes, after: int = -1) -> Iterator[dict[str, Any]]:
        """History records of the issuer's published CRLs numbered above `after`, ascending."""
        issuer = _check_arg_issuer(issuer)
        start = crl_history_key(issuer, max(after + 1, 0))
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["crl_history"])
            if after + 1 >= CRL_NUMBER_LIMIT or not cursor.set_range(start):
                return
            for key, raw in cursor:
                if key[:ISSUER_SIZE] != issuer:
                    return
                yield _history_record(issuer, serial_int(key[ISSUER_SIZE:]), _unpack(raw))

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
            self._crl_members,
            self._crl_history,
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

    def _crl_members(self) -> None:
        """Each member of a published CRL is a revocation with that very entry DER, listed once
        in `crl_expiry` under its certificate's expiry, and vice versa; blocks are well formed
        and in serial order."""
        members: dict[bytes, int] = {}
        previous = b""
        for key, block in self._items("crl_entries"):
            issuer = key[:ISSUER_SIZE]
            rows = crl_block_rows(*block)
            if (
                not rows
                or key != issuer + rows[0][0]
                or len(b"".join(e for _, e in rows)) != len(block[2])
            ):
                self.report.add(f"crl_entries {key.hex()}: malformed block")
                continue
            members[issuer] = members.get(issuer, 0) + len(rows)
            for serial_raw, crl_entry in rows:
                self._crl_member(issuer, serial_raw, crl_entry, previous)
                previous = issuer + serial_raw
        expiring: dict[bytes, int] = {}
        for key, _ in self._items("crl_expiry"):
            issuer = key[:ISSUER_SIZE]
            expiring[issuer] = expiring.get(issuer, 0) + 1
        for issuer in sorted(set(members) | set(expiring)):
            last = _last_crl_history(self.txn, self.dbs, issuer)
            published = 0 if last is None else last[1]["entries"]
            if not members.get(issuer, 0) == expiring.get(issuer, 0) == published:
                self.report.add(
                    f"crl_entries {issuer.hex()}: {members.get(issuer, 0)} members, "
                    f"{expiring.get(issuer, 0)} by expiry, {published} published"
                )

    def _crl_member(
        self, issuer: bytes, serial_raw: bytes, crl_entry: bytes, previous: bytes
    ) -> None:
        label = f"crl_entries {issuer.hex()} serial {serial_raw.hex()}"
        if issuer + serial_raw <= previous:
            self.report.add(f"{label}: out of order")
        revoked = self._get("revoked", issuer + serial_raw)
        if revoked is None or revoked[6] != crl_entry:
            self.report.add(f"{label}: not a revocation with this CRL entry")
            return
        expiry_key = crl_expiry_key(issuer, revoked[4], serial_raw)
        if self.txn.get(expiry_key, db=self.dbs["crl_expiry"]) is None:
            self.report.add(f"{label}: missing from crl_expiry")

    def _crl_history(self) -> None:
        """Entries a CRL dropped are revocations (with the recorded seq) no longer listed."""
        for key, record in self._items("crl_history"):
            issuer = key[:ISSUER_SIZE]
            for serial_raw, seq in record["removed"]:
                revoked = self._get("revoked", issuer + serial_raw)
                if revoked is None or revoked[0] != seq:
                    self.report.add(f"crl_history {key.hex()}: dropped {serial_raw.hex()} unknown")
                elif self.txn.get(
                    crl_expiry_key(issuer, revoked[4], serial_raw), db=self.dbs["crl_expiry"]
                ):
                    self.report.add(f"crl_history {key.hex()}: dropped {serial_raw.hex()} listed")

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
