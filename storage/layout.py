"""The LMDB layout of docs/repository.md §3: sub-databases, key builders and value encoding.

Every stored value is msgpack (`bin` for bytes); every key is built here, so the byte order of
LMDB is the order the reads need (big-endian integers sort numerically).
"""

from __future__ import annotations

from typing import Any

import msgpack

ISSUER_SIZE = 20
SERIAL_SIZE = 20
SEQ_SIZE = 8

# Sub-databases, in the order content_digest and check_consistency walk them (sorted by name).
DB_NAMES = (
    "audit",
    "audit_index",
    "audit_nodes",
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
AUDIT_DB_NAMES = ("audit", "audit_index", "audit_nodes")  # the audit log (storage/audit.py)
STATE_DB_NAMES = tuple(name for name in DB_NAMES if name not in AUDIT_DB_NAMES)
META_SCHEMA_VERSION = b"schema_version"
META_APPLIED_INDEX = b"applied_index"
RESERVED_META = frozenset({META_SCHEMA_VERSION.decode(), META_APPLIED_INDEX.decode()})
IMPORT_META_PREFIX = "import:"  # meta names of the imports, one per issuer (storage/imports.py)
CRL_FLOOR_META_PREFIX = "crl-floor:"  # an issuer's lowest next CRL number (raise_crl_number)
OWN_META_PREFIXES = (IMPORT_META_PREFIX, CRL_FLOOR_META_PREFIX)
DATA_FILE = "data.mdb"
RESTORE_TEMP = "data.mdb.restoring"

Dbs = dict[str, Any]  # sub-database name -> LMDB handle


def pack(obj: Any) -> bytes:
    """msgpack with the wire conventions (bin for bytes); maps keep the insertion order we build."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(data: bytes | memoryview) -> Any:
    return msgpack.unpackb(data, raw=False)


def serial_bytes(serial: int) -> bytes:
    """A serial (or CRL number) as 20 big-endian bytes, so LMDB's byte order is serial order."""
    return serial.to_bytes(SERIAL_SIZE, "big")


def serial_int(data: bytes | memoryview) -> int:
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


def crl_floor_key(issuer: bytes) -> bytes:
    """The `meta` key of an issuer's CRL number floor (`crl-floor:` + the key id in hex)."""
    return CRL_FLOOR_META_PREFIX.encode() + issuer.hex().encode()


def import_meta_key(issuer: bytes) -> bytes:
    """Key in `meta` of an issuer's import: `import:` || the issuer's key id in hex."""
    return IMPORT_META_PREFIX.encode() + issuer.hex().encode()


def new_counters() -> dict[str, int]:
    """An issuer's `issuers` value before its first certificate (this key order is stored)."""
    return {"certificates": 0, "revoked": 0, "revocation_seq": 0}


def audit_key(seq: int) -> bytes:
    """Key of `audit`: the record's position in the tree (8, big-endian), from 0."""
    return seq.to_bytes(SEQ_SIZE, "big")


def audit_node_key(level: int, index: int) -> bytes:
    """Key of `audit_nodes`: level (1) || index (8, big-endian) of a perfect subtree."""
    return bytes([level]) + index.to_bytes(SEQ_SIZE, "big")


def audit_cert_key(issuer: bytes, serial: int) -> bytes:
    """Key in `audit_index` of a certificate's issuance record: b"c" || issuer || serial."""
    return b"c" + cert_key(issuer, serial)


def audit_operator_key(key: str) -> bytes:
    """Key in `audit_index` of the last operator record naming `key`: b"o" || key (UTF-8)."""
    return b"o" + key.encode("utf-8")


def audit_head_key(size: int) -> bytes:
    """Key in `audit_index` of the signed tree head of `size` records: b"h" || size (8)."""
    return b"h" + size.to_bytes(SEQ_SIZE, "big")
