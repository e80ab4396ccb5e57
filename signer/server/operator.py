"""Operator issuance: CA, OCSP-signing and time-stamping certificates, ordered at the signer.

The serial line may only use end-entity profiles (`channel: line`); a profile that would create
an authority (`channel: operator`) is refused there with `operator_only`. The operator asks for
such a certificate through the control socket, which exists on the signer host only (mode 0600):
`signer ceremony-issue REQUEST.yaml` sends `issue_preview`, shows what would be signed, asks for
confirmation, then sends `issue`. The certificate goes through the same planning, lint, HSM
signature and log as any issuance, and is recorded under a request id, so ordering the same
request twice returns the first certificate instead of a second one.

    {"cmd": "issue_preview", "request": {...}} -> {"ok": true, "result": {plan}}
    {"cmd": "issue", "request": {...}}         -> {"ok": true, "result": {certificate, ...}}

`request` holds sign_x509's arguments (docs/protocol.md, `csr` as PEM text) plus an optional
`request_id`; without one the id is derived from the request itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError

from signer.errors import ErrorCode, SignerError
from signer.server.ca import CertificateAuthority
from signer.server.control import Command
from signer.server.dispatch import RequestContext
from signer.wire.protocol import MAX_REQUEST_ID, SignX509Args, request_digest

REQUEST_ID_PREFIX = "operator-"


class OperatorIssuance:
    """The control commands that let an operator at the signer use operator-only profiles."""

    def __init__(
        self, ca: CertificateAuthority, barrier: Callable[[], Awaitable[None]] | None = None
    ):
        self.ca = ca
        self.barrier = barrier  # in a cluster: catch up with it before deciding anything

    def control(self) -> dict[str, Command]:
        return {"issue_preview": self.preview, "issue": self.issue}

    async def preview(self, request: dict[str, Any]) -> dict[str, Any]:
        """What `issue` would sign, decided but not signed; and whether it already was."""
        args, ctx = _parse(request)
        if self.barrier is not None:
            await self.barrier()
        recorded = self.ca.repository.get_request(ctx.request_id)
        if recorded is not None:
            result = await self.ca.sign_x509(args, ctx, "operator")  # the recorded one
            return {"request_id": ctx.request_id, "already_issued": _issued(result)}
        profile, issuer, plan = self.ca.plan(args, "operator")
        return {
            "request_id": ctx.request_id,
            "profile": profile.name,
            "kind": profile.kind,
            "issuer": issuer.name,
            "issuer_subject": issuer.certificate.subject.rfc4514_string(),
            "subject": plan.subject.rfc4514_string(),
            "sans": [f"{kind}:{value}" for kind, value in plan.sans],
            "key": plan.key_type,
            "digest": plan.digest,
            "not_before": plan.not_before,
            "not_after": plan.not_after,
            "extensions": [_extension(ext) for ext in plan.extensions],
        }

    async def issue(self, request: dict[str, Any]) -> dict[str, Any]:
        args, ctx = _parse(request)
        if self.barrier is not None:
            await self.barrier()
        return _issued(await self.ca.sign_x509(args, ctx, "operator"))


def _parse(request: dict[str, Any]) -> tuple[SignX509Args, RequestContext]:
    body = request.get("request")
    if not isinstance(body, dict):
        raise SignerError(ErrorCode.BAD_ARGUMENTS, "`request` must be a mapping")
    fields = dict(body)
    request_id = fields.pop("request_id", None)
    if isinstance(fields.get("csr"), str):
        fields["csr"] = fields["csr"].encode()
    try:
        args = SignX509Args.model_validate(fields)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in error['loc']) or 'request'}: {error['msg']}"
            for error in exc.errors()[:10]
        ]
        raise SignerError(
            ErrorCode.BAD_ARGUMENTS, "; ".join(problems), details={"problems": problems}
        ) from None
    digest = request_digest("sign_x509", args.model_dump(exclude_none=True))
    if request_id is None:
        request_id = REQUEST_ID_PREFIX + digest[:16].hex()
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_REQUEST_ID:
        raise SignerError(
            ErrorCode.BAD_ARGUMENTS, f"request_id: a string of 1-{MAX_REQUEST_ID} characters"
        )
    return args, RequestContext(request_id, "sign_x509", digest)


def _issued(result: Any) -> dict[str, Any]:
    certificate = x509.load_der_x509_certificate(result.certificate)
    return {
        "certificate": certificate.public_bytes(serialization.Encoding.PEM).decode(),
        "serial": result.serial,
        "issuer": result.issuer,
        "subject": certificate.subject.rfc4514_string(),
        "not_before": result.not_before,
        "not_after": result.not_after,
    }


def _extension(extension: Any) -> str:
    """One line per extension for the operator's confirmation: name, criticality, value."""
    value = extension.value
    name = extension.oid._name
    critical = " (critical)" if extension.critical else ""
    shown = _extension_value(value)
    return f"{name}{critical}: {shown}" if shown else f"{name}{critical}"


def _extension_value(value: Any) -> str:
    if isinstance(value, x509.BasicConstraints):
        return f"CA:{str(value.ca).upper()}" + (
            f", pathlen:{value.path_length}" if value.path_length is not None else ""
        )
    if isinstance(value, x509.KeyUsage):
        names = [
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        ]
        return ", ".join(name for name in names if getattr(value, name))
    if isinstance(value, x509.ExtendedKeyUsage):
        return ", ".join(usage._name for usage in value)
    if isinstance(value, x509.SubjectKeyIdentifier | x509.AuthorityKeyIdentifier):
        digest = getattr(value, "digest", None) or getattr(value, "key_identifier", None)
        return digest.hex() if digest else ""
    return ""
