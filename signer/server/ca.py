"""The CA service: X.509 issuance and revocation with HSM keys, recorded through the log.

Every decision (serial, times, the signed DER, the pre-encoded CRL entry) is taken here, before
the command goes to the log; the repository only records it. A request id that was already
recorded returns the recorded outcome and never reaches the HSM again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from replication.log import Log
from signer.clock import utcnow
from signer.errors import ErrorCode, SignerError
from signer.pki.der import serial_hex
from signer.pki.lint import sign_after_lint
from signer.pki.profiles import Channel, Profile, ProfileSet
from signer.pki.revocation import (
    REASON_NAMES,
    bounded_time,
    crl_entry,
    reason_code,
    revocation_time,
)
from signer.pki.suffixes import PublicSuffixes, shipped
from signer.pki.x509_signing import (
    CertificatePlan,
    IssuanceRequest,
    new_serial,
    plan_certificate,
)
from signer.server.dispatch import Handler, RequestContext
from signer.server.health import Section
from signer.server.hsm import Hsm, status_problems
from signer.server.recorder import Recorder
from signer.wire.protocol import (
    IssuerInfo,
    ListIssuersResult,
    ListProfilesResult,
    ProfileInfo,
    RequestStatusResult,
    RevokeX509Args,
    RevokeX509Result,
    SignX509Args,
    SignX509Result,
)
from storage import (
    AlreadyRevoked,
    Duplicate,
    Issued,
    IssueX509,
    Repository,
    Result,
    Revocation,
    Revoked,
    RevokeX509,
)

log = logging.getLogger(__name__)

CA_EXPIRY_WARNING_DAYS = 90

#: Threads that build, lint and sign certificates: one per HSM signing session, and one more that
#: prepares the next certificate while every session signs, so that the HSM never waits for
#: Python between signatures (bench/issuance.py, docs/performance.md "Issuance").
SPARE_BUILD_THREADS = 1


class KeyMismatchError(SignerError):
    """An issuer's HSM key is not the key of its certificate: the signer must not start."""


@dataclass(frozen=True)
class Issuer:
    """A CA certificate and its signing key in the HSM."""

    name: str
    certificate: x509.Certificate
    key_label: str
    key_id: bytes  # RFC 5280 method 1 key identifier: SHA-1 of the subjectPublicKey

    @classmethod
    def load(cls, name: str, certificate: Path, key_label: str) -> Issuer:
        cert = x509.load_pem_x509_certificate(certificate.read_bytes())
        key_id = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
        return cls(name, cert, key_label, key_id)

    def matches(self, reference: str) -> bool:
        """By name, RFC 4514 DN, or hex key identifier (what revoke_x509 may send)."""
        return (
            reference
            in (
                self.name,
                self.certificate.subject.rfc4514_string(),
            )
            or reference.lower().replace(":", "") == self.key_id.hex()
        )


class CertificateAuthority:
    def __init__(
        self,
        issuers: list[Issuer],
        profiles: ProfileSet,
        hsm: Hsm,
        repository: Repository,
        commit_log: Log[Result],
        clock: Callable[[], datetime] = utcnow,
        suffixes: PublicSuffixes | None = None,
    ):
        self.issuers = {issuer.name: issuer for issuer in issuers}
        self.profiles = profiles
        self.hsm = hsm
        self.repository = repository
        self.log = commit_log
        self.recorder = Recorder(commit_log)
        self.clock = clock
        self.suffixes = shipped() if suffixes is None else suffixes
        self._builders = ThreadPoolExecutor(
            hsm.settings.signing_sessions + SPARE_BUILD_THREADS, thread_name_prefix="x509-build"
        )
        for profile in profiles.profiles.values():
            if profile.issuer not in self.issuers:
                log.warning("profile %s: issuer %s is not configured", profile.name, profile.issuer)

    def check_keys(self) -> None:
        """Each issuer's HSM key must be the key of its certificate: checked once at start."""
        for issuer in self.issuers.values():
            key = self.hsm.key(issuer.key_label)
            if key.public_key() != issuer.certificate.public_key():
                raise KeyMismatchError(
                    ErrorCode.HSM_KEY_NOT_FOUND,
                    f"issuer {issuer.name}: HSM key {issuer.key_label!r} does not match the "
                    "public key of its CA certificate",
                )

    def handlers(self) -> dict[str, Handler]:
        return {
            "sign_x509": self.sign_x509,
            "revoke_x509": self.revoke_x509,
            "list_issuers": self.list_issuers,
            "list_profiles": self.list_profiles,
        }

    # --- sign_x509 ---------------------------------------------------------------------------

    async def sign_x509(
        self, args: SignX509Args, ctx: RequestContext, channel: Channel = "line"
    ) -> SignX509Result:
        """Issue (or return the certificate recorded under ctx.request_id). `channel` is who
        asks: the dispatcher never passes anything but "line"; only the operator's control
        socket (signer/server/operator.py) passes "operator" for CA, OCSP and TSA profiles."""
        recorded = self._recorded(ctx, IssueX509.op)
        if isinstance(recorded, Issued):
            return self._issued_result(recorded)
        profile, issuer, plan = self.plan(args, channel)
        serial = self._fresh_serial(issuer)
        loop = asyncio.get_running_loop()
        der = await loop.run_in_executor(self._builders, self._build, plan, serial, issuer)
        command = IssueX509(
            request_id=ctx.request_id,
            request_digest=ctx.digest,
            issuer=issuer.key_id,
            serial=serial,
            der=der,
            profile=profile.name,
            not_before=int(plan.not_before.timestamp()),
            not_after=int(plan.not_after.timestamp()),
            issued_at=int(self.clock().timestamp()),
        )
        result = await self.recorder.record(command)
        issued = result.original if isinstance(result, Duplicate) else result
        if not isinstance(issued, Issued):
            raise SignerError(ErrorCode.INTERNAL_ERROR, f"issuing was answered {result.status}")
        log.info(
            "issued %s serial %s under %s (request %s)",
            issuer.name,
            serial_hex(issued.serial),
            profile.name,
            ctx.request_id,
        )
        if issued.serial == serial and issued.issuer == issuer.key_id:
            return self._built(issuer, command)  # recorded as built: no need to read it back
        return self._issued_result(issued)  # the id was recorded first by a concurrent copy

    def plan(
        self, args: SignX509Args, channel: Channel = "line"
    ) -> tuple[Profile, Issuer, CertificatePlan]:
        """Every check and decision of an issuance but the serial and the signature."""
        profile = self.profiles.get(args.profile, channel)
        issuer = self._issuer_named(profile.issuer)
        self._not_importing(issuer)
        request = IssuanceRequest(
            csr=args.csr,
            profile=args.profile,
            subject=None if args.subject is None else [(k, v) for k, v in args.subject],
            sans=None if args.sans is None else [(k, v) for k, v in args.sans],
            validity_days=args.validity_days,
            digest=args.digest,
            challenge=args.challenge,
        )
        plan = plan_certificate(
            request, profile, issuer.certificate, self.clock(), channel, self.suffixes
        )
        return profile, issuer, plan

    def _build(self, plan: CertificatePlan, serial: int, issuer: Issuer) -> bytes:
        """Runs in a builder thread: key lookup (cached by the Hsm), TBS, lint, HSM signature, DER.
        The signature runs in one of the Hsm's signing sessions, outside its lock; one trip off
        the event loop per certificate."""
        key = self.hsm.key(issuer.key_label)
        return sign_after_lint(plan, serial, key, issuer.certificate)

    def _fresh_serial(self, issuer: Issuer) -> int:
        while True:
            serial = new_serial()
            if not self.repository.serial_exists(issuer.key_id, serial):
                return serial

    def _issued_result(self, issued: Issued) -> SignX509Result:
        issuer = self._issuer_by_key_id(issued.issuer)
        record = self.repository.get_certificate(issued.issuer, issued.serial)
        if record is None:
            raise SignerError(ErrorCode.REPOSITORY_ERROR, "recorded certificate not found")
        return _signed(issuer, record["der"], issued.serial, issued.not_before, issued.not_after)

    @staticmethod
    def _built(issuer: Issuer, command: IssueX509) -> SignX509Result:
        return _signed(issuer, command.der, command.serial, command.not_before, command.not_after)

    # --- revoke_x509 -------------------------------------------------------------------------

    async def revoke_x509(self, args: RevokeX509Args, ctx: RequestContext) -> RevokeX509Result:
        recorded = self._recorded(ctx, RevokeX509.op)
        if isinstance(recorded, Revoked):
            return self._revoked_result(recorded)
        issuer = self._issuer_ref(args.issuer)
        serial = int(args.serial, 16)
        reason = reason_code(args.reason)
        certificate = self.repository.get_certificate(issuer.key_id, serial)
        if certificate is None:
            raise SignerError(
                ErrorCode.UNKNOWN_CERTIFICATE,
                f"{issuer.name} never issued a certificate with serial {serial_hex(serial)}",
            )
        if certificate["revocation"] is not None:
            return self._revoked_result(certificate["revocation"], already=True)
        now = self.clock()
        known = certificate["not_before"]
        not_before = None if known is None else datetime.fromtimestamp(known, UTC)
        revoked_at = revocation_time(args.revoked_at, now, not_before)
        invalidity = None
        if args.invalidity_date is not None:
            invalidity = bounded_time("invalidity_date", args.invalidity_date, now, not_before)
            invalidity = invalidity.replace(microsecond=0)
        command = RevokeX509(
            request_id=ctx.request_id,
            request_digest=ctx.digest,
            issuer=issuer.key_id,
            serial=serial,
            reason=reason,
            revoked_at=int(revoked_at.timestamp()),
            invalidity_date=int(invalidity.timestamp()) if invalidity else None,
            crl_entry=crl_entry(serial, revoked_at, reason, invalidity),
        )
        result = await self.recorder.record(command)
        revocation = result.original if isinstance(result, Duplicate) else result
        if not isinstance(revocation, Revocation):
            raise SignerError(ErrorCode.INTERNAL_ERROR, f"revoking was answered {result.status}")
        log.info("revoked %s serial %s (request %s)", issuer.name, args.serial, ctx.request_id)
        return self._revoked_result(revocation, already=isinstance(revocation, AlreadyRevoked))

    def _revoked_result(self, revocation: Revocation, already: bool = False) -> RevokeX509Result:
        reason = revocation.reason
        return RevokeX509Result(
            status="already_revoked" if already else "revoked",
            issuer=self._issuer_by_key_id(revocation.issuer).name,
            serial=serial_hex(revocation.serial),
            revoked_at=datetime.fromtimestamp(revocation.revoked_at, UTC),
            reason=REASON_NAMES.get(reason) if reason is not None else None,
        )

    # --- descriptions ------------------------------------------------------------------------

    async def list_issuers(self, _args: Any, _ctx: RequestContext) -> ListIssuersResult:
        return ListIssuersResult(
            issuers=[
                IssuerInfo(
                    name=issuer.name,
                    key_id=issuer.key_id,
                    subject=issuer.certificate.subject.rfc4514_string(),
                    certificate=issuer.certificate.public_bytes(Encoding.DER),
                    not_after=issuer.certificate.not_valid_after_utc,
                )
                for issuer in self.issuers.values()
            ]
        )

    async def list_profiles(self, _args: Any, _ctx: RequestContext) -> ListProfilesResult:
        infos, now = [], self.clock()
        for profile in self.profiles.offered():  # operator profiles are not offered to the line
            infos.append(
                ProfileInfo(
                    name=profile.name,
                    issuer=profile.issuer,
                    default_validity_days=min(
                        profile.validity.default_days, profile.validity.effective_max_days(now)
                    ),
                    max_validity_days=profile.validity.effective_max_days(now),
                    digests=list(profile.digests),
                    subject_attributes=sorted(profile.subject.attributes),
                    san_types=sorted(profile.sans.allowed),
                    rules=profile_rules(profile, now),
                )
            )
        return ListProfilesResult(profiles=infos)

    def request_status(self, request_id: str) -> RequestStatusResult | None:
        """The recorded outcome of a writing request, or None when nothing was recorded."""
        recorded = self.repository.get_request(request_id)
        if recorded is None:
            return None
        if isinstance(recorded.result, Issued):
            issued = _dump(self._issued_result(recorded.result))
            return RequestStatusResult(state="done", command="sign_x509", result=issued)
        if isinstance(recorded.result, Revoked):
            revoked = _dump(self._revoked_result(recorded.result))
            return RequestStatusResult(state="done", command="revoke_x509", result=revoked)
        return RequestStatusResult(state="done", command=recorded.op, result=None)

    # --- health ------------------------------------------------------------------------------

    async def hsm_section(self) -> Section:
        labels = [issuer.key_label for issuer in self.issuers.values()]
        status = await self.hsm.run(self.hsm.status, labels)
        return Section(status, errors=status_problems(status))

    async def cas_section(self) -> Section:
        now = self.clock()
        data, warnings, errors = {}, [], []
        for issuer in self.issuers.values():
            expires = issuer.certificate.not_valid_after_utc
            days = (expires - now).days
            data[issuer.name] = {"not_after": expires, "days_left": days}
            if days < 0:
                errors.append(f"{issuer.name}: CA certificate expired on {expires:%Y-%m-%d}")
            elif days < CA_EXPIRY_WARNING_DAYS:
                warnings.append(f"{issuer.name}: CA certificate expires in {days} days")
        return Section(data, warnings, errors)

    async def repository_section(self) -> Section:
        counts, report = await asyncio.to_thread(self._repository_facts)
        data = {
            "counts": counts,
            "last_applied_index": self.repository.last_applied_index(),
            "consistent": report.ok,
        }
        errors = [] if report.ok else [f"inconsistent: {p}" for p in report.problems[:5]]
        return Section(data, errors=errors)

    def _repository_facts(self) -> tuple[dict[str, Any], Any]:
        counts = self.repository.counts()
        counts["issuers"] = {
            self._issuer_name(bytes.fromhex(k) if isinstance(k, str) else k): v
            for k, v in counts.get("issuers", {}).items()
        }
        return counts, self.repository.check_consistency()

    # --- helpers -----------------------------------------------------------------------------

    def _recorded(self, ctx: RequestContext, op: str) -> Result | None:
        recorded = self.repository.get_request(ctx.request_id)
        if recorded is None:
            return None
        if recorded.op != op or recorded.request_digest != ctx.digest:
            raise SignerError(
                ErrorCode.REQUEST_ID_CONFLICT,
                f"request id {ctx.request_id!r} was used before for another request",
            )
        return recorded.result

    def _not_importing(self, issuer: Issuer) -> None:
        """Nothing is signed for an issuer whose history is being imported (the repository
        would refuse to record it)."""
        state = self.repository.import_state(issuer.key_id)
        if state is not None and not state.finished:
            raise SignerError(
                ErrorCode.IMPORT_CONFLICT,
                f"the history of {issuer.name} is being imported: issuing resumes after it",
            )

    def _issuer_named(self, name: str) -> Issuer:
        issuer = self.issuers.get(name)
        if issuer is None:
            raise SignerError(ErrorCode.UNKNOWN_ISSUER, f"issuer {name!r} is not configured")
        return issuer

    def _issuer_ref(self, reference: str) -> Issuer:
        for issuer in self.issuers.values():
            if issuer.matches(reference):
                return issuer
        raise SignerError(
            ErrorCode.UNKNOWN_ISSUER,
            f"no issuer {reference[:80]!r}; known: {', '.join(self.issuers)}",
        )

    def _issuer_by_key_id(self, key_id: bytes) -> Issuer:
        for issuer in self.issuers.values():
            if issuer.key_id == key_id:
                return issuer
        raise SignerError(ErrorCode.UNKNOWN_ISSUER, f"no configured issuer with key {key_id.hex()}")

    def _issuer_name(self, key_id: bytes) -> str:
        try:
            return self._issuer_by_key_id(key_id).name
        except SignerError:
            return key_id.hex()


def profile_rules(profile: Profile, now: datetime) -> dict[str, Any]:
    """What `list_profiles` shows of a profile: every rule that can refuse a request (subject,
    SANs, keys, validity as in force now), so a client can tell why before it asks."""
    validity = profile.validity.model_dump(by_alias=True)
    validity["max_days"] = profile.validity.effective_max_days(now)
    validity["schedule"] = [
        {"from": datetime.combine(step.from_, time(), UTC), "max_days": step.max_days}
        for step in profile.validity.schedule
    ]
    return {
        "subject": profile.subject.model_dump(),
        "sans": profile.sans.model_dump(),
        "keys": profile.keys.model_dump(),
        "validity": validity,
        "digests": list(profile.digests),
    }


def _signed(
    issuer: Issuer, der: bytes, serial: int, not_before: int, not_after: int
) -> SignX509Result:
    return SignX509Result(
        certificate=der,
        serial=serial_hex(serial),
        issuer=issuer.name,
        not_before=datetime.fromtimestamp(not_before, UTC),
        not_after=datetime.fromtimestamp(not_after, UTC),
    )


def _dump(result: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = result.model_dump(mode="python", exclude_none=True)
    return dumped
