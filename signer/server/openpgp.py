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

import argparse
import base64
import hashlib
import logging
import re
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from replication.log import Log
from signer.config import OPENPGP_CURVES, ConfigError, OpenPgpConfig, SignerConfig, load
from signer.errors import ErrorCode, SignerError
from signer.server.health import Section
from signer.server.hsm import Hsm
from signer.pki.openpgp_armor import armor
from signer.wire.protocol import (
    MAX_OPENPGP_KEY,
    RequestStatusResult,
    SignOpenpgpArgs,
    SignOpenpgpResult,
)
from signer.server.dispatch import Handler, RequestContext
from storage.repository import Repository

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

DEFAULT_EXPIRY_DAYS = 366
MAX_PACKETS = 20_000  # a flooded key (CVE-2019-13050) has ~150k signatures: refused, not parsed
MAX_OWN_PACKETS = 512  # user IDs and the key's own signatures that PGPy parses and verifies
MAX_UID_BYTES = 1024  # the repository's bound on a recorded user ID
MAX_CERTIFIED_UIDS = 100  # the repository's bound on user IDs per record
DIGEST_ORDER = ("sha256", "sha384", "sha512")

# Packet tags (RFC 4880 §4.3)
SIGNATURE, SECRET_KEY, PUBLIC_KEY, SECRET_SUBKEY = 2, 5, 6, 7
TRUST, USER_ID, PUBLIC_SUBKEY, USER_ATTRIBUTE = 12, 13, 14, 17
KEY_TAGS = frozenset({SIGNATURE, PUBLIC_KEY, TRUST, USER_ID, PUBLIC_SUBKEY, USER_ATTRIBUTE})

# Public-key algorithms (RFC 4880 §9.1, RFC 6637, draft EdDSA)
RSA_ALGORITHMS = frozenset({1, 2, 3})
ECDSA, EDDSA = 19, 22
OBSOLETE_ALGORITHMS = {16: "ElGamal", 17: "DSA", 20: "ElGamal"}

# OpenPGP curve OIDs (DER content octets) by the names gpg uses
CURVE_OIDS: dict[bytes, str] = {
    bytes.fromhex("2a8648ce3d030107"): "nistp256",
    bytes.fromhex("2b81040022"): "nistp384",
    bytes.fromhex("2b81040023"): "nistp521",
    bytes.fromhex("2b06010401da470f01"): "ed25519",
    bytes.fromhex("2b2403030208010107"): "brainpoolP256r1",
    bytes.fromhex("2b240303020801010b"): "brainpoolP384r1",
    bytes.fromhex("2b240303020801010d"): "brainpoolP512r1",
    bytes.fromhex("2b8104000a"): "secp256k1",
}

_EMAIL_PART = re.compile(r"<([^<>]*)>\s*$")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _refuse(code: ErrorCode, message: str) -> SignerError:
    return SignerError(code, message)


# --- policy and results ----------------------------------------------------------------------


@dataclass(frozen=True)
class CertificationPolicy:
    """What the CA certifies and how: from the `openpgp:` section of signer.yaml."""

    expiry_days: int = DEFAULT_EXPIRY_DAYS
    policy_url: str = OpenPgpConfig.model_fields["policy_url"].default
    digest: str = "sha256"
    min_rsa_bits: int = 2048
    curves: frozenset[str] = frozenset(OPENPGP_CURVES)
    max_key_bytes: int = MAX_OPENPGP_KEY
    max_packets: int = MAX_PACKETS

    @classmethod
    def from_config(cls, config: OpenPgpConfig) -> CertificationPolicy:
        return cls(
            expiry_days=config.expiry_days,
            policy_url=config.policy_url,
            digest=config.digest,
            min_rsa_bits=config.min_rsa_bits,
            curves=frozenset(config.curves),
            max_key_bytes=config.max_key_bytes,
        )


@dataclass(frozen=True)
class CertifiedKey:
    """A certified key: the whole transferable key with the new certification packets."""

    public_key: bytes
    fingerprint: bytes  # v4: 20 bytes
    certified_uids: tuple[str, ...]
    certified_at: datetime
    expires: datetime


class Certifier(Protocol):
    """The OpenPGP operations the signer needs; blocking (run it in the HSM's worker thread)."""

    def certify(self, public_key_blob: bytes, uids: Sequence[str], now: datetime) -> CertifiedKey:
        """Certify the named user IDs at time `now`, or raise SignerError saying why not."""
        ...

    def export_ca_public_key(self) -> bytes:
        """The CA's public key with its self-signature (binary), for publication."""
        ...

    def ca_fingerprint(self) -> bytes: ...


# --- armor -----------------------------------------------------------------------------------


def dearmor(blob: bytes) -> bytes:
    """Binary packets from a binary or ASCII-armored blob; every armored block is decoded (so that
    a second key in a second block is seen), a private key block is refused at once. The CRC24
    line is ignored, as RFC 9580 §6.1.1 requires (the signatures protect the content)."""
    if blob.lstrip()[:15] != b"-----BEGIN PGP ":
        return blob
    try:
        text = blob.decode("ascii")
    except UnicodeDecodeError:
        raise _refuse(ErrorCode.PGP_MALFORMED, "armored data is not ASCII") from None
    out, block, body, kind = bytearray(), None, [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("-----BEGIN PGP ") and block is None:
            kind = line[15:].rstrip("-")
            if kind in ("PRIVATE KEY BLOCK", "SECRET KEY BLOCK"):
                raise _refuse(ErrorCode.PGP_SECRET_KEY, "a private key block was sent")
            if kind != "PUBLIC KEY BLOCK":
                raise _refuse(ErrorCode.PGP_MALFORMED, f"armored {kind[:40]!r}, not a public key")
            block, body = "headers", []
        elif block is None:
            continue
        elif line.startswith("-----END PGP "):
            out += _armored_body(body)
            block = None
        elif block == "headers" and ":" in line:
            continue
        elif block == "headers":
            block = "body"
            body += [line] if line else []
        elif not line.startswith("="):
            body.append(line)
    if block is not None:
        raise _refuse(ErrorCode.PGP_MALFORMED, "armored block without its END line")
    return bytes(out)


def _armored_body(lines: list[str]) -> bytes:
    try:
        return base64.b64decode("".join(lines), validate=True)
    except ValueError:
        raise _refuse(ErrorCode.PGP_MALFORMED, "armored block is not valid base64") from None


# --- packet scan -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    tag: int
    start: int  # first header octet
    body: int  # first body octet
    end: int  # one past the last body octet


def scan_packets(data: bytes, max_packets: int = MAX_PACKETS) -> list[Packet]:
    """Split binary OpenPGP data into packets (RFC 4880 §4.2), checking framing only."""
    packets: list[Packet] = []
    pos = 0
    while pos < len(data):
        if len(packets) >= max_packets:
            raise _refuse(ErrorCode.INPUT_TOO_LARGE, f"more than {max_packets} packets")
        packet = _read_header(data, pos)
        packets.append(packet)
        pos = packet.end
    if not packets:
        raise _refuse(ErrorCode.PGP_MALFORMED, "no OpenPGP packets")
    return packets


def _read_header(data: bytes, pos: int) -> Packet:
    first = data[pos]
    if not first & 0x80:
        raise _refuse(ErrorCode.PGP_MALFORMED, f"byte {pos} is not a packet header")
    if first & 0x40:  # new format
        tag, length, header = first & 0x3F, *_new_length(data, pos + 1)
    else:
        tag, size = (first >> 2) & 0x0F, (1, 2, 4, 0)[first & 0x03]
        if size == 0:
            raise _refuse(ErrorCode.PGP_MALFORMED, "indeterminate packet length in a key")
        length, header = int.from_bytes(_take(data, pos + 1, size), "big"), 1 + size
    if tag == 0:
        raise _refuse(ErrorCode.PGP_MALFORMED, f"packet at byte {pos} has the reserved tag 0")
    end = pos + header + length
    if end > len(data):
        raise _refuse(ErrorCode.PGP_MALFORMED, f"packet at byte {pos} is truncated")
    return Packet(tag, pos, pos + header, end)


def _new_length(data: bytes, pos: int) -> tuple[int, int]:
    """(body length, header length) of a new-format packet whose length starts at `pos`."""
    octet = _take(data, pos, 1)[0]
    if octet < 192:
        return octet, 2
    if octet < 224:
        return ((octet - 192) << 8) + _take(data, pos + 1, 1)[0] + 192, 3
    if octet == 255:
        return int.from_bytes(_take(data, pos + 1, 4), "big"), 6
    raise _refuse(ErrorCode.PGP_MALFORMED, "partial body lengths are not allowed in a key")


def _take(data: bytes, pos: int, size: int) -> bytes:
    if pos + size > len(data):
        raise _refuse(ErrorCode.PGP_MALFORMED, "packet header is truncated")
    return data[pos : pos + size]


@dataclass(frozen=True)
class UserIdBlock:
    """A User ID packet and the signature (and trust) packets that follow it."""

    text: str
    packet: int  # index of the User ID packet
    after: int  # index of the first packet after its signatures


@dataclass(frozen=True)
class KeyLayout:
    """The structure of one transferable public key, as the scan saw it."""

    data: bytes
    packets: list[Packet]
    user_ids: list[UserIdBlock]

    @property
    def primary(self) -> bytes:
        return self.body(0)

    def body(self, index: int) -> bytes:
        packet = self.packets[index]
        return self.data[packet.body : packet.end]

    def raw(self, index: int) -> bytes:
        packet = self.packets[index]
        return self.data[packet.start : packet.end]

    @property
    def fingerprint(self) -> bytes:
        """v4 fingerprint: SHA-1 over 0x99, the two-octet length and the key packet body."""
        body = self.primary
        return hashlib.sha1(b"\x99" + len(body).to_bytes(2, "big") + body).digest()


def read_key(blob: bytes, policy: CertificationPolicy) -> KeyLayout:
    """Check an untrusted blob as one v4 transferable public key of an allowed strength."""
    if len(blob) > policy.max_key_bytes:
        raise _refuse(
            ErrorCode.INPUT_TOO_LARGE,
            f"the key is {len(blob)} bytes; at most {policy.max_key_bytes} are accepted",
        )
    data = dearmor(blob)
    packets = scan_packets(data, policy.max_packets)
    tags = [p.tag for p in packets]
    if SECRET_KEY in tags or SECRET_SUBKEY in tags:
        raise _refuse(ErrorCode.PGP_SECRET_KEY, "secret key material was sent: send the public key")
    if tags.count(PUBLIC_KEY) > 1:
        raise _refuse(ErrorCode.PGP_MULTIPLE_KEYS, f"{tags.count(PUBLIC_KEY)} keys: send one")
    if tags[0] != PUBLIC_KEY:
        raise _refuse(ErrorCode.PGP_MALFORMED, "the data does not start with a public key packet")
    if unexpected := sorted(set(tags) - KEY_TAGS):
        raise _refuse(ErrorCode.PGP_MALFORMED, f"packet tags {unexpected} do not belong in a key")
    layout = KeyLayout(data, packets, _user_ids(data, packets))
    check_strength(layout.primary, policy)
    return layout


def _user_ids(data: bytes, packets: list[Packet]) -> list[UserIdBlock]:
    blocks, seen = [], set()
    for index, packet in enumerate(packets):
        if packet.tag != USER_ID:
            continue
        after = index + 1
        while after < len(packets) and packets[after].tag in (SIGNATURE, TRUST):
            after += 1
        body = data[packet.body : packet.end]
        if body in seen:
            raise _refuse(ErrorCode.PGP_MALFORMED, "the same user ID appears twice")
        seen.add(body)
        blocks.append(UserIdBlock(body.decode("utf-8", "replace"), index, after))
    return blocks


def check_strength(primary: bytes, policy: CertificationPolicy) -> None:
    """Refuse primary keys weaker than the policy allows, from the key packet alone."""
    version = primary[0] if primary else 0
    if version in (2, 3):
        raise _refuse(ErrorCode.PGP_WEAK_KEY, "version 3 keys (MD5 fingerprints) are obsolete")
    if version != 4 or len(primary) < 8:
        raise _refuse(ErrorCode.PGP_MALFORMED, f"version {version} keys are not supported")
    algorithm, material = primary[5], primary[6:]
    if algorithm in RSA_ALGORITHMS:
        _check_rsa(material, policy)
    elif algorithm in (ECDSA, EDDSA):
        curve = CURVE_OIDS.get(bytes(material[1 : 1 + material[0]]), "an unknown curve")
        if curve not in policy.curves:
            allowed = ", ".join(sorted(policy.curves))
            raise _refuse(ErrorCode.PGP_WEAK_KEY, f"keys on {curve} are not accepted ({allowed})")
    elif algorithm in OBSOLETE_ALGORITHMS:
        name = OBSOLETE_ALGORITHMS[algorithm]
        raise _refuse(ErrorCode.PGP_WEAK_KEY, f"{name} primary keys are no longer accepted")
    else:
        raise _refuse(ErrorCode.PGP_WEAK_KEY, f"public-key algorithm {algorithm} is not accepted")


def _check_rsa(material: bytes, policy: CertificationPolicy) -> None:
    n, rest = _mpi(material)
    e, _ = _mpi(rest)
    if n.bit_length() < policy.min_rsa_bits:
        raise _refuse(
            ErrorCode.PGP_WEAK_KEY,
            f"RSA key of {n.bit_length()} bits; at least {policy.min_rsa_bits} are required",
        )
    if e < 3 or e % 2 == 0:
        raise _refuse(ErrorCode.PGP_WEAK_KEY, f"RSA public exponent {e} is not acceptable")


def _mpi(data: bytes) -> tuple[int, bytes]:
    if len(data) < 2:
        raise _refuse(ErrorCode.PGP_MALFORMED, "truncated key material")
    size = (int.from_bytes(data[:2], "big") + 7) // 8
    if len(data) < 2 + size:
        raise _refuse(ErrorCode.PGP_MALFORMED, "truncated key material")
    return int.from_bytes(data[2 : 2 + size], "big"), data[2 + size :]


# --- user IDs --------------------------------------------------------------------------------


def email_part(user_id: str) -> str | None:
    """The address of `Name <addr>`, or the whole user ID when it is a bare address."""
    found = _EMAIL_PART.search(user_id)
    if found:
        return found.group(1).strip()
    return user_id.strip() if "@" in user_id and " " not in user_id.strip() else None


def is_address(item: str) -> bool:
    return "@" in item and "<" not in item and ">" not in item


def check_requested(requested: Sequence[str]) -> None:
    for item in requested:
        if not item.strip():
            raise _refuse(ErrorCode.BAD_ARGUMENTS, "an empty user ID was requested")
        if len(item.encode("utf-8", "surrogatepass")) > MAX_UID_BYTES:
            raise _refuse(ErrorCode.FIELD_TOO_LARGE, f"a requested user ID is over {MAX_UID_BYTES}")


def match_user_ids(user_ids: Sequence[UserIdBlock], requested: Sequence[str]) -> list[list[int]]:
    """For each requested item, the indexes (into `user_ids`) of the user IDs it names."""
    check_requested(requested)
    matches = []
    for item in requested:
        wanted = item.strip().casefold() if is_address(item) else None
        found = [
            i
            for i, uid in enumerate(user_ids)
            if uid.text == item
            or (wanted is not None and (email_part(uid.text) or "").casefold() == wanted)
        ]
        if not found:
            raise _refuse(ErrorCode.PGP_NO_MATCHING_UID, f"the key has no user ID {item[:200]!r}")
        matches.append(found)
    return matches


def splice(layout: KeyLayout, additions: dict[int, bytes]) -> bytes:
    """The original key bytes with `additions[i]` inserted after user ID i's signatures."""
    cuts = sorted((layout.user_ids[i].after, packets) for i, packets in additions.items())
    out, pos = bytearray(), 0
    for index, packets in cuts:
        offset = layout.packets[index].start if index < len(layout.packets) else len(layout.data)
        out += layout.data[pos:offset] + packets
        pos = offset
    return bytes(out + layout.data[pos:])


# --- PGPy with an HSM key --------------------------------------------------------------------


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
        raise _refuse(ErrorCode.PGP_MALFORMED, f"unreadable key ({type(exc).__name__})") from None
    if primary != layout.primary:  # PGPy must hash exactly the bytes the key carries
        raise _refuse(ErrorCode.PGP_MALFORMED, "the key packet is not in canonical encoding")
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
            raise _refuse(
                ErrorCode.INPUT_TOO_LARGE,
                f"more than {MAX_OWN_PACKETS} user IDs and self-signatures",
            )
        view += layout.raw(index)
    return bytes(view)


def signature_issuer(body: bytes) -> bytes | None:
    """The 8-byte key ID of a v4 signature's issuer (Issuer or Issuer Fingerprint subpacket)."""
    if len(body) < 6 or body[0] != 4:
        return None
    hashed = int.from_bytes(body[4:6], "big")
    areas = [body[6 : 6 + hashed]]
    rest = body[6 + hashed :]
    if len(rest) >= 2:
        areas.append(rest[2 : 2 + int.from_bytes(rest[:2], "big")])
    for area in areas:
        for kind, data in _subpackets(area):
            if kind == 16 and len(data) == 8:
                return data
            if kind == 33 and len(data) == 21 and data[0] == 4:
                return data[-8:]
    return None


def _subpackets(area: bytes) -> Iterator[tuple[int, bytes]]:
    """(type without the critical bit, data) of each signature subpacket (RFC 4880 §5.2.3.1)."""
    pos = 0
    while pos < len(area):
        first = area[pos]
        if first < 192:
            length, pos = first, pos + 1
        elif first < 255 and pos + 1 < len(area):
            length, pos = ((first - 192) << 8) + area[pos + 1] + 192, pos + 2
        else:
            length, pos = int.from_bytes(area[pos + 1 : pos + 5], "big"), pos + 5
        if length == 0 or pos + length > len(area):
            return
        yield area[pos] & 0x7F, area[pos + 1 : pos + length]
        pos += length


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
        raise _refuse(
            ErrorCode.PGP_MALFORMED,
            f"the key was created at {key.created:%Y-%m-%d %H:%M:%S}Z, after the signer's clock "
            f"({now:%Y-%m-%d %H:%M:%S}Z): check the clocks",
        )
    direct = list(key._signatures)
    if _valid_self_signatures(key, key, direct, _KEY_REVOCATION, now):
        raise _refuse(ErrorCode.PGP_KEY_REVOKED, "the key is revoked")
    own = _valid_self_signatures(key, key, direct, _DIRECT_KEY, now)
    own += [sig for state in states.values() for sig in state.self_signatures]
    if not own:
        raise _refuse(ErrorCode.PGP_MALFORMED, "the key has no valid self-signature")
    latest = max(own, key=lambda sig: sig.created)
    if latest.key_expiration is not None and key.created + latest.key_expiration <= now:
        when = (key.created + latest.key_expiration).strftime("%Y-%m-%d")
        raise _refuse(ErrorCode.PGP_KEY_EXPIRED, f"the key expired on {when}")


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
                raise _refuse(ErrorCode.PGP_UID_REVOKED, f"user ID {text!r} is revoked")
            raise _refuse(
                ErrorCode.PGP_NO_MATCHING_UID, f"user ID {text!r} has no valid self-signature"
            )
        chosen.update(valid)
    for index in chosen:
        if len(layout.body(layout.user_ids[index].packet)) > MAX_UID_BYTES:
            raise _refuse(ErrorCode.INPUT_TOO_LARGE, f"a user ID is over {MAX_UID_BYTES} bytes")
    if len(chosen) > MAX_CERTIFIED_UIDS:
        raise _refuse(ErrorCode.INPUT_TOO_LARGE, f"more than {MAX_CERTIFIED_UIDS} user IDs")
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
        lambda: hsm.key(label), created, config.uid, CertificationPolicy.from_config(config)
    )


# --- the service -----------------------------------------------------------------------------


class OpenPgpService:
    """`sign_openpgp`: decide (signature, time), commit through the log, answer from the record."""

    def __init__(
        self,
        certifier: Certifier,
        hsm: Hsm,
        key_label: str,
        repository: Repository,
        commit_log: Log,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.certifier = certifier
        self.hsm = hsm
        self.key_label = key_label
        self.repository = repository
        self.log = commit_log
        self.clock = clock

    @classmethod
    def from_config(
        cls, config: OpenPgpConfig, hsm: Hsm, repository: Repository, commit_log: Log
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
        result = await self.log.commit(
            {
                "op": "certify_openpgp",
                "request_id": ctx.request_id,
                "request_digest": ctx.digest,
                "fingerprint": certified.fingerprint,
                "uids": list(certified.certified_uids),
                "expires": int(certified.expires.timestamp()),
                "certified_at": int(certified.certified_at.timestamp()),
                "result": certified.public_key,
            }
        )
        if result.get("status") == "rejected":
            raise SignerError(result["code"], result["message"])
        log.info(
            "certified %d user ID(s) of %s (request %s)",
            len(certified.certified_uids),
            certified.fingerprint.hex().upper(),
            ctx.request_id,
        )
        if result.get("status") != "certified":  # a concurrent copy of the id was recorded first
            return self._result(result)
        return SignOpenpgpResult(
            public_key=certified.public_key,
            fingerprint=certified.fingerprint.hex().upper(),
            certified_uids=list(certified.certified_uids),
            expires=certified.expires,
        )

    def _recorded(self, ctx: RequestContext) -> dict[str, Any] | None:
        recorded = self.repository.get_request(ctx.request_id)
        if recorded is None:
            return None
        if recorded["op"] != "certify_openpgp" or recorded["request_digest"] != ctx.digest:
            raise SignerError(
                ErrorCode.REQUEST_ID_CONFLICT,
                f"request id {ctx.request_id!r} was used before for another request",
            )
        return recorded["result"]

    def _result(self, summary: dict[str, Any]) -> SignOpenpgpResult:
        fingerprint, request_id = summary["fingerprint"], summary["request_id"]
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
        if recorded is None or recorded["op"] != "certify_openpgp":
            return None
        result = self._result(recorded["result"]).model_dump(mode="python", exclude_none=True)
        return RequestStatusResult(state="done", command="sign_openpgp", result=result)

    async def health_section(self) -> Section:
        status = await self.hsm.run(self.hsm.status, [self.key_label])
        data: dict[str, Any] = {"key": self.key_label, "certifications": 0}
        errors = [
            f"key {key['label']}: {key.get('error') or 'test signature failed'}"
            for key in status.get("keys", [])
            if not key.get("test_signature_ok")
        ]
        if not status.get("token_present"):
            errors.insert(0, "token not present")
        data["test_signature_ok"] = not errors
        try:
            fingerprint = await self.hsm.run(self.certifier.ca_fingerprint)
            data["fingerprint"] = fingerprint.hex().upper()
        except SignerError as exc:
            errors.append(f"CA key: {exc}")
        data["certifications"] = self.repository.counts()["openpgp"]
        return Section(data, errors=errors)


# --- `signer openpgp-export` -----------------------------------------------------------------


def export_main(argv: Sequence[str] | None = None) -> int:
    """`signer openpgp-export --config signer.yaml [--out FILE] [--armor]`: the CA's public key."""
    parser = argparse.ArgumentParser(
        prog="signer openpgp-export",
        description="Write the OpenPGP CA's public key, self-signed by the HSM, for publication. "
        "Its fingerprint never changes (the creation time comes from openpgp-ca.yaml).",
    )
    parser.add_argument("--config", required=True, type=Path, help="signer YAML file")
    parser.add_argument("--out", type=Path, help="output file (default: standard output)")
    parser.add_argument("--armor", action="store_true", help="ASCII armor")
    args = parser.parse_args(argv)
    try:
        config = load(args.config, SignerConfig)
        if config.openpgp is None or config.hsm is None:
            raise ConfigError(f"{args.config}: needs the hsm and openpgp sections")
        with Hsm(config.hsm) as hsm:
            certifier = pgpy_certifier(hsm, config.openpgp)
            blob = certifier.export_ca_public_key()
            fingerprint = certifier.ca_fingerprint()
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except SignerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.armor:
        blob = armor(blob)
    if args.out:
        args.out.write_bytes(blob)
    else:
        sys.stdout.buffer.write(blob)
    print(f"OpenPGP CA fingerprint: {fingerprint.hex().upper()}", file=sys.stderr)
    return 0
