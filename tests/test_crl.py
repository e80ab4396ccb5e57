"""CRLs: assembly, HSM signatures, RFC 5280 retention, scheduling and the request path; checked
with cryptography, `openssl crl`, `openssl verify -crl_check` and pkilint."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import pytest
from asn1crypto import core
from asn1crypto import crl as asn1_crl
from crl_helpers import (
    BAUD,
    DAY,
    START,
    CrlHarness,
    csr,
    listed,
    make_ceremony_ca,
    openssl_crl_verify,
    pkilint_crl,
    signer_config,
    write_pem_crl,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import CRLEntryExtensionOID, SignatureAlgorithmOID

from replication.log import MAX_ENTRY_BYTES
from signer.client.crl_refresh import CrlRefresher
from signer.client.library import SignerClient
from signer.config import load
from signer.errors import ErrorCode, SignerError
from signer.link.serial_link import LinkSettings
from signer.pki.crl import parse_crl
from signer.pki.der import der_integer, der_length, der_time
from signer.server.config import SignerConfig
from signer.server.hsm import Hsm
from signer.server.process import SignerServer
from signer.tools.line_emulator import LineEmulator
from storage import decode

EXPIRED_CERTS_ON_CRL = x509.ObjectIdentifier("2.5.29.60")


@pytest.fixture(scope="module")
def crl_hsm(softhsm_token_factory):
    """One token with an EC and an RSA CA key for the module (key generation is the slow part)."""
    token = softhsm_token_factory()
    with Hsm(token.settings(), read_write=True) as hsm:
        hsm.generate_key("crl-ec", "ec-p256")
        hsm.generate_key("crl-rsa", "rsa-2048")
        yield hsm


@pytest.fixture
def make_harness(crl_hsm, tmp_path):
    made = []

    def make(label: str = "crl-ec", **config) -> CrlHarness:
        config.setdefault("min_interval_seconds", 0)
        harness = CrlHarness(tmp_path / f"h{len(made)}", crl_hsm, label, **config)
        made.append(harness)
        return harness

    yield make
    for harness in made:
        harness.close()


def ca_pem(harness: CrlHarness, tmp: Path) -> Path:
    path = tmp / "ca.pem"
    path.write_bytes(harness.certificate.public_bytes(serialization.Encoding.PEM))
    return path


def expired_certs_on_crl(der: bytes) -> dt.datetime | None:
    crl = x509.load_der_x509_crl(der)
    try:
        raw = crl.extensions.get_extension_for_oid(EXPIRED_CERTS_ON_CRL).value.value
    except x509.ExtensionNotFound:
        return None
    return core.GeneralizedTime.load(raw).native


def errors(findings: list[str]) -> list[str]:
    return [f for f in findings if f.split()[0] in ("ERROR", "FATAL")]


# --------------------------------------------------------------------------- DER


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, 2**63, 2**159 - 1])
def test_der_integer_matches_asn1crypto(value: int) -> None:
    assert der_integer(value) == core.Integer(value).dump()


@pytest.mark.parametrize("length", [0, 127, 128, 255, 256, 65535, 65536, 50_000_000])
def test_der_length_is_minimal(length: int) -> None:
    assert der_length(length) == core.OctetString(b"\x00" * length).dump()[1 : -length or None]


def test_times_switch_to_generalized_time_in_2050() -> None:
    before = int(dt.datetime(2049, 12, 31, 23, 59, 59, tzinfo=dt.UTC).timestamp())
    assert der_time(before) == b"\x17\x0d491231235959Z"
    assert der_time(before + 1) == b"\x18\x0f20500101000000Z"


# --------------------------------------------------------------------------- what a CRL holds


@pytest.mark.parametrize("label", ["crl-ec", "crl-rsa"])
async def test_crl_lists_the_revocations_and_passes_outside_checks(
    make_harness, tmp_path: Path, label: str
) -> None:
    harness = make_harness(label)
    compromise = harness.now - 3 * DAY
    revoked = {
        await harness.revoke(reason=1, invalidity=compromise): "key_compromise",
        await harness.revoke(reason=None): None,
        await harness.revoke(reason=4): "superseded",
        await harness.revoke(reason=5, serial=2**159 - 1): "cessation_of_operation",
    }
    published = await harness.service.publish("test")
    crl = x509.load_der_x509_crl(published.der)
    assert crl.is_signature_valid(harness.certificate.public_key())  # type: ignore[arg-type]
    assert crl.issuer == harness.certificate.subject
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=7)
    assert crl.last_update_utc == harness.now
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == harness.key_id
    assert expired_certs_on_crl(published.der) is None
    rsa = label == "crl-rsa"
    algorithm = (
        SignatureAlgorithmOID.RSA_WITH_SHA256 if rsa else SignatureAlgorithmOID.ECDSA_WITH_SHA256
    )
    assert crl.signature_algorithm_oid == algorithm
    assert {e.serial_number for e in crl} == set(revoked)
    serials = [e.serial_number for e in crl]
    assert serials == sorted(serials)
    for serial, reason in revoked.items():
        entry = crl.get_revoked_certificate_by_serial_number(serial)
        assert entry is not None and entry.revocation_date_utc == harness.now
        codes = [
            e.value.reason.name for e in entry.extensions if isinstance(e.value, x509.CRLReason)
        ]
        assert codes == ([] if reason is None else [reason])
    invalidity = crl.get_revoked_certificate_by_serial_number(next(iter(revoked)))
    assert invalidity is not None
    date = invalidity.extensions.get_extension_for_oid(CRLEntryExtensionOID.INVALIDITY_DATE)
    assert date.value.invalidity_date_utc == compromise

    check = openssl_crl_verify(published.der, ca_pem(harness, tmp_path), tmp_path)
    assert check.returncode == 0 and "verify OK" in check.stderr, check.stderr
    assert pkilint_crl(published.der) == []  # no finding of any severity
    assert errors(pkilint_crl(published.der, "BR")) == []
    parsed = parse_crl(published.der)
    assert parsed.crl_number == 2 and [s for s, _ in parsed.entries] == serials


async def test_empty_crl_leaves_the_list_out(make_harness, tmp_path: Path) -> None:
    harness = make_harness("crl-rsa")
    published = await harness.service.publish("test")
    assert len(x509.load_der_x509_crl(published.der)) == 0
    assert parse_crl(published.der).entries == []
    tbs = asn1_crl.CertificateList.load(published.der)["tbs_cert_list"]
    assert isinstance(tbs["revoked_certificates"], core.Void)  # absent, not an empty SEQUENCE
    check = openssl_crl_verify(published.der, ca_pem(harness, tmp_path), tmp_path)
    assert check.returncode == 0, check.stderr
    assert pkilint_crl(published.der) == []


async def test_numbers_increase_and_survive_a_restart(make_harness) -> None:
    harness = make_harness()
    numbers = [(await harness.service.publish("test")).number for _ in range(3)]
    assert numbers == [2, 3, 4]  # the ceremony published number 1
    restarted = harness.new_service()
    assert (await restarted.publish("test")).number == 5
    again = harness.new_service()  # nothing in memory: the current CRL comes from the repository
    answer = await again.fetch_crl(*_fetch_args("test"))
    assert (
        answer.crl_number == 5
        and answer.sha256 == harness.repository.last_crl_history(harness.key_id)["sha256"]
    )  # type: ignore[index]


def _fetch_args(issuer: str, **args):
    from signer.server.dispatch import RequestContext
    from signer.wire.protocol import FetchCrlArgs

    return FetchCrlArgs(issuer=issuer, **args), RequestContext("t", "fetch_crl", b"")


# --------------------------------------------------------------------------- RFC 5280 retention


async def test_expired_entry_stays_until_a_crl_issued_after_expiry(
    make_harness, tmp_path: Path
) -> None:
    harness = make_harness()
    short = await harness.revoke(valid_for=DAY)
    long = await harness.revoke(valid_for=400 * DAY)
    not_after = harness.now + DAY
    first = await harness.service.publish("test")  # before the expiry
    assert listed(first.der) == {short, long}

    harness.advance(2 * DAY)  # just expired: the previous CRL was issued before the expiry
    second = await harness.service.publish("test")
    assert listed(second.der) == {short, long}
    assert expired_certs_on_crl(second.der) == not_after  # nothing was ever dropped
    assert pkilint_crl(second.der) == []
    check = openssl_crl_verify(second.der, ca_pem(harness, tmp_path), tmp_path)
    assert check.returncode == 0, check.stderr

    harness.advance(dt.timedelta(hours=1))  # one CRL after expiry was issued: it may leave
    third = await harness.service.publish("test")
    assert listed(third.der) == {long}
    assert expired_certs_on_crl(third.der) is None  # nothing expired is listed any more
    assert harness.repository.crl_history(harness.key_id, third.number)["removed"] == [  # type: ignore[index]
        (short, 1)
    ]
    # the revocation itself is kept: the certificate is still known as revoked
    assert harness.repository.revocation(harness.key_id, short) is not None
    assert harness.repository.check_consistency().ok


async def test_grace_period_keeps_expired_entries_longer(make_harness) -> None:
    harness = make_harness(grace_days=10)
    short = await harness.revoke(valid_for=DAY)
    kept = []
    for days in (0, 2, 5, 12, 13):  # CRLs at these days; the certificate expires on day 1
        harness.now = START + days * DAY
        crl = await harness.service.publish("test")
        kept.append(short in listed(crl.der))
    # day 13: the CRL of day 12 was issued more than 1 + 10 days after issuance: it leaves
    assert kept == [True, True, True, True, False]


async def test_revoked_after_expiry_appears_on_one_crl(make_harness) -> None:
    harness = make_harness()
    await harness.service.publish("test")
    harness.advance(10 * DAY)
    late = await harness.revoke(valid_for=-5 * DAY)  # expired five days before its revocation
    crl = await harness.service.publish("test")
    assert late in listed(crl.der)
    assert expired_certs_on_crl(crl.der) is not None
    harness.advance(dt.timedelta(minutes=5))
    assert late not in listed((await harness.service.publish("test")).der)


async def test_expired_certs_on_crl_is_a_true_statement(make_harness) -> None:
    """Every revoked certificate that expired at or after the ExpiredCertsOnCRL date is listed."""
    harness = make_harness(grace_days=1)
    for days in (1, 2, 3, 5, 8, 13, 400):
        await harness.revoke(valid_for=days * DAY)
    seen = 0
    for step in range(12):
        harness.advance(DAY + dt.timedelta(hours=3))
        await harness.revoke(valid_for=3 * DAY)
        if step == 8:  # a certificate revoked long after it expired: listed once all the same
            await harness.revoke(valid_for=-20 * DAY)
        crl = await harness.service.publish("test")
        cutoff = expired_certs_on_crl(crl.der)
        on_crl = listed(crl.der)
        this_update = harness.now
        has_expired = any(
            e.not_after < this_update.timestamp()
            for e in harness.repository.iter_revoked(harness.key_id)
            if e.serial in on_crl
        )
        assert (cutoff is not None) == has_expired
        if cutoff is not None:
            seen += 1
            for entry in harness.repository.iter_revoked(harness.key_id):
                if entry.not_after >= cutoff.timestamp():
                    assert entry.serial in on_crl
    assert seen >= 5
    assert len(listed(crl.der)) < 7 + 13  # entries did leave


# --------------------------------------------------------------------------- when to issue


async def test_scheduler_issues_when_due_and_only_then(make_harness) -> None:
    harness = make_harness(min_interval_seconds=60, reissue_hours=24, refresh_margin_hours=48)
    service = harness.service
    assert service.due("test") == "no CRL yet"
    await service.start()
    try:
        assert harness.repository.last_crl_history(harness.key_id)["crl_number"] == 2  # type: ignore[index]
        assert await service.refresh_due() == {}
        await harness.revoke()
        harness.advance(dt.timedelta(seconds=30))
        assert service.due("test") is None  # too soon after the last CRL
        harness.advance(dt.timedelta(seconds=31))
        assert service.due("test") == "new revocations"
        assert (await service.refresh_due())["test"].startswith("published 3")
        harness.advance(dt.timedelta(hours=23))
        assert service.due("test") is None
        harness.advance(dt.timedelta(hours=1))
        assert service.due("test") == "scheduled"
        await service.refresh_due()
        harness.advance(5 * DAY + dt.timedelta(seconds=1))  # nextUpdate in less than 48 h
        assert service.due("test") == "nextUpdate is near"
    finally:
        await service.stop()


async def test_the_periodic_task_runs(make_harness) -> None:
    harness = make_harness(poll_seconds=0.05)
    await harness.service.start()
    try:
        await harness.revoke()
        harness.advance(dt.timedelta(seconds=1))  # a CRL per second at most (the restore rule)
        async with asyncio.timeout(10):
            while harness.repository.last_crl_history(harness.key_id)["revocation_seq"] < 1:  # type: ignore[index]
                await asyncio.sleep(0.05)
    finally:
        await harness.service.stop()
    assert harness.service._task is None


async def test_fetch_signs_only_without_a_fresh_crl(make_harness) -> None:
    harness = make_harness(min_interval_seconds=3600)
    first = await harness.call("fetch_crl", {"issuer": "test"})  # no CRL yet: made here
    assert first["crl_number"] == 2 and first["kind"] == "full"
    await harness.revoke()
    again = await harness.call("fetch_crl", {"issuer": "test", "have_number": 2})
    assert again == {**again, "kind": "unchanged", "crl_number": 2}  # not signed on the line
    harness.advance(5 * DAY + dt.timedelta(seconds=1))  # stale: within 48 h of nextUpdate
    stale = await harness.call("fetch_crl", {"issuer": "test", "have_number": 2})
    assert stale["crl_number"] == 3 and stale["kind"] == "delta"
    assert len(stale["added"]) == 1


async def test_a_failing_hsm_is_reported_and_a_stale_crl_still_served(make_harness) -> None:
    harness = make_harness()
    await harness.service.publish("test")
    state = harness.service._states["test"]
    state.issuer = dataclasses.replace(state.issuer, key_label="no-such-key")
    harness.advance(6 * DAY)
    outcome = await harness.service.refresh_due()
    assert outcome["test"].startswith("failed: hsm_key_not_found")
    answer = await harness.call("fetch_crl", {"issuer": "test"})
    assert answer["crl_number"] == 2  # stale, but better than nothing
    section = await harness.service.health_section()
    assert section.warnings and "stale" in section.warnings[0]
    harness.advance(2 * DAY)
    assert "expired" in (await harness.service.health_section()).errors[0]

    empty = make_harness()
    empty_state = empty.service._states["test"]
    empty_state.issuer = dataclasses.replace(empty_state.issuer, key_label="no-such-key")
    with pytest.raises(SignerError) as caught:
        await empty.call("fetch_crl", {"issuer": "test"})
    assert caught.value.code is ErrorCode.CRL_UNAVAILABLE
    assert caught.value.details == {"cause": "hsm_key_not_found"}
    assert "no CRL" in (await empty.service.health_section()).errors[0]


async def test_bad_fetches_are_refused(make_harness) -> None:
    harness = make_harness()
    for args, code in [
        ({"issuer": "nobody"}, ErrorCode.UNKNOWN_ISSUER),
        ({"issuer": "test", "want": "full", "offset": 10**6}, ErrorCode.BAD_ARGUMENTS),
    ]:
        with pytest.raises(SignerError) as caught:
            await harness.call("fetch_crl", args)
        assert caught.value.code is code
    by_key_id = await harness.call("fetch_crl", {"issuer": harness.key_id.hex()})
    assert by_key_id["kind"] == "full"


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ceremony_ca(softhsm_token_factory, tmp_path_factory):
    return make_ceremony_ca(softhsm_token_factory(), tmp_path_factory.mktemp("crl-ca"))


def openssl_crl_check(base: Path, leaf_der: bytes, crl_der: bytes, tmp: Path) -> str:
    leaf = tmp / "leaf.pem"
    leaf.write_bytes(
        x509.load_der_x509_certificate(leaf_der).public_bytes(serialization.Encoding.PEM)
    )
    crl = write_pem_crl(crl_der, tmp / "crl.pem")
    check = subprocess.run(
        [
            "openssl",
            "verify",
            "-crl_check",
            "-CAfile",
            str(base / "ca" / "class1.crt"),
            "-untrusted",
            str(base / "ca" / "class3.crt"),
            "-CRLfile",
            str(crl),
            str(leaf),
        ],
        capture_output=True,
        text=True,
    )
    return check.stdout + check.stderr


async def test_openssl_sees_the_revoked_certificate_as_revoked(ceremony_ca, tmp_path: Path) -> None:
    base, _ = ceremony_ca
    config = load(
        signer_config(ceremony_ca, tmp_path / "line" / "a", tmp_path / "repo"), SignerConfig
    )
    with LineEmulator(tmp_path / "line", baud=BAUD) as line:
        server = SignerServer(config)
        await server.start()
        settings = LinkSettings(device=str(line.end_b), baudrate=BAUD, reopen_interval=0.1)
        try:
            async with SignerClient(settings, timeout=20) as client:
                sans = [["dns", "www.example.org"]]
                good, bad = [
                    await client.call(
                        "sign_x509", {"profile": "server", "csr": csr(n), "sans": sans}
                    )
                    for n in ("www.example.org", "www.example.org")
                ]
                revoke = {"issuer": "class3", "serial": bad["serial"], "reason": "keyCompromise"}
                await client.call("revoke_x509", revoke)
                class3 = x509.load_pem_x509_certificate((base / "ca" / "class3.crt").read_bytes())
                refresher = CrlRefresher(client.call, "class3", class3)
                async with asyncio.timeout(20):  # the scheduler picks the revocation up
                    while True:
                        fetched = await refresher.refresh(None)
                        if int(bad["serial"], 16) in listed(fetched.der):
                            break
                        await asyncio.sleep(0.2)
                health = await client.call("health")
        finally:
            await server.stop()
    assert health["sections"]["crls"]["class3"]["entries"] == 1
    assert "crls" not in " ".join(health["warnings"])
    assert "certificate revoked" in openssl_crl_check(
        base, bad["certificate"], fetched.der, tmp_path
    )
    assert ": OK" in openssl_crl_check(base, good["certificate"], fetched.der, tmp_path)
    assert errors(pkilint_crl(fetched.der, "BR")) == []
    check = subprocess.run(
        ["openssl", "crl", "-inform", "DER", "-CAfile", str(base / "ca" / "class3.crt"), "-noout"],
        input=fetched.der,
        capture_output=True,
    )
    assert check.returncode == 0 and b"verify OK" in check.stderr


async def test_a_crl_is_rebuilt_byte_for_byte_from_its_small_log_entry(make_harness) -> None:
    """publish_crl carries no DER (docs/crl.md §4): a restarted signer serves the very CRL that
    was published, rebuilt from the membership and the history, and the log entry stays small
    however many entries the CRL lists."""
    harness = make_harness(min_interval_seconds=0)
    commands: list[bytes] = []
    commit = harness.log.commit

    async def recording(entry: bytes) -> Any:
        commands.append(entry)
        return await commit(entry)

    harness.log.commit = recording  # type: ignore[method-assign]
    for _ in range(2000):
        await harness.revoke(valid_for=2 * DAY)
    first = await harness.service.publish("test")
    harness.advance(3 * DAY)  # the entries expire; they leave with the CRLs after the next
    for _ in range(5):
        await harness.revoke()
    await harness.service.publish("test")
    for _ in range(2):  # at most MAX_REMOVED (1000) leave with one CRL
        harness.advance(dt.timedelta(hours=1))
        last = await harness.service.publish("test")
    assert first.record["entries"] == 2000 and last.record["entries"] == 5
    assert harness.repository.latest_crl(harness.key_id)["der"] is None  # type: ignore[index]
    restarted = harness.new_service()  # nothing in memory
    rebuilt = await restarted.current("test")
    assert rebuilt is not None and rebuilt.der == last.der  # byte for byte
    again = await restarted._pinned(restarted._states["test"], first.number)
    assert again is not None and again.der == first.der  # and an earlier one too
    sizes = [len(c) for c in commands if decode(c).op == "publish_crl"]
    assert len(sizes) == 4
    assert len(first.der) > MAX_ENTRY_BYTES and max(sizes) < 32 * 1024  # the CRL is large
