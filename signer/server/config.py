"""The signer host's configuration (`signer serve`): link, HSM, repository, issuers, CRLs,
OpenPGP and replication; loaded with signer.config's strict loader."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from replication.settings import ReplicationSettings
from signer.config import LinkConfig, Section, resolve
from signer.pki.profiles import PROFILE_SETS
from signer.server.hsm import HsmSettings


class RepositoryConfig(Section):
    path: Path
    map_size_gb: int = Field(default=64, ge=1, le=4096)

    _resolve = field_validator("path")(resolve)


class IssuerConfig(Section):
    certificate: Path = Field(description="the CA certificate (PEM) written by the ceremony")
    key: str = Field(min_length=1, description="label of the CA's private key in the HSM")

    _resolve = field_validator("certificate")(resolve)


OPENPGP_CURVES = ["nistp256", "nistp384", "nistp521", "ed25519"]
OPENPGP_KNOWN_CURVES = {*OPENPGP_CURVES, "brainpoolP256r1", "brainpoolP384r1", "brainpoolP512r1"}


class OpenPgpConfig(Section):
    """`sign_openpgp`: the OpenPGP CA key in the HSM and what it certifies (see
    signer/server/openpgp.py). The key's creation time is part of its fingerprint: take it from
    the ceremony's `openpgp-ca.yaml` (`ca_file`), or give `key` and `created` explicitly."""

    ca_file: Path | None = Field(default=None, description="openpgp-ca.yaml from the ceremony")
    key: str | None = Field(default=None, min_length=1, description="HSM key label")
    created: datetime | None = Field(default=None, description="the key's OpenPGP creation time")
    uid: str = Field(default="CA Cert Signing Authority (Root CA) <gpg@cacert.org>", min_length=1)
    expiry_days: int = Field(default=366, ge=1, le=3660)
    policy_url: str = Field(
        default="https://www.cacert.org/policy/CertificationPracticeStatement.html", min_length=1
    )
    digest: Literal["sha256", "sha384", "sha512"] = "sha256"
    min_rsa_bits: int = Field(default=2048, ge=1024, le=16384)
    curves: list[str] = Field(default_factory=lambda: list(OPENPGP_CURVES))
    max_key_bytes: int = Field(default=1024 * 1024, ge=1024, le=1024 * 1024)

    _resolve = field_validator("ca_file")(resolve)

    @field_validator("curves")
    @classmethod
    def _known_curves(cls, value: list[str]) -> list[str]:
        if unknown := sorted(set(value) - OPENPGP_KNOWN_CURVES):
            raise ValueError(f"unknown curves {unknown}; known: {sorted(OPENPGP_KNOWN_CURVES)}")
        return value

    @model_validator(mode="after")
    def _identity(self) -> OpenPgpConfig:
        if self.ca_file is None and (self.key is None or self.created is None):
            raise ValueError("give ca_file (the ceremony's openpgp-ca.yaml) or key and created")
        return self


class CrlConfig(Section):
    """When the signer issues each issuer's CRL and how long entries stay (signer/server/crl.py)."""

    next_update_days: int = Field(default=7, ge=1, le=10, description="nextUpdate - thisUpdate")
    refresh_margin_hours: float = Field(
        default=48, ge=0, description="a CRL is stale this long before its nextUpdate"
    )
    reissue_hours: float = Field(
        default=24, gt=0, description="issue at least this often, even without changes"
    )
    min_interval_seconds: float = Field(
        default=60, ge=0, description="after new revocations, wait this long since the last CRL"
    )
    poll_seconds: float = Field(default=10, ge=0.05, le=3600, description="scheduler period")
    grace_days: float = Field(
        default=0, ge=0, le=3650, description="keep expired entries this long beyond RFC 5280"
    )

    @model_validator(mode="after")
    def _margin_inside_validity(self) -> CrlConfig:
        if self.refresh_margin_hours >= self.next_update_days * 24:
            raise ValueError("refresh_margin_hours must be shorter than next_update_days")
        return self


class AuditConfig(Section):
    """The audit log (docs/audit.md): its tree-head key, and how refusals are batched."""

    key: str | None = Field(default=None, min_length=1, description="audit key label in the HSM")
    certificate: Path | None = Field(default=None, description="the audit key's certificate")
    refusal_interval_seconds: float = Field(
        default=5, ge=0.05, le=3600, description="at most one audit entry of refusals per this"
    )
    refusal_records: int = Field(
        default=32,
        ge=1,
        le=1024,
        description="refusals recorded one by one per entry; "
        "beyond, one count per command and code",
    )

    _resolve = field_validator("certificate")(resolve)

    @model_validator(mode="after")
    def _both(self) -> AuditConfig:
        if (self.key is None) != (self.certificate is None):
            raise ValueError("give the audit key and its certificate together")
        return self


class SignerConfig(Section):
    """`signer serve`: one signer on one serial line.

    Components are optional so that a signer can be brought up step by step: without `hsm`,
    `repository`, `profiles` and `issuers`, it answers health only.
    """

    link: LinkConfig
    extra_links: list[LinkConfig] = Field(default_factory=list, max_length=7)  # more lines
    max_in_flight: int = Field(default=32, ge=1, le=1024)
    stop_timeout: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="seconds from SIGTERM to exit, whatever a request or the HSM does",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    repository: RepositoryConfig | None = None
    hsm: HsmSettings | None = None
    profiles: Path | None = Field(
        default=None,
        description="the profile set: `cacert` (CAcert's issuance), `modern` (CA/B Forum "
        "aligned), or the path of a profiles file (docs/profiles.md)",
    )
    issuers: dict[str, IssuerConfig] = Field(default_factory=dict)
    public_suffix_list: Path | None = Field(
        default=None,
        description="a newer public_suffix_list.dat than the one the publicsuffixlist package "
        "ships (wildcards directly under a public suffix are refused)",
    )
    openpgp: OpenPgpConfig | None = None
    crl: CrlConfig = Field(default_factory=CrlConfig)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    replication: ReplicationSettings | None = None  # Raft between the signers
    control_socket: Path | None = Field(
        default=None,
        description="a standalone signer's operator socket (signer import); default: "
        "control.sock in the repository directory (with replication: replication.control_socket)",
    )

    @field_validator("profiles")
    @classmethod
    def _profile_set(cls, value: Path | None, info: ValidationInfo) -> Path | None:
        """A shipped set by name, else a path relative to the config file."""
        if value is None:
            return None
        if str(value) in PROFILE_SETS:
            return PROFILE_SETS[str(value)]
        return resolve(value, info)

    _resolve = field_validator("control_socket", "public_suffix_list")(resolve)

    @model_validator(mode="after")
    def _one_socket(self) -> SignerConfig:
        if self.control_socket is not None and self.replication is not None:
            raise ValueError("with replication, set replication.control_socket instead")
        return self

    @model_validator(mode="after")
    def _openpgp_needs(self) -> SignerConfig:
        if self.openpgp is not None and not (self.hsm and self.repository):
            raise ValueError("openpgp needs the hsm and repository sections")
        return self

    @field_validator("hsm")
    @classmethod
    def _resolve_hsm(cls, value: HsmSettings | None, info: ValidationInfo) -> HsmSettings | None:
        base = (info.context or {}).get("base_dir")
        return value.resolved(base) if value is not None and base is not None else value

    @field_validator("replication")
    @classmethod
    def _resolve_replication(
        cls, value: ReplicationSettings | None, info: ValidationInfo
    ) -> ReplicationSettings | None:
        base = (info.context or {}).get("base_dir")
        return value.resolved(base) if value is not None and base is not None else value

    def control_path(self) -> Path | None:
        """Where the operator's socket is (None without a repository: nothing to control)."""
        if self.replication is not None:
            return self.replication.socket_path
        if self.control_socket is not None:
            return self.control_socket
        if self.repository is not None:
            return self.repository.path / "control.sock"  # one per repository
        return None

    def issuing(self) -> bool:
        """Whether the X.509 part is configured (all four pieces are needed together)."""
        return bool(self.hsm and self.repository and self.profiles and self.issuers)
