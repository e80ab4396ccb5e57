"""CRLs in the repository: `record_crl`, and `publish_crl` with the membership of the last
published CRL kept in blocks (docs/repository.md §3 `crl_entries`, §4.8).

A published CRL's entries are kept in `crl_entries`, which maps issuer || first serial of a
block to [serials (20 bytes each), sizes (4 bytes each), the entries' DER concatenated], and in
`crl_expiry` by certificate expiry. CRL building then copies whole blocks; a publication
rewrites only the blocks it touches. The layout depends only on the sequence of commands, so
replicas agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lmdb

from storage.commands import PublishCrl, RaiseCrlNumber, RecordCrl
from storage.layout import (
    ISSUER_SIZE,
    SERIAL_SIZE,
    Dbs,
    cert_key,
    crl_expiry_key,
    crl_floor_key,
    crl_history_key,
    revseq_key,
    serial_bytes,
    serial_int,
    unpack,
)
from storage.results import CrlNumberRaised, CrlPublished, CrlRecorded, Reason, Rejected
from storage.writer import Writer

CRL_BLOCK_ENTRIES = 128  # entries per block when blocks are (re)written
CRL_BLOCK_LIMIT = 2 * CRL_BLOCK_ENTRIES  # a touched block holding more is split
NEW_MEMBERS_BY_SEQ = 10_000  # beyond this many new entries, scan `revoked` in key order

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


def last_crl_history(txn: lmdb.Transaction, dbs: Dbs, issuer: bytes) -> tuple[int, Any] | None:
    """(crl_number, record) of the issuer's newest `crl_history` entry, or None."""
    cursor = txn.cursor(dbs["crl_history"])
    found = cursor.prev() if cursor.set_range(issuer + b"\xff" * SERIAL_SIZE) else cursor.last()
    if not found or cursor.key()[:ISSUER_SIZE] != issuer:
        return None
    return serial_int(cursor.key()[ISSUER_SIZE:]), unpack(cursor.value())


# --------------------------------------------------------------------------- record_crl


def apply_record_crl(w: Writer, index: int, c: RecordCrl) -> CrlRecorded | Rejected:
    stale = _not_newer(w, c.issuer, c.crl_number)
    if stale is not None:
        return stale
    w.put("crls", c.issuer, _latest(c.crl_number, c.this_update, c.next_update, c.der))
    return CrlRecorded(c.issuer, c.crl_number, c.this_update, c.next_update)


def _not_newer(w: Writer, issuer: bytes, crl_number: int) -> Rejected | None:
    stored = w.get("crls", issuer)
    if stored is None or crl_number > serial_int(stored["crl_number"]):
        return None
    message = (
        f"crl_number {crl_number} is not greater than the stored {serial_int(stored['crl_number'])}"
    )
    return Rejected(Reason.CRL_NUMBER_NOT_NEWER, message)


def _latest(
    crl_number: int, this_update: int, next_update: int, der: bytes | None
) -> dict[str, Any]:
    """A `crls` value (this key order is stored); `der` nil for a CRL published with history,
    which is rebuilt from it."""
    return {
        "crl_number": serial_bytes(crl_number),
        "this_update": this_update,
        "next_update": next_update,
        "der": der,
    }


# --------------------------------------------------------------------------- raise_crl_number


def crl_number_floor(w: Writer, issuer: bytes) -> int:
    stored = w.txn.get(crl_floor_key(issuer), db=w.dbs["meta"])
    return 0 if stored is None else serial_int(unpack(stored))


def apply_raise_crl_number(w: Writer, index: int, c: RaiseCrlNumber) -> CrlNumberRaised:
    floor = max(crl_number_floor(w, c.issuer), c.at_least)
    w.put("meta", crl_floor_key(c.issuer), serial_bytes(floor))
    return CrlNumberRaised(c.issuer, floor)


# --------------------------------------------------------------------------- publish_crl


def apply_publish_crl(w: Writer, index: int, c: PublishCrl) -> CrlPublished | Rejected:
    """A CRL made by the signer: membership changes, its history record, and the latest CRL.

    This CRL removes `removed` and adds every revocation with sequence number in (previous
    revocation_seq, revocation_seq]. Decided by the caller, checked here.
    """
    issuer = c.issuer
    last = last_crl_history(w.txn, w.dbs, issuer)
    refused = _publish_rejection(w, c, last)
    if refused is not None:
        return refused
    previous_seq = 0 if last is None else last[1]["revocation_seq"]
    removed, changes = [], []

    def additions() -> Iterator[tuple[bytes, list[Any]]]:
        return _new_members(w, issuer, previous_seq, c.revocation_seq)

    for serial in c.removed:
        expiry_key = _member_expiry_key(w, issuer, serial)
        assert expiry_key is not None  # checked by _publish_rejection
        w.delete("crl_expiry", expiry_key)
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
        "this_update": c.this_update,
        "next_update": c.next_update,
        "revocation_seq": c.revocation_seq,
        "entries": c.entries,
        "removed": removed,
        "removed_before": c.removed_before,
        "expired_certs_on_crl": c.expired_certs_on_crl,
        "signature_algorithm": c.signature_algorithm,
        "signature": c.signature,
        "sha256": c.sha256,
        "size": c.size,
    }
    w.put("crl_history", crl_history_key(issuer, c.crl_number), history)
    w.put("crls", issuer, _latest(c.crl_number, c.this_update, c.next_update, None))
    return CrlPublished(
        issuer,
        c.crl_number,
        c.this_update,
        c.next_update,
        c.revocation_seq,
        c.entries,
        added=c.revocation_seq - previous_seq,
        removed=len(removed),
    )


def _publish_rejection(w: Writer, c: PublishCrl, last: tuple[int, Any] | None) -> Rejected | None:
    """Why `publish_crl` cannot be applied, or None. Reads only."""
    stale = _not_newer(w, c.issuer, c.crl_number)
    if stale is not None:
        return stale
    floor = crl_number_floor(w, c.issuer)
    if c.crl_number < floor:
        message = f"crl_number {c.crl_number} is below the floor {floor} (raised after a restore)"
        return Rejected(Reason.CRL_NUMBER_NOT_NEWER, message)
    if last is not None and c.crl_number <= last[0]:
        message = f"crl_number {c.crl_number} is not greater than the last published {last[0]}"
        return Rejected(Reason.CRL_NUMBER_NOT_NEWER, message)
    previous_seq, previous_entries = (0, 0)
    if last is not None:
        previous_seq, previous_entries = last[1]["revocation_seq"], last[1]["entries"]
    assigned = w.issuer_counters(c.issuer)["revocation_seq"]
    if not previous_seq <= c.revocation_seq <= assigned:
        message = (
            f"revocation_seq {c.revocation_seq} is outside [{previous_seq}, {assigned}] "
            "(the last published one, the last assigned one)"
        )
        return Rejected(Reason.CRL_MISMATCH, message)
    for serial in c.removed:
        if _member_expiry_key(w, c.issuer, serial) is None:
            message = f"serial {serial:#x} is not on the issuer's last published CRL"
            return Rejected(Reason.CRL_MISMATCH, message)
    expected = previous_entries - len(c.removed) + c.revocation_seq - previous_seq
    if c.entries != expected:
        message = f"entries {c.entries} but the published state gives {expected}"
        return Rejected(Reason.CRL_MISMATCH, message)
    return None


def _member_expiry_key(w: Writer, issuer: bytes, serial: int) -> bytes | None:
    """The `crl_expiry` key of a member of the issuer's last published CRL (None if no member)."""
    revoked = w.get("revoked", cert_key(issuer, serial))
    if revoked is None:
        return None
    key = crl_expiry_key(issuer, revoked[4], serial_bytes(serial))
    return key if w.has("crl_expiry", key) else None


def _new_members(w: Writer, issuer: bytes, after: int, upto: int) -> Iterator[tuple[bytes, Any]]:
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
        entry = unpack(raw)
        if after < entry[0] <= upto:
            yield bytes(key), entry


def _has_blocks(w: Writer, issuer: bytes) -> bool:
    cursor = w.txn.cursor(w.dbs["crl_entries"])
    return bool(cursor.set_range(issuer) and cursor.key()[:ISSUER_SIZE] == issuer)


def _put_blocks(w: Writer, issuer: bytes, rows: list[Row], limit: int) -> None:
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


def _stream_blocks(w: Writer, issuer: bytes, members: Iterator[tuple[bytes, Any]]) -> None:
    """Write an issuer's first blocks from members in key order, CRL_BLOCK_ENTRIES at a time."""
    rows: list[Row] = []
    for key, entry in members:
        rows.append((key[ISSUER_SIZE:], entry[6]))
        if len(rows) == CRL_BLOCK_ENTRIES:
            _put_blocks(w, issuer, rows, CRL_BLOCK_ENTRIES)
            rows = []
    if rows:
        _put_blocks(w, issuer, rows, CRL_BLOCK_ENTRIES)


def _block_for(w: Writer, issuer: bytes, serial_raw: bytes) -> tuple[bytes | None, bytes | None]:
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


def _update_members(w: Writer, issuer: bytes, changes: list[tuple[bytes, bytes | None]]) -> None:
    """Apply membership changes (serial order) block by block."""
    i = 0
    while i < len(changes):
        key, upper = _block_for(w, issuer, changes[i][0])
        j = i
        while j < len(changes) and (upper is None or issuer + changes[j][0] < upper):
            j += 1
        rows = [] if key is None else crl_block_rows(*w.get("crl_entries", key))
        if key is not None:
            w.delete("crl_entries", key)
        _put_blocks(w, issuer, _merge_rows(rows, changes[i:j]), CRL_BLOCK_LIMIT)
        i = j


def append_members(w: Writer, issuer: bytes, rows: list[Row]) -> None:
    """Add members above every current one (an import, in serial order): the issuer's last
    block is filled up to CRL_BLOCK_ENTRIES, then blocks of CRL_BLOCK_ENTRIES follow."""
    if not rows:
        return
    cursor = w.txn.cursor(w.dbs["crl_entries"])
    found = cursor.prev() if cursor.set_range(issuer + b"\xff" * SERIAL_SIZE) else cursor.last()
    if found and cursor.key()[:ISSUER_SIZE] == issuer:
        key = bytes(cursor.key())
        last = crl_block_rows(*unpack(cursor.value()))
        if len(last) < CRL_BLOCK_ENTRIES:
            w.delete("crl_entries", key)
            rows = last + rows
    for start in range(0, len(rows), CRL_BLOCK_ENTRIES):
        _put_blocks(w, issuer, rows[start : start + CRL_BLOCK_ENTRIES], CRL_BLOCK_ENTRIES)
