"""Operator issuance (issue 11, item 1): CA, OCSP-signing and time-stamping certificates are
refused on the line (tests/test_x509_issuance.py) and issued only by an operator at the signer,
with `signer ceremony-issue REQUEST.yaml` through the control socket: a preview, a typed
confirmation, the same lint, HSM signature and log as any issuance, recorded in the repository,
and never issued twice for the same request."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from test_x509_issuance import ca, running  # noqa: F401 (fixtures)

from signer.tools.history import ControlFailed, control_call

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.timeout(180)


def write_csr(path: Path, common_name: str = "ignored by the subject below") -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def write_request(directory: Path, name: str = "subca", **fields: Any) -> Path:
    write_csr(directory / f"{name}.csr")
    request = {
        "profile": "subca",
        "csr": f"{name}.csr",
        "subject": {"C": "AU", "O": "CAcert Inc.", "CN": "CAcert Test Sub CA"},
        "output": f"{name}.crt",
        **fields,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(request, sort_keys=False))
    return path


async def ceremony_issue(*argv: str, answer: str = "") -> subprocess.CompletedProcess[str]:
    """The verb as an operator runs it, while the signer keeps serving in this event loop."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "signer", "ceremony-issue", *argv,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(answer.encode()), 120)
    assert process.returncode is not None
    return subprocess.CompletedProcess(argv, process.returncode, out.decode(), err.decode())


def content(server: Any) -> bytes:
    """The certificate state (the audit log records every operator command, refused or not)."""
    repository = server.ca.repository
    digest: bytes = repository.content_digest(include_applied_index=False, include_audit=False)
    return digest


def config_of(tmp_path: Path) -> str:
    return str(tmp_path / "signer.yaml")


async def test_an_operator_issues_a_subordinate_ca_once(running, ca, tmp_path):  # noqa: F811
    server, _, _ = running
    request = write_request(tmp_path)
    done = await ceremony_issue("--config", config_of(tmp_path), str(request), answer="yes\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "CA:TRUE, pathlen:0" in done.stdout and "Type 'yes'" in done.stdout

    pem = (tmp_path / "subca.crt").read_bytes()
    certificate = x509.load_pem_x509_certificate(pem)
    constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert certificate.subject.rfc4514_string() == "CN=CAcert Test Sub CA,O=CAcert Inc.,C=AU"
    root = ca[0] / "ca" / "class1.crt"
    check = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", str(root), str(tmp_path / "subca.crt")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    issuer = server.ca.issuers["class1"]
    record = server.ca.repository.get_certificate(issuer.key_id, certificate.serial_number)
    assert record is not None and record["der"] == certificate.public_bytes(
        serialization.Encoding.DER
    )

    assert server.ca.repository.audit_position(issuer.key_id, certificate.serial_number) is not None

    before, counted = content(server), server.ca.repository.counts()
    again = await ceremony_issue("--config", config_of(tmp_path), str(request), "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    result = json.loads(again.stdout)
    assert result["already_issued"] is True
    assert int(result["serial"], 16) == certificate.serial_number
    assert server.ca.repository.counts() == counted
    assert content(server) == before  # nothing signed or recorded the second time


async def test_nothing_is_signed_without_confirmation(running, tmp_path):  # noqa: F811
    server, _, _ = running
    request = write_request(tmp_path)
    before = content(server)
    for argv, answer in [((), "no\n"), ((), ""), (("--dry-run",), "")]:
        done = await ceremony_issue("--config", config_of(tmp_path), str(request), *argv,
                                    answer=answer)  # fmt: skip
        assert ("CAcert Test Sub CA" in done.stdout) and not (tmp_path / "subca.crt").exists()
        assert done.returncode == (0 if argv else 1), done.stdout + done.stderr
        if not argv:
            assert "not_confirmed" in done.stderr
    assert content(server) == before


async def test_ocsp_and_time_stamping_certificates_by_the_operator(running, tmp_path):  # noqa: F811
    server, _, _ = running
    socket = server.config.control_path()
    cases = [
        ("ocsp", ExtendedKeyUsageOID.OCSP_SIGNING),
        ("timestamp", ExtendedKeyUsageOID.TIME_STAMPING),
    ]
    for profile, usage in cases:
        request = write_request(tmp_path, profile, profile=profile,
                                subject={"CN": f"CAcert {profile} test"})  # fmt: skip
        done = await ceremony_issue("--socket", str(socket), str(request), "--yes", "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        certificate = x509.load_pem_x509_certificate(
            json.loads(done.stdout)["certificate"].encode()
        )
        usages = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
        assert list(usages.value) == [usage]
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        assert constraints.value.ca is False
        nocheck = [e for e in certificate.extensions if e.oid == ExtensionOID.OCSP_NO_CHECK]
        assert bool(nocheck) == (profile == "ocsp")


async def test_bad_operator_requests_are_refused_and_nothing_is_written(
    running,  # noqa: F811
    tmp_path,
):
    server, _, _ = running
    socket = server.config.control_path()
    before = content(server)
    # a subject the profile refuses (subca needs C and O), through the control socket itself
    args = {"profile": "subca", "csr": write_csr(tmp_path / "x.csr").read_text(),
            "subject": [["CN", "No Country CA"]]}  # fmt: skip
    with pytest.raises(ControlFailed) as refused:
        await asyncio.to_thread(control_call, socket, {"cmd": "issue", "request": args})
    assert refused.value.code == "bad_subject"
    with pytest.raises(ControlFailed) as refused:
        request = {"cmd": "issue", "request": {**args, "validity_days": "ten years"}}
        await asyncio.to_thread(control_call, socket, request)
    assert refused.value.code == "bad_arguments"
    with pytest.raises(ControlFailed) as refused:
        request = {"cmd": "issue", "request": {**args, "profile": "no-such-profile"}}
        await asyncio.to_thread(control_call, socket, request)
    assert refused.value.code == "unknown_profile"
    # the request file: an unknown field is a usage error (exit 2) before anything is sent
    request_file = write_request(tmp_path, issuer="class3")
    done = await ceremony_issue("--socket", str(socket), str(request_file), "--yes")
    assert done.returncode == 2 and "unknown fields ['issuer']" in done.stderr
    assert content(server) == before
