"""The CA CAcert's old signer kept, in small: file keys and `openssl ca` state per issuer, made by
the real openssl (`openssl ca` issues, revokes, `-updatedb`, `-gencrl`), as the migration finds it.

    old/
      keys/root.key (encrypted PKCS#8), class3.key (plain), root.crt, class3.crt
      class1/ class3/   openssl.cnf index.txt index.txt.attr serial crlnumber newcerts/ crl.pem
"""

from __future__ import annotations

import datetime as dt
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

ROOT_PASSPHRASE = "an old root passphrase"


@dataclass
class LegacyCa:
    base: Path
    issued: dict[str, list[int]] = field(default_factory=dict)  # issuer -> serials
    revoked: dict[str, dict[int, str]] = field(default_factory=dict)  # serial -> how
    expired: dict[str, set[int]] = field(default_factory=dict)

    def directory(self, issuer: str) -> Path:
        return self.base / issuer

    @property
    def keys(self) -> Path:
        return self.base / "keys"

    def gencrl(self, issuer: str, out: Path) -> Path:
        """`openssl ca -gencrl` over the issuer's index.txt as it is now."""
        _ca(self.directory(issuer), "-gencrl", "-out", str(out))
        return out


def _ca(directory: Path, *args: str) -> str:
    done = subprocess.run(
        ["openssl", "ca", "-batch", "-config", str(directory / "openssl.cnf"),
         "-passin", f"pass:{ROOT_PASSPHRASE}", *args],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"openssl ca {' '.join(args)}: {done.stderr}")
    return done.stdout


def _ca_certificate(name: str, key, issuer_key, issuer_cert, path_length: int, days: int):
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Old CAcert"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=3000)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer_cert is None else issuer_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


CONFIG = """[ ca ]
default_ca = old
[ old ]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/newcerts
certificate = {cert}
private_key = {key}
serial = $dir/serial
crlnumber = $dir/crlnumber
default_md = sha256
default_days = 730
default_crl_days = 7
policy = anything
unique_subject = no
email_in_dn = yes
[ anything ]
commonName = supplied
emailAddress = optional
"""


def make_legacy_ca(base: Path, per_issuer: int = 14) -> LegacyCa:
    """Two issuers as CAcert has them: class1 (the root: RSA, key encrypted) and class3 (the
    subordinate: P-256, key plain). Each issues `per_issuer` certificates with sequential
    serials: some revoked (no reason, keyCompromise, keyTime, superseded, unspecified), some
    issued back-dated and expired (`-updatedb` marks them E), one revoked after it expired."""
    legacy = LegacyCa(base)
    legacy.keys.mkdir(parents=True)
    root_key = rsa.generate_private_key(65537, 2048)
    class3_key = ec.generate_private_key(ec.SECP256R1())
    root = _ca_certificate("Old Class 1 Root", root_key, root_key, None, 1, 7300)
    class3 = _ca_certificate("Old Class 3", class3_key, root_key, root, 0, 7000)
    (legacy.keys / "root.key").write_bytes(
        root_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(ROOT_PASSPHRASE.encode()),
        )
    )
    (legacy.keys / "class3.key").write_bytes(
        class3_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for name, cert in (("root", root), ("class3", class3)):
        (legacy.keys / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    request_key = legacy.keys / "member.key"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-out", str(request_key)], check=True,
                   capture_output=True)  # fmt: skip
    for issuer, key_name, first in (("class1", "root", 0x1000), ("class3", "class3", 0x2A00)):
        directory = legacy.directory(issuer)
        (directory / "newcerts").mkdir(parents=True)
        (directory / "index.txt").write_text("")
        (directory / "index.txt.attr").write_text("unique_subject = no\n")
        (directory / "serial").write_text(f"{first:04X}\n")
        (directory / "crlnumber").write_text("0100\n")
        (directory / "openssl.cnf").write_text(
            CONFIG.format(
                dir=directory,
                cert=legacy.keys / f"{key_name}.crt",
                key=legacy.keys / f"{key_name}.key",
            )
        )
        _issue_and_revoke(legacy, issuer, directory, request_key, first, per_issuer)
        _ca(directory, "-updatedb")
        legacy.gencrl(issuer, directory / "crl.pem")
        (directory / "crlnumber.old").unlink(missing_ok=True)
        for leftover in directory.glob("*.old"):
            leftover.unlink()
    return legacy


REVOCATIONS = [
    [],
    ["-crl_reason", "keyCompromise"],
    ["-crl_compromise", "20200102030405Z"],
    ["-crl_reason", "superseded"],
    ["-crl_reason", "unspecified"],
    ["-crl_reason", "cessationOfOperation"],
]


def _issue_and_revoke(legacy: LegacyCa, issuer: str, directory: Path, request_key: Path,
                      first: int, count: int) -> None:  # fmt: skip
    issued, revoked, expired = [], {}, set()
    for i in range(count):
        serial = first + i
        csr = directory / f"{i}.csr"
        subject = f"/CN=member {i}/emailAddress=member{i}@example.org"
        subprocess.run(["openssl", "req", "-new", "-key", str(request_key), "-subj", subject,
                        "-out", str(csr)], check=True, capture_output=True)  # fmt: skip
        dates: list[str] = []
        if i % 4 in (2, 3):  # back-dated: expired long ago (and then revoked, for odd i)
            dates = ["-startdate", "20150101000000Z", "-enddate", "20170101000000Z"]
            expired.add(serial)
        _ca(directory, "-in", str(csr), "-out", str(directory / f"{i}.crt"), "-notext", *dates)
        csr.unlink()
        (directory / f"{i}.crt").unlink()
        issued.append(serial)
        if i % 2 == 1 or i == count - 2:  # half of them, and one more that is valid
            how = REVOCATIONS[len(revoked) % len(REVOCATIONS)]
            _ca(directory, "-revoke", str(directory / "newcerts" / f"{serial:04X}.pem"), *how)
            revoked[serial] = " ".join(how) or "no reason"
    legacy.issued[issuer] = issued
    legacy.revoked[issuer] = revoked
    legacy.expired[issuer] = expired
