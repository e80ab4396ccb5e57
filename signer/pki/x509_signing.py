"""The pure X.509 issuance core: validate a request against a profile, then sign.

Split in two so that the expensive and risky parts are separate: `plan_certificate` checks
everything that comes from the outside (CSR or SPKAC, subject, SANs, validity, digest) and decides
every field except the serial; `build_certificate` only assembles and signs. Both are synchronous
and side-effect free (apart from the key's sign()), so the async handler can pick the serial,
retry on a collision and run the signature in the HSM's worker thread.

Every refusal is a SignerError with a specific code; inputs come from the WebDB over the serial
line and must never crash the signer (the old signer's worst failure mode).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import hmac
import ipaddress
import math
import re
import secrets
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509.oid import AttributeOID, ExtensionOID, ObjectIdentifier

from signer.errors import ErrorCode, SignerError
from signer.pki.der import der_header
from signer.pki.profiles import (
    EKU_NAMES,
    SUBJECT_ATTRIBUTES,
    Channel,
    Profile,
    check_channel,
    short_attribute_name,
)
from signer.pki.suffixes import PublicSuffixes, shipped

# Bounds applied before any parsing, so hostile input costs nothing.
MAX_CSR_BYTES = 64 * 1024
MAX_REQUEST_SANS = 1000
MAX_REQUEST_SUBJECT_ATTRIBUTES = 64
MAX_SAN_VALUE_LENGTH = 2048

SERIAL_RANDOM_BITS = 127
SAN_TYPES: tuple[str, ...] = ("dns", "email", "ip", "uri", "xmpp")
ID_ON_XMPPADDR = ObjectIdentifier("1.3.6.1.5.5.7.8.5")
ID_PKIX_OCSP_NOCHECK = ObjectIdentifier("1.3.6.1.5.5.7.48.1.5")

SignatureHash = hashes.SHA256 | hashes.SHA384 | hashes.SHA512
_HASHES: dict[str, SignatureHash] = {
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}
_BROKEN_DIGESTS = frozenset({"md2", "md4", "md5", "sha1", "sha"})
_CURVES = {"secp256r1": "p256", "secp384r1": "p384", "secp521r1": "p521"}
_OID_TO_SHORT = {oid: short for short, (oid, _) in SUBJECT_ATTRIBUTES.items()}
_SHORT_TO_OID = {short: ObjectIdentifier(oid) for short, (oid, _) in SUBJECT_ATTRIBUTES.items()}
# CA/B Forum TLS BR 7.1.4.2 attribute order; attributes not listed keep their order at the end.
_CANONICAL_ORDER = {
    name: i
    for i, name in enumerate(["DC", "C", "ST", "L", "postalCode", "street", "O", "SN", "GN", "OU"])
}
_CANONICAL_ORDER["CN"] = 100
_SUPPORTED_SPKI_OIDS = frozenset(
    {
        "1.2.840.113549.1.1.1",  # rsaEncryption
        "1.2.840.10045.2.1",  # id-ecPublicKey
        "1.3.101.112",  # Ed25519
        "1.3.101.113",  # Ed448
    }
)
_SMALL_PRIMES_PRODUCT = math.prod(
    p for p in range(2, 752) if all(p % q for q in range(2, math.isqrt(p) + 1))
)

_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_EMAIL_LOCAL_RE = re.compile(
    r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*$"
)
_PRINTABLE_RE = re.compile(r"^[A-Za-z0-9 '()+,\-./:=?]+$")
_COUNTRY_RE = re.compile(r"^[A-Z]{2}$")
_ORG_ID_RE = re.compile(r"^[A-Z]{3}[A-Z]{2}(?:\+[A-Z0-9]{1,3})?(?:-\S.*)?$")
_ASCII_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_HTML_ENTITY_RE = re.compile(r"&(?:[A-Za-z][A-Za-z0-9]*|#[0-9]+|#[xX][0-9A-Fa-f]+);")
_PEM_BEGIN_RE = re.compile(rb"-----BEGIN ((?:NEW )?)CERTIFICATE REQUEST-----")
_SPKAC_LINE_RE = re.compile(rb"(?m)^[ \t]*SPKAC[ \t]*=")
_IP_CHARS_RE = re.compile(r"^[0-9A-Fa-f.:]+$")
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]+$")
_XMPP_LOCAL_FORBIDDEN = frozenset("\"&'/:<>@")
# Invisible characters that make a name display differently from what it is (Trojan Source).
_FORBIDDEN_FORMAT_CHARS = frozenset(
    [
        *(0x200B, 0x200E, 0x200F, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF),
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    ]
)


@dataclass(frozen=True)
class IssuanceRequest:
    """What the WebDB asks for; every field is untrusted input.

    csr: PKCS#10 (DER or PEM) or SPKAC (text `SPKAC=<base64>`, optionally with other
    `key=value` lines, or DER). subject: ordered (short name, value) pairs, one per RDN, or None
    for the CSR's subject. sans: (type, value) pairs with type dns/email/ip/uri/xmpp, or None
    (the CSR's SANs if the profile says copy_csr_sans, else none). validity_days: None for the
    profile default. digest: sha256, sha384 or sha512.
    """

    csr: bytes
    profile: str
    subject: list[tuple[str, str]] | None = None
    sans: list[tuple[str, str]] | None = None
    validity_days: int | None = None
    digest: str = "sha256"
    challenge: str | None = None  # what the proof of possession must carry; None: not compared


@dataclass(frozen=True)
class CertificatePlan:
    """Every decision about a certificate except its serial; the input of build_certificate."""

    profile: str
    kind: str  # the profile's kind: which lints apply (signer/pki/lint.py)
    issuer: str
    issuer_subject: x509.Name
    subject: x509.Name
    sans: tuple[tuple[str, str], ...]
    public_key: Any
    key_type: str
    not_before: dt.datetime
    not_after: dt.datetime
    digest: str
    extensions: tuple[x509.Extension[x509.ExtensionType], ...]
    csr_format: str


def _err(code: ErrorCode, message: str, **details: Any) -> SignerError:
    return SignerError(code, message, details=details or None)


def _short(value: object, limit: int = 80) -> str:
    """A bounded, printable rendering of untrusted input for error messages."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- serial numbers


def new_serial() -> int:
    """A fresh certificate serial: 127 CSPRNG bits under a fixed top bit (bit 127).

    The fixed bit makes it positive, never zero, far above 2**64 and always 16 bytes of
    magnitude (17 DER bytes, 32 hex digits, which keeps the WebDB's hex serials uniform).
    """
    return (1 << SERIAL_RANDOM_BITS) | secrets.randbits(SERIAL_RANDOM_BITS)


# --------------------------------------------------------------------------- CSR / SPKAC


@dataclass(frozen=True)
class _ParsedRequest:
    public_key: Any
    subject: list[tuple[str, str]] | None  # None: take it from `name`
    name: x509.Name | None
    csr: x509.CertificateSigningRequest | None
    fmt: str
    challenge: str | None = None  # SPKAC's challenge string (PKCS#10: read on demand)


def _looks_like_spkac_der(der: bytes) -> bool:
    """SignedPublicKeyAndChallenge starts SEQ{SEQ{SEQ(spki)...}}; PKCS#10 SEQ{SEQ{INTEGER...}}."""
    try:
        tag, pos, _ = der_header(der, 0)
        if tag != 0x30:
            return False
        tag, pos, _ = der_header(der, pos)
        if tag != 0x30:
            return False
        tag, _, _ = der_header(der, pos)
        return tag == 0x30
    except ValueError:
        return False


_SpkacCheck = tuple[str, str, bytes, bytes]


def _parse_spkac(
    der: bytes, text_subject: list[tuple[str, str]] | None
) -> tuple[_ParsedRequest, _SpkacCheck]:
    """Parse SignedPublicKeyAndChallenge; the signature is checked later (after key rules)."""
    from asn1crypto import algos, core, keys

    class PublicKeyAndChallenge(core.Sequence):  # type: ignore[misc]  # untyped asn1crypto
        _fields = [("spki", keys.PublicKeyInfo), ("challenge", core.IA5String)]

    class SignedPublicKeyAndChallenge(core.Sequence):  # type: ignore[misc]
        _fields = [
            ("public_key_and_challenge", PublicKeyAndChallenge),
            ("signature_algorithm", algos.SignedDigestAlgorithm),
            ("signature", core.OctetBitString),
        ]

    try:
        spkac = SignedPublicKeyAndChallenge.load(der, strict=True)
        pkac = spkac["public_key_and_challenge"]
        spki_der = pkac["spki"].dump()
        spki_oid = pkac["spki"]["algorithm"]["algorithm"].dotted
        challenge = pkac["challenge"].native
        signed = pkac.dump()
        sig_alg = spkac["signature_algorithm"]
        algo, hash_name = sig_alg.signature_algo, sig_alg.hash_algo
        signature = spkac["signature"].native
    except Exception as exc:  # asn1crypto raises many types on malformed input
        raise _err(ErrorCode.BAD_CSR, f"malformed SPKAC: {_short(str(exc))}") from None
    if spki_oid not in _SUPPORTED_SPKI_OIDS:
        raise _err(
            ErrorCode.UNSUPPORTED_KEY,
            f"unsupported public key algorithm {spki_oid}",
            algorithm=spki_oid,
        )
    try:
        public_key = serialization.load_der_public_key(spki_der)
    except UnsupportedAlgorithm:
        raise _err(ErrorCode.UNSUPPORTED_KEY, "unsupported public key algorithm in SPKAC") from None
    except Exception as exc:
        raise _err(ErrorCode.BAD_CSR, f"malformed SPKAC public key: {_short(str(exc))}") from None
    parsed = _ParsedRequest(
        public_key=public_key,
        subject=text_subject or [],
        name=None,
        csr=None,
        fmt="spkac",
        challenge=challenge if isinstance(challenge, str) else "",
    )
    return parsed, (algo, hash_name, signed, signature)


# Netscape SPKAC proof-of-possession: the digest only proves key possession and openssl spkac
# still defaults to MD5, so MD5 and SHA-1 are accepted here (never for the certificate itself).
_POP_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "md5": hashes.MD5,
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}


def _verify_spkac(public_key: Any, algo: str, hash_name: str, data: bytes, sig: bytes) -> None:
    hash_cls = _POP_HASHES.get(hash_name)
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and algo == "rsassa_pkcs1v15" and hash_cls:
            public_key.verify(sig, data, padding.PKCS1v15(), hash_cls())
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and algo == "ecdsa" and hash_cls:
            public_key.verify(sig, data, ec.ECDSA(hash_cls()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public_key.verify(sig, data)
        else:
            raise _err(
                ErrorCode.BAD_CSR_SIGNATURE,
                f"unsupported SPKAC signature algorithm {algo}/{hash_name}",
            )
    except SignerError:
        raise
    except InvalidSignature:
        raise _err(ErrorCode.BAD_CSR_SIGNATURE, "SPKAC signature does not verify") from None
    except Exception as exc:
        raise _err(ErrorCode.BAD_CSR_SIGNATURE, f"SPKAC signature: {_short(str(exc))}") from None


def _spkac_text(data: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """SPKAC=<base64> plus optional `name = value` lines: the `openssl ca -spkac` input the web
    application writes (`0.emailAddress = a@b`, `commonName = ...`, long or short names)."""
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise _err(ErrorCode.BAD_CSR, "SPKAC text is neither ASCII nor UTF-8") from None
    blob: str | None = None
    fields: list[tuple[str, str]] = []
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or "=" not in line:
            continue
        key, value = line.split("=", 1)
        key = key.strip()
        if key == "SPKAC":
            if blob is not None:
                raise _err(ErrorCode.BAD_CSR, "more than one SPKAC= line")
            blob = value.strip()
            continue
        # openssl allows "0.CN=..." to repeat a field; the prefix is only for uniqueness.
        if "." in key and key.split(".", 1)[0].isdigit():
            key = key.split(".", 1)[1]
        short = short_attribute_name(key)
        if short is not None:
            fields.append((short, value.strip()))
    if not blob:
        raise _err(ErrorCode.BAD_CSR, "empty SPKAC= value")
    try:
        der = base64.b64decode("".join(blob.split()), validate=True)
    except (binascii.Error, ValueError):
        raise _err(ErrorCode.BAD_CSR, "SPKAC value is not valid base64") from None
    return der, fields


def _load_pkcs10(der: bytes) -> _ParsedRequest:
    try:
        csr = x509.load_der_x509_csr(der)
        spki_oid = csr.public_key_algorithm_oid.dotted_string  # type: ignore[attr-defined]
        name = csr.subject
    except Exception as exc:  # untrusted bytes: ValueError, InvalidVersion, ... all mean BAD_CSR
        raise _err(ErrorCode.BAD_CSR, f"malformed PKCS#10 request: {_short(str(exc))}") from None
    if spki_oid not in _SUPPORTED_SPKI_OIDS:
        raise _err(
            ErrorCode.UNSUPPORTED_KEY,
            f"unsupported public key algorithm {spki_oid}",
            algorithm=spki_oid,
        )
    try:
        public_key = csr.public_key()
    except UnsupportedAlgorithm as exc:
        raise _err(
            ErrorCode.UNSUPPORTED_KEY, f"unsupported public key: {_short(str(exc))}"
        ) from None
    except Exception as exc:
        raise _err(ErrorCode.BAD_CSR, f"malformed public key: {_short(str(exc))}") from None
    return _ParsedRequest(public_key=public_key, subject=None, name=name, csr=csr, fmt="pkcs10")


def _verify_pkcs10(csr: x509.CertificateSigningRequest, public_key: Any) -> None:
    """Check the CSR's self-signature with the key already loaded.

    Twice as fast as csr.is_signature_valid for EC keys (which loads and checks the key again);
    proof of possession is the most expensive step of planning.
    """
    try:
        params = csr.signature_algorithm_parameters
        signature, data = csr.signature, csr.tbs_certrequest_bytes
        if isinstance(public_key, rsa.RSAPublicKey):
            algorithm = csr.signature_hash_algorithm
            if not isinstance(params, padding.PKCS1v15 | padding.PSS) or algorithm is None:
                raise TypeError("not an RSA signature")
            public_key.verify(signature, data, params, algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            if not isinstance(params, ec.ECDSA):
                raise TypeError("not an ECDSA signature")
            public_key.verify(signature, data, params)
        elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public_key.verify(signature, data)
        else:
            raise TypeError("unsupported key")
    except InvalidSignature:
        raise _err(ErrorCode.BAD_CSR_SIGNATURE, "CSR self-signature does not verify") from None
    except Exception as exc:  # unknown or malformed signature algorithm parameters
        raise _err(
            ErrorCode.BAD_CSR_SIGNATURE, f"CSR signature cannot be checked: {_short(str(exc))}"
        ) from None


def _check_challenge(parsed: _ParsedRequest, expected: str) -> None:
    """The request's challenge (SPKAC) or challengePassword (PKCS#10) must be `expected`: it
    binds the proof of possession to the session that handed the challenge out."""
    carried = parsed.challenge
    if parsed.csr is not None:
        try:
            attribute = parsed.csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
            carried = attribute.value.decode("utf-8")
        except x509.AttributeNotFound:
            carried = None
        except Exception:  # an attribute that is not a string
            carried = None
    if carried is None or not hmac.compare_digest(carried.encode(), expected.encode()):
        what = "no challenge" if carried is None else "another challenge"
        raise _err(ErrorCode.BAD_CHALLENGE, f"the {parsed.fmt} request carries {what}")


def _is_utf8(data: bytes) -> bool:
    """Text, not DER (a DER request has length octets such as 0x82 that UTF-8 never starts)."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _parse_request_blob(data: object) -> tuple[_ParsedRequest, _SpkacCheck | None]:
    """Detect and parse the CSR. Returns the request and a deferred signature check."""
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise _err(ErrorCode.BAD_CSR, f"csr must be bytes, got {type(data).__name__}")
    if len(data) > MAX_CSR_BYTES:
        raise _err(
            ErrorCode.FIELD_TOO_LARGE,
            f"CSR is {len(data)} bytes; at most {MAX_CSR_BYTES} allowed",
            field="csr",
            limit=MAX_CSR_BYTES,
        )
    if not data:
        raise _err(ErrorCode.BAD_CSR, "empty CSR")
    if _SPKAC_LINE_RE.search(data) and _is_utf8(data):
        # Before the DER check: a keygen file may start with "0.emailAddress", and "0" is 0x30.
        der, fields = _spkac_text(data)
        return _parse_spkac(der, fields)
    if data[:1] == b"\x30":
        if _looks_like_spkac_der(data):
            return _parse_spkac(data, None)
        return _load_pkcs10(data), None
    if b"-----BEGIN" in data:
        # Text around the block (openssl req -text output) is ignored.
        begin = _PEM_BEGIN_RE.search(data)
        if begin is None:
            raise _err(ErrorCode.BAD_CSR, "PEM block is not a CERTIFICATE REQUEST")
        end_marker = b"-----END " + begin.group(1) + b"CERTIFICATE REQUEST-----"
        end = data.find(end_marker, begin.end())
        if end < 0:
            raise _err(ErrorCode.BAD_CSR, "PEM CERTIFICATE REQUEST has no END line")
        try:
            der = base64.b64decode(b"".join(data[begin.end() : end].split()), validate=True)
        except (binascii.Error, ValueError):
            raise _err(ErrorCode.BAD_CSR, "PEM body is not valid base64") from None
        return _load_pkcs10(der), None
    if _SPKAC_LINE_RE.search(data):
        der, fields = _spkac_text(data)
        return _parse_spkac(der, fields)
    raise _err(ErrorCode.BAD_CSR, "CSR is neither PKCS#10 (DER or PEM) nor SPKAC")


# --------------------------------------------------------------------------- keys


def _check_key(public_key: Any, profile: Profile) -> str:
    """Apply the profile's key rules; returns the key type (rsa, ec, eddsa)."""
    rules = profile.keys
    if isinstance(public_key, rsa.RSAPublicKey):
        if rules.rsa is None:
            raise _err(ErrorCode.UNSUPPORTED_KEY, f"profile {profile.name} does not allow RSA keys")
        numbers = public_key.public_numbers()
        bits, e, n = public_key.key_size, numbers.e, numbers.n
        if bits < rules.rsa.min_bits:
            raise _err(
                ErrorCode.WEAK_KEY,
                f"RSA key has {bits} bits; at least {rules.rsa.min_bits} required",
                bits=bits,
                min_bits=rules.rsa.min_bits,
            )
        if bits > rules.rsa.max_bits:
            raise _err(
                ErrorCode.UNSUPPORTED_KEY,
                f"RSA key has {bits} bits; at most {rules.rsa.max_bits} supported",
                bits=bits,
            )
        if bits % 8:
            raise _err(ErrorCode.UNSUPPORTED_KEY, f"RSA modulus of {bits} bits is not whole bytes")
        if e < 3 or e % 2 == 0 or e < rules.rsa.min_exponent:
            raise _err(
                ErrorCode.WEAK_KEY,
                f"RSA public exponent {e} not allowed; an odd exponent >= "
                f"{rules.rsa.min_exponent} is required",
                exponent=e,
            )
        if e.bit_length() > 256:
            raise _err(ErrorCode.UNSUPPORTED_KEY, "RSA public exponent exceeds 2**256 - 1")
        if math.gcd(n, _SMALL_PRIMES_PRODUCT) != 1:
            raise _err(ErrorCode.WEAK_KEY, "RSA modulus has a small prime factor")
        return "rsa"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = _CURVES.get(public_key.curve.name, public_key.curve.name)
        if curve not in rules.ec_curves:
            raise _err(
                ErrorCode.WEAK_KEY,
                f"EC curve {public_key.curve.name} not allowed; expected one of "
                + (", ".join(rules.ec_curves) or "none"),
                curve=public_key.curve.name,
            )
        return "ec"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        if not rules.ed25519:
            raise _err(ErrorCode.UNSUPPORTED_KEY, f"profile {profile.name} does not allow Ed25519")
        return "eddsa"
    if isinstance(public_key, ed448.Ed448PublicKey):
        if not rules.ed448:
            raise _err(ErrorCode.UNSUPPORTED_KEY, f"profile {profile.name} does not allow Ed448")
        return "eddsa"
    kind = "DSA" if isinstance(public_key, dsa.DSAPublicKey) else type(public_key).__name__
    raise _err(ErrorCode.UNSUPPORTED_KEY, f"{kind} keys are not supported", algorithm=kind)


# --------------------------------------------------------------------------- names


def dns_name_ok(name: str, wildcard: bool) -> bool:
    """RFC 1035/5280 preferred name syntax (LDH labels, A-labels for IDNs), >= 2 labels."""
    if not name or len(name) > 253 or not name.isascii():
        return False
    labels = name.split(".")
    if labels[0] == "*" and wildcard:
        labels = labels[1:]
        if len(labels) < 2:
            return False
    if len(labels) < 2:
        return False
    for label in labels:
        if not _LABEL_RE.match(label):
            return False
        if label[2:4] == "--":
            if not label.startswith("xn--"):
                return False  # RFC 5891 reserves ??-- labels other than xn--
            try:
                label[4:].encode("ascii").decode("punycode")
            except (UnicodeError, ValueError):
                return False
    return not labels[-1].isdigit() and any(c.isalpha() for c in labels[-1])


def _email_ok(value: str) -> bool:
    if len(value) > 254 or not value.isascii() or value.count("@") != 1:
        return False
    local, domain = value.split("@")
    return (
        0 < len(local) <= 64
        and bool(_EMAIL_LOCAL_RE.match(local))
        and dns_name_ok(domain.lower(), False)
    )


def _normalize_email(value: str) -> str:
    local, domain = value.split("@")
    return f"{local}@{domain.lower()}"


def _check_san(kind: str, value: str, rule: Any, suffixes: PublicSuffixes) -> str:
    """Validate one SAN; returns its canonical text form (BAD_SAN on syntax errors)."""

    def bad(reason: str) -> SignerError:
        return _err(
            ErrorCode.BAD_SAN,
            f"{kind} SAN {_short(value)}: {reason}",
            type=kind,
            value=_short(value),
        )

    if len(value) > MAX_SAN_VALUE_LENGTH:
        raise bad("too long")
    if kind == "dns":
        name = value.lower()
        if name.startswith("*.") and not rule.wildcard:
            raise bad("wildcards are not allowed in this profile")
        if not dns_name_ok(name, rule.wildcard):
            raise bad("not a valid DNS name (LDH labels, A-labels for IDNs, at least two labels)")
        if name.startswith("*.") and suffixes.is_public(name[2:]):
            raise bad(
                f"a wildcard directly under the public suffix {name[2:]} (Public Suffix List)"
            )
        return name
    if kind == "email":
        if not _email_ok(value):
            raise bad("not a valid email address (ASCII dot-atom local part and a DNS domain)")
        return _normalize_email(value)
    if kind == "ip":
        if "%" in value or "/" in value:
            raise bad("zone ids and prefixes are not allowed")
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            raise bad("not an IPv4 or IPv6 address") from None
        if not rule.allow_non_public and not address.is_global:
            raise bad("not a public address")
        return str(address)
    if kind == "uri":
        if not _URI_RE.match(value):
            raise bad("not an absolute URI (scheme:rest, printable ASCII, no spaces)")
        rest = value.split(":", 1)[1]
        if rest.startswith("//"):
            authority = rest[2:].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
            host = authority.rsplit("@", 1)[-1]
            if host.startswith("["):
                try:
                    ipaddress.IPv6Address(host[1 : host.index("]")])
                except ValueError:
                    raise bad("bad IPv6 literal") from None
            else:
                host = host.split(":", 1)[0]
                if not dns_name_ok(host.lower(), False):
                    try:
                        ipaddress.IPv4Address(host)
                    except ValueError:
                        raise bad("authority must be a fully qualified domain name or IP") from None
        return value
    if kind == "xmpp":
        local, _, domain = value.rpartition("@")
        if "/" in domain:
            raise bad("resource parts are not allowed")
        if not dns_name_ok(domain.lower(), False):
            raise bad("domain part is not a valid DNS name")
        if "@" in value and (
            not local
            or len(local.encode("utf-8")) > 1023
            or any(c in _XMPP_LOCAL_FORBIDDEN or not c.isprintable() or c.isspace() for c in local)
        ):
            raise bad("bad localpart (RFC 7622)")
        return f"{local}@{domain.lower()}" if local else domain.lower()
    raise bad("unknown type")  # unreachable: types are checked before


def _value_problem(name: str, value: str, max_length: int) -> str | None:
    """Why a subject attribute value is unacceptable, or None."""
    if not value or not value.strip():
        return "empty value"
    if value != value.strip():
        return "leading or trailing whitespace"
    if len(value) > max_length:
        return f"{len(value)} characters; at most {max_length} allowed"
    if value.isascii():
        if _ASCII_CONTROL_RE.search(value):
            return "control characters"
    else:
        for char in value:
            cat = unicodedata.category(char)
            if cat in ("Cc", "Cs", "Co") or ord(char) in _FORBIDDEN_FORMAT_CHARS:
                return f"control or invisible character U+{ord(char):04X}"
    if "&" in value and _HTML_ENTITY_RE.search(value):
        return "contains an HTML entity (escaped twice?)"
    if not any(c.isalnum() for c in value):
        return "no letter or digit (placeholder value?)"
    if name == "C" and not _COUNTRY_RE.match(value):
        return "expected a two-letter upper-case ISO 3166 country code"
    if name == "emailAddress" and not _email_ok(value):
        return "not a valid email address"
    if name == "serialNumber" and not _PRINTABLE_RE.match(value):
        return "not a PrintableString"
    if name == "DC" and not _LABEL_RE.match(value):
        return "not a DNS label"
    if name == "organizationIdentifier" and not _ORG_ID_RE.match(value):
        return "expected SSSCC[+SP]-reference (CA/B Forum organizationIdentifier)"
    return None


def _subject_from_name(name: x509.Name) -> list[tuple[str, str]]:
    """Flatten a CSR subject into (short name, value); unknown types become their OID."""
    out = []
    for rdn in name.rdns:
        for attribute in rdn:
            oid = attribute.oid.dotted_string
            value = attribute.value
            out.append((_OID_TO_SHORT.get(oid, oid), value if isinstance(value, str) else ""))
    return out


def _resolve_subject(raw: object, profile: Profile, from_csr: bool) -> list[tuple[str, str]]:
    """Check the subject attributes against the profile (counts, names, values)."""
    if not isinstance(raw, list | tuple):
        raise _err(
            ErrorCode.BAD_SUBJECT, f"subject must be a list of pairs, got {type(raw).__name__}"
        )
    if len(raw) > MAX_REQUEST_SUBJECT_ATTRIBUTES:
        raise _err(
            ErrorCode.FIELD_TOO_LARGE,
            f"subject has {len(raw)} attributes; at most {MAX_REQUEST_SUBJECT_ATTRIBUTES}",
            field="subject",
        )
    rules = profile.subject
    kept: list[tuple[str, str]] = []
    counts: dict[str, int] = {}
    for item in raw:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
        ):
            raise _err(
                ErrorCode.BAD_SUBJECT, f"subject entry {_short(item)} is not a (name, value)"
            )
        name, value = item
        name = short_attribute_name(name) or name
        if name not in SUBJECT_ATTRIBUTES and not from_csr:
            raise _err(
                ErrorCode.BAD_SUBJECT,
                f"unknown subject attribute {_short(name)}",
                attribute=_short(name),
            )
        if name in rules.ignore:
            continue
        if name not in rules.attributes:
            if rules.drop_unlisted:
                continue
            raise _err(
                ErrorCode.FORBIDDEN_SUBJECT_ATTRIBUTE,
                f"subject attribute {_short(name)} is not allowed in profile {profile.name}",
                attribute=_short(name),
                allowed=sorted(rules.attributes),
            )
        rule = rules.attributes[name]
        counts[name] = counts.get(name, 0) + 1
        if counts[name] > rule.max_count:
            raise _err(
                ErrorCode.BAD_SUBJECT,
                f"more than {rule.max_count} {name} attribute(s)",
                attribute=name,
            )
        problem = _value_problem(name, value, rule.max_length or SUBJECT_ATTRIBUTES[name][1])
        if problem:
            raise _err(
                ErrorCode.BAD_SUBJECT,
                f"subject {name} {_short(value, 40)}: {problem}",
                attribute=name,
            )
        kept.append((name, value))
    for name, rule in rules.attributes.items():
        if rule.required and name not in counts:
            raise _err(
                ErrorCode.BAD_SUBJECT, f"subject attribute {name} is required", attribute=name
            )
    for group in rules.require_one_of:
        if not any(name in counts for name in group):
            raise _err(ErrorCode.BAD_SUBJECT, f"subject needs one of {', '.join(group)}")
    if not kept and not rules.allow_empty:
        raise _err(ErrorCode.BAD_SUBJECT, f"empty subject not allowed in profile {profile.name}")
    if rules.canonical_order:
        kept.sort(key=lambda pair: _CANONICAL_ORDER.get(pair[0], 200))
    return kept


def _resolve_sans(raw: object, profile: Profile, suffixes: PublicSuffixes) -> list[tuple[str, str]]:
    """Check SAN types, counts and syntax; returns canonical, de-duplicated pairs."""
    if not isinstance(raw, list | tuple):
        raise _err(ErrorCode.BAD_SAN, f"sans must be a list of pairs, got {type(raw).__name__}")
    if len(raw) > MAX_REQUEST_SANS:
        raise _err(
            ErrorCode.FIELD_TOO_LARGE, f"{len(raw)} SANs; at most {MAX_REQUEST_SANS}", field="sans"
        )
    rules = profile.sans
    out: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    counts: dict[str, int] = {}
    for item in raw:
        if (
            not isinstance(item, list | tuple)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
        ):
            raise _err(ErrorCode.BAD_SAN, f"SAN entry {_short(item)} is not a (type, value)")
        kind, value = item
        if kind not in SAN_TYPES:
            raise _err(
                ErrorCode.BAD_SAN,
                f"unknown SAN type {_short(kind)}; expected one of {', '.join(SAN_TYPES)}",
            )
        if kind in rules.ignore:
            continue
        rule = rules.allowed.get(kind)
        if rule is None:
            raise _err(
                ErrorCode.FORBIDDEN_SAN_TYPE,
                f"{kind} SANs are not allowed in profile {profile.name}",
                type=kind,
                allowed=sorted(rules.allowed),
            )
        canonical = _check_san(kind, value, rule, suffixes)
        if (kind, canonical) in seen:
            continue
        seen.add((kind, canonical))
        counts[kind] = counts.get(kind, 0) + 1
        if counts[kind] > rule.max_count:
            raise _err(
                ErrorCode.FIELD_TOO_LARGE,
                f"more than {rule.max_count} {kind} SANs in profile {profile.name}",
                field="sans",
                type=kind,
                limit=rule.max_count,
            )
        out.append((kind, canonical))
    if len(out) > rules.max_total:
        raise _err(
            ErrorCode.FIELD_TOO_LARGE,
            f"{len(out)} SANs; profile {profile.name} allows {rules.max_total}",
            field="sans",
            limit=rules.max_total,
        )
    if rules.required and not out:
        raise _err(ErrorCode.BAD_SAN, f"profile {profile.name} requires at least one SAN")
    return out


def _decode_utf8string(der: bytes) -> str:
    tag, pos, end = der_header(der, 0)
    if tag != 0x0C or end != len(der):
        raise ValueError("not a UTF8String")
    return der[pos:end].decode("utf-8")


def _sans_from_csr(csr: x509.CertificateSigningRequest | None) -> list[tuple[str, str]]:
    """The CSR's extensionRequest SANs as (type, value) pairs (types outside ours refused)."""
    if csr is None:
        return []
    try:
        ext = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except Exception as exc:  # duplicate or malformed extensions in untrusted input
        raise _err(ErrorCode.BAD_CSR, f"malformed CSR extensions: {_short(str(exc))}") from None
    out: list[tuple[str, str]] = []
    for general_name in ext.value:
        if isinstance(general_name, x509.DNSName):
            out.append(("dns", general_name.value))
        elif isinstance(general_name, x509.RFC822Name):
            out.append(("email", general_name.value))
        elif isinstance(general_name, x509.IPAddress):
            if not isinstance(general_name.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                raise _err(ErrorCode.BAD_SAN, "IP address ranges are not allowed as SANs")
            out.append(("ip", str(general_name.value)))
        elif isinstance(general_name, x509.UniformResourceIdentifier):
            out.append(("uri", general_name.value))
        elif isinstance(general_name, x509.OtherName) and general_name.type_id == ID_ON_XMPPADDR:
            try:
                out.append(("xmpp", _decode_utf8string(general_name.value)))
            except (ValueError, UnicodeDecodeError):
                raise _err(ErrorCode.BAD_SAN, "XmppAddr SAN is not a UTF8String") from None
        else:
            raise _err(
                ErrorCode.FORBIDDEN_SAN_TYPE,
                f"CSR SAN of type {type(general_name).__name__} is not supported",
            )
    return out


def _general_name(kind: str, value: str) -> x509.GeneralName:
    if kind == "dns":
        return x509.DNSName(value)
    if kind == "email":
        return x509.RFC822Name(value)
    if kind == "ip":
        return x509.IPAddress(ipaddress.ip_address(value))
    if kind == "uri":
        return x509.UniformResourceIdentifier(value)
    encoded = value.encode("utf-8")
    if len(encoded) < 0x80:
        header = bytes([0x0C, len(encoded)])
    else:
        size = len(encoded).to_bytes((len(encoded).bit_length() + 7) // 8, "big")
        header = bytes([0x0C, 0x80 | len(size)]) + size
    return x509.OtherName(ID_ON_XMPPADDR, header + encoded)


def _san_key(kind: str, value: str) -> str:
    """How a SAN compares with a CN: DNS names case-insensitively, emails by domain case."""
    return value.lower() if kind in ("dns", "xmpp") else value


def _apply_cn_rule(
    subject: list[tuple[str, str]], sans: list[tuple[str, str]], profile: Profile
) -> list[tuple[str, str]]:
    """Enforce cn_sources and email_must_be_san; rewrite a matching CN to the SAN's form."""
    rules = profile.subject
    by_key: dict[str, str] = {}
    emails: set[str] = set()
    for kind, value in sans:
        by_key.setdefault(_san_key(kind, value), value)
        if kind == "email":
            emails.add(value)
    organizations = {value for name, value in subject if name == "O"}
    out = []
    for name, value in subject:
        if name == "CN" and rules.cn_sources:
            candidates = [value.lower(), value]
            if "@" in value and value.count("@") == 1:
                candidates.append(_normalize_email(value))
            if _IP_CHARS_RE.match(value):
                with contextlib.suppress(ValueError):
                    candidates.append(str(ipaddress.ip_address(value)))
            match = next((by_key[c] for c in candidates if c in by_key), None)
            if "san" in rules.cn_sources and match is not None:
                value = match
            elif rules.unmatched_cn == "drop" and not (
                "O" in rules.cn_sources and value in organizations
            ):
                continue
            elif not ("O" in rules.cn_sources and value in organizations):
                sources = " or ".join(
                    "one of the SANs" if s == "san" else "an organizationName"
                    for s in rules.cn_sources
                )
                raise _err(
                    ErrorCode.BAD_SUBJECT,
                    f"CN {_short(value, 64)} must be {sources}",
                    attribute="CN",
                )
        if (
            name == "emailAddress"
            and rules.email_must_be_san
            and ("@" not in value or _normalize_email(value) not in emails)
        ):
            raise _err(
                ErrorCode.BAD_SUBJECT,
                f"emailAddress {_short(value, 64)} must also be an rfc822Name SAN",
                attribute="emailAddress",
            )
        out.append((name, value))
    return out


# --------------------------------------------------------------------------- profile compile cache


@dataclass(frozen=True)
class _CompiledProfile:
    """The parts of a profile's extensions that do not depend on the request."""

    fixed: tuple[x509.Extension[x509.ExtensionType], ...]
    key_usage: Mapping[str, x509.Extension[x509.KeyUsage]]


def _key_usage(bits: Sequence[str]) -> x509.KeyUsage:
    flags = set(bits)
    return x509.KeyUsage(
        digital_signature="digitalSignature" in flags,
        content_commitment="nonRepudiation" in flags,
        key_encipherment="keyEncipherment" in flags,
        data_encipherment="dataEncipherment" in flags,
        key_agreement="keyAgreement" in flags,
        key_cert_sign="keyCertSign" in flags,
        crl_sign="cRLSign" in flags,
        encipher_only="encipherOnly" in flags,
        decipher_only="decipherOnly" in flags,
    )


def _compile(profile: Profile) -> _CompiledProfile:
    ext = x509.Extension
    fixed: list[x509.Extension[x509.ExtensionType]] = []
    bc = profile.basic_constraints
    fixed.append(
        ext(
            ExtensionOID.BASIC_CONSTRAINTS,
            bc.critical,
            x509.BasicConstraints(ca=bc.ca, path_length=bc.path_length if bc.ca else None),
        )
    )
    if profile.extended_key_usage is not None:
        usages = [ObjectIdentifier(EKU_NAMES.get(u, u)) for u in profile.extended_key_usage.usages]
        fixed.append(
            ext(
                ExtensionOID.EXTENDED_KEY_USAGE,
                profile.extended_key_usage.critical,
                x509.ExtendedKeyUsage(usages),
            )
        )
    if profile.crl_urls:
        fixed.append(
            ext(
                ExtensionOID.CRL_DISTRIBUTION_POINTS,
                False,
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            full_name=[x509.UniformResourceIdentifier(u)],
                            relative_name=None,
                            reasons=None,
                            crl_issuer=None,
                        )
                        for u in profile.crl_urls
                    ]
                ),
            )
        )
    access = [
        x509.AccessDescription(
            x509.AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(u)
        )
        for u in profile.ocsp_urls or []
    ] + [
        x509.AccessDescription(
            x509.AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(u)
        )
        for u in profile.ca_issuers_urls or []
    ]
    if access:
        fixed.append(
            ext(
                ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
                False,
                x509.AuthorityInformationAccess(access),
            )
        )
    if profile.policies:
        fixed.append(
            ext(
                ExtensionOID.CERTIFICATE_POLICIES,
                False,
                x509.CertificatePolicies(
                    [
                        x509.PolicyInformation(
                            ObjectIdentifier(p.oid), [p.cps] if p.cps is not None else None
                        )
                        for p in profile.policies
                    ]
                ),
            )
        )
    if profile.ocsp_nocheck:
        fixed.append(ext(ID_PKIX_OCSP_NOCHECK, False, x509.OCSPNoCheck()))
    key_usage = {
        key_type: ext(ExtensionOID.KEY_USAGE, True, _key_usage(bits))
        for key_type, bits in (
            ("rsa", profile.key_usage.rsa),
            ("ec", profile.key_usage.ec),
            ("eddsa", profile.key_usage.eddsa),
        )
        if bits
    }
    return _CompiledProfile(fixed=tuple(fixed), key_usage=key_usage)


_COMPILED: dict[str, tuple[Profile, _CompiledProfile]] = {}


def _compiled(profile: Profile) -> _CompiledProfile:
    """Per-profile constant extensions, built once per profile name (profiles are immutable; a
    reloaded profile set with a changed profile of the same name is compiled again)."""
    hit = _COMPILED.get(profile.name)
    if hit is not None and (hit[0] is profile or hit[0] == profile):
        return hit[1]
    compiled = _compile(profile)
    _COMPILED[profile.name] = (profile, compiled)
    return compiled


@dataclass(frozen=True)
class _IssuerFacts:
    subject: x509.Name
    aki: x509.Extension[x509.ExtensionType]
    not_after: dt.datetime
    path_length: int | None
    is_ca: bool
    curve_digest: str | None  # EC issuers: the only digest their curve pairs with


_ISSUERS: dict[int, tuple[x509.Certificate, _IssuerFacts]] = {}


def _issuer_facts(cert: x509.Certificate) -> _IssuerFacts:
    hit = _ISSUERS.get(id(cert))
    if hit is not None and hit[0] is cert:
        return hit[1]
    public_key = cert.public_key()
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)  # type: ignore[arg-type]
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca, path_length = bc.ca, bc.path_length
    except x509.ExtensionNotFound:
        is_ca, path_length = False, None
    # Only the key identifier: CA/B BRs forbid issuer name and serial in the AKI.
    aki = x509.AuthorityKeyIdentifier(aki.key_identifier, None, None)
    facts = _IssuerFacts(
        subject=cert.subject,
        aki=x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki),
        not_after=cert.not_valid_after_utc,
        path_length=path_length,
        is_ca=is_ca,
        curve_digest=_CURVE_DIGEST.get(public_key.curve.name)
        if isinstance(public_key, ec.EllipticCurvePublicKey)
        else None,
    )
    if len(_ISSUERS) > 64:
        _ISSUERS.clear()
    _ISSUERS[id(cert)] = (cert, facts)
    return facts


# --------------------------------------------------------------------------- plan and build


# RFC 5480 section 4 and CA/B Forum BR 7.1.3.2.2 pair each curve with one hash.
_CURVE_DIGEST = {"secp256r1": "sha256", "secp384r1": "sha384", "secp521r1": "sha512"}


def _check_digest(digest: object, profile: Profile, issuer: _IssuerFacts) -> str:
    if not isinstance(digest, str):
        raise _err(ErrorCode.BAD_DIGEST, f"digest must be a string, got {type(digest).__name__}")
    name = digest.strip().lower().replace("-", "")
    if name in _BROKEN_DIGESTS:
        raise _err(ErrorCode.BAD_DIGEST, f"digest {_short(digest, 20)} is never allowed (broken)")
    if name not in _HASHES:
        raise _err(
            ErrorCode.BAD_DIGEST,
            f"unknown digest {_short(digest, 20)}; expected one of sha256, sha384, sha512",
        )
    if not profile.digest_allowed(name):
        raise _err(
            ErrorCode.BAD_DIGEST,
            f"digest {name} not allowed in profile {profile.name}; expected one of "
            + ", ".join(profile.digests),
        )
    if issuer.curve_digest is not None and name != issuer.curve_digest:
        raise _err(
            ErrorCode.BAD_DIGEST,
            f"issuer {profile.issuer} has an EC key whose curve pairs with "
            f"{issuer.curve_digest} (RFC 5480, CA/B BR 7.1.3.2); {name} was requested",
            expected=issuer.curve_digest,
        )
    return name


def _check_validity(
    days: object, profile: Profile, now: dt.datetime, issuer: _IssuerFacts
) -> tuple[dt.datetime, dt.datetime]:
    rules = profile.validity
    limit = rules.effective_max_days(now)
    if days is None:
        days = min(rules.default_days, limit)
    if not isinstance(days, int) or isinstance(days, bool):
        raise _err(ErrorCode.BAD_VALIDITY, f"validity_days must be an integer, got {_short(days)}")
    if days <= 0:
        raise _err(ErrorCode.BAD_VALIDITY, f"validity_days must be positive, got {days}")
    if days > limit:
        raise _err(
            ErrorCode.VALIDITY_TOO_LONG,
            f"{days} days requested; profile {profile.name} allows at most {limit}",
            requested=days,
            max_days=limit,
        )
    not_before = now - dt.timedelta(seconds=rules.backdate_seconds)
    # The validity period includes both ends (RFC 5280 4.1.2.5), so it lasts exactly `days`.
    not_after = not_before + dt.timedelta(days=days) - dt.timedelta(seconds=1)
    if not_after > issuer.not_after:
        raise _err(
            ErrorCode.VALIDITY_TOO_LONG,
            f"certificate would outlive its issuer (issuer expires {issuer.not_after:%Y-%m-%d})",
            issuer_not_after=issuer.not_after.isoformat(),
        )
    return not_before, not_after


def plan_certificate(
    request: IssuanceRequest,
    profile: Profile,
    issuer_cert: x509.Certificate,
    now: dt.datetime,
    channel: Channel = "line",
    suffixes: PublicSuffixes | None = None,
) -> CertificatePlan:
    """Validate the request against the profile and decide every field but the serial.

    `channel` is who asks: the line (the default) may not use an operator profile (a CA, OCSP
    or time-stamping certificate); only the operator's own tools pass "operator". `suffixes`:
    the Public Suffix List wildcards are checked against (default: the package's snapshot).
    """
    suffixes = shipped() if suffixes is None else suffixes
    check_channel(profile, channel)
    if request.profile != profile.name:
        raise _err(
            ErrorCode.UNKNOWN_PROFILE,
            f"request names profile {_short(request.profile, 40)} but {profile.name} was given",
        )
    if now.tzinfo is None:
        now = now.replace(tzinfo=dt.UTC)
    now = now.astimezone(dt.UTC).replace(microsecond=0)
    issuer = _issuer_facts(issuer_cert)
    if not issuer.is_ca:
        raise _err(ErrorCode.UNKNOWN_ISSUER, f"issuer {profile.issuer}: not a CA certificate")
    if profile.basic_constraints.ca and issuer.path_length == 0:
        raise _err(
            ErrorCode.UNKNOWN_ISSUER,
            f"issuer {profile.issuer} cannot issue CA certificates (pathLenConstraint 0)",
        )
    # Cheap checks first: they refuse most bad requests before any signature verification.
    digest = _check_digest(request.digest, profile, issuer)
    not_before, not_after = _check_validity(request.validity_days, profile, now, issuer)
    parsed, spkac_sig = _parse_request_blob(request.csr)
    key_type = _check_key(parsed.public_key, profile)
    if spkac_sig is not None:
        _verify_spkac(parsed.public_key, *spkac_sig)
    elif parsed.csr is not None:
        _verify_pkcs10(parsed.csr, parsed.public_key)
    if request.challenge is not None:
        _check_challenge(parsed, request.challenge)

    if request.subject is not None:
        subject = _resolve_subject(request.subject, profile, from_csr=False)
    elif parsed.name is not None:
        try:
            from_csr = _subject_from_name(parsed.name)
        except Exception as exc:
            raise _err(ErrorCode.BAD_CSR, f"malformed CSR subject: {_short(str(exc))}") from None
        subject = _resolve_subject(from_csr, profile, from_csr=True)
    else:
        subject = _resolve_subject(parsed.subject or [], profile, from_csr=True)

    if request.sans is not None:
        sans = _resolve_sans(request.sans, profile, suffixes)
    elif profile.sans.copy_csr_sans:
        sans = _resolve_sans(_sans_from_csr(parsed.csr), profile, suffixes)
    else:
        sans = _resolve_sans([], profile, suffixes)
    subject = _apply_cn_rule(subject, sans, profile)

    try:
        name = x509.Name(
            [x509.NameAttribute(_SHORT_TO_OID[attr], value) for attr, value in subject]
        )
    except ValueError as exc:
        raise _err(ErrorCode.BAD_SUBJECT, f"subject: {_short(str(exc))}") from None

    compiled = _compiled(profile)
    extensions: list[x509.Extension[x509.ExtensionType]] = [
        compiled.fixed[0],  # basicConstraints
        compiled.key_usage[key_type],
        *compiled.fixed[1:],
        x509.Extension(
            ExtensionOID.SUBJECT_KEY_IDENTIFIER,
            False,
            x509.SubjectKeyIdentifier.from_public_key(parsed.public_key),
        ),
        issuer.aki,
    ]
    if sans:
        # RFC 5280 4.2.1.6: critical exactly when the subject is empty.
        extensions.append(
            x509.Extension(
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                not subject,
                x509.SubjectAlternativeName([_general_name(k, v) for k, v in sans]),
            )
        )
    return CertificatePlan(
        profile=profile.name,
        kind=profile.kind,
        issuer=profile.issuer,
        issuer_subject=issuer.subject,
        subject=name,
        sans=tuple(sans),
        public_key=parsed.public_key,
        key_type=key_type,
        not_before=not_before,
        not_after=not_after,
        digest=digest,
        extensions=tuple(extensions),
        csr_format=parsed.fmt,
    )


def certificate_builder(
    plan: CertificatePlan, serial: int, issuer_cert: x509.Certificate
) -> x509.CertificateBuilder:
    """The planned certificate with its serial, ready to sign (one TBS for every signer)."""
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 < serial < 2**159:
        raise ValueError("serial must be an integer with 0 < serial < 2**159")
    if issuer_cert.subject != plan.issuer_subject:
        raise ValueError("issuer certificate differs from the one the plan was made for")
    return x509.CertificateBuilder(
        issuer_name=issuer_cert.subject,
        subject_name=plan.subject,
        public_key=plan.public_key,
        serial_number=serial,
        not_valid_before=plan.not_before,
        not_valid_after=plan.not_after,
        extensions=list(plan.extensions),
    )


def signature_hash(plan: CertificatePlan, issuer_key: Any) -> SignatureHash | None:
    """The planned digest, or None for EdDSA issuers (which hash by themselves)."""
    if isinstance(issuer_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return None
    return _HASHES[plan.digest]


def build_certificate(
    plan: CertificatePlan, serial: int, issuer_key: Any, issuer_cert: x509.Certificate
) -> bytes:
    """Assemble and sign the planned certificate, without linting; returns DER.

    RSA issuers sign PKCS#1 v1.5 and EC issuers ECDSA, with the planned digest; any object
    registered as a cryptography private key works (HSM-backed keys included). The signer itself
    issues through signer/pki/lint.py's `sign_after_lint`, which lints the same TBS first.
    """
    builder = certificate_builder(plan, serial, issuer_cert)
    certificate = builder.sign(issuer_key, signature_hash(plan, issuer_key))
    return certificate.public_bytes(serialization.Encoding.DER)
