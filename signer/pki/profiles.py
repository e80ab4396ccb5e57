"""Certificate profiles: what the signer may put into a certificate, loaded from YAML.

A profile is policy, so it lives in a reviewed file, not in code: the signer ships two sets,
`config/profiles/cacert.yaml` (CAcert's issuance as it is) and `config/profiles/modern.yaml`
(CA/B Forum aligned), and the operator names one in the signer's config (docs/profiles.md).
Loading is strict (unknown keys, wrong types and unsafe settings such as an MD5 digest are
refused with the file, the key path and the expectation) because a silently ignored typo in a
CA profile becomes a mis-issued certificate. Everything here is pure data; x509_signing.py
applies it.
"""

from __future__ import annotations

import datetime as dt
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from signer.errors import ErrorCode, SignerError

PROFILES_DIR = Path(__file__).resolve().parents[2] / "config" / "profiles"
# The shipped sets, by the name a signer config may give instead of a path.
PROFILE_SETS = {"cacert": PROFILES_DIR / "cacert.yaml", "modern": PROFILES_DIR / "modern.yaml"}
DEFAULT_PROFILES_PATH = PROFILE_SETS["cacert"]

# Subject attributes the signer knows, by the short name used in profiles and requests:
# (dotted OID, default upper bound on the value length). The bounds are RFC 5280 Appendix A
# (ub-*) where it has one; streetAddress, postalCode, businessCategory, organizationIdentifier
# use the X.520 bounds; DC is one DNS label.
SUBJECT_ATTRIBUTES: dict[str, tuple[str, int]] = {
    "CN": ("2.5.4.3", 64),
    "O": ("2.5.4.10", 64),
    "OU": ("2.5.4.11", 64),
    "L": ("2.5.4.7", 128),
    "ST": ("2.5.4.8", 128),
    "C": ("2.5.4.6", 2),
    "emailAddress": ("1.2.840.113549.1.9.1", 255),
    "serialNumber": ("2.5.4.5", 64),
    "GN": ("2.5.4.42", 32768),
    "SN": ("2.5.4.4", 32768),
    "title": ("2.5.4.12", 64),
    "pseudonym": ("2.5.4.65", 128),
    "street": ("2.5.4.9", 128),
    "postalCode": ("2.5.4.17", 40),
    "businessCategory": ("2.5.4.15", 128),
    "organizationIdentifier": ("2.5.4.97", 128),
    "DC": ("0.9.2342.19200300.100.1.25", 63),
}

# OpenSSL's long names (what the web application writes: `organizationalUnitName=...`) and a few
# other spellings OpenSSL accepts, to the short names above.
ATTRIBUTE_ALIASES: dict[str, str] = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "S": "ST",
    "countryName": "C",
    "Email": "emailAddress",
    "givenName": "GN",
    "G": "GN",
    "surname": "SN",
    "streetAddress": "street",
    "domainComponent": "DC",
}


def short_attribute_name(name: str) -> str | None:
    """The short name of a subject attribute given by its short or OpenSSL long name."""
    name = name.strip()
    if name in SUBJECT_ATTRIBUTES:
        return name
    return ATTRIBUTE_ALIASES.get(name)


SanType = Literal["dns", "email", "ip", "uri", "xmpp"]
Channel = Literal["line", "operator"]
ProfileKind = Literal["tls", "smime", "ocsp", "ca", "other"]
Curve = Literal["p256", "p384", "p521"]
KeyUsageName = Literal[
    "digitalSignature",
    "nonRepudiation",
    "keyEncipherment",
    "dataEncipherment",
    "keyAgreement",
    "keyCertSign",
    "cRLSign",
    "encipherOnly",
    "decipherOnly",
]
Digest = Literal["sha256", "sha384", "sha512"]
ALLOWED_DIGESTS: tuple[Digest, ...] = ("sha256", "sha384", "sha512")
FORBIDDEN_DIGESTS = frozenset({"md2", "md4", "md5", "sha1", "sha-1", "sha"})
EKU_NAMES: dict[str, str] = {
    "serverAuth": "1.3.6.1.5.5.7.3.1",
    "clientAuth": "1.3.6.1.5.5.7.3.2",
    "codeSigning": "1.3.6.1.5.5.7.3.3",
    "emailProtection": "1.3.6.1.5.5.7.3.4",
    "timeStamping": "1.3.6.1.5.5.7.3.8",
    "OCSPSigning": "1.3.6.1.5.5.7.3.9",
    # Microsoft's: encrypting file system, individual and commercial code signing (CAcert's CPS).
    "msEFS": "1.3.6.1.4.1.311.10.3.4",
    "msCodeInd": "1.3.6.1.4.1.311.2.1.21",
    "msCodeCom": "1.3.6.1.4.1.311.2.1.22",
}

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_HTTP_URL_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[\x21-\x7e]*)?$")

Oid = Annotated[str, StringConstraints(pattern=_OID_RE.pattern)]
HttpUrl = Annotated[str, StringConstraints(pattern=_HTTP_URL_RE.pattern, max_length=1024)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class AttributeRule(_Model):
    """Limits for one subject attribute type."""

    max_count: int = Field(1, ge=1, le=32)
    max_length: int | None = Field(None, ge=1)
    required: bool = False


class SubjectRules(_Model):
    """Which subject attributes may appear; unlisted ones are refused unless drop_unlisted (or
    named in `ignore`, which leaves out just those)."""

    attributes: dict[str, AttributeRule]
    drop_unlisted: bool = False
    ignore: list[str] = []
    require_one_of: list[list[str]] = []
    allow_empty: bool = False
    # Reorder attributes into the CA/B Forum BR 7.1.4.2 order (required for TLS certificates);
    # otherwise the request's order is kept.
    canonical_order: bool = False
    # Where a CN value may come from: "san" (equal to one of the SANs; the CN is then written in
    # the SAN's canonical form) and/or "O" (equal to an organizationName). Empty: any value.
    cn_sources: list[Literal["san", "O"]] = []
    # What happens to a CN that is none of its cn_sources: refused, or left out (a mailbox-
    # validated S/MIME profile drops a member's name that the web application puts there).
    unmatched_cn: Literal["refuse", "drop"] = "refuse"
    # S/MIME BR, RFC 5280 4.1.2.6: every emailAddress attribute must also be an rfc822Name SAN.
    email_must_be_san: bool = True

    @field_validator("ignore")
    @classmethod
    def _known_ignored(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in SUBJECT_ATTRIBUTES:
                raise ValueError(f"ignore: unknown subject attribute {name!r}")
        return value

    @field_validator("attributes")
    @classmethod
    def _known_attributes(cls, value: dict[str, AttributeRule]) -> dict[str, AttributeRule]:
        resolved = {}
        for name, rule in value.items():
            if name not in SUBJECT_ATTRIBUTES:
                raise ValueError(
                    f"unknown subject attribute {name!r}; expected one of "
                    + ", ".join(SUBJECT_ATTRIBUTES)
                )
            bound = SUBJECT_ATTRIBUTES[name][1]
            if rule.max_length is None:
                rule = rule.model_copy(update={"max_length": bound})
            elif rule.max_length > bound:
                raise ValueError(
                    f"{name}.max_length {rule.max_length} exceeds the upper bound {bound}"
                )
            resolved[name] = rule
        return resolved

    @model_validator(mode="after")
    def _consistent(self) -> SubjectRules:
        for group in self.require_one_of:
            if not group:
                raise ValueError("require_one_of: a group must name at least one attribute")
            for name in group:
                if name not in self.attributes:
                    raise ValueError(
                        f"require_one_of names {name!r}, which is not in subject.attributes"
                    )
        if "O" in self.cn_sources and "O" not in self.attributes:
            raise ValueError("cn_sources contains 'O' but O is not an allowed attribute")
        if overlap := sorted(set(self.ignore) & set(self.attributes)):
            raise ValueError(f"ignore names allowed attributes: {', '.join(overlap)}")
        return self

    def max_length(self, name: str) -> int:
        rule = self.attributes.get(name)
        return rule.max_length if rule and rule.max_length else SUBJECT_ATTRIBUTES[name][1]


class SanTypeRule(_Model):
    max_count: int = Field(..., ge=1, le=1000)
    wildcard: bool = False  # dns only: allow a leading "*." label
    allow_non_public: bool = False  # ip only: allow private, loopback, reserved addresses


class SanRules(_Model):
    allowed: dict[SanType, SanTypeRule] = {}
    # SAN types left out without a word (the CA/B TLS profile: XmppAddr, which the BRs prohibit
    # and the web application puts into every server request).
    ignore: list[SanType] = []
    max_total: int = Field(100, ge=0, le=1000)
    required: bool = False
    # Take the SANs of the CSR's extensionRequest when the request gives none.
    copy_csr_sans: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> SanRules:
        for name, rule in self.allowed.items():
            if rule.wildcard and name != "dns":
                raise ValueError(f"allowed.{name}.wildcard: only dns names can be wildcards")
            if rule.allow_non_public and name != "ip":
                raise ValueError(f"allowed.{name}.allow_non_public applies to ip only")
        if self.required and not self.allowed:
            raise ValueError("required is true but no SAN type is allowed")
        if overlap := sorted(set(self.ignore) & set(self.allowed)):
            raise ValueError(f"ignore names allowed SAN types: {', '.join(overlap)}")
        return self


class RsaRule(_Model):
    min_bits: int = Field(2048, ge=2048, le=16384)
    max_bits: int = Field(8192, ge=2048, le=16384)
    # CA/B BR 6.1.6: odd, >= 3, SHOULD be in [2**16+1, 2**256-1]; the default follows the SHOULD.
    min_exponent: int = Field(65537, ge=3)

    @model_validator(mode="after")
    def _consistent(self) -> RsaRule:
        if self.max_bits < self.min_bits:
            raise ValueError(f"max_bits {self.max_bits} is below min_bits {self.min_bits}")
        return self


class KeyRules(_Model):
    rsa: RsaRule | None = RsaRule()
    ec_curves: list[Curve] = ["p256", "p384", "p521"]
    ed25519: bool = False
    ed448: bool = False


class ValidityStep(_Model):
    """From `from` on (a date, UTC), the maximum validity drops to max_days (CA/B schedules)."""

    from_: dt.date = Field(alias="from")
    max_days: int = Field(..., ge=1)


class ValidityRules(_Model):
    default_days: int = Field(..., ge=1, le=36500)
    max_days: int = Field(..., ge=1, le=36500)
    # notBefore = now - backdate_seconds, absorbing clock skew of relying parties.
    backdate_seconds: int = Field(60, ge=0, le=86400)
    schedule: list[ValidityStep] = []

    @field_validator("schedule", mode="before")
    @classmethod
    def _dates(cls, value: Any) -> Any:
        # YAML gives datetime.date objects; strict mode would refuse ISO strings otherwise.
        if isinstance(value, list):
            out = []
            for step in value:
                if isinstance(step, dict) and isinstance(step.get("from"), str):
                    step = {**step, "from": dt.date.fromisoformat(step["from"])}
                out.append(step)
            return out
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ValidityRules:
        if self.default_days > self.max_days:
            raise ValueError(
                f"default_days {self.default_days} exceeds max_days {self.max_days}; "
                "expected default_days <= max_days"
            )
        return self

    def effective_max_days(self, when: dt.datetime) -> int:
        """The maximum validity in force at `when` (the schedule only lowers it)."""
        limit = self.max_days
        day = when.date()
        for step in self.schedule:
            if step.from_ <= day:
                limit = min(limit, step.max_days)
        return limit


class KeyUsageRules(_Model):
    """keyUsage bits per subject key type (the extension is always critical)."""

    rsa: list[KeyUsageName] | None = None
    ec: list[KeyUsageName] | None = None
    eddsa: list[KeyUsageName] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> KeyUsageRules:
        if self.rsa and "keyAgreement" in self.rsa:
            raise ValueError("rsa: RSA keys cannot do keyAgreement")
        if self.ec and {"keyEncipherment", "dataEncipherment"} & set(self.ec):
            raise ValueError("ec: EC keys cannot do key or data encipherment")
        allowed_eddsa = {"digitalSignature", "nonRepudiation", "keyCertSign", "cRLSign"}
        if self.eddsa and set(self.eddsa) - allowed_eddsa:
            raise ValueError(f"eddsa: EdDSA keys only allow {sorted(allowed_eddsa)}")
        for name in ("rsa", "ec", "eddsa"):
            bits = getattr(self, name)
            if bits is not None and not bits:
                raise ValueError(f"{name}: at least one key usage bit is required")
            if bits and len(set(bits)) != len(bits):
                raise ValueError(f"{name}: duplicate key usage bits")
            if bits and {"encipherOnly", "decipherOnly"} & set(bits) and "keyAgreement" not in bits:
                raise ValueError(f"{name}: encipherOnly/decipherOnly need keyAgreement")
        return self


class ExtKeyUsageRules(_Model):
    usages: list[str] = Field(..., min_length=1)
    critical: bool = False

    @field_validator("usages")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        for usage in value:
            if usage not in EKU_NAMES and not _OID_RE.match(usage):
                raise ValueError(
                    f"unknown extended key usage {usage!r}; expected a dotted OID or one of "
                    + ", ".join(EKU_NAMES)
                )
        if len(set(value)) != len(value):
            raise ValueError("duplicate extended key usages")
        return value


class BasicConstraintsRules(_Model):
    ca: bool = False
    path_length: int | None = Field(None, ge=0, le=16)
    critical: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> BasicConstraintsRules:
        if self.path_length is not None and not self.ca:
            raise ValueError("path_length is only allowed with ca: true")
        if self.ca and not self.critical:
            raise ValueError("basicConstraints must be critical in CA certificates (RFC 5280)")
        return self


class PolicyRule(_Model):
    oid: Oid
    cps: HttpUrl | None = None


class IssuerUrls(_Model):
    """What certificates of one issuer point to: its CRL, OCSP responder and certificate."""

    crl_urls: list[HttpUrl] = []
    ocsp_urls: list[HttpUrl] = []
    ca_issuers_urls: list[HttpUrl] = []


def _check_digest_list(value: Any) -> Any:
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str) and item.lower() in FORBIDDEN_DIGESTS:
                raise ValueError(
                    f"{item} is never allowed (broken hash); expected a subset of "
                    + ", ".join(ALLOWED_DIGESTS)
                )
    return value


class Profile(_Model):
    """One certificate profile. `name` is the key under `profiles:`; URLs are resolved."""

    name: str
    kind: ProfileKind
    description: str = ""
    # Who may ask for it: `line` (the WebDB over the serial line) or `operator` (only at the
    # signer itself). A CA, OCSP-signing or time-stamping profile must be `operator`: the line is
    # trusted for attributes, not for authority.
    channel: Channel = "line"
    issuer: str
    subject: SubjectRules
    sans: SanRules = SanRules()
    keys: KeyRules = KeyRules()
    validity: ValidityRules
    digests: list[Digest] = Field(default_factory=lambda: list(ALLOWED_DIGESTS), min_length=1)
    key_usage: KeyUsageRules
    extended_key_usage: ExtKeyUsageRules | None = None
    basic_constraints: BasicConstraintsRules = BasicConstraintsRules()
    # None: take the issuer's URLs from `issuers:`; a list (possibly empty) overrides them.
    crl_urls: list[HttpUrl] | None = None
    ocsp_urls: list[HttpUrl] | None = None
    ca_issuers_urls: list[HttpUrl] | None = None
    policies: list[PolicyRule] = []
    ocsp_nocheck: bool = False

    @field_validator("digests", mode="before")
    @classmethod
    def _no_broken_digests(cls, value: Any) -> Any:
        return _check_digest_list(value)

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        ku, keys = self.key_usage, self.keys
        if keys.rsa is not None and ku.rsa is None:
            raise ValueError("RSA keys are allowed but key_usage.rsa is missing")
        if keys.ec_curves and ku.ec is None:
            raise ValueError("EC keys are allowed but key_usage.ec is missing")
        if (keys.ed25519 or keys.ed448) and ku.eddsa is None:
            raise ValueError("EdDSA keys are allowed but key_usage.eddsa is missing")
        if keys.rsa is None and not keys.ec_curves and not keys.ed25519 and not keys.ed448:
            raise ValueError("keys: no key algorithm is allowed")
        ca = self.basic_constraints.ca
        for bits in (ku.rsa, ku.ec, ku.eddsa):
            if bits is None:
                continue
            if ca and "keyCertSign" not in bits:
                raise ValueError("a CA profile (basic_constraints.ca) needs keyCertSign")
            if not ca and "keyCertSign" in bits:
                raise ValueError("keyCertSign is only allowed with basic_constraints.ca: true")
        oids = [p.oid for p in self.policies]
        if len(set(oids)) != len(oids):
            raise ValueError("policies: duplicate policy OIDs")
        if self.ocsp_nocheck and (
            self.extended_key_usage is None or "OCSPSigning" not in self.extended_key_usage.usages
        ):
            raise ValueError("ocsp_nocheck needs the OCSPSigning extended key usage")
        if self.subject.allow_empty and not self.sans.required:
            raise ValueError(
                "subject.allow_empty needs sans.required (RFC 5280: an empty subject needs a SAN)"
            )
        if self.channel != "operator" and (authority := self.authority()):
            raise ValueError(
                f"channel: a profile that issues {authority} certificates can only be issued by "
                "an operator at the signer; expected channel: operator"
            )
        return self

    def authority(self) -> str | None:
        """What authority the certificate confers beyond its subject: a CA, an OCSP signer or a
        time-stamping authority (None for an end-entity certificate)."""
        if self.basic_constraints.ca or self.kind == "ca":
            return "CA"
        eku = self.extended_key_usage
        usages = {EKU_NAMES.get(u, u) for u in eku.usages} if eku else set()
        if self.ocsp_nocheck or self.kind == "ocsp" or EKU_NAMES["OCSPSigning"] in usages:
            return "OCSP-signing"
        if EKU_NAMES["timeStamping"] in usages:
            return "time-stamping"
        return None

    def digest_allowed(self, digest: str) -> bool:
        return digest in self.digests


class ProfileSet(_Model):
    """The whole profiles file: the issuers' published URLs and the profiles."""

    version: Literal[1]
    issuers: dict[str, IssuerUrls]
    profiles: dict[str, Profile]
    source: str = "<memory>"

    @model_validator(mode="before")
    @classmethod
    def _inject_names(cls, data: Any) -> Any:
        # The profile's name is its key; copying it in keeps Profile self-describing.
        if isinstance(data, dict) and isinstance(data.get("profiles"), dict):
            profiles = {}
            for key, value in data["profiles"].items():
                if isinstance(value, dict) and "name" not in value:
                    value = {"name": key, **value}
                profiles[key] = value
            data = {**data, "profiles": profiles}
        return data

    @model_validator(mode="after")
    def _resolve(self) -> ProfileSet:
        resolved = {}
        for key, profile in self.profiles.items():
            if profile.name != key:
                raise ValueError(f"profiles.{key}.name: must equal the key {key!r} (or be omitted)")
            issuer = self.issuers.get(profile.issuer)
            if issuer is None:
                raise ValueError(
                    f"profiles.{key}.issuer: unknown issuer {profile.issuer!r}; expected one of "
                    + ", ".join(self.issuers)
                )
            resolved[key] = profile.model_copy(
                update={
                    "crl_urls": issuer.crl_urls if profile.crl_urls is None else profile.crl_urls,
                    "ocsp_urls": (
                        issuer.ocsp_urls if profile.ocsp_urls is None else profile.ocsp_urls
                    ),
                    "ca_issuers_urls": (
                        issuer.ca_issuers_urls
                        if profile.ca_issuers_urls is None
                        else profile.ca_issuers_urls
                    ),
                }
            )
        object.__setattr__(self, "profiles", resolved)
        return self

    def get(self, name: object, channel: Channel = "line") -> Profile:
        """The profile called `name` as `channel` may use it: UNKNOWN_PROFILE, or OPERATOR_ONLY
        for an operator profile asked for over the line (the name comes from the wire)."""
        profile = self.profiles.get(name) if isinstance(name, str) else None
        if profile is None:
            shown = name if isinstance(name, str) else type(name).__name__
            raise SignerError(
                ErrorCode.UNKNOWN_PROFILE,
                f"unknown certificate profile {str(shown)[:64]!r}",
                details={"known": self.names(channel)},
            )
        check_channel(profile, channel)
        return profile

    def __getitem__(self, name: object) -> Profile:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.profiles

    def names(self, channel: Channel = "operator") -> list[str]:
        """The profile names `channel` may use (the operator may use all)."""
        return sorted(n for n, p in self.profiles.items() if channel == "operator" or
                      p.channel == "line")  # fmt: skip

    def offered(self) -> list[Profile]:
        """The profiles offered over the line (`list_profiles`): operator profiles are not."""
        return [self.profiles[name] for name in self.names("line")]


def check_channel(profile: Profile, channel: Channel) -> None:
    """OPERATOR_ONLY when a profile for the operator is asked for over the line."""
    if profile.channel == "operator" and channel != "operator":
        raise SignerError(
            ErrorCode.OPERATOR_ONLY,
            f"profile {profile.name} issues {profile.authority() or 'operator-only'} certificates:"
            " only an operator at the signer may issue it, never a request over the line",
            details={"profile": profile.name},
        )


class ProfileLoadError(ValueError):
    """The profiles file is unusable; `problems` holds (key path, message) pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {path or '<top>'}: {message}" for path, message in problems]
        super().__init__("\n".join(lines))


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, typing.Hashable) and key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


def _strict_mapping(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    assert isinstance(loader, _StrictLoader) and isinstance(node, yaml.MappingNode)
    return _construct_mapping(loader, node, deep=True)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _strict_mapping)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _unwrap(annotation: Any) -> list[Any]:
    """The model classes and containers an annotation can hold (for 'expected keys' hints)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [a for arg in typing.get_args(annotation) for a in _unwrap(arg)]
    return [annotation]


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """Walk ProfileSet's type tree along an error location to the model holding the bad key."""
    current: list[Any] = [ProfileSet]
    for part in loc[:-1]:
        nxt: list[Any] = []
        for ann in current:
            origin = typing.get_origin(ann)
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                field = ann.model_fields.get(str(part))
                if field is None:
                    field = next((f for f in ann.model_fields.values() if f.alias == part), None)
                if field is not None:
                    nxt.extend(_unwrap(field.annotation))
            elif origin in (list, dict, Mapping):
                nxt.extend(_unwrap(typing.get_args(ann)[-1]))
        current = nxt
    for ann in current:
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            return ann
    return None


def _describe(error: Any) -> str:
    kind = error["type"]
    loc = tuple(error["loc"])
    if kind == "extra_forbidden":
        model = _model_at(loc)
        if model is not None:
            keys = [
                f.alias or name
                for name, f in model.model_fields.items()
                if name not in ("name", "source")  # filled in by the loader, not by YAML
            ]
            return "unknown key; expected one of: " + ", ".join(keys)
        return "unknown key"
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if kind not in ("value_error", "assertion_error") and "input" in error:
        shown = repr(error["input"])
        if len(shown) > 60:
            shown = shown[:57] + "..."
        message = f"{message} (got {shown})"
    return message


_PATH_PREFIX_RE = re.compile(r"^([A-Za-z0-9_.\-\[\]]+): ")


def parse_profiles(text: str | bytes, source: str = "<memory>") -> ProfileSet:
    """Parse and validate profiles YAML; ProfileLoadError names source, key path, expectation."""
    try:
        data = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ProfileLoadError(source, [(where, f"YAML syntax error: {problem}")]) from None
    if not isinstance(data, dict):
        raise ProfileLoadError(
            source, [("", f"expected a mapping with version, issuers, profiles; got {data!r:.40}")]
        )
    if "source" in data:
        raise ProfileLoadError(source, [("source", "unknown key")])
    try:
        return ProfileSet.model_validate({**data, "source": source})
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            message = _describe(error)
            if loc and loc[-1] == "[key]":  # a bad mapping key, not a bad value
                loc, message = loc[:-1], f"bad key: {message}"
            path = _format_loc(loc)
            # Cross-field checks at the top level put the key path into the message.
            match = _PATH_PREFIX_RE.match(message)
            if not path and match:
                path, message = match.group(1), message[match.end() :]
            problems.append((path, message))
        raise ProfileLoadError(source, problems) from None


def profiles_path(choice: str | Path) -> Path:
    """A shipped set's file by its name (`cacert`, `modern`), or the path given."""
    return PROFILE_SETS.get(str(choice), Path(choice))


def load_profiles(path: str | Path = DEFAULT_PROFILES_PATH) -> ProfileSet:
    """Load a profiles file by path or shipped set name (CAcert's set by default)."""
    path = profiles_path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileLoadError(str(path), [("", f"cannot read file: {exc}")]) from None
    return parse_profiles(text, str(path))
