"""X.509 issuance, CSR to recorded certificate, against the HSM's raw rate and `openssl ca`.

The measured path is the real one, in process: `CertificateAuthority.sign_x509` (plan, serial,
TBS linted with the profile's pkilint lints, signature by a SoftHSM2 key made by the ceremony,
command committed through `LocalLog` into LMDB with sync on), driven with several requests in
flight as the protocol handler runs them. Side by side, in the same run and for the same CA key
type:

- the HSM's raw rate: one digest signed again and again through the HSM key object by as many
  threads as the signer has signing sessions (the physical limit of this token here: nothing can
  issue faster than it signs);
- the same issuance without the lint (the signature made directly, as before lint-before-sign),
  which gives the lint's cost per certificate;
- `openssl ca` with a file key, one process per CSR, index.txt and serial file (what CAcert's
  signer runs per request).

Run: python bench/issuance.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

# The project first: `python bench/x.py` puts bench/ first on the path, where bench/replication.py
# would shadow the replication package.
# bench/replication.py shadows the `replication` package in this folder, which Python puts first
# on sys.path for a script: take the folder off (nothing is added; the venv has the project).
sys.path.remove(str(Path(__file__).resolve().parent))

from replication.log import LocalLog
from signer.pki.lint import lint_findings
from signer.pki.profiles import load_profiles
from signer.pki.x509_signing import build_certificate
from signer.server.ca import CertificateAuthority, Issuer
from signer.server.dispatch import RequestContext
from signer.server.hsm import Hsm, HsmEcPrivateKey, HsmRsaPrivateKey, HsmSettings
from signer.tools.ceremony import run_ceremony
from signer.tools.measure import hsm_raw_rate
from signer.tools.softhsm import find_softhsm_module, new_token
from signer.wire.protocol import SignX509Args, request_digest
from storage.repository import Repository

ROOT = Path(__file__).resolve().parent.parent

PROFILE = "server"  # class3 in CAcert's set (config/profiles/cacert.yaml); each bench CA is it
KINDS = ("rsa-2048", "rsa-4096", "ec-p384")
DIGEST = {"rsa-2048": "sha256", "rsa-4096": "sha256", "ec-p384": "sha384"}  # RFC 5480 pairing
HEADLINE = "rsa-4096"


@dataclass(frozen=True)
class Sizes:
    """How much work each measurement does, per round and CA key type."""

    rounds: int
    raw_seconds: float
    issue_seconds: float
    openssl_certs: int
    window: int


# Short slices, many rounds: the shared VM's speed drifts by 2x within seconds.
QUICK = Sizes(rounds=8, raw_seconds=0.2, issue_seconds=0.6, openssl_certs=5, window=32)
FULL = Sizes(rounds=30, raw_seconds=0.3, issue_seconds=1.0, openssl_certs=10, window=32)


# --------------------------------------------------------------------------- setup


def make_token(base: Path) -> HsmSettings:
    """A private SoftHSM2 store and token; SOFTHSM2_CONF is set before the library loads."""
    module = find_softhsm_module()
    if module is None:
        raise SystemExit("SoftHSM2 is not installed (apt install softhsm2)")
    conf, pin_file = new_token(base / "softhsm", "bench")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return HsmSettings(module=module, token_label="bench", pin_file=pin_file)


def run_bench_ceremony(base: Path, settings: HsmSettings) -> None:
    """One self-signed CA per key type, keys generated in the token by the ceremony."""
    config = {
        "hsm": settings.model_dump(mode="json", exclude_none=True),
        "output_dir": str(base / "ca"),
        "keys": [{"label": kind, "kind": kind} for kind in KINDS],
        "certificates": [
            {
                "name": kind,
                "key": kind,
                "validity_days": 3650,
                "path_length": 0,
                "subject": [["O", "Bench CA"], ["CN", f"Bench {kind}"]],
            }
            for kind in KINDS
        ],
    }
    path = base / "ceremony.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    run_ceremony(path, progress=lambda *_: None)
    print(f"ceremony: {len(KINDS)} CA keys in SoftHSM2 in {time.perf_counter() - started:.1f} s")


def make_csrs(count: int) -> list[bytes]:
    """Distinct P-256 CSRs (DER) with a DNS SAN, made once; the CSR key type does not matter."""
    csrs = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        name = f"host{i}.example.org"
        builder = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        )
        csrs.append(builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    return csrs


# --------------------------------------------------------------------------- measurements


class IssuanceRun:
    """A CA on one HSM key with its own LMDB repository, fed sign_x509 calls N at a time."""

    def __init__(
        self, base: Path, kind: str, hsm: Hsm, csrs: list[bytes], lint: bool = True
    ) -> None:
        suffix = "" if lint else "-nolint"
        self.repository = Repository(base / f"repo-{kind}{suffix}")  # LMDB, sync, metasync on
        self.log = LocalLog(self.repository)
        issuer = Issuer.load("class3", base / "ca" / f"{kind}.crt", kind)
        self.ca = CertificateAuthority(
            [issuer],
            load_profiles("cacert"),
            hsm,
            self.repository,
            self.log,
        )
        if not lint:  # the signature made directly, without the lint (the old _build)
            self.ca._build = lambda plan, serial, issuer: build_certificate(  # type: ignore[method-assign]
                plan, serial, hsm.key(issuer.key_label), issuer.certificate
            )
        self.kind = kind
        self.csrs = csrs
        self.sent = 0

    def close(self) -> None:
        self.log.close()
        self.repository.close()

    async def sign(self) -> bytes:
        n = self.sent
        self.sent += 1
        name = f"host{n % len(self.csrs)}.example.org"
        raw = {
            "profile": PROFILE,
            "csr": self.csrs[n % len(self.csrs)],
            "sans": [["dns", name]],
            "digest": DIGEST[self.kind],
        }
        request_id = f"bench:{self.kind}:{n}"
        ctx = RequestContext(request_id, "sign_x509", request_digest("sign_x509", raw))
        result = await self.ca.sign_x509(SignX509Args.model_validate(raw), ctx)
        return result.certificate

    async def rate(self, seconds: float, window: int) -> tuple[int, float, list[bytes]]:
        """Certificates per second with `window` requests always in flight for `seconds`."""
        done: list[bytes] = []
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                done.append(await self.sign())

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(window)))
        return len(done), time.perf_counter() - started, done


def check_issued(base: Path, kind: str, ders: list[bytes]) -> None:
    """The output is real: signed by the CA's HSM key, and openssl agrees."""
    ca_cert = x509.load_pem_x509_certificate((base / "ca" / f"{kind}.crt").read_bytes())
    for der in (ders[0], ders[-1]):
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(ca_cert)
    leaf = base / f"leaf-{kind}.pem"
    leaf.write_bytes(
        x509.load_der_x509_certificate(ders[-1]).public_bytes(serialization.Encoding.PEM)
    )
    check = subprocess.run(
        ["openssl", "verify", "-CAfile", str(base / "ca" / f"{kind}.crt"), str(leaf)],
        capture_output=True,
        text=True,
    )
    if check.returncode != 0:
        raise SystemExit(f"openssl verify failed for {kind}: {check.stdout}{check.stderr}")


OPENSSL_CONF = """\
[ ca ]
default_ca = bench

[ bench ]
dir = {dir}
database = $dir/index.txt
serial = $dir/serial
new_certs_dir = $dir/newcerts
certificate = $dir/ca.crt
private_key = $dir/ca.key
default_md = {digest}
default_days = 730
policy = policy_any
unique_subject = no
copy_extensions = copy
email_in_dn = no
x509_extensions = server

[ policy_any ]
commonName = supplied

[ server ]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyAgreement
extendedKeyUsage = clientAuth, serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
crlDistributionPoints = URI:http://crl.cacert.org/class3-revoke.crl
authorityInfoAccess = OCSP;URI:http://ocsp.cacert.org
certificatePolicies = 1.3.6.1.4.1.18506.4.4
"""


class OpensslCa:
    """`openssl ca` with a file key of the given type: the old signer's per-request process."""

    def __init__(self, base: Path, kind: str, csrs: list[bytes]) -> None:
        self.dir = base / f"openssl-{kind}"
        (self.dir / "newcerts").mkdir(parents=True)
        (self.dir / "csr").mkdir()
        (self.dir / "out").mkdir()
        key = (
            rsa.generate_private_key(65537, int(kind[4:]))
            if kind.startswith("rsa-")
            else ec.generate_private_key(ec.SECP384R1())
        )
        digest = hashes.SHA384() if kind == "ec-p384" else hashes.SHA256()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Bench openssl {kind}")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder(
                issuer_name=name,
                subject_name=name,
                public_key=key.public_key(),
                serial_number=x509.random_serial_number(),
                not_valid_before=now,
                not_valid_after=now + dt.timedelta(days=3650),
            )
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, digest)
        )
        (self.dir / "ca.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (self.dir / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (self.dir / "index.txt").write_text("")
        (self.dir / "serial").write_text("1000\n")
        self.conf = self.dir / "openssl.cnf"
        self.conf.write_text(OPENSSL_CONF.format(dir=self.dir, digest=DIGEST[kind]))
        self.csrs = []
        for i, der in enumerate(csrs):
            pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
            path = self.dir / "csr" / f"{i}.csr"
            path.write_bytes(pem)
            self.csrs.append(path)
        self.sent = 0

    def issue(self) -> Path:
        n = self.sent
        self.sent += 1
        out = self.dir / "out" / f"{n}.crt"
        subprocess.run(
            [
                "openssl",
                "ca",
                "-config",
                str(self.conf),
                "-batch",
                "-notext",
                "-in",
                str(self.csrs[n % len(self.csrs)]),
                "-out",
                str(out),
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
        )
        return out

    def rate(self, count: int) -> tuple[int, float]:
        """(certificates, seconds) for `count` CSRs issued one by one."""
        started = time.perf_counter()
        for _ in range(count):
            last = self.issue()
        elapsed = time.perf_counter() - started
        x509.load_pem_x509_certificate(last.read_bytes())  # it really made a certificate
        return count, elapsed


# --------------------------------------------------------------------------- driver


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


@dataclass
class Row:
    kind: str
    raw: float
    issued: float
    unlinted: float
    lint_alone_ms: float
    openssl: float
    per_fsync: float
    round_efficiency: list[float]

    @property
    def lint_ms(self) -> float:
        """What the lint adds to a certificate's wall time, in flight as served."""
        return 1000 / self.issued - 1000 / self.unlinted

    @property
    def efficiency(self) -> float:
        return self.issued / self.raw

    @property
    def ratio(self) -> float:
        return self.issued / self.openssl


async def measure(base: Path, sizes: Sizes, settings: HsmSettings, csrs: list[bytes]) -> list[Row]:
    """Per key type: rounds of raw signing, issuance and openssl ca, interleaved so that the
    machine's drift (a shared VM) hits all three alike; rates are totals over the rounds."""
    rows = []
    with Hsm(settings) as hsm:
        for kind in KINDS:
            key = hsm.key(kind)
            assert isinstance(key, HsmRsaPrivateKey | HsmEcPrivateKey)
            run = IssuanceRun(base, kind, hsm, csrs)
            bare = IssuanceRun(base, kind, hsm, csrs, lint=False)
            openssl = OpensslCa(base, kind, csrs)
            try:
                await run.rate(0.3, sizes.window)  # warm up: caches, LMDB file growth
                await bare.rate(0.3, sizes.window)
                openssl.issue()  # warm up: page cache
                raw, issued, unlinted, ossl, efficiency = Totals(), Totals(), Totals(), Totals(), []
                groups, commands = run.log.groups, run.log.commands
                for _ in range(sizes.rounds):
                    sessions = hsm.signing_sessions
                    signs, raw_seconds = hsm_raw_rate(key, sizes.raw_seconds, sessions)
                    raw.add(signs, raw_seconds)
                    count, seconds, ders = await run.rate(sizes.issue_seconds, sizes.window)
                    issued.add(count, seconds)
                    efficiency.append((count / seconds) / (signs / raw_seconds))
                    check_issued(base, kind, ders)
                    count, seconds, _ = await bare.rate(sizes.issue_seconds, sizes.window)
                    unlinted.add(count, seconds)
                    ossl.add(*openssl.rate(sizes.openssl_certs))
                recorded = run.repository.counts()["certificates"]
                if recorded != run.sent:
                    raise SystemExit(f"{kind}: {run.sent} issued but {recorded} recorded")
                per_fsync = (run.log.commands - commands) / max(1, run.log.groups - groups)
                lint_alone = lint_alone_ms(ders[-1])
            finally:
                run.close()
                bare.close()
            rows.append(
                Row(kind, raw.rate, issued.rate, unlinted.rate, lint_alone, ossl.rate, per_fsync,
                    efficiency)
            )  # fmt: skip
    return rows


def lint_alone_ms(der: bytes, count: int = 100) -> float:
    """The lint by itself, on one thread: pkilint's RFC 5280 lints of an issued certificate."""
    started = time.perf_counter()
    for _ in range(count):
        lint_findings(der, "other")
    return (time.perf_counter() - started) / count * 1000


def print_table(rows: list[Row], sizes: Sizes, load: str) -> None:
    print(
        f"\nsign_x509 in process (CAcert's server profile, linted before the HSM signs), "
        f"{sizes.window} in flight, LMDB sync on; {sizes.rounds} interleaved rounds of HSM "
        f"signing, issuance, issuance without the lint and openssl ca per key type; load "
        f"average at start {load}\n"
    )
    head = (
        f"{'CA key':<9} {'HSM sign/s':>11} {'certs/s':>9} {'ms/cert':>8} {'x/HSM':>6} "
        f"{'rounds p25-p75':>15} {'no lint/s':>10} {'lint ms':>8} {'alone ms':>9} "
        f"{'openssl ca/s':>13} {'x/openssl':>10} {'certs/fsync':>12}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        q1, _, q3 = statistics.quantiles(r.round_efficiency, n=4)
        print(
            f"{r.kind:<9} {r.raw:>11.0f} {r.issued:>9.1f} {1000 / r.issued:>8.2f} "
            f"{r.efficiency:>6.2f} {f'{q1:.2f}-{q3:.2f}':>15} {r.unlinted:>10.1f} "
            f"{r.lint_ms:>8.2f} {r.lint_alone_ms:>9.2f} {r.openssl:>13.1f} "
            f"{r.ratio:>10.2f} {r.per_fsync:>12.1f}"
        )
    print(
        "lint ms: what the lint adds to a certificate's wall time as served (1000/certs/s - "
        "1000/no lint/s); alone ms: the lint by itself on one thread\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer, shorter rounds (under a minute)"
    )
    parser.add_argument("--window", type=int, help="requests in flight (default 32)")
    parser.add_argument(
        "--sessions", type=int, help="HSM signing sessions (default: the signer's default)"
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    # "issuer class1 is not configured"
    logging.getLogger("signer.server.ca").setLevel(logging.ERROR)
    if args.window:
        sizes = dataclasses.replace(sizes, window=args.window)
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    # /var/tmp: on disk on the usual setups (not tmpfs), so that LMDB's fsync is real.
    with tempfile.TemporaryDirectory(prefix="bench-issuance-", dir="/var/tmp") as tmp:
        base = Path(tmp)
        settings = make_token(base)
        if args.sessions:
            settings = settings.model_copy(update={"signing_sessions": args.sessions})
        run_bench_ceremony(base, settings)
        csrs = make_csrs(256)
        rows = asyncio.run(measure(base, sizes, settings, csrs))
    print_table(rows, sizes, load)
    r = next(row for row in rows if row.kind == HEADLINE)
    print(
        f"RESULT certs_per_s={r.issued:.1f} hsm_sign_per_s={r.raw:.1f} "
        f"hsm_efficiency={r.efficiency:.3f} openssl_ca_certs_per_s={r.openssl:.1f} "
        f"ratio={r.ratio:.2f} certs_per_s_without_lint={r.unlinted:.1f} lint_ms={r.lint_ms:.2f} "
        f"signing_sessions={settings.signing_sessions}"
    )


if __name__ == "__main__":
    main()
