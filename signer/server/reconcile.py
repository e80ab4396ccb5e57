"""`record_x509`: a certificate this signer issued, recorded again after a restore lost it.

A repository restored from an older copy (docs/operations.md, Restore) lacks the certificates
issued after the copy was taken, while the WebDB holds them (the files its rows name). Issuing
them again would make second certificates for one request; `signer webdb-client --reconcile`
sends each lost certificate instead, under its request id, and the signer records it once it
has checked that one of its issuers signed it and that its serial is free (or already holds
exactly this certificate). The line brings attributes, never authority: only a certificate
the CA itself signed can be recorded, and recording changes nothing it has decided since.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from signer.errors import ErrorCode, SignerError
from signer.pki.der import serial_hex
from signer.server.recorder import Recorder
from signer.wire.protocol import RecordX509Args, RecordX509Result
from storage import Duplicate, Issued, IssueX509

if TYPE_CHECKING:
    from signer.server.ca import CertificateAuthority, Issuer
    from signer.server.dispatch import Handler, RequestContext

log = logging.getLogger(__name__)

RECORDED_PROFILE = "recorded"  # the profile field of a certificate recorded by reconcile


class Reconciler:
    """The `record_x509` handler over the CA's issuers and repository."""

    def __init__(self, ca: CertificateAuthority):
        self.ca = ca
        self.recorder = Recorder(ca.log)

    def handlers(self) -> dict[str, Handler]:
        return {"record_x509": self.record_x509}

    async def record_x509(self, args: RecordX509Args, ctx: RequestContext) -> RecordX509Result:
        certificate = _parse(args.certificate)
        issuer = self._signer_of(certificate)
        serial = certificate.serial_number
        der = args.certificate
        recorded = self.ca.repository.get_request(ctx.request_id)
        if recorded is not None:
            return self._recorded_before(recorded.result, issuer, serial, ctx.request_id)
        existing = self.ca.repository.get_certificate(issuer.key_id, serial)
        if existing is not None:
            if existing.get("der") != der:
                raise SignerError(
                    ErrorCode.REPOSITORY_ERROR,
                    f"serial {serial_hex(serial)} of {issuer.name} holds another certificate",
                )
            return RecordX509Result(
                status="already_recorded", issuer=issuer.name, serial=serial_hex(serial)
            )
        not_before = int(certificate.not_valid_before_utc.timestamp())
        command = IssueX509(
            request_id=ctx.request_id,
            request_digest=ctx.digest,
            issuer=issuer.key_id,
            serial=serial,
            der=der,
            profile=RECORDED_PROFILE,
            not_before=not_before,
            not_after=int(certificate.not_valid_after_utc.timestamp()),
            issued_at=not_before,
        )
        result = await self.recorder.record(command)
        issued = result.original if isinstance(result, Duplicate) else result
        if not isinstance(issued, Issued) or issued.serial != serial:
            raise SignerError(ErrorCode.INTERNAL_ERROR, f"recording was answered {result.status}")
        log.warning(
            "recorded %s serial %s again (request %s): issued before a restore lost it",
            issuer.name,
            serial_hex(serial),
            ctx.request_id,
        )
        status = "recorded" if not isinstance(result, Duplicate) else "already_recorded"
        return RecordX509Result(status=status, issuer=issuer.name, serial=serial_hex(serial))

    def _signer_of(self, certificate: x509.Certificate) -> Issuer:
        """The configured issuer whose key signed `certificate`; unknown_issuer otherwise."""
        for issuer in self.ca.issuers.values():
            if issuer.certificate.subject != certificate.issuer:
                continue
            try:
                certificate.verify_directly_issued_by(issuer.certificate)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return issuer
        raise SignerError(
            ErrorCode.UNKNOWN_ISSUER, "the certificate was not signed by any issuer of this signer"
        )

    @staticmethod
    def _recorded_before(result: Any, issuer: Issuer, serial: int, request_id: str) -> Any:
        if isinstance(result, Issued) and result.serial == serial:
            return RecordX509Result(
                status="already_recorded", issuer=issuer.name, serial=serial_hex(serial)
            )
        raise SignerError(
            ErrorCode.REQUEST_ID_CONFLICT,
            f"request id {request_id!r} records another outcome",
        )


def _parse(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise SignerError(ErrorCode.BAD_ARGUMENTS, f"not a DER certificate: {exc}") from None
