"""OpenPGP certification with the CA's OpenPGP key held in the HSM (`sign_openpgp`).

Three layers, so that the OpenPGP library can be replaced without touching handlers:

- our own pure code, no library: armor, a packet-level scan of the untrusted blob (framing, secret
  key packets, several primary keys, key algorithm and size), user ID matching and splicing the new
  certification packets into the ORIGINAL bytes, so whatever else the key carries stays as it was;
- `Certifier`, the small interface the service uses, with `PgpyCertifier` inside: PGPy checks the
  self-signatures and revocations and makes the certifications, signing through the HSM key (PGPy
  asks its key material for a `cryptography` private key; ours answers with the HSM-backed one);
- `OpenPgpService`: the `sign_openpgp` handler, recording through the log (idempotent by request
  id), `request_status` for its records, and a health section.

How a request names user IDs: each item of `uids` is either an e-mail address (it contains `@`
and no `<`), which names every user ID of the key whose e-mail part (`<...>`, or the whole user
ID when it is a bare address) equals it, compared case-insensitively; or a whole user ID, which
names the user ID equal to it byte for byte. Every item must name at least one valid user ID or
nothing is certified.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from replication.log import Log
from signer.clock import utcnow
from signer.config import ConfigError
from signer.errors import ErrorCode, SignerError
from signer.pki.openpgp import (
    DIGEST_ORDER,
    MAX_CERTIFIED_UIDS,
    MAX_OWN_PACKETS,
    MAX_UID_BYTES,
    PUBLIC_KEY,
    PUBLIC_SUBKEY,
    SIGNATURE,
    TRUST,
    USER_ATTRIBUTE,
    USER_ID,
    CertificationPolicy,
    CertifiedKey,
    Certifier,
    KeyLayout,
    check_requested,
    match_user_ids,
    read_key,
    refuse,
    signature_issuer,
    splice,
)
from signer.server.config import OpenPgpConfig
from signer.server.dispatch import Handler, RequestContext
from signer.server.health import Section
from signer.server.hsm import Hsm, status_problems
from signer.server.recorder import Recorder
from signer.wire.protocol import (
    RequestStatusResult,
    SignOpenpgpArgs,
    SignOpenpgpResult,
)
from storage import Certified, CertifyOpenpgp, Duplicate, Repository, Result

with warnings.catch_warnings():  # PGPy 0.6 imports the deprecated imghdr
    warnings.simplefilter("ignore", DeprecationWarning)
    import pgpy
    from pgpy.constants import (
        ECPointFormat,
        EllipticCurveOID,
        HashAlgorithm,
        KeyFlags,
        PubKeyAlgorithm,
        SignatureType,
    )
    from pgpy.packet.fields import ECDSAPriv, ECPoint, RSAPriv
    from pgpy.packet.packets import PrivKeyV4
    from pgpy.packet.types import MPI

log = logging.getLogger(__name__)


# --- PGPy with an HSM key --------------------------------------------------------------------


def policy_from_config(config: OpenPgpConfig) -> CertificationPolicy:
    """The certification policy of the `openpgp:` section of signer.yaml."""
    return CertificationPolicy(
        expiry_days=config.expiry_days,
        policy_url=config.policy_url,
        digest=config.digest,
        min_rsa_bits=config.min_rsa_bits,
        curves=frozenset(config.curves),
        max_key_bytes=config.max_key_bytes,
    )


class _HsmRsaMaterial(RSAPriv):
    """RSA key material whose private half is the HSM key: PGPy signs through `__privkey__`."""

    def __init__(self, key: rsa.RSAPrivateKey) -> None:
        super().__init__()
        self._hsm_key = key
        numbers = key.public_key().public_numbers()
        self.n, self.e = MPI(numbers.n), MPI(numbers.e)

    def __privkey__(self) -> rsa.RSAPrivateKey:
        return self._hsm_key


class _HsmEcdsaMaterial(ECDSAPriv):
    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        super().__init__()
        self._hsm_key = key
        numbers = key.public_key().public_numbers()
        self.oid = _CA_CURVES[key.curve.name]
        self.p = ECPoint.from_values(
            self.oid.key_size, ECPointFormat.Standard, MPI(numbers.x), MPI(numbers.y)
        )

    def __privkey__(self) -> ec.EllipticCurvePrivateKey:
        return self._hsm_key


_CA_CURVES = {
    "secp256r1": EllipticCurveOID.NIST_P256,
    "secp384r1": EllipticCurveOID.NIST_P384,
    "secp521r1": EllipticCurveOID.NIST_P521,
}
_HASHES = {
    "sha256": HashAlgorithm.SHA256,
    "sha384": HashAlgorithm.SHA384,
    "sha512": HashAlgorithm.SHA512,
}
# Hashes a user's self-signature may use (gpg 2.2 still accepts SHA-1 self-signatures)
_SELF_SIGNATURE_HASHES = frozenset({"SHA1", "SHA224", "SHA256", "SHA384", "SHA512"})
_KEY_REVOCATION = frozenset({SignatureType.KeyRevocation})
_DIRECT_KEY = frozenset({SignatureType.DirectlyOnKey})
_UID_REVOCATION = frozenset({SignatureType.CertRevocation})
_CERTIFICATIONS = frozenset(
    {
        SignatureType.Generic_Cert,
        SignatureType.Persona_Cert,
        SignatureType.Casual_Cert,
        SignatureType.Positive_Cert,
    }
)

CaKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def ca_digest(key: CaKey, minimum: str) -> str:
    """The policy's digest, raised to match the curve (gpg refuses P-384 with SHA-256)."""
    needed = "sha256"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        needed = {384: "sha384", 521: "sha512"}.get(key.key_size, "sha256")
    return max(minimum, needed, key=DIGEST_ORDER.index)


def build_ca_key(key: CaKey, created: datetime, user_id: str, digest: str) -> pgpy.PGPKey:
    """The CA's OpenPGP key around the HSM key, self-signed at its (fixed) creation time."""
    packet = PrivKeyV4()
    if isinstance(key, rsa.RSAPrivateKey):
        packet.pkalg = PubKeyAlgorithm.RSAEncryptOrSign
        packet.keymaterial = _HsmRsaMaterial(key)
    elif isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _CA_CURVES:
        packet.pkalg = PubKeyAlgorithm.ECDSA
        packet.keymaterial = _HsmEcdsaMaterial(key)
    else:
        raise SignerError(ErrorCode.HSM_ERROR, f"the OpenPGP CA key type {key!r} is not supported")
    packet.created = created
    packet.update_hlen()
    ca = pgpy.PGPKey()
    ca._key = packet
    uid = pgpy.PGPUID.new(user_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ca.add_uid(
            uid,
            usage={KeyFlags.Certify, KeyFlags.Sign},
            hashes=[HashAlgorithm.SHA512, HashAlgorithm.SHA384, HashAlgorithm.SHA256],
            hash=_HASHES[digest],
            created=created,
            primary=True,
        )
    return ca


class PgpyCertifier:
    """`Certifier` on PGPy 0.6, with the CA key in the HSM. Blocking; not for the event loop."""

    def __init__(
        self,
        key_source: Callable[[], CaKey],
        created: datetime,
        user_id: str,
        policy: CertificationPolicy,
    ) -> None:
        self._key_source = key_source
        self._created = created.astimezone(UTC).replace(microsecond=0)
        self._user_id = user_id
        self.policy = policy
        self._ca: pgpy.PGPKey | None = None
        self._digest = policy.digest

    # -- the CA key

    def _ca_key(self) -> pgpy.PGPKey:
        if self._ca is None:
            key = self._key_source()
            self._digest = ca_digest(key, self.policy.digest)
            self._ca = build_ca_key(key, self._created, self._user_id, self._digest)
        return self._ca

    def export_ca_public_key(self) -> bytes:
        return bytes(self._ca_key().pubkey)

    def ca_fingerprint(self) -> bytes:
        return bytes.fromhex(str(self._ca_key().fingerprint).replace(" ", ""))

    @property
    def digest(self) -> str:
        self._ca_key()
        return self._digest

    # -- certification

    def certify(self, public_key_blob: bytes, uids: Sequence[str], now: datetime) -> CertifiedKey:
        check_requested(uids)
        layout = read_key(public_key_blob, self.policy)
        now = now.astimezone(UTC).replace(microsecond=0)
        key = _parse(layout)
        states = _user_id_states(key, now)
        _check_key(key, states, now)
        matches = match_user_ids(layout.user_ids, uids)
        chosen = _choose_user_ids(layout, states, matches)
        ca = self._ca_key()
        expires = now + timedelta(days=self.policy.expiry_days)
        additions = {index: self._certify_one(ca, uid, now) for index, uid in chosen.items()}
        return CertifiedKey(
            public_key=splice(layout, additions),
            fingerprint=layout.fingerprint,
            certified_uids=tuple(layout.user_ids[i].text for i in sorted(chosen)),
            certified_at=now,
            expires=expires,
        )

    def _certify_one(self, ca: pgpy.PGPKey, uid: pgpy.PGPUID, now: datetime) -> bytes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signature = ca.certify(
                uid,
                SignatureType.Generic_Cert,
                hash=_HASHES[self._digest],
                created=now,
                expires=timedelta(days=self.policy.expiry_days),
                policy_uri=self.policy.policy_url,
            )
            if not _verifies(ca, uid, signature):  # a faulty HSM never gets its output out
                raise SignerError(ErrorCode.HSM_ERROR, "the HSM made a certification that fails")
        return bytes(signature)


def _parse(layout: KeyLayout) -> pgpy.PGPKey:
    """PGPy sees the primary key, the user IDs, and the signatures the key made itself: not
    third-party certifications (a flooded key stays cheap), subkeys or user attributes, which are
    copied through untouched. Any failure of PGPy is malformed input."""
    view = _own_view(layout)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            key = pgpy.PGPKey()
            key.parse(bytearray(view))
            primary = bytes(key._key.__bytearray__()[len(key._key.header) :])
    except Exception as exc:  # PGPy on untrusted input can raise anything
        raise refuse(ErrorCode.PGP_MALFORMED, f"unreadable key ({type(exc).__name__})") from None
    if primary != layout.primary:  # PGPy must hash exactly the bytes the key carries
        raise refuse(ErrorCode.PGP_MALFORMED, "the key packet is not in canonical encoding")
    return key


def _own_view(layout: KeyLayout) -> bytes:
    keyid = layout.fingerprint[-8:]
    view, kept, skipping = bytearray(), 0, False
    for index, packet in enumerate(layout.packets):
        if packet.tag in (PUBLIC_SUBKEY, USER_ATTRIBUTE):
            skipping = True
        elif packet.tag in (PUBLIC_KEY, USER_ID):
            skipping = False
        if skipping or packet.tag == TRUST:
            continue
        if packet.tag == SIGNATURE and signature_issuer(layout.body(index)) != keyid:
            continue
        kept += 1
        if kept > MAX_OWN_PACKETS:
            raise refuse(
                ErrorCode.INPUT_TOO_LARGE,
                f"more than {MAX_OWN_PACKETS} user IDs and self-signatures",
            )
        view += layout.raw(index)
    return bytes(view)


def _verifies(key: pgpy.PGPKey, subject: Any, signature: pgpy.PGPSignature) -> bool:
    """Whether `key` made `signature` over `subject` (no issuer subpacket needed)."""
    try:
        algorithm = getattr(hashes, signature.hash_algorithm.name)()
        data = signature.hashdata(subject)
        return bool(key._key.verify(data, signature.__sig__, algorithm))
    except Exception:
        return False


def _valid_self_signatures(
    key: pgpy.PGPKey, subject: Any, signatures: Any, kinds: frozenset[Any], now: datetime
) -> list[pgpy.PGPSignature]:
    found = []
    for signature in signatures:
        try:
            if signature.type not in kinds or signature.created > now + timedelta(minutes=10):
                continue
            if signature.hash_algorithm.name not in _SELF_SIGNATURE_HASHES:
                continue
            expires = signature.expires_at
        except Exception:
            continue
        if (expires is None or expires > now) and _verifies(key, subject, signature):
            found.append(signature)
    return found


@dataclass(frozen=True)
class _UserIdState:
    uid: pgpy.PGPUID
    self_signatures: list[pgpy.PGPSignature]  # valid ones, made by the key itself
    state: str  # valid, revoked (by the key, after its last self-signature) or invalid


def _user_id_states(key: pgpy.PGPKey, now: datetime) -> dict[bytes, _UserIdState]:
    """Each user ID (by its packet body) with its verified self-signatures and revocations."""
    states = {}
    for uid in key.userids:
        signatures = list(uid._signatures)
        own = _valid_self_signatures(key, uid, signatures, _CERTIFICATIONS, now)
        revocations = _valid_self_signatures(key, uid, signatures, _UID_REVOCATION, now)
        latest = max((sig.created for sig in own), default=None)
        state = "invalid" if latest is None else "valid"
        if latest is not None and any(r.created >= latest for r in revocations):
            state = "revoked"
        states[bytes(uid.hashdata)] = _UserIdState(uid, own, state)
    return states


def _check_key(key: pgpy.PGPKey, states: dict[bytes, _UserIdState], now: datetime) -> None:
    if key.created > now:  # a certification older than the key is invalid
        raise refuse(
            ErrorCode.PGP_MALFORMED,
            f"the key was created at {key.created:%Y-%m-%d %H:%M:%S}Z, after the signer's clock "
            f"({now:%Y-%m-%d %H:%M:%S}Z): check the clocks",
        )
    direct = list(key._signatures)
    if _valid_self_signatures(key, key, direct, _KEY_REVOCATION, now):
        raise refuse(ErrorCode.PGP_KEY_REVOKED, "the key is revoked")
    own = _valid_self_signatures(key, key, direct, _DIRECT_KEY, now)
    own += [sig for state in states.values() for sig in state.self_signatures]
    if not own:
        raise refuse(ErrorCode.PGP_MALFORMED, "the key has no valid self-signature")
    latest = max(own, key=lambda sig: sig.created)
    if latest.key_expiration is not None and key.created + latest.key_expiration <= now:
        when = (key.created + latest.key_expiration).strftime("%Y-%m-%d")
        raise refuse(ErrorCode.PGP_KEY_EXPIRED, f"the key expired on {when}")


def _choose_user_ids(
    layout: KeyLayout, states: dict[bytes, _UserIdState], matches: list[list[int]]
) -> dict[int, pgpy.PGPUID]:
    """The user IDs to certify (index -> PGPy object): valid, not revoked, by the key's owner."""
    chosen: dict[int, pgpy.PGPUID] = {}
    for found in matches:
        named = {i: states.get(layout.body(layout.user_ids[i].packet)) for i in found}
        valid = {i: s.uid for i, s in named.items() if s is not None and s.state == "valid"}
        if not valid:
            text = layout.user_ids[found[0]].text[:200]
            if any(s is not None and s.state == "revoked" for s in named.values()):
                raise refuse(ErrorCode.PGP_UID_REVOKED, f"user ID {text!r} is revoked")
            raise refuse(
                ErrorCode.PGP_NO_MATCHING_UID, f"user ID {text!r} has no valid self-signature"
            )
        chosen.update(valid)
    for index in chosen:
        if len(layout.body(layout.user_ids[index].packet)) > MAX_UID_BYTES:
            raise refuse(ErrorCode.INPUT_TOO_LARGE, f"a user ID is over {MAX_UID_BYTES} bytes")
    if len(chosen) > MAX_CERTIFIED_UIDS:
        raise refuse(ErrorCode.INPUT_TOO_LARGE, f"more than {MAX_CERTIFIED_UIDS} user IDs")
    return chosen


# --- the CA's identity from the configuration ------------------------------------------------


def ca_identity(config: OpenPgpConfig) -> tuple[str, datetime]:
    """(key label, creation time): from openpgp-ca.yaml (the ceremony's record) or the config."""
    label, created = config.key, config.created
    if config.ca_file is not None:
        try:
            record = yaml.safe_load(config.ca_file.read_text(encoding="utf-8"))
            recorded_label, when = record["label"], record["created"]
            if not isinstance(when, datetime):
                when = datetime.fromisoformat(str(when).replace("Z", "+00:00"))
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{config.ca_file}: not a readable openpgp-ca.yaml ({exc})") from None
        if label is not None and label != recorded_label:
            raise ConfigError(
                f"openpgp.key is {label!r} but {config.ca_file} records {recorded_label!r}"
            )
        label, created = recorded_label, when
    assert label is not None and created is not None  # the config's validator ensures it
    if created.tzinfo is None:
        created = created.replace(tzinfo=UTC)
    return label, created.astimezone(UTC)


def pgpy_certifier(hsm: Hsm, config: OpenPgpConfig) -> PgpyCertifier:
    label, created = ca_identity(config)
    return PgpyCertifier(
        lambda: _signing_key(hsm, label), created, config.uid, policy_from_config(config)
    )


def _signing_key(hsm: Hsm, label: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    key = hsm.key(label)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise SignerError(ErrorCode.HSM_ERROR, f"the OpenPGP CA key {label!r} is not RSA or EC")
    return key


# --- the service -----------------------------------------------------------------------------


class OpenPgpService:
    """`sign_openpgp`: decide (signature, time), commit through the log, answer from the record."""

    def __init__(
        self,
        certifier: Certifier,
        hsm: Hsm,
        key_label: str,
        repository: Repository,
        commit_log: Log[Result],
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.certifier = certifier
        self.hsm = hsm
        self.key_label = key_label
        self.repository = repository
        self.log = commit_log
        self.recorder = Recorder(commit_log)
        self.clock = clock

    @classmethod
    def from_config(
        cls, config: OpenPgpConfig, hsm: Hsm, repository: Repository, commit_log: Log[Result]
    ) -> OpenPgpService:
        label, _ = ca_identity(config)
        return cls(pgpy_certifier(hsm, config), hsm, label, repository, commit_log)

    def handlers(self) -> dict[str, Handler]:
        return {"sign_openpgp": self.sign_openpgp}

    async def warm_up(self) -> None:
        """Build the CA key once at start (one HSM signature) and log its fingerprint."""
        try:
            fingerprint = await self.hsm.run(self.certifier.ca_fingerprint)
        except SignerError as exc:
            log.warning("OpenPGP CA key not available now (%s); retried per request", exc)
            return
        log.info("OpenPGP CA key %s, fingerprint %s", self.key_label, fingerprint.hex().upper())

    async def sign_openpgp(self, args: SignOpenpgpArgs, ctx: RequestContext) -> SignOpenpgpResult:
        recorded = self._recorded(ctx)
        if recorded is not None:
            return self._result(recorded)
        now = self.clock()
        certified = await self.hsm.run(self.certifier.certify, args.public_key, args.uids, now)
        command = CertifyOpenpgp(
            request_id=ctx.request_id,
            request_digest=ctx.digest,
            fingerprint=certified.fingerprint,
            uids=tuple(certified.certified_uids),
            expires=int(certified.expires.timestamp()),
            certified_at=int(certified.certified_at.timestamp()),
            result=certified.public_key,
        )
        result = await self.recorder.record(command)
        log.info(
            "certified %d user ID(s) of %s (request %s)",
            len(certified.certified_uids),
            certified.fingerprint.hex().upper(),
            ctx.request_id,
        )
        if isinstance(result, Duplicate) and isinstance(result.original, Certified):
            return self._result(result.original)  # a concurrent copy of the id was first
        if not isinstance(result, Certified):
            raise SignerError(ErrorCode.INTERNAL_ERROR, f"certifying was answered {result.status}")
        return SignOpenpgpResult(
            public_key=certified.public_key,
            fingerprint=certified.fingerprint.hex().upper(),
            certified_uids=list(certified.certified_uids),
            expires=certified.expires,
        )

    def _recorded(self, ctx: RequestContext) -> Certified | None:
        recorded = self.repository.get_request(ctx.request_id)
        if recorded is None:
            return None
        if not isinstance(recorded.result, Certified) or recorded.request_digest != ctx.digest:
            raise SignerError(
                ErrorCode.REQUEST_ID_CONFLICT,
                f"request id {ctx.request_id!r} was used before for another request",
            )
        return recorded.result

    def _result(self, certified: Certified) -> SignOpenpgpResult:
        fingerprint, request_id = certified.fingerprint, certified.request_id
        record = next(
            (r for r in self.repository.iter_openpgp(fingerprint) if r["request_id"] == request_id),
            None,
        )
        if record is None:
            raise SignerError(ErrorCode.REPOSITORY_ERROR, "recorded certification not found")
        return SignOpenpgpResult(
            public_key=record["result"],
            fingerprint=fingerprint.hex().upper(),
            certified_uids=list(record["uids"]),
            expires=datetime.fromtimestamp(record["expires"], UTC),
        )

    def request_status(self, request_id: str) -> RequestStatusResult | None:
        """The recorded outcome of a `sign_openpgp` request; None for anything else."""
        recorded = self.repository.get_request(request_id)
        if recorded is None or not isinstance(recorded.result, Certified):
            return None
        result = self._result(recorded.result).model_dump(mode="python", exclude_none=True)
        return RequestStatusResult(state="done", command="sign_openpgp", result=result)

    async def health_section(self) -> Section:
        status = await self.hsm.run(self.hsm.status, [self.key_label])
        data: dict[str, Any] = {"key": self.key_label, "certifications": 0}
        errors = status_problems(status)
        data["test_signature_ok"] = not errors
        try:
            fingerprint = await self.hsm.run(self.certifier.ca_fingerprint)
            data["fingerprint"] = fingerprint.hex().upper()
        except SignerError as exc:
            errors.append(f"CA key: {exc}")
        data["certifications"] = self.repository.counts()["openpgp"]
        return Section(data, errors=errors)


# --- `signer openpgp-export` -----------------------------------------------------------------
