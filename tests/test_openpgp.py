"""OpenPGP certification with the CA key in SoftHSM2: user keys made by gpg, certifications checked
by gpg (`--check-sigs`) and listed by sq; refusals, idempotency, the emulated line, the CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from replication.log import LocalLog
from signer.client.library import SignerClient
from signer.config import load
from signer.errors import ErrorCode, SignerError
from signer.link.serial_link import LinkSettings
from signer.pki.openpgp import SIGNATURE, USER_ID, scan_packets
from signer.pki.openpgp_armor import armor
from signer.server.config import OpenPgpConfig, SignerConfig
from signer.server.dispatch import RequestContext
from signer.server.hsm import Hsm
from signer.server.openpgp import OpenPgpService, pgpy_certifier
from signer.server.process import SignerServer
from signer.tools.ceremony import run_ceremony
from signer.tools.line_emulator import LineEmulator
from signer.wire.protocol import SignOpenpgpArgs, request_digest
from storage.repository import Repository

BAUD = 921600
MAX_KEY_BYTES = 64 * 1024
CERT_DAYS = 366
POLICY = "https://www.cacert.org/policy/CertificationPracticeStatement.html"


def need(tool: str) -> str:
    """The outside verifiers are part of the test setup (ops/setup.sh installs them)."""
    path = shutil.which(tool)
    assert path, f"{tool} is not installed: apt-get install {'gnupg' if tool == 'gpg' else tool}"
    return path


# --- gpg, in private homes -----------------------------------------------------------------


class Gpg:
    """gpg in its own GNUPGHOME, batch mode, no passphrases, no prompts."""

    homes: ClassVar[list[Path]] = []  # every home made, to end its gpg-agent afterwards

    def __init__(self, home: Path):
        self.home = home
        home.mkdir(mode=0o700, parents=True)
        Gpg.homes.append(home)

    def __call__(self, *args: str, stdin: bytes | None = None, strict: bool = True) -> bytes:
        """gpg's output; `strict=False` for listings whose bad signatures make gpg exit 1 or 2
        (the listing itself says which signature is bad)."""
        command = [need("gpg"), "--homedir", str(self.home), "--batch", "--no-tty"]
        command += ["--pinentry-mode", "loopback", "--passphrase", "", *args]
        done = subprocess.run(command, input=stdin, capture_output=True, timeout=60)
        assert done.returncode in ((0,) if strict else (0, 1, 2)), done.stderr.decode(
            errors="replace"
        )
        return done.stdout

    def generate(self, uid: str, algo: str, expire: str = "never", *extra: str) -> None:
        self(*extra, "--quick-generate-key", uid, algo, "sign,cert", expire)

    def fingerprint(self, who: str) -> str:
        lines = self("--with-colons", "--list-keys", who).decode().splitlines()
        return next(line.split(":")[9] for line in lines if line.startswith("fpr:"))

    @classmethod
    def stop_agents(cls) -> None:
        """End the gpg-agent of each home made here (gpg starts one per home), and only those."""
        gpgconf = shutil.which("gpgconf")
        while gpgconf and cls.homes:
            home = cls.homes.pop()
            subprocess.run([gpgconf, "--homedir", str(home), "--kill", "gpg-agent"], check=False)


@pytest.fixture(scope="module", autouse=True)
def _gpg_agents() -> Iterator[None]:
    yield
    Gpg.stop_agents()


@dataclass
class UserKeys:
    gpg: Gpg
    public: dict[str, bytes]
    secret: dict[str, bytes]


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> UserKeys:
    """Keys made by gpg itself: good ones of three types, and bad ones for the refusals."""
    gpg = Gpg(tmp_path_factory.mktemp("users") / "gnupg")
    gpg.generate("Alice <alice@example.org>", "rsa2048")
    gpg("--quick-add-uid", "alice@example.org", "Alice Work <alice@WORK.example>")
    gpg("--quick-add-key", gpg.fingerprint("alice@example.org"), "rsa2048", "encr")
    gpg.generate("Bob <bob@example.org>", "ed25519")
    gpg.generate("Carol <carol@example.org>", "nistp256")
    gpg.generate("Weak <weak@example.org>", "rsa1024")
    gpg.generate("Dsa <dsa@example.org>", "dsa2048")
    gpg("--quick-add-key", gpg.fingerprint("dsa@example.org"), "elg2048", "encr")
    gpg.generate("Old <old@example.org>", "ed25519", "1y", "--faked-system-time", "20200101T000000")
    gpg.generate(
        "Future <future@example.org>", "ed25519", "never", "--faked-system-time", "20991231T000000"
    )
    gpg.generate("Rev <rev@example.org>", "ed25519")
    revocation = gpg.home / "openpgp-revocs.d" / f"{gpg.fingerprint('rev@example.org')}.rev"
    gpg("--import", stdin=revocation.read_bytes().replace(b":-----BEGIN", b"-----BEGIN"))
    gpg.generate("Dave <dave@example.org>", "ed25519")
    gpg("--quick-add-uid", "dave@example.org", "Dave Old <dave@old.example>")
    gpg("--quick-revoke-uid", "dave@example.org", "Dave Old <dave@old.example>")
    gpg.generate("Erin <erin@example.org>", "ed25519")
    gpg("--quick-add-uid", "erin@example.org", "CAcert Support <erin@example.org>")
    names = ["alice", "bob", "carol", "weak", "dsa", "old", "future", "rev", "dave", "erin"]
    public = {name: gpg("--export", f"{name}@") for name in names}
    secret = {name: gpg("--export-secret-keys", f"{name}@") for name in ("bob",)}
    return UserKeys(gpg, public, secret)


# --- the CA: ceremony on SoftHSM2 ----------------------------------------------------------


@dataclass
class Ca:
    base: Path
    token: object
    ca_file: Path

    def hsm(self) -> Hsm:
        return Hsm(self.token.settings())  # type: ignore[attr-defined]

    def config(self, **overrides: object) -> OpenPgpConfig:
        values = {"ca_file": self.ca_file, "max_key_bytes": MAX_KEY_BYTES, **overrides}
        return OpenPgpConfig(**values)


def make_ca(factory, tmp_path_factory: pytest.TempPathFactory, kind: str) -> Ca:
    token = factory()
    base = tmp_path_factory.mktemp(f"ca-{kind}")
    ceremony = {
        "hsm": {
            "module": token.store.module,
            "token_label": token.label,
            "pin_file": str(token.pin_file),
        },
        "output_dir": "ca",
        "openpgp": {"label": "cacert-openpgp", "kind": kind},
    }
    (base / "ceremony.yaml").write_text(yaml.safe_dump(ceremony))
    run_ceremony(base / "ceremony.yaml", progress=lambda *_: None)
    return Ca(base, token, base / "ca" / "openpgp-ca.yaml")


@pytest.fixture(scope="module")
def ca(softhsm_token_factory, tmp_path_factory) -> Ca:
    """A P-384 OpenPGP CA key (so certifications must use SHA-384 for gpg to accept them)."""
    return make_ca(softhsm_token_factory, tmp_path_factory, "ec-p384")


@pytest.fixture(scope="module")
def rsa_ca(softhsm_token_factory, tmp_path_factory) -> Ca:
    return make_ca(softhsm_token_factory, tmp_path_factory, "rsa-2048")


@pytest.fixture
def service(ca: Ca, tmp_path: Path) -> Iterator[OpenPgpService]:
    """The service in-process: real LMDB repository, log and SoftHSM2 token."""
    repository = Repository(tmp_path / "repo")
    commit_log = LocalLog(repository)
    hsm = ca.hsm()
    try:
        yield OpenPgpService.from_config(ca.config(), hsm, repository, commit_log)
    finally:
        hsm.close()
        commit_log.close()
        repository.close()


def ctx(request_id: str, public_key: bytes, uids: list[str]) -> RequestContext:
    digest = request_digest("sign_openpgp", {"public_key": public_key, "uids": uids})
    return RequestContext(request_id, "sign_openpgp", digest)


async def certify(service: OpenPgpService, key: bytes, uids: list[str], rid: str = "gpg:1:sign"):
    args = SignOpenpgpArgs(public_key=key, uids=uids)
    return await service.sign_openpgp(args, ctx(rid, key, uids))


def export_ca(ca: Ca) -> bytes:
    with ca.hsm() as hsm:
        return pgpy_certifier(hsm, ca.config()).export_ca_public_key()


# --- what gpg and sq say --------------------------------------------------------------------


@dataclass(frozen=True)
class Sig:
    valid: str
    keyid: str
    created: int
    expires: int
    sig_class: str
    hash_algo: str


def gpg_check(home: Path, ca_key: bytes, certified: bytes) -> dict[str, list[Sig]]:
    """Import the CA's export and the certified key into a fresh home; uid -> its signatures,
    as `gpg --check-sigs` reports them (validity `!` = good)."""
    gpg = Gpg(home)
    gpg("--import", stdin=ca_key)
    gpg("--import", stdin=certified)
    fingerprint = next(
        line.split(":")[9]
        for line in gpg("--with-colons", "--show-keys", stdin=certified).decode().splitlines()
        if line.startswith("fpr:")
    )
    uids: dict[str, list[Sig]] = {}
    current = None
    listing = gpg("--with-colons", "--check-sigs", fingerprint, strict=False).decode()
    for line in listing.splitlines():
        f = line.split(":")
        if f[0] == "uid":
            current = uids.setdefault(f[9], [])
        elif f[0] == "sig" and current is not None:
            current.append(Sig(f[1], f[4], int(f[5]), int(f[6] or 0), f[10], f[15]))
    policy = gpg("--list-options", "show-policy-urls", "--check-sigs", fingerprint, strict=False)
    uids["policy"] = [Sig("!" if POLICY.encode() in policy else "-", "", 0, 0, "", "")]
    return uids


def ca_keyid(ca_key: bytes, home: Path) -> str:
    listing = Gpg(home)("--with-colons", "--show-keys", stdin=ca_key).decode()
    return next(line.split(":")[4] for line in listing.splitlines() if line.startswith("pub:"))


def drop_new_packets(certified: bytes, original: bytes) -> bytes:
    """The certified key without the packets the original did not have."""
    kept = [
        certified[p.start : p.end]
        for p in scan_packets(certified)
        if certified[p.start : p.end] in original
    ]
    return b"".join(kept)


# --- the CA key ----------------------------------------------------------------------------


def test_ca_export_is_self_signed_and_its_fingerprint_never_changes(ca: Ca, tmp_path: Path):
    first, second = export_ca(ca), export_ca(ca)  # two HSM sessions, two self-signatures
    gpg = Gpg(tmp_path / "g")
    shown = [gpg("--with-colons", "--show-keys", stdin=key).decode() for key in (first, second)]
    fingerprints = [
        next(line.split(":")[9] for line in text.splitlines() if line.startswith("fpr:"))
        for text in shown
    ]
    assert fingerprints[0] == fingerprints[1]
    created = yaml.safe_load(ca.ca_file.read_text())["created"]
    created = created if isinstance(created, datetime) else datetime.fromisoformat(created)
    pub = next(line.split(":") for line in shown[0].splitlines() if line.startswith("pub:"))
    assert int(pub[5]) == int(created.replace(tzinfo=UTC).timestamp())
    assert pub[3] == "19" and pub[16] == "nistp384"  # ECDSA on P-384, as the ceremony made it
    gpg("--import", stdin=first)
    checked = gpg("--with-colons", "--check-sigs", fingerprints[0]).decode()
    self_sig = next(line.split(":") for line in checked.splitlines() if line.startswith("sig:"))
    assert self_sig[1] == "!" and self_sig[10] == "13x" and self_sig[15] == "9"  # SHA-384
    with ca.hsm() as hsm:
        assert pgpy_certifier(hsm, ca.config()).ca_fingerprint().hex().upper() == fingerprints[0]


# --- certifications that gpg and sq accept ------------------------------------------------


@pytest.mark.parametrize(
    ("name", "requested", "certified"),
    [
        ("alice", ["Alice Work <alice@WORK.example>"], ["Alice Work <alice@WORK.example>"]),
        ("bob", ["Bob <bob@example.org>"], ["Bob <bob@example.org>"]),
        ("carol", ["Carol <carol@example.org>"], ["Carol <carol@example.org>"]),
    ],
    ids=["rsa2048", "ed25519", "nistp256"],
)
async def test_gpg_verifies_each_certification_and_sq_lists_it(
    service: OpenPgpService,
    users: UserKeys,
    ca: Ca,
    tmp_path: Path,
    name: str,
    requested: list[str],
    certified: list[str],
):
    original = users.public[name]
    before = datetime.now(UTC).replace(microsecond=0)
    result = await certify(service, original, requested)
    assert result.certified_uids == certified
    assert result.fingerprint == users.gpg.fingerprint(f"{name}@")
    ca_key = export_ca(ca)
    keyid = ca_keyid(ca_key, tmp_path / "k")
    sigs = gpg_check(tmp_path / "check", ca_key, result.public_key)
    for uid, found in sigs.items():
        if uid == "policy":
            assert found[0].valid == "!", "the policy URL is not on the certification"
            continue
        by_ca = [s for s in found if s.keyid == keyid]
        if uid not in certified:
            assert by_ca == [], f"{uid} was not requested but got certified"
            continue
        assert [s.valid for s in by_ca] == ["!"], f"gpg does not find a good certification: {sigs}"
        [sig] = by_ca
        assert sig.sig_class == "10x" and sig.hash_algo == "9"  # generic, SHA-384 (P-384 CA)
        assert before.timestamp() - 1 <= sig.created <= datetime.now(UTC).timestamp() + 1
        assert sig.expires - sig.created == CERT_DAYS * 86400
        assert int(result.expires.timestamp()) == sig.expires
    assert all(any(s.valid == "!" for s in sigs[uid]) for uid in certified)
    # Everything else is byte for byte as it was: only certification packets were added.
    assert drop_new_packets(result.public_key, original) == original
    added = len(result.public_key) - len(original)
    assert 0 < added < 400 * len(certified)

    path = tmp_path / "certified.pgp"
    path.write_bytes(result.public_key)
    listing = subprocess.run(
        [need("sq"), "inspect", "--certifications", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    ca_fingerprint = next(
        line.split(":")[9]
        for line in Gpg(tmp_path / "s")("--with-colons", "--show-keys", stdin=ca_key)
        .decode()
        .splitlines()
        if line.startswith("fpr:")
    )
    assert listing.stdout.count(f"Alleged certifier: {ca_fingerprint}") == len(certified)


async def test_rsa_ca_certifies_with_sha256(rsa_ca: Ca, users: UserKeys, tmp_path: Path):
    with rsa_ca.hsm() as hsm:
        certifier = pgpy_certifier(hsm, rsa_ca.config())
        now = datetime.now(UTC)
        result = certifier.certify(users.public["bob"], ["Bob <bob@example.org>"], now)
        ca_key = certifier.export_ca_public_key()
    sigs = gpg_check(tmp_path / "check", ca_key, result.public_key)
    keyid = ca_keyid(ca_key, tmp_path / "k")
    [sig] = [s for s in sigs["Bob <bob@example.org>"] if s.keyid == keyid]
    assert sig.valid == "!" and sig.hash_algo == "8"  # SHA-256
    assert result.expires - result.certified_at == timedelta(days=CERT_DAYS)


def test_third_party_signatures_are_carried_not_parsed(ca: Ca, users: UserKeys):
    """A key flooded with others' certifications (CVE-2019-13050) is cheap: they stay as sent."""
    bob = users.public["bob"]
    with ca.hsm() as hsm:
        certifier = pgpy_certifier(hsm, ca.config(max_key_bytes=1024 * 1024))
        once = certifier.certify(bob, ["Bob <bob@example.org>"], datetime.now(UTC))
        theirs = once.public_key[len(bob) :]  # a certification by another key
        flooded = bob + theirs * 4000
        started = time.perf_counter()
        result = certifier.certify(flooded, ["Bob <bob@example.org>"], datetime.now(UTC))
        elapsed = time.perf_counter() - started
    assert drop_new_packets(result.public_key, flooded) == flooded
    # one certification added, as long as the first give or take the signature's MPIs, which
    # lose their leading zero bytes (RFC 9580 §3.2): one time in 256 a byte shorter or longer
    assert abs(len(result.public_key) - len(flooded) - len(theirs)) <= 2
    print(
        f"certified a key of {len(flooded)} bytes with 4000 foreign signatures in {elapsed:.3f} s"
    )


async def test_armor_checksum_is_ignored_as_rfc_9580_says(service: OpenPgpService, users):
    result = await certify(
        service, armored_with_bad_crc(users.public["bob"]), ["Bob <bob@example.org>"]
    )
    assert result.certified_uids == ["Bob <bob@example.org>"]


async def test_each_requested_user_id_is_certified_exactly(
    service: OpenPgpService, users: UserKeys
):
    both = await certify(
        service,
        users.public["alice"],
        ["Alice <alice@example.org>", "Alice Work <alice@WORK.example>"],
        rid="2",
    )
    assert sorted(both.certified_uids) == [
        "Alice <alice@example.org>",
        "Alice Work <alice@WORK.example>",
    ]


async def test_an_address_never_certifies_another_name_with_it(
    service: OpenPgpService, users: UserKeys, tmp_path: Path, ca: Ca
):
    """Issue 11, item 3: `uids=["erin@example.org"]` certified both `Erin <erin@example.org>` and
    `CAcert Support <erin@example.org>`. Only the exact user ID strings asked for are certified."""
    key = users.public["erin"]
    for item in ("erin@example.org", "ERIN@example.org", "Erin <ERIN@example.org>", "Erin"):
        with pytest.raises(SignerError) as refused:
            await certify(service, key, [item], rid=f"erin:{item}")
        assert refused.value.code is ErrorCode.PGP_NO_MATCHING_UID, item
    result = await certify(service, key, ["Erin <erin@example.org>"], rid="erin:exact")
    assert result.certified_uids == ["Erin <erin@example.org>"]
    ca_key = export_ca(ca)
    sigs = gpg_check(tmp_path / "check", ca_key, result.public_key)
    keyid = ca_keyid(ca_key, tmp_path / "k")
    assert [s.valid for s in sigs["Erin <erin@example.org>"] if s.keyid == keyid] == ["!"]
    assert not [s for s in sigs["CAcert Support <erin@example.org>"] if s.keyid == keyid]


# --- refusals ------------------------------------------------------------------------------


def first_packet(blob: bytes, tag: int, after_tag: int | None = None):
    packets = scan_packets(blob)
    start = 0 if after_tag is None else next(i for i, p in enumerate(packets) if p.tag == after_tag)
    return next(p for p in packets[start:] if p.tag == tag)


def raw_packet(blob: bytes, packet) -> bytes:
    return blob[packet.start : packet.end]


def corrupt_self_signature(blob: bytes) -> bytes:
    sig = first_packet(blob, SIGNATURE, after_tag=USER_ID)
    return blob[: sig.end - 1] + bytes([blob[sig.end - 1] ^ 0x01]) + blob[sig.end :]


def with_unsigned_uid(blob: bytes, uid: bytes) -> bytes:
    return blob + bytes([0xC0 | USER_ID, len(uid)]) + uid


def armored_with_bad_crc(blob: bytes) -> bytes:
    text = armor(blob).decode().splitlines()
    checksum = next(i for i, line in enumerate(text) if line.startswith("="))
    text[checksum] = "=" + base64.b64encode(b"\x00\x00\x00").decode()
    return "\n".join(text).encode()


BAD = {
    "no-matching-uid": ("bob", None, ["nobody@example.org"], ErrorCode.PGP_NO_MATCHING_UID),
    "one-of-two-missing": (
        "bob",
        None,
        ["Bob <bob@example.org>", "Bob <bob@other.example>"],
        ErrorCode.PGP_NO_MATCHING_UID,
    ),
    "uid-without-self-signature": (
        "bob",
        lambda k: with_unsigned_uid(k, b"Mallory <mallory@example.org>"),
        ["Mallory <mallory@example.org>"],
        ErrorCode.PGP_NO_MATCHING_UID,
    ),
    "bad-self-signature": ("bob", corrupt_self_signature, ["Bob <bob@example.org>"], "malformed"),
    "weak-rsa-1024": ("weak", None, ["Weak <weak@example.org>"], ErrorCode.PGP_WEAK_KEY),
    "dsa-elgamal": ("dsa", None, ["Dsa <dsa@example.org>"], ErrorCode.PGP_WEAK_KEY),
    "expired-key": ("old", None, ["Old <old@example.org>"], ErrorCode.PGP_KEY_EXPIRED),
    "created-in-the-future": ("future", None, ["Future <future@example.org>"], "malformed"),
    "revoked-key": ("rev", None, ["Rev <rev@example.org>"], ErrorCode.PGP_KEY_REVOKED),
    "revoked-uid": ("dave", None, ["Dave Old <dave@old.example>"], ErrorCode.PGP_UID_REVOKED),
    "secret-key": ("bob-secret", None, ["Bob <bob@example.org>"], ErrorCode.PGP_SECRET_KEY),
    "secret-key-armored": (
        "bob-secret",
        lambda k: armor(k).replace(b"PUBLIC KEY", b"PRIVATE KEY"),
        ["Bob <bob@example.org>"],
        ErrorCode.PGP_SECRET_KEY,
    ),
    "two-keys": ("bob+carol", None, ["Bob <bob@example.org>"], ErrorCode.PGP_MULTIPLE_KEYS),
    "two-armored-blocks": (
        "bob",
        lambda k: armor(k) + armor(k),
        ["Bob <bob@example.org>"],
        ErrorCode.PGP_MULTIPLE_KEYS,
    ),
    "self-signature-flood": (
        "bob",
        lambda k: k + raw_packet(k, first_packet(k, SIGNATURE, after_tag=USER_ID)) * 600,
        ["Bob <bob@example.org>"],
        "too-large",
    ),
    "truncated": ("bob", lambda k: k[:-7], ["Bob <bob@example.org>"], "malformed"),
    "not-openpgp": ("bob", lambda _k: b"hello, world", ["Bob <bob@example.org>"], "malformed"),
    "starts-with-a-signature": (
        "bob",
        lambda k: k[first_packet(k, SIGNATURE).start :],
        ["Bob <bob@example.org>"],
        "malformed",
    ),
    "armor-not-base64": (
        "bob",
        lambda k: armor(k).replace(b"\n=", b"\n!!!!\n="),
        ["Bob <bob@example.org>"],
        "malformed",
    ),
    "armor-without-end": ("bob", lambda k: armor(k)[:-30], ["Bob <bob@example.org>"], "malformed"),
    "oversize": ("bob", lambda k: k + bytes(MAX_KEY_BYTES), ["Bob <bob@example.org>"], "too-large"),
    "empty-uid": ("bob", None, [" "], ErrorCode.BAD_ARGUMENTS),
    "long-uid": ("bob", None, ["a" * 1100 + "@example.org"], ErrorCode.FIELD_TOO_LARGE),
}
CODES = {"malformed": ErrorCode.PGP_MALFORMED, "too-large": ErrorCode.INPUT_TOO_LARGE}


def bad_blob(users: UserKeys, source: str, change) -> bytes:
    if source == "bob-secret":
        blob = users.secret["bob"]
    elif source == "bob+carol":
        blob = users.public["bob"] + users.public["carol"]
    else:
        blob = users.public[source]
    return change(blob) if change else blob


@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_input_gets_its_code_and_writes_nothing(
    service: OpenPgpService, users: UserKeys, case: str
):
    source, change, uids, code = BAD[case]
    blob = bad_blob(users, source, change)
    before = service.repository.content_digest(include_applied_index=False)
    with pytest.raises(SignerError) as info:
        await certify(service, blob, uids)
    assert info.value.code is CODES.get(code, code), info.value
    assert 0 < len(info.value.message) < 400
    assert service.repository.content_digest(include_applied_index=False) == before
    assert service.repository.get_request("gpg:1:sign") is None


def test_mangled_keys_are_refused_as_data_never_crash(ca: Ca, users: UserKeys):
    """Random damage to real keys: each attempt certifies or refuses with an OpenPGP code."""
    allowed = {
        ErrorCode.PGP_MALFORMED,
        ErrorCode.PGP_MULTIPLE_KEYS,
        ErrorCode.PGP_SECRET_KEY,
        ErrorCode.PGP_NO_MATCHING_UID,
        ErrorCode.PGP_KEY_REVOKED,
        ErrorCode.PGP_KEY_EXPIRED,
        ErrorCode.PGP_UID_REVOKED,
        ErrorCode.PGP_WEAK_KEY,
        ErrorCode.INPUT_TOO_LARGE,
    }
    rng = random.Random(20260505)
    outcomes: dict[str, int] = {}
    with ca.hsm() as hsm:
        certifier = pgpy_certifier(hsm, ca.config())
        for attempt in range(300):
            name = ("alice", "bob", "carol")[attempt % 3]
            blob = bytearray(users.public[name])
            for _ in range(rng.randint(1, 3)):
                position = rng.randrange(len(blob))
                action = rng.choice(["flip", "cut", "insert", "zero"])
                if action == "flip":
                    blob[position] ^= 1 << rng.randrange(8)
                elif action == "cut":
                    del blob[position : position + rng.randint(1, 40)]
                elif action == "insert":
                    blob[position:position] = rng.randbytes(rng.randint(1, 16))
                else:
                    blob[position] = 0
            try:
                uid = f"{name.title()} <{name}@example.org>"
                certifier.certify(bytes(blob), [uid], datetime.now(UTC))
                outcomes["certified"] = outcomes.get("certified", 0) + 1
            except SignerError as exc:
                assert exc.code in allowed, f"attempt {attempt}: {exc}"
                outcomes[exc.code.value] = outcomes.get(exc.code.value, 0) + 1
    assert outcomes.get("pgp_malformed", 0) > 100, outcomes


# --- idempotency ---------------------------------------------------------------------------


async def test_same_request_id_answers_the_same_and_certifies_once(
    service: OpenPgpService, users: UserKeys
):
    key, uids = users.public["bob"], ["Bob <bob@example.org>"]
    first = await certify(service, key, uids, rid="gpg:7:sign")
    again = await certify(service, key, uids, rid="gpg:7:sign")
    assert again == first
    assert service.repository.counts()["openpgp"] == 1
    with pytest.raises(SignerError) as info:
        await certify(service, key, ["bob@example.org"], rid="gpg:7:sign")
    assert info.value.code is ErrorCode.REQUEST_ID_CONFLICT
    status = service.request_status("gpg:7:sign")
    assert status is not None and status.state == "done" and status.command == "sign_openpgp"
    assert status.result == first.model_dump(mode="python")
    assert service.request_status("never-sent") is None
    [record] = service.repository.iter_openpgp(bytes.fromhex(first.fingerprint))
    assert record["result"] == first.public_key and record["uids"] == ["Bob <bob@example.org>"]
    assert record["expires"] - record["certified_at"] == CERT_DAYS * 86400


async def test_concurrent_copies_of_one_request_record_once(
    service: OpenPgpService, users: UserKeys
):
    key, uids = users.public["carol"], ["Carol <carol@example.org>"]
    results = await asyncio.gather(*(certify(service, key, uids, rid="same") for _ in range(3)))
    assert results[0] == results[1] == results[2]
    assert service.repository.counts()["openpgp"] == 1
    assert service.repository.check_consistency().ok


# --- over the emulated line, and the command line ------------------------------------------


def signer_yaml(ca: Ca, device: Path, directory: Path) -> Path:
    text = {
        "link": {"device": str(device), "baudrate": BAUD, "reopen_interval": 0.1},
        "repository": {"path": str(directory / "repo")},
        "hsm": {
            "module": ca.token.store.module,  # type: ignore[attr-defined]
            "token_label": ca.token.label,  # type: ignore[attr-defined]
            "pin_file": str(ca.token.pin_file),  # type: ignore[attr-defined]
        },
        "openpgp": {"ca_file": str(ca.ca_file), "max_key_bytes": MAX_KEY_BYTES},
    }
    path = directory / "signer.yaml"
    path.write_text(yaml.safe_dump(text))
    return path


async def test_end_to_end_over_the_emulated_line(ca: Ca, users: UserKeys, tmp_path: Path):
    with LineEmulator(tmp_path / "line", baud=BAUD) as line:
        config = load(signer_yaml(ca, line.end_a, tmp_path), SignerConfig)
        server = SignerServer(config)
        await server.start()
        settings = LinkSettings(device=str(line.end_b), baudrate=BAUD, reopen_interval=0.1)
        try:
            async with SignerClient(settings, timeout=20) as client:
                args = {
                    "public_key": armor(users.public["alice"]),
                    "uids": ["Alice <alice@example.org>"],
                }
                first = await client.call("sign_openpgp", args, request_id="gpg:42:sign")
                again = await client.call("sign_openpgp", args, request_id="gpg:42:sign")
                status = await client.call("request_status", {"request_id": "gpg:42:sign"})
                before = server.openpgp.repository.content_digest(include_applied_index=False)
                with pytest.raises(SignerError) as info:
                    secret = {"public_key": users.secret["bob"], "uids": ["Bob <bob@example.org>"]}
                    await client.call("sign_openpgp", secret, request_id="gpg:43:sign")
                after = server.openpgp.repository.content_digest(include_applied_index=False)
                health = await client.call("health")
        finally:
            await server.stop()
    assert again == first
    assert first["certified_uids"] == ["Alice <alice@example.org>"]
    assert status["state"] == "done" and status["command"] == "sign_openpgp"
    assert status["result"] == first
    assert info.value.code is ErrorCode.PGP_SECRET_KEY and after == before
    section = health["sections"]["openpgp"]
    assert health["status"] == "ok", health["warnings"]
    assert section["test_signature_ok"] and section["certifications"] == 1
    ca_key = export_ca(ca)
    sigs = gpg_check(tmp_path / "check", ca_key, first["public_key"])
    keyid = ca_keyid(ca_key, tmp_path / "k")
    assert [s.valid for s in sigs["Alice <alice@example.org>"] if s.keyid == keyid] == ["!"]
    assert section["fingerprint"].endswith(keyid)


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_command_line_export_and_sign(ca: Ca, users: UserKeys, tmp_path: Path):
    """`signer openpgp-export`, `signer serve` and `signer client sign-openpgp` as processes."""
    signer = [sys.executable, "-m", "signer"]
    bob, out = tmp_path / "bob.pgp", tmp_path / "out.pgp"
    bob.write_bytes(users.public["bob"])
    with LineEmulator(tmp_path / "line", baud=None) as line:
        config = str(signer_yaml(ca, line.end_a, tmp_path))
        exports = []
        for name, form in (("ca1.asc", ["--armor"]), ("ca2.pgp", [])):
            target = str(tmp_path / name)
            done = run([*signer, "openpgp-export", "--config", config, "--out", target, *form])
            assert done.returncode == 0, done.stderr
            exports.append(done.stderr.strip().rsplit(" ", 1)[-1])
        assert exports[0] == exports[1] and len(exports[0]) == 40
        server = subprocess.Popen([*signer, "serve", "--config", config], stderr=subprocess.DEVNULL)
        try:
            client = [*signer, "client", "--port", str(line.end_b), "--timeout", "20", "--json"]
            sign = [*client, "sign-openpgp", "--key", str(bob), "--uid", "Bob <bob@example.org>"]
            for _ in range(3):  # the first call may go out before the signer opened its end
                signed = run([*sign, "--out", str(out)])
                if signed.returncode != 3:
                    break
            assert signed.returncode == 0, signed.stdout + signed.stderr
            assert json.loads(signed.stdout)["certified_uids"] == ["Bob <bob@example.org>"]
            refused = run([*client, "sign-openpgp", "--key", str(bob), "--uid", "no@example.org"])
            assert refused.returncode == 1
            assert json.loads(refused.stdout)["error"]["code"] == "pgp_no_matching_uid"
        finally:
            server.terminate()
            server.wait(timeout=10)
    ca_key = (tmp_path / "ca1.asc").read_bytes()
    assert ca_key.startswith(b"-----BEGIN PGP PUBLIC KEY BLOCK-----")
    sigs = gpg_check(tmp_path / "check", ca_key, out.read_bytes())
    ours = [s for s in sigs["Bob <bob@example.org>"] if exports[0].endswith(s.keyid)]
    assert [s.valid for s in ours] == ["!"]
