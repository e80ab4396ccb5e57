"""The audit log inside the repository (docs/audit.md): one record per applied log entry that
says something, appended to a Merkle tree (RFC 9162 §2.1) in the same write transaction.

Records are built here from the command and its result, so every replica appends the same
bytes at the same position. The tree keeps the hash of every perfect subtree (`audit_nodes`):
an append costs one hash per level it completes, and any root or proof is O(log n) lookups.
The hashing is two lines, repeated from signer/pki/merkle.py (storage imports nothing above
it); tests check both give the same roots.
"""

from __future__ import annotations

import hashlib
from typing import Any

import lmdb

from storage.commands import (
    BeginImport,
    CertifyOpenpgp,
    Command,
    FinishImport,
    ImportX509,
    IssueX509,
    Noop,
    PublishCrl,
    RaiseCrlNumber,
    RecordAudit,
    RecordCrl,
    RecordTreeHead,
    RevokeX509,
    SetMeta,
)
from storage.layout import (
    Dbs,
    audit_cert_key,
    audit_head_key,
    audit_key,
    audit_node_key,
    audit_operator_key,
    pack,
    serial_bytes,
)
from storage.results import Done, Issued, Reason, Rejected, Result
from storage.writer import Writer

RECORD_VERSION = 1


def _leaf(record: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + record).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# --------------------------------------------------------------------------- the tree


def size(txn: lmdb.Transaction, dbs: Dbs) -> int:
    entries: int = txn.stat(dbs["audit"])["entries"]
    return entries


def append(w: Writer, record: bytes) -> int:
    """Append one record; returns its position. One hash per completed level."""
    seq = size(w.txn, w.dbs)
    w.txn.put(audit_key(seq), record, db=w.dbs["audit"])
    node, level, index = _leaf(record), 0, seq
    w.txn.put(audit_node_key(0, index), node, db=w.dbs["audit_nodes"])
    while index & 1:
        node = _node(perfect(w.txn, w.dbs, level, index - 1), node)
        level, index = level + 1, index >> 1
        w.txn.put(audit_node_key(level, index), node, db=w.dbs["audit_nodes"])
    return seq


def perfect(txn: lmdb.Transaction, dbs: Dbs, level: int, index: int) -> bytes:
    raw = txn.get(audit_node_key(level, index), db=dbs["audit_nodes"])
    if raw is None:
        raise KeyError(f"no audit subtree ({level}, {index})")
    return bytes(raw)


def root(txn: lmdb.Transaction, dbs: Dbs, start: int, end: int) -> bytes:
    """MTH of records [start, end) (start aligned as in RFC 9162's recursion)."""
    n = end - start
    if n == 0:
        return _sha256(b"")
    if n & (n - 1) == 0:
        level = n.bit_length() - 1
        return perfect(txn, dbs, level, start >> level)
    k = 1 << ((n - 1).bit_length() - 1)
    return _node(root(txn, dbs, start, start + k), root(txn, dbs, start + k, end))


# --------------------------------------------------------------------------- records


def _record(index: int, event: str, time: int | None, **fields: Any) -> bytes:
    return pack({"v": RECORD_VERSION, "index": index, "event": event, "time": time, **fields})


def _outcome(result: Result) -> dict[str, Any]:
    code = result.reason.value if isinstance(result, Rejected) else None
    return {"outcome": result.status, "code": code}


def _request(c: IssueX509 | RevokeX509 | CertifyOpenpgp) -> dict[str, Any]:
    return {"request_id": c.request_id, "request_digest": c.request_digest}


def records_for(index: int, command: Command, result: Result) -> list[bytes]:
    """The records of one applied entry (none for a no-op); small: digests, not bodies."""
    out = _outcome(result)
    match command:
        case IssueX509():
            fields = {
                **_request(command),
                "issuer": command.issuer,
                "serial": serial_bytes(command.serial),
                "cert_sha256": _sha256(command.der),
                "profile": command.profile,
            }
            return [_record(index, command.op, command.issued_at, **fields, **out)]
        case RevokeX509():
            fields = {
                **_request(command),
                "issuer": command.issuer,
                "serial": serial_bytes(command.serial),
                "reason": command.reason,
            }
            return [_record(index, command.op, command.revoked_at, **fields, **out)]
        case CertifyOpenpgp():
            fields = {
                **_request(command),
                "fingerprint": command.fingerprint,
                "result_sha256": _sha256(command.result),
                "expires": command.expires,
            }
            return [_record(index, command.op, command.certified_at, **fields, **out)]
        case PublishCrl():
            fields = {
                "issuer": command.issuer,
                "crl_number": serial_bytes(command.crl_number),
                "crl_sha256": command.sha256,
                "entries": command.entries,
            }
            return [_record(index, command.op, command.this_update, **fields, **out)]
        case RecordCrl():
            fields = {
                "issuer": command.issuer,
                "crl_number": serial_bytes(command.crl_number),
                "crl_sha256": _sha256(command.der),
            }
            return [_record(index, command.op, command.this_update, **fields, **out)]
        case RaiseCrlNumber():
            fields = {
                "issuer": command.issuer,
                "at_least": serial_bytes(command.at_least),
                "reason": command.reason,
            }
            return [_record(index, command.op, None, **fields, **out)]
        case SetMeta():
            fields = {"name": command.name, "value_sha256": _sha256(command.value)}
            return [_record(index, command.op, None, **fields, **out)]
        case BeginImport():
            fields = {
                "import_id": command.import_id,
                "issuer": command.issuer,
                "certificates": command.certificates,
                "revoked": command.revoked,
                "crl_number": serial_bytes(command.crl_number),
                "source": command.source,
            }
            return [_record(index, command.op, command.started_at, **fields, **out)]
        case ImportX509():
            fields = {
                "import_id": command.import_id,
                "issuer": command.issuer,
                "batch": command.batch,
                "certificates": len(command.certificates),
                "first_serial": serial_bytes(command.certificates[0].serial),
                "last_serial": serial_bytes(command.certificates[-1].serial),
            }
            return [_record(index, command.op, None, **fields, **out)]
        case FinishImport():
            fields = {"import_id": command.import_id, "issuer": command.issuer}
            return [_record(index, command.op, None, **fields, **out)]
        case RecordAudit():
            return [_record(index, e.event, e.time, **e.detail) for e in command.events]
        case RecordTreeHead():
            fields = {
                "size": command.size,
                "root": command.root,
                "signature_sha256": _sha256(command.signature),
            }
            return [_record(index, "tree_head", command.timestamp, **fields, **out)]
        case Noop():
            return []
    raise AssertionError(f"no audit records for {command.op}")


def record_applied(w: Writer, index: int, command: Command, result: Result) -> None:
    """Append the records of an applied entry; index an issued certificate's record."""
    for n, record in enumerate(records_for(index, command, result)):
        seq = append(w, record)
        if isinstance(result, Issued) and isinstance(command, IssueX509):
            key = audit_cert_key(command.issuer, command.serial)
            w.txn.put(key, seq.to_bytes(8, "big"), db=w.dbs["audit_index"])
        if isinstance(command, RecordAudit) and isinstance(
            command.events[n].detail.get("key"), str
        ):
            key = audit_operator_key(command.events[n].detail["key"])
            w.txn.put(key, seq.to_bytes(8, "big"), db=w.dbs["audit_index"])


def record_invalid(w: Writer, index: int, entry: bytes | Command, reason: Reason) -> None:
    """An entry that is no command is recorded too (its digest: it may be anything)."""
    digest = _sha256(entry) if isinstance(entry, bytes) else None
    record = _record(
        index, "invalid", None, entry_sha256=digest, outcome="rejected", code=reason.value
    )
    append(w, record)


# --------------------------------------------------------------------------- tree heads


def apply_tree_head(w: Writer, index: int, c: RecordTreeHead) -> Result:
    """Keep a signed head if it names the tree as it is here (decided before replication, so
    a head for a tree this replica does not hold is refused, on every replica alike)."""
    held = size(w.txn, w.dbs)
    if c.size > held or root(w.txn, w.dbs, 0, c.size) != c.root:
        message = f"the tree head of size {c.size} does not match the audit tree here"
        return Rejected(Reason.AUDIT_MISMATCH, message)
    head = {
        "size": c.size,
        "timestamp": c.timestamp,
        "root": c.root,
        "algorithm": c.algorithm,
        "signature": c.signature,
    }
    w.put("audit_index", audit_head_key(c.size), head)
    return Done()
