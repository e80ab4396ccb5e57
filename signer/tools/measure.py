"""Measuring helpers of the benchmarks (bench/): the HSM's raw signing rate, the physical limit
the issuance and OpenPGP benchmarks compare with, and memory peaks read from /proc.

Here rather than in bench/ because a benchmark script cannot import a sibling module cleanly:
bench/replication.py would shadow the `replication` package on the folder's sys.path entry,
which every benchmark therefore takes off before its imports.
"""

from __future__ import annotations

import hashlib
import resource
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signer.server.hsm import HsmEcPrivateKey, HsmRsaPrivateKey


def hsm_raw_rate(
    key: HsmRsaPrivateKey | HsmEcPrivateKey, seconds: float, threads: int = 1
) -> tuple[int, float]:
    """(signatures, seconds): one digest signed again and again through the key object by
    `threads` threads at once, as many as the Hsm has signing sessions."""
    digest = hashlib.sha384(b"bench").digest()

    def sign_once() -> None:
        if isinstance(key, HsmRsaPrivateKey):
            key.sign(digest[:32], padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        else:
            key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA384())))

    counts = [0] * threads
    begun = [0.0]
    start = threading.Barrier(threads, action=lambda: begun.__setitem__(0, time.perf_counter()))

    def signer(index: int) -> None:
        sign_once()  # this thread's session opened and its key handle found
        start.wait()
        while time.perf_counter() - begun[0] < seconds:
            sign_once()
            counts[index] += 1

    workers = [threading.Thread(target=signer, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts), time.perf_counter() - begun[0]


class AnonPeak:
    """The peak of this process's anonymous memory (RssAnon, sampled every 2 ms): what it
    allocated, without the repository's file pages it maps (page cache, shared and clean, which
    the kernel maps in around each page read: an LMDB whose pages are scattered by years of
    writes shows far more RSS than the data read)."""

    def __init__(self) -> None:
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def __enter__(self) -> AnonPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM). ru_maxrss would report the parent's peak when it was
    larger: Linux carries it across fork and exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
