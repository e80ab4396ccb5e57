"""Backup and restore of the repository: what `signer backup`, `signer backup verify` and
`signer restore` cost (docs/performance.md "Backup and restore").

1. A repository of N issuances (certificates of 1,200 bytes, as CAcert's) with every tenth
   revoked, built directly (not timed).
2. The peer: LMDB's own compacting copy (`python -m lmdb copy --compact`), what
   docs/operations.md said before `signer backup` existed: no manifest, no verification.
3. `signer backup --out FILE` (its own process): the compacting copy, the manifest (content
   digest, counts, CRL numbers: one pass over the copy) and the archive, fsync'ed.
4. `signer backup verify FILE`: the archive's digest, the copy's facts recomputed, its
   consistency check.
5. `signer restore FILE` over an empty repository (standalone): verify, copy in place, the
   restore rule.

Run: python bench/backup.py [--quick]      (--quick: 100,000 certificates instead of 1,000,000)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/replication.py shadows the `replication` package in this folder, which Python puts first
# on sys.path for a script: take the folder off (nothing is added; the venv has the project).
sys.path.remove(str(Path(__file__).resolve().parent))

from storage import Repository
from storage.commands import IssueX509, RevokeX509

ROOT = Path(__file__).resolve().parent.parent
ISSUER = bytes(range(20))
BATCH = 10_000


def build(path: Path, count: int) -> None:
    """N issuances, every tenth revoked, in batches (one write transaction each)."""
    body = os.urandom(1200)
    index = 0
    with Repository(path, 64 << 30) as repository:
        for start in range(0, count, BATCH):
            batch = []
            for number in range(start, min(start + BATCH, count)):
                serial = 2**140 + number
                index += 1
                batch.append((index, _issue(number, serial, body)))
                if number % 10 == 9:
                    index += 1
                    batch.append((index, _revoke(number, serial)))
            repository.apply_batch(batch)
            print(f"  built {min(start + BATCH, count):,} of {count:,}", end="\r", flush=True)
    print()


def _issue(number: int, serial: int, body: bytes) -> IssueX509:
    return IssueX509(
        request_id=f"domaincerts:{number}:sign",
        request_digest=number.to_bytes(32, "big"),
        issuer=ISSUER,
        serial=serial,
        der=number.to_bytes(8, "big") + body,
        profile="server",
        not_before=1_700_000_000,
        not_after=1_800_000_000,
        issued_at=1_700_000_000 + number,
    )


def _revoke(number: int, serial: int) -> RevokeX509:
    return RevokeX509(
        request_id=f"domaincerts:{number}:revoke",
        request_digest=b"r" + number.to_bytes(31, "big"),
        issuer=ISSUER,
        serial=serial,
        reason=1,
        revoked_at=1_750_000_000 + number,
        invalidity_date=None,
        crl_entry=b"entry %d" % number,
    )


def timed(*command: str) -> float:
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 certificates (< 1 min)")
    args = parser.parse_args()
    count = 100_000 if args.quick else 1_000_000
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="bench-backup-") as tmp:
        work = Path(tmp)
        print(f"building a repository of {count:,} certificates ({count // 10:,} revoked)")
        build(work / "repo", count)
        size = (work / "repo" / "data.mdb").stat().st_size
        config = work / "signer.yaml"
        config.write_text("link: {device: /dev/null}\nrepository: {path: repo, map_size_gb: 64}\n")
        peer = timed(python, "-m", "lmdb", "copy", "--compact", "-e", str(work / "repo"),
                     str(work / "peer"))  # fmt: skip
        backup = timed(python, "-m", "signer", "backup", "--config", str(config), "--out",
                       str(work / "b.tar"))  # fmt: skip
        copy = (work / "b.tar").stat().st_size
        verify = timed(python, "-m", "signer", "backup", "verify", str(work / "b.tar"))
        config.write_text(
            "link: {device: /dev/null}\nrepository: {path: restored, map_size_gb: 64}\n"
        )
        restore = timed(python, "-m", "signer", "restore", "--config", str(config),
                        str(work / "b.tar"))  # fmt: skip
    mb = size / 2**20
    rows = [
        ("lmdb copy --compact (peer)", peer, "copy only"),
        ("signer backup", backup, f"{backup / peer:.1f}x the peer"),
        ("signer backup verify", verify, f"{verify / peer:.1f}x the peer"),
        ("signer restore", restore, f"{restore / peer:.1f}x the peer"),
    ]
    print(
        f"\nrepository {mb:,.0f} MiB, backup file {copy / 2**20:,.0f} MiB, {count:,} certificates"
    )
    print(f"{'operation':<30} {'seconds':>8} {'MiB/s':>8}  note")
    for name, seconds, note in rows:
        print(f"{name:<30} {seconds:8.2f} {mb / seconds:8.0f}  {note}")
    print(
        f"RESULT certificates={count} repository_mib={mb:.0f} peer_s={peer:.2f} "
        f"backup_s={backup:.2f} verify_s={verify:.2f} restore_s={restore:.2f} "
        f"backup_vs_peer={backup / peer:.2f}"
    )


if __name__ == "__main__":
    main()
