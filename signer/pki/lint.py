"""Lint before the HSM signs (Let's Encrypt's practice): the certificate to be issued is built,
linted with its profile's pkilint suite, and signed only if no lint reports an error.

The lints look at a certificate, not at a TBS, so the TBS is wrapped with a placeholder
signature of the issuer's algorithm and the signature's length (the lints never verify it);
only after zero errors is the very same TBS signed with the issuer's key (an HSM key: one
PKCS#11 signature) and wrapped into the certificate. A lint error is a refusal, `lint_failed`
with the findings, and an `operator:` log line: a profile or the code made a certificate it
must not make, which an operator has to look at.

Which lints a profile gets comes from its `kind`: every kind gets RFC 5280's; `tls`, `ocsp` and
`smime` add the CA/B Forum Baseline Requirements the profile claims (TLS BR subscriber or OCSP
responder, S/MIME BR with validation level and generation from its reserved policy OID).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding

from signer.errors import ErrorCode, SignerError
from signer.pki import pkilint_fast
from signer.pki.der import der_header, der_tlv
from signer.pki.x509_signing import (
    CertificatePlan,
    certificate_builder,
    dns_name_ok,
    signature_hash,
)

log = logging.getLogger(__name__)

LINT_KINDS = ("tls", "smime", "ocsp", "ca", "other")
_WILDCARD_FINDING = re.compile(r'^Invalid domain name syntax: "(\*\.[^"]+)"$')
_LINT_ALIASES = {"server": "tls", "serverauth": "tls", "email": "smime", "pkix": "other"}
MAX_REPORTED_FINDINGS = 20  # in the refusal's details; the log line has them all
# One lint at a time: pkilint's validators are shared (built once per kind) and not documented
# as thread-safe, and a lint is pure Python, so two at once only fight over the GIL while the
# other builder thread's signature waits in the HSM.
_LINT_LOCK = threading.Lock()
# While one builder thread lints (pure Python, ~3 ms), the other's signature runs in the HSM
# with the GIL released; coming back, it needs the GIL for every step, and with CPython's
# default 5 ms switch interval it waits up to that long each time (measured: the HSM's rate fell
# from 195 to 55 RSA-4096 signatures a second beside a linting thread, and came back to 133 with
# 0.2 ms turns). Short turns keep the HSM busy; docs/performance.md has the figures.
GIL_SWITCH_INTERVAL = 0.0002


@dataclass(frozen=True)
class LintFinding:
    severity: str
    code: str
    path: str
    message: str | None

    def __str__(self) -> str:
        text = f"{self.severity} {self.code} at {self.path}"
        return f"{text}: {self.message}" if self.message else text

    @property
    def is_error(self) -> bool:
        return self.severity.upper() in ("ERROR", "FATAL") and not self.tolerated

    @property
    def tolerated(self) -> bool:
        """A wildcard DNS name (`*.example.org`, RFC 6125 §6.4.3) is outside RFC 5280's
        preferred name syntax, so the RFC 5280 lints report it; the CA/B lints know wildcards.
        Profiles that allow wildcards issue them (the planner checked the rest of the name)."""
        found = _WILDCARD_FINDING.match(self.message or "")
        return (
            self.code == "pkix.invalid_domain_name_syntax"
            and found is not None
            and dns_name_ok(found.group(1), wildcard=True)
        )


# --------------------------------------------------------------------------- pkilint


@functools.lru_cache(maxsize=32)
def _validator(kind: str, variant: Any) -> Any:
    """The suite's validator tree, walked the fast way (same findings; pkilint_fast)."""
    return pkilint_fast.speed_up(_stock_validator(kind, variant))


def _stock_validator(kind: str, variant: Any) -> Any:
    from pkilint.cabf import serverauth, smime
    from pkilint.pkix import certificate, extension, name

    if kind in ("tls", "ocsp"):
        return certificate.create_pkix_certificate_validator_container(
            serverauth.create_decoding_validators(), serverauth.create_validators(variant)
        )
    if kind == "smime":
        level, generation = variant
        return certificate.create_pkix_certificate_validator_container(
            smime.create_decoding_validators(),
            smime.create_subscriber_validators(level, generation),
        )
    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


def lint_findings(der: bytes, kind: str) -> list[LintFinding]:
    """Every pkilint finding (any severity) for a certificate of a profile of this kind."""
    return _lint(der, kind, _validator)


def _lint(der: bytes, kind: str, validators: Callable[[str, Any], Any]) -> list[LintFinding]:
    from pkilint import finding_filter, loader
    from pkilint.cabf import serverauth, smime
    from pkilint.cabf.serverauth import serverauth_constants

    kind = _LINT_ALIASES.get(kind, kind)
    if kind not in LINT_KINDS:
        raise ValueError(f"unknown profile kind {kind!r}; expected one of {LINT_KINDS}")
    document = loader.RFC5280CertificateDocumentLoader().load_der_document(der)
    filters: list[Any] = []
    variant: Any = None
    if kind == "tls":
        variant = serverauth.determine_certificate_type(document)
        filters = serverauth.create_serverauth_finding_filters(variant)
    elif kind == "ocsp":
        variant = serverauth_constants.CertificateType.OCSP_RESPONDER
        filters = serverauth.create_serverauth_finding_filters(variant)
    elif kind == "smime":
        variant = smime.guess_validation_level_and_generation(document)
    suite = kind if kind in ("tls", "ocsp", "smime") else "pkix"
    with _LINT_LOCK:
        results = validators(suite, variant).validate(document.root)
    if filters:
        results, _ = finding_filter.filter_results(filters, results)
    return [
        LintFinding(str(d.finding.severity), d.finding.code, result.node.path, d.message)
        for result in results
        for d in result.finding_descriptions
    ]


def lint_certificate(der: bytes, kind: str) -> list[str]:
    """The error-level findings (ERROR and FATAL) as text; empty means clean."""
    return [str(f) for f in lint_findings(der, kind) if f.is_error]


# --------------------------------------------------------------------------- TBS and signature


@functools.cache
def _stand_in_key(family: str) -> Any:
    """A throwaway software key that gives the TBS the issuer's signature AlgorithmIdentifier
    (the identifier depends on the key family and digest only, not on the key)."""
    if family == "rsa":
        return rsa.generate_private_key(65537, 1024)
    if family == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if family == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ed448.Ed448PrivateKey.generate()


def _family(public_key: Any) -> str:
    if isinstance(public_key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(public_key, ed448.Ed448PublicKey):
        return "ed448"
    raise ValueError(f"unsupported issuer key {type(public_key).__name__}")


def _placeholder_signature(public_key: Any) -> bytes:
    """As long as the issuer's real signature: RSA the modulus' length, ECDSA the longest DER
    (r, s) of the curve, EdDSA its fixed length."""
    if isinstance(public_key, rsa.RSAPublicKey):
        return b"\x5a" * ((public_key.key_size + 7) // 8)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        top = (1 << public_key.curve.key_size) - 1
        return encode_dss_signature(top, top)
    return b"\x5a" * (64 if isinstance(public_key, ed25519.Ed25519PublicKey) else 114)


def tbs_and_algorithm(
    plan: CertificatePlan, serial: int, issuer_key: Any, issuer_cert: x509.Certificate
) -> tuple[bytes, bytes]:
    """The DER TBSCertificate and signatureAlgorithm the issuer's key will sign."""
    builder = certificate_builder(plan, serial, issuer_cert)
    public_key = issuer_cert.public_key()
    stand_in = _stand_in_key(_family(public_key))
    made = builder.sign(stand_in, signature_hash(plan, stand_in))
    der = made.public_bytes(Encoding.DER)
    _, start, _ = der_header(der, 0)
    _, _, tbs_end = der_header(der, start)
    _, _, alg_end = der_header(der, tbs_end)
    return der[start:tbs_end], der[tbs_end:alg_end]


def certificate_der(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue }."""
    return der_tlv(0x30, tbs + algorithm + der_tlv(0x03, b"\x00" + signature))


def _sign(issuer_key: Any, tbs: bytes, plan: CertificatePlan) -> bytes:
    algorithm = signature_hash(plan, issuer_key)
    if isinstance(issuer_key, rsa.RSAPrivateKey):
        assert algorithm is not None
        return issuer_key.sign(tbs, padding.PKCS1v15(), algorithm)
    if isinstance(issuer_key, ec.EllipticCurvePrivateKey):
        assert algorithm is not None
        return issuer_key.sign(tbs, ec.ECDSA(algorithm))
    if isinstance(issuer_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return issuer_key.sign(tbs)
    raise ValueError(f"unsupported issuer key {type(issuer_key).__name__}")


@functools.cache
def _share_the_gil() -> None:
    """Once per process that lints before signing: shorter GIL turns (GIL_SWITCH_INTERVAL)."""
    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL))


def sign_after_lint(
    plan: CertificatePlan, serial: int, issuer_key: Any, issuer_cert: x509.Certificate
) -> bytes:
    """Build the TBS, lint it with the plan's lints, then sign that TBS: the certificate's DER.

    LINT_FAILED (nothing signed) on any error-level finding. The signature is checked with the
    issuer certificate's key before the certificate leaves: a faulty HSM never gets it out.
    """
    _share_the_gil()
    tbs, algorithm = tbs_and_algorithm(plan, serial, issuer_key, issuer_cert)
    public_key = issuer_cert.public_key()
    placeholder = certificate_der(tbs, algorithm, _placeholder_signature(public_key))
    errors = [f for f in lint_findings(placeholder, plan.kind) if f.is_error]
    if errors:
        log.error(
            "operator: pre-issuance lint refused a %s certificate (serial %X), nothing was "
            "signed; the profile or the signer needs a look: %s",
            plan.profile,
            serial,
            "; ".join(str(f) for f in errors),
        )
        raise SignerError(
            ErrorCode.LINT_FAILED,
            f"the {plan.profile} certificate failed {len(errors)} pre-issuance lint(s); "
            f"first: {str(errors[0])[:200]}",
            details={"findings": [str(f)[:300] for f in errors[:MAX_REPORTED_FINDINGS]]},
        )
    der = certificate_der(tbs, algorithm, _sign(issuer_key, tbs, plan))
    try:
        x509.load_der_x509_certificate(der).verify_directly_issued_by(issuer_cert)
    except (InvalidSignature, ValueError, TypeError) as exc:
        raise SignerError(
            ErrorCode.HSM_ERROR, f"the issuer's signature does not verify ({exc}); not issued"
        ) from None
    return der
