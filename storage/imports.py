"""Imports of an earlier CA's history (docs/repository.md §4.10): `begin_import`, then the
batches (`import_x509`) in order, then `finish_import`.

The import's state lives in `meta` under `import:<issuer hex>` and moves in the same
transaction as the certificates it records, so a crash leaves a batch either applied or not and
a re-run continues with the next one. Batches also build the CRL membership of the imported CRL
(`crl_entries`, `crl_expiry`) as they go, so the issuer's first CRL after the import merges blocks
instead of reading every revocation; `finish_import` records that CRL's history (it continues the
earlier CA's CRL numbers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from storage.commands import BeginImport, FinishImport, ImportedCertificate, ImportX509
from storage.crl import Row, append_members, last_crl_history
from storage.layout import (
    ISSUER_SIZE,
    cert_key,
    crl_expiry_key,
    crl_history_key,
    import_meta_key,
    revseq_key,
    serial_bytes,
    serial_int,
    unpack,
)
from storage.layout import pack as _pack
from storage.results import ImportProgress, Reason, Rejected
from storage.writer import Writer


@dataclass(frozen=True)
class ImportState:
    """An issuer's import as the repository recorded it (`Repository.import_state`)."""

    import_id: str
    issuer: bytes
    batches: int
    certificates: int
    revoked: int
    listed: int
    crl_number: int
    crl_time: int
    removed_before: int | None
    started_at: int
    source: str
    begun_index: int
    applied_batches: int
    applied_certificates: int
    applied_revoked: int
    applied_listed: int
    last_serial: int | None
    finished_index: int | None

    @property
    def finished(self) -> bool:
        return self.finished_index is not None


def read_state(issuer: bytes, raw: bytes | memoryview | None) -> ImportState | None:
    if raw is None:
        return None
    stored = unpack(raw)
    last = stored["last_serial"]
    return ImportState(
        issuer=issuer,
        **{
            **stored,
            "crl_number": serial_int(stored["crl_number"]),
            "last_serial": None if last is None else serial_int(last),
        },
    )


def _state(w: Writer, issuer: bytes) -> ImportState | None:
    raw = w.txn.get(import_meta_key(issuer), db=w.dbs["meta"])
    return read_state(issuer, raw)


def _put_state(w: Writer, state: ImportState) -> None:
    """The stored map, in this field order."""
    stored = {
        "import_id": state.import_id,
        "batches": state.batches,
        "certificates": state.certificates,
        "revoked": state.revoked,
        "listed": state.listed,
        "crl_number": serial_bytes(state.crl_number),
        "crl_time": state.crl_time,
        "removed_before": state.removed_before,
        "started_at": state.started_at,
        "source": state.source,
        "begun_index": state.begun_index,
        "applied_batches": state.applied_batches,
        "applied_certificates": state.applied_certificates,
        "applied_revoked": state.applied_revoked,
        "applied_listed": state.applied_listed,
        "last_serial": None if state.last_serial is None else serial_bytes(state.last_serial),
        "finished_index": state.finished_index,
    }
    w.txn.put(import_meta_key(state.issuer), _pack(stored), db=w.dbs["meta"])


def _progress(state: ImportState, fresh: bool) -> ImportProgress:
    return ImportProgress(
        state.import_id,
        state.issuer,
        state.batches,
        state.applied_batches,
        state.certificates,
        state.applied_certificates,
        state.finished,
        fresh,
    )


def _conflict(message: str) -> Rejected:
    return Rejected(Reason.IMPORT_CONFLICT, message)


def importing(w: Writer, issuer: bytes) -> Rejected | None:
    """The rejection of a write to an issuer whose import is not finished, or None."""
    state = _state(w, issuer)
    if state is None or state.finished:
        return None
    return _conflict(f"the import {state.import_id} into this issuer is not finished")


def _same_import(state: ImportState | None, import_id: str) -> Rejected | None:
    if state is None:
        return _conflict(f"import {import_id} was not begun for this issuer")
    if state.import_id != import_id:
        return _conflict(f"this issuer holds another import ({state.import_id})")
    return None


# --------------------------------------------------------------------------- the handlers


def apply_begin_import(w: Writer, index: int, c: BeginImport) -> ImportProgress | Rejected:
    state = _state(w, c.issuer)
    if state is not None:
        refused = _same_import(state, c.import_id)
        return refused if refused is not None else _progress(state, fresh=False)
    counters = w.issuer_counters(c.issuer)
    if counters["certificates"]:
        return _conflict(
            f"the issuer already has {counters['certificates']} certificate(s): history is "
            "imported before the issuer's first certificate"
        )
    published = _last_number(w, c.issuer)
    if published is not None and published >= c.crl_number:
        return _conflict(
            f"the issuer's CRL {published} was published already: the earlier CA's last "
            f"({c.crl_number}) must be above it, or CRL numbers would go back"
        )
    state = ImportState(
        c.import_id,
        c.issuer,
        c.batches,
        c.certificates,
        c.revoked,
        c.listed,
        c.crl_number,
        c.crl_time,
        c.removed_before,
        c.started_at,
        c.source,
        begun_index=index,
        applied_batches=0,
        applied_certificates=0,
        applied_revoked=0,
        applied_listed=0,
        last_serial=None,
        finished_index=None,
    )
    _put_state(w, state)
    return _progress(state, fresh=True)


def _last_number(w: Writer, issuer: bytes) -> int | None:
    """The highest CRL number the issuer has, published with history or recorded (None)."""
    numbers = []
    last = last_crl_history(w.txn, w.dbs, issuer)
    if last is not None:
        numbers.append(last[0])
    stored = w.get("crls", issuer)
    if stored is not None:
        numbers.append(serial_int(stored["crl_number"]))
    return max(numbers, default=None)


def apply_import_x509(w: Writer, index: int, c: ImportX509) -> ImportProgress | Rejected:
    state = _state(w, c.issuer)
    refused = _same_import(state, c.import_id)
    if refused is not None:
        return refused
    assert state is not None
    if c.batch <= state.applied_batches:
        return _progress(state, fresh=False)  # a retry of a batch that is in
    refused = _batch_rejection(w, state, c)
    if refused is not None:
        return refused
    revoked = listed = 0
    counters = w.issuer_counters(c.issuer)
    seq = counters["revocation_seq"]
    members: list[Row] = []
    for cert in c.certificates:
        key = cert_key(c.issuer, cert.serial)
        if cert.revoked_at is None:
            w.put("certs", key, _cert_value(c.import_id, cert, None))
            continue
        seq += 1
        revoked += 1
        w.put("certs", key, _cert_value(c.import_id, cert, seq))
        w.put("revoked", key, _revoked_value(seq, cert))
        w.put("revseq", revseq_key(c.issuer, seq), serial_bytes(cert.serial))
        if cert.listed:
            listed += 1
            members.append((key[ISSUER_SIZE:], cert.crl_entry or b""))
            w.put("crl_expiry", crl_expiry_key(c.issuer, cert.not_after, key[ISSUER_SIZE:]), None)
    append_members(w, c.issuer, members)
    w.bump(c.issuer, counters, certificates=len(c.certificates), revoked=revoked,
           revocation_seq=revoked)  # fmt: skip
    state = _advanced(state, c, revoked, listed)
    _put_state(w, state)
    return _progress(state, fresh=True)


def _batch_rejection(w: Writer, state: ImportState, c: ImportX509) -> Rejected | None:
    """Why a new batch cannot be applied, or None. Reads only."""
    if state.finished:
        return _conflict(f"import {state.import_id} is finished")
    if c.batch != state.applied_batches + 1:
        return _conflict(f"batch {c.batch} arrived before batch {state.applied_batches + 1}")
    if c.batch > state.batches:
        return _conflict(f"batch {c.batch} is past the {state.batches} the import announced")
    first = c.certificates[0].serial
    if state.last_serial is not None and first <= state.last_serial:
        return _conflict(
            f"serial {first:#x} is not above the last imported ({state.last_serial:#x})"
        )
    for cert in c.certificates:
        if w.has("certs", cert_key(c.issuer, cert.serial)):
            message = f"serial {cert.serial:#x} is already used by another certificate"
            return Rejected(Reason.SERIAL_TAKEN, message)
    return None


def _advanced(state: ImportState, c: ImportX509, revoked: int, listed: int) -> ImportState:
    return ImportState(
        **{
            **state.__dict__,
            "applied_batches": c.batch,
            "applied_certificates": state.applied_certificates + len(c.certificates),
            "applied_revoked": state.applied_revoked + revoked,
            "applied_listed": state.applied_listed + listed,
            "last_serial": c.certificates[-1].serial,
        }
    )


def _cert_value(import_id: str, cert: ImportedCertificate, seq: int | None) -> dict[str, Any]:
    """An imported certificate's `certs` value (this field order is stored)."""
    return {
        "import_id": import_id,
        "subject": cert.subject,
        "file": cert.file,
        "status": cert.status,
        "not_before": cert.not_before,
        "not_after": cert.not_after,
        "revocation_seq": seq,
        "der": cert.der,
    }


def _revoked_value(seq: int, cert: ImportedCertificate) -> list[Any]:
    """A `revoked` value of an imported revocation: no request revoked it (None)."""
    return [
        seq,
        cert.revoked_at,
        cert.reason,
        cert.invalidity_date,
        cert.not_after,
        None,
        cert.crl_entry,
    ]


def apply_finish_import(w: Writer, index: int, c: FinishImport) -> ImportProgress | Rejected:
    state = _state(w, c.issuer)
    refused = _same_import(state, c.import_id)
    if refused is not None:
        return refused
    assert state is not None
    if state.finished:
        return _progress(state, fresh=False)
    announced = (state.batches, state.certificates, state.revoked, state.listed)
    applied = (
        state.applied_batches,
        state.applied_certificates,
        state.applied_revoked,
        state.applied_listed,
    )
    if applied != announced:
        return _conflict(
            f"import {state.import_id} is incomplete: (batches, certificates, revoked, listed) "
            f"{applied} of {announced}"
        )
    history = {  # the imported CRL: no signature of ours, see docs/crl.md §7
        "this_update": state.crl_time,
        "next_update": state.crl_time,
        "revocation_seq": w.issuer_counters(c.issuer)["revocation_seq"],
        "entries": state.listed,
        "removed": [],
        "removed_before": state.removed_before,
        "expired_certs_on_crl": None,
        "signature_algorithm": b"",
        "signature": b"",
        "sha256": b"",
        "size": 0,
        "imported": state.import_id,
    }
    w.put("crl_history", crl_history_key(c.issuer, state.crl_number), history)
    state = ImportState(**{**state.__dict__, "finished_index": index})
    _put_state(w, state)
    return _progress(state, fresh=True)
