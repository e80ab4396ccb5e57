"""Two replicating signers end to end: each a SignerServer on its own emulated serial line, both
with the CA's keys on SoftHSM2 (the same token stands for two HSMs holding the same keys), Raft
between them on 127.0.0.1. A certificate issued on one is on both; a retry on the other signer
answers the same certificate; revocation on the other; health; `signer cluster` on the socket."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from ceremony_ca import make_ceremony_ca
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from health_checks import times_that_are_not_timestamps
from raft_cluster import FAST, assert_same_audit_logs, free_ports, wait_for

from replication.settings import ReplicationSettings
from signer.client.library import SignerClient
from signer.config import load
from signer.errors import ErrorCode, SignerError
from signer.link.serial_link import LinkSettings
from signer.pki.audit import decode_record
from signer.server.config import SignerConfig
from signer.server.process import SignerServer
from signer.tools.history import control_call
from signer.tools.line_emulator import LineEmulator

ROOT = Path(__file__).resolve().parent.parent
BAUD = 921600

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def ca(softhsm_token_factory, tmp_path_factory):
    token = softhsm_token_factory()
    base = tmp_path_factory.mktemp("ca")
    make_ceremony_ca(token, base, root_kind="ec-p256")
    return base, token


def pair_configs(
    ca, tmp: Path, lines: list[LineEmulator], crl: dict | None = None
) -> list[SignerConfig]:
    base, token = ca
    sections = ReplicationSettings.local_pair(tmp, tuple(free_ports(2)), **FAST)
    configs = []
    for name, section, line in zip("ab", sections, lines, strict=True):
        text = {
            "link": {"device": str(line.end_a), "baudrate": BAUD, "reopen_interval": 0.1},
            "repository": {"path": str(tmp / f"repo-{name}")},
            "hsm": {"module": token.store.module, "token_label": token.label,
                    "pin_file": str(token.pin_file)},
            "profiles": "cacert",
            "issuers": {
                "class1": {"certificate": str(base / "ca" / "class1.crt"), "key": "root"},
                "class3": {"certificate": str(base / "ca" / "class3.crt"), "key": "class3"},
            },
            "replication": section,
            "audit": {"key": "audit", "certificate": str(base / "ca" / "audit.crt"),
                      "refusal_interval_seconds": 0.1},
            **({"crl": crl} if crl else {}),
        }  # fmt: skip
        path = tmp / f"signer-{name}.yaml"
        path.write_text(yaml.safe_dump(text))
        configs.append(load(path, SignerConfig))
    return configs


def audited(repo) -> tuple[int, int]:
    """(start records, refusals of sign_x509) in a repository's audit log."""
    records = [decode_record(r) for r in repo.audit_records(0, 10_000)]
    starts = [r for r in records if r["event"] == "operator" and r["action"] == "start"]
    refused = [r for r in records if r["event"] == "refused" and r["command"] == "sign_x509"]
    return len(starts), len(refused)


def csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "www.example.org")])
    request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.DER)


def openssl_verify(ca, der: bytes, tmp: Path) -> subprocess.CompletedProcess[str]:
    base, _ = ca
    leaf = tmp / "leaf.pem"
    cert = x509.load_der_x509_certificate(der)
    leaf.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return subprocess.run(
        ["openssl", "verify", "-CAfile", str(base / "ca" / "class1.crt"),
         "-untrusted", str(base / "ca" / "class3.crt"), str(leaf)],
        capture_output=True, text=True,
    )  # fmt: skip


async def test_a_pair_issues_on_either_signer(ca, tmp_path):
    with (
        LineEmulator(tmp_path / "line-a", baud=None) as line_a,
        LineEmulator(tmp_path / "line-b", baud=None) as line_b,
    ):
        config_a, config_b = pair_configs(ca, tmp_path, [line_a, line_b])
        servers = [SignerServer(config_a), SignerServer(config_b)]
        clients = []
        try:
            for server, line in zip(servers, (line_a, line_b), strict=True):
                await server.start()
                settings = LinkSettings(device=str(line.end_b), baudrate=BAUD, reopen_interval=0.1)
                client = SignerClient(settings, timeout=20)
                await client.start()
                clients.append(client)
            a, b = servers
            args = {"profile": "server", "csr": csr(), "sans": [["dns", "www.example.org"]]}
            first = await clients[0].call("sign_x509", args, request_id="domaincerts:1:sign")
            check = openssl_verify(ca, first["certificate"], tmp_path)
            assert check.returncode == 0, check.stdout + check.stderr
            # the WebDB side switches to the other signer and retries: the same certificate
            again = await clients[1].call("sign_x509", args, request_id="domaincerts:1:sign")
            assert again == first
            revoked = await clients[1].call(
                "revoke_x509", {"issuer": "class3", "serial": first["serial"]}, request_id="r1"
            )
            assert revoked["status"] == "revoked"
            repos = [server.ca.repository for server in servers]
            await wait_for(
                lambda: repos[0].content_digest() == repos[1].content_digest(), 10, "same data"
            )
            assert repos[0].counts()["certificates"] == 1 and repos[0].counts()["revoked"] == 1
            # both signers' starts, and a refusal on the follower's line, in the one audit log
            with pytest.raises(SignerError):
                await clients[1].call("sign_x509", {**args, "profile": "no-such"})
            await wait_for(lambda: audited(repos[0]) == (2, 1), 15, "starts and the refusal")
            await wait_for(
                lambda: repos[0].content_digest() == repos[1].content_digest(), 10, "same data"
            )
            assert_same_audit_logs(repos)
            health = await clients[0].call("health")
            cluster = health["sections"]["cluster"]
            assert cluster["quorum"] is True and cluster["cluster"]["generation"] == 1
            assert times_that_are_not_timestamps(health) == []
            assert set(cluster["members"]) == {
                config_a.replication.self_address,
                config_b.replication.self_address,
            }
            # `signer cluster status` reaches the running signer on its private socket
            socket_path = config_a.replication.socket_path
            assert socket_path.stat().st_mode & 0o777 == 0o600
            status = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "signer", "cluster", "--config",
                 str(tmp_path / "signer-a.yaml"), "--json", "status"],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert status.returncode == 0, status.stderr
            assert json.loads(status.stdout)["result"]["quorum"] is True
            # an operator issues an OCSP certificate on either signer: recorded on both
            pem = x509.load_der_x509_csr(csr()).public_bytes(serialization.Encoding.PEM)
            request = {"profile": "ocsp", "csr": pem.decode(), "subject": [["CN", "OCSP test"]]}
            socket_b = config_b.replication.socket_path
            issued = await asyncio.to_thread(
                control_call, socket_b, {"cmd": "issue", "request": request}
            )
            serial, key_id = int(issued["serial"], 16), b.ca.issuers["class3"].key_id
            for repo in repos:
                await wait_for(lambda r=repo: r.get_certificate(key_id, serial), 10, "replicated")
            # one signer gone: the other refuses to issue, fast and specifically
            await clients[1].close()
            clients.pop()
            await b.stop()
            servers.pop()
            await wait_for(lambda: not a.cluster.view.has_quorum, 10, "quorum lost")
            with pytest.raises(SignerError) as caught:
                await clients[0].call("sign_x509", {**args, "csr": csr()}, request_id="x2")
            assert caught.value.code is ErrorCode.NO_QUORUM
            assert a.ca.repository.get_request("x2") is None
            health = await clients[0].call("health")
            assert health["status"] == "error"
            assert any("no quorum" in text for text in health["warnings"])
        finally:
            for client in clients:
                await client.close()
            for server in servers:
                await server.stop()


async def test_only_the_leader_schedules_crls_and_a_follower_reports_the_replicated_one(
    ca, tmp_path
):
    with (
        LineEmulator(tmp_path / "line-a", baud=None) as line_a,
        LineEmulator(tmp_path / "line-b", baud=None) as line_b,
    ):
        crl = {"poll_seconds": 0.1, "min_interval_seconds": 0}
        configs = pair_configs(ca, tmp_path, [line_a, line_b], crl)
        servers = [SignerServer(config) for config in configs]
        try:
            for server in servers:
                await server.start()
            await wait_for(
                lambda: {s.cluster.view.role for s in servers} == {"leader", "follower"},
                20,
                "roles",
            )
            leader = next(s for s in servers if s.cluster.view.role == "leader")
            follower = next(s for s in servers if s is not leader)
            key_id = leader.ca.issuers["class3"].key_id

            def published(server: SignerServer) -> int:
                last = server.ca.repository.last_crl_history(key_id)
                return 0 if last is None else int(last["crl_number"])

            await wait_for(lambda: published(follower) >= 2, 20, "the first CRLs, replicated")
            # a stale failure of the follower's (from before it applied the leader's CRL)
            state = follower.crl._states["class3"]
            state.last_error, state.failed_after = "no_quorum: lost the pair", 1
            before = published(leader)
            settings = LinkSettings(device=str(line_b.end_b if follower is servers[1]
                                               else line_a.end_b), baudrate=BAUD,
                                    reopen_interval=0.1)  # fmt: skip
            async with SignerClient(settings, timeout=20) as client:
                args = {"profile": "server", "csr": csr(), "sans": [["dns", "www.example.org"]]}
                issued = await client.call("sign_x509", args, request_id="s1")
                await client.call("revoke_x509", {"issuer": "class3", "serial": issued["serial"]})
                await wait_for(lambda: published(follower) > before, 20, "the leader's new CRL")
                health = await client.call("health")
            crls = health["sections"]["crls"]["class3"]
            assert crls["crl_number"] == published(leader) and crls["last_error"] is None
            assert not [w for w in health["warnings"] if "CRL" in w]
            for name in ("class1", "class3"):  # the follower never signed a CRL
                assert follower.crl._states[name].build_seconds is None
            assert leader.crl._states["class3"].build_seconds is not None
        finally:
            for server in servers:
                await server.stop()
