"""The X.509 issuance core: good requests chain and lint clean, bad ones get their exact code.

The core's rules are exercised with the CA/B Forum aligned set (`modern`), whose profiles use
most of them; tests/test_profile_sets.py checks both shipped sets against what they claim."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import AttributeOID, ExtendedKeyUsageOID, ExtensionOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from x509_helpers import (
    TestCA,
    make_ca,
    make_csr,
    make_spkac,
    openssl_verify,
    rsa_key,
    spkac_der,
)

from signer.errors import ErrorCode, SignerError
from signer.pki.lint import lint_certificate, lint_findings
from signer.pki.profiles import Profile, ProfileSet, load_profiles
from signer.pki.x509_signing import (
    MAX_CSR_BYTES,
    CertificatePlan,
    IssuanceRequest,
    build_certificate,
    new_serial,
    plan_certificate,
)

NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)
CPS_OID = "1.3.6.1.4.1.18506.4.4"
CRL = {
    "class1": "http://crl.cacert.org/revoke.crl",
    "class3": "http://crl.cacert.org/class3-revoke.crl",
}

# A good (subject, sans) for each legacy profile; the *-class1 variants reuse them.
GOOD: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]] | None]] = {
    "client": (
        [("CN", "alice@example.org"), ("emailAddress", "alice@example.org")],
        [("email", "alice@example.org"), ("email", "alice.example@example.net")],
    ),
    "client-org": (
        [
            ("C", "GB"),
            ("O", "Example Ltd"),
            ("organizationIdentifier", "NTRGB-12345678"),
            ("CN", "Example Ltd"),
            ("emailAddress", "info@example.co.uk"),
        ],
        [("email", "info@example.co.uk")],
    ),
    "client-codesign": (
        [("CN", "Alice Example"), ("emailAddress", "alice@example.org")],
        [("email", "alice@example.org")],
    ),
    "server": (
        [("CN", "www.example.org")],
        [("dns", "www.example.org"), ("dns", "example.org"), ("dns", "*.static.example.org")],
    ),
    "server-org": (
        [
            ("C", "AU"),
            ("ST", "NSW"),
            ("L", "Sydney"),
            ("O", "Example Pty Ltd"),
            ("CN", "example.com"),
        ],
        [("dns", "example.com"), ("dns", "www.example.com")],
    ),
    "ocsp": ([("C", "AU"), ("O", "CAcert Inc."), ("CN", "CAcert OCSP Responder")], None),
    "timestamp": ([("C", "AU"), ("O", "CAcert Inc."), ("CN", "CAcert Timestamping")], None),
    "subca": ([("C", "AU"), ("O", "CAcert Inc."), ("CN", "CAcert Org CA")], None),
}


def good_for(profile_name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]] | None]:
    return GOOD[profile_name.removesuffix("-class1")]


@dataclass(frozen=True)
class Env:
    profiles: ProfileSet  # modern
    cacert: ProfileSet
    root: TestCA
    sub: TestCA
    rsa: Any
    p256: Any
    rsa_csr: bytes
    p256_csr: bytes

    def issuer(self, profile: Profile) -> TestCA:
        return {"class1": self.root, "class3": self.sub}[profile.issuer]

    def profile(self, name: str) -> Profile:
        """Any shipped profile, as the operator may use it (the channel is tested apart)."""
        return self.profiles.get(name, "operator")

    def plan(self, request: IssuanceRequest, now: dt.datetime = NOW) -> CertificatePlan:
        profile = self.profile(request.profile)
        return plan_certificate(request, profile, self.issuer(profile).cert, now, "operator")

    def issue(self, request: IssuanceRequest, now: dt.datetime = NOW) -> x509.Certificate:
        plan = self.plan(request, now)
        issuer = self.issuer(self.profile(request.profile))
        der = build_certificate(plan, new_serial(), issuer.key, issuer.cert)
        return x509.load_der_x509_certificate(der)

    def good(self, profile: str, csr: bytes | None = None, **changes: Any) -> IssuanceRequest:
        subject, sans = good_for(profile)
        request = IssuanceRequest(
            csr=self.rsa_csr if csr is None else csr, profile=profile, subject=subject, sans=sans
        )
        return dataclasses.replace(request, **changes)


@pytest.fixture(scope="module")
def env() -> Env:
    # class1 root on P-256 (ECDSA issuer path), class3 subordinate on RSA (PKCS#1 v1.5 path).
    root = make_ca("Test CAcert Root", ec.generate_private_key(ec.SECP256R1()))
    sub = make_ca("Test CAcert Class 3", rsa_key(2048), parent=root)
    rsa = rsa_key(2048)
    p256 = ec.generate_private_key(ec.SECP256R1())
    return Env(
        profiles=load_profiles("modern"),
        cacert=load_profiles("cacert"),
        root=root,
        sub=sub,
        rsa=rsa,
        p256=p256,
        rsa_csr=make_csr(rsa, [("CN", "ignored")]),
        p256_csr=make_csr(p256, [("CN", "ignored")], pem=True),
    )


def ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_oid(oid)


def has_ext(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bool:
    try:
        cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return False
    return True


def san_pairs(cert: x509.Certificate) -> list[tuple[str, str]]:
    try:
        sans = ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        return []
    out = []
    for name in sans:
        if isinstance(name, x509.DNSName):
            out.append(("dns", name.value))
        elif isinstance(name, x509.RFC822Name):
            out.append(("email", name.value))
        elif isinstance(name, x509.IPAddress):
            out.append(("ip", str(name.value)))
        elif isinstance(name, x509.UniformResourceIdentifier):
            out.append(("uri", name.value))
        elif isinstance(name, x509.OtherName):
            assert name.type_id.dotted_string == "1.3.6.1.5.5.7.8.5"
            assert name.value[0] == 0x0C  # UTF8String
            out.append(("xmpp", name.value[2:].decode("utf-8")))
    return out


def subject_pairs(cert: x509.Certificate) -> list[tuple[str, str]]:
    short = {
        NameOID.COMMON_NAME: "CN",
        NameOID.ORGANIZATION_NAME: "O",
        NameOID.COUNTRY_NAME: "C",
        NameOID.STATE_OR_PROVINCE_NAME: "ST",
        NameOID.LOCALITY_NAME: "L",
        NameOID.EMAIL_ADDRESS: "emailAddress",
        NameOID.ORGANIZATION_IDENTIFIER: "organizationIdentifier",
        NameOID.ORGANIZATIONAL_UNIT_NAME: "OU",
    }
    return [(short[a.oid], str(a.value)) for a in cert.subject]


def check_clean(tmp_path: Path, env: Env, cert: x509.Certificate, kind: str) -> None:
    der = cert.public_bytes(serialization.Encoding.DER)
    code, output = openssl_verify(tmp_path, env.root, env.sub, der)
    assert code == 0, output
    assert lint_certificate(der, kind) == []


# --------------------------------------------------------------------------- good requests

SHIPPED = sorted(load_profiles("modern").names())


@pytest.mark.parametrize("key_type", ["rsa2048", "p256"])
@pytest.mark.parametrize("name", SHIPPED)
def test_every_profile_issues_a_verifiable_lint_clean_certificate(
    tmp_path: Path, env: Env, name: str, key_type: str
) -> None:
    profile = env.profile(name)
    csr = env.rsa_csr if key_type == "rsa2048" else env.p256_csr
    request = env.good(name, csr=csr)
    cert = env.issue(request)
    check_clean(tmp_path, env, cert, profile.kind)

    issuer = env.issuer(profile).cert
    assert cert.issuer == issuer.subject
    assert cert.public_key() == (env.rsa if key_type == "rsa2048" else env.p256).public_key()
    subject, sans = good_for(name)
    if profile.subject.canonical_order:
        assert sorted(subject_pairs(cert)) == sorted(subject)
    else:
        assert subject_pairs(cert) == subject
    assert san_pairs(cert) == (sans or [])
    assert 2**64 <= cert.serial_number < 2**159
    assert cert.not_valid_before_utc == NOW - dt.timedelta(seconds=60)
    period = cert.not_valid_after_utc - cert.not_valid_before_utc + dt.timedelta(seconds=1)
    assert period == dt.timedelta(days=profile.validity.default_days)
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)

    bc = ext(cert, ExtensionOID.BASIC_CONSTRAINTS)
    assert bc.critical and bc.value.ca == profile.basic_constraints.ca
    ku = ext(cert, ExtensionOID.KEY_USAGE)
    assert ku.critical and ku.value.digital_signature
    if profile.basic_constraints.ca:
        assert ku.value.key_cert_sign and bc.value.path_length == 0
    elif key_type == "rsa2048":
        assert not ku.value.key_agreement
    else:
        assert not ku.value.key_encipherment
    ski = ext(cert, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    aki = ext(cert, ExtensionOID.AUTHORITY_KEY_IDENTIFIER).value
    issuer_ski = ext(issuer, ExtensionOID.SUBJECT_KEY_IDENTIFIER).value
    assert aki.key_identifier == issuer_ski.digest and aki.authority_cert_issuer is None

    if profile.kind == "ocsp":
        assert has_ext(cert, x509.OCSPNoCheck.oid)
        assert not has_ext(cert, ExtensionOID.CRL_DISTRIBUTION_POINTS)
        assert not has_ext(cert, ExtensionOID.AUTHORITY_INFORMATION_ACCESS)
        assert not has_ext(cert, ExtensionOID.CERTIFICATE_POLICIES)
        assert list(ext(cert, ExtensionOID.EXTENDED_KEY_USAGE).value) == [
            ExtendedKeyUsageOID.OCSP_SIGNING
        ]
    else:
        crldp = ext(cert, ExtensionOID.CRL_DISTRIBUTION_POINTS).value
        assert [dp.full_name[0].value for dp in crldp] == [CRL[profile.issuer]]
        aia = ext(cert, ExtensionOID.AUTHORITY_INFORMATION_ACCESS).value
        assert "http://ocsp.cacert.org/" in [d.access_location.value for d in aia]
        policies = [
            p.policy_identifier.dotted_string
            for p in ext(cert, ExtensionOID.CERTIFICATE_POLICIES).value
        ]
        assert policies[-1] == CPS_OID
    if name.startswith("timestamp"):
        eku = ext(cert, ExtensionOID.EXTENDED_KEY_USAGE)
        assert eku.critical and list(eku.value) == [ExtendedKeyUsageOID.TIME_STAMPING]
    if name.startswith("server"):
        eku = list(ext(cert, ExtensionOID.EXTENDED_KEY_USAGE).value)
        assert eku == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    if name.startswith("client"):
        eku = list(ext(cert, ExtensionOID.EXTENDED_KEY_USAGE).value)
        assert eku[:2] == [ExtendedKeyUsageOID.EMAIL_PROTECTION, ExtendedKeyUsageOID.CLIENT_AUTH]
        assert (ExtendedKeyUsageOID.CODE_SIGNING in eku) == ("codesign" in name)


@pytest.mark.parametrize("digest", ["sha256", "sha384", "sha512"])
def test_rsa_issuer_signs_with_the_requested_digest(tmp_path: Path, env: Env, digest: str) -> None:
    cert = env.issue(env.good("client", digest=digest))
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == digest
    check_clean(tmp_path, env, cert, "smime")


def test_ec_issuer_signs_with_its_curves_digest(tmp_path: Path, env: Env) -> None:
    cert = env.issue(env.good("client-class1", digest="sha256"))  # P-256 root
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    p384 = make_ca("P-384 CA", ec.generate_private_key(ec.SECP384R1()), parent=env.root)
    profile = env.profiles.get("client")
    plan = plan_certificate(env.good("client", digest="sha384"), profile, p384.cert, NOW)
    der = build_certificate(plan, new_serial(), p384.key, p384.cert)
    assert isinstance(x509.load_der_x509_certificate(der).signature_hash_algorithm, hashes.SHA384)
    assert lint_certificate(der, "smime") == []
    with pytest.raises(SignerError) as info:
        plan_certificate(env.good("client", digest="sha256"), profile, p384.cert, NOW)
    assert info.value.code is ErrorCode.BAD_DIGEST


def test_spkac_from_openssl_issues(tmp_path: Path, env: Env) -> None:
    spkac = make_spkac(env.rsa, tmp_path, challenge="x")
    assert spkac.startswith(b"SPKAC=")
    cert = env.issue(env.good("client", csr=spkac))
    assert cert.public_key() == env.rsa.public_key()
    check_clean(tmp_path, env, cert, "smime")
    # The same structure as raw DER, and with CRLF line ends.
    assert env.issue(env.good("client", csr=spkac_der(spkac))).public_key() == env.rsa.public_key()
    assert env.issue(env.good("client", csr=spkac.replace(b"\n", b"\r\n"))).serial_number


def test_the_expected_challenge_is_checked_when_the_request_carries_it(
    tmp_path: Path, env: Env
) -> None:
    """Issue 11, item 5: the SPKAC's challenge was ignored. When the request names the challenge
    the web application handed out (keygen's `challenge`, PKCS#10's challengePassword), the
    proof of possession must carry exactly it; without one, nothing is compared."""
    spkac = make_spkac(env.rsa, tmp_path, challenge="f00dfeed", digest="sha256")
    assert env.issue(env.good("client", csr=spkac, challenge="f00dfeed")).serial_number
    assert env.issue(env.good("client", csr=spkac)).serial_number  # not asked: not compared
    for wrong in ("f00dfeeD", "f00dfee", "", "x" * 100):
        with pytest.raises(SignerError) as info:
            env.plan(env.good("client", csr=spkac, challenge=wrong))
        assert info.value.code is ErrorCode.BAD_CHALLENGE, wrong
        assert "f00dfeed" not in info.value.message  # the expected secret is never echoed
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])
    )
    with_password = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, b"s3cret")
    csr = with_password.sign(env.rsa, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    assert env.issue(env.good("client", csr=csr, challenge="s3cret")).serial_number
    for blob, challenge in ((csr, "other"), (env.rsa_csr, "s3cret")):
        with pytest.raises(SignerError) as info:
            env.plan(env.good("client", csr=blob, challenge=challenge))
        assert info.value.code is ErrorCode.BAD_CHALLENGE


def test_spkac_with_dn_lines_gives_the_subject(tmp_path: Path, env: Env) -> None:
    extra = "emailAddress=bob@example.org\nchallenge=ignored\n"
    spkac = make_spkac(env.p256, tmp_path, extra=extra, digest="sha256")
    request = env.good("client", csr=spkac, subject=None, sans=[("email", "bob@example.org")])
    cert = env.issue(request)
    assert subject_pairs(cert) == [("emailAddress", "bob@example.org")]
    check_clean(tmp_path, env, cert, "smime")


def test_spkac_as_the_web_application_writes_it(tmp_path: Path, env: Env) -> None:
    """account.php's keygen file: numbered e-mail lines, OpenSSL's long names, spaces around
    `=`, UTF-8, `SPKAC = ...` last without a newline, and a first byte "0" (0x30, as DER)."""
    blob = make_spkac(env.rsa, tmp_path, digest="sha256").decode().split("=", 1)[1].strip()
    text = (
        "0.emailAddress = bob@example.org\n1.emailAddress = bob@example.net\n"
        f"commonName = Jürgen Example\norganizationalUnitName = IT\nSPKAC = {blob}"
    ).encode()
    profile = env.cacert.get("client-codesign")
    sans = [("email", "bob@example.org"), ("email", "bob@example.net")]
    request = IssuanceRequest(text, "client-codesign", None, sans)
    plan = plan_certificate(request, profile, env.sub.cert, NOW)
    assert plan.csr_format == "spkac"
    assert [a.value for a in plan.subject] == [
        "IT", "Jürgen Example", "bob@example.org", "bob@example.net"
    ]  # fmt: skip


def test_tampered_spkac_fails_its_signature(tmp_path: Path, env: Env) -> None:
    der = bytearray(spkac_der(make_spkac(env.rsa, tmp_path, challenge="abc")))
    der[der.index(b"abc")] ^= 0x01
    with pytest.raises(SignerError) as info:
        env.plan(env.good("client", csr=bytes(der)))
    assert info.value.code is ErrorCode.BAD_CSR_SIGNATURE


def test_request_subject_and_sans_override_the_csr(tmp_path: Path, env: Env) -> None:
    csr = make_csr(
        env.p256,
        [("CN", "evil.example.com"), ("O", "Evil Corp")],
        sans=[x509.DNSName("evil.example.com"), x509.RFC822Name("evil@example.com")],
    )
    cert = env.issue(env.good("server", csr=csr))
    assert subject_pairs(cert) == [("CN", "www.example.org")]
    assert "evil.example.com" not in str(san_pairs(cert))
    check_clean(tmp_path, env, cert, "tls")


def test_csr_subject_used_when_request_gives_none(env: Env) -> None:
    csr = make_csr(env.rsa, [("CN", "www.example.org")])
    cert = env.issue(env.good("server", csr=csr, subject=None))
    assert subject_pairs(cert) == [("CN", "www.example.org")]
    forbidden = make_csr(env.rsa, [("CN", "www.example.org"), ("O", "Evil")])
    with pytest.raises(SignerError) as info:
        env.plan(env.good("server", csr=forbidden, subject=None))
    assert info.value.code is ErrorCode.FORBIDDEN_SUBJECT_ATTRIBUTE


def custom(env: Env, name: str, **changes: Any) -> tuple[Profile, TestCA]:
    """A shipped profile with some fields replaced (validated like a loaded one)."""
    base = env.profile(name).model_dump(by_alias=True)
    for path, value in changes.items():
        target = base
        *parents, last = path.split("__")
        for part in parents:
            target = target[part]
        target[last] = value
    profile = Profile.model_validate(base, strict=False)
    return profile, env.issuer(profile)


def test_drop_unlisted_drops_instead_of_refusing(env: Env) -> None:
    profile, issuer = custom(env, "timestamp", subject__drop_unlisted=True)
    request = env.good(
        "timestamp", subject=[("OU", "x"), ("CN", "TSA"), ("emailAddress", "a@b.org")]
    )
    plan = plan_certificate(request, profile, issuer.cert, NOW, "operator")
    assert [a.value for a in plan.subject] == ["x", "TSA"]  # OU kept, emailAddress dropped
    csr = make_csr(env.rsa, [("CN", "TSA"), ("SN", "Surname")])
    request = env.good("timestamp", csr=csr, subject=None)
    plan = plan_certificate(request, profile, issuer.cert, NOW, "operator")
    assert [a.value for a in plan.subject] == ["TSA"]
    with pytest.raises(SignerError) as info:  # unknown names stay errors, even when dropping
        request = env.good("timestamp", subject=[("XX", "y")])
        plan_certificate(request, profile, issuer.cert, NOW, "operator")
    assert info.value.code is ErrorCode.BAD_SUBJECT


def test_copy_csr_sans_only_when_the_profile_says_so(env: Env) -> None:
    csr = make_csr(
        env.rsa,
        [("CN", "www.example.org")],
        sans=[x509.DNSName("www.example.org"), x509.DNSName("Example.ORG")],
    )
    request = env.good("server", csr=csr, sans=None)
    with pytest.raises(SignerError) as info:  # shipped server: SANs come from the WebDB only
        env.plan(request)
    assert info.value.code is ErrorCode.BAD_SAN
    profile, issuer = custom(env, "server", sans__copy_csr_sans=True)
    plan = plan_certificate(request, profile, issuer.cert, NOW)
    assert plan.sans == (("dns", "www.example.org"), ("dns", "example.org"))
    bad = make_csr(env.rsa, [("CN", "x")], sans=[x509.DirectoryName(x509.Name([]))])
    with pytest.raises(SignerError) as info:
        plan_certificate(env.good("server", csr=bad, sans=None), profile, issuer.cert, NOW)
    assert info.value.code is ErrorCode.FORBIDDEN_SAN_TYPE


def test_empty_subject_makes_the_san_critical(tmp_path: Path, env: Env) -> None:
    cert = env.issue(env.good("server", subject=[]))
    assert list(cert.subject) == []
    assert ext(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).critical
    check_clean(tmp_path, env, cert, "tls")
    with pytest.raises(SignerError) as info:
        env.plan(env.good("client", subject=[]))
    assert info.value.code is ErrorCode.BAD_SUBJECT


def test_tls_subject_is_put_in_br_order_and_cn_in_san_form(tmp_path: Path, env: Env) -> None:
    subject = [("CN", "WWW.Example.COM"), ("O", "Example Pty Ltd"), ("L", "Sydney"), ("C", "AU")]
    sans = [("dns", "Example.com"), ("dns", "www.EXAMPLE.com")]
    cert = env.issue(env.good("server-org", subject=subject, sans=sans))
    assert subject_pairs(cert) == [
        ("C", "AU"),
        ("L", "Sydney"),
        ("O", "Example Pty Ltd"),
        ("CN", "www.example.com"),
    ]
    assert san_pairs(cert) == [("dns", "example.com"), ("dns", "www.example.com")]
    check_clean(tmp_path, env, cert, "tls")


def test_default_and_explicit_validity(env: Env) -> None:
    plan = env.plan(env.good("client", validity_days=30))
    assert plan.not_after - plan.not_before == dt.timedelta(days=30, seconds=-1)
    later = dt.datetime(2027, 6, 1, tzinfo=dt.UTC)
    plan = env.plan(env.good("server"), now=later)  # the CA/B schedule caps the default
    assert plan.not_after - plan.not_before == dt.timedelta(days=99, seconds=-1)
    with pytest.raises(SignerError) as info:
        env.plan(env.good("server", validity_days=150), now=later)
    assert info.value.code is ErrorCode.VALIDITY_TOO_LONG


def test_certificate_never_outlives_its_issuer(env: Env) -> None:
    short = make_ca("Short-lived", rsa_key(2048), parent=env.root, days=100)
    profile = env.profiles.get("client")
    with pytest.raises(SignerError) as info:
        plan_certificate(env.good("client", validity_days=200), profile, short.cert, NOW)
    assert info.value.code is ErrorCode.VALIDITY_TOO_LONG


def test_ca_profile_needs_an_issuer_that_may_issue_cas(env: Env) -> None:
    leaf_ca = make_ca("Path 0", rsa_key(2048), parent=env.root, path_length=0)
    with pytest.raises(SignerError) as info:
        plan_certificate(env.good("subca"), env.profile("subca"), leaf_ca.cert, NOW, "operator")
    assert info.value.code is ErrorCode.UNKNOWN_ISSUER


def test_ip_uri_and_ed25519_with_a_custom_profile(tmp_path: Path, env: Env) -> None:
    profile, issuer = custom(
        env,
        "server",
        kind="other",
        policies=[{"oid": CPS_OID}],
        subject__cn_sources=[],
        sans__ignore=[],
        sans__allowed={
            "dns": {"max_count": 5},
            "ip": {"max_count": 5},
            "uri": {"max_count": 5},
            "xmpp": {"max_count": 5},
        },
        keys__ed25519=True,
        key_usage__eddsa=["digitalSignature"],
    )
    edkey = ed25519.Ed25519PrivateKey.generate()
    sans = [
        ("dns", "example.org"),
        ("ip", "2606:4700:4700:0::1111"),
        ("ip", "8.8.8.8"),
        ("uri", "https://example.org/x?y=1"),
        ("xmpp", "jürgen@example.org"),
    ]
    request = IssuanceRequest(
        csr=make_csr(edkey, [("CN", "x")]),
        profile=profile.name,
        subject=[("CN", "8.8.8.8")],
        sans=sans,
    )
    plan = plan_certificate(request, profile, issuer.cert, NOW)
    assert plan.key_type == "eddsa"
    cert = x509.load_der_x509_certificate(
        build_certificate(plan, new_serial(), issuer.key, issuer.cert)
    )
    issued = san_pairs(cert)
    assert ("ip", "2606:4700:4700::1111") in issued and ("xmpp", "jürgen@example.org") in issued
    check_clean(tmp_path, env, cert, "other")
    for bad in [
        ("ip", "10.0.0.1"),
        ("ip", "fe80::1%eth0"),
        ("uri", "no scheme"),
        ("uri", "http://"),
    ]:
        with pytest.raises(SignerError) as info:
            plan_certificate(dataclasses.replace(request, sans=[bad]), profile, issuer.cert, NOW)
        assert info.value.code is ErrorCode.BAD_SAN, bad


def test_a_cn_that_is_no_address_is_dropped_or_refused_as_the_profile_says(env: Env) -> None:
    """Mailbox-validated S/MIME (modern client): the member's name cannot be the CN, so the CN
    is left out; a profile with unmatched_cn: refuse refuses it."""
    subject = [("CN", "Alice Example"), ("emailAddress", "alice@example.org")]
    plan = env.plan(env.good("client", subject=subject))
    assert [(a.oid, a.value) for a in plan.subject] == [
        (NameOID.EMAIL_ADDRESS, "alice@example.org")
    ]
    profile, issuer = custom(env, "client", subject__unmatched_cn="refuse")
    with pytest.raises(SignerError) as info:
        plan_certificate(env.good("client", subject=subject), profile, issuer.cert, NOW)
    assert info.value.code is ErrorCode.BAD_SUBJECT


def test_ignored_names_are_left_out(tmp_path: Path, env: Env) -> None:
    """The TLS BRs allow neither XmppAddr SANs nor an OU, which every organisation server
    request of the web application may carry: the modern profiles leave them out."""
    sans = [("dns", "example.com"), ("xmpp", "example.com"), ("dns", "www.example.com")]
    subject = [("OU", "IT"), *good_for("server-org")[0]]
    cert = env.issue(env.good("server-org", subject=subject, sans=sans))
    assert san_pairs(cert) == [("dns", "example.com"), ("dns", "www.example.com")]
    assert ("OU", "IT") not in subject_pairs(cert)
    check_clean(tmp_path, env, cert, "tls")


def test_wildcards_only_where_the_profile_allows_them(env: Env) -> None:
    profile, issuer = custom(env, "server", sans__allowed={"dns": {"max_count": 5}})
    request = env.good("server", subject=[], sans=[("dns", "*.example.org")])
    with pytest.raises(SignerError) as info:
        plan_certificate(request, profile, issuer.cert, NOW)
    assert info.value.code is ErrorCode.BAD_SAN


@pytest.mark.parametrize(
    "wildcard",
    [
        "*.co.uk",
        "*.CO.UK",
        "*.github.io",
        "*.kawasaki.jp",
        "*.foo.ck",
        "*.xn--55qx5d.cn",
        "*.com.au",
    ],
)
def test_no_wildcard_directly_under_a_public_suffix(env: Env, wildcard: str) -> None:
    """Issue 11, item 4: `*.co.uk` was issued. A wildcard is refused when what it stands under is
    a public suffix of the Public Suffix List (ICANN and private sections, wildcard rules)."""
    request = env.good("server", subject=[], sans=[("dns", wildcard)])
    with pytest.raises(SignerError) as info:
        env.plan(request)
    assert info.value.code is ErrorCode.BAD_SAN
    assert "public suffix" in info.value.message


def test_wildcards_under_a_registered_domain_are_issued(env: Env) -> None:
    for name in ("*.example.co.uk", "*.www.ck", "*.city.kawasaki.jp", "*.static.example.org"):
        cert = env.issue(env.good("server", subject=[], sans=[("dns", name)]))
        assert san_pairs(cert) == [("dns", name)]


def test_the_operator_updates_the_public_suffix_list_without_a_code_change(env: Env) -> None:
    from signer.pki.suffixes import PublicSuffixes

    newer = PublicSuffixes.parse("// a list the operator copied to the signer\norg\nexample.org\n")
    profile = env.profile("server")
    request = env.good("server", subject=[], sans=[("dns", "*.example.org")])
    env.plan(request)  # the shipped list: example.org is a registered domain
    with pytest.raises(SignerError) as info:
        plan_certificate(request, profile, env.issuer(profile).cert, NOW, "operator", newer)
    assert info.value.code is ErrorCode.BAD_SAN


def test_pem_variants_are_accepted(env: Env) -> None:
    pem = x509.load_der_x509_csr(env.rsa_csr).public_bytes(serialization.Encoding.PEM)
    legacy = pem.replace(b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
    with_text = b"Certificate Request:\n    Data: ...\n" + pem + b"\ntrailing words\n"
    for blob in (pem, legacy, with_text, bytearray(pem)):
        assert env.plan(env.good("client", csr=blob)).csr_format == "pkcs10"  # type: ignore[arg-type]


def test_issuer_must_be_a_ca(env: Env) -> None:
    leaf = env.issue(env.good("server"))
    with pytest.raises(SignerError) as info:
        plan_certificate(env.good("server"), env.profiles.get("server"), leaf, NOW)
    assert info.value.code is ErrorCode.UNKNOWN_ISSUER


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    blob=st.one_of(
        st.binary(max_size=600),
        st.binary(max_size=300).map(lambda b: b"\x30\x82" + b),
        st.binary(max_size=300).map(lambda b: b"SPKAC=" + base64.b64encode(b)),
    ),
    flips=st.lists(st.integers(min_value=0, max_value=10_000), max_size=4),
)
def test_hostile_csr_bytes_only_ever_raise_signer_errors(
    env: Env, blob: bytes, flips: list[int]
) -> None:
    """The old signer died on unexpected input; any byte string must end in a SignerError."""
    for data in (blob, _flipped(env.rsa_csr, flips), _flipped(env.p256_csr, flips)):
        with contextlib.suppress(SignerError):
            env.plan(env.good("client", csr=data))


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    subject=st.lists(
        st.tuples(st.sampled_from(["CN", "O", "C", "emailAddress", "X"]), st.text(max_size=70)),
        max_size=4,
    ),
    sans=st.lists(
        st.tuples(
            st.sampled_from(["dns", "email", "ip", "uri", "xmpp", "?"]), st.text(max_size=70)
        ),
        max_size=4,
    ),
    days=st.one_of(st.none(), st.integers(min_value=-10, max_value=2000)),
)
def test_hostile_names_only_ever_raise_signer_errors(
    env: Env, subject: list[tuple[str, str]], sans: list[tuple[str, str]], days: int | None
) -> None:
    for profiles, name in (
        (env.profiles, "client"),
        (env.profiles, "server"),
        (env.cacert, "server"),  # DNS and XmppAddr SANs
        (env.cacert, "client"),  # any CN
    ):
        request = env.good(name, subject=subject, sans=sans, validity_days=days)
        profile = profiles.get(name)
        issuer = env.issuer(profile)
        try:
            plan = plan_certificate(request, profile, issuer.cert, NOW)
        except SignerError:
            continue
        build_certificate(plan, new_serial(), issuer.key, issuer.cert)


def _flipped(data: bytes, positions: list[int]) -> bytes:
    out = bytearray(data)
    for position in positions:
        out[position % len(out)] ^= 1 << (position % 8)
    return bytes(out)


def test_build_refuses_bad_serials_and_foreign_issuers(env: Env) -> None:
    plan = env.plan(env.good("client"))
    for serial in (0, -1, 2**159, True):
        with pytest.raises(ValueError):
            build_certificate(plan, serial, env.sub.key, env.sub.cert)
    with pytest.raises(ValueError):
        build_certificate(plan, new_serial(), env.root.key, env.root.cert)
    der = build_certificate(plan, 2**159 - 1, env.sub.key, env.sub.cert)
    assert x509.load_der_x509_certificate(der).serial_number == 2**159 - 1


def test_plan_is_reusable_for_serial_retries(env: Env) -> None:
    plan = env.plan(env.good("server"))
    first = build_certificate(plan, new_serial(), env.sub.key, env.sub.cert)
    second = build_certificate(plan, new_serial(), env.sub.key, env.sub.cert)
    a, b = (x509.load_der_x509_certificate(d) for d in (first, second))
    assert a.serial_number != b.serial_number and a.tbs_certificate_bytes != b.tbs_certificate_bytes
    assert a.subject == b.subject and list(a.extensions) == list(b.extensions)


def test_lint_reports_errors_in_a_bad_certificate(env: Env) -> None:
    """pkilint must be able to fail: a TLS certificate without SAN, policies or AIA."""
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bad")]))
        .issuer_name(env.sub.cert.subject)
        .public_key(env.rsa.public_key())
        .serial_number(new_serial())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=900))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .sign(env.sub.key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    assert lint_certificate(der, "tls")
    assert lint_certificate(der, "smime")
    assert all("ERROR" in text or "FATAL" in text for text in lint_certificate(der, "tls"))
    with pytest.raises(ValueError):
        lint_findings(der, "web")


# --------------------------------------------------------------------------- bad requests


@dataclass(frozen=True)
class Bad:
    code: ErrorCode
    make: Callable[[Env], IssuanceRequest]
    profile_set: str = "modern"  # or "cacert": a rule only CAcert's set uses


def _flip_signature(der: bytes) -> bytes:
    broken = bytearray(der)
    broken[-5] ^= 0xFF
    return bytes(broken)


def _keyed(profile: str, key: Callable[[], Any]) -> Callable[[Env], IssuanceRequest]:
    return lambda e: e.good(profile, csr=make_csr(key(), [("CN", "x")]))


def _dsa_key() -> Any:
    """A DSA key on purpose (a request the signer must refuse): its deprecation is not news."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CryptographyDeprecationWarning)
        return dsa.generate_private_key(1024)


def _rsa_csr_with_pem(e: Env) -> bytes:
    csr = x509.load_der_x509_csr(e.rsa_csr)
    return csr.public_bytes(serialization.Encoding.PEM)


BAD: dict[str, Bad] = {
    # CSR parsing and proof of possession
    "bad-csr-signature": Bad(
        ErrorCode.BAD_CSR_SIGNATURE, lambda e: e.good("client", csr=_flip_signature(e.rsa_csr))
    ),
    "bad-csr-signature-ec": Bad(
        ErrorCode.BAD_CSR_SIGNATURE,
        lambda e: e.good("server", csr=_flip_signature(make_csr(e.p256))),
    ),
    "malformed-der": Bad(ErrorCode.BAD_CSR, lambda e: e.good("client", csr=b"\x30\x03\x02\x01")),
    "truncated-csr": Bad(ErrorCode.BAD_CSR, lambda e: e.good("client", csr=e.rsa_csr[:-20])),
    "trailing-garbage-csr": Bad(
        ErrorCode.BAD_CSR, lambda e: e.good("client", csr=e.rsa_csr + b"xx")
    ),
    "malformed-pem-base64": Bad(
        ErrorCode.BAD_CSR,
        lambda e: e.good(
            "client",
            csr=b"-----BEGIN CERTIFICATE REQUEST-----\n!!notbase64!!\n"
            b"-----END CERTIFICATE REQUEST-----\n",
        ),
    ),
    "pem-without-end": Bad(
        ErrorCode.BAD_CSR, lambda e: e.good("client", csr=_rsa_csr_with_pem(e)[:-40])
    ),
    "pem-certificate-not-csr": Bad(
        ErrorCode.BAD_CSR,
        lambda e: e.good("client", csr=e.sub.cert.public_bytes(serialization.Encoding.PEM)),
    ),
    "garbage-bytes": Bad(ErrorCode.BAD_CSR, lambda e: e.good("client", csr=b"hello world")),
    "empty-csr": Bad(ErrorCode.BAD_CSR, lambda e: e.good("client", csr=b"")),
    "csr-not-bytes": Bad(ErrorCode.BAD_CSR, lambda e: e.good("client", csr="MIIB...")),  # type: ignore[arg-type]
    "garbage-spkac": Bad(ErrorCode.BAD_CSR, lambda e: e.good("client", csr=b"SPKAC=Zm9vYmFy\n")),
    "spkac-not-base64": Bad(ErrorCode.BAD_CSR, lambda e: e.good("client", csr=b"SPKAC=%%%\n")),
    "oversize-csr": Bad(
        ErrorCode.FIELD_TOO_LARGE,
        lambda e: e.good("client", csr=e.rsa_csr + b"\x00" * (MAX_CSR_BYTES + 1)),
    ),
    # keys
    "weak-rsa-1024": Bad(ErrorCode.WEAK_KEY, _keyed("client", lambda: rsa_key(1024))),
    "rsa-exponent-3": Bad(ErrorCode.WEAK_KEY, _keyed("server", lambda: rsa_key(2048, 3))),
    "dsa-key": Bad(ErrorCode.UNSUPPORTED_KEY, _keyed("client", _dsa_key)),
    "curve-secp256k1": Bad(
        ErrorCode.WEAK_KEY, _keyed("server", lambda: ec.generate_private_key(ec.SECP256K1()))
    ),
    "curve-brainpool": Bad(
        ErrorCode.WEAK_KEY,
        _keyed("client", lambda: ec.generate_private_key(ec.BrainpoolP256R1())),
    ),
    "ed25519-not-allowed": Bad(
        ErrorCode.UNSUPPORTED_KEY, _keyed("server", ed25519.Ed25519PrivateKey.generate)
    ),
    # subject
    "forbidden-attribute-client-ou": Bad(
        ErrorCode.FORBIDDEN_SUBJECT_ATTRIBUTE,
        lambda e: e.good("client", subject=[("OU", "Dept"), *good_for("client")[0]]),
    ),
    "forbidden-attribute-server-o": Bad(
        ErrorCode.FORBIDDEN_SUBJECT_ATTRIBUTE,
        lambda e: e.good("server", subject=[("O", "Example"), ("CN", "www.example.org")]),
    ),
    "over-length-cn": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good("timestamp", subject=[("CN", "x" * 65)]),
    ),
    "control-char-cn": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good("timestamp", subject=[("CN", "Time\x00stamp")]),
    ),
    "bidi-override-o": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good("timestamp", subject=[("O", "Evil\u202eCorp"), ("CN", "TSA")]),
    ),
    "html-entity-o": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good("timestamp", subject=[("O", "Smith &amp; Co"), ("CN", "TSA")]),
    ),
    "unknown-attribute-name": Bad(
        ErrorCode.BAD_SUBJECT, lambda e: e.good("timestamp", subject=[("FOO", "bar")])
    ),
    "empty-value": Bad(ErrorCode.BAD_SUBJECT, lambda e: e.good("timestamp", subject=[("CN", "")])),
    "placeholder-value": Bad(
        ErrorCode.BAD_SUBJECT, lambda e: e.good("timestamp", subject=[("O", "-"), ("CN", "TSA")])
    ),
    "bad-country": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good("timestamp", subject=[("C", "Germany"), ("CN", "TSA")]),
    ),
    "two-cns": Bad(
        ErrorCode.BAD_SUBJECT, lambda e: e.good("timestamp", subject=[("CN", "a1"), ("CN", "b2")])
    ),
    "missing-required-o": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good(
            "server-org", subject=[("C", "AU"), ("L", "Sydney"), ("CN", "example.com")]
        ),
    ),
    "missing-l-or-st": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good("server-org", subject=[("C", "AU"), ("O", "Ex"), ("CN", "example.com")]),
    ),
    "cn-not-among-sans-server": Bad(
        ErrorCode.BAD_SUBJECT, lambda e: e.good("server", subject=[("CN", "other.example.org")])
    ),
    "email-not-among-sans-client": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good("client", subject=[("emailAddress", "bob@example.org")]),
    ),
    "subject-not-a-list": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good("client", subject="/CN=alice@example.org"),  # type: ignore[arg-type]
    ),
    "subject-pair-wrong-shape": Bad(
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good("client", subject=[("CN",)]),  # type: ignore[list-item]
    ),
    # SANs
    "dns-san-in-client": Bad(
        ErrorCode.FORBIDDEN_SAN_TYPE,
        lambda e: e.good("client", sans=[("email", "alice@example.org"), ("dns", "example.org")]),
    ),
    "email-san-in-server": Bad(
        ErrorCode.FORBIDDEN_SAN_TYPE,
        lambda e: e.good(
            "server", sans=[("dns", "www.example.org"), ("email", "alice@example.org")]
        ),
    ),
    "ip-san-in-server": Bad(
        ErrorCode.FORBIDDEN_SAN_TYPE,
        lambda e: e.good("server", sans=[("dns", "www.example.org"), ("ip", "192.0.2.1")]),
    ),
    "xmpp-san-in-client": Bad(
        ErrorCode.FORBIDDEN_SAN_TYPE,
        lambda e: e.good("client", sans=[("email", "alice@example.org"), ("xmpp", "example.org")]),
        "cacert",
    ),
    "any-san-in-ocsp": Bad(
        ErrorCode.FORBIDDEN_SAN_TYPE, lambda e: e.good("ocsp", sans=[("dns", "ocsp.example.org")])
    ),
    "dns-underscore": Bad(
        ErrorCode.BAD_SAN,
        lambda e: e.good("server", subject=[], sans=[("dns", "exa_mple.example.org")]),
    ),
    "dns-leading-hyphen": Bad(
        ErrorCode.BAD_SAN, lambda e: e.good("server", subject=[], sans=[("dns", "-a.example.org")])
    ),
    "dns-single-label": Bad(
        ErrorCode.BAD_SAN, lambda e: e.good("server", subject=[], sans=[("dns", "localhost")])
    ),
    "dns-u-label": Bad(
        ErrorCode.BAD_SAN, lambda e: e.good("server", subject=[], sans=[("dns", "bücher.example")])
    ),
    "dns-trailing-dot": Bad(
        ErrorCode.BAD_SAN, lambda e: e.good("server", subject=[], sans=[("dns", "example.org.")])
    ),
    "wildcard-too-broad": Bad(
        ErrorCode.BAD_SAN, lambda e: e.good("server", subject=[], sans=[("dns", "*.org")])
    ),
    "wildcard-not-leftmost": Bad(
        ErrorCode.BAD_SAN, lambda e: e.good("server", subject=[], sans=[("dns", "a.*.example.org")])
    ),
    "bad-email": Bad(
        ErrorCode.BAD_SAN,
        lambda e: e.good(
            "client", subject=[("CN", "a@example.org")], sans=[("email", "a@@example.org")]
        ),
    ),
    "xmpp-with-resource": Bad(
        ErrorCode.BAD_SAN,
        lambda e: e.good("server", sans=[("xmpp", "example.org/res")]),
        "cacert",
    ),
    "sso-id-in-email-address": Bad(  # CPS 3.1.1's SSO id: not an address (RFC 5280)
        ErrorCode.BAD_SUBJECT,
        lambda e: e.good(
            "client",
            subject=[
                ("CN", "CAcert WoT User"),
                ("emailAddress", "0123456789abcdef" * 2 + "01234567"),
            ],
            sans=[("email", "a@example.org")],
        ),
        "cacert",
    ),
    "unknown-san-type": Bad(
        ErrorCode.BAD_SAN, lambda e: e.good("server", sans=[("dirname", "CN=x")])
    ),
    "sans-not-a-list": Bad(
        ErrorCode.BAD_SAN,
        lambda e: e.good("server", sans="DNS:www.example.org"),  # type: ignore[arg-type]
    ),
    "san-value-not-str": Bad(
        ErrorCode.BAD_SAN,
        lambda e: e.good("server", sans=[("dns", 42)]),  # type: ignore[list-item]
    ),
    "no-sans-for-server": Bad(ErrorCode.BAD_SAN, lambda e: e.good("server", sans=[])),
    "too-many-sans": Bad(
        ErrorCode.FIELD_TOO_LARGE,
        lambda e: e.good(
            "server", subject=[], sans=[("dns", f"h{i}.example.org") for i in range(101)]
        ),
    ),
    "too-many-email-sans": Bad(
        ErrorCode.FIELD_TOO_LARGE,
        lambda e: e.good(
            "client",
            subject=[("CN", "u1@example.org")],
            sans=[("email", f"u{i}@example.org") for i in range(11)],
        ),
    ),
    "sans-beyond-hard-cap": Bad(
        ErrorCode.FIELD_TOO_LARGE,
        lambda e: e.good("server", sans=[("dns", "a.example.org")] * 5000),
    ),
    # profile, validity, digest
    "validity-above-max": Bad(
        ErrorCode.VALIDITY_TOO_LONG, lambda e: e.good("client", validity_days=731)
    ),
    "validity-zero": Bad(ErrorCode.BAD_VALIDITY, lambda e: e.good("client", validity_days=0)),
    "validity-negative": Bad(ErrorCode.BAD_VALIDITY, lambda e: e.good("client", validity_days=-5)),
    "validity-string": Bad(
        ErrorCode.BAD_VALIDITY,
        lambda e: e.good("client", validity_days="30"),  # type: ignore[arg-type]
    ),
    "validity-bool": Bad(ErrorCode.BAD_VALIDITY, lambda e: e.good("client", validity_days=True)),
    "digest-md5": Bad(ErrorCode.BAD_DIGEST, lambda e: e.good("client", digest="md5")),
    "digest-sha1": Bad(ErrorCode.BAD_DIGEST, lambda e: e.good("client", digest="SHA-1")),
    "digest-unknown": Bad(ErrorCode.BAD_DIGEST, lambda e: e.good("client", digest="sha3-256")),
    "digest-unpaired-with-p256-issuer": Bad(
        ErrorCode.BAD_DIGEST, lambda e: e.good("client-class1", digest="sha512")
    ),
    "curve-p521-in-smime": Bad(
        ErrorCode.WEAK_KEY, _keyed("client", lambda: ec.generate_private_key(ec.SECP521R1()))
    ),
    "digest-not-str": Bad(
        ErrorCode.BAD_DIGEST,
        lambda e: e.good("client", digest=None),  # type: ignore[arg-type]
    ),
    "profile-mismatch": Bad(
        ErrorCode.UNKNOWN_PROFILE, lambda e: dataclasses.replace(e.good("client"), profile="server")
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_request_gets_its_exact_code(env: Env, case: str) -> None:
    bad = BAD[case]
    request = bad.make(env)
    profile_name = "client" if case == "profile-mismatch" else request.profile
    profiles = env.cacert if bad.profile_set == "cacert" else env.profiles
    profile = profiles.get(profile_name, "operator")
    with pytest.raises(SignerError) as info:
        plan_certificate(request, profile, env.issuer(profile).cert, NOW, "operator")
    assert info.value.code is bad.code, info.value
    assert info.value.message and len(info.value.message) < 400
    info.value.to_wire()  # details must be serialisable data


def test_unknown_profile(env: Env) -> None:
    with pytest.raises(SignerError) as info:
        env.profiles.get("client-evil")
    assert info.value.code is ErrorCode.UNKNOWN_PROFILE


def test_bad_table_is_big_enough() -> None:
    assert len(BAD) >= 30
    assert {b.code for b in BAD.values()} >= {
        ErrorCode.BAD_CSR,
        ErrorCode.BAD_CSR_SIGNATURE,
        ErrorCode.UNSUPPORTED_KEY,
        ErrorCode.WEAK_KEY,
        ErrorCode.FORBIDDEN_SUBJECT_ATTRIBUTE,
        ErrorCode.BAD_SUBJECT,
        ErrorCode.FORBIDDEN_SAN_TYPE,
        ErrorCode.BAD_SAN,
        ErrorCode.VALIDITY_TOO_LONG,
        ErrorCode.BAD_VALIDITY,
        ErrorCode.BAD_DIGEST,
        ErrorCode.FIELD_TOO_LARGE,
        ErrorCode.UNKNOWN_PROFILE,
    }


def test_every_good_request_stays_good(env: Env) -> None:
    """Guards the bad table: each bad case differs from a request that does issue."""
    for name in ("client", "server", "server-org", "timestamp", "ocsp"):
        env.plan(env.good(name))
        env.plan(env.good(name, csr=env.p256_csr))


# --------------------------------------------------------------------------- serials, speed


def test_serials_are_random_positive_bounded_and_unique() -> None:
    serials = [new_serial() for _ in range(10_000)]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**159 for s in serials)
    assert sum(s >= 2**64 for s in serials) >= 9_990
    assert all(s.bit_length() == 128 for s in serials)  # the fixed marker bit
    low = [s & ((1 << 127) - 1) for s in serials]
    ones = sum(bin(s).count("1") for s in low) / len(low)
    assert 60 < ones < 67  # 127 random bits: about 63.5 set on average
