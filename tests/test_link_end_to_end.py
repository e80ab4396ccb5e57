"""Signer and client over a real emulated serial line (ptys and a paced relay), no mocks."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest
from conditions import eventually
from health_checks import times_that_are_not_timestamps

from signer.client.library import SignerClient
from signer.config import LinkConfig
from signer.errors import ErrorCode, RequestTimeout, SignerError, Unreachable
from signer.link.serial_link import LinkSettings, SerialLink
from signer.server.config import SignerConfig
from signer.server.process import SignerServer
from signer.tools.line_emulator import LineEmulator
from signer.wire.framing import Frame
from signer.wire.protocol import ErrorResponse, Response, encode_response

BAUD = 921600


@pytest.fixture
def line(tmp_path):
    with LineEmulator(tmp_path / "line", baud=BAUD, seed=7) as emulator:
        yield emulator


@pytest.fixture
async def signer(line):
    server = SignerServer(
        SignerConfig(link=LinkConfig(device=str(line.end_a), baudrate=BAUD, reopen_interval=0.1))
    )
    await server.start()
    yield server
    await server.stop()


def client_for(line, **kwargs) -> SignerClient:
    settings = LinkSettings(device=str(line.end_b), baudrate=BAUD, reopen_interval=0.1)
    return SignerClient(settings, **kwargs)


async def test_health_over_the_line(signer, line):
    async with client_for(line, timeout=10) as client:
        health = await client.call("health")
    assert health["status"] == "ok"
    assert health["version"]
    assert health["time"].tzinfo is not None
    link = health["sections"]["link"]
    assert link["state"] == "open"
    assert link["frames_in"] >= 1
    assert times_that_are_not_timestamps(health) == []


async def test_pipelined_answers_come_back_out_of_order(signer, line):
    release = asyncio.Event()

    async def slow(args, ctx):
        await release.wait()
        return {"public_key": b"k", "fingerprint": "F", "certified_uids": [], "expires": None}

    signer.handlers["sign_openpgp"] = slow
    async with client_for(line, timeout=10, max_in_flight=16) as client:
        slow_call = asyncio.create_task(
            client.call("sign_openpgp", {"public_key": b"k", "uids": ["a@example.org"]})
        )
        results = await asyncio.gather(*(client.call("health") for _ in range(12)))
        assert not slow_call.done()  # twelve answers overtook the slow one
        release.set()
        assert (await slow_call)["fingerprint"] == "F"
    assert all(r["status"] == "ok" for r in results)


async def test_refusals_arrive_as_errors(signer, line):
    async with client_for(line, timeout=5) as client:
        with pytest.raises(SignerError) as caught:
            await client.call("health", {"unexpected": 1})
        assert caught.value.code is ErrorCode.BAD_ARGUMENTS
        with pytest.raises(SignerError) as caught:
            await client.call("sign_x509", {"profile": "server", "csr": b"x"})
        assert caught.value.code is ErrorCode.UNKNOWN_COMMAND  # no HSM configured here


async def test_calls_survive_line_noise(signer, line):
    line.set_faults(corrupt=0.002)
    async with client_for(line, timeout=20, attempts=6) as client:
        results = await asyncio.gather(*(client.call("health") for _ in range(30)))
    line.set_faults()
    assert len(results) == 30
    assert signer.link.stats.broken_frames + client.stats.broken_frames_received > 0


async def test_signer_device_vanishes_and_comes_back(signer, line):
    async with client_for(line, timeout=10) as client:
        await client.call("health")
        line.unplug("a")
        async with asyncio.timeout(5):
            while signer.link.connected:
                await asyncio.sleep(0.02)
        line.replug("a")
        assert await signer.link.wait_connected(5)
        health = await client.call("health")
    assert health["sections"]["link"]["reconnects"] >= 1


async def test_client_device_vanishes_and_comes_back(signer, line):
    async with client_for(line, timeout=10) as client:
        await client.call("health")
        line.unplug("b")
        await eventually(lambda: not client.link.connected)
        with pytest.raises(Unreachable):
            await client.call("health", timeout=0.5, attempts=1)
        line.replug("b")
        assert (await client.call("health"))["status"] == "ok"


async def test_timeout_when_nobody_answers(line):
    async with client_for(line, timeout=0.6, attempts=2) as client:
        with pytest.raises(RequestTimeout):
            await client.call("health")
    assert client.stats.retries == 1


async def test_command_line_client_json(signer, line):
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "signer",
        "client",
        "--port",
        str(line.end_b),
        "--baud",
        str(BAUD),
        "--json",
        "health",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, err.decode()
    health = json.loads(out)
    assert health["status"] == "ok" and health["sections"]["link"]["state"] == "open"


def test_command_line_client_unreachable_exit_code(tmp_path):
    import subprocess

    with LineEmulator(tmp_path / "quiet", baud=None) as quiet:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "signer",
                "client",
                "--port",
                str(quiet.end_b),
                "--timeout",
                "0.5",
                "health",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 3
    assert "timeout" in result.stderr


def test_demo_runs(tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "signer", "demo", "--dir", str(tmp_path / "demo"), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["health"]["status"] == "ok", report["health"]["warnings"]
    assert {c["openssl_verify"] for c in report["certificates"].values()} == {"OK"}
    assert report["revoked"]["status"] == "revoked"
    assert report["health"]["sections"]["repository"]["counts"]["revoked"] == 1
    webdb = report["webdb"]
    assert len(webdb["pass1"]["requests"]["done"]) == 8  # seven X.509 rows and one OpenPGP row
    assert not webdb["pass1"]["requests"]["failed"]
    assert all("(no certificate)" not in row and "warning 0" in row for row in webdb["rows"][:7])
    assert sum("revoked 2" in row for row in webdb["rows"]) == 1
    crl = tmp_path / "demo" / "www" / "class3-revoke.crl"
    check = subprocess.run(
        [
            "openssl",
            "crl",
            "-inform",
            "DER",
            "-in",
            str(crl),
            "-noout",
            "-text",
            "-CAfile",
            str(tmp_path / "demo" / "ca" / "class3.crt"),
        ],
        capture_output=True,
        text=True,
    )
    assert "verify OK" in check.stderr + check.stdout
    assert check.stdout.count("Serial Number:") == 2  # the two revocations of the demo
    assert Path(tmp_path / "demo" / "signer-a.log").exists()
    a, b = report["replicas"]["a"], report["replicas"]["b"]  # the pair replicated everything
    assert {a["role"], b["role"]} == {"leader", "follower"}
    assert (a["certificates"], a["revoked"], a["applied"]) == (
        b["certificates"],
        b["revoked"],
        b["applied"],
    )
    assert a["certificates"] == 9 and a["status"] == b["status"] == "ok"


async def test_a_storm_of_broken_frame_reports_re_sends_once_per_interval(line):
    """Issue 11, item 2: the client re-sent everything on each nil-id error, so line noise (or
    a signer reporting a flood) multiplied the traffic; now at most once per interval."""
    received: list[Frame] = []
    settings = LinkSettings(device=str(line.end_a), baudrate=BAUD, reopen_interval=0.1)
    fake_signer = SerialLink(
        settings, lambda e: received.append(e) if isinstance(e, Frame) else None
    )
    await fake_signer.start()
    try:
        assert await fake_signer.wait_connected(5)
        async with client_for(line, timeout=3.0, attempts=1, resend_interval=0.5) as client:
            call = asyncio.create_task(client.call("health", request_id="waiting"))
            await eventually(lambda: len(received) == 1)
            noise = encode_response(ErrorResponse(None, SignerError(ErrorCode.BAD_CRC, "noise")))
            for _ in range(200):
                await fake_signer.send(noise)
            await eventually(lambda: client.stats.signer_saw_broken_frames == 200)
            await asyncio.sleep(1.0)  # past the interval: its one summary re-send
            await fake_signer.send(encode_response(Response("waiting", {"status": "ok"})))
            assert (await call)["status"] == "ok"
    finally:
        await fake_signer.close()
    sends = [f for f in received if f.message.get("id") == "waiting"]
    assert 2 <= len(sends) <= 4, len(sends)  # the request, one at once, one per interval after
    assert client.stats.resend_rounds <= 3
