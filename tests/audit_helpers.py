"""An audit key in software and a signer's audit log without a line: what the audit tests
share (the HSM's audit key is exercised end to end in tests/test_audit.py)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from replication.log import LocalLog
from signer.pki import merkle
from signer.pki.audit import AUDIT_EKU_OID, TreeHead, frame, tree_head_message
from signer.server.audit import AuditService
from signer.server.config import AuditConfig
from signer.wire.protocol import FetchAuditArgs, dump_result
from storage import IssueX509, RecordTreeHead, Repository

ISSUER = bytes(range(20))
NOW = 1_765_000_000


def certificate(key: Any, issuer_key: Any, cn: str, eku: list[x509.ObjectIdentifier]) -> Any:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test CA")]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=3650))
        .add_extension(x509.ExtendedKeyUsage(eku), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


class AuditKey:
    """A software audit key and its certificate (the audit EKU), or another key's."""

    def __init__(self, eku: x509.ObjectIdentifier = AUDIT_EKU_OID):
        ca = ec.generate_private_key(ec.SECP256R1())
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = certificate(self.key, ca, "audit", [eku])

    def write(self, path: Path) -> Path:
        path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        return path

    def head(self, size: int, root: bytes, timestamp: int = NOW) -> TreeHead:
        message = tree_head_message(size, timestamp, root)
        signature = self.key.sign(message, ec.ECDSA(hashes.SHA256()))
        return TreeHead(size, timestamp, root, "ecdsa-sha256", signature)


def issue(n: int, der: bytes | None = None) -> IssueX509:
    return IssueX509(
        f"issue-{n}", b"d" * 32, ISSUER, n, der or b"\x30cert%d" % n, "server", NOW, NOW + 9, NOW
    )


class AuditLog:
    """A repository whose audit log grows by issuance, and heads signed by a software key."""

    def __init__(self, path: Path, key: AuditKey):
        self.repo = Repository(path)
        self.key = key
        self.service = AuditService(self.repo, LocalLog(self.repo), None, AuditConfig())
        self.serial = 0
        self.tamper: Any = None  # records -> records, for a signer that serves other bytes

    def grow(self, count: int) -> None:
        for _ in range(count):
            self.serial += 1
            self.repo.apply(self.repo.last_applied_index() + 1, issue(self.serial))

    def sign(self, timestamp: int = NOW) -> TreeHead:
        with self.repo.audit_tree() as (size, perfect):
            head = self.key.head(size, merkle.root(perfect, size), timestamp)
        command = RecordTreeHead(
            head.size, head.timestamp, head.root, head.algorithm, head.signature
        )
        self.repo.apply(self.repo.last_applied_index() + 1, command)
        return head

    async def call(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        assert name == "fetch_audit"
        answer = dump_result(self.service._fetch(FetchAuditArgs(**(args or {}))))
        if self.tamper is not None:
            answer["records"] = self.tamper(answer["records"])
        return answer

    def records(self) -> list[bytes]:
        return self.repo.audit_records(0, 1 << 30)

    def file(self, path: Path, records: list[bytes] | None = None) -> Path:
        path.write_bytes(
            b"".join(frame(r) for r in (self.records() if records is None else records))
        )
        return path
