"""The schema version of a repository, and the migrations that bring an older one up to date
(docs/repository.md §9). Migrations run inside the opening write transaction, so a crash
leaves the old version intact; they are deterministic, so every replica reaches the same digest.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lmdb

from storage.errors import RepositoryError
from storage.layout import (
    AUDIT_DB_NAMES,
    ISSUER_SIZE,
    META_APPLIED_INDEX,
    META_SCHEMA_VERSION,
    Dbs,
    crl_history_key,
    new_counters,
    pack,
    serial_int,
    unpack,
)

SCHEMA_VERSION = 4


def _migrate_0_to_1(txn: lmdb.Transaction, dbs: Dbs) -> None:
    """Version 0 (pre-release) had no `issuers` sub-database: rebuild the per-issuer counters."""
    txn.drop(dbs["issuers"], delete=False)
    counters: dict[bytes, dict[str, int]] = {}
    for key, raw in txn.cursor(dbs["certs"]):
        entry = counters.setdefault(bytes(key[:ISSUER_SIZE]), new_counters())
        entry["certificates"] += 1
        seq = unpack(raw)["revocation_seq"]
        if seq is not None:
            entry["revoked"] += 1
            entry["revocation_seq"] = max(entry["revocation_seq"], seq)
    for issuer in sorted(counters):
        txn.put(issuer, pack(counters[issuer]), db=dbs["issuers"])


def _migrate_1_to_2(txn: lmdb.Transaction, dbs: Dbs) -> None:
    """Version 2 adds imported history (other `certs` and `revoked` values, import records in
    `meta`, an imported `crl_history` record); nothing stored changes: the version only keeps a
    signer that does not know them from opening a store that has them."""


def _migrate_2_to_3(txn: lmdb.Transaction, dbs: Dbs) -> None:
    """Version 3 keeps no DER of a CRL published with history (`publish_crl` no longer carries
    it; it is rebuilt from the history): the `crls` value of such a CRL gets `der` nil. CRLs
    recorded without history (the ceremony's) keep theirs. Adds `raise_crl_number` floors."""
    changed = []
    for issuer, raw in txn.cursor(dbs["crls"]):
        latest = unpack(raw)
        key = crl_history_key(bytes(issuer), serial_int(latest["crl_number"]))
        history = txn.get(key, db=dbs["crl_history"])
        if history is not None and "imported" not in unpack(history) and latest["der"]:
            changed.append((bytes(issuer), {**latest, "der": None}))
    for issuer, latest in changed:
        txn.put(issuer, pack(latest), db=dbs["crls"])


def _migrate_3_to_4(txn: lmdb.Transaction, dbs: Dbs) -> None:
    """Version 4 adds the audit log (`audit`, `audit_nodes`, `audit_index`): it starts empty
    at the migration, with the first entry applied after it (docs/audit.md §7)."""
    for name in AUDIT_DB_NAMES:
        txn.drop(dbs[name], delete=False)


# MIGRATIONS[v] upgrades a store from version v to v + 1, inside the opening write transaction.
MIGRATIONS: dict[int, Callable[[lmdb.Transaction, Dbs], None]] = {
    0: _migrate_0_to_1,
    1: _migrate_1_to_2,
    2: _migrate_2_to_3,
    3: _migrate_3_to_4,
}


def _refuse(path: Path, message: str) -> RepositoryError:
    return RepositoryError(f"repository {path}: {message}")


def prepare_schema(path: Path, txn: lmdb.Transaction, dbs: Dbs) -> None:
    """Initialise an empty store, migrate an older one in order, refuse a newer or unknown one."""
    meta = dbs["meta"]
    raw = txn.get(META_SCHEMA_VERSION, db=meta)
    if raw is None:
        if any(txn.stat(db)["entries"] for db in dbs.values()):
            raise _refuse(path, "holds data but no schema version; refusing to guess its format")
        txn.put(META_SCHEMA_VERSION, pack(SCHEMA_VERSION), db=meta)
        txn.put(META_APPLIED_INDEX, pack(0), db=meta)
        return
    version = unpack(raw)
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
    txn.put(META_SCHEMA_VERSION, pack(SCHEMA_VERSION), db=meta)
