"""CRL encoding, shared by the signer and the client: header, assembly, parsing.

A revoked entry never changes, so its DER is encoded once at revocation (signer/pki/revocation.py);
a CRL is those entries concatenated in serial order inside a header written here byte by byte,
and signed over a locally computed digest (only the digest goes to the HSM). The signer
(signer/server/crl.py) assembles CRLs with these functions; the client
(signer/client/crl_refresh.py) rebuilds the same bytes from a delta and checks the signature.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signer.errors import ErrorCode, SignerError
from signer.pki.der import (
    der_generalized_time,
    der_header,
    der_integer,
    der_length,
    der_time,
    der_tlv,
)

# --------------------------------------------------------------------------- signatures

_RSA_OID = bytes.fromhex("2a864886f70d0101")  # 1.2.840.113549.1.1 (PKCS #1)
_ECDSA_OID = bytes.fromhex("2a8648ce3d0403")  # 1.2.840.10045.4.3 (ecdsa-with-SHA2)
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_CURVE_DIGESTS = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}


@dataclass(frozen=True)
class SignatureAlgorithm:
    """RSA PKCS#1 v1.5 or ECDSA with a SHA-2 digest, and its AlgorithmIdentifier DER."""

    family: str  # "rsa" or "ecdsa"
    digest_name: str
    der: bytes

    @property
    def hash(self) -> hashes.HashAlgorithm:
        return _HASHES[self.digest_name]()

    def digest(self, data: bytes | bytearray) -> bytes:
        return hashlib.new(self.digest_name, data).digest()

    def sign(self, key: Any, digest: bytes) -> bytes:
        """Sign a digest computed here: an HSM key gets 32 to 64 bytes, not the CRL."""
        prehashed = Prehashed(self.hash)
        if self.family == "rsa":
            signature: bytes = key.sign(digest, padding.PKCS1v15(), prehashed)
        else:
            signature = key.sign(digest, ec.ECDSA(prehashed))
        return signature

    def verify(self, public_key: Any, signature: bytes, digest: bytes) -> bool:
        prehashed = Prehashed(self.hash)
        try:
            if self.family == "rsa":
                public_key.verify(signature, digest, padding.PKCS1v15(), prehashed)
            else:
                public_key.verify(signature, digest, ec.ECDSA(prehashed))
        except (InvalidSignature, TypeError, ValueError):
            return False
        return True


def _algorithms() -> dict[bytes, SignatureAlgorithm]:
    table = {}
    for name, rsa_arc, ec_arc in (("sha256", 11, 2), ("sha384", 12, 3), ("sha512", 13, 4)):
        rsa_der = der_tlv(0x30, der_tlv(0x06, _RSA_OID + bytes((rsa_arc,))) + b"\x05\x00")
        ec_der = der_tlv(0x30, der_tlv(0x06, _ECDSA_OID + bytes((ec_arc,))))
        table[rsa_der] = SignatureAlgorithm("rsa", name, rsa_der)
        table[ec_der] = SignatureAlgorithm("ecdsa", name, ec_der)
    return table


SIGNATURE_ALGORITHMS = _algorithms()


def algorithm_for(public_key: Any) -> SignatureAlgorithm:
    """RSA keys sign with SHA-256; EC keys with the digest their curve pairs with (RFC 5480)."""
    if isinstance(public_key, rsa.RSAPublicKey):
        family, digest = "rsa", "sha256"
    elif isinstance(public_key, ec.EllipticCurvePublicKey) and public_key.curve.name in (
        _CURVE_DIGESTS
    ):
        family, digest = "ecdsa", _CURVE_DIGESTS[public_key.curve.name]
    else:
        raise SignerError(ErrorCode.CRL_UNAVAILABLE, "the issuer's key cannot sign CRLs here")
    return next(
        a for a in SIGNATURE_ALGORITHMS.values() if (a.family, a.digest_name) == (family, digest)
    )


# --------------------------------------------------------------------------- header and assembly


@dataclass(frozen=True)
class CrlIssuer:
    """What a CRL takes from its issuer's certificate (the signer and the client agree on it)."""

    name_der: bytes  # the certificate's subject, copied byte for byte
    key_id: bytes  # authorityKeyIdentifier: the certificate's subjectKeyIdentifier
    public_key: Any

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate) -> CrlIssuer:
        try:
            ski = certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            key_id = ski.value.digest
        except x509.ExtensionNotFound:
            key_id = x509.SubjectKeyIdentifier.from_public_key(certificate.public_key()).digest
        name = _subject_der(certificate.tbs_certificate_bytes)
        return cls(name, key_id, certificate.public_key())


def _subject_der(tbs: bytes) -> bytes:
    """The subject Name of a TBSCertificate, as encoded (version, serial, signature, issuer,
    validity come first)."""
    _, pos, _ = der_header(tbs, 0)
    if tbs[pos] == 0xA0:  # [0] version
        pos = der_header(tbs, pos)[2]
    for _ in range(4):  # serialNumber, signature, issuer, validity
        pos = der_header(tbs, pos)[2]
    return tbs[pos : der_header(tbs, pos)[2]]


@dataclass(frozen=True)
class CrlHeader:
    """The fields of a CRL besides its entries, its issuer and its signature."""

    crl_number: int
    this_update: int
    next_update: int
    expired_certs_on_crl: int | None  # ExpiredCertsOnCRL (2.5.29.60), when expired entries stay
    algorithm: SignatureAlgorithm


_VERSION_2 = der_integer(1)
_AKI_OID = der_tlv(0x06, bytes.fromhex("551d23"))
_CRL_NUMBER_OID = der_tlv(0x06, bytes.fromhex("551d14"))
_EXPIRED_CERTS_ON_CRL_OID = der_tlv(0x06, bytes.fromhex("551d3c"))


def _extensions(issuer: CrlIssuer, header: CrlHeader) -> bytes:
    """crlExtensions [0]: authorityKeyIdentifier, cRLNumber, expiredCertsOnCRL; non-critical."""
    aki = der_tlv(0x30, der_tlv(0x80, issuer.key_id))
    items = [
        der_tlv(0x30, _AKI_OID + der_tlv(0x04, aki)),
        der_tlv(0x30, _CRL_NUMBER_OID + der_tlv(0x04, der_integer(header.crl_number))),
    ]
    if header.expired_certs_on_crl is not None:
        value = der_generalized_time(header.expired_certs_on_crl)
        items.append(der_tlv(0x30, _EXPIRED_CERTS_ON_CRL_OID + der_tlv(0x04, value)))
    return der_tlv(0xA0, der_tlv(0x30, b"".join(items)))


def tbs_der(issuer: CrlIssuer, header: CrlHeader, entries: bytes | bytearray) -> bytes:
    """TBSCertList v2 around `entries` (concatenated revokedCertificates entries, serial order;
    the list is left out when empty, as RFC 5280 §5.1.2.6 requires). One copy of `entries`."""
    head = b"".join(
        (
            _VERSION_2,
            header.algorithm.der,
            issuer.name_der,
            der_time(header.this_update),
            der_time(header.next_update),
        )
    )
    listed = b"\x30" + der_length(len(entries)) if entries else b""
    tail = _extensions(issuer, header)
    size = len(head) + len(listed) + len(entries) + len(tail)
    return b"".join((b"\x30", der_length(size), head, listed, entries, tail))


def crl_der(tbs: bytes, algorithm: SignatureAlgorithm, signature: bytes) -> bytes:
    bits = b"\x03" + der_length(len(signature) + 1) + b"\x00"
    size = len(tbs) + len(algorithm.der) + len(bits) + len(signature)
    return b"".join((b"\x30", der_length(size), tbs, algorithm.der, bits, signature))


@dataclass
class ParsedCrl:
    """A DER CRL taken apart as far as a client rebuilding it needs (crl_refresh.py)."""

    crl_number: int | None
    entries: list[tuple[int, bytes]]  # (serial, entry DER) in the CRL's order


def parse_crl(der: bytes) -> ParsedCrl:
    """The CRL number and the entries of a DER CRL; ValueError if it is malformed."""
    data = memoryview(der)
    tag, pos, end = der_header(data, 0)
    if tag != 0x30 or end != len(data) or data[pos] != 0x30:
        raise ValueError("not a DER CertificateList")
    _, body, tbs_end = der_header(data, pos)
    if data[body] == 0x02:  # version
        body = der_header(data, body)[2]
    for _ in range(3):  # signature, issuer, thisUpdate
        body = der_header(data, body)[2]
    if body < tbs_end and data[body] in (0x17, 0x18):  # nextUpdate
        body = der_header(data, body)[2]
    entries: list[tuple[int, bytes]] = []
    if body < tbs_end and data[body] == 0x30:
        _, cursor, listed_end = der_header(data, body)
        entries = _parse_entries(data, cursor, listed_end)
        body = listed_end
    number = _crl_number(data, body, tbs_end) if body < tbs_end else None
    return ParsedCrl(number, entries)


def _parse_entries(data: memoryview, cursor: int, end: int) -> list[tuple[int, bytes]]:
    entries = []
    while cursor < end:
        _, start, entry_end = der_header(data, cursor)
        _, serial_start, serial_end = der_header(data, start)
        serial = int.from_bytes(data[serial_start:serial_end], "big", signed=True)
        entries.append((serial, bytes(data[cursor:entry_end])))
        cursor = entry_end
    return entries


def _crl_number(data: memoryview, pos: int, end: int) -> int | None:
    tag, pos, _ = der_header(data, pos)
    if tag != 0xA0:
        return None
    _, cursor, extensions_end = der_header(data, pos)
    while cursor < min(extensions_end, end):
        _, start, item_end = der_header(data, cursor)
        oid_end = der_header(data, start)[2]
        if bytes(data[start:oid_end]) == _CRL_NUMBER_OID:
            value_pos = oid_end
            if data[value_pos] == 0x01:  # critical BOOLEAN
                value_pos = der_header(data, value_pos)[2]
            _, octets, _ = der_header(data, value_pos)
            _, number_start, number_end = der_header(data, octets)
            return int.from_bytes(data[number_start:number_end], "big", signed=True)
        cursor = item_end
    return None
