"""The audit log as anyone outside reads it (docs/audit.md): records, signed tree heads, the
log file. Pure code shared by the signer, the WebDB client and `signer audit verify`.

A record is one msgpack map written by the repository when it applies a log entry
(storage/audit.py); the tree hashes its bytes as they are, so nothing here re-encodes one. A
tree head is signed over `tree_head_message`: a fixed binary form, no encoding to agree on.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from signer.pki.merkle import EMPTY_ROOT, HASH_SIZE, Frontier, ProofError, leaf_hash

# The audit key's certificate carries this extended key usage, and no other key signs tree heads.
# An arc under CAcert's own enterprise number (1.3.6.1.4.1.18506: CAcert Inc.): .1 signer,
# .1.1 audit log tree head signing (docs/audit.md §4).
AUDIT_EKU_OID = x509.ObjectIdentifier("1.3.6.1.4.1.18506.1.1")
TREE_HEAD_CONTEXT = b"cacert-signer audit tree head v1\x00"
SIGNATURE_ALGORITHMS = ("rsa-pkcs1-sha256", "ecdsa-sha256")
MAX_RECORD_BYTES = 16 * 1024  # a record is far smaller: a log file frame above it is refused
FRAME_HEADER = 4


class AuditFormatError(ValueError):
    """A log file, record or tree head that is not in the documented form."""


def tree_head_message(size: int, timestamp: int, root: bytes) -> bytes:
    """What the audit key signs: context || size (8, big-endian) || timestamp (8) || root (32)."""
    return TREE_HEAD_CONTEXT + size.to_bytes(8, "big") + timestamp.to_bytes(8, "big") + root


@dataclass(frozen=True)
class TreeHead:
    """A signed tree head: the tree of `size` records has `root`, said the audit key at
    `timestamp` (Unix seconds UTC)."""

    size: int
    timestamp: int
    root: bytes
    algorithm: str
    signature: bytes

    def message(self) -> bytes:
        return tree_head_message(self.size, self.timestamp, self.root)

    def to_json(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "timestamp": self.timestamp,
            "root": self.root.hex(),
            "algorithm": self.algorithm,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }

    @classmethod
    def from_json(cls, data: Any) -> TreeHead:
        """The head of a head file (JSON, docs/audit.md §5); raises AuditFormatError."""
        try:
            head = cls(
                size=_count(data["size"]),
                timestamp=_count(data["timestamp"]),
                root=bytes.fromhex(data["root"]),
                algorithm=str(data["algorithm"]),
                signature=base64.b64decode(data["signature"], validate=True),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise AuditFormatError(f"not a tree head: {exc}") from None
        head.check_form()
        return head

    def check_form(self) -> None:
        if len(self.root) != HASH_SIZE or self.algorithm not in SIGNATURE_ALGORITHMS:
            raise AuditFormatError("a tree head needs a 32-byte root and a known algorithm")
        if not self.signature or self.size >= 2**63 or self.timestamp >= 2**63:
            raise AuditFormatError("a tree head needs a signature, size and time in range")


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError("sizes and times are ints >= 0")
    return value


def head_from_wire(data: Any) -> TreeHead:
    """A tree head as the line carries it (a map of bytes and ints)."""
    try:
        head = TreeHead(
            _count(data["size"]),
            _count(data["timestamp"]),
            bytes(data["root"]),
            str(data["algorithm"]),
            bytes(data["signature"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise AuditFormatError(f"not a tree head: {exc}") from None
    head.check_form()
    return head


def check_audit_certificate(cert: x509.Certificate) -> None:
    """The certificate is an audit key's (our EKU); raises AuditFormatError otherwise."""
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise AuditFormatError("the certificate has no extended key usage") from None
    if AUDIT_EKU_OID not in usages:
        raise AuditFormatError(f"the certificate is not for audit tree heads ({AUDIT_EKU_OID})")


def verify_tree_head(head: TreeHead, cert: x509.Certificate) -> None:
    """Raises ProofError unless the audit key of `cert` signed `head`."""
    check_audit_certificate(cert)
    key = cert.public_key()
    try:
        if head.algorithm == "rsa-pkcs1-sha256" and isinstance(key, rsa.RSAPublicKey):
            key.verify(head.signature, head.message(), padding.PKCS1v15(), hashes.SHA256())
        elif head.algorithm == "ecdsa-sha256" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(head.signature, head.message(), ec.ECDSA(hashes.SHA256()))
        else:
            raise ProofError(f"a {head.algorithm} head cannot come from this certificate's key")
    except InvalidSignature:
        raise ProofError(f"the tree head of size {head.size} is not signed by this key") from None


def algorithm_for(key: Any) -> str:
    return "rsa-pkcs1-sha256" if isinstance(key, rsa.RSAPublicKey) else "ecdsa-sha256"


# --------------------------------------------------------------------------- records


def decode_record(record: bytes) -> dict[str, Any]:
    """A record's fields (a msgpack map with str keys); raises AuditFormatError."""
    try:
        fields = msgpack.unpackb(record, raw=False)
    except Exception:
        raise AuditFormatError("a record is not one msgpack value") from None
    if not isinstance(fields, dict) or not all(isinstance(k, str) for k in fields):
        raise AuditFormatError("a record is a map with str keys")
    if fields.get("v") != 1 or not isinstance(fields.get("event"), str):
        raise AuditFormatError("a record starts with v = 1 and names its event")
    return fields


def frame(record: bytes) -> bytes:
    """A record in a log file: its length (4 bytes, big-endian) then its bytes."""
    return len(record).to_bytes(FRAME_HEADER, "big") + record


def iter_frames(data: bytes | memoryview, final: bool = True) -> Iterator[bytes | int]:
    """The records of a log file's bytes; with final=False the last item may be an int, the
    offset of an incomplete frame left for the next chunk. Raises AuditFormatError."""
    view, at = memoryview(data), 0
    while at < len(view):
        if len(view) - at < FRAME_HEADER:
            break
        size = int.from_bytes(view[at : at + FRAME_HEADER], "big")
        if not 0 < size <= MAX_RECORD_BYTES:
            raise AuditFormatError(f"a frame of {size} bytes at offset {at}")
        if len(view) - at - FRAME_HEADER < size:
            break
        yield bytes(view[at + FRAME_HEADER : at + FRAME_HEADER + size])
        at += FRAME_HEADER + size
    if at < len(view):
        if final:
            raise AuditFormatError(f"the log file ends inside a frame at offset {at}")
        yield at


def head_file(head: TreeHead) -> str:
    return json.dumps(head.to_json(), indent=1) + "\n"


@dataclass(frozen=True)
class Verification:
    """What `verify_log` found: the file holds `records`, the first `head_size` of which make
    exactly the signed tree; `events` counts them by event."""

    records: int
    head_size: int
    root: bytes
    events: dict[str, int]


def verify_log(
    chunks: Iterable[bytes], head: TreeHead, cert: x509.Certificate, decode: bool = True
) -> Verification:
    """Check a whole log file (its bytes, in chunks) against a signed tree head: the head's
    signature by the audit certificate's key, every frame, and the root of the first
    `head.size` records. Raises ProofError (or AuditFormatError) at the first problem."""
    verify_tree_head(head, cert)
    frontier, rest, events = Frontier(), b"", Counter[str]()
    matched = head.size == 0 and head.root == EMPTY_ROOT
    for chunk in chunks:
        data = rest + chunk if rest else chunk
        rest = b""
        for item in iter_frames(data, final=False):
            if isinstance(item, int):
                rest = bytes(data[item:])
                break
            if decode:
                events[str(decode_record(item)["event"])] += 1
            frontier.append(leaf_hash(item))
            if frontier.size == head.size:
                if frontier.root() != head.root:
                    raise ProofError(
                        f"the first {head.size} records do not make the signed root: "
                        "a record was changed, removed, added or moved"
                    )
                matched = True
    if rest:
        raise AuditFormatError("the log file ends inside a frame")
    if not matched:
        raise ProofError(
            f"the file holds {frontier.size} records, the signed tree {head.size}: "
            "records were removed"
        )
    return Verification(frontier.size, head.size, head.root, dict(events))
