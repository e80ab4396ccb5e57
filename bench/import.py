"""Import of an earlier CA's history into a replicated pair: what the switch from the old signer
costs (docs/migration.md, docs/performance.md "Import").

One run, every step as in production:

1. A synthetic `openssl ca` state: 1,000,000 certificates with sequential serials (issued over
   the last four years, valid two), 300,000 of them revoked; the CA key in a file.
2. `openssl ca -gencrl` over it: the earlier CA's last CRL, and the peer figure (time, peak RSS).
3. The CA key into SoftHSM2 by the ceremony's import mode.
4. Two `signer serve` processes replicating through RaftLog on 127.0.0.1 (production timings),
   each on an emulated serial line.
5. `signer import` as an operator runs it (its own process): read, check, decide, send; timed
   from start to exit, with its peak RSS.
6. Until both repositories are identical (content digest).
7. The first CRL after the import: in a fresh process on a copy of the repository (how
   bench/crl.py measures an issuer's first CRL: time and peak RSS), and through the pair.
8. The CRL's serials against openssl's: equal, less the certificates that had expired before
   the imported CRL's time (RFC 5280 retention; docs/crl.md).

Run: python bench/import.py [--quick]      (--quick: 100,000 certificates, 30,000 revoked)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

# bench/replication.py shadows the `replication` package in this folder, which Python puts first
# on sys.path for a script: take the folder off (nothing is added; the venv has the project).
sys.path.remove(str(Path(__file__).resolve().parent))

from replication.settings import ReplicationSettings
from signer.pki.der import serial_hex
from signer.tools.ceremony import run_ceremony
from signer.tools.history import control_call
from signer.tools.line_emulator import LineEmulator
from signer.tools.softhsm import new_token
from storage import Repository

ROOT = Path(__file__).resolve().parent.parent

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
REASONS = ["", ",keyCompromise", ",superseded", ",cessationOfOperation", ",affiliationChanged"]


def measured(command: list[str]) -> dict[str, Any]:
    """Run `command`; its wall time, exit status, output and peak RSS (its own, from wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    out = process.stdout.read() if process.stdout else b""
    err = process.stderr.read() if process.stderr else b""
    _, status, usage = os.wait4(process.pid, 0)
    return {
        "seconds": time.perf_counter() - started,
        "status": os.waitstatus_to_exitcode(status),
        "peak_mb": usage.ru_maxrss / 1024,
        "stdout": out.decode(errors="replace"),
        "stderr": err.decode(errors="replace"),
    }


def progress(started: float, text: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the old CA


def make_ca(directory: Path) -> x509.Certificate:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Old CA"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "Old Class 3")])  # fmt: skip
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=3650))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )  # fmt: skip
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert


def write_history(directory: Path, count: int, revoked: int) -> dict[int, int]:
    """index.txt, serial, crlnumber, openssl.cnf; returns {revoked serial: notAfter}."""
    rng = random.Random(count)
    chosen = set(rng.sample(range(count), revoked))
    span = 4 * 365 * 86400
    start = int(NOW.timestamp()) - span - 86400
    out: dict[int, int] = {}
    lines = []
    for n in range(count):
        serial = 0x1000 + n
        digits = serial_hex(serial)  # openssl ca wants an even number of digits
        issued = start + span * n // count
        not_after = issued + 730 * 86400
        expiry = _asn1(not_after)
        subject = f"/CN=CAcert WoT User/emailAddress=member{n}@example.org"
        if n in chosen:
            revoked_at = min(issued + rng.randint(3600, 700 * 86400), int(NOW.timestamp()) - 7200)
            reason = REASONS[n % len(REASONS)]
            lines.append(
                f"R\t{expiry}\t{_asn1(revoked_at)}{reason}\t{digits}\tunknown\t{subject}\n"
            )
            out[serial] = not_after
        else:
            lines.append(f"V\t{expiry}\t\t{digits}\tunknown\t{subject}\n")
    (directory / "index.txt").write_text("".join(lines))
    (directory / "index.txt.attr").write_text("unique_subject = no\n")
    (directory / "serial").write_text(f"{0x1000 + count:X}\n")
    (directory / "crlnumber").write_text("1F40\n")
    (directory / "openssl.cnf").write_text(
        f"[ ca ]\ndefault_ca = old\n[ old ]\ndatabase = {directory}/index.txt\n"
        f"crlnumber = {directory}/crlnumber\ncertificate = {directory.parent}/ca.crt\n"
        f"private_key = {directory.parent}/ca.key\ndefault_md = sha256\ndefault_crl_days = 7\n"
        "crl_extensions = crl_ext\n[ crl_ext ]\nauthorityKeyIdentifier = keyid:always\n"
    )
    return out


def _asn1(moment: int) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%y%m%d%H%M%SZ")


# --------------------------------------------------------------------------- the pair


def signer_configs(base: Path, token: dict[str, Any], lines: list[LineEmulator]) -> list[Path]:
    ports = []
    for _ in range(2):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    sections = ReplicationSettings.local_pair(base, (ports[0], ports[1]))
    paths = []
    for name, line, section in zip("ab", lines, sections, strict=True):
        text = {
            "link": {"device": str(line.end_a), "baudrate": 115200, "reopen_interval": 0.5},
            "log_level": "WARNING",
            "repository": {"path": str(base / f"repo-{name}")},
            "hsm": token,
            "profiles": "cacert",
            "issuers": {
                "class3": {"certificate": str(base / "new" / "class3.crt"), "key": "class3"}
            },
            "replication": section,
            "crl": {"poll_seconds": 3600},  # the first CRL after the import is the bench's
        }
        path = base / f"signer-{name}.yaml"
        path.write_text(yaml.safe_dump(text))
        paths.append(path)
    return paths


def wait_for_quorum(socket: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if control_call(socket, {"cmd": "status"}, timeout=5).get("quorum"):
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"no quorum on {socket}")


def identical(repos: list[Path], timeout: float = 300) -> float:
    """Seconds until both repositories hold the same content (read beside the signers)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        readers = [Repository(path, readonly=True) for path in repos]
        try:
            indexes = [r.last_applied_index() for r in readers]
            if (
                indexes[0] == indexes[1]
                and readers[0].content_digest() == readers[1].content_digest()
            ):
                return time.monotonic() - started
        finally:
            for reader in readers:
                reader.close()
        time.sleep(0.2)
    raise RuntimeError("the two repositories did not become identical")


def peak_of(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --------------------------------------------------------------------------- the first CRL


def child_first_crl(repo: str, config: str) -> dict[str, Any]:
    """In a fresh process: the issuer's first CRL after the import on a copy of the repository,
    published as the signer does (decided, assembled, signed in the HSM, recorded)."""
    from replication.log import LocalLog
    from signer.config import load
    from signer.server.ca import Issuer
    from signer.server.config import SignerConfig
    from signer.server.crl import CrlService
    from signer.server.hsm import Hsm
    from signer.tools.measure import AnonPeak

    settings = load(Path(config), SignerConfig)
    assert settings.hsm is not None
    repository = Repository(Path(repo))
    commit_log = LocalLog(repository)
    hsm = Hsm(settings.hsm)
    issuer = Issuer.load("class3", settings.issuers["class3"].certificate, "class3")
    service = CrlService([issuer], hsm, repository, commit_log, settings.crl)
    try:
        with AnonPeak() as anon:
            started = time.perf_counter()
            crl = asyncio.run(service.publish("class3"))
            seconds = time.perf_counter() - started
        (Path(repo) / "first.crl").write_bytes(crl.der)
        result = {"seconds": seconds, "entries": crl.record["entries"], "size": len(crl.der),
                  "number": crl.number, "anon_mb": anon.peak}  # fmt: skip
    finally:
        commit_log.close()
        hsm.close()
        repository.close()
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            result["peak_mb"] = int(line.split()[1]) / 1024
    return result


# --------------------------------------------------------------------------- the run


def run(base: Path, count: int, revoked: int) -> dict[str, Any]:
    started = time.perf_counter()
    history = base / "old" / "class3"
    history.mkdir(parents=True)
    cert = make_ca(base / "old")
    expiries = write_history(history, count, revoked)
    progress(started, f"history: {count:,} certificates, {revoked:,} revoked")
    config = str(history / "openssl.cnf")
    out = str(history / "crl.pem")
    gencrl = measured(["openssl", "ca", "-gencrl", "-batch", "-config", config, "-out", out])
    if gencrl["status"] != 0:
        raise RuntimeError(gencrl["stderr"])
    old_crl = x509.load_pem_x509_crl((history / "crl.pem").read_bytes())
    next_number = int((history / "crlnumber").read_text(), 16)  # openssl moved it on
    progress(started, f"openssl ca -gencrl: {gencrl['seconds']:.2f} s, {gencrl['peak_mb']:.0f} MB")
    conf, pin_file = new_token(base / "softhsm", "bench")
    token = {"module": _softhsm(), "token_label": "bench", "pin_file": str(pin_file),
             "softhsm_conf": str(conf)}  # fmt: skip
    ceremony = {
        "hsm": token,
        "output_dir": "new",
        "keys": [
            {"label": "class3", "kind": "rsa-2048", "import_from": str(base / "old" / "ca.key")}
        ],
        "certificates": [
            {"name": "class3", "key": "class3", "existing": str(base / "old" / "ca.crt")}
        ],
    }
    (base / "ceremony.yaml").write_text(yaml.safe_dump(ceremony))
    os.environ["SOFTHSM2_CONF"] = str(conf)
    run_ceremony(base / "ceremony.yaml", progress=lambda _: None)
    progress(started, "the CA key imported into SoftHSM2")
    with (
        LineEmulator(base / "line-a", baud=None) as line_a,
        LineEmulator(base / "line-b", baud=None) as line_b,
    ):
        paths = signer_configs(base, token, [line_a, line_b])
        sockets = [base / "raft-a" / "control.sock", base / "raft-b" / "control.sock"]
        nodes = [subprocess.Popen([sys.executable, "-m", "signer", "serve", "--config", str(path)],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for path in paths]  # fmt: skip
        try:
            for socket in sockets:
                wait_for_quorum(socket)
            progress(started, "the pair is up")
            signer = [sys.executable, "-m", "signer"]
            imported = measured([*signer, "import", "--config", str(paths[0]), "--history",
                                 f"class3={history}", "--no-crl", "--json"])  # fmt: skip
            if imported["status"] != 0:
                raise RuntimeError(imported["stderr"])
            report = json.loads(imported["stdout"])
            progress(
                started,
                f"signer import: {imported['seconds']:.1f} s, peak {imported['peak_mb']:.0f} MB",
            )
            sync = identical([base / "repo-a", base / "repo-b"])
            progress(started, f"both repositories identical ({sync:.1f} s after the import)")
            with Repository(base / "repo-a", readonly=True) as reader:
                (base / "copy").mkdir()  # page for page: a compacted copy would flatter the CRL
                reader._require_env().copy(str(base / "copy"), compact=False)
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(base / "copy"), str(paths[0])],
                capture_output=True, text=True, check=True, cwd=ROOT,
            )  # fmt: skip
            first = json.loads(child.stdout.strip().splitlines()[-1])
            progress(
                started,
                f"first CRL (fresh process): {first['seconds']:.2f} s, {first['peak_mb']:.0f} MB",
            )
            pair = control_call(sockets[0], {"cmd": "publish_crl", "issuer": "class3", "der": True})
            progress(started, f"first CRL through the pair: {pair['seconds']:.2f} s")
            node_peaks = [peak_of(node.pid) for node in nodes]
        finally:
            for node in nodes:
                node.terminate()
            for node in nodes:
                node.wait(timeout=60)
    cut = int(old_crl.last_update_utc.timestamp())
    openssl_serials = {entry.serial_number for entry in old_crl}
    expected = {s for s in openssl_serials if expiries[s] >= cut}
    ours = {e.serial_number for e in x509.load_der_x509_crl(base64.b64decode(pair["der"]))}
    fresh = {
        e.serial_number for e in x509.load_der_x509_crl((base / "copy" / "first.crl").read_bytes())
    }
    return {
        "count": count,
        "revoked": revoked,
        "gencrl": gencrl,
        "import": imported,
        "report": report,
        "sync_s": sync,
        "first": first,
        "pair": pair,
        "node_peaks": node_peaks,
        "openssl_entries": len(openssl_serials),
        "left_expired": len(openssl_serials - expected),
        "crl_equal": ours == expected == fresh
        and first["number"] == pair["crl_number"] == next_number,
        "crl_entries": len(ours),
        "cert": cert,
    }


def _softhsm() -> str:
    from signer.tools.softhsm import find_softhsm_module

    module = find_softhsm_module()
    if module is None:
        raise SystemExit("SoftHSM2 is not installed (ops/setup.sh)")
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k certificates (under a minute)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_first_crl(*args.child)))
        return
    count, revoked = (100_000, 30_000) if args.quick else (1_000_000, 300_000)
    with tempfile.TemporaryDirectory(prefix="bench-import-") as tmp:
        r = run(Path(tmp), count, revoked)
    imported = r["report"]["imports"][0]
    total = r["import"]["seconds"]
    plan_s = total - imported["seconds"]
    print(f"{'step':<58} | {'seconds':>8} | {'peak MB':>7} | figure")
    rows = [
        (f"openssl ca -gencrl ({r['openssl_entries']:,} entries): the peer", r["gencrl"]["seconds"],
         r["gencrl"]["peak_mb"], ""),
        (f"signer import, whole ({r['count']:,} certificates)", total, r["import"]["peak_mb"],
         f"{r['count'] / total:,.0f} certificates/s"),
        ("  read, check, decide (index.txt, crl.pem)", plan_s, None, ""),
        ("  to the pair: batches committed through RaftLog", imported["seconds"], None,
         f"{imported['records_per_s']:,.0f} certificates/s"),
        ("both repositories identical, after the import", r["sync_s"], None, ""),
        (f"first CRL, fresh process ({r['first']['entries']:,} entries)", r["first"]["seconds"],
         r["first"]["peak_mb"], f"{r['first']['size'] / 1e6:.1f} MB CRL, "
         f"{r['first']['anon_mb']:.0f} MB anonymous"),
        ("first CRL through the pair (barrier, build, HSM, Raft)", r["pair"]["seconds"], None,
         f"number {r['pair']['crl_number']:#x}"),
    ]  # fmt: skip
    for label, seconds, peak, figure in rows:
        mb = f"{peak:7.0f}" if peak is not None else f"{'':>7}"
        print(f"{label:<58} | {seconds:8.2f} | {mb} | {figure}")
    print(f"signers' peak RSS over the run: {r['node_peaks'][0]:.0f} / {r['node_peaks'][1]:.0f} MB")
    print(f"CRL serials: ours {r['crl_entries']:,}; openssl {r['openssl_entries']:,} less "
          f"{r['left_expired']:,} expired before the earlier CA's last CRL: "
          f"{'equal' if r['crl_equal'] else 'DIFFERENT'}")  # fmt: skip
    scale = 1_000_000 / r["count"]  # --quick: extrapolated linearly, and said so
    print(
        f"RESULT import_1m_s={total * scale:.1f} import_measured={r['count']} "
        f"records_per_s={r['count'] / total:.0f} crl_equal={int(r['crl_equal'])} "
        f"first_crl_s={r['first']['seconds']:.2f} first_crl_mb={r['first']['peak_mb']:.0f} "
        f"first_crl_anon_mb={r['first']['anon_mb']:.0f} "
        f"first_crl_pair_s={r['pair']['seconds']:.2f} openssl_gencrl_s={r['gencrl']['seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
