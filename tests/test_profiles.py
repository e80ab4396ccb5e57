"""Profiles: the shipped file loads and says what it should; bad files fail loudly and precisely."""

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
    ProfileLoadError,
    load_profiles,
    parse_profiles,
)

LEGACY_PROFILES = {
    "client",
    "client-org",
    "client-codesign",
    "server",
    "server-org",
    "server-jabber",
    "ocsp",
    "timestamp",
    "subca",
}
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


def test_shipped_profiles_load_with_the_legacy_set() -> None:
    profiles = load_profiles()
    assert set(profiles.names()) >= LEGACY_PROFILES
    assert profiles.source == str(DEFAULT_PROFILES_PATH)
    for name in profiles.names():
        profile = profiles.get(name)
        assert profile.name == name
        assert profile.issuer in ("class1", "class3")
        assert set(profile.digests) <= {"sha256", "sha384", "sha512"}
        assert profile.keys.rsa is not None and profile.keys.rsa.min_bits >= 2048
        assert "p256" in profile.keys.ec_curves
        assert profile.validity.default_days <= profile.validity.max_days
        if profile.kind == "ocsp":
            assert profile.crl_urls == [] and profile.ocsp_urls == []
        else:
            assert profile.crl_urls == [CRL[profile.issuer]]
            assert profile.ocsp_urls == ["http://ocsp.cacert.org/"]


def test_shipped_profiles_have_the_expected_shape() -> None:
    profiles = load_profiles()
    server = profiles.get("server")
    assert server.kind == "tls"
    assert server.extended_key_usage is not None
    assert server.extended_key_usage.usages == ["serverAuth", "clientAuth"]
    assert server.key_usage.rsa == ["digitalSignature", "keyEncipherment"]
    assert server.key_usage.ec == ["digitalSignature"]
    assert server.sans.required and server.subject.cn_sources == ["san"]
    assert server.policies[0].oid == "2.23.140.1.2.1"
    assert set(profiles.get("server-jabber").sans.allowed) == {"dns", "xmpp"}
    client = profiles.get("client")
    assert client.extended_key_usage is not None
    assert client.extended_key_usage.usages == ["emailProtection", "clientAuth"]
    assert set(client.sans.allowed) == {"email"} and client.subject.email_must_be_san
    assert client.key_usage.ec == ["digitalSignature", "keyAgreement"]
    codesign = profiles.get("client-codesign").extended_key_usage
    assert codesign is not None and "codeSigning" in codesign.usages
    ocsp = profiles.get("ocsp")
    assert ocsp.ocsp_nocheck and ocsp.extended_key_usage is not None
    assert ocsp.extended_key_usage.usages == ["OCSPSigning"]
    timestamp = profiles.get("timestamp").extended_key_usage
    assert timestamp is not None and timestamp.usages == ["timeStamping"] and timestamp.critical
    subca = profiles.get("subca")
    assert subca.basic_constraints.ca and subca.basic_constraints.path_length == 0
    assert subca.issuer == "class1"
    assert profiles.get("server-class1").issuer == "class1"
    assert profiles.get("server-class1").crl_urls == [CRL["class1"]]


def test_tls_validity_follows_the_cabf_schedule() -> None:
    validity = load_profiles().get("server").validity
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
