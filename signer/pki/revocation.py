"""Revocation: RFC 5280 reason codes and the CRL entry of a revoked certificate, encoded once.

A revoked entry never changes once written, so its DER is computed here at revocation time,
carried in the repository command, and reused verbatim by every CRL after it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from asn1crypto import crl as asn1_crl

from signer.errors import ErrorCode, SignerError

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
FUTURE_TOLERANCE = timedelta(minutes=5)


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


def revocation_time(requested: datetime | None, now: datetime) -> datetime:
    """Whole seconds (what DER times hold), never in the future beyond clock tolerance."""
    when = now if requested is None else requested.astimezone(UTC)
    if when > now + FUTURE_TOLERANCE:
        raise SignerError(ErrorCode.BAD_ARGUMENTS, "revoked_at lies in the future")
    return when.replace(microsecond=0)


def crl_entry(
    serial: int, revoked_at: datetime, reason: int | None, invalidity_date: datetime | None
) -> bytes:
    """DER of one revokedCertificates entry (RFC 5280 §5.1.2.6), extensions non-critical."""
    extensions = []
    if reason is not None:
        extensions.append(
            {"extn_id": "crl_reason", "critical": False, "extn_value": _ASN1_REASONS[reason]}
        )
    if invalidity_date is not None:
        extensions.append(
            {
                "extn_id": "invalidity_date",
                "critical": False,
                "extn_value": invalidity_date.astimezone(UTC).replace(microsecond=0),
            }
        )
    entry: dict[str, object] = {
        "user_certificate": serial,
        "revocation_date": _time(revoked_at),
    }
    if extensions:
        entry["crl_entry_extensions"] = extensions
    der: bytes = asn1_crl.RevokedCertificate(entry).dump()
    return der


def _time(moment: datetime) -> dict[str, datetime]:
    """UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 §5.1.2.4)."""
    moment = moment.astimezone(UTC).replace(microsecond=0)
    return {"utc_time": moment} if moment.year < 2050 else {"general_time": moment}
