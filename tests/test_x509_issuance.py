"""X.509 issuance and revocation end to end: ceremony on SoftHSM2, signer over an emulated line,
client, repository; results checked with openssl."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from ceremony_ca import make_ceremony_ca
from conditions import eventually
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from health_checks import times_that_are_not_timestamps

from signer.client.library import SignerClient
from signer.config import load
from signer.errors import ErrorCode, SignerError
from signer.link.serial_link import LinkSettings
from signer.server.config import SignerConfig
from signer.server.process import SignerServer
from signer.tools.line_emulator import LineEmulator
from signer.wire.protocol import encode_request
from storage.repository import Repository

ROOT = Path(__file__).resolve().parent.parent
BAUD = 921600


@pytest.fixture(scope="module")
def ca(softhsm_token_factory, tmp_path_factory):
    """A CA made by the ceremony on a fresh SoftHSM2 token (RSA-2048 root, P-256 class 3)."""
    token = softhsm_token_factory()
    base = tmp_path_factory.mktemp("ca")
    make_ceremony_ca(token, base)
    return base, token


def signer_config(ca, device: Path, repository: Path) -> SignerConfig:
    base, token = ca
    text = {
        "link": {"device": str(device), "baudrate": BAUD, "reopen_interval": 0.1},
        "repository": {"path": str(repository)},
        "hsm": {
            "module": token.store.module,
            "token_label": token.label,
            "pin_file": str(token.pin_file),
        },
        "profiles": "cacert",
        "issuers": {
            "class1": {"certificate": str(base / "ca" / "class1.crt"), "key": "root"},
            "class3": {"certificate": str(base / "ca" / "class3.crt"), "key": "class3"},
        },
    }
    path = repository.parent / "signer.yaml"
    path.write_text(yaml.safe_dump(text))
    return load(path, SignerConfig)


@pytest.fixture
async def running(ca, tmp_path):
    with LineEmulator(tmp_path / "line", baud=BAUD) as line:
        server = SignerServer(signer_config(ca, line.end_a, tmp_path / "repo"))
        await server.start()
        client = SignerClient(
            LinkSettings(device=str(line.end_b), baudrate=BAUD, reopen_interval=0.1), timeout=20
        )
        await client.start()
        try:
            yield server, client, line
        finally:
            await client.close()
            await server.stop()


def server_csr(name: str = "www.example.org") -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def openssl_verify(ca, der: bytes, tmp: Path) -> subprocess.CompletedProcess[str]:
    base, _ = ca
    leaf = tmp / "leaf.pem"
    pem = x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    leaf.write_bytes(pem)
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(base / "ca" / "class1.crt"),
            "-untrusted",
            str(base / "ca" / "class3.crt"),
            str(leaf),
        ],
        capture_output=True,
        text=True,
    )


async def test_issue_verify_and_idempotent_retry(running, ca, tmp_path):
    server, client, _ = running
    args = {"profile": "server", "csr": server_csr(), "sans": [["dns", "www.example.org"]]}
    first = await client.call("sign_x509", args, request_id="domaincerts:1:sign")
    check = openssl_verify(ca, first["certificate"], tmp_path)
    assert check.returncode == 0, check.stdout + check.stderr
    cert = x509.load_der_x509_certificate(first["certificate"])
    assert first["serial"] == first["serial"].upper() and len(first["serial"]) % 2 == 0
    assert int(first["serial"], 16) == cert.serial_number
    assert cert.serial_number >= 2**64
    assert first["issuer"] == "class3"

    again = await client.call("sign_x509", args, request_id="domaincerts:1:sign")
    assert again == first  # the recorded certificate, not a second one
    assert server.ca.repository.counts()["certificates"] == 1

    with pytest.raises(SignerError) as caught:
        other = {**args, "csr": server_csr()}
        await client.call("sign_x509", other, request_id="domaincerts:1:sign")
    assert caught.value.code is ErrorCode.REQUEST_ID_CONFLICT

    status = await client.call("request_status", {"request_id": "domaincerts:1:sign"})
    assert status["state"] == "done" and status["result"]["serial"] == first["serial"]
    unknown = await client.call("request_status", {"request_id": "never-sent"})
    assert unknown["state"] == "unknown"


async def test_concurrent_same_id_signs_once(running):
    server, client, _ = running
    args = {"profile": "server", "csr": server_csr(), "sans": [["dns", "www.example.org"]]}
    # Three copies of one request on the line at once (a client retrying eagerly).
    for _ in range(3):
        await client.link.send(encode_request("same", "sign_x509", args))
    status = {"state": "in_progress"}
    async with asyncio.timeout(20):
        while status["state"] != "done":
            status = await client.call("request_status", {"request_id": "same"})
    await eventually(lambda: server.protocol.stats.coalesced + client.stats.stray_answers >= 2)
    assert server.ca.repository.counts()["certificates"] == 1


async def test_many_requests_unique_serials(running):
    server, client, _ = running
    csr = server_csr()
    args = {"profile": "server", "csr": csr, "sans": [["dns", "www.example.org"]]}
    results = await asyncio.gather(
        *(client.call("sign_x509", args, request_id=f"r{i}") for i in range(40))
    )
    assert len({r["serial"] for r in results}) == 40
    report = server.ca.repository.check_consistency()
    assert report.ok and server.ca.repository.counts()["certificates"] == 40


async def test_refusals_write_nothing(running):
    server, client, _ = running
    before = server.ca.repository.content_digest(include_applied_index=False)
    cases = [
        ({"profile": "nope", "csr": server_csr()}, ErrorCode.UNKNOWN_PROFILE),
        ({"profile": "server", "csr": b"garbage"}, ErrorCode.BAD_CSR),
        ({"profile": "server", "csr": server_csr(), "digest": "md5"}, ErrorCode.BAD_DIGEST),
        (
            {"profile": "server", "csr": server_csr(), "sans": [["dns", "bad..name"]]},
            ErrorCode.BAD_SAN,
        ),
    ]
    for args, code in cases:
        with pytest.raises(SignerError) as caught:
            await client.call("sign_x509", args)
        assert caught.value.code is code
    assert server.ca.repository.content_digest(include_applied_index=False) == before


@pytest.mark.parametrize("profile", ["subca", "ocsp", "ocsp-class1", "timestamp"])
async def test_the_line_cannot_order_a_ca_ocsp_or_timestamping_certificate(running, profile):
    """Issue 11's attack: anyone on the line asks `sign_x509` with profile `subca` (or the OCSP
    or time-stamping one) and any CSR, and would get a CA:TRUE certificate under the root (or
    an OCSP signer with ocsp-nocheck, or a TSA). Such profiles are for an operator at the
    signer: the line gets `operator_only`, nothing is signed or written."""
    server, client, _ = running
    before = server.ca.repository.content_digest(include_applied_index=False)
    args = {"profile": profile, "csr": server_csr(),
            "subject": [["C", "AU"], ["O", "Evil Inc."], ["CN", "Evil CA"]]}  # fmt: skip
    with pytest.raises(SignerError) as caught:
        await client.call("sign_x509", args)
    assert caught.value.code is ErrorCode.OPERATOR_ONLY
    assert caught.value.details == {"profile": profile}
    assert server.ca.repository.content_digest(include_applied_index=False) == before


async def test_revoke_is_idempotent_and_checked(running):
    server, client, _ = running
    args = {"profile": "server", "csr": server_csr(), "sans": [["dns", "www.example.org"]]}
    issued = await client.call("sign_x509", args)
    revoke = {"issuer": "class3", "serial": issued["serial"], "reason": "keyCompromise"}
    first = await client.call("revoke_x509", revoke, request_id="rev-1")
    assert first["status"] == "revoked" and first["reason"] == "keyCompromise"
    assert (await client.call("revoke_x509", revoke, request_id="rev-1")) == first
    again = await client.call("revoke_x509", {**revoke, "reason": "superseded"})
    assert again["status"] == "already_revoked" and again["reason"] == "keyCompromise"
    [entry] = list(server.ca.repository.iter_revoked(server.ca.issuers["class3"].key_id))
    assert entry.serial == int(issued["serial"], 16)

    for bad, code in [
        ({"issuer": "class3", "serial": "0BADC0DE"}, ErrorCode.UNKNOWN_CERTIFICATE),
        ({"issuer": "class9", "serial": issued["serial"]}, ErrorCode.UNKNOWN_ISSUER),
        ({**revoke, "reason": "removeFromCRL"}, ErrorCode.BAD_REASON),
        ({**revoke, "reason": "because"}, ErrorCode.BAD_REASON),
    ]:
        with pytest.raises(SignerError) as caught:
            await client.call("revoke_x509", bad)
        assert caught.value.code is code


async def test_revocation_times_are_bounded_by_the_certificate_and_the_clock(running):
    """Issue 11, item 6: `revoked_at` went back to 1971 and `invalidity_date` to 2099. Both must
    lie between the certificate's notBefore and the signer's clock; otherwise `bad_arguments`
    names the field, and nothing is recorded."""
    server, client, _ = running
    args = {"profile": "server", "csr": server_csr(), "sans": [["dns", "www.example.org"]]}
    issued = await client.call("sign_x509", args)
    before = server.ca.repository.content_digest(include_applied_index=False)
    revoke = {"issuer": "class3", "serial": issued["serial"]}
    now = datetime.now(UTC)
    cases = [
        ("revoked_at", datetime(1971, 1, 1, tzinfo=UTC)),
        ("revoked_at", issued["not_before"] - timedelta(seconds=1)),
        ("revoked_at", now + timedelta(minutes=2)),
        ("invalidity_date", datetime(2099, 1, 1, tzinfo=UTC)),
        ("invalidity_date", datetime(1971, 1, 1, tzinfo=UTC)),
        ("invalidity_date", now + timedelta(minutes=2)),
    ]
    for field, when in cases:
        with pytest.raises(SignerError) as caught:
            await client.call("revoke_x509", {**revoke, field: when})
        assert caught.value.code is ErrorCode.BAD_ARGUMENTS, (field, when)
        [problem] = caught.value.details["problems"]
        assert problem["field"] == field, caught.value.details
    assert server.ca.repository.content_digest(include_applied_index=False) == before
    good = {**revoke, "revoked_at": issued["not_before"], "invalidity_date": issued["not_before"]}
    assert (await client.call("revoke_x509", good))["revoked_at"] == issued["not_before"]


async def test_issuers_profiles_and_health(running, ca):
    _, client, _ = running
    issuers = await client.call("list_issuers")
    assert {i["name"] for i in issuers["issuers"]} == {"class1", "class3"}
    profiles = {p["name"]: p for p in (await client.call("list_profiles"))["profiles"]}
    assert {"dns", "xmpp"} <= set(profiles["server"]["san_types"])  # CAcert's set: XmppAddr
    assert not {"subca", "ocsp", "ocsp-class1", "timestamp"} & set(profiles)  # operator only
    health = await client.call("health")
    assert health["status"] == "ok", health["warnings"]
    sections = health["sections"]
    assert sections["hsm"]["logged_in"] is True
    assert all(k["test_signature_ok"] for k in sections["hsm"]["keys"])
    assert sections["cas"]["class3"]["days_left"] > 2000
    assert sections["repository"]["consistent"] is True
    assert times_that_are_not_timestamps(health) == []  # issue 11, item 11: Timestamps
    server = profiles["server"]["rules"]  # every rule that can refuse a request is shown
    assert server["subject"]["cn_sources"] == ["san"]
    assert server["sans"]["allowed"]["dns"] == {
        "max_count": 100, "wildcard": True, "allow_non_public": False,
    }  # fmt: skip
    assert server["keys"]["rsa"]["min_bits"] == 2048
    assert server["validity"]["max_days"] == profiles["server"]["max_validity_days"]


async def test_recorded_outcome_survives_restart(ca, tmp_path):
    args = {"profile": "server", "csr": server_csr(), "sans": [["dns", "www.example.org"]]}
    answers = []
    for _ in range(2):  # the second signer process reopens the same repository
        with LineEmulator(tmp_path / "line", baud=None) as line:
            server = SignerServer(signer_config(ca, line.end_a, tmp_path / "repo"))
            await server.start()
            settings = LinkSettings(device=str(line.end_b), reopen_interval=0.1)
            async with SignerClient(settings, timeout=20) as client:
                answers.append(await client.call("sign_x509", args, request_id="emailcerts:7"))
            await server.stop()
    assert answers[0] == answers[1]
    with Repository(tmp_path / "repo") as repository:
        assert repository.counts()["certificates"] == 1


def test_command_line_sign_and_revoke(ca, tmp_path):
    """`signer serve` as a process, `signer client sign-x509 / revoke-x509` as processes."""
    with LineEmulator(tmp_path / "line", baud=None) as line:
        config = signer_config(ca, line.end_a, tmp_path / "repo")
        del config
        process = subprocess.Popen(
            [sys.executable, "-m", "signer", "serve", "--config", str(tmp_path / "signer.yaml")],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            csr = tmp_path / "req.der"
            csr.write_bytes(server_csr())
            base = [
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
            for _ in range(3):  # the first call may go out before the signer opened its end
                signed = subprocess.run(
                    [
                        *base,
                        "sign-x509",
                        "--csr",
                        str(csr),
                        "--profile",
                        "server",
                        "--san",
                        "dns:www.example.org",
                        "--out",
                        str(tmp_path / "c.pem"),
                    ],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                if signed.returncode != 3:
                    break
            assert signed.returncode == 0, signed.stdout + signed.stderr
            result = json.loads(signed.stdout)
            assert (tmp_path / "c.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")
            revoked = subprocess.run(
                [*base, "revoke-x509", "--issuer", "class3", "--serial", result["serial"]],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert revoked.returncode == 0, revoked.stderr
            assert json.loads(revoked.stdout)["status"] == "revoked"
            refused = subprocess.run(
                [*base, "revoke-x509", "--issuer", "class3", "--serial", "0A"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert refused.returncode == 1
            assert json.loads(refused.stdout)["error"]["code"] == "unknown_certificate"
        finally:
            process.terminate()
            process.wait(timeout=10)
