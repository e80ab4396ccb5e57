"""Revocation: RFC 5280 reason codes and the CRL entry of a revoked certificate, encoded once.

A revoked entry never changes once written, so its DER is computed here at revocation time,
carried in the repository command, and reused verbatim by every CRL after it.
"""

from __future__ import annotations

from datetime import UTC, datetime

from signer.errors import ErrorCode, SignerError, bad_arguments
from signer.pki.der import der_generalized_time, der_integer, der_time, der_tlv

# RFC 5280 §5.3.1 CRLReason; 7 is unused; unspecified (0) is never encoded (omit the extension);
# removeFromCRL (8) belongs to delta CRLs only.
REASON_CODES: dict[str, int] = {
    "keyCompromise": 1,
    "cACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "certificateHold": 6,
    "privilegeWithdrawn": 9,
    "aACompromise": 10,
}
REASON_NAMES = {code: name for name, code in REASON_CODES.items()}
_ASN1_REASONS = {
    1: "key_compromise",
    2: "ca_compromise",
    3: "affiliation_changed",
    4: "superseded",
    5: "cessation_of_operation",
    6: "certificate_hold",
    9: "privilege_withdrawn",
    10: "aa_compromise",
}
_REASON_OID = bytes.fromhex("0603551d15")  # id-ce-cRLReasons 2.5.29.21
_INVALIDITY_OID = bytes.fromhex("0603551d18")  # id-ce-invalidityDate 2.5.29.24


def reason_code(name: str | None) -> int | None:
    """The RFC 5280 code for a reason name; None means no reason code at all."""
    if name is None or name == "unspecified":
        return None
    try:
        return REASON_CODES[name]
    except KeyError:
        known = ", ".join(REASON_CODES)
        raise SignerError(
            ErrorCode.BAD_REASON,
            f"unknown or not allowed revocation reason {name[:40]!r}",
            {"known": known},
        ) from None


def revocation_time(
    requested: datetime | None, now: datetime, not_before: datetime | None
) -> datetime:
    """Whole seconds (what DER times hold); a requested time lies between the certificate's
    notBefore (when known: an imported record may lack it) and the signer's clock."""
    when = now if requested is None else bounded_time("revoked_at", requested, now, not_before)
    return when.replace(microsecond=0)


def bounded_time(
    field: str, requested: datetime, now: datetime, not_before: datetime | None
) -> datetime:
    """A caller's time for a certificate (revocation, invalidity), refused when it lies before
    the certificate existed or after now: a CRL must never state either."""
    when = requested.astimezone(UTC)
    if when > now:
        raise bad_arguments(field, f"{when:%Y-%m-%dT%H:%M:%SZ} lies after the signer's clock")
    if not_before is not None and when < not_before:
        raise bad_arguments(
            field, f"{when:%Y-%m-%dT%H:%M:%SZ} lies before the certificate's notBefore"
        )
    return when


def crl_entry(
    serial: int, revoked_at: datetime, reason: int | None, invalidity_date: datetime | None
) -> bytes:
    """DER of one revokedCertificates entry (RFC 5280 §5.1.2.6), extensions non-critical."""
    invalidity = None if invalidity_date is None else int(invalidity_date.timestamp())
    return encode_crl_entry(serial, int(revoked_at.timestamp()), reason, invalidity)


def encode_crl_entry(
    serial: int, revoked_at: int, reason: int | None, invalidity_date: int | None
) -> bytes:
    """`crl_entry` on Unix seconds, written by hand: an import encodes hundreds of thousands.

    reasonCode is left out for None and for unspecified (0), as RFC 5280 §5.3.1 asks; the
    invalidityDate is a GeneralizedTime (§5.3.2)."""
    extensions = b""
    if reason:
        if reason not in _ASN1_REASONS:
            raise ValueError(f"not a CRL entry reason: {reason}")
        extensions += der_tlv(0x30, _REASON_OID + der_tlv(0x04, bytes((0x0A, 1, reason))))
    if invalidity_date is not None:
        value = der_generalized_time(invalidity_date)
        extensions += der_tlv(0x30, _INVALIDITY_OID + der_tlv(0x04, value))
    body = der_integer(serial) + der_time(revoked_at)
    if extensions:
        body += der_tlv(0x30, extensions)
    return der_tlv(0x30, body)
