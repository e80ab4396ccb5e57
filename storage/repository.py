"""The certificate repository: a deterministic state machine over LMDB.

Writes go through ONE entry point, `Repository.apply(index, entry)` (and `apply_batch`, the same
thing for several entries in one transaction), like the FSM of hashicorp/raft: an entry is a
log command's bytes (storage/commands.py), the answer a typed result (storage/results.py).
Every replica that applies the same (index, entry) sequence ends in byte-identical state with
identical results, so nothing inside apply reads a clock, draws randomness or depends on
anything local: serials, times, DER and pre-encoded CRL entries are decided by the caller and
carried in the command.

The applied index is stored in the same LMDB write transaction as the change it belongs to, so a
crash leaves either both or neither. A bad command is rejected as data (never raised); only a real
storage failure raises `RepositoryError`. docs/repository.md describes the format byte by byte.
Where things are: commands and their codec in commands.py, results in results.py, the handlers
in apply.py (CRLs in crl.py), the key layout in layout.py, versions in schema.py, the
consistency check in check.py; this module opens, reads, snapshots and restores.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from storage.apply import apply_entry, revocation_of
from storage.audit import perfect as audit_perfect
from storage.audit import size as audit_size
from storage.check import Checker, ConsistencyReport
from storage.commands import (
    CRL_NUMBER_LIMIT,
    FINGERPRINT_SIZES,
    MAX_REQUEST_ID_BYTES,
    SERIAL_LIMIT,
    Command,
    SetMeta,
    encode,
)
from storage.crl import Row, crl_block_rows, last_crl_history
from storage.errors import InvalidArgument, RepositoryError
from storage.imports import ImportState, read_state
from storage.layout import (
    DATA_FILE,
    DB_NAMES,
    ISSUER_SIZE,
    META_APPLIED_INDEX,
    META_SCHEMA_VERSION,
    RESTORE_TEMP,
    SEQ_SIZE,
    SERIAL_SIZE,
    STATE_DB_NAMES,
    Dbs,
    audit_cert_key,
    audit_head_key,
    audit_key,
    audit_operator_key,
    cert_key,
    crl_floor_key,
    crl_history_key,
    import_meta_key,
    revseq_key,
    serial_int,
    unpack,
)
from storage.results import RequestRecord, Result, Revocation, from_record
from storage.schema import SCHEMA_VERSION, prepare_schema
from storage.writer import Writer

DEFAULT_MAP_SIZE = 64 << 30  # 64 GiB of address space; the file grows only as pages are used
INDEX_LIMIT = 2**63


class RevokedEntry(NamedTuple):
    """One revoked certificate as CRL building needs it: a tuple, no per-entry dict."""

    serial: int
    revoked_at: int
    reason: int | None
    invalidity_date: int | None
    not_after: int
    crl_entry: bytes
    seq: int


class CertificateRecord(NamedTuple):
    """A certificate as an export needs it (`iter_certificates`): issued here or imported."""

    serial: int
    not_before: int | None
    not_after: int
    der: bytes | None  # None: imported from an index without the certificate file
    profile: str | None  # None: imported
    import_id: str | None  # the import that brought it, None: issued here
    subject: bytes | None  # imported: as the earlier CA wrote it; None: read it from der
    file: bytes | None
    status: str | None  # imported: "V", "R" or "E" as index.txt said
    revocation: RevokedEntry | None


class Repository:
    """The certificate repository in an LMDB environment directory.

    Reads may run from any thread at any time (LMDB MVCC: readers never block the writer). Writes
    (apply, apply_batch, restore) are serialised by an in-process lock.
    """

    def __init__(
        self,
        path: Path,
        map_size: int = DEFAULT_MAP_SIZE,
        readonly: bool = False,
        metasync: bool = True,
    ):
        self.path = Path(path)
        self.map_size = map_size
        self.readonly = readonly  # reads only, beside the signer that writes (an export)
        # False: one fdatasync per commit instead of two; an OS crash may then undo the last
        # commit, so only for an owner that replays it (the replicated log's journal, §2).
        self.metasync = metasync
        self._lock = threading.Lock()
        self._env: lmdb.Environment | None = None
        self._dbs: Dbs = {}
        self._open()

    # ----------------------------------------------------------------- lifecycle

    def _open(self) -> None:
        if self.readonly:
            self._open_readonly()
            return
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
            (self.path / RESTORE_TEMP).unlink(missing_ok=True)  # a restore that died before swap
            _make_private(self.path)
        except OSError as exc:
            raise _storage_error(f"opening repository {self.path}", exc) from exc
        try:
            env = lmdb.open(
                str(self.path),
                map_size=self.map_size,
                subdir=True,
                max_dbs=len(DB_NAMES) + 2,
                sync=True,
                metasync=self.metasync,
                writemap=False,
                map_async=False,
                lock=True,
                mode=0o600,  # files: subscribers' names and addresses (the directory is 0700)
            )
        except lmdb.Error as exc:
            raise _storage_error(f"opening repository {self.path}", exc) from exc
        try:
            with env.begin(write=True) as txn:
                dbs = {name: env.open_db(name.encode(), txn=txn) for name in DB_NAMES}
                prepare_schema(self.path, txn, dbs)
        except lmdb.Error as exc:
            env.close()
            raise _storage_error(f"opening repository {self.path}", exc) from exc
        except BaseException:
            env.close()
            raise
        self._env, self._dbs = env, dbs

    def _open_readonly(self) -> None:
        """Open for reading only, while the signer may write: never migrates, never creates."""
        try:
            env = lmdb.open(
                str(self.path),
                subdir=True,
                readonly=True,
                max_dbs=len(DB_NAMES) + 2,
                lock=True,
                create=False,
            )
        except lmdb.Error as exc:
            raise _storage_error(f"opening repository {self.path} to read", exc) from exc
        try:
            dbs = {name: env.open_db(name.encode(), create=False) for name in DB_NAMES}
            with env.begin() as txn:
                version = unpack(_get(txn, META_SCHEMA_VERSION, dbs["meta"]))
        except (lmdb.Error, RepositoryError) as exc:
            env.close()
            raise _storage_error(f"opening repository {self.path} to read", exc) from exc
        if version != SCHEMA_VERSION:
            env.close()
            raise RepositoryError(
                f"repository {self.path} has schema version {version}, this software "
                f"{SCHEMA_VERSION}: open it once with the signer to migrate it"
            )
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
            raise RepositoryError(f"repository {self.path} is closed")
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

    def apply(self, index: int, entry: bytes | Command) -> Result:
        """Apply one log entry at log position `index`; durable on disk when it returns."""
        return self.apply_batch([(index, entry)])[0]

    def apply_batch(self, items: Sequence[tuple[int, bytes | Command]]) -> list[Result]:
        """Apply several entries in ONE transaction (one fsync); per-entry semantics unchanged.

        An entry is a log command's bytes, or a command (encoded first: the same path). A storage
        failure aborts the whole batch: none of it is applied, and RepositoryError is raised.
        """
        checked = [(_check_index(index), entry) for index, entry in items]
        if not checked:
            return []
        with self._lock:
            env = self._require_env()
            try:
                with env.begin(write=True) as txn:
                    applied = unpack(_get(txn, META_APPLIED_INDEX, self._dbs["meta"]))
                    w = Writer(txn, self._dbs, applied)
                    results = [apply_entry(w, index, entry) for index, entry in checked]
                    if w.dirty:
                        w.put("meta", META_APPLIED_INDEX, w.applied)
            except lmdb.Error as exc:
                raise _storage_error("applying commands", exc) from exc
        return results

    # ----------------------------------------------------------------- the log owner's values

    def meta(self, name: str) -> bytes | None:
        """A value kept for the log's owner (`set_meta`), as it was given; None if never set."""
        with self._reading() as txn:
            raw = txn.get(name.encode("utf-8"), db=self._dbs["meta"])
        return None if raw is None else bytes(raw)

    @staticmethod
    def meta_entry(name: str, expected: bytes | None, value: bytes) -> bytes:
        """The log entry that sets `name` to `value` if it holds `expected` (None: absent)."""
        return encode(SetMeta(name, expected, value))

    # ----------------------------------------------------------------- reads

    def schema_version(self) -> int:
        with self._reading() as txn:
            version: int = unpack(_get(txn, META_SCHEMA_VERSION, self._dbs["meta"]))
        return version

    def last_applied_index(self) -> int:
        """Index of the last applied command (0 for a new repository)."""
        with self._reading() as txn:
            applied: int = unpack(_get(txn, META_APPLIED_INDEX, self._dbs["meta"]))
        return applied

    def get_request(self, request_id: str) -> RequestRecord | None:
        """The recorded request: its op, the client's digest, its index and its first result."""
        if not isinstance(request_id, str):
            raise InvalidArgument("request_id must be a str")
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
        stored = unpack(raw)
        return RequestRecord(
            request_id,
            stored["op"],
            stored["request_digest"],
            stored["index"],
            from_record(stored["result"]),
        )

    def get_certificate(self, issuer: bytes, serial: int) -> dict[str, Any] | None:
        """The certificate record, with its `Revocation` (or None) joined in."""
        key = cert_key(_check_arg_issuer(issuer), _check_arg_serial(serial))
        with self._reading() as txn:
            raw = txn.get(key, db=self._dbs["certs"])
            revoked = txn.get(key, db=self._dbs["revoked"])
        if raw is None:
            return None
        cert = unpack(raw)
        revocation = None
        if revoked is not None:
            revocation = revocation_of(issuer, serial, unpack(revoked), Revocation)
        return {
            "issuer": issuer,
            "serial": serial,
            "request_id": cert.get("request_id"),  # None, like the next three, when imported
            "request_digest": cert.get("request_digest"),
            "profile": cert.get("profile"),
            "not_before": cert["not_before"],
            "not_after": cert["not_after"],
            "issued_at": cert.get("issued_at"),
            "der": cert["der"],
            "revocation": revocation,
            "import_id": cert.get("import_id"),
        }

    def iter_certificates(self, issuer: bytes) -> Iterator[CertificateRecord]:
        """Every certificate of `issuer` in serial order, with its revocation (an export's
        read: holds one read transaction until exhausted)."""
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["certs"])
            if not cursor.set_range(issuer):
                return
            for key, raw in cursor:
                if key[:ISSUER_SIZE] != issuer:
                    return
                cert = unpack(raw)
                revoked = None
                if cert["revocation_seq"] is not None:
                    raw_revoked = txn.get(key, db=self._dbs["revoked"])
                    if raw_revoked is None:
                        message = f"certs {bytes(key).hex()} is revoked without a revoked entry"
                        raise RepositoryError(f"{message}: run check_consistency")
                    revoked = _revoked_entry(key, raw_revoked)
                yield CertificateRecord(
                    serial_int(key[ISSUER_SIZE:]),
                    cert["not_before"],
                    cert["not_after"],
                    cert["der"],
                    cert.get("profile"),
                    cert.get("import_id"),
                    cert.get("subject"),
                    cert.get("file"),
                    cert.get("status"),
                    revoked,
                )

    def import_state(self, issuer: bytes) -> ImportState | None:
        """The issuer's import (storage/imports.py), or None if history was never imported."""
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            return read_state(issuer, txn.get(import_meta_key(issuer), db=self._dbs["meta"]))

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
            raise InvalidArgument("seq must be an int >= 0")
        if seq >= 2 ** (8 * SEQ_SIZE) - 1:
            return
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["revseq"])
            if not cursor.set_range(revseq_key(issuer, seq + 1)):
                return
            for key, raw in cursor:
                if key[:ISSUER_SIZE] != issuer:
                    return
                revoked_key = issuer + unpack(raw)
                entry = txn.get(revoked_key, db=self._dbs["revoked"])
                if entry is None:
                    message = (
                        f"revseq {bytes(key).hex()} names no revocation: run check_consistency"
                    )
                    raise RepositoryError(message)
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
        return 0 if raw is None else int(unpack(raw)["revocation_seq"])

    def latest_crl(self, issuer: bytes) -> dict[str, Any] | None:
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            raw = txn.get(issuer, db=self._dbs["crls"])
        if raw is None:
            return None
        crl = unpack(raw)
        return {
            "issuer": issuer,
            "crl_number": serial_int(crl["crl_number"]),
            "this_update": crl["this_update"],
            "next_update": crl["next_update"],
            "der": crl["der"],
        }

    def crl_number_floor(self, issuer: bytes) -> int:
        """The lowest number the issuer's next CRL may have (0: none set; raise_crl_number)."""
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            raw = txn.get(crl_floor_key(issuer), db=self._dbs["meta"])
        return 0 if raw is None else serial_int(unpack(raw))

    def crl_issuers(self) -> list[bytes]:
        """Issuers with a CRL recorded, published or imported, in key order."""
        with self._reading() as txn:
            found = {bytes(key) for key, _ in txn.cursor(self._dbs["crls"])}
            cursor = txn.cursor(self._dbs["crl_history"])
            more = cursor.first()
            while more:  # one step per issuer: past its highest possible number
                issuer = bytes(cursor.key()[:ISSUER_SIZE])
                found.add(issuer)
                more = cursor.set_range(issuer + b"\xff" * SERIAL_SIZE)
        return sorted(found)

    def last_crl_number(self, issuer: bytes) -> int:
        """The highest CRL number the issuer's CRLs took here (recorded, published, imported
        or reserved by a floor), 0 when none."""
        history, latest = self.last_crl_history(issuer), self.latest_crl(issuer)
        numbers = [0, self.crl_number_floor(issuer) - 1]
        numbers += [int(r["crl_number"]) for r in (history, latest) if r is not None]
        return max(numbers)

    def last_crl_time(self, issuer: bytes) -> int:
        """The newest thisUpdate among the issuer's CRLs here (0 when none)."""
        history, latest = self.last_crl_history(issuer), self.latest_crl(issuer)
        return max([0] + [int(r["this_update"]) for r in (history, latest) if r is not None])

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
                serials, sizes, entries = unpack(raw)
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
        return None if raw is None else _history_record(issuer, crl_number, unpack(raw))

    def last_crl_history(self, issuer: bytes) -> dict[str, Any] | None:
        """The history record of the issuer's newest published CRL, or None."""
        issuer = _check_arg_issuer(issuer)
        with self._reading() as txn:
            last = last_crl_history(txn, self._dbs, issuer)
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
                yield _history_record(issuer, serial_int(key[ISSUER_SIZE:]), unpack(raw))

    def iter_openpgp(self, fingerprint: bytes) -> Iterator[dict[str, Any]]:
        """OpenPGP certifications recorded for a key fingerprint, in request-id byte order."""
        if not isinstance(fingerprint, bytes) or len(fingerprint) not in FINGERPRINT_SIZES:
            raise InvalidArgument("fingerprint must be 20 or 32 bytes")
        prefix = bytes([len(fingerprint)]) + fingerprint
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["openpgp"])
            if not cursor.set_range(prefix):
                return
            for key, raw in cursor:
                if key[: len(prefix)] != prefix:
                    return
                yield {
                    "fingerprint": fingerprint,
                    "request_id": bytes(key[len(prefix) :]).decode("utf-8"),
                    **unpack(raw),
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
            issuers = {bytes(k): unpack(v) for k, v in txn.cursor(self._dbs["issuers"])}
        return {**totals, "issuers": issuers}

    def content_digest(
        self, include_applied_index: bool = True, include_audit: bool = True
    ) -> bytes:
        """SHA-256 over every key and value of every sub-database, in name then key order.

        Each item is length-framed so no two different contents hash alike. With
        include_applied_index=False the meta `applied_index` entry is skipped: two stores whose
        data agree but whose logs had different numbering then compare equal. With
        include_audit=False the audit log's sub-databases are skipped: the certificate state.
        """
        digest = hashlib.sha256(b"cacert-signer repository content v1\x00")
        with self._reading() as txn:
            for name in DB_NAMES if include_audit else STATE_DB_NAMES:
                digest.update(b"D" + _frame(name.encode()))
                for key, value in txn.cursor(self._dbs[name]):
                    if name == "meta" and key == META_APPLIED_INDEX and not include_applied_index:
                        continue
                    digest.update(b"K" + _frame(key) + b"V" + _frame(value))
        return digest.digest()

    def check_consistency(self) -> ConsistencyReport:
        """Check that every index agrees with the records; see `Checker` for the rules."""
        with self._reading() as txn:
            return Checker(txn, self._dbs).run()

    # ----------------------------------------------------------------- the audit log

    def audit_size(self) -> int:
        """How many records the audit log holds."""
        with self._reading() as txn:
            return audit_size(txn, self._dbs)

    def audit_records(self, start: int, limit: int, max_bytes: int = 1 << 62) -> list[bytes]:
        """Records from position `start`: at most `limit` of them and about `max_bytes`."""
        out: list[bytes] = []
        total = 0
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["audit"])
            if limit <= 0 or not cursor.set_range(audit_key(max(start, 0))):
                return out
            for record in cursor.iternext(keys=False, values=True):
                total += len(record)
                if len(out) >= limit or (out and total > max_bytes):
                    break
                out.append(bytes(record))
        return out

    @contextmanager
    def audit_tree(self) -> Iterator[tuple[int, Callable[[int, int], bytes]]]:
        """(size, perfect) in one read transaction: `perfect(level, index)` is the hash of a
        perfect subtree, what signer/pki/merkle.py builds roots and proofs from."""
        with self._reading() as txn:
            yield audit_size(txn, self._dbs), lambda lvl, i: audit_perfect(txn, self._dbs, lvl, i)

    def audit_position(self, issuer: bytes, serial: int) -> int | None:
        """The position of the record that issued this certificate here (None: none)."""
        key = audit_cert_key(_check_arg_issuer(issuer), _check_arg_serial(serial))
        with self._reading() as txn:
            raw = txn.get(key, db=self._dbs["audit_index"])
        return None if raw is None else int.from_bytes(raw, "big")

    def last_operator(self, key: str) -> dict[str, Any] | None:
        """The last operator record that named `key` (its fields), or None."""
        with self._reading() as txn:
            raw = txn.get(audit_operator_key(key), db=self._dbs["audit_index"])
            record = None if raw is None else txn.get(bytes(raw), db=self._dbs["audit"])
        return None if record is None else dict(unpack(record))

    def tree_head(self, size: int | None = None) -> dict[str, Any] | None:
        """The signed tree head of `size` records (None: the latest one), or None."""
        with self._reading() as txn:
            cursor = txn.cursor(self._dbs["audit_index"])
            if size is not None:
                raw = txn.get(audit_head_key(size), db=self._dbs["audit_index"])
                return None if raw is None else dict(unpack(raw))
            moved = cursor.prev() if cursor.set_range(b"i") else cursor.last()  # past b"h..."
            if not moved or cursor.key()[:1] != b"h":
                return None
            return dict(unpack(cursor.value()))

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
                raise RepositoryError(f"snapshot directory {path} not empty")
            with env.begin() as txn:
                applied: int = unpack(_get(txn, META_APPLIED_INDEX, self._dbs["meta"]))
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
            self._require_env()
            temp = self.path / RESTORE_TEMP
            try:
                shutil.copyfile(source, temp)
                _fsync_path(temp)
            except OSError as exc:
                temp.unlink(missing_ok=True)
                raise _storage_error(f"restore from {source}", exc) from exc
            self._require_env().close()
            self._env = None
            try:
                os.replace(temp, self.path / DATA_FILE)
                _fsync_path(self.path)
            except OSError as exc:
                self._open()  # the rename did not happen: the old contents are still there
                raise _storage_error(f"restore from {source}", exc) from exc
            self._open()
        return applied


# --------------------------------------------------------------------------- helpers


def _make_private(path: Path) -> None:
    """The repository holds subscribers' names and addresses: the directory 0700 and its files
    0600, also when an older signer, a restore or a copy left them readable by others."""
    os.chmod(path, 0o700)
    for child in path.iterdir():
        if child.is_file() and child.stat().st_mode & 0o077:
            os.chmod(child, 0o600)


def _get(txn: lmdb.Transaction, key: bytes, db: Any) -> bytes:
    """A value that every repository has (the schema version, the applied index)."""
    raw = txn.get(key, db=db)
    if raw is None:
        raise RepositoryError(f"the repository has no {key.decode()}: run check_consistency")
    return bytes(raw)


def _revoked_entry(key: bytes | memoryview, raw: bytes | memoryview) -> RevokedEntry:
    seq, revoked_at, reason, invalidity_date, not_after, _request_id, crl_entry = unpack(raw)
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


def _storage_error(action: str, exc: BaseException) -> RepositoryError:
    if isinstance(exc, lmdb.MapFullError):
        detail = "the LMDB map is full: reopen the repository with a larger map_size"
        return RepositoryError(f"{action} failed: {detail}")
    return RepositoryError(f"{action} failed: {type(exc).__name__}: {exc}")


def _check_arg_issuer(issuer: Any) -> bytes:
    if not isinstance(issuer, bytes) or len(issuer) != ISSUER_SIZE:
        raise InvalidArgument("issuer must be 20 bytes")
    return issuer


def _check_arg_serial(serial: Any) -> int:
    if not isinstance(serial, int) or isinstance(serial, bool) or not 1 <= serial < SERIAL_LIMIT:
        raise InvalidArgument("serial must be an int in [1, 2**159)")
    return int(serial)


def _check_index(index: Any) -> int:
    if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index < INDEX_LIMIT:
        raise InvalidArgument("apply index must be an int in [1, 2**63)")
    return int(index)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _frame(data: bytes | memoryview) -> bytes:
    return len(data).to_bytes(8, "big") + bytes(data)


def _snapshot_applied_index(data_file: Path) -> int:
    """Open a snapshot read-only and check it is a repository this software can open."""
    if not data_file.is_file():
        raise RepositoryError(f"no snapshot at {data_file}")
    try:
        env = lmdb.open(
            str(data_file), subdir=False, readonly=True, lock=False, max_dbs=len(DB_NAMES) + 2
        )
    except lmdb.Error as exc:
        raise _storage_error(f"opening snapshot {data_file}", exc) from exc
    try:
        with env.begin() as txn:
            meta = env.open_db(b"meta", txn=txn, create=False)
            version = unpack(_get(txn, META_SCHEMA_VERSION, meta))
            applied = unpack(_get(txn, META_APPLIED_INDEX, meta))
    except (lmdb.Error, TypeError, ValueError, RepositoryError) as exc:
        raise _storage_error(f"reading snapshot {data_file}", exc) from exc
    finally:
        env.close()
    if not isinstance(version, int) or version > SCHEMA_VERSION or not isinstance(applied, int):
        raise RepositoryError(
            f"snapshot {data_file} has schema version {version!r}; this software supports "
            f"up to {SCHEMA_VERSION}"
        )
    return applied
