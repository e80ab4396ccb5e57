"""The HSM's raw signing rate for a key: the physical limit the benchmarks compare with."""

from __future__ import annotations

import hashlib
import time

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from signer.server.hsm import HsmEcPrivateKey, HsmRsaPrivateKey


def hsm_raw_rate(key: HsmRsaPrivateKey | HsmEcPrivateKey, seconds: float) -> tuple[int, float]:
    """(signatures, seconds): one digest signed again and again through the key object, one
    session, serialised like every PKCS#11 call of the process."""
    digest = hashlib.sha384(b"bench").digest()

    def sign_once() -> None:
        if isinstance(key, HsmRsaPrivateKey):
            key.sign(digest[:32], padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        else:
            key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA384())))

    sign_once()
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        sign_once()
        count += 1
    return count, elapsed
