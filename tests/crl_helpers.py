"""Shared pieces of the CRL tests: a CRL service on a SoftHSM2 key with a real repository, a
real log and a clock the test moves; openssl and pkilint as outside checkers."""

from __future__ import annotations

import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import ceremony_ca
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from replication.log import LocalLog
from signer.pki.revocation import crl_entry
from signer.server.ca import Issuer
from signer.server.config import CrlConfig
from signer.server.crl import CrlService
from signer.server.dispatch import RequestContext
from signer.server.hsm import Hsm
from signer.wire.framing import pack_message, unpack_message
from signer.wire.protocol import FetchCrlArgs, dump_result
from storage import Issued, IssueX509, Repository, Result, Revoked, RevokeX509, encode

ROOT = Path(__file__).resolve().parent.parent
BAUD = 921600
START = dt.datetime(2026, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)


def ca_certificate(key: Any, name: str = "CRL Test CA") -> x509.Certificate:
    """A self-signed CA certificate for `key` (an HSM key works: it signs through the HSM)."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test CA"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    public = key.public_key()
    digest = hashes.SHA384() if getattr(key, "key_size", 0) == 384 else hashes.SHA256()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(0x1234567)
        .not_valid_before(START - 400 * DAY)
        .not_valid_after(START + 3650 * DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, digest)
    )


class CrlHarness:
    """A CrlService for one issuer whose key lives in SoftHSM2; the clock is `self.now`."""

    def __init__(self, path: Path, hsm: Hsm, label: str, **config: Any):
        self.hsm = hsm
        self.certificate = ca_certificate(hsm.key(label))
        key_id = x509.SubjectKeyIdentifier.from_public_key(self.certificate.public_key()).digest
        self.issuer = Issuer("test", self.certificate, label, key_id)
        self.repository = Repository(path / "repo")
        self.log: LocalLog[Result] = LocalLog(self.repository)
        self.now = START
        self.config = CrlConfig(**config)
        self.service = self.new_service()
        self._serials = 0

    def new_service(self) -> CrlService:
        """A service as a restarted signer would make it (nothing in memory)."""
        return CrlService(
            [self.issuer], self.hsm, self.repository, self.log, self.config, lambda: self.now
        )

    @property
    def key_id(self) -> bytes:
        return self.issuer.key_id

    def close(self) -> None:
        self.log.close()
        self.repository.close()

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta

    async def revoke(
        self,
        valid_for: dt.timedelta = 365 * DAY,
        reason: int | None = 1,
        serial: int | None = None,
        invalidity: dt.datetime | None = None,
    ) -> int:
        """Issue a certificate valid from now for `valid_for` and revoke it now: its serial."""
        self._serials += 1
        serial = serial or (self._serials * 0x9E3779B97F4A7C15) % 2**127 + 2**64
        now = int(self.now.timestamp())
        not_after = now + int(valid_for.total_seconds())
        issued = await self.log.commit(
            encode(
                IssueX509(
                    request_id=f"issue-{serial:x}",
                    request_digest=b"d",
                    issuer=self.key_id,
                    serial=serial,
                    der=b"not a real certificate",
                    profile="test",
                    not_before=min(now, not_after) - 60,
                    not_after=not_after,
                    issued_at=now,
                )
            )
        )
        assert isinstance(issued, Issued), issued
        revoked = await self.log.commit(
            encode(
                RevokeX509(
                    request_id=f"revoke-{serial:x}",
                    request_digest=b"d",
                    issuer=self.key_id,
                    serial=serial,
                    reason=reason,
                    revoked_at=now,
                    invalidity_date=None if invalidity is None else int(invalidity.timestamp()),
                    crl_entry=crl_entry(serial, self.now, reason, invalidity),
                )
            )
        )
        assert isinstance(revoked, Revoked), revoked
        return serial

    async def call(self, command: str, args: dict[str, Any]) -> dict[str, Any]:
        """fetch_crl as a client sees it: arguments checked, the answer through msgpack."""
        assert command == "fetch_crl"
        parsed = FetchCrlArgs.model_validate(args)
        result = await self.service.fetch_crl(parsed, RequestContext("t", command, b""))
        return unpack_message(pack_message(dump_result(result)))


def write_pem_crl(der: bytes, path: Path) -> Path:
    crl = x509.load_der_x509_crl(der)
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


def openssl_crl_verify(der: bytes, ca_pem: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    crl = tmp / "check.crl.der"
    crl.write_bytes(der)
    return subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-in", str(crl), "-CAfile", str(ca_pem), "-noout"],
        capture_output=True,
        text=True,
    )


def pkilint_crl(der: bytes, profile: str = "PKIX") -> list[str]:
    """pkilint's CRL lint (RFC 5280, or the CA/B Forum BR profile): findings of any severity."""
    from pkilint import loader, pkix
    from pkilint.cabf import cabf_crl
    from pkilint.pkix import crl, extension, name

    kind = crl.CertificateRevocationListType.CRL
    validity, extra = [], []
    if profile == "BR":
        extra.append(cabf_crl.CabfCrlReasonCodeAllowlistValidator(kind))
        validity.append(cabf_crl.create_validity_period_validator(kind))
    validator = crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            crl.create_issuer_validator_container([]),
            crl.create_validity_validator_container(validity),
            crl.create_extensions_validator_container([]),
            *extra,
        ],
    )
    document = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, "crl")
    results = validator.validate(document.root)
    return [
        f"{d.finding.severity} {d.finding.code} at {r.node.path}"
        for r in results
        for d in r.finding_descriptions
    ]


def listed(der: bytes) -> set[int]:
    return {entry.serial_number for entry in x509.load_der_x509_crl(der)}


# ------------------------------------------------------------------ a CA made by the ceremony


def make_ceremony_ca(token: Any, base: Path) -> tuple[Path, Any]:
    """The CA of tests/test_x509_issuance.py, by the ceremony: RSA-2048 class 1 root, P-256
    class 3 on a SoftHSM2 token; returns (directory, token)."""
    return ceremony_ca.make_ceremony_ca(token, base), token


def signer_config(ceremony_ca, device: Path, repository: Path, **crl) -> Path:
    base, token = ceremony_ca
    text = {
        "link": {"device": str(device), "baudrate": BAUD, "reopen_interval": 0.1},
        "repository": {"path": str(repository)},
        "hsm": {
            "module": token.store.module,
            "token_label": token.label,
            "pin_file": str(token.pin_file),
        },
        "profiles": "cacert",
        "issuers": {
            name: {"certificate": str(base / "ca" / f"{name}.crt"), "key": key}
            for name, key in (("class1", "root"), ("class3", "class3"))
        },
        "crl": {"poll_seconds": 0.2, "min_interval_seconds": 0, **crl},
        "audit": {"key": "audit", "certificate": str(base / "ca" / "audit.crt")},
    }
    path = repository.parent / "signer.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


def csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    request = (
        x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.DER)
