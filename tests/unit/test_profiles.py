"""Profiles: the shipped sets load and say what they should; bad files fail loudly and precisely."""

from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

from signer.errors import ErrorCode, SignerError
from signer.pki.profiles import (
    DEFAULT_PROFILES_PATH,
    PROFILE_SETS,
    ProfileLoadError,
    load_profiles,
    parse_profiles,
)

LEGACY_PROFILES = {  # CAcert's templates that the web application's rows can ask for
    "client",
    "client-org",
    "client-codesign",
    "server",
    "server-org",
    "ocsp",
    "timestamp",
    "subca",
}
OPERATOR_PROFILES = {"ocsp", "ocsp-class1", "timestamp", "subca"}
OCSP = {"cacert": "http://ocsp.cacert.org", "modern": "http://ocsp.cacert.org/"}
CRL = {
    "class1": "http://crl.cacert.org/revoke.crl",
    "class3": "http://crl.cacert.org/class3-revoke.crl",
}

MINIMAL: dict[str, Any] = {
    "version": 1,
    "issuers": {
        "class3": {
            "crl_urls": ["http://crl.example.org/c3.crl"],
            "ocsp_urls": ["http://ocsp.example.org/"],
        }
    },
    "profiles": {
        "p": {
            "kind": "tls",
            "issuer": "class3",
            "subject": {"attributes": {"CN": {}}},
            "sans": {"allowed": {"dns": {"max_count": 5}}, "required": True},
            "validity": {"default_days": 90, "max_days": 199},
            "digests": ["sha256"],
            "key_usage": {"rsa": ["digitalSignature"], "ec": ["digitalSignature"]},
            "extended_key_usage": {"usages": ["serverAuth"]},
        }
    },
}


def write(tmp_path: Path, data: Any, name: str = "profiles.yaml") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data), encoding="utf-8")
    return path


def mutated(edit: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    edit(data)
    return data


def load_error(tmp_path: Path, data: Any) -> ProfileLoadError:
    path = write(tmp_path, data)
    with pytest.raises(ProfileLoadError) as info:
        load_profiles(path)
    assert str(path) in str(info.value)
    return info.value


# --------------------------------------------------------------------------- shipped file


@pytest.mark.parametrize("set_name", sorted(PROFILE_SETS))
def test_shipped_profiles_load_with_the_legacy_set(set_name: str) -> None:
    profiles = load_profiles(set_name)
    assert set(profiles.names()) >= LEGACY_PROFILES
    assert {f"{name}-class1" for name in LEGACY_PROFILES - {"timestamp", "subca"}} <= set(
        profiles.names()
    )
    assert profiles.source == str(PROFILE_SETS[set_name])
    assert load_profiles().source == str(DEFAULT_PROFILES_PATH) == str(PROFILE_SETS["cacert"])
    assert {n for n in profiles.names() if profiles.get(n, "operator").channel == "operator"} == (
        OPERATOR_PROFILES
    )
    assert set(profiles.names("line")) == set(profiles.names()) - OPERATOR_PROFILES
    assert [p.name for p in profiles.offered()] == profiles.names("line")
    for name in profiles.names():
        profile = profiles.get(name, "operator")
        assert profile.name == name
        assert profile.issuer in ("class1", "class3")
        assert set(profile.digests) <= {"sha256", "sha384", "sha512"}
        assert profile.keys.rsa is not None and profile.keys.rsa.min_bits >= 2048
        assert "p256" in profile.keys.ec_curves
        assert profile.validity.default_days <= profile.validity.max_days
        if profile.ocsp_nocheck:
            assert profile.crl_urls == [] and profile.ocsp_urls == []
        else:
            assert profile.crl_urls == [CRL[profile.issuer]]
            assert profile.ocsp_urls == [OCSP[set_name]]
        cabf = [p.oid for p in profile.policies if p.oid.startswith("2.23.140.")]
        if set_name == "cacert" or profile.issuer == "class1":  # no BR claims from the root
            assert cabf == [] and profile.kind in ("other", "ca", "ocsp"), name


def test_shipped_modern_profiles_have_the_expected_shape() -> None:
    profiles = load_profiles("modern")
    server = profiles.get("server")
    assert server.kind == "tls"
    assert server.extended_key_usage is not None
    assert server.extended_key_usage.usages == ["serverAuth", "clientAuth"]
    assert server.key_usage.rsa == ["digitalSignature", "keyEncipherment"]
    assert server.key_usage.ec == ["digitalSignature"]
    assert server.sans.required and server.subject.cn_sources == ["san"]
    assert server.policies[0].oid == "2.23.140.1.2.1"
    assert server.sans.ignore == ["xmpp"] and profiles.get("server-org").subject.ignore == ["OU"]
    client = profiles.get("client")
    assert client.extended_key_usage is not None
    assert client.extended_key_usage.usages == ["emailProtection", "clientAuth"]
    assert set(client.sans.allowed) == {"email"} and client.subject.email_must_be_san
    assert client.key_usage.ec == ["digitalSignature", "keyAgreement"]
    codesign = profiles.get("client-codesign").extended_key_usage
    assert codesign is not None and "codeSigning" in codesign.usages
    ocsp = profiles.get("ocsp", "operator")
    assert ocsp.ocsp_nocheck and ocsp.extended_key_usage is not None
    assert ocsp.extended_key_usage.usages == ["OCSPSigning"]
    timestamp = profiles.get("timestamp", "operator").extended_key_usage
    assert timestamp is not None and timestamp.usages == ["timeStamping"] and timestamp.critical
    subca = profiles.get("subca", "operator")
    assert subca.basic_constraints.ca and subca.basic_constraints.path_length == 0
    assert subca.issuer == "class1"
    assert profiles.get("server-class1").issuer == "class1"
    assert profiles.get("server-class1").crl_urls == [CRL["class1"]]


def test_tls_validity_follows_the_cabf_schedule() -> None:
    validity = load_profiles("modern").get("server").validity
    at = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert validity.effective_max_days(at) == 199
    assert validity.effective_max_days(dt.datetime(2027, 3, 15, tzinfo=dt.UTC)) == 99
    assert validity.effective_max_days(dt.datetime(2030, 1, 1, tzinfo=dt.UTC)) == 46


def test_unknown_profile_is_a_signer_error() -> None:
    profiles = load_profiles()
    assert "server" in profiles and profiles["server"] is profiles.get("server")
    assert "nope" not in profiles and 7 not in profiles
    for name in ("nope", "", None, 7):
        with pytest.raises(SignerError) as info:
            profiles.get(name)
        assert info.value.code is ErrorCode.UNKNOWN_PROFILE


def test_shipped_cacert_profiles_have_cacerts_shape() -> None:
    """What CAcert issues (CPS 7.1.2, server.pl, client.pl), less what docs/profiles.md says."""
    profiles = load_profiles("cacert")
    eku = {name: profiles.get(name).extended_key_usage for name in profiles.names("line")}
    assert all(e is not None for e in eku.values())
    usages = {name: e.usages for name, e in eku.items() if e is not None}
    assert usages["client"] == ["emailProtection", "clientAuth", "msEFS"]
    assert usages["client-org"] == usages["client"]
    assert usages["client-codesign"] == [
        "emailProtection", "clientAuth", "codeSigning", "msCodeInd", "msCodeCom", "msEFS",
    ]  # fmt: skip
    assert usages["server"] == usages["server-org"] == ["clientAuth", "serverAuth"]
    for name in profiles.names("line"):
        profile = profiles.get(name)
        assert profile.kind == "other" and profile.channel == "line"
        assert profile.key_usage.rsa == ["digitalSignature", "keyEncipherment"]
        assert profile.key_usage.ec == ["digitalSignature", "keyAgreement"]
        assert [p.oid for p in profile.policies] == ["1.3.6.1.4.1.18506.4.4"]
        assert profile.ca_issuers_urls == []
        assert not profile.basic_constraints.ca and profile.basic_constraints.critical
    days = {n: (p.validity.default_days, p.validity.max_days) for n, p in profiles.profiles.items()}
    assert days["client-class1"] == days["server-class1"] == (180, 730)
    assert days["client"] == days["server"] == days["server-org"] == (730, 730)
    assert days["client-org"] == (365, 365)
    server = profiles.get("server")
    assert set(server.sans.allowed) == {"dns", "xmpp"} and server.sans.allowed["dns"].wildcard
    assert set(profiles.get("server-org").subject.attributes) == {"C", "ST", "L", "O", "OU", "CN"}
    org = profiles.get("client-org").subject.attributes
    assert set(org) == {"C", "ST", "L", "O", "OU", "CN", "emailAddress"}
    assert not any(rule.required for rule in org.values())  # no organizationIdentifier anywhere


@pytest.mark.parametrize(
    ("authority", "edit"),
    [
        (
            "CA",
            {
                "basic_constraints": {"ca": True},
                "key_usage": {"rsa": ["keyCertSign"], "ec": ["keyCertSign"]},
            },
        ),
        ("CA", {"kind": "ca"}),
        ("OCSP-signing", {"extended_key_usage": {"usages": ["OCSPSigning"]}}),
        ("OCSP-signing", {"extended_key_usage": {"usages": ["1.3.6.1.5.5.7.3.9"]}}),
        ("OCSP-signing", {"kind": "ocsp"}),
        ("time-stamping", {"extended_key_usage": {"usages": ["timeStamping"], "critical": True}}),
    ],
)
def test_authority_profiles_must_be_operator_only(
    tmp_path: Path, authority: str, edit: dict[str, Any]
) -> None:
    """The loader rule: a profile that makes a CA, an OCSP signer or a time-stamping authority
    cannot be asked for over the line."""
    error = load_error(tmp_path, mutated(lambda d: d["profiles"]["p"].update(edit)))
    assert any(
        path == "profiles.p" and f"issues {authority} certificates" in msg and "operator" in msg
        for path, msg in error.problems
    ), error.problems
    fixed = mutated(lambda d: d["profiles"]["p"].update(edit, channel="operator"))
    profiles = load_profiles(write(tmp_path, fixed))
    with pytest.raises(SignerError) as info:
        profiles.get("p")  # as the line asks
    assert info.value.code is ErrorCode.OPERATOR_ONLY and authority in info.value.message
    assert profiles.get("p", "operator").channel == "operator"
    assert profiles.names("line") == [] and profiles.offered() == []


def test_minimal_profile_loads_and_inherits_issuer_urls(tmp_path: Path) -> None:
    profiles = load_profiles(write(tmp_path, MINIMAL))
    profile = profiles.get("p")
    assert profile.crl_urls == ["http://crl.example.org/c3.crl"]
    assert profile.ocsp_urls == ["http://ocsp.example.org/"]
    assert profile.ca_issuers_urls == []
    assert profile.subject.attributes["CN"].max_length == 64  # RFC 5280 ub-common-name


def test_profile_urls_override_issuer_urls(tmp_path: Path) -> None:
    data = mutated(
        lambda d: d["profiles"]["p"].update(crl_urls=[], ocsp_urls=["http://o.example/"])
    )
    profile = load_profiles(write(tmp_path, data)).get("p")
    assert profile.crl_urls == [] and profile.ocsp_urls == ["http://o.example/"]


# --------------------------------------------------------------------------- bad files


def test_unknown_key_names_path_and_expected_keys(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, mutated(lambda d: d["profiles"]["p"]["subject"].update(atributes={}))
    )
    paths = dict(error.problems)
    assert "profiles.p.subject.atributes" in paths
    assert "unknown key" in paths["profiles.p.subject.atributes"]
    assert "attributes" in paths["profiles.p.subject.atributes"]  # the expected keys


def test_unknown_top_level_key(tmp_path: Path) -> None:
    error = load_error(tmp_path, mutated(lambda d: d.update(profile={})))
    assert any(path == "profile" and "unknown key" in msg for path, msg in error.problems)


def test_wrong_type_names_path_and_expectation(tmp_path: Path) -> None:
    error = load_error(
        tmp_path, mutated(lambda d: d["profiles"]["p"]["validity"].update(max_days="ten"))
    )
    path, message = error.problems[0]
    assert path == "profiles.p.validity.max_days"
    assert "integer" in message and "'ten'" in message
    assert "profiles.p.validity.max_days" in str(error)


@pytest.mark.parametrize("digest", ["md5", "sha1", "MD5"])
def test_broken_digest_is_refused(tmp_path: Path, digest: str) -> None:
    error = load_error(
        tmp_path, mutated(lambda d: d["profiles"]["p"].update(digests=["sha256", digest]))
    )
    path, message = error.problems[0]
    assert path == "profiles.p.digests"
    assert "never allowed" in message and "sha256, sha384, sha512" in message


def test_max_below_default_validity(tmp_path: Path) -> None:
    error = load_error(
        tmp_path,
        mutated(lambda d: d["profiles"]["p"]["validity"].update(default_days=400, max_days=365)),
    )
    path, message = error.problems[0]
    assert path == "profiles.p.validity"
    assert "default_days 400 exceeds max_days 365" in message


@pytest.mark.parametrize(
    ("edit", "path", "text"),
    [
        (lambda d: d["profiles"]["p"].update(issuer="class9"), "profiles.p.issuer", "class9"),
        (
            lambda d: d["profiles"]["p"]["key_usage"].update(rsa=["keyAgreement"]),
            "profiles.p.key_usage",
            "keyAgreement",
        ),
        (
            lambda d: d["profiles"]["p"]["key_usage"].pop("ec"),
            "profiles.p",
            "key_usage.ec is missing",
        ),
        (
            lambda d: d["profiles"]["p"]["subject"]["attributes"].update(XX={}),
            "profiles.p.subject.attributes",
            "unknown subject attribute 'XX'",
        ),
        (
            lambda d: d["profiles"]["p"]["subject"]["attributes"].update(CN={"max_length": 65}),
            "profiles.p.subject.attributes",
            "upper bound 64",
        ),
        (
            lambda d: d["profiles"]["p"]["sans"]["allowed"].update(x400={"max_count": 1}),
            "profiles.p.sans.allowed.x400",
            "dns",
        ),
        (lambda d: d["profiles"]["p"].update(kind="web"), "profiles.p.kind", "tls"),
        (
            lambda d: d["profiles"]["p"]["validity"].update(max_days=0),
            "profiles.p.validity.max_days",
            "1",
        ),
        (
            lambda d: d["profiles"]["p"].update(keys={"rsa": {"min_bits": 1024}}),
            "profiles.p.keys.rsa.min_bits",
            "2048",
        ),
        (
            lambda d: d["profiles"]["p"]["extended_key_usage"].update(usages=["serverAuthh"]),
            "profiles.p.extended_key_usage.usages",
            "serverAuthh",
        ),
        (
            lambda d: d["profiles"]["p"].update(basic_constraints={"ca": False, "path_length": 0}),
            "profiles.p.basic_constraints",
            "path_length",
        ),
        (
            lambda d: d["profiles"]["p"].update(crl_urls=["ldap://x"]),
            "profiles.p.crl_urls[0]",
            "pattern",
        ),
        (lambda d: d.update(version=2), "version", "1"),
        (
            lambda d: d["profiles"]["p"]["subject"].update(ignore=["CN"]),
            "profiles.p.subject",
            "ignore names allowed attributes: CN",
        ),
        (
            lambda d: d["profiles"]["p"]["subject"].update(ignore=["XX"]),
            "profiles.p.subject.ignore",
            "unknown subject attribute 'XX'",
        ),
        (
            lambda d: d["profiles"]["p"]["sans"].update(ignore=["dns"]),
            "profiles.p.sans",
            "ignore names allowed SAN types: dns",
        ),
        (lambda d: d["profiles"]["p"].update(channel="serial"), "profiles.p.channel", "line"),
    ],
)
def test_inconsistent_profiles_are_refused(tmp_path: Path, edit: Any, path: str, text: str) -> None:
    error = load_error(tmp_path, mutated(edit))
    assert any(p == path and text in m for p, m in error.problems), error.problems


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    text = yaml.safe_dump(MINIMAL) + "issuers: {}\n"
    error = load_error(tmp_path, text)
    assert "duplicate key 'issuers'" in str(error)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    error = load_error(tmp_path, "version: 1\nprofiles: [\n")
    assert "YAML syntax error" in str(error) and "line" in str(error)


def test_not_a_mapping(tmp_path: Path) -> None:
    error = load_error(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in str(error)


def test_missing_file() -> None:
    with pytest.raises(ProfileLoadError) as info:
        load_profiles("/nonexistent/profiles.yaml")
    assert "/nonexistent/profiles.yaml" in str(info.value) and "cannot read" in str(info.value)


def test_parse_profiles_from_text_names_source() -> None:
    with pytest.raises(ProfileLoadError) as info:
        parse_profiles("version: 1\n", source="inline.yaml")
    assert str(info.value).startswith("inline.yaml: ")
    assert any(path == "issuers" for path, _ in info.value.problems)
