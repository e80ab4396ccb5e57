"""Both shipped profile sets: every profile issues a certificate that chains (openssl) and passes
the pkilint lints that apply to it, with the fields docs/profiles.md promises; and the signer
lints before it signs (signer/pki/lint.py)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from x509_helpers import TestCA, make_ca, make_csr, openssl_verify, rsa_key

from signer.errors import ErrorCode, SignerError
from signer.pki import lint, pkilint_fast
from signer.pki.lint import lint_findings, sign_after_lint
from signer.pki.profiles import PROFILE_SETS, Profile, load_profiles
from signer.pki.x509_signing import (
    IssuanceRequest,
    build_certificate,
    new_serial,
    plan_certificate,
)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
CPS = "1.3.6.1.4.1.18506.4.4"
MS_EFS = x509.ObjectIdentifier("1.3.6.1.4.1.311.10.3.4")
MS_CODE_IND = x509.ObjectIdentifier("1.3.6.1.4.1.311.2.1.21")
MS_CODE_COM = x509.ObjectIdentifier("1.3.6.1.4.1.311.2.1.22")
E = ExtendedKeyUsageOID
CLIENT_EKU = [E.EMAIL_PROTECTION, E.CLIENT_AUTH, MS_EFS]

# What the web application asks for, per profile (subject and SANs as the WebDB client sends them).
ORG = [("C", "DE"), ("ST", "Berlin"), ("L", "Berlin"), ("O", "Example e.V."), ("OU", "IT")]
ASKED: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]] | None]] = {
    "client": (
        [
            ("CN", "CAcert WoT User"),
            ("emailAddress", "a@example.org"),
            ("emailAddress", "b@example.net"),
        ],
        [("email", "a@example.org"), ("email", "b@example.net")],
    ),
    "client-org": (
        [*ORG, ("CN", "Example Office"), ("emailAddress", "office@example.org")],
        [("email", "office@example.org")],
    ),
    "client-codesign": (
        [("CN", "Alice Example"), ("emailAddress", "alice@example.org")],
        [("email", "alice@example.org")],
    ),
    "server": (
        [("CN", "www.example.org")],
        [
            ("dns", "www.example.org"),
            ("xmpp", "www.example.org"),
            ("dns", "*.example.org"),
            ("xmpp", "example.org"),
        ],
    ),
    "server-org": (
        [*ORG, ("CN", "shop.example.org")],
        [("dns", "shop.example.org"), ("xmpp", "shop.example.org")],
    ),
    "ocsp": ([("C", "AU"), ("O", "CAcert Inc."), ("CN", "CAcert OCSP Responder")], None),
    "timestamp": ([("C", "AU"), ("O", "CAcert Inc."), ("CN", "CAcert Timestamping")], None),
    "subca": ([("C", "AU"), ("O", "CAcert Inc."), ("CN", "CAcert Org CA")], None),
}
# The modern set asks more (S/MIME BR organizationIdentifier) and leaves out what the BRs forbid.
MODERN_ASKED = {
    **ASKED,
    "client-org": (
        [("C", "DE"), ("O", "Example e.V."), ("organizationIdentifier", "NTRDE-VR12345"),
         ("CN", "Example e.V."), ("emailAddress", "office@example.org")],
        [("email", "office@example.org")],
    ),
}  # fmt: skip

# CAcert's table (docs/profiles.md): EKU and validity rules per profile of the cacert set.
CACERT_EKU = {
    "client": CLIENT_EKU,
    "client-org": CLIENT_EKU,
    "client-codesign": [E.EMAIL_PROTECTION, E.CLIENT_AUTH, E.CODE_SIGNING, MS_CODE_IND,
                        MS_CODE_COM, MS_EFS],
    "server": [E.CLIENT_AUTH, E.SERVER_AUTH],
    "server-org": [E.CLIENT_AUTH, E.SERVER_AUTH],
    "ocsp": [E.OCSP_SIGNING],
    "timestamp": [E.TIME_STAMPING],
}  # fmt: skip
CRL = {"class1": "http://crl.cacert.org/revoke.crl",
       "class3": "http://crl.cacert.org/class3-revoke.crl"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Cas:
    root: TestCA
    sub: TestCA

    def issuer(self, profile: Profile) -> TestCA:
        return self.root if profile.issuer == "class1" else self.sub


@pytest.fixture(scope="module")
def cas() -> Cas:
    """RSA like CAcert's roots: a 4096-bit class 1 root and its class 3 subordinate."""
    root = make_ca("Test CAcert Root", rsa_key(4096))
    return Cas(root, make_ca("Test CAcert Class 3", rsa_key(2048), parent=root))


SUBJECT_KEYS = {"rsa": rsa_key(2048), "p256": ec.generate_private_key(ec.SECP256R1())}
CASES = [
    (set_name, name, key)
    for set_name in sorted(PROFILE_SETS)
    for name in load_profiles(set_name).names()
    for key in ("rsa", "p256")
]


def issue(cas: Cas, set_name: str, name: str, key: str) -> tuple[Profile, x509.Certificate]:
    profile = load_profiles(set_name).get(name, "operator")
    subject, sans = (MODERN_ASKED if set_name == "modern" else ASKED)[name.removesuffix("-class1")]
    issuer = cas.issuer(profile)
    request = IssuanceRequest(make_csr(SUBJECT_KEYS[key]), name, subject, sans)
    plan = plan_certificate(request, profile, issuer.cert, NOW, "operator")
    der = sign_after_lint(plan, new_serial(), issuer.key, issuer.cert)
    return profile, x509.load_der_x509_certificate(der)


def ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> Any:
    try:
        return cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None


@pytest.mark.parametrize(("set_name", "name", "key"), CASES)
def test_every_profile_of_both_sets_issues_lint_clean(
    tmp_path: Path, cas: Cas, set_name: str, name: str, key: str
) -> None:
    """pkilint with the lint that applies (RFC 5280 always, the CA/B suite the profile claims):
    zero errors, checked here again on the issued certificate; openssl verifies the chain."""
    profile, cert = issue(cas, set_name, name, key)
    der = cert.public_bytes(serialization.Encoding.DER)
    errors = [str(f) for f in lint_findings(der, profile.kind) if f.is_error]
    assert errors == []
    if profile.kind != "other":  # a CA/B claim is linted with RFC 5280's lints too
        assert [str(f) for f in lint_findings(der, "other") if f.is_error] == []
    code, output = openssl_verify(tmp_path, cas.root, cas.sub, der)
    assert code == 0, output


@pytest.mark.parametrize(("name", "key"), [(n, k) for s, n, k in CASES if s == "cacert"])
def test_cacert_set_issues_what_cacert_issues(cas: Cas, name: str, key: str) -> None:
    """The fields of docs/profiles.md's table: EKU, keyUsage by key type, names as the web
    application asked (OU and the member's CN kept, XmppAddr in server certificates), CRL DP of
    the issuer, CAcert's OCSP URL, the CPS policy OID and no CA/B Forum OID, critical CA:FALSE."""
    profile, cert = issue(cas, "cacert", name, key)
    base = name.removesuffix("-class1")
    subject, sans = ASKED[base]
    order = {"C": 0, "ST": 1, "L": 2, "O": 3, "OU": 4, "CN": 5, "emailAddress": 6}
    short = {v: k for k, v in {
        "C": NameOID.COUNTRY_NAME, "ST": NameOID.STATE_OR_PROVINCE_NAME,
        "L": NameOID.LOCALITY_NAME, "O": NameOID.ORGANIZATION_NAME,
        "OU": NameOID.ORGANIZATIONAL_UNIT_NAME, "CN": NameOID.COMMON_NAME,
        "emailAddress": NameOID.EMAIL_ADDRESS}.items()}  # fmt: skip
    got = [(short[a.oid], a.value) for a in cert.subject]
    assert got == sorted(subject, key=lambda pair: order[pair[0]])  # openssl's policy order
    san = ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    kinds: dict[type, str] = {x509.DNSName: "dns", x509.RFC822Name: "email", x509.OtherName: "xmpp"}
    issued_sans = [
        (kinds[type(n)], n.value if not isinstance(n, x509.OtherName) else n.value[2:].decode())
        for n in (san.value if san else [])
    ]
    assert issued_sans == (sans or [])
    bc = ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical and bc.value.ca == (base == "subca")
    ku = ext(cert, ExtensionOID.KEY_USAGE)
    assert ku.critical and ku.value.digital_signature
    if base in CACERT_EKU and base not in ("ocsp", "timestamp"):
        assert ku.value.key_encipherment == (key == "rsa")
        assert ku.value.key_agreement == (key == "p256")
    if base in CACERT_EKU:
        assert list(ext(cert, ExtensionOID.EXTENDED_KEY_USAGE).value) == CACERT_EKU[base]
    policies = ext(cert, ExtensionOID.CERTIFICATE_POLICIES)
    oids = [p.policy_identifier.dotted_string for p in policies.value] if policies else []
    assert not any(oid.startswith("2.23.140.") for oid in oids)
    if base == "ocsp":
        assert ext(cert, x509.OCSPNoCheck.oid) is not None and oids == []
        assert ext(cert, ExtensionOID.CRL_DISTRIBUTION_POINTS) is None
        return
    assert oids == [CPS]
    crldp = ext(cert, ExtensionOID.CRL_DISTRIBUTION_POINTS).value
    assert [dp.full_name[0].value for dp in crldp] == [CRL[profile.issuer]]
    aia = ext(cert, ExtensionOID.AUTHORITY_INFORMATION_ACCESS).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (x509.AuthorityInformationAccessOID.OCSP, "http://ocsp.cacert.org")
    ]
    assert ext(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER) is not None
    assert ext(cert, ExtensionOID.AUTHORITY_KEY_IDENTIFIER) is not None


# --------------------------------------------------------------------------- lint before signing


def test_lint_then_sign_gives_the_same_bytes_as_signing_directly(cas: Cas) -> None:
    """RSA PKCS#1 v1.5 is deterministic: the TBS signed after the lint is the TBS a direct
    signature makes, byte for byte."""
    profile = load_profiles("cacert").get("server")
    subject, sans = ASKED["server"]
    request = IssuanceRequest(make_csr(SUBJECT_KEYS["p256"]), "server", subject, sans)
    plan = plan_certificate(request, profile, cas.sub.cert, NOW)
    serial = new_serial()
    assert sign_after_lint(plan, serial, cas.sub.key, cas.sub.cert) == build_certificate(
        plan, serial, cas.sub.key, cas.sub.cert
    )


@pytest.mark.parametrize("kind", ["p384", "ed25519"])
def test_lint_then_sign_with_ecdsa_and_eddsa_issuers(tmp_path: Path, cas: Cas, kind: str) -> None:
    key = (
        ec.generate_private_key(ec.SECP384R1())
        if kind == "p384"
        else (ed25519.Ed25519PrivateKey.generate())
    )
    sub = make_ca(f"{kind} CA", key, parent=cas.root)
    profile = load_profiles("cacert").get("client")
    subject, sans = ASKED["client"]
    request = IssuanceRequest(make_csr(SUBJECT_KEYS["rsa"]), "client", subject, sans,
                              digest="sha384")  # fmt: skip
    plan = plan_certificate(request, profile, sub.cert, NOW)
    der = sign_after_lint(plan, new_serial(), sub.key, sub.cert)
    x509.load_der_x509_certificate(der).verify_directly_issued_by(sub.cert)


def test_a_lint_error_is_a_refusal_and_nothing_is_signed(
    cas: Cas, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A TLS BR certificate of 800 days: the profile (edited) allows it, the BR lint does not."""
    modern = load_profiles("modern").get("server")
    data = modern.model_dump(by_alias=True)
    data["validity"].update(default_days=800, max_days=800, schedule=[])
    profile = Profile.model_validate(data, strict=False)
    request = IssuanceRequest(make_csr(SUBJECT_KEYS["p256"]), "server", [("CN", "a.example.org")],
                              [("dns", "a.example.org")])  # fmt: skip
    plan = plan_certificate(request, profile, cas.sub.cert, NOW)
    signed: list[bytes] = []
    real_sign = lint._sign

    def sign(key: Any, tbs: bytes, plan: Any) -> bytes:  # the HSM, recording what it signs
        signed.append(tbs)
        return real_sign(key, tbs, plan)

    monkeypatch.setattr(lint, "_sign", sign)
    with (
        caplog.at_level(logging.ERROR, logger="signer.pki.lint"),
        pytest.raises(SignerError) as info,
    ):
        sign_after_lint(plan, new_serial(), cas.sub.key, cas.sub.cert)
    assert info.value.code is ErrorCode.LINT_FAILED
    findings = info.value.details["findings"]
    assert findings and all(" at " in f for f in findings)
    assert any("validity" in f for f in findings), findings
    assert signed == []  # the HSM never saw it
    assert any(r.message.startswith("operator: pre-issuance lint refused") for r in caplog.records)
    info.value.to_wire()
    good = dataclasses.replace(plan, not_after=plan.not_before + dt.timedelta(days=90))
    sign_after_lint(good, new_serial(), cas.sub.key, cas.sub.cert)
    assert len(signed) == 1  # a clean one is signed, once


def _outcome(der: bytes, kind: str, validators: Any) -> list[str] | str:
    try:
        return [str(f) for f in lint._lint(der, kind, validators)]
    except Exception as exc:  # pkilint refuses some certificate/suite pairs; both walks must
        return f"raised {type(exc).__name__}"


def test_the_fast_lint_finds_exactly_what_pkilint_finds(
    cas: Cas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """signer/pki/pkilint_fast.py: every certificate of both sets, linted under every suite
    (the wrong suites give many findings), the same findings in the same order as pkilint's own
    walk of a fresh validator tree with pkilint's own decoder."""
    from pkilint import document

    pkilint_fast.remember_decoded_values()
    memory = document.decode_der
    assert isinstance(memory, pkilint_fast._DecodeMemory)
    stock_trees: dict[tuple[str, Any], Any] = {}  # built once each, never given the fast walk

    def stock_tree(suite: str, variant: Any) -> Any:
        if (suite, variant) not in stock_trees:
            stock_trees[suite, variant] = lint._stock_validator(suite, variant)
        return stock_trees[suite, variant]

    def stock(der: bytes, kind: str) -> list[str] | str:
        with monkeypatch.context() as patch:
            patch.setattr(document, "decode_der", memory.decode)
            return _outcome(der, kind, stock_tree)

    errors = 0
    for set_name, name, key in CASES:
        _, cert = issue(cas, set_name, name, key)
        der = cert.public_bytes(serialization.Encoding.DER)
        for kind in lint.LINT_KINDS:
            fast = _outcome(der, kind, lint._validator)
            assert fast == stock(der, kind), (set_name, name, kind)
            errors += sum(" ERROR " in f" {f}" for f in fast) if isinstance(fast, list) else 0
    assert errors > 20  # the comparison covered findings, not only clean certificates
    assert len(memory.kept) > 10  # and decoded values came from the memory
