"""A certificate and a CRL built from fixed inputs, pinned to their SHA-256.

RSA PKCS#1 v1.5 signatures are deterministic, so with the fixed keys in `vectors/`, a fixed
profile, fixed times and a fixed serial, issuance and CRL assembly must give the same bytes on
every machine and every release. A change of any encoded byte (an extension's order, a time
format, a CRL header field) fails here first; if the change is intended, the new digest is
written down together with the reason in the commit.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from signer.pki.crl import CrlHeader, CrlIssuer, algorithm_for, crl_der, tbs_der
from signer.pki.profiles import parse_profiles
from signer.pki.revocation import crl_entry
from signer.pki.x509_signing import IssuanceRequest, build_certificate, plan_certificate

VECTORS = Path(__file__).with_name("vectors")
NOW = datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)
PROFILES = """
version: 1
issuers:
  class3:
    crl_urls: [http://crl.example.org/class3.crl]
    ocsp_urls: [http://ocsp.example.org/]
    ca_issuers_urls: [http://www.example.org/class3.der]
profiles:
  server:
    kind: other
    description: a fixed TLS server profile for the byte vectors
    issuer: class3
    subject:
      attributes:
        CN: {}
      cn_sources: [san]
    sans:
      allowed:
        dns: {max_count: 10}
      max_total: 10
      required: true
    validity: {default_days: 90, max_days: 90}
    digests: [sha256]
    key_usage: {rsa: [digitalSignature, keyEncipherment], ec: [digitalSignature]}
    extended_key_usage: {usages: [serverAuth]}
    policies:
      - {oid: 1.3.6.1.4.1.18506.4.4}
"""
CERTIFICATE_SHA256 = "512da8d4ef61963f7f90accaeb9a3ec81a179ebe1f9f5906f4170b25ffeb0816"
CRL_SHA256 = "62bd89ddce4c8da1474cf6945042e1de2683d48a6076be6c2882baf538d85b38"


def _key(name: str) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key((VECTORS / f"{name}-rsa2048.pem").read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _issuer() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = _key("issuer")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Vector Class 3")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(datetime(2026, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2036, 1, 1, tzinfo=UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def _csr() -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.org")])
    )
    return builder.sign(_key("subject"), hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_a_certificate_from_fixed_inputs_has_fixed_bytes() -> None:
    issuer_key, issuer = _issuer()
    profile = parse_profiles(PROFILES).profiles["server"]
    request = IssuanceRequest(csr=_csr(), profile="server", sans=[("dns", "www.example.org")])
    plan = plan_certificate(request, profile, issuer, NOW)
    der = build_certificate(plan, 0x4F3A_91C2_0D6B_77E1, issuer_key, issuer)
    certificate = x509.load_der_x509_certificate(der)
    assert certificate.serial_number == 0x4F3A_91C2_0D6B_77E1
    assert hashlib.sha256(der).hexdigest() == CERTIFICATE_SHA256


def test_a_crl_from_fixed_inputs_has_fixed_bytes() -> None:
    issuer_key, issuer_certificate = _issuer()
    issuer = CrlIssuer.from_certificate(issuer_certificate)
    entries = b"".join(
        crl_entry(serial, datetime(2026, 11, day, 8, 30, tzinfo=UTC), reason, None)
        for serial, day, reason in ((0x1001, 2, 1), (0x2002, 3, None), (0x3003, 4, 4))
    )
    algorithm = algorithm_for(issuer.public_key)
    header = CrlHeader(7, int(NOW.timestamp()), int(NOW.timestamp()) + 7 * 86400, None, algorithm)
    tbs = tbs_der(issuer, header, entries)
    der = crl_der(tbs, algorithm, algorithm.sign(issuer_key, algorithm.digest(tbs)))
    crl = x509.load_der_x509_crl(der)
    assert crl.is_signature_valid(issuer_certificate.public_key())
    assert [r.serial_number for r in crl] == [0x1001, 0x2002, 0x3003]
    assert hashlib.sha256(der).hexdigest() == CRL_SHA256
