"""Throwaway CAs, CSRs and SPKACs for the X.509 tests (software keys only)."""

from __future__ import annotations

import base64
import datetime as dt
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

from signer.pki.profiles import SUBJECT_ATTRIBUTES


@dataclass(frozen=True)
class TestCA:
    __test__ = False  # not a pytest test class

    key: Any
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _ca_name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "AU"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Test CAcert Inc."),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(
    cn: str,
    key: Any,
    parent: TestCA | None = None,
    path_length: int | None = None,
    days: int = 3650 * 3,
) -> TestCA:
    """A root (parent None) or subordinate CA certificate, RFC 5280 shaped."""
    now = dt.datetime.now(dt.UTC)
    name = _ca_name(cn)
    issuer_name = parent.cert.subject if parent else name
    signing_key = parent.key if parent else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if parent is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(parent.key.public_key()),
            critical=False,
        )
    algorithm: hashes.HashAlgorithm = hashes.SHA256()
    if isinstance(signing_key, ec.EllipticCurvePrivateKey) and signing_key.curve.key_size > 256:
        algorithm = hashes.SHA384()
    return TestCA(key, builder.sign(signing_key, algorithm))


def name_of(pairs: list[tuple[str, str]]) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(x509.ObjectIdentifier(SUBJECT_ATTRIBUTES[k][0]), v) for k, v in pairs]
    )


def make_csr(
    key: Any,
    subject: list[tuple[str, str]] | x509.Name | None = None,
    sans: list[x509.GeneralName] | None = None,
    digest: hashes.HashAlgorithm | None = None,
    pem: bool = False,
) -> bytes:
    """A PKCS#10 request signed by `key` (DER unless pem)."""
    if not isinstance(subject, x509.Name):
        subject = name_of(subject or [("CN", "Test")])
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        csr = builder.sign(key, None)
    else:
        csr = builder.sign(key, digest or hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)


def key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_spkac(
    key: Any, tmp: Path, challenge: str = "x", extra: str = "", digest: str | None = None
) -> bytes:
    """`openssl spkac -key k.pem -challenge x` output (SPKAC=<base64> text, MD5 by default)."""
    path = tmp / f"spkac-{id(key)}.pem"
    path.write_bytes(key_pem(key))
    args = ["openssl", "spkac", "-key", str(path), "-challenge", challenge]
    out = subprocess.run(
        [*args, "-digest", digest] if digest else args,
        check=True,
        capture_output=True,
    ).stdout
    return extra.encode() + out


def spkac_der(text: bytes) -> bytes:
    line = next(x for x in text.splitlines() if x.startswith(b"SPKAC="))
    return base64.b64decode(line[len(b"SPKAC=") :])


def openssl_verify(tmp: Path, root: TestCA, sub: TestCA, leaf_der: bytes) -> tuple[int, str]:
    """`openssl verify -CAfile root.pem -untrusted sub.pem leaf.pem`: (returncode, output)."""
    (tmp / "root.pem").write_bytes(root.pem)
    (tmp / "sub.pem").write_bytes(sub.pem)
    leaf = x509.load_der_x509_certificate(leaf_der)
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    proc = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp / "root.pem"),
            "-untrusted",
            str(tmp / "sub.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stdout + proc.stderr


def rsa_key(bits: int = 2048, exponent: int = 65537) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=exponent, key_size=bits)
