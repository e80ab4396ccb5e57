"""OpenPGP, the pure part shared by the signer: armor, a packet-level scan of an untrusted key,
user ID matching and splicing new certifications into the ORIGINAL bytes.

No OpenPGP library here: what comes over the line is framed, bounded and checked (secret key
packets, several primary keys, key algorithm and size) before any library parses it, and whatever
else the key carries stays exactly as it was. The certification itself is made by
signer/server/openpgp.py (PGPy, signing with the HSM key).

How a request names user IDs: each item of `uids` is a whole user ID, which names the user ID
whose bytes are its UTF-8 encoding, exactly (name and address; no case folding, no matching by
address: `a@x` never names `CAcert Support <a@x>`). Every item must name a valid user ID or
nothing is certified.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from signer.errors import ErrorCode, SignerError
from signer.wire.protocol import MAX_OPENPGP_KEY

DEFAULT_POLICY_URL = "https://www.cacert.org/policy/CertificationPracticeStatement.html"
DEFAULT_CURVES = ("nistp256", "nistp384", "nistp521", "ed25519")
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


def refuse(code: ErrorCode, message: str) -> SignerError:
    return SignerError(code, message)


# --- policy and results ----------------------------------------------------------------------


@dataclass(frozen=True)
class CertificationPolicy:
    """What the CA certifies and how: from the `openpgp:` section of signer.yaml."""

    expiry_days: int = DEFAULT_EXPIRY_DAYS
    policy_url: str = DEFAULT_POLICY_URL
    digest: str = "sha256"
    min_rsa_bits: int = 2048
    curves: frozenset[str] = frozenset(DEFAULT_CURVES)
    max_key_bytes: int = MAX_OPENPGP_KEY
    max_packets: int = MAX_PACKETS


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
        raise refuse(ErrorCode.PGP_MALFORMED, "armored data is not ASCII") from None
    out, block, kind = bytearray(), None, ""
    body: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("-----BEGIN PGP ") and block is None:
            kind = line[15:].rstrip("-")
            if kind in ("PRIVATE KEY BLOCK", "SECRET KEY BLOCK"):
                raise refuse(ErrorCode.PGP_SECRET_KEY, "a private key block was sent")
            if kind != "PUBLIC KEY BLOCK":
                raise refuse(ErrorCode.PGP_MALFORMED, f"armored {kind[:40]!r}, not a public key")
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
        raise refuse(ErrorCode.PGP_MALFORMED, "armored block without its END line")
    return bytes(out)


def _armored_body(lines: list[str]) -> bytes:
    try:
        return base64.b64decode("".join(lines), validate=True)
    except ValueError:
        raise refuse(ErrorCode.PGP_MALFORMED, "armored block is not valid base64") from None


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
            raise refuse(ErrorCode.INPUT_TOO_LARGE, f"more than {max_packets} packets")
        packet = _read_header(data, pos)
        packets.append(packet)
        pos = packet.end
    if not packets:
        raise refuse(ErrorCode.PGP_MALFORMED, "no OpenPGP packets")
    return packets


def _read_header(data: bytes, pos: int) -> Packet:
    first = data[pos]
    if not first & 0x80:
        raise refuse(ErrorCode.PGP_MALFORMED, f"byte {pos} is not a packet header")
    if first & 0x40:  # new format
        tag, length, header = first & 0x3F, *_new_length(data, pos + 1)
    else:
        tag, size = (first >> 2) & 0x0F, (1, 2, 4, 0)[first & 0x03]
        if size == 0:
            raise refuse(ErrorCode.PGP_MALFORMED, "indeterminate packet length in a key")
        length, header = int.from_bytes(_take(data, pos + 1, size), "big"), 1 + size
    if tag == 0:
        raise refuse(ErrorCode.PGP_MALFORMED, f"packet at byte {pos} has the reserved tag 0")
    end = pos + header + length
    if end > len(data):
        raise refuse(ErrorCode.PGP_MALFORMED, f"packet at byte {pos} is truncated")
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
    raise refuse(ErrorCode.PGP_MALFORMED, "partial body lengths are not allowed in a key")


def _take(data: bytes, pos: int, size: int) -> bytes:
    if pos + size > len(data):
        raise refuse(ErrorCode.PGP_MALFORMED, "packet header is truncated")
    return data[pos : pos + size]


@dataclass(frozen=True)
class UserIdBlock:
    """A User ID packet and the signature (and trust) packets that follow it."""

    text: str
    raw: bytes  # the packet's body: what a requested user ID must equal
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
        raise refuse(
            ErrorCode.INPUT_TOO_LARGE,
            f"the key is {len(blob)} bytes; at most {policy.max_key_bytes} are accepted",
        )
    data = dearmor(blob)
    packets = scan_packets(data, policy.max_packets)
    tags = [p.tag for p in packets]
    if SECRET_KEY in tags or SECRET_SUBKEY in tags:
        raise refuse(ErrorCode.PGP_SECRET_KEY, "secret key material was sent: send the public key")
    if tags.count(PUBLIC_KEY) > 1:
        raise refuse(ErrorCode.PGP_MULTIPLE_KEYS, f"{tags.count(PUBLIC_KEY)} keys: send one")
    if tags[0] != PUBLIC_KEY:
        raise refuse(ErrorCode.PGP_MALFORMED, "the data does not start with a public key packet")
    if unexpected := sorted(set(tags) - KEY_TAGS):
        raise refuse(ErrorCode.PGP_MALFORMED, f"packet tags {unexpected} do not belong in a key")
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
            raise refuse(ErrorCode.PGP_MALFORMED, "the same user ID appears twice")
        seen.add(body)
        blocks.append(UserIdBlock(body.decode("utf-8", "replace"), body, index, after))
    return blocks


def check_strength(primary: bytes, policy: CertificationPolicy) -> None:
    """Refuse primary keys weaker than the policy allows, from the key packet alone."""
    version = primary[0] if primary else 0
    if version in (2, 3):
        raise refuse(ErrorCode.PGP_WEAK_KEY, "version 3 keys (MD5 fingerprints) are obsolete")
    if version != 4 or len(primary) < 8:
        raise refuse(ErrorCode.PGP_MALFORMED, f"version {version} keys are not supported")
    algorithm, material = primary[5], primary[6:]
    if algorithm in RSA_ALGORITHMS:
        _check_rsa(material, policy)
    elif algorithm in (ECDSA, EDDSA):
        curve = CURVE_OIDS.get(bytes(material[1 : 1 + material[0]]), "an unknown curve")
        if curve not in policy.curves:
            allowed = ", ".join(sorted(policy.curves))
            raise refuse(ErrorCode.PGP_WEAK_KEY, f"keys on {curve} are not accepted ({allowed})")
    elif algorithm in OBSOLETE_ALGORITHMS:
        name = OBSOLETE_ALGORITHMS[algorithm]
        raise refuse(ErrorCode.PGP_WEAK_KEY, f"{name} primary keys are no longer accepted")
    else:
        raise refuse(ErrorCode.PGP_WEAK_KEY, f"public-key algorithm {algorithm} is not accepted")


def _check_rsa(material: bytes, policy: CertificationPolicy) -> None:
    n, rest = _mpi(material)
    e, _ = _mpi(rest)
    if n.bit_length() < policy.min_rsa_bits:
        raise refuse(
            ErrorCode.PGP_WEAK_KEY,
            f"RSA key of {n.bit_length()} bits; at least {policy.min_rsa_bits} are required",
        )
    if e < 3 or e % 2 == 0:
        raise refuse(ErrorCode.PGP_WEAK_KEY, f"RSA public exponent {e} is not acceptable")


def _mpi(data: bytes) -> tuple[int, bytes]:
    if len(data) < 2:
        raise refuse(ErrorCode.PGP_MALFORMED, "truncated key material")
    size = (int.from_bytes(data[:2], "big") + 7) // 8
    if len(data) < 2 + size:
        raise refuse(ErrorCode.PGP_MALFORMED, "truncated key material")
    return int.from_bytes(data[2 : 2 + size], "big"), data[2 + size :]


# --- user IDs --------------------------------------------------------------------------------


def check_requested(requested: Sequence[str]) -> None:
    for item in requested:
        if not item.strip():
            raise refuse(ErrorCode.BAD_ARGUMENTS, "an empty user ID was requested")
        if len(item.encode("utf-8", "surrogatepass")) > MAX_UID_BYTES:
            raise refuse(ErrorCode.FIELD_TOO_LARGE, f"a requested user ID is over {MAX_UID_BYTES}")


def match_user_ids(user_ids: Sequence[UserIdBlock], requested: Sequence[str]) -> list[list[int]]:
    """For each requested item, the indexes (into `user_ids`) of the user IDs it names."""
    check_requested(requested)
    matches = []
    for item in requested:
        wanted = item.encode("utf-8", "surrogatepass")
        found = [i for i, uid in enumerate(user_ids) if uid.raw == wanted]
        if not found:
            raise refuse(ErrorCode.PGP_NO_MATCHING_UID, f"the key has no user ID {item[:200]!r}")
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
