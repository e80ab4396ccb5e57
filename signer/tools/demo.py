"""`signer demo`: the main job on embedded defaults, on one machine.

A SoftHSM2 token stands in for the HSM, the key ceremony runs on it with the shipped
`config/ceremony.yaml`, a line emulator stands in for the serial cable (two ptys paced at the
real baud rate), and a signer process serves one end. On the other end, first the client library
talks to it directly (health, issuing under the shipped profiles, revoking, asking for the
outcome of an earlier request), then the WebDB client does the whole job from a WebDB on SQLite:
rows of every kind, as CAcert's web application writes them, to certificates under CAcert's
profile set, an OpenPGP certification, a revocation, CRLs published.
Everything lives in one working directory, kept afterwards for a look.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from signer.client.library import SignerClient
from signer.client.webdb import RunReport, WebdbClient, WebdbClientConfig
from signer.config import validate
from signer.errors import RequestTimeout
from signer.link.serial_link import LinkSettings
from signer.tools.ceremony import run_ceremony
from signer.tools.line_emulator import LineEmulator
from signer.tools.softhsm import SoftHsmError, find_softhsm_module, new_token
from signer.tools.webdb_fixture import demo_rows, openpgp_row, request_revocation

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
SIGNERS = ("a", "b")
TOKEN_LABEL = "cacert-signer"
Say = Any


def run(workdir: Path, baud: int, say: Say = print) -> dict[str, Any]:
    """Two replicating signers, each with its own HSM (holding the same keys) and serial line."""
    say(f"demo: working in {workdir}")
    hsm = make_token(workdir, say)
    ca_dir = make_ca(workdir, hsm, say)
    hsms = {"a": hsm, "b": copy_token(workdir, hsm, say)}
    replication = replication_settings(workdir)
    with contextlib.ExitStack() as stack:
        lines = {
            name: stack.enter_context(LineEmulator(workdir / f"line-{name}", baud=baud))
            for name in SIGNERS
        }
        signers = []
        try:
            for name in SIGNERS:
                line = lines[name]
                say(
                    f"demo: serial line of signer {name} at {baud} baud: "
                    f"{line.end_a} <-> {line.end_b}"
                )
                config = write_signer_config(
                    workdir, name, line.end_a, baud, hsms[name], ca_dir, replication[name]
                )
                signers.append(start_signer(config, workdir / f"signer-{name}.log"))
                say(
                    f"demo: signer {name} started (pid {signers[-1].pid}), "
                    f"log in {workdir / f'signer-{name}.log'}"
                )
            ends = [lines[name].end_b for name in SIGNERS]
            report = asyncio.run(drive(workdir, ends[0], baud, ca_dir, say))
            report["webdb"] = asyncio.run(webdb_chain(workdir, ends, baud, say))
            report["replicas"] = asyncio.run(compare_replicas(ends, baud, say))
            return report
        finally:
            for signer in signers:
                signer.terminate()
            for signer in signers:
                signer.wait(timeout=15)
            say("demo: signers stopped")


def copy_token(workdir: Path, hsm: dict[str, Any], say: Say) -> dict[str, Any]:
    """Signer b's HSM: a copy of the token, as a key backup restored into the second HSM."""
    store = workdir / "softhsm-b"
    if not store.exists():
        shutil.copytree(workdir / "softhsm", store)
        conf = store / "softhsm2.conf"
        conf.write_text(conf.read_text().replace(str(workdir / "softhsm"), str(store)))
        say(f"demo: the second signer's HSM holds a copy of the token: {store}")
    return {**hsm, "softhsm_conf": str(store / "softhsm2.conf")}


def replication_settings(workdir: Path) -> dict[str, dict[str, Any]]:
    """The pair on 127.0.0.1 (a crossover cable in production), with a shared 0600 secret."""
    secret = workdir / "replication.secret"
    if not secret.exists():
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")
    ports = dict(zip(SIGNERS, free_ports(len(SIGNERS)), strict=True))
    return {
        name: {
            "self_address": f"127.0.0.1:{ports[name]}",
            "peers": [f"127.0.0.1:{ports[other]}" for other in SIGNERS if other != name],
            "secret_file": str(secret),
            "journal_dir": str(workdir / f"raft-{name}"),
        }
        for name in SIGNERS
    }


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def make_token(workdir: Path, say: Say) -> dict[str, Any]:
    """A private SoftHSM2 store with one token; the PIN goes to a mode-0600 file."""
    store = workdir / "softhsm"
    conf, pin_file = store / "softhsm2.conf", store / "pin"
    if not pin_file.exists():
        conf, pin_file = new_token(store, TOKEN_LABEL)
        say(f"demo: SoftHSM2 token {TOKEN_LABEL!r} initialised in {store}")
    module = find_softhsm_module()
    if module is None:
        raise SoftHsmError("SoftHSM2 is not installed (Debian: apt install softhsm2)")
    return {
        "module": module,
        "token_label": TOKEN_LABEL,
        "pin_file": str(pin_file),
        "softhsm_conf": str(conf),
    }


def make_ca(workdir: Path, hsm: dict[str, Any], say: Say) -> Path:
    """The shipped ceremony, with the demo's token and output directory."""
    ceremony = yaml.safe_load((CONFIG_DIR / "ceremony.yaml").read_text())
    ceremony["hsm"] = hsm
    ceremony["output_dir"] = str(workdir / "ca")
    path = workdir / "ceremony.yaml"
    path.write_text(yaml.safe_dump(ceremony, sort_keys=False))
    say("demo: key ceremony (RSA-4096 keys are generated inside the token; this takes a while)")
    run_ceremony(path, progress=lambda line: say(f"demo:   {line}"))
    return workdir / "ca"


def write_signer_config(
    workdir: Path,
    name: str,
    device: Path,
    baud: int,
    hsm: dict[str, Any],
    ca_dir: Path,
    replication: dict[str, Any],
) -> Path:
    config = {
        "link": {"device": str(device), "baudrate": baud},
        "log_level": "INFO",
        "repository": {"path": str(workdir / f"repository-{name}")},
        "hsm": hsm,
        "profiles": "cacert",
        "issuers": {
            "class1": {"certificate": str(ca_dir / "root.crt"), "key": "cacert-root"},
            "class3": {"certificate": str(ca_dir / "class3.crt"), "key": "cacert-class3"},
        },
        "openpgp": {"ca_file": str(ca_dir / "openpgp-ca.yaml")},
        # A new CRL soon after each revocation, so that the demo shows it at once.
        "crl": {"min_interval_seconds": 0, "poll_seconds": 0.2},
        "audit": {"key": "cacert-audit", "certificate": str(ca_dir / "audit.crt")},
        "replication": replication,
    }
    path = workdir / f"signer-{name}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_signer(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "signer", "serve", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


async def drive(workdir: Path, device: Path, baud: int, ca_dir: Path, say: Say) -> dict[str, Any]:
    settings = LinkSettings(device=str(device), baudrate=baud)
    report: dict[str, Any] = {}
    async with SignerClient(settings, timeout=60.0) as client:
        await wait_ready(client, say)
        issuers = await client.call("list_issuers")
        say("demo: issuers: " + ", ".join(i["name"] for i in issuers["issuers"]))
        report["certificates"] = await issue(client, workdir, ca_dir, say)
        server = report["certificates"]["server"]
        revoked = await client.call(
            "revoke_x509",
            {"issuer": server["issuer"], "serial": server["serial"], "reason": "superseded"},
            request_id="demo:domaincerts:1:revoke",
        )
        say(f"demo: revoked {revoked['serial']} ({revoked['reason']}): {revoked['status']}")
        status = await client.call("request_status", {"request_id": "demo:domaincerts:1:sign"})
        say(f"demo: outcome of request demo:domaincerts:1:sign: {status['state']}")
        started = time.monotonic()
        health = await client.call("health")
        elapsed = time.monotonic() - started
    show_health(health, elapsed, say)
    report.update(health=health, revoked=revoked, health_round_trip_ms=round(elapsed * 1000, 1))
    return report


async def issue(client: SignerClient, workdir: Path, ca_dir: Path, say: Say) -> dict[str, Any]:
    """A server certificate and a client one under CAcert's profiles, sent as the WebDB sends
    them."""
    requests: dict[str, tuple[str, dict[str, Any]]] = {
        "server": (
            "demo:domaincerts:1:sign",
            {
                "profile": "server",
                "csr": csr(ec.generate_private_key(ec.SECP256R1()), "www.example.org"),
                "sans": [["dns", "www.example.org"], ["dns", "example.org"]],
            },
        ),
        "client": (
            "demo:emailcerts:1:sign",
            {
                "profile": "client",
                "csr": csr(rsa.generate_private_key(65537, 2048), "ignored"),
                "subject": [["CN", "CAcert WoT User"], ["emailAddress", "alice@example.org"]],
                "sans": [["email", "alice@example.org"]],
                "validity_days": 730,
            },
        ),
    }
    calls = [client.call("sign_x509", args, request_id=rid) for rid, args in requests.values()]
    results = dict(zip(requests, await asyncio.gather(*calls), strict=True))
    for name, result in results.items():
        path = workdir / f"{name}.crt"
        cert = x509.load_der_x509_certificate(result["certificate"])
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        verdict = openssl_verify(ca_dir, path)
        say(
            f"demo: issued {name} certificate serial {result['serial']} by {result['issuer']}, "
            f"valid to {result['not_after']:%Y-%m-%d}: {path} (openssl verify: {verdict})"
        )
        result["openssl_verify"] = verdict
    return results


def csr(key: Any, common_name: str) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def openssl_verify(ca_dir: Path, path: Path) -> str:
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(ca_dir / "root.crt"),
            "-untrusted",
            str(ca_dir / "class3.crt"),
            str(path),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return "OK" if result.returncode == 0 else (result.stdout + result.stderr).strip()


def show_health(health: dict[str, Any], elapsed: float, say: Say) -> None:
    say(f"demo: health over the line in {elapsed * 1000:.0f} ms: status {health['status']}")
    say(f"demo:   signer version {health['version']}, clock {health['time'].isoformat()}")
    for text in health["warnings"]:
        say(f"demo:   warning: {text}")
    sections = health["sections"]
    link = sections["link"]
    say(f"demo:   link {link['state']}, frames in {link['frames_in']}, out {link['frames_out']}")
    if "hsm" in sections:
        for key in sections["hsm"].get("keys", []):
            say(f"demo:   hsm key {key['label']}: test signature {key.get('latency_ms')} ms")
    if "cas" in sections:
        for name, ca in sections["cas"].items():
            say(f"demo:   CA {name}: {ca['days_left']} days left")
    if "repository" in sections:
        repo = sections["repository"]
        say(
            f"demo:   repository: {repo['counts']['certificates']} certificates, "
            f"{repo['counts']['revoked']} revoked, consistent: {repo['consistent']}"
        )


async def wait_ready(client: SignerClient, say: Say, limit: float = 60.0) -> None:
    """Bytes sent before the signer opens its end are lost, as on a real line: probe until up."""
    deadline = time.monotonic() + limit
    while True:
        try:
            await client.call("health", timeout=1.0, attempts=1)
            return
        except RequestTimeout:
            if time.monotonic() > deadline:
                raise
            say("demo: waiting for the signer to answer ...")


async def webdb_chain(workdir: Path, devices: list[Path], baud: int, say: Say) -> dict[str, Any]:
    """The WebDB side's daemon, one pass at a time, on a WebDB in SQLite."""
    www = workdir / "www"
    config = validate(
        {
            "database": {"driver": "sqlite", "path": str(workdir / "webdb.sqlite")},
            "base_dir": str(www),
            "lines": [{"device": str(device), "baudrate": baud} for device in devices],
            "timeout": 60.0,
            "crl": {
                "outputs": {
                    "class1": str(www / "revoke.crl"),
                    "class3": str(www / "class3-revoke.crl"),
                }
            },
            "audit": {
                "directory": str(workdir / "web-audit"),
                "certificate": str(workdir / "ca" / "audit.crt"),
            },
        },
        WebdbClientConfig,
        workdir / "webdb-client.yaml",
    )
    async with WebdbClient(config) as client:
        assert client.db is not None
        ids = await demo_rows(client.db, www)
        await openpgp_row(client.db, www, user_openpgp_key(), "alice@example.org")
        say(f"demo: WebDB (SQLite) with {len(ids) + 1} pending rows: " + ", ".join(ids))
        first = await client.run_once()
        say(f"demo: webdb-client pass 1: {summary(first)}")
        await request_revocation(client.db, "domaincerts", ids["server"])
        second = await client.run_once()
        say(
            f"demo: webdb-client pass 2 (revocation of domaincerts {ids['server']}): "
            f"{summary(second)}"
        )
        await asyncio.sleep(1.0)  # the signer's CRL scheduler issues the CRL with the revocation
        crls = await client.refresh_crls()
        say("demo: webdb-client CRL refresh: " + ", ".join(f"{k} {v}" for k, v in crls.items()))
        rows = await written_rows(client.db)
    for row in rows:
        say(f"demo:   {row}")
    for name in ("revoke.crl", "class3-revoke.crl"):
        path = www / name
        if path.exists():
            crl = x509.load_der_x509_crl(path.read_bytes())
            say(
                f"demo:   CRL {path}: {len(list(crl))} entries, next update "
                f"{crl.next_update_utc:%Y-%m-%d %H:%M}"
            )
    return {"pass1": _plain(first), "pass2": _plain(second), "rows": rows}


def _plain(report: RunReport) -> dict[str, Any]:
    """A pass report as plain data for --json."""
    return {
        "requests": dataclasses.asdict(report.requests),
        "crls": report.crls,
        "alerts": [str(alert) for alert in report.alerts],
    }


def summary(report: RunReport) -> str:
    requests = report.requests
    text = f"{len(requests.done)} done"
    if requests.recovered:
        text += f", {len(requests.recovered)} recovered"
    if requests.failed:
        text += f", refused: {requests.failed}"
    if requests.deferred:
        text += f", deferred: {requests.deferred}"
    crls = ", ".join(f"{name} {outcome}" for name, outcome in report.crls.items())
    return f"{text}; CRLs: {crls or 'none'}; operator alerts: {len(report.alerts)}"


async def written_rows(db: Any) -> list[str]:
    lines = []
    for table in ("emailcerts", "domaincerts", "orgemailcerts", "orgdomaincerts"):
        sql = f"SELECT id, serial, crt_name, warning, revoked FROM {table} ORDER BY id"
        for row in await db.query(sql):
            revoked = str(row["revoked"] or "")
            line = (
                f"{table} {row['id']}: serial {row['serial'] or '-'}, "
                f"{row['crt_name'] or '(no certificate)'}, warning {row['warning']}"
            )
            lines.append(line + (f", revoked {revoked}" if revoked[:4] not in ("", "0000") else ""))
    for row in await db.query("SELECT id, email, crt, expire FROM gpg ORDER BY id"):
        lines.append(
            f"gpg {row['id']}: {row['email']} certified, file {row['crt'] or '-'}, "
            f"expires {row['expire']}"
        )
    return lines


def user_openpgp_key() -> bytes:
    """A member's OpenPGP public key with the two user IDs the web application accepted (made
    here with PGPy; members make theirs with gpg): both get certified."""
    import pgpy
    from pgpy.constants import HashAlgorithm, KeyFlags, PubKeyAlgorithm

    key = pgpy.PGPKey.new(PubKeyAlgorithm.RSAEncryptOrSign, 2048)
    for address in ("alice@example.org", "alice@example.net"):
        uid = pgpy.PGPUID.new("Alice Example", email=address)
        key.add_uid(uid, usage={KeyFlags.Sign, KeyFlags.Certify}, hashes=[HashAlgorithm.SHA256])
    return bytes(key.pubkey)


async def compare_replicas(devices: list[Path], baud: int, say: Say) -> dict[str, Any]:
    """Each signer's own view: the same repository on both, and the cluster's state."""
    views = {}
    for name, device in zip(SIGNERS, devices, strict=True):
        settings = LinkSettings(device=str(device), baudrate=baud)
        async with SignerClient(settings, timeout=60.0) as client:
            health = await client.call("health")
        sections = health["sections"]
        cluster = sections.get("cluster", {})
        counts = sections["repository"]["counts"]
        views[name] = {
            "status": health["status"],
            "role": cluster.get("role"),
            "certificates": counts["certificates"],
            "revoked": counts["revoked"],
            "applied": sections["repository"]["last_applied_index"],
            "warnings": health["warnings"],
        }
        say(
            f"demo: signer {name}: {health['status']}, {cluster.get('role')}, "
            f"{counts['certificates']} certificates, {counts['revoked']} revoked, "
            f"applied index {views[name]['applied']}"
        )
        for text in health["warnings"]:
            say(f"demo:   warning: {text}")
    return views
