"""The key ceremony: CA keys in the HSM, root and subordinate certificates, first CRLs.

Driven by one YAML file (in the style of Let's Encrypt's boulder ceremony tool) so that what was
done is reviewable before and auditable after. It only adds: keys are never overwritten, existing
certificates and CRLs are checked and left alone, so an interrupted ceremony is finished by running
it again. Everything it writes is public (certificates, CRLs, the OpenPGP key's creation time);
private keys are generated in the token as non-extractable, sign-only objects.

YAML (relative paths resolve against the YAML file's directory):

    hsm: {module, token_label, pin_env | pin_file, softhsm_conf?, retry_reinit?}
    output_dir: ca
    keys: [{label, kind: rsa-2048|rsa-3072|rsa-4096|ec-p256|ec-p384}]
    certificates:
      - name: root                      # files <name>.crt (PEM), <name>.der, <name>.crl
        key: <key label>
        subject: [[O, CAcert Inc.], [CN, CAcert Class 1 Root]]
        issuer: self                    # or the name of an earlier certificate
        validity_days: 7305
        path_length: 1                  # null: no limit
        digital_signature: false        # keyUsage digitalSignature besides keyCertSign+cRLSign
        crl_distribution_points: [...]  # default: the issuer's crl.url
        aia: {ocsp: [...], ca_issuers: [...]}
        crl: {next_update_days: 7, url: http://...}   # this CA's CRL, url = where it is published
    openpgp: {label, kind}              # key only; creation time recorded in openpgp-ca.yaml
"""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from signer.config import ConfigError, load
from signer.pki.audit import AUDIT_EKU_OID
from signer.server.hsm import Hsm, HsmEcPrivateKey, HsmRsaPrivateKey, HsmSettings, KeyKind

Progress = Callable[[str], None]
CaKey = HsmRsaPrivateKey | HsmEcPrivateKey

OPENPGP_META = "openpgp-ca.yaml"

SUBJECT_ATTRIBUTES: dict[str, x509.ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "CN": NameOID.COMMON_NAME,
    "DC": NameOID.DOMAIN_COMPONENT,
    "serialNumber": NameOID.SERIAL_NUMBER,
    "organizationIdentifier": NameOID.ORGANIZATION_IDENTIFIER,
    "emailAddress": NameOID.EMAIL_ADDRESS,
}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CeremonyError(Exception):
    """The config is wrong or the token and output directory disagree: nothing was overwritten."""


class CeremonyConfigError(CeremonyError, ConfigError):
    """The ceremony's YAML file is missing or wrong (a configuration error: exit 2)."""


# -- config -----------------------------------------------------------------------------------


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KeySpec(_Model):
    label: str = Field(min_length=1, max_length=64)
    kind: KeyKind
    import_from: Path | None = Field(
        default=None,
        description="an existing private key (PEM or DER; PKCS#8, PKCS#1 or SEC1; encrypted or "
        "not) written into the token instead of generating one",
    )
    passphrase_env: str | None = Field(default=None, min_length=1)
    passphrase_file: Path | None = None

    @model_validator(mode="after")
    def _passphrase(self) -> KeySpec:
        if (self.passphrase_env or self.passphrase_file) and self.import_from is None:
            raise ValueError(f"key {self.label}: a passphrase goes with import_from")
        if self.passphrase_env and self.passphrase_file:
            raise ValueError(
                f"key {self.label}: set at most one of passphrase_env, passphrase_file"
            )
        return self


class AiaSpec(_Model):
    ocsp: list[str] = []
    ca_issuers: list[str] = []


class CrlSpec(_Model):
    next_update_days: int = Field(default=7, ge=1, le=366)
    url: str | None = None


class CertificateSpec(_Model):
    name: str
    key: str
    existing: Path | None = Field(
        default=None,
        description="the CA's existing certificate (PEM or DER), taken instead of making one",
    )
    subject: list[tuple[str, str]] | None = Field(default=None, min_length=1)
    issuer: str = "self"
    validity_days: int | None = Field(default=None, ge=1, le=40 * 366)
    path_length: int | None = Field(default=None, ge=0)
    digital_signature: bool = False
    crl_distribution_points: list[str] | None = None
    aia: AiaSpec | None = None
    crl: CrlSpec = CrlSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME_RE.match(value) or value == "self":
            raise ValueError("name must be 1-64 of [A-Za-z0-9._-] (it names files) and not 'self'")
        return value

    @model_validator(mode="after")
    def _made_or_existing(self) -> CertificateSpec:
        if self.existing is None and (self.subject is None or self.validity_days is None):
            raise ValueError(
                f"certificate {self.name}: give subject and validity_days, or existing"
            )
        return self

    @field_validator("subject")
    @classmethod
    def _subject(cls, value: list[tuple[str, str]] | None) -> list[tuple[str, str]] | None:
        for attr, text in value or []:
            if attr not in SUBJECT_ATTRIBUTES:
                known = ", ".join(SUBJECT_ATTRIBUTES)
                raise ValueError(f"unknown subject attribute {attr!r}; use one of {known}")
            if not text:
                raise ValueError(f"empty value for subject attribute {attr}")
        return value

    def subject_name(self) -> x509.Name:
        subject = self.subject or []
        return x509.Name([x509.NameAttribute(SUBJECT_ATTRIBUTES[a], v) for a, v in subject])


class OpenPgpSpec(_Model):
    label: str = Field(min_length=1, max_length=64)
    kind: KeyKind


class AuditSpec(_Model):
    """The audit log's key (docs/audit.md): signs tree heads only. Its certificate, issued by
    `issuer` with the audit EKU and no other, is written as audit.crt / audit.der."""

    label: str = Field(min_length=1, max_length=64)
    kind: KeyKind = "ec-p256"
    issuer: str = Field(default="class3", min_length=1)
    validity_days: int = Field(default=1826, ge=1, le=7305)
    subject: list[tuple[str, str]] = [
        ("O", "CAcert Inc."),
        ("CN", "CAcert Signer Audit Log"),
    ]

    def subject_name(self) -> x509.Name:
        return x509.Name([x509.NameAttribute(SUBJECT_ATTRIBUTES[a], v) for a, v in self.subject])


class CeremonyConfig(_Model):
    hsm: HsmSettings
    output_dir: Path
    keys: list[KeySpec] = []
    certificates: list[CertificateSpec] = []
    openpgp: OpenPgpSpec | None = None
    audit: AuditSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> CeremonyConfig:
        labels = [k.label for k in self.keys]
        if self.openpgp is not None:
            labels.append(self.openpgp.label)
        if self.audit is not None:
            labels.append(self.audit.label)
        duplicates = {label for label in labels if labels.count(label) > 1}
        if duplicates:
            raise ValueError(f"key labels used twice: {sorted(duplicates)}")
        names = [c.name for c in self.certificates]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"certificate names used twice: {sorted(duplicates)}")
        x509_labels = {k.label for k in self.keys}
        for cert in self.certificates:
            if cert.existing is None and any(
                k.import_from for k in self.keys if k.label == cert.key
            ):
                raise ValueError(
                    f"certificate {cert.name}: its key is imported: give its existing certificate"
                )
            if cert.key not in x509_labels:
                raise ValueError(f"certificate {cert.name}: key {cert.key!r} is not under keys:")
            if cert.issuer != "self" and cert.issuer not in names:
                raise ValueError(f"certificate {cert.name}: unknown issuer {cert.issuer!r}")
        if self.audit is not None and self.audit.issuer not in names:
            raise ValueError(f"audit: unknown issuer {self.audit.issuer!r}")
        self.ordered_certificates()  # raises on cycles
        return self

    def ordered_certificates(self) -> list[CertificateSpec]:
        """Issuers before the certificates they sign."""
        by_name = {c.name: c for c in self.certificates}
        done: dict[str, CertificateSpec] = {}
        for cert in self.certificates:
            chain: list[str] = []
            current: CertificateSpec | None = cert
            while current is not None and current.name not in done:
                if current.name in chain:
                    raise ValueError(f"issuer cycle: {' -> '.join([*chain, current.name])}")
                chain.append(current.name)
                current = None if current.issuer == "self" else by_name[current.issuer]
            for name in reversed(chain):
                done[name] = by_name[name]
        return list(done.values())


def load_config(config_path: str | os.PathLike[str]) -> CeremonyConfig:
    """Parse and validate the YAML (signer.config's loader); relative paths become relative to
    the YAML's directory."""
    path = Path(config_path)
    try:
        config = load(path, CeremonyConfig)
    except ConfigError as exc:
        raise CeremonyConfigError(f"invalid ceremony config:\n{exc}") from None
    base = path.resolve().parent

    def here(value: Path | None) -> Path | None:
        return value if value is None or value.is_absolute() else base / value

    keys = [
        k.model_copy(
            update={"import_from": here(k.import_from), "passphrase_file": here(k.passphrase_file)}
        )
        for k in config.keys
    ]
    certificates = [
        c.model_copy(update={"existing": here(c.existing)}) for c in config.certificates
    ]
    return config.model_copy(
        update={
            "hsm": config.hsm.resolved(base),
            "output_dir": here(config.output_dir),
            "keys": keys,
            "certificates": certificates,
        }
    )


# -- result -----------------------------------------------------------------------------------

Status = Literal["created", "imported", "exists", "repaired"]


@dataclass
class CeremonyItem:
    """One thing the ceremony made or found: a key, certificate, CRL or OpenPGP key record."""

    kind: Literal["key", "certificate", "crl", "openpgp", "audit"]
    name: str
    status: Status
    path: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class CeremonyResult:
    output_dir: Path
    items: list[CeremonyItem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True when this run created or repaired anything (False: the re-run was a no-op)."""
        return any(item.status != "exists" for item in self.items)

    def item(self, kind: str, name: str) -> CeremonyItem:
        for item in self.items:
            if item.kind == kind and item.name == name:
                return item
        raise KeyError((kind, name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "output_dir": str(self.output_dir),
            "changed": self.changed,
            "items": [asdict(item) for item in self.items],
            "warnings": list(self.warnings),
        }


# -- helpers ----------------------------------------------------------------------------------


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def _hash_for(key: CaKey) -> hashes.SHA256 | hashes.SHA384:
    """SHA-384 for P-384 (gpg and CABF pair hash and curve), SHA-256 for RSA and P-256."""
    return hashes.SHA384() if key.kind == "ec-p384" else hashes.SHA256()


def _ca_key(hsm: Hsm, label: str) -> CaKey:
    """The token's key as the signing key it is (RSA or EC, the kinds the ceremony makes)."""
    key = hsm.key(label)
    if not isinstance(key, HsmRsaPrivateKey | HsmEcPrivateKey):
        raise CeremonyError(f"key {label!r} in the token is {key.kind}: not a CA key kind")
    return key


def _public_key_of(cert: x509.Certificate) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """A CA certificate's public key, of the kinds the ceremony makes."""
    public = cert.public_key()
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise CeremonyError(f"certificate {cert.subject.rfc4514_string()}: not an RSA or EC key")
    return public


def _serial() -> int:
    """127 bits from the CSPRNG: ≥ 64 bits of entropy (CABF), positive, at most 16 DER bytes."""
    while True:
        value = secrets.randbits(127)
        if value:
            return value


def _write_new(path: Path, data: bytes) -> None:
    """Write a file that must not exist yet, atomically (temp file + link, which never
    replaces an existing file)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise CeremonyError(f"{path} appeared meanwhile: refusing to overwrite it") from None
    finally:
        os.unlink(tmp)


def _load_private_key(spec: KeySpec) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    """The key file of an import, decrypted with its passphrase (never shown in a message)."""
    assert spec.import_from is not None
    try:
        data = spec.import_from.read_bytes()
    except OSError as exc:
        raise CeremonyError(f"{spec.import_from}: cannot read: {exc.strerror}") from None
    passphrase = _passphrase(spec)
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, passphrase)
        else:
            key = serialization.load_der_private_key(data, passphrase)
    except TypeError:
        hint = "drop its passphrase" if passphrase else "give passphrase_env or passphrase_file"
        raise CeremonyError(
            f"{spec.import_from}: encrypted or not as not expected: {hint}"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise CeremonyError(
            f"{spec.import_from}: cannot read the private key (a wrong passphrase, or not a key)"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise CeremonyError(f"{spec.import_from}: not an RSA or EC private key")
    return key


def _passphrase(spec: KeySpec) -> bytes | None:
    if spec.passphrase_env is not None:
        value = os.environ.get(spec.passphrase_env)
        if value is None:
            raise CeremonyError(f"environment variable {spec.passphrase_env} is not set")
        return value.encode()
    if spec.passphrase_file is not None:
        try:
            return spec.passphrase_file.read_bytes().rstrip(b"\r\n")
        except OSError as exc:
            raise CeremonyError(f"{spec.passphrase_file}: cannot read: {exc.strerror}") from None
    return None


def _kind_of(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, key.curve.name)


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        data = path.read_bytes()
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except (OSError, ValueError) as exc:
        raise CeremonyError(f"{path}: not a certificate ({exc})") from None


def _certificate_der(path: Path) -> bytes:
    return _load_certificate(path).public_bytes(Encoding.DER)


def _der_integer(value: int) -> bytes:
    content = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return bytes((0x02, len(content))) + content


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value


class _Ceremony:
    def __init__(self, config: CeremonyConfig, hsm: Hsm, progress: Progress, now: dt.datetime):
        self.config = config
        self.hsm = hsm
        self.progress = progress
        self.now = now
        self.out = config.output_dir
        self.result = CeremonyResult(output_dir=self.out)
        self.certs: dict[str, x509.Certificate] = {}
        self.imported: dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = {}
        self.existing: dict[str, x509.Certificate] = {}

    def warn(self, text: str) -> None:
        self.result.warnings.append(text)
        self.progress(f"WARNING: {text}")

    # keys

    def ensure_key(self, label: str, kind: str) -> Status:
        if self.hsm.has_key(label):
            key = self.hsm.key(label)
            if key.kind != kind:
                raise CeremonyError(
                    f"key {label!r} in the token is {key.kind}, the config says {kind}"
                )
            info = self.hsm.key_info(label)
            if info["extractable"] or not info["sensitive"]:
                self.warn(f"key {label!r} in the token is extractable or not sensitive")
            self.progress(f"key {label} ({kind}): exists in the token")
            self.result.items.append(CeremonyItem("key", label, "exists", detail={"kind": kind}))
            return "exists"
        token = self.hsm.settings.token_label
        self.progress(f"key {label} ({kind}): generating in token {token!r}")
        started = time.monotonic()
        self.hsm.generate_key(label, kind)
        seconds = round(time.monotonic() - started, 1)
        self.progress(f"key {label} ({kind}): created, non-extractable ({seconds} s)")
        self.result.items.append(
            CeremonyItem("key", label, "created", detail={"kind": kind, "seconds": seconds})
        )
        return "created"

    # certificates

    def build_certificate(
        self,
        spec: CertificateSpec,
        key: CaKey,
        issuer_cert: x509.Certificate | None,
        issuer_key: CaKey,
        issuer_spec: CertificateSpec | None,
    ) -> x509.Certificate:
        subject = spec.subject_name()
        public = key.public_key()
        not_before = self.now
        assert spec.validity_days is not None  # checked by the config: made, not existing
        not_after = not_before + dt.timedelta(days=spec.validity_days)
        if issuer_cert is not None and not_after > issuer_cert.not_valid_after_utc:
            raise CeremonyError(
                f"certificate {spec.name}: validity would end {not_after:%Y-%m-%d}, after its "
                f"issuer's ({issuer_cert.not_valid_after_utc:%Y-%m-%d}): shorten validity_days"
            )
        ski = x509.SubjectKeyIdentifier.from_public_key(public)
        issuer_ski = ski if issuer_cert is None else _ski(issuer_cert)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if issuer_cert is None else issuer_cert.subject)
            .public_key(public)
            .serial_number(_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=spec.path_length), critical=True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=spec.digital_signature,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                critical=False,
            )
        )
        crl_dps = spec.crl_distribution_points
        if crl_dps is None and issuer_spec is not None and issuer_spec.crl.url:
            crl_dps = [issuer_spec.crl.url]
        if crl_dps:
            builder = builder.add_extension(
                x509.CRLDistributionPoints(
                    [
                        x509.DistributionPoint(
                            full_name=[x509.UniformResourceIdentifier(url)],
                            relative_name=None,
                            reasons=None,
                            crl_issuer=None,
                        )
                        for url in crl_dps
                    ]
                ),
                critical=False,
            )
        if spec.aia is not None and (spec.aia.ocsp or spec.aia.ca_issuers):
            descriptions = [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(url)
                )
                for url in spec.aia.ocsp
            ] + [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.CA_ISSUERS, x509.UniformResourceIdentifier(url)
                )
                for url in spec.aia.ca_issuers
            ]
            builder = builder.add_extension(
                x509.AuthorityInformationAccess(descriptions), critical=False
            )
        cert = builder.sign(issuer_key, _hash_for(issuer_key))
        # Catch a token whose public key object does not belong to its private key before any
        # file is written.
        try:
            cert.verify_directly_issued_by(cert if issuer_cert is None else issuer_cert)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise CeremonyError(
                f"certificate {spec.name}: the HSM signature does not verify ({exc!r})"
            ) from None
        return cert

    # imported keys and existing certificates (taking over from an earlier CA)

    def ensure_imported_key(self, spec: KeySpec) -> Status:
        """Write the key file's key into the token, or find it there already (the same key)."""
        private_key = self.imported[spec.label]
        if self.hsm.has_key(spec.label):
            info = self.hsm.key_info(spec.label)  # preflight checked it is the file's key
            if info["extractable"] or not info["sensitive"]:
                self.warn(f"key {spec.label!r} in the token is extractable or not sensitive")
            self.progress(f"key {spec.label} ({spec.kind}): imported before, in the token")
            self.result.items.append(
                CeremonyItem("key", spec.label, "exists", detail={"kind": spec.kind})
            )
            return "exists"
        key_id = x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()).digest
        self.hsm.import_key(spec.label, private_key, key_id)
        self.progress(
            f"key {spec.label} ({spec.kind}): imported from {spec.import_from}, "
            f"non-extractable, id {key_id.hex()}"
        )
        self.result.items.append(
            CeremonyItem(
                "key", spec.label, "imported", detail={"kind": spec.kind, "id": key_id.hex()}
            )
        )
        return "imported"

    def ensure_existing_certificate(self, spec: CertificateSpec) -> None:
        """Take the CA's existing certificate: it must belong to its key in the token and to its
        issuer; it is copied to the output directory and kept in the token. No CRL is made: the
        earlier CA's CRL numbers go on with the signer (signer import)."""
        cert = self.existing[spec.name]
        key = _ca_key(self.hsm, spec.key)
        if cert.public_key() != key.public_key():
            raise CeremonyError(f"{spec.existing}: not the certificate of key {spec.key!r}")
        issuer_cert = cert if spec.issuer == "self" else self.certs[spec.issuer]
        try:
            cert.verify_directly_issued_by(issuer_cert)
        except (InvalidSignature, ValueError, TypeError):
            raise CeremonyError(f"{spec.existing}: not issued by {spec.issuer}") from None
        if spec.subject is not None and cert.subject != spec.subject_name():
            raise CeremonyError(
                f"{spec.existing}: subject {cert.subject.rfc4514_string()} differs from the "
                f"config's {spec.subject_name().rfc4514_string()}"
            )
        der = cert.public_bytes(Encoding.DER)
        written = False
        for path, data in (
            (self.out / f"{spec.name}.crt", cert.public_bytes(Encoding.PEM)),
            (self.out / f"{spec.name}.der", der),
        ):
            if path.exists():
                if _certificate_der(path) != der:
                    raise CeremonyError(f"{path} holds another certificate: refusing to overwrite")
            else:
                _write_new(path, data)
                written = True
        key_id = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
        fields = {
            "subject": cert.subject.public_bytes(),
            "issuer": cert.issuer.public_bytes(),
            "serial": _der_integer(cert.serial_number),
        }
        stored = self.hsm.store_certificate(spec.key, key_id, der, fields)
        status: Status = "created" if written or stored else "exists"
        self.progress(
            f"certificate {spec.name}: {status} (existing {cert.subject.rfc4514_string()})"
        )
        self.certs[spec.name] = cert
        self.result.items.append(
            CeremonyItem(
                "certificate",
                spec.name,
                status,
                str(self.out / f"{spec.name}.crt"),
                {
                    "subject": cert.subject.rfc4514_string(),
                    "issuer": cert.issuer.rfc4514_string(),
                    "serial": f"{cert.serial_number:X}",
                    "not_after": cert.not_valid_after_utc.isoformat(),
                    "sha256_fingerprint": _fingerprint(cert),
                    "key": spec.key,
                    "existing": str(spec.existing),
                },
            )
        )

    def load_imports(self) -> None:
        """Read every key file and existing certificate, and check that each key matches its
        certificate and any key already in the token, before the token is changed."""
        for spec in self.config.keys:
            if spec.import_from is None:
                continue
            private_key = _load_private_key(spec)
            kind = _kind_of(private_key)
            if kind != spec.kind:
                raise CeremonyError(
                    f"{spec.import_from} holds a {kind} key, the config says {spec.kind}"
                )
            if (
                self.hsm.has_key(spec.label)
                and self.hsm.key(spec.label).public_key() != private_key.public_key()
            ):
                raise CeremonyError(
                    f"token {self.hsm.settings.token_label!r} holds another key labelled "
                    f"{spec.label!r}: refusing to overwrite it"
                )
            self.imported[spec.label] = private_key
        imported_keys = {label: key.public_key() for label, key in self.imported.items()}
        for cert_spec in self.config.certificates:
            if cert_spec.existing is None:
                continue
            cert = _load_certificate(cert_spec.existing)
            if cert_spec.key in imported_keys:
                if cert.public_key() != imported_keys[cert_spec.key]:
                    raise CeremonyError(
                        f"{cert_spec.existing} does not belong to key {cert_spec.key!r} (its file)"
                    )
            elif not self.hsm.has_key(cert_spec.key):
                raise CeremonyError(
                    f"certificate {cert_spec.name} exists but key {cert_spec.key!r} is neither in "
                    "the token nor imported (import_from): a new key could not match it"
                )
            self.existing[cert_spec.name] = cert

    def ensure_certificate(self, spec: CertificateSpec) -> None:
        if spec.existing is not None:
            self.ensure_existing_certificate(spec)
            return
        crt = self.out / f"{spec.name}.crt"
        der = self.out / f"{spec.name}.der"
        key = _ca_key(self.hsm, spec.key)
        issuer_spec = None
        if spec.issuer == "self":
            issuer_cert, issuer_key = None, key
        else:
            issuer_spec = next(c for c in self.config.certificates if c.name == spec.issuer)
            issuer_cert = self.certs[spec.issuer]
            issuer_key = _ca_key(self.hsm, issuer_spec.key)
        if crt.exists():
            cert = self.check_existing(spec, crt, key, issuer_cert)
            if der.exists():
                if der.read_bytes() != cert.public_bytes(Encoding.DER):
                    raise CeremonyError(f"{der} is not the DER form of {crt}")
                status: Status = "exists"
            else:
                _write_new(der, cert.public_bytes(Encoding.DER))
                status = "repaired"
            self.progress(f"certificate {spec.name}: {status} ({crt.name})")
        else:
            if der.exists():
                raise CeremonyError(f"{der} exists without {crt.name}: refusing to overwrite it")
            cert = self.build_certificate(spec, key, issuer_cert, issuer_key, issuer_spec)
            _write_new(crt, cert.public_bytes(Encoding.PEM))
            _write_new(der, cert.public_bytes(Encoding.DER))
            status = "created"
            self.progress(
                f"certificate {spec.name}: created {crt.name} and {der.name}, "
                f"subject {cert.subject.rfc4514_string()}, serial {cert.serial_number:x}"
            )
        self.certs[spec.name] = cert
        self.result.items.append(
            CeremonyItem(
                "certificate",
                spec.name,
                status,
                str(crt),
                {
                    "subject": cert.subject.rfc4514_string(),
                    "issuer": cert.issuer.rfc4514_string(),
                    "serial": f"{cert.serial_number:X}",
                    "not_after": cert.not_valid_after_utc.isoformat(),
                    "sha256_fingerprint": _fingerprint(cert),
                    "key": spec.key,
                },
            )
        )
        self.ensure_crl(spec, cert, key)

    def check_existing(
        self,
        spec: CertificateSpec,
        crt: Path,
        key: CaKey,
        issuer_cert: x509.Certificate | None,
    ) -> x509.Certificate:
        try:
            cert = x509.load_pem_x509_certificate(crt.read_bytes())
        except ValueError as exc:
            raise CeremonyError(f"{crt}: not a PEM certificate ({exc})") from None
        if cert.public_key() != key.public_key():
            raise CeremonyError(
                f"{crt}: its public key does not match key {spec.key!r} in the token"
            )
        if cert.subject != spec.subject_name():
            raise CeremonyError(
                f"{crt}: subject {cert.subject.rfc4514_string()} differs from the config's "
                f"{spec.subject_name().rfc4514_string()}"
            )
        try:
            cert.verify_directly_issued_by(cert if issuer_cert is None else issuer_cert)
        except (InvalidSignature, ValueError, TypeError):
            raise CeremonyError(
                f"{crt}: not issued by {spec.issuer if issuer_cert is not None else 'itself'}"
            ) from None
        return cert

    def ensure_crl(self, spec: CertificateSpec, cert: x509.Certificate, key: CaKey) -> None:
        path = self.out / f"{spec.name}.crl"
        if path.exists():
            try:
                crl = x509.load_der_x509_crl(path.read_bytes())
            except ValueError as exc:
                raise CeremonyError(f"{path}: not a DER CRL ({exc})") from None
            if crl.issuer != cert.subject or not crl.is_signature_valid(_public_key_of(cert)):
                raise CeremonyError(f"{path}: not a CRL of {spec.name}")
            self.progress(f"crl {spec.name}: exists ({path.name})")
            status: Status = "exists"
        else:
            crl = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(cert.subject)
                .last_update(self.now)
                .next_update(self.now + dt.timedelta(days=spec.crl.next_update_days))
                .add_extension(x509.CRLNumber(1), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(cert)),
                    critical=False,
                )
                .sign(key, _hash_for(key))
            )
            if not crl.is_signature_valid(_public_key_of(cert)):
                raise CeremonyError(f"crl {spec.name}: the HSM signature does not verify")
            _write_new(path, crl.public_bytes(Encoding.DER))
            self.progress(
                f"crl {spec.name}: created {path.name} (number 1, next update "
                f"{crl.next_update_utc:%Y-%m-%d %H:%M:%S}Z)"
            )
            status = "created"
        self.result.items.append(
            CeremonyItem(
                "crl",
                spec.name,
                status,
                str(path),
                {"next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None},
            )
        )

    # OpenPGP

    def ensure_openpgp(self, spec: OpenPgpSpec, key_status: Status) -> None:
        path = self.out / OPENPGP_META
        if path.exists():
            try:
                meta = yaml.safe_load(path.read_text(encoding="utf-8"))
                recorded = meta["created"]
                created = (
                    recorded
                    if isinstance(recorded, dt.datetime)
                    else dt.datetime.fromisoformat(recorded)
                )
            except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
                raise CeremonyError(f"{path}: unreadable ({exc!r})") from None
            if meta.get("label") != spec.label or meta.get("kind") != spec.kind:
                raise CeremonyError(
                    f"{path} records key {meta.get('label')!r} ({meta.get('kind')}), "
                    f"the config says {spec.label!r} ({spec.kind})"
                )
            self.progress(f"openpgp {spec.label}: exists (created {recorded})")
            status: Status = "exists"
        else:
            created = _utcnow()
            if key_status == "exists":
                self.warn(
                    f"key {spec.label!r} existed without {OPENPGP_META}: recording "
                    f"{created:%Y-%m-%dT%H:%M:%SZ} as its OpenPGP creation time"
                )
            text = (
                "# OpenPGP CA key made by the key ceremony. The creation time is part of the\n"
                "# OpenPGP fingerprint: never change it.\n"
                + yaml.safe_dump(
                    {
                        "label": spec.label,
                        "kind": spec.kind,
                        "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    },
                    sort_keys=False,
                )
            )
            _write_new(path, text.encode("utf-8"))
            self.progress(f"openpgp {spec.label}: recorded creation time in {path.name}")
            status = "created" if key_status == "created" else "repaired"
        self.result.items.append(
            CeremonyItem(
                "openpgp",
                spec.label,
                status,
                str(path),
                {"kind": spec.kind, "created": created.strftime("%Y-%m-%dT%H:%M:%SZ")},
            )
        )

    def ensure_audit(self, spec: AuditSpec) -> None:
        """The audit key's certificate: issued by `spec.issuer`, end entity, audit EKU only."""
        crt, der = self.out / "audit.crt", self.out / "audit.der"
        key = _ca_key(self.hsm, spec.label)
        if crt.exists():
            cert = _load_certificate(crt)
            if cert.public_key() != key.public_key():
                raise CeremonyError(f"{crt}: its key is not {spec.label!r} in the token")
            status: Status = "exists"
        else:
            cert = self.build_audit_certificate(spec, key)
            _write_new(crt, cert.public_bytes(Encoding.PEM))
            _write_new(der, cert.public_bytes(Encoding.DER))
            status = "created"
        self.progress(f"audit {spec.label}: {status} ({crt.name})")
        self.result.items.append(
            CeremonyItem(
                "audit",
                spec.label,
                status,
                str(crt),
                {
                    "issuer": cert.issuer.rfc4514_string(),
                    "serial": f"{cert.serial_number:X}",
                    "sha256_fingerprint": _fingerprint(cert),
                    "eku": AUDIT_EKU_OID.dotted_string,
                },
            )
        )

    def build_audit_certificate(self, spec: AuditSpec, key: CaKey) -> x509.Certificate:
        issuer_spec = next(c for c in self.config.certificates if c.name == spec.issuer)
        issuer_cert, issuer_key = self.certs[spec.issuer], _ca_key(self.hsm, issuer_spec.key)
        not_after = min(
            self.now + dt.timedelta(days=spec.validity_days), issuer_cert.not_valid_after_utc
        )
        public = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(spec.subject_name())
            .issuer_name(issuer_cert.subject)
            .public_key(public)
            .serial_number(_serial())
            .not_valid_before(self.now)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=True,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([AUDIT_EKU_OID]), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(issuer_cert)),
                critical=False,
            )
        )
        cert = builder.sign(issuer_key, _hash_for(issuer_key))
        try:
            cert.verify_directly_issued_by(issuer_cert)
        except (InvalidSignature, ValueError, TypeError) as exc:
            message = f"audit certificate: the HSM signature does not verify ({exc!r})"
            raise CeremonyError(message) from None
        return cert

    def preflight(self) -> None:
        """Check the keys already in the token before generating any: a wrong token or a
        changed config stops the ceremony before it adds anything."""
        specs = [(k.label, k.kind) for k in self.config.keys if k.import_from is None]
        if self.config.openpgp is not None:
            specs.append((self.config.openpgp.label, self.config.openpgp.kind))
        if self.config.audit is not None:
            specs.append((self.config.audit.label, self.config.audit.kind))
        for label, kind in specs:
            if self.hsm.has_key(label):
                found = self.hsm.key(label).kind
                if found != kind:
                    raise CeremonyError(
                        f"key {label!r} in the token is {found}, the config says {kind}"
                    )
        pgp = self.config.openpgp
        recorded = self.out / OPENPGP_META
        if pgp is not None and recorded.exists() and not self.hsm.has_key(pgp.label):
            raise CeremonyError(
                f"{recorded} records key {pgp.label!r} but the token has no such key "
                "(wrong token?): move the file away to make a new OpenPGP key"
            )

    def run(self) -> CeremonyResult:
        self.out.mkdir(parents=True, exist_ok=True)
        pgp = self.config.openpgp
        self.progress(
            f"ceremony: token {self.hsm.settings.token_label!r}, output {self.out}, "
            f"{len(self.config.keys)} X.509 key(s), {len(self.config.certificates)} "
            f"certificate(s), OpenPGP key: {pgp.label if pgp else 'none'}"
        )
        self.preflight()
        self.load_imports()
        for key_spec in self.config.keys:
            if key_spec.import_from is not None:
                self.ensure_imported_key(key_spec)
            else:
                self.ensure_key(key_spec.label, key_spec.kind)
        self.imported.clear()  # the key material is in the token now; drop the copies
        if self.config.openpgp is not None:
            spec = self.config.openpgp
            status = self.ensure_key(spec.label, spec.kind)
            self.ensure_openpgp(spec, status)
        for cert_spec in self.config.ordered_certificates():
            self.ensure_certificate(cert_spec)
        if self.config.audit is not None:
            self.ensure_key(self.config.audit.label, self.config.audit.kind)
            self.ensure_audit(self.config.audit)
        created = sum(1 for item in self.result.items if item.status != "exists")
        self.progress(
            f"ceremony: done, {created} item(s) created, imported or repaired, "
            f"{len(self.result.items) - created} already existed"
        )
        return self.result


def run_ceremony(
    config_path: str | os.PathLike[str],
    progress: Progress = print,
    *,
    now: dt.datetime | None = None,
) -> CeremonyResult:
    """Run (or finish) the ceremony described by the YAML file; safe to re-run.

    Raises CeremonyError for config or consistency problems, SignerError for HSM failures.
    """
    config = load_config(config_path)
    moment = (now or _utcnow()).astimezone(dt.UTC).replace(microsecond=0)
    with Hsm(config.hsm, read_write=True) as hsm:
        return _Ceremony(config, hsm, progress, moment).run()
