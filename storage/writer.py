"""One LMDB write transaction as the apply handlers see it (storage/apply.py, storage/crl.py)."""

from __future__ import annotations

from typing import Any

import lmdb

from storage.layout import Dbs, new_counters, pack, unpack


class Writer:
    """A write transaction plus the running applied index of a batch."""

    def __init__(self, txn: lmdb.Transaction, dbs: Dbs, applied: int):
        self.txn = txn
        self.dbs = dbs
        self.applied = applied
        self.dirty = False

    def get(self, db: str, key: bytes) -> Any:
        raw = self.txn.get(key, db=self.dbs[db])
        return None if raw is None else unpack(raw)

    def put(self, db: str, key: bytes, value: Any) -> None:
        self.txn.put(key, pack(value), db=self.dbs[db])

    def has(self, db: str, key: bytes) -> bool:
        return self.txn.get(key, db=self.dbs[db]) is not None

    def delete(self, db: str, key: bytes) -> None:
        self.txn.delete(key, db=self.dbs[db])

    def issuer_counters(self, issuer: bytes) -> dict[str, int]:
        counters: dict[str, int] = self.get("issuers", issuer) or new_counters()
        return counters

    def bump(self, issuer: bytes, counters: dict[str, int], **increments: int) -> None:
        updated = {k: v + increments.get(k, 0) for k, v in counters.items()}
        self.put("issuers", issuer, updated)
