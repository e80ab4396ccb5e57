"""The key ceremony on a SoftHSM2 token: certificates and CRLs that openssl and pkilint accept,
re-runs that change nothing, and refusal to overwrite or mix up keys."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtensionOID

from signer.cli import main as signer_main
from signer.errors import ConfigError, ErrorCode, SignerError
from signer.server.hsm import Hsm, HsmEcPrivateKey, HsmRsaPrivateKey
from signer.tools.ceremony import CaKey, CeremonyError, load_config, run_ceremony

if TYPE_CHECKING:
    from conftest import SoftHsmToken

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")
REPO = Path(__file__).resolve().parent.parent


def _config(token: SoftHsmToken, **overrides: Any) -> dict[str, Any]:
    """A small, fast ceremony: RSA-2048 root, P-256 subordinate, P-256 OpenPGP key."""
    config: dict[str, Any] = {
        "hsm": {
            "module": token.store.module,
            "token_label": token.label,
            "pin_file": str(token.pin_file),
        },
        "output_dir": "out",
        "keys": [
            {"label": "root-key", "kind": "rsa-2048"},
            {"label": "sub-key", "kind": "ec-p256"},
        ],
        "certificates": [
            {
                "name": "root",
                "key": "root-key",
                "subject": [["O", "CAcert Inc."], ["CN", "CAcert Class 1 Root"]],
                "issuer": "self",
                "validity_days": 3650,
                "path_length": 1,
                "crl": {"next_update_days": 7, "url": "http://crl.example.org/revoke.crl"},
            },
            {
                "name": "class3",
                "key": "sub-key",
                "subject": [["O", "CAcert Inc."], ["CN", "CAcert Class 3 Root"]],
                "issuer": "root",
                "validity_days": 1825,
                "path_length": 0,
                "aia": {
                    "ocsp": ["http://ocsp.example.org/"],
                    "ca_issuers": ["http://www.example.org/root.der"],
                },
                "crl": {"next_update_days": 3},
            },
        ],
        "openpgp": {"label": "pgp-key", "kind": "ec-p256"},
    }
    config.update(overrides)
    return config


def _write(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture
def config_path(tmp_path: Path, softhsm_token: SoftHsmToken) -> Path:
    return _write(tmp_path / "ceremony.yaml", _config(softhsm_token))


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=60, check=False)


def _key(hsm: Hsm, label: str) -> CaKey:
    key = hsm.key(label)
    assert isinstance(key, HsmRsaPrivateKey | HsmEcPrivateKey)
    return key


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


# -- the first run ------------------------------------------------------------------------------


def test_ceremony_creates_keys_certificates_and_crls(
    config_path: Path, softhsm_token: SoftHsmToken
) -> None:
    lines: list[str] = []
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    result = run_ceremony(config_path, progress=lines.append)
    out = config_path.parent / "out"
    assert result.output_dir == out
    assert sorted(p.name for p in out.iterdir()) == [
        "class3.crl",
        "class3.crt",
        "class3.der",
        "openpgp-ca.yaml",
        "root.crl",
        "root.crt",
        "root.der",
    ]
    assert all(item.status == "created" for item in result.items), result.items
    assert result.changed
    assert any("key root-key (rsa-2048): created" in line for line in lines), lines

    root, sub = _load(out / "root.crt"), _load(out / "class3.crt")
    assert (out / "root.der").read_bytes() == root.public_bytes(serialization.Encoding.DER)
    assert (out / "class3.der").read_bytes() == sub.public_bytes(serialization.Encoding.DER)

    # The certificates hold the token's public keys.
    with Hsm(softhsm_token.settings()) as hsm:
        assert root.public_key() == _key(hsm, "root-key").public_key()
        assert sub.public_key() == _key(hsm, "sub-key").public_key()
        for label in ("root-key", "sub-key", "pgp-key"):
            info = hsm.key_info(label)
            assert info["extractable"] is False and info["sensitive"] is True, info

    # Names, validity, serials, signature algorithms.
    assert root.subject.rfc4514_string() == "CN=CAcert Class 1 Root,O=CAcert Inc."
    assert root.issuer == root.subject and sub.issuer == root.subject
    assert root.not_valid_before_utc >= before
    assert root.not_valid_after_utc - root.not_valid_before_utc == dt.timedelta(days=3650)
    assert sub.not_valid_after_utc - sub.not_valid_before_utc == dt.timedelta(days=1825)
    for cert in (root, sub):
        assert 0 < cert.serial_number < 2**127
        assert cert.serial_number.bit_length() > 64  # 127 random bits: fails with p = 2^-63
        assert isinstance(cert.signature_hash_algorithm, hashes.SHA256)
    assert root.serial_number != sub.serial_number
    assert root.signature_algorithm_oid._name == "sha256WithRSAEncryption"
    assert sub.signature_algorithm_oid._name == "sha256WithRSAEncryption"  # signed by the root
    root.verify_directly_issued_by(root)
    sub.verify_directly_issued_by(root)


def test_ca_profile_extensions(config_path: Path) -> None:
    run_ceremony(config_path, progress=lambda _: None)
    out = config_path.parent / "out"
    root, sub = _load(out / "root.crt"), _load(out / "class3.crt")
    for cert, path_length in ((root, 1), (sub, 0)):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == path_length
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        assert not ku.value.digital_signature and not ku.value.key_encipherment
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    root_ski = root.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = sub.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical and aki.value.key_identifier == root_ski.digest
    # CRL DP of the subordinate defaults to where its issuer publishes its CRL.
    dps = sub.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [dp.full_name[0].value for dp in dps] == ["http://crl.example.org/revoke.crl"]
    aia = sub.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    assert [(d.access_method, d.access_location.value) for d in aia] == [
        (AuthorityInformationAccessOID.OCSP, "http://ocsp.example.org/"),
        (AuthorityInformationAccessOID.CA_ISSUERS, "http://www.example.org/root.der"),
    ]
    with pytest.raises(x509.ExtensionNotFound):
        root.extensions.get_extension_for_oid(ExtensionOID.CRL_DISTRIBUTION_POINTS)


@needs_openssl
def test_openssl_verifies_chain_and_crls(config_path: Path) -> None:
    run_ceremony(config_path, progress=lambda _: None)
    out = config_path.parent / "out"
    done = _openssl("verify", "-CAfile", str(out / "root.crt"), str(out / "class3.crt"))
    assert done.returncode == 0 and f"{out / 'class3.crt'}: OK" in done.stdout, done.stderr
    done = _openssl("verify", "-CAfile", str(out / "root.crt"), str(out / "root.crt"))
    assert done.returncode == 0, done.stderr
    for name in ("root", "class3"):
        done = _openssl(
            "crl",
            "-inform",
            "DER",
            "-in",
            str(out / f"{name}.crl"),
            "-CAfile",
            str(out / f"{name}.crt"),
            "-noout",
            "-verify",
        )
        assert done.returncode == 0 and "verify OK" in done.stdout + done.stderr, done.stderr
    # The class 3 CRL is not the root's: checking it against the root must fail.
    wrong = _openssl(
        "crl",
        "-inform",
        "DER",
        "-in",
        str(out / "class3.crl"),
        "-CAfile",
        str(out / "root.crt"),
        "-noout",
        "-verify",
    )
    assert "verify OK" not in wrong.stdout + wrong.stderr


def test_first_crls(config_path: Path) -> None:
    now = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    run_ceremony(config_path, progress=lambda _: None, now=now)
    out = config_path.parent / "out"
    for name, days in (("root", 7), ("class3", 3)):
        cert = _load(out / f"{name}.crt")
        crl = x509.load_der_x509_crl((out / f"{name}.crl").read_bytes())
        assert crl.issuer == cert.subject
        public = cert.public_key()
        assert isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
        assert crl.is_signature_valid(public)
        assert len(crl) == 0
        assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 1
        aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert aki.key_identifier == ski.digest
        assert crl.last_update_utc == now
        assert crl.next_update_utc == now + dt.timedelta(days=days)
    assert _load(out / "root.crt").not_valid_before_utc == now


def _pkilint_errors(der: bytes, kind: str) -> list[str]:
    from pkilint import loader, pkix, report  # type: ignore[import-untyped]
    from pkilint.pkix import certificate, crl, extension, name  # type: ignore[import-untyped]
    from pkilint.validation import ValidationFindingSeverity  # type: ignore[import-untyped]

    if kind == "certificate":
        validator = certificate.create_pkix_certificate_validator_container(
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
        document = loader.RFC5280CertificateDocumentLoader().load_der_document(der, kind)
    else:
        validator = crl.create_pkix_crl_validator_container(
            [
                pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
                pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
            ],
            [
                crl.create_issuer_validator_container([]),
                crl.create_validity_validator_container([]),
                crl.create_extensions_validator_container([]),
            ],
        )
        document = loader.RFC5280CertificateListDocumentLoader().load_der_document(der, kind)
    results = validator.validate(document.root)
    assert report.get_findings_count(results) >= 0
    return [
        f"{finding.finding.code} ({finding.finding.severity.name})"
        for result in results
        for finding in result.finding_descriptions
        if finding.finding.severity <= ValidationFindingSeverity.ERROR
    ]


def test_pkilint_finds_no_errors(config_path: Path) -> None:
    run_ceremony(config_path, progress=lambda _: None)
    out = config_path.parent / "out"
    for name in ("root", "class3"):
        assert _pkilint_errors((out / f"{name}.der").read_bytes(), "certificate") == []
        assert _pkilint_errors((out / f"{name}.crl").read_bytes(), "crl") == []


def test_pkilint_check_can_fail() -> None:
    """The lint helper reports errors: keyCertSign without basicConstraints, no AKI."""
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "some CA")])
    now = dt.datetime.now(dt.UTC)
    bad = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "not a CA")]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
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
        .sign(key, hashes.SHA256())
    )
    errors = _pkilint_errors(bad.public_bytes(serialization.Encoding.DER), "certificate")
    assert "pkix.ee_certificate_keycertsign_keyusage_set (ERROR)" in errors, errors


# -- re-runs ------------------------------------------------------------------------------------


def test_rerun_is_a_no_op(config_path: Path) -> None:
    run_ceremony(config_path, progress=lambda _: None)
    out = config_path.parent / "out"
    first = _digests(out)
    lines: list[str] = []
    again = run_ceremony(config_path, progress=lines.append)
    assert not again.changed
    assert {item.status for item in again.items} == {"exists"}
    assert len(again.items) == 3 + 2 * 2 + 1  # 3 keys, 2 certificates + 2 CRLs, OpenPGP record
    assert _digests(out) == first
    assert any("certificate root: exists" in line for line in lines), lines


def test_existing_key_without_certificate_gets_one(
    config_path: Path, softhsm_token: SoftHsmToken
) -> None:
    with Hsm(softhsm_token.settings(), read_write=True) as hsm:
        hsm.generate_key("root-key", "rsa-2048")
        made_before = _key(hsm, "root-key").public_key()
    result = run_ceremony(config_path, progress=lambda _: None)
    assert result.item("key", "root-key").status == "exists"
    assert result.item("key", "sub-key").status == "created"
    assert result.item("certificate", "root").status == "created"
    assert _load(config_path.parent / "out" / "root.crt").public_key() == made_before


def test_missing_der_is_repaired_and_crl_remade(config_path: Path) -> None:
    run_ceremony(config_path, progress=lambda _: None)
    out = config_path.parent / "out"
    der = (out / "class3.der").read_bytes()
    (out / "class3.der").unlink()
    (out / "class3.crl").unlink()
    result = run_ceremony(config_path, progress=lambda _: None)
    assert result.item("certificate", "class3").status == "repaired"
    assert result.item("crl", "class3").status == "created"
    assert (out / "class3.der").read_bytes() == der


def test_certificate_of_another_key_is_an_error(config_path: Path) -> None:
    run_ceremony(config_path, progress=lambda _: None)
    out = config_path.parent / "out"
    # Put the root certificate where the subordinate's belongs.
    shutil.copy(out / "root.crt", out / "class3.crt")
    before = _digests(out)
    with pytest.raises(CeremonyError, match="does not match key 'sub-key'"):
        run_ceremony(config_path, progress=lambda _: None)
    assert _digests(out) == before


def test_key_of_another_kind_is_an_error(config_path: Path, softhsm_token: SoftHsmToken) -> None:
    with Hsm(softhsm_token.settings(), read_write=True) as hsm:
        hsm.generate_key("sub-key", "ec-p384")
    with pytest.raises(CeremonyError, match="ec-p384, the config says ec-p256"):
        run_ceremony(config_path, progress=lambda _: None)
    with Hsm(softhsm_token.settings()) as hsm:
        assert not hsm.has_key("root-key")  # stopped before generating anything


def test_subordinate_outliving_its_root_is_refused(
    tmp_path: Path, softhsm_token: SoftHsmToken
) -> None:
    config = _config(softhsm_token)
    config["certificates"][1]["validity_days"] = 4000
    with pytest.raises(CeremonyError, match="after its issuer's"):
        run_ceremony(_write(tmp_path / "c.yaml", config), progress=lambda _: None)
    assert not (tmp_path / "out" / "class3.crt").exists()


# -- OpenPGP key --------------------------------------------------------------------------------


def test_openpgp_key_generated_and_creation_time_recorded(
    config_path: Path, softhsm_token: SoftHsmToken
) -> None:
    before = dt.datetime.now(dt.UTC).replace(microsecond=0)
    run_ceremony(config_path, progress=lambda _: None)
    after = dt.datetime.now(dt.UTC)
    path = config_path.parent / "out" / "openpgp-ca.yaml"
    meta = yaml.safe_load(path.read_text())
    assert meta["label"] == "pgp-key" and meta["kind"] == "ec-p256"
    assert isinstance(meta["created"], str) and meta["created"].endswith("Z")
    created = dt.datetime.fromisoformat(meta["created"])
    assert created.tzinfo is not None and created.microsecond == 0
    assert before <= created <= after
    with Hsm(softhsm_token.settings()) as hsm:
        assert hsm.key("pgp-key").kind == "ec-p256"
        assert hsm.key_info("pgp-key")["extractable"] is False
    # A re-run keeps the recorded time: the OpenPGP fingerprint depends on it.
    text = path.read_text()
    result = run_ceremony(config_path, progress=lambda _: None)
    assert result.item("openpgp", "pgp-key").status == "exists"
    assert path.read_text() == text


def test_openpgp_record_of_a_vanished_key_is_an_error(
    config_path: Path, softhsm_token_factory: Any, tmp_path: Path
) -> None:
    run_ceremony(config_path, progress=lambda _: None)
    # Same output directory, new (empty) token: the recorded key is not in it.
    other = softhsm_token_factory()
    config = _config(other)
    with pytest.raises(CeremonyError, match="the token has no such key"):
        run_ceremony(_write(tmp_path / "other.yaml", config), progress=lambda _: None)
    with Hsm(other.settings()) as hsm:
        for label in ("root-key", "sub-key", "pgp-key"):
            assert not hsm.has_key(label)  # refused before generating anything


# -- config and CLI -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["certificates"][1].update(issuer="nope"), "unknown issuer 'nope'"),
        (lambda c: c["keys"].append({"label": "root-key", "kind": "ec-p256"}), "used twice"),
        (lambda c: c["certificates"][0].update(key="missing"), "not under keys"),
        (lambda c: c["certificates"][0].update(issuer="class3"), "issuer cycle"),
        (lambda c: c["keys"][0].update(kind="rsa-1024"), "keys.0.kind"),
        (lambda c: c.update(extra=1), "extra"),
        (lambda c: c["certificates"][0].update(subject=[["XX", "y"]]), "unknown subject"),
        (lambda c: c["certificates"][0].update(name="../evil"), "names files"),
        (lambda c: c["hsm"].update(pin_env="X"), "exactly one of pin_file and pin_env"),
    ],
)
def test_config_errors_are_clear(
    tmp_path: Path, softhsm_token: SoftHsmToken, change: Any, message: str
) -> None:
    config = _config(softhsm_token)
    change(config)
    with pytest.raises(CeremonyError, match="invalid ceremony config") as caught:
        run_ceremony(_write(tmp_path / "bad.yaml", config), progress=lambda _: None)
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_hsm_failure_surfaces_as_signer_error(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    config = _config(softhsm_token)
    config["hsm"]["token_label"] = "absent-token"
    with pytest.raises(SignerError) as caught:
        run_ceremony(_write(tmp_path / "c.yaml", config), progress=lambda _: None)
    assert caught.value.code == ErrorCode.HSM_UNAVAILABLE


def main(argv: list[str]) -> int:
    return signer_main(["ceremony", *argv])


def test_main_json_and_exit_codes(
    config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--config", str(config_path), "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is True and report["changed"] is True
    assert {item["kind"] for item in report["items"]} == {"key", "certificate", "crl", "openpgp"}
    assert "ceremony: done" in captured.err  # progress goes to stderr with --json

    assert main(["--config", str(config_path)]) == 0
    assert "certificate class3: exists" in capsys.readouterr().out

    # a missing config file is a configuration error (exit 2), named in the error
    assert main(["--config", str(tmp_path / "missing.yaml"), "--json"]) == 2
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error["ok"] is False and error["error"]["code"] == "configuration_error"
    assert "missing.yaml: cannot read" in captured.err

    with pytest.raises(SystemExit) as help_exit:
        main(["--help"])
    assert help_exit.value.code == 0
    assert "--config" in capsys.readouterr().out


def test_main_token_and_output_disagreeing_is_a_failure(
    config_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ceremony that finds a file it did not make refuses (exit 1), whatever the output."""
    run_ceremony(config_path, progress=lambda _: None)
    out = config_path.parent / "out"
    (out / "class3.der").write_bytes(b"not the certificate")
    assert main(["--config", str(config_path), "--json"]) == 1
    captured = capsys.readouterr()
    error = json.loads(captured.out)
    assert error["ok"] is False and error["error"]["code"] == "ceremony_failed"
    assert "is not the DER form" in error["error"]["message"]
    assert "error: ceremony_failed:" in captured.err


def test_config_errors_are_configuration_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(CeremonyError, match=r"list\.yaml: expected a mapping"):
        load_config(tmp_path / "list.yaml")


# -- the shipped config -------------------------------------------------------------------------


def test_shipped_config_mirrors_cacert() -> None:
    config = load_config(REPO / "config" / "ceremony.yaml")
    assert config.hsm.token_label == "cacert-signer"
    assert config.hsm.pin_env == "SIGNER_HSM_PIN" and config.hsm.pin_file is None
    assert config.output_dir == REPO / "config" / "ca"
    assert {k.label: k.kind for k in config.keys} == {
        "cacert-root": "rsa-4096",
        "cacert-class3": "rsa-4096",
    }
    assert config.openpgp is not None and config.openpgp.kind == "rsa-4096"
    root, class3 = config.ordered_certificates()
    assert (root.name, root.issuer, class3.name, class3.issuer) == (
        "root",
        "self",
        "class3",
        "root",
    )
    assert root.crl.url == "http://crl.cacert.org/revoke.crl"
    assert class3.crl.url == "http://crl.cacert.org/class3-revoke.crl"
    assert class3.crl_distribution_points == ["http://crl.cacert.org/revoke.crl"]
    assert class3.aia is not None and class3.aia.ocsp == ["http://ocsp.cacert.org/"]
    assert class3.path_length == 0 and class3.validity_days < root.validity_days


@needs_openssl
def test_shipped_config_structure_runs(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    """The shipped YAML with only the token and the key sizes changed (RSA-4096 is slow)."""
    raw = yaml.safe_load((REPO / "config" / "ceremony.yaml").read_text())
    raw["hsm"] = {
        "module": softhsm_token.store.module,
        "token_label": softhsm_token.label,
        "pin_file": str(softhsm_token.pin_file),
    }
    raw["output_dir"] = "ca"
    for key in [*raw["keys"], raw["openpgp"]]:
        key["kind"] = "rsa-2048"
    result = run_ceremony(_write(tmp_path / "ceremony.yaml", raw), progress=lambda _: None)
    out = tmp_path / "ca"
    assert result.changed and (out / "openpgp-ca.yaml").exists()
    done = _openssl("verify", "-CAfile", str(out / "root.crt"), str(out / "class3.crt"))
    assert done.returncode == 0, done.stdout + done.stderr
    sub = _load(out / "class3.crt")
    assert sub.subject.rfc4514_string() == (
        "CN=CAcert Class 3 Root,OU=http://www.CAcert.org,O=CAcert Inc."
    )
    dps = sub.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    assert [dp.full_name[0].value for dp in dps] == ["http://crl.cacert.org/revoke.crl"]
    for name in ("root", "class3"):
        assert _pkilint_errors((out / f"{name}.der").read_bytes(), "certificate") == []
    assert not run_ceremony(tmp_path / "ceremony.yaml", progress=lambda _: None).changed


# -- import mode: taking over an earlier CA's keys and certificates ------------------------------


@pytest.fixture(scope="module")
def legacy_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The earlier CA's files: keys/root.key (encrypted), keys/class3.key, root.crt, class3.crt."""
    from legacy_ca import make_legacy_ca

    return make_legacy_ca(tmp_path_factory.mktemp("legacy"), per_issuer=2).keys


def _import_config(token: SoftHsmToken, keys: Path, **root: Any) -> dict[str, Any]:
    return {
        "hsm": {
            "module": token.store.module,
            "token_label": token.label,
            "pin_file": str(token.pin_file),
        },
        "output_dir": "ca",
        "keys": [
            {"label": "root", "kind": "rsa-2048", "import_from": str(keys / "root.key"),
             "passphrase_env": "OLD_ROOT_PASSPHRASE", **root},
            {"label": "class3", "kind": "ec-p256", "import_from": str(keys / "class3.key")},
        ],
        "certificates": [
            {"name": "class1", "key": "root", "existing": str(keys / "root.crt")},
            {"name": "class3", "key": "class3", "issuer": "class1",
             "existing": str(keys / "class3.crt")},
        ],
    }  # fmt: skip


@pytest.fixture
def root_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    from legacy_ca import ROOT_PASSPHRASE

    monkeypatch.setenv("OLD_ROOT_PASSPHRASE", ROOT_PASSPHRASE)


@needs_openssl
def test_imported_keys_sign_certificates_the_old_chain_verifies(
    tmp_path: Path, softhsm_token: SoftHsmToken, legacy_keys: Path, root_passphrase: None
) -> None:
    path = _write(tmp_path / "ceremony.yaml", _import_config(softhsm_token, legacy_keys))
    lines: list[str] = []
    result = run_ceremony(path, progress=lines.append)
    assert [(i.kind, i.name, i.status) for i in result.items] == [
        ("key", "root", "imported"),
        ("key", "class3", "imported"),
        ("certificate", "class1", "created"),
        ("certificate", "class3", "created"),
    ]
    out = tmp_path / "ca"
    assert sorted(p.name for p in out.iterdir()) == ["class1.crt", "class1.der", "class3.crt",
                                                     "class3.der"]  # fmt: skip
    assert _load(out / "class3.crt") == _load(legacy_keys / "class3.crt")
    with Hsm(softhsm_token.settings()) as hsm:
        for label, cert in (("root", "root.crt"), ("class3", "class3.crt")):
            info = hsm.key_info(label)
            assert (info["sensitive"], info["extractable"], info["sign"]) == (True, False, True)
            public = _load(legacy_keys / cert).public_key()
            assert info["id"] == x509.SubjectKeyIdentifier.from_public_key(public).digest.hex()
            assert hsm.key(label).public_key() == public
        # a certificate signed in the token with the imported class 3 key
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        class3 = _load(legacy_keys / "class3.crt")
        now = dt.datetime.now(dt.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "new.example")]))
            .issuer_name(class3.subject)
            .public_key(leaf_key.public_key())
            .serial_number(2**127 + 5)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=30))
            .sign(_key(hsm, "class3"), hashes.SHA256())
        )
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    check = _openssl("verify", "-CAfile", str(legacy_keys / "root.crt"), "-untrusted",
                     str(legacy_keys / "class3.crt"), str(tmp_path / "leaf.pem"))  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    # re-run: nothing changes; the passphrase never shows
    again = run_ceremony(path, progress=lines.append)
    assert not again.changed
    from legacy_ca import ROOT_PASSPHRASE

    assert not any(ROOT_PASSPHRASE in line for line in lines)


def test_import_refusals_leave_the_token_alone(
    tmp_path: Path, softhsm_token: SoftHsmToken, legacy_keys: Path, root_passphrase: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    def refused(config: dict[str, Any], words: str) -> None:
        path = _write(tmp_path / "ceremony.yaml", config)
        with pytest.raises(CeremonyError, match=words):
            run_ceremony(path, progress=lambda _: None)
        with Hsm(softhsm_token.settings()) as hsm:
            assert not hsm.has_key("root") and not hsm.has_key("class3")

    config = _import_config(softhsm_token, legacy_keys)
    monkeypatch.setenv("OLD_ROOT_PASSPHRASE", "not the passphrase")
    refused(config, "cannot read the private key")
    monkeypatch.delenv("OLD_ROOT_PASSPHRASE")
    refused(config, "OLD_ROOT_PASSPHRASE is not set")
    from legacy_ca import ROOT_PASSPHRASE

    monkeypatch.setenv("OLD_ROOT_PASSPHRASE", ROOT_PASSPHRASE)
    crossed = _import_config(softhsm_token, legacy_keys)
    crossed["certificates"][1]["existing"] = str(legacy_keys / "root.crt")
    refused(crossed, "does not belong to key 'class3'")
    wrong_kind = _import_config(softhsm_token, legacy_keys)
    wrong_kind["keys"][1]["kind"] = "ec-p384"
    refused(wrong_kind, "holds a ec-p256 key, the config says ec-p384")
    plain = _import_config(softhsm_token, legacy_keys)
    plain["keys"][1]["passphrase_env"] = "OLD_ROOT_PASSPHRASE"
    refused(plain, "encrypted or not as not expected")


def test_a_different_key_under_the_label_is_never_overwritten(
    tmp_path: Path, softhsm_token: SoftHsmToken, legacy_keys: Path, root_passphrase: None
) -> None:
    with Hsm(softhsm_token.settings(), read_write=True) as hsm:
        hsm.generate_key("class3", "ec-p256")
    path = _write(tmp_path / "ceremony.yaml", _import_config(softhsm_token, legacy_keys))
    with pytest.raises(CeremonyError, match="holds another key labelled 'class3'"):
        run_ceremony(path, progress=lambda _: None)
    with Hsm(softhsm_token.settings(), read_write=True) as hsm:
        assert not hsm.has_key("root")  # checked before anything was written
        key = serialization.load_pem_private_key((legacy_keys / "class3.key").read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        with pytest.raises(SignerError, match="refusing to overwrite"):
            hsm.import_key("class3", key, b"\x01")


@pytest.mark.skipif(shutil.which("pkcs11-tool") is None, reason="OpenSC not installed")
def test_keys_written_by_pkcs11_tool_are_taken_as_they_are(
    tmp_path: Path, softhsm_token: SoftHsmToken, legacy_keys: Path, root_passphrase: None
) -> None:
    """docs/migration.md's path for tokens that refuse C_CreateObject of private keys: the key
    goes in with OpenSC's pkcs11-tool, the ceremony then only takes the certificate."""
    key = serialization.load_pem_private_key((legacy_keys / "class3.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    key_id = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()
    (tmp_path / "class3.key.der").write_bytes(
        key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption())
    )  # fmt: skip
    (tmp_path / "class3.pub.der").write_bytes(
        key.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    )  # fmt: skip
    for kind, name, flags in (("privkey", "class3.key.der", ["--sensitive", "--private"]),
                              ("pubkey", "class3.pub.der", [])):  # fmt: skip
        done = subprocess.run(
            ["pkcs11-tool", "--module", softhsm_token.store.module, "--token-label",
             softhsm_token.label, "--login", "--pin", softhsm_token.pin, "--write-object",
             str(tmp_path / name), "--type", kind, "--id", key_id, "--label", "class3",
             "--usage-sign", *flags],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
    config = _import_config(softhsm_token, legacy_keys)
    config["keys"][1] = {"label": "class3", "kind": "ec-p256"}  # in the token already
    path = _write(tmp_path / "ceremony.yaml", config)
    result = run_ceremony(path, progress=lambda _: None)
    assert [(i.name, i.status) for i in result.items if i.kind == "key"] == [
        ("root", "imported"),
        ("class3", "exists"),
    ]
    with Hsm(softhsm_token.settings()) as hsm:
        info = hsm.key_info("class3")
        assert (info["sensitive"], info["extractable"], info["id"]) == (True, False, key_id)
        assert hsm.key("class3").public_key() == key.public_key()
