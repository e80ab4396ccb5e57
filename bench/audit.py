"""The audit log: appends, proofs and verification at a million records, and what it costs
issuance.

- append_per_s: records appended to the repository's tree (record + node hashes in LMDB),
  1000 per write transaction, as `apply` does them;
- proof_ms_1m: an inclusion proof plus a consistency proof from the stored nodes at 1,000,000
  records (random positions), beside the peer, a root rebuilt from every record (what the node
  store avoids);
- verify_1m_s: `signer audit verify`'s pass over a file of 1,000,000 records (frames, decode,
  leaf hashes, the root) against a signed head;
- overhead_ratio: issuance throughput (the real sign_x509 path of bench/issuance.py: lint,
  SoftHSM2 signature, LMDB commit with fsync) with the audit log over without it (the records
  not appended), in interleaved rounds.

Run: python bench/audit.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.remove(str(Path(__file__).resolve().parent))  # bench/replication.py shadows a package

import storage.apply
from signer.pki import merkle
from signer.pki.audit import frame, iter_frames, tree_head_message, verify_log
from signer.server.hsm import Hsm
from storage import Repository
from storage.audit import append
from storage.layout import pack
from storage.writer import Writer

MILLION = 1_000_000


def load_issuance_bench() -> Any:
    """bench/issuance.py's CA and issuance run (it takes its folder off sys.path itself)."""
    path = Path(__file__).resolve().with_name("issuance.py")
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_issuance", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_issuance"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def record(n: int) -> bytes:
    """An issue_x509 record as the repository writes it (~260 bytes)."""
    return pack(
        {
            "v": 1,
            "index": n + 1,
            "event": "issue_x509",
            "time": 1_765_000_000 + n,
            "request_id": f"webdb:domaincerts:{n}:sign",
            "request_digest": n.to_bytes(32, "big"),
            "issuer": bytes(20),
            "serial": (n + 1).to_bytes(20, "big"),
            "cert_sha256": n.to_bytes(32, "little"),
            "profile": "server",
            "outcome": "issued",
            "code": None,
        }
    )


def build(repo: Repository, count: int, batch: int = 1000) -> float:
    """Append `count` records; returns appends per second."""
    started = time.perf_counter()
    env, dbs = repo._require_env(), repo._dbs
    for first in range(0, count, batch):
        with env.begin(write=True) as txn:
            w = Writer(txn, dbs, 0)
            for n in range(first, min(first + batch, count)):
                append(w, record(n))
    return count / (time.perf_counter() - started)


def proofs_ms(repo: Repository, samples: int) -> tuple[float, float]:
    """Median ms of an inclusion and of a consistency proof at the full size."""
    rng = random.Random(7)
    inclusion, consistency = [], []
    with repo.audit_tree() as (size, perfect):
        head = merkle.root(perfect, size)
        for _ in range(samples):
            m = rng.randrange(size)
            started = time.perf_counter()
            proof = merkle.inclusion_proof(perfect, m, size)
            inclusion.append(time.perf_counter() - started)
            merkle.verify_inclusion(m, size, merkle.leaf_hash(record(m)), proof, head)
            first = rng.randrange(1, size)
            started = time.perf_counter()
            merkle.consistency_proof(perfect, first, size)
            consistency.append(time.perf_counter() - started)
    return statistics.median(inclusion) * 1000, statistics.median(consistency) * 1000


def verify_file(base: Path, count: int) -> tuple[float, float]:
    """Seconds of verify_log over a file of `count` records, and of a bare root rebuild."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from audit_helpers import AuditKey  # a software audit key and its certificate

    key = AuditKey()
    path = base / "audit.log"
    with path.open("wb") as out:
        for n in range(count):
            out.write(frame(record(n)))
    started = time.perf_counter()
    rebuilt = merkle.Frontier()
    for item in iter_frames(path.read_bytes()):
        assert isinstance(item, bytes)
        rebuilt.append(merkle.leaf_hash(item))
    rebuild_s = time.perf_counter() - started
    head = key.head(count, rebuilt.root())
    assert head.message() == tree_head_message(count, head.timestamp, head.root)
    started = time.perf_counter()

    def chunks() -> Any:
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                yield chunk

    found = verify_log(chunks(), head, key.cert)
    assert found.records == count
    return time.perf_counter() - started, rebuild_s


@contextmanager
def no_audit() -> Iterator[None]:
    """Issuance as before the audit log: apply appends no record."""
    recorded = storage.apply.record_applied
    storage.apply.record_applied = lambda *args: None  # type: ignore[assignment]
    try:
        yield
    finally:
        storage.apply.record_applied = recorded


async def overhead(base: Path, rounds: int, seconds: float) -> tuple[float, float, float]:
    """Issuance per second with and without the audit log, interleaved; (with, without, ratio)."""
    bench = load_issuance_bench()
    settings = bench.make_token(base)
    bench.run_bench_ceremony(base, settings)
    csrs = bench.make_csrs(128)
    kind = "rsa-2048"
    for name in ("with", "without"):  # two repositories, one CA
        (base / name).mkdir()
        (base / name / "ca").symlink_to(base / "ca")
    with_audit, without = [], []
    with Hsm(settings) as hsm:
        audited = bench.IssuanceRun(base / "with", kind, hsm, csrs)
        bare = bench.IssuanceRun(base / "without", kind, hsm, csrs)
        try:
            await audited.rate(0.3, 16)
            with no_audit():
                await bare.rate(0.3, 16)
            for _ in range(rounds):
                count, took, _ = await audited.rate(seconds, 16)
                with_audit.append(count / took)
                with no_audit():
                    count, took, _ = await bare.rate(seconds, 16)
                without.append(count / took)
            appended = (audited.repository.audit_size(), bare.repository.audit_size())
            if appended != (audited.sent, 0):
                raise SystemExit(f"records appended {appended}, issued {audited.sent}")
        finally:
            audited.close()
            bare.close()
    a, b = statistics.median(with_audit), statistics.median(without)
    return a, b, a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    args = parser.parse_args()
    logging.getLogger("signer.server.ca").setLevel(logging.ERROR)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    size = MILLION
    with tempfile.TemporaryDirectory(prefix="bench-audit-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        with Repository(base / "repo") as repo:
            rate = build(repo, size)
            inclusion_ms, consistency_ms = proofs_ms(repo, 200 if args.quick else 2000)
        verify_s, rebuild_s = verify_file(base, size)
        rounds, seconds = (4, 1.5) if args.quick else (12, 3.0)
        with_rate, without_rate, ratio = asyncio.run(overhead(base, rounds, seconds))
    proof_ms = inclusion_ms + consistency_ms
    print(f"audit log bench, load {load}, {size:,} records")
    print(f"{'measure':<44}{'value':>14}")
    print(f"{'appends per s (1000 per transaction)':<44}{rate:>14,.0f}")
    print(f"{'inclusion proof at 1M, ms (median)':<44}{inclusion_ms:>14.3f}")
    print(f"{'consistency proof at 1M, ms (median)':<44}{consistency_ms:>14.3f}")
    print(f"{'peer: root rebuilt from 1M records, s':<44}{rebuild_s:>14.2f}")
    print(f"{'audit verify of 1M records, s':<44}{verify_s:>14.2f}")
    print(f"{'issuance with the audit log, certs/s':<44}{with_rate:>14.1f}")
    print(f"{'issuance without it, certs/s':<44}{without_rate:>14.1f}")
    print(
        f"RESULT append_per_s={rate:.0f} proof_ms_1m={proof_ms:.3f} verify_1m_s={verify_s:.2f} "
        f"overhead_ratio={ratio:.3f} rebuild_1m_s={rebuild_s:.2f} "
        f"proof_vs_rebuild={proof_ms / 1000 / rebuild_s:.5f}"
    )


if __name__ == "__main__":
    main()
