"""The issuance hot path of CertificateAuthority.sign_x509, driven directly with requests in flight
(as the protocol handler runs them): certificates built in the builder threads, signed by a
SoftHSM2 key made by the ceremony, recorded through LocalLog in LMDB."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from replication.log import LocalLog
from signer.errors import ErrorCode, SignerError
from signer.pki.profiles import load_profiles
from signer.server.ca import CertificateAuthority, Issuer
from signer.server.dispatch import RequestContext
from signer.server.hsm import Hsm
from signer.tools.ceremony import run_ceremony
from signer.wire.protocol import SignX509Args, request_digest
from storage.repository import Repository

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ca_files(softhsm_token_factory, tmp_path_factory):
    """A self-signed P-256 CA made by the ceremony on a fresh token."""
    token = softhsm_token_factory()
    base = tmp_path_factory.mktemp("hot-path")
    ceremony = {
        "hsm": {
            "module": token.store.module,
            "token_label": token.label,
            "pin_file": str(token.pin_file),
        },
        "output_dir": "ca",
        "keys": [{"label": "ca", "kind": "ec-p256"}],
        "certificates": [
            {
                "name": "ca",
                "key": "ca",
                "validity_days": 3000,
                "path_length": 0,
                "subject": [["O", "Test CA"], ["CN", "Hot path CA"]],
            }
        ],
    }
    (base / "ceremony.yaml").write_text(yaml.safe_dump(ceremony))
    run_ceremony(base / "ceremony.yaml", progress=lambda *_: None)
    return base / "ca" / "ca.crt", token


@pytest.fixture
def authority(ca_files, tmp_path):
    certificate, token = ca_files
    hsm = Hsm(token.settings())
    repository = Repository(tmp_path / "repo")
    commit_log = LocalLog(repository)
    issuer = Issuer.load("class3", certificate, "ca")  # the server profile's issuer
    profiles = load_profiles("cacert")
    yield CertificateAuthority([issuer], profiles, hsm, repository, commit_log)
    hsm.close()
    commit_log.close()
    repository.close()


def server_csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def request(request_id: str, name: str, csr: bytes | None = None):
    raw = {"profile": "server", "csr": csr or server_csr(name), "sans": [["dns", name]]}
    ctx = RequestContext(request_id, "sign_x509", request_digest("sign_x509", raw))
    return SignX509Args.model_validate(raw), ctx


async def test_requests_in_flight_are_each_signed_for_their_own_tbs(authority, ca_files, tmp_path):
    ca_cert = x509.load_pem_x509_certificate(ca_files[0].read_bytes())
    names = [f"host{i}.example.org" for i in range(24)]
    calls = [request(f"r{i}", name) for i, name in enumerate(names)]
    results = await asyncio.gather(*(authority.sign_x509(args, ctx) for args, ctx in calls))

    assert len({r.serial for r in results}) == len(names)
    for (args, _), name, result in zip(calls, names, results, strict=True):
        cert = x509.load_der_x509_certificate(result.certificate)
        cert.verify_directly_issued_by(ca_cert)  # raises unless this signature covers this TBS
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert cert.serial_number == int(result.serial, 16)
        csr = x509.load_der_x509_csr(args.csr)
        assert cert.public_key() == csr.public_key()
        recorded = authority.repository.get_certificate(
            authority.issuers["class3"].key_id, cert.serial_number
        )
        assert recorded is not None and recorded["der"] == result.certificate
        assert recorded["not_before"] == int(result.not_before.timestamp())
        assert recorded["not_after"] == int(result.not_after.timestamp())
    assert authority.repository.counts()["certificates"] == len(names)

    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(
        x509.load_der_x509_certificate(results[-1].certificate).public_bytes(
            serialization.Encoding.PEM
        )
    )
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_files[0]), str(leaf)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr


async def test_copies_of_one_request_in_flight_answer_the_recorded_certificate(authority):
    # Copies that reach the CA together (two serial lines, say) each sign, but the log records
    # the first one only; every copy must answer with that recorded certificate.
    args, ctx = request("domaincerts:7:sign", "www.example.org")
    results = await asyncio.gather(*(authority.sign_x509(args, ctx) for _ in range(4)))

    assert authority.repository.counts()["certificates"] == 1
    assert all(result == results[0] for result in results[1:])
    recorded = authority.repository.get_request("domaincerts:7:sign")
    assert recorded is not None
    assert results[0].serial == f"{recorded.result.serial:X}"
    digest = hashlib.sha256(results[0].certificate).digest()
    again = await authority.sign_x509(args, ctx)
    assert hashlib.sha256(again.certificate).digest() == digest


async def test_closed_hsm_is_refused_with_an_error_and_nothing_is_written(authority):
    authority.hsm.close()
    args, ctx = request("after-close", "www.example.org")
    with pytest.raises(SignerError) as caught:
        await authority.sign_x509(args, ctx)
    assert caught.value.code is ErrorCode.HSM_UNAVAILABLE
    assert authority.repository.counts()["certificates"] == 0
    assert authority.repository.get_request("after-close") is None
