"""The consistency check (docs/repository.md §7): every index cross-checked against the
records, in one read transaction, read-only and safe while the signer runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lmdb

from storage.crl import crl_block_rows, last_crl_history
from storage.layout import (
    IMPORT_META_PREFIX,
    ISSUER_SIZE,
    META_APPLIED_INDEX,
    META_SCHEMA_VERSION,
    SERIAL_SIZE,
    Dbs,
    cert_key,
    crl_expiry_key,
    import_meta_key,
    new_counters,
    openpgp_key,
    revseq_key,
    serial_int,
    unpack,
)
from storage.schema import SCHEMA_VERSION

MAX_REPORTED_PROBLEMS = 1000


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


class Checker:
    """Cross-checks every index against the records in one read transaction.

    Rules: each certificate's request is an issue_x509 request naming it (an imported one: its
    issuer's recorded import); each issue_x509, revoke_x509 and certify_openpgp request names an
    existing record made by it; a certificate is revoked iff it has a `revoked` entry with the
    same seq (revoked by no request only if imported); each revocation has its `revseq` entry
    and vice versa; per-issuer counters and import counts equal what the records count. Memory
    stays O(issuers).
    """

    def __init__(self, txn: lmdb.Transaction, dbs: Dbs):
        self.txn = txn
        self.dbs = dbs
        self.report = ConsistencyReport()
        self.tally: dict[bytes, dict[str, int]] = {}
        self.imported: dict[bytes, int] = {}  # issuer -> imported certificates seen

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
            self._imports,
        )
        for step in steps:
            try:
                step()
            except Exception as exc:  # a corrupt value must end up in the report, not raise
                self.report.add(f"{step.__name__.lstrip('_')}: {type(exc).__name__}: {exc}")
        return self.report

    def _get(self, db: str, key: bytes) -> Any:
        raw = self.txn.get(key, db=self.dbs[db])
        return None if raw is None else unpack(raw)

    def _items(self, db: str) -> Iterator[tuple[bytes, Any]]:
        count = 0
        for key, raw in self.txn.cursor(self.dbs[db]):
            count += 1
            try:
                value = unpack(raw)
            except Exception as exc:
                self.report.add(f"{db} {bytes(key).hex()}: undecodable value ({exc})")
                continue
            yield bytes(key), value
        self.report.checked[db] = count

    def _issuer(self, issuer: bytes) -> dict[str, int]:
        return self.tally.setdefault(issuer, new_counters())

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
            if "import_id" in cert:
                self._imported_cert(label, issuer, cert)
                self._cert_revocation(label, key, cert)
                continue
            request = self._get("requests", cert["request_id"].encode("utf-8"))
            if request is None or request["op"] != "issue_x509":
                self.report.add(f"{label}: its request {cert['request_id']!r} is not recorded")
            elif _serial_of(request["result"]) != serial or (
                request["result"].get("issuer") != issuer
            ):
                self.report.add(f"{label}: request {cert['request_id']!r} names another cert")
            self._cert_revocation(label, key, cert)

    def _imported_cert(self, label: str, issuer: bytes, cert: dict[str, Any]) -> None:
        self.imported[issuer] = self.imported.get(issuer, 0) + 1
        state = self._get("meta", import_meta_key(issuer))
        if state is None or state["import_id"] != cert["import_id"]:
            self.report.add(f"{label}: its import {cert['import_id']!r} is not recorded")

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
            if request_id is None:
                if "import_id" not in (self._get("certs", key) or {}):
                    self.report.add(f"{label}: revoked by no request, but not imported")
                continue
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
            last = last_crl_history(self.txn, self.dbs, issuer)
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
            expected = self.tally.get(issuer, new_counters())
            if stored.get(issuer) != expected:
                self.report.add(
                    f"issuers {issuer.hex()}: counters {stored.get(issuer)} but records "
                    f"give {expected}"
                )

    def _imports(self) -> None:
        """Each import's counts are what its records show."""
        prefix = IMPORT_META_PREFIX.encode()
        cursor = self.txn.cursor(self.dbs["meta"])
        if not cursor.set_range(prefix):
            return
        for key, raw in cursor:
            if not bytes(key).startswith(prefix):
                return
            issuer = bytes.fromhex(bytes(key[len(prefix) :]).decode())
            state = unpack(raw)
            if self.imported.get(issuer, 0) != state["applied_certificates"]:
                self.report.add(
                    f"meta {bytes(key).decode()}: {state['applied_certificates']} imported, "
                    f"{self.imported.get(issuer, 0)} certificates of the import found"
                )


def _made_by(op: str, record: Any) -> str | None:
    """Request id that created a certs (dict) or revoked (array) record."""
    return record["request_id"] if op == "issue_x509" else record[5]


def _serial_of(stored_result: dict[str, Any]) -> int | None:
    serial = stored_result.get("serial")
    return None if serial is None else serial_int(serial)
