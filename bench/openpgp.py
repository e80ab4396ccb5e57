"""OpenPGP certifications per second through the HSM, against the HSM's raw rate and gpg.

The measured path is the real one, in process: `OpenPgpService.sign_openpgp` (scan and check the
user's key, PGPy certification signed by a SoftHSM2 key of the ceremony's kind, the certified key
committed through `LocalLog` into LMDB with sync on), with several requests in flight as the
protocol handler runs them; and `PgpyCertifier.certify` alone (no repository). Side by side, in
the same run and for the same CA key type:

- the HSM's raw rate: one digest signed again and again through the HSM key object (the
  physical bound: every certification is one HSM signature);
- gpg with a software CA key, four processes per request (import, quick-sign-key, export,
  delete), as CAcert's old signer did.

Each user key has one user ID, so one certification is one HSM signature.
Run: python bench/openpgp.py [--quick] [--kind rsa-4096|rsa-2048|ec-p256|ec-p384]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

# The project root first: bench/replication.py must not shadow the replication package.
# bench/replication.py shadows the `replication` package in this folder, which Python puts first
# on sys.path for a script: take the folder off (nothing is added; the venv has the project).
sys.path.remove(str(Path(__file__).resolve().parent))

from replication.log import LocalLog
from signer.pki.openpgp import CertificationPolicy
from signer.server.dispatch import RequestContext
from signer.server.hsm import Hsm, HsmEcPrivateKey, HsmRsaPrivateKey, HsmSettings
from signer.server.openpgp import OpenPgpService, PgpyCertifier
from signer.tools.measure import hsm_raw_rate
from signer.tools.softhsm import find_softhsm_module, new_token
from signer.wire.protocol import SignOpenpgpArgs, request_digest
from storage.repository import Repository

ROOT = Path(__file__).resolve().parent.parent
LABEL = "bench-openpgp"
CA_UID = "Bench OpenPGP CA <ca@example.org>"
USER_UID = "Bench User <user@example.org>"
GPG_ALGO = {"rsa-2048": "rsa2048", "rsa-4096": "rsa4096", "ec-p256": "nistp256"}
GPG_ALGO["ec-p384"] = "nistp384"
Keys = list[tuple[bytes, str, str]]


@dataclass(frozen=True)
class Sizes:
    rounds: int
    seconds: float  # per measurement per round
    gpg_certs: int
    window: int


QUICK = Sizes(rounds=3, seconds=1.0, gpg_certs=4, window=8)
FULL = Sizes(rounds=10, seconds=1.5, gpg_certs=15, window=8)


def ceremony_kind() -> str:
    """The OpenPGP key kind of the project's ceremony config (what production will use)."""
    config = yaml.safe_load((ROOT / "config" / "ceremony.yaml").read_text())
    return config["openpgp"]["kind"]


def make_token(base: Path) -> HsmSettings:
    """A private SoftHSM2 store and token; SOFTHSM2_CONF is set before the library loads."""
    module = find_softhsm_module()
    if module is None:
        raise SystemExit("SoftHSM2 is not installed (apt install softhsm2)")
    conf, pin_file = new_token(base / "softhsm", "bench")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return HsmSettings(module=module, token_label="bench", pin_file=pin_file)


class Gpg:
    """gpg in a private home, batch mode, no passphrases."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(mode=0o700)

    def __call__(self, *args: str, stdin: bytes | None = None) -> bytes:
        command = ["gpg", "--homedir", str(self.home), "--batch", "--yes", "--no-tty"]
        command += ["--pinentry-mode", "loopback", "--passphrase", "", *args]
        done = subprocess.run(command, input=stdin, capture_output=True, timeout=120)
        if done.returncode != 0:
            raise SystemExit(f"gpg {args[0]} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout

    def fingerprint(self, who: str) -> str:
        listing = self("--with-colons", "--list-keys", who).decode()
        return next(line.split(":")[9] for line in listing.splitlines() if line.startswith("fpr"))

    def stop(self) -> None:
        subprocess.run(["gpgconf", "--homedir", str(self.home), "--kill", "gpg-agent"], check=False)


def user_keys(gpg: Gpg, count: int) -> list[tuple[bytes, str, str]]:
    """Distinct Ed25519 user keys with one user ID each, made by gpg: (key, fingerprint, uid)."""
    keys = []
    for i in range(count):
        uid = USER_UID.replace("user@", f"user{i}@")
        gpg("--quick-generate-key", uid, "ed25519", "sign,cert", "never")
        keys.append((gpg("--export", f"user{i}@"), gpg.fingerprint(f"user{i}@"), uid))
    return keys


def certify_rate(certifier: PgpyCertifier, keys: Keys, seconds: float) -> tuple[int, float]:
    count, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        key, _, uid = keys[count % len(keys)]
        certifier.certify(key, [uid], datetime.now(UTC))
        count += 1
    return count, elapsed


class ServiceRun:
    """The service with its own LMDB repository, fed sign_openpgp calls `window` at a time."""

    def __init__(self, base: Path, certifier: PgpyCertifier, hsm: Hsm, keys: Keys):
        self.repository = Repository(base / "repo")
        self.log = LocalLog(self.repository)
        self.service = OpenPgpService(certifier, hsm, LABEL, self.repository, self.log)
        self.keys = keys
        self.sent = 0
        self.last: bytes = b""

    def close(self) -> None:
        self.log.close()
        self.repository.close()

    async def certify(self) -> None:
        n = self.sent
        self.sent += 1
        key, _, uid = self.keys[n % len(self.keys)]
        raw = {"public_key": key, "uids": [uid]}
        ctx = RequestContext(f"gpg:{n}:sign", "sign_openpgp", request_digest("sign_openpgp", raw))
        result = await self.service.sign_openpgp(SignOpenpgpArgs.model_validate(raw), ctx)
        self.last = result.public_key

    async def rate(self, seconds: float, window: int) -> tuple[int, float]:
        done = 0
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                await self.certify()
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(window)))
        return done, time.perf_counter() - started


def gpg_rate(gpg: Gpg, keys: Keys, count: int, digest: str) -> tuple[int, float]:
    """The old signer's way: per request, import, certify, export, and forget the key."""
    started = time.perf_counter()
    for n in range(count):
        key, fingerprint, uid = keys[n % len(keys)]
        gpg("--import", stdin=key)
        gpg(
            "--default-cert-expire",
            "366d",
            "--cert-policy-url",
            "https://example.org/cps",
            "--cert-digest-algo",
            digest.upper(),
            "--quick-sign-key",
            fingerprint,
            uid,
        )
        gpg("--export", fingerprint)
        gpg("--delete-keys", fingerprint)
    return count, time.perf_counter() - started


@dataclass
class Totals:
    count: int = 0
    seconds: float = 0.0

    def add(self, count: int, seconds: float) -> None:
        self.count += count
        self.seconds += seconds

    @property
    def rate(self) -> float:
        return self.count / self.seconds


def check_output(base: Path, certifier: PgpyCertifier, certified: bytes) -> None:
    """A real check of what was measured: gpg finds a good certification by the CA key."""
    gpg = Gpg(base / "check")
    try:
        gpg("--import", stdin=certifier.export_ca_public_key())
        gpg("--import", stdin=certified)
        listing = gpg("--with-colons", "--check-sigs").decode()
    finally:
        gpg.stop()
    ca_keyid = certifier.ca_fingerprint().hex().upper()[-16:]
    good = [f for f in (line.split(":") for line in listing.splitlines()) if f[0] == "sig"]
    if not any(f[1] == "!" and f[4] == ca_keyid and f[10] == "10x" for f in good):
        raise SystemExit(f"gpg does not find a good certification by {ca_keyid}:\n{listing}")


async def measure(base: Path, sizes: Sizes, kind: str) -> dict[str, float]:
    settings = make_token(base)
    started = time.perf_counter()
    with Hsm(settings, read_write=True) as maker:
        maker.generate_key(LABEL, kind)
    print(f"setup: {kind} OpenPGP CA key in SoftHSM2 in {time.perf_counter() - started:.1f} s")
    users = Gpg(base / "users")
    old = Gpg(base / "old-signer")
    try:
        keys = user_keys(users, 16)
        old("--quick-generate-key", "Old CA <old@example.org>", GPG_ALGO[kind], "cert", "never")
        with Hsm(settings) as hsm:
            key = hsm.key(LABEL)
            assert isinstance(key, HsmRsaPrivateKey | HsmEcPrivateKey)
            certifier = PgpyCertifier(
                lambda: hsm.key(LABEL), datetime.now(UTC), CA_UID, CertificationPolicy()
            )
            run = ServiceRun(base, certifier, hsm, keys)
            try:
                await run.rate(0.3, sizes.window)  # warm up: the CA key, caches, LMDB growth
                raw, alone, service, gpg = Totals(), Totals(), Totals(), Totals()
                for _ in range(sizes.rounds):  # interleaved: a shared VM's drift hits all alike
                    raw.add(*hsm_raw_rate(key, sizes.seconds))
                    alone.add(*certify_rate(certifier, keys, sizes.seconds))
                    service.add(*await run.rate(sizes.seconds, sizes.window))
                    gpg.add(*gpg_rate(old, keys, sizes.gpg_certs, certifier.digest))
                recorded = run.repository.counts()["openpgp"]
                if recorded != run.sent:
                    raise SystemExit(f"{run.sent} certified but {recorded} recorded")
                check_output(base, certifier, run.last)
                digest = certifier.digest
            finally:
                run.close()
    finally:
        users.stop()
        old.stop()
    return {
        "hsm": raw.rate,
        "alone": alone.rate,
        "service": service.rate,
        "gpg": gpg.rate,
        "digest": digest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a run under a minute")
    parser.add_argument("--kind", default=None, help="CA key kind (default: the ceremony's)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if shutil.which("gpg") is None:
        raise SystemExit("gpg is not installed (apt install gnupg)")
    kind = args.kind or ceremony_kind()
    sizes = QUICK if args.quick else FULL
    with tempfile.TemporaryDirectory(prefix="bench-openpgp-") as tmp:
        r = asyncio.run(measure(Path(tmp), sizes, kind))
    print()
    print(f"OpenPGP certification, CA key {kind} in SoftHSM2, {r['digest']}, one user ID each")
    print(f"{'path':<58} {'per s':>9} {'vs HSM':>7}")
    rows = [
        ("HSM raw signing (the bound)", r["hsm"]),
        ("certify(): scan, PGPy checks, HSM signature, splice", r["alone"]),
        (f"sign_openpgp, {sizes.window} in flight, committed to LMDB", r["service"]),
        ("gpg, software key, 4 processes per request (old signer)", r["gpg"]),
    ]
    for name, rate in rows:
        print(f"{name:<58} {rate:>9.1f} {rate / r['hsm']:>7.3f}")
    print()
    print(
        f"RESULT certifications_per_s={r['service']:.1f} hsm_sign_per_s={r['hsm']:.1f} "
        f"efficiency={r['service'] / r['hsm']:.3f} certify_only_per_s={r['alone']:.1f} "
        f"gpg_per_s={r['gpg']:.1f} vs_gpg={r['service'] / r['gpg']:.1f} kind={kind}"
    )


if __name__ == "__main__":
    main()
