"""Errors of the signer: every failure is data with a stable type, and refusals carry a wire code.

Families, by where a failure comes from (the wire code each maps to is documented in
docs/protocol.md; the signer host maps storage and replication failures in one place,
signer/server/errors.py):

- `SignerError` and its subclasses: a refusal or failure the signer answers over the line with
  an `ErrorCode` (`ProtocolError` for frames, envelopes and arguments; `HsmError` for the HSM;
  the request-specific refusals of issuance, revocation, CRLs and OpenPGP use `SignerError`
  itself). The message is safe to send.
- `ConfigError`: a configuration file is wrong. Never a wire code; the command line exits 2.
- `ClientFailure`: what the client sees without the signer saying it (a bad WebDB row, a CRL that
  does not verify); never a wire code. Its subclass `Unreachable` (`LinkDown`, `RequestTimeout`):
  the client could not reach the signer; the command line exits 3.

Never rename a wire code, only add new ones.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

MAX_MESSAGE_CHARS = 500  # an error message, as sent on the line


class ErrorCode(StrEnum):
    """The error codes the signer sends; nothing else is ever in an error answer."""

    # Framing and envelope (signer/wire/framing.py, signer/wire/protocol.py)
    BAD_FRAME = "bad_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_CRC = "bad_crc"
    BAD_MSGPACK = "bad_msgpack"
    BAD_ENVELOPE = "bad_envelope"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGUMENTS = "bad_arguments"
    BUSY = "busy"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"
    # Idempotency
    REQUEST_ID_CONFLICT = "request_id_conflict"
    UNKNOWN_REQUEST = "unknown_request"
    # X.509 issuance (signer/pki/x509_signing.py, signer/pki/profiles.py)
    UNKNOWN_PROFILE = "unknown_profile"
    UNKNOWN_ISSUER = "unknown_issuer"
    BAD_CSR = "bad_csr"
    BAD_CSR_SIGNATURE = "bad_csr_signature"
    BAD_CHALLENGE = "bad_challenge"
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
    OPERATOR_ONLY = "operator_only"
    # Revocation (signer/pki/revocation.py)
    UNKNOWN_CERTIFICATE = "unknown_certificate"
    BAD_REASON = "bad_reason"
    ALREADY_REVOKED = "already_revoked"
    # CRL (signer/server/crl.py)
    CRL_UNAVAILABLE = "crl_unavailable"
    # OpenPGP (signer/pki/openpgp.py, signer/server/openpgp.py)
    PGP_MALFORMED = "pgp_malformed"
    PGP_MULTIPLE_KEYS = "pgp_multiple_keys"
    PGP_SECRET_KEY = "pgp_secret_key"
    PGP_NO_MATCHING_UID = "pgp_no_matching_uid"
    PGP_KEY_REVOKED = "pgp_key_revoked"
    PGP_KEY_EXPIRED = "pgp_key_expired"
    PGP_UID_REVOKED = "pgp_uid_revoked"
    PGP_WEAK_KEY = "pgp_weak_key"
    INPUT_TOO_LARGE = "input_too_large"
    # HSM (signer/server/hsm.py)
    HSM_UNAVAILABLE = "hsm_unavailable"
    HSM_LOGIN_FAILED = "hsm_login_failed"
    HSM_KEY_NOT_FOUND = "hsm_key_not_found"
    HSM_ERROR = "hsm_error"
    # Repository and replication (storage/, replication/; mapped in signer/server/errors.py)
    REPOSITORY_ERROR = "repository_error"
    NO_QUORUM = "no_quorum"
    NOT_COMMITTED = "not_committed"
    CLOCK_BEHIND = "clock_behind"
    # Imports of an earlier CA's history (signer/server/importer.py; control socket only)
    IMPORT_CONFLICT = "import_conflict"
    AUDIT_UNAVAILABLE = "audit_unavailable"


class SignerError(Exception):
    """A failure with a wire error code; its message is safe to send over the line."""

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


class ProtocolError(SignerError):
    """A frame, envelope or argument the signer cannot take (framing, envelope, arguments)."""


def bad_arguments(
    field: str, problem: str, code: ErrorCode = ErrorCode.BAD_ARGUMENTS
) -> ProtocolError:
    """A refused argument in the one shape docs/protocol.md gives `bad_arguments` (and
    `field_too_large`): `details.problems` = [{field, problem}]."""
    return ProtocolError(
        code, f"{field}: {problem}", {"problems": [{"field": field, "problem": problem}]}
    )


class HsmError(SignerError):
    """The HSM could not do what was asked (unavailable, login, key missing, signing failed)."""


class ConfigError(Exception):
    """A configuration file is missing, unreadable or wrong; the message says where and why."""


class ClientFailure(Exception):
    """A failure seen by the client, not answered by the signer; `kind` names it (never a wire
    code: a bad WebDB row, a CRL that does not verify, a signer out of reach)."""

    kind = "client_failure"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def to_json(self) -> dict[str, Any]:
        return {"code": self.kind, "message": self.message}


class Unreachable(ClientFailure):
    """The signer could not be reached: the line is down or no answer came in time."""

    kind = "unreachable"


class LinkDown(Unreachable):
    """The serial line is down (no device, unplugged, or lost while sending)."""

    kind = "link_down"


class RequestTimeout(Unreachable):
    """No answer came in time, after every attempt with the same request id."""

    kind = "timeout"
