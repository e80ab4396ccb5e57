"""Refreshing a CRL over the line: deltas rebuilt byte for byte, fallbacks, pinned and resumable
chunked transfers (also across a broken emulated line), and `signer client fetch-crl`."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from crl_helpers import (
    DAY,
    CrlHarness,
    csr,
    listed,
    make_ceremony_ca,
    openssl_crl_verify,
    signer_config,
)
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from signer.client.crl_refresh import (
    BadCrl,
    CrlRefresher,
    crl_number_of,
    held_crl,
    refresh_file,
    verify_crl,
)
from signer.client.library import SignerClient
from signer.config import load
from signer.errors import LinkDown, Unreachable
from signer.link.serial_link import LinkSettings
from signer.pki.revocation import crl_entry
from signer.server.config import SignerConfig
from signer.server.crl import rebuild_crl
from signer.server.hsm import Hsm
from signer.server.process import SignerServer
from signer.tools.line_emulator import LineEmulator
from signer.wire.framing import pack_message
from storage import IssueX509, RevokeX509


@pytest.fixture(scope="module")
def ec_hsm(softhsm_token_factory):
    token = softhsm_token_factory()
    with Hsm(token.settings(), read_write=True) as hsm:
        hsm.generate_key("crl-ec", "ec-p256")
        yield hsm


@pytest.fixture
def harness(ec_hsm, tmp_path):
    made = CrlHarness(tmp_path, ec_hsm, "crl-ec", min_interval_seconds=0)
    yield made
    made.close()


# --------------------------------------------------------------------------- the property


@dataclass
class Model:
    """RFC 5280 retention, written independently of signer/crl.py: who must be on each CRL."""

    grace: int
    members: set[int]
    ever_removed: set[int]
    not_after: dict[int, int]
    previous_this_update: int | None = None

    def publish(self, revoked: set[int], this_update: int) -> set[int]:
        leaving = {
            s
            for s in self.members
            if self.previous_this_update is not None
            and self.not_after[s] + self.grace < self.previous_this_update
        }
        self.ever_removed |= leaving
        self.members = (self.members - leaving) | (revoked - self.ever_removed - self.members)
        self.previous_this_update = this_update
        return set(self.members)


_REVOKE = st.tuples(st.just("revoke"), st.integers(-3, 6))  # validity in days (< 0: expired)
_ADVANCE = st.tuples(st.just("advance"), st.integers(1, 60))  # hours
_PUBLISH = st.tuples(st.just("publish"), st.just(0))
_REFRESH = st.tuples(st.just("refresh"), st.integers(0, 2))  # which client
OPERATIONS = st.lists(
    st.one_of(_REVOKE, _REVOKE, _ADVANCE, _PUBLISH, _PUBLISH, _REFRESH, _REFRESH, _REFRESH),
    min_size=1,
    max_size=40,
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    operations=OPERATIONS, max_bytes=st.sampled_from([1024, 4096]), grace=st.sampled_from([0, 1])
)
def test_rebuilt_crls_are_byte_identical_to_the_published_ones(
    ec_hsm: Hsm, operations: list[tuple[str, int]], max_bytes: int, grace: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        asyncio.run(_scenario(Path(directory), ec_hsm, operations, max_bytes, grace))


async def _scenario(
    path: Path, hsm: Hsm, operations: list[tuple[str, int]], max_bytes: int, grace: int
) -> None:
    harness = CrlHarness(path, hsm, "crl-ec", grace_days=grace, min_interval_seconds=0)
    model = Model(grace * 86400, set(), set(), {})
    revoked: set[int] = set()
    published: dict[int, bytes] = {}
    held: list[bytes | None] = [None, None, None]

    async def bounded_call(command: str, args: dict[str, Any]) -> dict[str, Any]:
        answer = await harness.call(command, args)
        if answer["kind"] == "delta":  # a delta answer stays within what was asked for
            assert len(pack_message(answer)) <= args["max_bytes"]
        return answer

    refresher = CrlRefresher(bounded_call, "test", harness.certificate, max_bytes)
    try:
        for operation, value in operations:
            if operation == "revoke":
                serial = await harness.revoke(valid_for=value * DAY)
                revoked.add(serial)
                model.not_after[serial] = int(harness.now.timestamp()) + value * 86400
            elif operation == "advance":
                harness.advance(dt.timedelta(hours=value))
            elif operation == "publish":
                crl = await harness.service.publish("test")
                published[crl.number] = crl.der
                assert listed(crl.der) == model.publish(revoked, int(harness.now.timestamp()))
            else:
                outcome = await refresher.refresh(held[value])
                event(f"refresh: {outcome.kind}")
                latest = await harness.service.current("test")
                assert latest is not None
                assert outcome.crl_number == latest.number
                assert outcome.der == latest.der  # byte-identical to the full CRL
                assert not outcome.fell_back
                if outcome.crl_number not in published:  # made on the request path (none yet)
                    expected = model.publish(revoked, int(harness.now.timestamp()))
                    assert listed(outcome.der) == expected
                published[outcome.crl_number] = outcome.der
                held[value] = outcome.der
        issuer = harness.service._states["test"].crl_issuer
        for number, der in published.items():  # any earlier CRL can be rebuilt from history
            assert rebuild_crl(harness.repository, issuer, harness.key_id, number) == der
        assert harness.repository.check_consistency().ok
    finally:
        harness.close()


# --------------------------------------------------------------------------- verification


async def test_a_crl_is_the_issuers_signed_and_never_older_than_the_one_held(
    harness, tmp_path: Path
) -> None:
    first = await harness.service.publish("test")
    await harness.revoke()
    second = await harness.service.publish("test")
    assert crl_number_of(second.der) == second.number == first.number + 1
    assert crl_number_of(None) is None and crl_number_of(b"not a CRL") is None
    assert verify_crl(second.der, harness.certificate, not_older_than=first.number) == second.number
    with pytest.raises(BadCrl, match="older than"):
        verify_crl(first.der, harness.certificate, not_older_than=second.number)
    with pytest.raises(BadCrl, match="not a DER CRL"):
        verify_crl(b"\x30\x03\x02\x01\x01", harness.certificate)
    flipped = second.der[:-1] + bytes([second.der[-1] ^ 1])
    with pytest.raises(BadCrl):
        verify_crl(flipped, harness.certificate)

    held = tmp_path / "held.crl"
    assert held_crl(held, harness.certificate) is None  # none yet
    held.write_bytes(flipped)
    assert held_crl(held, harness.certificate) is None  # not one to build on: fetch it whole
    held.write_bytes(second.der)
    assert held_crl(held, harness.certificate) == second.der


# --------------------------------------------------------------------------- fallbacks


async def test_a_delta_that_does_not_verify_falls_back_to_the_full_crl(harness) -> None:
    for _ in range(5):
        await harness.revoke()
    first = await harness.service.publish("test")
    await harness.revoke()
    current = await harness.service.publish("test")

    async def corrupting(command: str, args: dict[str, Any]) -> dict[str, Any]:
        answer = await harness.call(command, args)
        if answer["kind"] == "delta":
            answer["signature"] = answer["signature"][:-1] + bytes([answer["signature"][-1] ^ 1])
        return answer

    outcome = await CrlRefresher(corrupting, "test", harness.certificate).refresh(first.der)
    assert (outcome.kind, outcome.fell_back, outcome.der) == ("full", True, current.der)
    honest = await CrlRefresher(harness.call, "test", harness.certificate).refresh(first.der)
    assert (honest.kind, honest.der) == ("delta", current.der)
    assert honest.received < len(current.der) // 2


@pytest.mark.parametrize("corrupted_chunks", [1, 10**6])
async def test_a_damaged_transfer_starts_over_a_bounded_number_of_times(
    harness, corrupted_chunks: int
) -> None:
    for _ in range(60):
        await harness.revoke()
    current = await harness.service.publish("test")
    damaged = 0

    async def noisy(command: str, args: dict[str, Any]) -> dict[str, Any]:
        nonlocal damaged
        answer = await harness.call(command, args)
        if answer.get("offset") == 1024 and damaged < corrupted_chunks:  # a bit flipped
            damaged += 1
            answer["chunk"] = bytes([answer["chunk"][0] ^ 0x40]) + answer["chunk"][1:]
        return answer

    refresher = CrlRefresher(noisy, "test", harness.certificate, max_bytes=1024)
    if corrupted_chunks == 1:
        outcome = await refresher.refresh(None)
        assert outcome.kind == "full" and outcome.der == current.der
        return
    with pytest.raises(BadCrl):
        await refresher.refresh(None)
    assert damaged == 5
    assert refresher.transfer is None


async def test_a_delta_larger_than_asked_for_comes_whole(harness) -> None:
    first = await harness.service.publish("test")
    for _ in range(40):
        await harness.revoke()
    current = await harness.service.publish("test")
    small = await harness.call("fetch_crl", {"issuer": "test", "have_number": first.number})
    assert small["kind"] == "delta"
    capped = {"issuer": "test", "have_number": first.number, "max_bytes": 1024}
    answer = await harness.call("fetch_crl", capped)
    assert answer["kind"] == "full" and answer["offset"] == 0 and len(answer["chunk"]) == 1024
    assert answer["total_size"] == len(current.der)


async def test_a_crl_without_history_is_sent_whole(harness) -> None:
    current = await harness.service.publish("test")
    answer = await harness.call("fetch_crl", {"issuer": "test", "have_number": 1})  # ceremony's
    assert answer["kind"] == "full" and answer["total_size"] == len(current.der)


# --------------------------------------------------------------------------- chunked transfers


async def test_a_pinned_transfer_outlives_new_crls_and_a_restart(harness) -> None:
    for _ in range(120):
        await harness.revoke()
    pinned = await harness.service.publish("test")
    assert len(pinned.der) > 5 * 1024
    calls = 0

    async def disturbing(command: str, args: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 2:  # a newer CRL appears mid-transfer
            await harness.revoke()
            await harness.service.publish("test")
        if calls == 4:  # and the signer restarts: the pinned CRL is rebuilt from history
            harness.service = harness.new_service()
        return await harness.call(command, args)

    refresher = CrlRefresher(disturbing, "test", harness.certificate, max_bytes=1024)
    outcome = await refresher.refresh(None)
    assert (outcome.kind, outcome.crl_number, outcome.der) == ("full", pinned.number, pinned.der)
    assert outcome.received == len(pinned.der)  # no chunk fetched twice
    newer = await refresher.refresh(outcome.der)
    assert newer.kind == "delta" and newer.crl_number == pinned.number + 1


@dataclass
class _Stats:
    bytes_in: int = 0
    bytes_out: int = 0


class FlakyClient:
    """A client whose line breaks after `breaks_after` calls (what `refresh_file` needs of one)."""

    def __init__(self, harness: CrlHarness, breaks_after: int | None = None):
        self.harness = harness
        self.breaks_after = breaks_after
        self.calls = 0
        self.link = type("Link", (), {"stats": _Stats()})()

    async def call(self, command: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.calls += 1
        if self.breaks_after is not None and self.calls > self.breaks_after:
            raise LinkDown("the serial line to the signer is down")
        if command == "list_issuers":
            raise AssertionError("the certificate was given")
        return await self.harness.call(command, args or {})


async def test_fetch_crl_file_resumes_from_its_state_file(harness, tmp_path: Path) -> None:
    for _ in range(100):
        await harness.revoke()
    current = await harness.service.publish("test")
    ca = tmp_path / "ca.der"
    ca.write_bytes(harness.certificate.public_bytes(serialization.Encoding.DER))
    out = tmp_path / "test.crl"
    broken = FlakyClient(harness, breaks_after=3)
    with pytest.raises(LinkDown):
        await refresh_file(broken, "test", out, ca, max_bytes=1024)
    assert not out.exists()
    state = json.loads(out.with_name("test.crl.state").read_text())
    assert state["transfer"]["crl_number"] == current.number
    assert out.with_name("test.crl.part").stat().st_size == 3 * 1024

    resumed = FlakyClient(harness)
    result = await refresh_file(resumed, "test", out, ca, max_bytes=1024)
    assert result["kind"] == "full" and out.read_bytes() == current.der
    assert result["crl_bytes"] == len(current.der) - 3 * 1024  # only what was missing
    assert not out.with_name("test.crl.part").exists()
    again = await refresh_file(FlakyClient(harness), "test", out, ca, max_bytes=1024)
    assert again["kind"] == "unchanged" and again["calls"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.der",
        "repo",
        "test.crl",
        "test.crl.state",
    ]


# --------------------------------------------------------------------------- over the line


@pytest.fixture(scope="module")
def ceremony_ca(softhsm_token_factory, tmp_path_factory):
    return make_ceremony_ca(softhsm_token_factory(), tmp_path_factory.mktemp("crl-ca"))


async def test_a_full_transfer_resumes_after_the_line_breaks(ceremony_ca, tmp_path: Path) -> None:
    baud = 115200
    config = load(
        signer_config(ceremony_ca, tmp_path / "line" / "a", tmp_path / "repo"), SignerConfig
    )
    config = config.model_copy(update={"link": config.link.model_copy(update={"baudrate": baud})})
    with LineEmulator(tmp_path / "line", baud=baud) as line:
        server = SignerServer(config)
        await server.start()
        settings = LinkSettings(device=str(line.end_b), baudrate=baud, reopen_interval=0.1)
        try:
            await _revocations(server, 150)
            current = await server.crl.publish("class3")  # type: ignore[union-attr]
            class3 = server.ca.issuers["class3"].certificate  # type: ignore[union-attr]
            async with SignerClient(settings, timeout=1.5, attempts=1) as client:
                chunks = 0

                async def unplugging(command: str, args: dict[str, Any]) -> dict[str, Any]:
                    nonlocal chunks
                    answer = await client.call(command, args)
                    chunks += 1
                    if chunks == 3:
                        line.unplug("b")
                    return answer

                refresher = CrlRefresher(unplugging, "class3", class3, max_bytes=1024)
                with pytest.raises(Unreachable):
                    await refresher.refresh(None)
                assert refresher.transfer is not None
                assert len(refresher.transfer.data) == 3 * 1024
                line.replug("b")
                assert await client.link.wait_connected(10)
                outcome = await refresher.refresh(None)
        finally:
            await server.stop()
    assert outcome.kind == "full" and outcome.der == current.der
    assert outcome.received == len(current.der) - 3 * 1024  # it went on where it stopped


async def _revocations(server: SignerServer, count: int) -> None:
    """Revocations straight into the signer's repository (the transfer is what is tested)."""
    ca = server.ca
    assert ca is not None
    issuer = ca.issuers["class3"]
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    stamp = int(now.timestamp())
    for i in range(count):
        serial = 2**100 + i * 7919
        base = {"request_digest": b"d", "issuer": issuer.key_id, "serial": serial}
        await ca.recorder.record(
            IssueX509(
                request_id=f"i{i}",
                **base,  # type: ignore[arg-type]
                der=b"placeholder",
                profile="server",
                not_before=stamp,
                not_after=stamp + 86400 * 365,
                issued_at=stamp,
            )
        )
        await ca.recorder.record(
            RevokeX509(
                request_id=f"r{i}",
                **base,  # type: ignore[arg-type]
                reason=4,
                revoked_at=stamp,
                invalidity_date=None,
                crl_entry=crl_entry(serial, now, 4, None),
            )
        )


def test_command_line_keeps_a_local_copy_fresh(ceremony_ca, tmp_path: Path) -> None:
    """`signer serve` and `signer client fetch-crl` as processes: full, unchanged, delta."""
    base, _ = ceremony_ca
    with LineEmulator(tmp_path / "line", baud=None) as line:
        config = signer_config(ceremony_ca, line.end_a, tmp_path / "repo")
        process = subprocess.Popen(
            [sys.executable, "-m", "signer", "serve", "--config", str(config)],
            stderr=subprocess.PIPE,
            text=True,
        )
        client = [
            sys.executable,
            "-m",
            "signer",
            "client",
            "--port",
            str(line.end_b),
            "--timeout",
            "20",
            "--json",
        ]
        out = tmp_path / "published" / "class3-revoke.crl"
        out.parent.mkdir()
        fetch = [*client, "fetch-crl", "--issuer", "class3", "--out", str(out)]

        def run(command: list[str]) -> dict[str, Any]:
            for _ in range(3):  # the first call may go out before the signer opened its end
                done = subprocess.run(command, capture_output=True, text=True, timeout=60)
                if done.returncode != 3:
                    break
            assert done.returncode == 0, done.stdout + done.stderr
            return json.loads(done.stdout)

        try:
            first = run(fetch)
            assert first["kind"] == "full" and first["bytes_in"] > first["size"]
            assert run(fetch)["kind"] == "unchanged"
            request = tmp_path / "req.der"
            request.write_bytes(csr("www.example.org"))
            sign = ["sign-x509", "--csr", str(request), "--profile", "server"]
            issued = run([*client, *sign, "--san", "dns:www.example.org"])
            run([*client, "revoke-x509", "--issuer", "class3", "--serial", issued["serial"]])
            for _ in range(50):  # the signer's scheduler publishes the next CRL
                third = run(fetch)
                if third["kind"] != "unchanged":
                    break
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert third["kind"] == "delta" and third["crl_number"] == first["crl_number"] + 1
    assert third["bytes_in"] < 1024
    assert int(issued["serial"], 16) in listed(out.read_bytes())
    check = openssl_crl_verify(out.read_bytes(), base / "ca" / "class3.crt", tmp_path)
    assert check.returncode == 0, check.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".state"]
