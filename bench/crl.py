"""CRL generation at 10k / 100k / 1M entries against `openssl ca -gencrl`; bytes to refresh.

Both sides list the same revocations (random 127-bit serials, a reason code each) and sign with
an RSA-2048 key of the same kind (a file key: the HSM signs one digest either way). Ours is the
signer's own code on a real LMDB repository, the revocations brought in by an import (as
`signer import` takes over an earlier CA's history): the issuer's first CRL after the import
(its membership was built as the import applied) and the steady state (the next CRL after 10
new revocations), each in a fresh subprocess for its peak RSS. openssl reads an index.txt with
the same entries. Then, at 100k entries, the bytes on the line to refresh after 1, 10 and 100
new revocations (delta answers, framed as on the wire) against a full chunked transfer. Run:

    python bench/crl.py [--quick]      # --quick: openssl at 10k and 100k only (1M extrapolated)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

# bench/replication.py shadows the `replication` package in this folder, which Python puts first
# on sys.path for a script: take the folder off (nothing is added; the venv has the project).
sys.path.remove(str(Path(__file__).resolve().parent))

from replication.log import LocalLog
from signer.pki.revocation import crl_entry
from signer.server.ca import Issuer
from signer.server.config import CrlConfig
from signer.server.crl import CrlService, draft_crl, finish_crl
from signer.server.dispatch import RequestContext
from signer.tools.history import batch_bounds
from signer.tools.measure import AnonPeak, peak_rss_mb
from signer.wire.framing import encode_frame
from signer.wire.protocol import FetchCrlArgs, Response, dump_result, encode_response
from storage import (
    BeginImport,
    FinishImport,
    ImportedCertificate,
    ImportX509,
    Issued,
    IssueX509,
    Repository,
    Revoked,
    RevokeX509,
    encode,
)

ROOT = Path(__file__).resolve().parent.parent

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
BAUD = 115200
CHUNK = 65536


class FileKeyHsm:
    """The Hsm interface over a file key: `run` and `key`, as CrlService uses them."""

    def __init__(self, key: Any):
        self._key = key

    def key(self, _label: str) -> Any:
        return self._key

    async def run(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


# --------------------------------------------------------------------------- fixtures


def make_ca(directory: Path) -> tuple[Any, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def revocations(count: int, seed: int) -> list[tuple[int, int]]:
    """(serial, not_after) pairs, sorted by serial; every certificate valid for a year or two."""
    rng = random.Random(seed)
    serials = sorted({rng.getrandbits(126) | (1 << 126) for _ in range(count)})
    start = int(NOW.timestamp())
    return [(s, start + 86400 * rng.randint(30, 700)) for s in serials]


def populate(path: Path, key_id: bytes, rows: list[tuple[int, int]]) -> None:
    """The revocations as `signer import` brings an earlier CA's history: import batches (of at
    most 32 KiB) applied to a repository, which builds the CRL membership as they apply. A
    fixture: how fast it is, is bench/import.py's question."""
    revoked_at = int(NOW.timestamp()) - 86400
    template = crl_entry(rows[0][0], NOW - dt.timedelta(days=1), 1, None)
    head, tail = template[:4], template[4 + 16 :]  # 30 len 02 10 <16-byte serial> <date, reason>
    records = [
        ImportedCertificate(
            serial, None, not_after, b"/CN=c", b"unknown", "R", revoked_at, 1, None,
            head + serial.to_bytes(16, "big") + tail, True, None,
        )
        for serial, not_after in rows
    ]  # fmt: skip
    bounds = batch_bounds(records)
    commands: list[Any] = [
        BeginImport("bench", key_id, len(bounds) - 1, len(rows), len(rows), len(rows), 1,
                    revoked_at, None, revoked_at, "bench"),
        *(ImportX509("bench", key_id, n, tuple(records[bounds[n - 1] : bounds[n]]))
          for n in range(1, len(bounds))),
        FinishImport("bench", key_id),
    ]  # fmt: skip
    with Repository(path) as repo:
        for start in range(0, len(commands), 500):
            chunk = commands[start : start + 500]
            repo.apply_batch([(start + 1 + i, encode(c)) for i, c in enumerate(chunk)])


def service(path: Path, key: Any, cert: x509.Certificate) -> tuple[CrlService, Repository, Any]:
    repo = Repository(path)
    commit_log = LocalLog(repo)
    key_id = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    issuer = Issuer("bench", cert, "bench", key_id)
    config = CrlConfig(min_interval_seconds=0)
    return (
        CrlService([issuer], FileKeyHsm(key), repo, commit_log, config, lambda: NOW),
        repo,
        commit_log,
    )


async def add_revocations(commit_log: Any, key_id: bytes, count: int, seed: int) -> None:
    """New revocations through the log, as revoke_x509 makes them."""
    rng = random.Random(seed)
    stamp = int(NOW.timestamp())
    for i in range(count):
        serial = rng.getrandbits(126) | (1 << 126)
        issue = IssueX509(
            request_id=f"i{seed}-{i}",
            request_digest=b"d",
            issuer=key_id,
            serial=serial,
            der=b"c",
            profile="p",
            not_before=stamp,
            not_after=stamp + 86400 * 365,
            issued_at=stamp,
        )
        revoke = RevokeX509(
            request_id=f"r{seed}-{i}",
            request_digest=b"d",
            issuer=key_id,
            serial=serial,
            reason=1,
            revoked_at=stamp,
            invalidity_date=None,
            crl_entry=crl_entry(serial, NOW, 1, None),
        )
        for command in (issue, revoke):
            assert isinstance(await commit_log.commit(encode(command)), Issued | Revoked)


# --------------------------------------------------------------------------- one measured run


def child(mode: str, directory: Path) -> dict[str, float]:
    """In a fresh process: build (and sign) the next CRL, or publish it; time and peak RSS."""
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    crls, repo, commit_log = service(directory / "repo", key, cert)
    state = crls._states["bench"]
    result: dict[str, float] = {}
    anon = AnonPeak().__enter__()
    try:
        if mode == "build":
            number = crls._next_number(state.key_id)
            started = time.perf_counter()
            draft = draft_crl(
                repo, state.crl_issuer, state.key_id, number, int(NOW.timestamp()), crls.config
            )
            algorithm = draft.header.algorithm
            digest = algorithm.digest(draft.tbs)
            signature = algorithm.sign(key, digest)
            assert algorithm.verify(cert.public_key(), signature, digest)
            der, _ = finish_crl(draft, signature)
            result = {
                "seconds": time.perf_counter() - started,
                "entries": draft.entries,
                "size": len(der),
            }
        else:
            started = time.perf_counter()
            crl = asyncio.run(crls.publish("bench"))
            result = {
                "seconds": time.perf_counter() - started,
                "build": state.build_seconds or 0,
                "commit": state.commit_seconds or 0,
                "entries": crl.record["entries"],
                "size": len(crl.der),
            }
    finally:
        commit_log.close()
        repo.close()
    anon.__exit__()
    result["peak_mb"] = peak_rss_mb()
    result["anon_mb"] = anon.peak
    return result


# Runs a command from a small fresh process and reports its time and its own peak RSS (wait4).
LAUNCHER = """
import json, os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
_, status, usage = os.wait4(process.pid, 0)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak_mb": usage.ru_maxrss / 1024, "status": status,
                  "stderr": process.stderr.read().decode(errors="replace")}))
"""


def measured(mode: str, directory: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(directory)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def openssl_gencrl(directory: Path, rows: list[tuple[int, int]]) -> dict[str, float]:
    """`openssl ca -gencrl` over an index.txt listing the same revocations."""
    ossl = directory / "openssl"
    ossl.mkdir(exist_ok=True)
    revoked = (NOW - dt.timedelta(days=1)).strftime("%y%m%d%H%M%SZ")
    with open(ossl / "index.txt", "w") as index:
        for n, (serial, not_after) in enumerate(rows):
            expiry = dt.datetime.fromtimestamp(not_after, dt.UTC).strftime("%y%m%d%H%M%SZ")
            index.write(f"R\t{expiry}\t{revoked},keyCompromise\t{serial:X}\tunknown\t/CN=c{n}\n")
    (ossl / "index.txt.attr").write_text("unique_subject = no\n")
    (ossl / "crlnumber").write_text("02\n")
    (ossl / "openssl.cnf").write_text(
        f"""[ ca ]
default_ca = bench
[ bench ]
database = {ossl}/index.txt
crlnumber = {ossl}/crlnumber
certificate = {directory}/ca.pem
private_key = {directory}/ca.key
default_md = sha256
default_crl_days = 7
crl_extensions = crl_ext
[ crl_ext ]
authorityKeyIdentifier = keyid:always
"""
    )
    command = [
        "openssl",
        "ca",
        "-gencrl",
        "-batch",
        "-config",
        str(ossl / "openssl.cnf"),
        "-out",
        str(ossl / "crl.pem"),
    ]
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    if result["status"] != 0:
        raise RuntimeError(f"openssl ca -gencrl failed: {result['stderr']}")
    return {"seconds": result["seconds"], "peak_mb": result["peak_mb"]}


# --------------------------------------------------------------------------- line bytes


def wire(result: Any) -> int:
    return len(encode_frame(encode_response(Response("x" * 32, dump_result(result)))))


async def refresh_bytes(directory: Path, key: Any, cert: x509.Certificate) -> dict[str, int]:
    """Bytes on the line (frames of the answers) to refresh a 100k CRL, delta against full."""
    crls, repo, commit_log = service(directory / "repo", key, cert)
    ctx = RequestContext("x" * 32, "fetch_crl", b"")
    out: dict[str, int] = {}
    try:
        base = await crls.publish("bench")
        full = 0
        offset = 0
        while offset < len(base.der):
            args = FetchCrlArgs(issuer="bench", want="full", offset=offset, max_bytes=CHUNK)
            full += wire(await crls.fetch_crl(args, ctx))
            offset += CHUNK
        out["full"] = full
        out["crl_size"] = len(base.der)
        for count in (1, 10, 100):
            await add_revocations(commit_log, crls._states["bench"].key_id, count, seed=100 + count)
            await crls.publish("bench")
            args = FetchCrlArgs(issuer="bench", have_number=base.number, max_bytes=CHUNK)
            answer = await crls.fetch_crl(args, ctx)
            assert answer.kind == "delta", answer.kind
            out[f"delta_{count}"] = wire(answer)
            base = await crls.publish("bench")  # the client now holds the newest
    finally:
        commit_log.close()
        repo.close()
    return out


# --------------------------------------------------------------------------- the run


def progress(started: float, text: str) -> None:
    print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)


def size_case(base: Path, count: int, with_openssl: bool) -> dict[str, Any]:
    started = time.perf_counter()
    directory = base / f"n{count}"
    directory.mkdir()
    key, cert = make_ca(directory)
    key_id = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    rows = revocations(count, seed=count)
    populate(directory / "repo", key_id, rows)
    progress(started, f"{count:,} revocations loaded")
    first = measured("publish", directory)  # the issuer's first CRL after the import
    progress(
        started,
        f"first CRL published in {first['seconds']:.2f} s (built and signed "
        f"{first['build']:.2f} s, recorded {first['commit']:.2f} s, "
        f"peak {first['peak_mb']:.0f} MB)",
    )
    _, repo, commit_log = service(directory / "repo", key, cert)
    asyncio.run(add_revocations(commit_log, key_id, 10, seed=1))
    commit_log.close()
    repo.close()
    steady = measured("build", directory)  # the next CRL: what runs every time after
    progress(started, f"next CRL built and signed in {steady['seconds']:.2f} s")
    published = measured("publish", directory)  # the same, recorded through the log
    progress(started, f"next CRL published in {published['seconds']:.2f} s")
    ossl = openssl_gencrl(directory, rows) if with_openssl else None
    if ossl:
        progress(started, f"openssl ca -gencrl in {ossl['seconds']:.2f} s")
    return {
        "count": count,
        "first": first,
        "steady": steady,
        "published": published,
        "openssl": ossl,
        "key": key,
        "cert": cert,
        "directory": directory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under a minute")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-crl-") as tmp:
        base = Path(tmp)
        cases = [
            size_case(base, n, not (args.quick and n == 1_000_000))
            for n in (10_000, 100_000, 1_000_000)
        ]
        line = asyncio.run(refresh_bytes(cases[1]["directory"], cases[1]["key"], cases[1]["cert"]))
    header = (
        f"{'entries':>9} | {'ours s':>6} | {'ours MB':>7} | {'+record s':>9} | "
        f"{'1st CRL s':>9} | {'1st MB':>6} | {'anon':>4} | {'openssl s':>9} | {'openssl MB':>10} | "
        f"{'ratio':>6} | {'CRL MB':>6}"
    )
    print(header)
    for case in cases:
        steady, first, ossl = case["steady"], case["first"], case["openssl"]
        o_s = f"{ossl['seconds']:9.2f}" if ossl else f"{'-':>9}"
        o_mb = f"{ossl['peak_mb']:10.0f}" if ossl else f"{'-':>10}"
        ratio = f"{steady['seconds'] / ossl['seconds']:6.3f}" if ossl else f"{'-':>6}"
        print(
            f"{case['count']:>9,} | {steady['seconds']:6.2f} | {steady['peak_mb']:7.0f} | "
            f"{case['published']['seconds']:9.2f} | {first['seconds']:9.2f} | "
            f"{first['peak_mb']:6.0f} | {first['anon_mb']:4.0f} | {o_s} | {o_mb} | {ratio} | "
            f"{steady['size'] / 1e6:6.1f}"
        )
    print("ours: the next CRL (10 new revocations) decided, assembled and signed, in a fresh")
    print("process; +record: the same, published (recorded through the log with fsync); 1st CRL:")
    print("the issuer's first after the import of its history, published. MB: peak RSS; anon:")
    print("its anonymous part (without the repository's file pages mapped read-only).")
    big, mid = cases[2], cases[1]
    if big["openssl"]:
        openssl_1m, how = big["openssl"]["seconds"], "measured"
    else:
        openssl_1m = mid["openssl"]["seconds"] * 10
        how = "extrapolated"
        print(f"openssl at 1M: {openssl_1m:.2f} s, extrapolated linearly from 100k (--quick)")
    print()
    rate = BAUD / 10
    print(f"refresh of a {line['crl_size']:,}-byte CRL (100k entries) at {BAUD} baud:")
    print(f"{'answer':>22} | {'bytes on the line':>17} | {'line time':>9}")
    rows = [("full transfer", line["full"])] + [
        (f"delta, {n} revocations", line[f"delta_{n}"]) for n in (1, 10, 100)
    ]
    for label, count in rows:
        print(f"{label:>22} | {count:>17,} | {count / rate:8.2f}s")
    gen = big["steady"]["seconds"]
    print(
        f"RESULT gen_1m_s={gen:.2f} openssl_gen_1m_s={openssl_1m:.2f} ratio={gen / openssl_1m:.3f}"
        f" refresh_bytes_10={line['delta_10']} full_bytes={line['full']}"
        f" peak_1m_mb={big['steady']['peak_mb']:.0f} openssl_1m={how}"
        f" first_1m_s={big['first']['seconds']:.2f} first_1m_mb={big['first']['peak_mb']:.0f}"
        f" first_1m_anon_mb={big['first']['anon_mb']:.0f}"
    )


if __name__ == "__main__":
    main()
