"""Error codes of the signer: every failure is data with a stable code and a human message.

The codes are part of the wire protocol (docs/protocol.md lists each one); never rename a code,
only add new ones. Components raise `SignerError(code, message)`; the protocol handler turns it
into an error response. Anything else that escapes a handler becomes `internal_error`.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class ErrorCode(StrEnum):
    # Framing and envelope (signer/framing.py, signer/protocol.py)
    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_CRC = "bad_crc"
    BAD_MSGPACK = "bad_msgpack"
    BAD_ENVELOPE = "bad_envelope"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGUMENTS = "bad_arguments"
    BUSY = "busy"
    INTERNAL_ERROR = "internal_error"
    # Client side only: never sent by the signer
    TIMEOUT = "timeout"
    LINK_DOWN = "link_down"
    BAD_ROW = "bad_row"  # the WebDB client: a row that cannot become a request
    BAD_CRL = "bad_crl"  # client side: a fetched CRL failed verification
    # Idempotency
    REQUEST_ID_CONFLICT = "request_id_conflict"
    UNKNOWN_REQUEST = "unknown_request"
    # X.509 issuance (signer/x509_signing.py, signer/profiles.py)
    UNKNOWN_PROFILE = "unknown_profile"
    UNKNOWN_ISSUER = "unknown_issuer"
    BAD_CSR = "bad_csr"
    BAD_CSR_SIGNATURE = "bad_csr_signature"
    UNSUPPORTED_KEY = "unsupported_key"
    WEAK_KEY = "weak_key"
    FORBIDDEN_SUBJECT_ATTRIBUTE = "forbidden_subject_attribute"
    BAD_SUBJECT = "bad_subject"
    FORBIDDEN_SAN_TYPE = "forbidden_san_type"
    BAD_SAN = "bad_san"
    VALIDITY_TOO_LONG = "validity_too_long"
    BAD_VALIDITY = "bad_validity"
    BAD_DIGEST = "bad_digest"
    FIELD_TOO_LARGE = "field_too_large"
    LINT_FAILED = "lint_failed"
    # Revocation (signer/revocation.py)
    UNKNOWN_CERTIFICATE = "unknown_certificate"
    BAD_REASON = "bad_reason"
    ALREADY_REVOKED = "already_revoked"
    # CRL (signer/crl.py)
    CRL_UNAVAILABLE = "crl_unavailable"
    # OpenPGP (signer/openpgp_signing.py)
    PGP_MALFORMED = "pgp_malformed"
    PGP_MULTIPLE_KEYS = "pgp_multiple_keys"
    PGP_SECRET_KEY = "pgp_secret_key"
    PGP_NO_MATCHING_UID = "pgp_no_matching_uid"
    PGP_KEY_REVOKED = "pgp_key_revoked"
    PGP_KEY_EXPIRED = "pgp_key_expired"
    PGP_UID_REVOKED = "pgp_uid_revoked"
    PGP_WEAK_KEY = "pgp_weak_key"
    INPUT_TOO_LARGE = "input_too_large"
    # HSM (signer/hsm.py)
    HSM_UNAVAILABLE = "hsm_unavailable"
    HSM_LOGIN_FAILED = "hsm_login_failed"
    HSM_KEY_NOT_FOUND = "hsm_key_not_found"
    HSM_ERROR = "hsm_error"
    # Repository and replication (storage/, replication/)
    REPOSITORY_ERROR = "repository_error"
    NO_QUORUM = "no_quorum"
    NOT_COMMITTED = "not_committed"
    CLOCK_BEHIND = "clock_behind"


class SignerError(Exception):
    """A failure with a protocol error code; its message is safe to send over the line."""

    def __init__(self, code: ErrorCode | str, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message
        self.details = details or {}

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"

    def to_wire(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.details:
            error["details"] = self.details
        return error
