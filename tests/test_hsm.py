"""The HSM module against a real SoftHSM2 token: signatures, builders + openssl, faults,
recovery."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pkcs11
import pytest
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from signer.errors import ErrorCode, SignerError
from signer.server import hsm as hsm_module
from signer.server.hsm import (
    PKCS11_LOCK,
    Hsm,
    HsmEcPrivateKey,
    HsmPrivateKey,
    HsmRsaPrivateKey,
    HsmSettings,
    KeyNotExtractableError,
)

if TYPE_CHECKING:
    from conftest import SoftHsmToken

OPENSSL = shutil.which("openssl")
needs_openssl = pytest.mark.skipif(OPENSSL is None, reason="openssl not installed")

MESSAGE = b"the quick brown fox signs a CRL"


@pytest.fixture(scope="module")
def keyed_token(softhsm_token_factory: Callable[..., SoftHsmToken]) -> SoftHsmToken:
    """One token for the module with rsa (2048), p256 and p384 keys: key generation is slow."""
    token = softhsm_token_factory()
    with Hsm(token.settings(), read_write=True) as maker:
        maker.generate_key("rsa", "rsa-2048")
        maker.generate_key("p256", "ec-p256")
        maker.generate_key("p384", "ec-p384")
    return token


@pytest.fixture
def keyed(keyed_token: SoftHsmToken) -> Iterator[Hsm]:
    """A read-only Hsm (as the signer uses it) on the keyed token."""
    with Hsm(keyed_token.settings()) as opened:
        yield opened


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CAcert Test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _ca_certificate(
    key: HsmPrivateKey, algorithm: hashes.HashAlgorithm, rsa_padding: padding.PSS | None = None
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(f"HSM CA {key.label}"))
        .issuer_name(_name(f"HSM CA {key.label}"))
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    kwargs = {"rsa_padding": rsa_padding} if rsa_padding is not None else {}
    return builder.sign(key, algorithm, **kwargs)


def _openssl(*args: str) -> subprocess.CompletedProcess[str]:
    assert OPENSSL is not None
    return subprocess.run([OPENSSL, *args], capture_output=True, text=True, timeout=60, check=False)


PSS_SHA256 = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)

SIGNING_CASES = [
    pytest.param("rsa", hashes.SHA256(), None, id="rsa-pkcs1v15-sha256"),
    pytest.param("rsa", hashes.SHA256(), PSS_SHA256, id="rsa-pss-sha256"),
    pytest.param("p256", hashes.SHA256(), None, id="p256-sha256"),
    pytest.param("p384", hashes.SHA384(), None, id="p384-sha384"),
]


# -- signatures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", [hashes.SHA256(), hashes.SHA384(), hashes.SHA512()])
def test_rsa_pkcs1v15_signature_verifies(keyed: Hsm, algorithm: hashes.HashAlgorithm) -> None:
    key = keyed.key("rsa")
    signature = key.sign(MESSAGE, padding.PKCS1v15(), algorithm)
    assert len(signature) == 256
    key.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), algorithm)


@pytest.mark.parametrize(
    "salt_length", [padding.PSS.DIGEST_LENGTH, padding.PSS.MAX_LENGTH, 20, 0], ids=str
)
def test_rsa_pss_signature_verifies(keyed: Hsm, salt_length: object) -> None:
    key = keyed.key("rsa")
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt_length)  # type: ignore[arg-type]
    signature = key.sign(MESSAGE, pss, hashes.SHA256())
    expected_salt = {padding.PSS.DIGEST_LENGTH: 32, padding.PSS.MAX_LENGTH: 222}.get(
        salt_length,  # type: ignore[arg-type]
        salt_length,
    )
    key.public_key().verify(
        signature,
        MESSAGE,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=expected_salt),  # type: ignore[arg-type]
        hashes.SHA256(),
    )


def test_rsa_prehashed_signature_verifies(keyed: Hsm) -> None:
    key = keyed.key("rsa")
    digest = hashes.Hash(hashes.SHA384())
    digest.update(MESSAGE)
    signature = key.sign(digest.finalize(), padding.PKCS1v15(), Prehashed(hashes.SHA384()))
    key.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA384())


@pytest.mark.parametrize(
    ("label", "algorithm", "curve"),
    [
        ("p256", hashes.SHA256(), ec.SECP256R1),
        ("p384", hashes.SHA384(), ec.SECP384R1),
        ("p256", hashes.SHA512(), ec.SECP256R1),
    ],
)
def test_ecdsa_signature_verifies(
    keyed: Hsm, label: str, algorithm: hashes.HashAlgorithm, curve: type[ec.EllipticCurve]
) -> None:
    key = keyed.key(label)
    assert isinstance(key.curve, curve)  # type: ignore[attr-defined]
    signature = key.sign(MESSAGE, ec.ECDSA(algorithm))  # type: ignore[call-arg]
    key.public_key().verify(signature, MESSAGE, ec.ECDSA(algorithm))  # type: ignore[call-arg]
    digest = hashes.Hash(algorithm)
    digest.update(MESSAGE)
    prehashed = key.sign(digest.finalize(), ec.ECDSA(Prehashed(algorithm)))  # type: ignore[call-arg]
    key.public_key().verify(prehashed, MESSAGE, ec.ECDSA(algorithm))  # type: ignore[call-arg]


def test_keys_are_cryptography_private_keys(keyed: Hsm) -> None:
    rsa_key, p256, p384 = keyed.key("rsa"), keyed.key("p256"), keyed.key("p384")
    assert isinstance(rsa_key, rsa.RSAPrivateKey) and isinstance(rsa_key, HsmRsaPrivateKey)
    assert isinstance(p256, ec.EllipticCurvePrivateKey) and isinstance(p256, HsmEcPrivateKey)
    assert (rsa_key.kind, p256.kind, p384.kind) == ("rsa-2048", "ec-p256", "ec-p384")
    assert rsa_key.key_size == 2048 and p384.key_size == 384  # type: ignore[attr-defined]
    assert copy.copy(rsa_key) is rsa_key and copy.deepcopy(p256) is p256
    assert keyed.key("rsa") is rsa_key  # looked up once, public key read once


def test_unsupported_parameters_are_refused(keyed: Hsm) -> None:
    key = keyed.key("rsa")
    with pytest.raises(UnsupportedAlgorithm):
        key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA1())  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="AUTO"):
        key.sign(
            MESSAGE,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO),
            hashes.SHA256(),
        )  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="same length"):
        key.sign(b"short", padding.PKCS1v15(), Prehashed(hashes.SHA256()))  # type: ignore[call-arg]


# -- builders + openssl -------------------------------------------------------------------------


@needs_openssl
@pytest.mark.parametrize(("label", "algorithm", "pss"), SIGNING_CASES)
def test_certificate_signed_in_hsm_passes_openssl_verify(
    keyed: Hsm,
    tmp_path: Path,
    label: str,
    algorithm: hashes.HashAlgorithm,
    pss: padding.PSS | None,
) -> None:
    key = keyed.key(label)
    ca = _ca_certificate(key, algorithm, pss)
    ca.verify_directly_issued_by(ca)
    # An end-entity certificate for a software key, issued by the HSM key.
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name("leaf.example.org"))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, algorithm, **({"rsa_padding": pss} if pss else {}))
    )
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    for target in ("ca.pem", "leaf.pem"):
        done = _openssl("verify", "-CAfile", str(tmp_path / "ca.pem"), str(tmp_path / target))
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{tmp_path / target}: OK" in done.stdout


@needs_openssl
@pytest.mark.parametrize(("label", "algorithm", "pss"), SIGNING_CASES)
def test_crl_signed_in_hsm_passes_openssl_crl_verify(
    keyed: Hsm,
    tmp_path: Path,
    label: str,
    algorithm: hashes.HashAlgorithm,
    pss: padding.PSS | None,
) -> None:
    key = keyed.key(label)
    ca = _ca_certificate(key, algorithm, pss)
    now = dt.datetime.now(dt.UTC)
    revoked = [
        x509.RevokedCertificateBuilder()
        .serial_number(serial)
        .revocation_date(now - dt.timedelta(hours=1))
        .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
        .build()
        for serial in (1001, 1002, 2**120 + 7)
    ]
    crl = (
        x509.CertificateRevocationListBuilder(revoked_certificates=revoked)
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=7))
        .add_extension(x509.CRLNumber(42), critical=False)
        .sign(key, algorithm, **({"rsa_padding": pss} if pss else {}))
    )
    assert crl.is_signature_valid(key.public_key())
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "crl.der").write_bytes(crl.public_bytes(serialization.Encoding.DER))
    done = _openssl(
        "crl",
        "-inform",
        "DER",
        "-in",
        str(tmp_path / "crl.der"),
        "-CAfile",
        str(tmp_path / "ca.pem"),
        "-noout",
        "-verify",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "verify OK" in done.stdout + done.stderr
    # And a CRL signed by another key must fail the same check (the test can fail).
    other = ec.generate_private_key(ec.SECP256R1())
    forged = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=7))
        .sign(other, hashes.SHA256())
    )
    (tmp_path / "forged.der").write_bytes(forged.public_bytes(serialization.Encoding.DER))
    bad = _openssl(
        "crl",
        "-inform",
        "DER",
        "-in",
        str(tmp_path / "forged.der"),
        "-CAfile",
        str(tmp_path / "ca.pem"),
        "-noout",
        "-verify",
    )
    assert "verify OK" not in bad.stdout + bad.stderr


# -- key properties and generation ----------------------------------------------------------------


def test_private_key_cannot_be_extracted(keyed: Hsm) -> None:
    rsa_key = keyed.key("rsa")
    ec_key = keyed.key("p256")
    with pytest.raises(KeyNotExtractableError) as caught:
        rsa_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    assert caught.value.code == ErrorCode.HSM_ERROR
    assert "not extractable" in caught.value.message
    with pytest.raises(SignerError):
        rsa_key.private_numbers()
    with pytest.raises(SignerError):
        rsa_key.decrypt(b"x" * 256, padding.PKCS1v15())  # type: ignore[attr-defined]
    with pytest.raises(SignerError):
        ec_key.exchange(ec.ECDH(), ec.generate_private_key(ec.SECP256R1()).public_key())  # type: ignore[attr-defined]
    for label in ("rsa", "p256", "p384"):
        info = keyed.key_info(label)
        assert info["extractable"] is False, info
        assert info["never_extractable"] is True, info
        assert info["sensitive"] is True and info["always_sensitive"] is True, info
        assert info["sign"] is True and info["decrypt"] is False, info
        assert info["token"] is True and info["private"] is True, info


def test_extractable_flag_read_directly_from_the_token(
    keyed: Hsm, keyed_token: SoftHsmToken
) -> None:
    """Independent of signer.server.hsm: ask PKCS#11 itself for CKA_EXTRACTABLE and the secret."""
    keyed.key("rsa")  # the library has seen the token
    with PKCS11_LOCK:
        token = pkcs11.lib(keyed_token.store.module).get_token(token_label=keyed_token.label)
        try:
            session = token.open(user_pin=keyed_token.pin)
        except pkcs11.exceptions.UserAlreadyLoggedIn:  # login is per process and token
            session = token.open()
        try:
            found = list(
                session.get_objects(
                    {
                        pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                        pkcs11.Attribute.LABEL: "rsa",
                    }
                )
            )
            assert len(found) == 1
            assert found[0][pkcs11.Attribute.EXTRACTABLE] is False
            assert found[0][pkcs11.Attribute.SENSITIVE] is True
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                found[0][pkcs11.Attribute.PRIVATE_EXPONENT]
        finally:
            session.close()
    # If that close logged the process out, the Hsm logs in again by itself.
    keyed.key("rsa").sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())


def test_generate_key_refuses_an_existing_label(hsm: Hsm) -> None:
    hsm.generate_key("ca", "ec-p256")
    with pytest.raises(SignerError) as caught:
        hsm.generate_key("ca", "ec-p384")
    assert caught.value.code == ErrorCode.HSM_ERROR
    assert "already exists" in caught.value.message
    assert hsm.key("ca").kind == "ec-p256"  # untouched


def test_generate_rejects_unknown_kind_and_read_only_sessions(
    hsm: Hsm, hsm_settings: HsmSettings
) -> None:
    with pytest.raises(SignerError, match="unknown key kind"):
        hsm.generate_key("x", "rsa-1024")
    with Hsm(hsm_settings) as read_only, pytest.raises(SignerError, match="read-only"):
        read_only.generate_key("x", "ec-p256")
    assert not hsm.has_key("x")


def test_generate_rsa_4096(hsm: Hsm) -> None:
    """The one RSA-4096 generation of the suite (the ceremony's production kind)."""
    key = hsm.generate_key("root-4096", "rsa-4096")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 4096
    signature = key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    key.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())


# -- faults -------------------------------------------------------------------------------------


def test_wrong_pin_is_login_failed_and_not_retried(
    softhsm_token: SoftHsmToken, tmp_path: Path
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text("000000\n")
    pin_file.chmod(0o600)
    hsm = Hsm(softhsm_token.settings(pin_file=pin_file))
    with pytest.raises(SignerError) as first:
        hsm.key("anything")
    assert first.value.code == ErrorCode.HSM_LOGIN_FAILED
    assert "refused the PIN" in first.value.message
    # The same wrong PIN is not sent again (a real HSM would lock after a few tries)...
    with pytest.raises(SignerError) as second:
        hsm.key("anything")
    assert second.value.code == ErrorCode.HSM_LOGIN_FAILED
    assert "not trying it again" in second.value.message
    # ...but a corrected PIN file is read and works without a new Hsm.
    pin_file.write_text(softhsm_token.pin + "\n")
    with pytest.raises(SignerError) as missing:
        hsm.key("anything")
    assert missing.value.code == ErrorCode.HSM_KEY_NOT_FOUND
    assert hsm.status([])["logged_in"] is True
    hsm.close()


def test_hsm_objects_share_the_process_login(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    """PKCS#11 login is per process: closing one Hsm must not log out another, and a wrong PIN
    must not ride on the login another Hsm made."""
    with Hsm(softhsm_token.settings(), read_write=True) as first:
        first.generate_key("ca", "ec-p256")
        second = Hsm(softhsm_token.settings())
        second.key("ca").sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
        second.close()
        # A fresh lookup of a private object: a logged-out session would find nothing.
        assert first.key_info("ca")["extractable"] is False
        wrong = tmp_path / "wrong-pin"
        wrong.write_text("99999999")
        wrong.chmod(0o600)
        with pytest.raises(SignerError) as caught:
            Hsm(softhsm_token.settings(pin_file=wrong)).key("ca")
        assert caught.value.code == ErrorCode.HSM_LOGIN_FAILED
        assert "differs" in caught.value.message
        first.key("ca").sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
        third = Hsm(softhsm_token.settings())
        third.key("ca")
    # `first` logged the process in and is closed now; `third` still sees private objects.
    assert third.key_info("ca")["sensitive"] is True
    third.close()


def test_missing_module_is_unavailable(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    hsm = Hsm(softhsm_token.settings(module=str(tmp_path / "no-such-pkcs11.so")))
    with pytest.raises(SignerError) as caught:
        hsm.key("k")
    assert caught.value.code == ErrorCode.HSM_UNAVAILABLE
    assert "no-such-pkcs11.so" in caught.value.message
    status = hsm.status(["k"])
    assert status["token_present"] is False and status["logged_in"] is False
    assert status["keys"][0]["test_signature_ok"] is False


def test_unloadable_module_is_unavailable(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.so"
    bogus.write_bytes(b"not an ELF file")
    with pytest.raises(SignerError) as caught:
        Hsm(softhsm_token.settings(module=str(bogus))).key("k")
    assert caught.value.code == ErrorCode.HSM_UNAVAILABLE
    assert "cannot load" in caught.value.message


def test_unknown_token_label_is_unavailable(softhsm_token: SoftHsmToken) -> None:
    hsm = Hsm(softhsm_token.settings(token_label="no-such-token"))
    with pytest.raises(SignerError) as caught:
        hsm.key("k")
    assert caught.value.code == ErrorCode.HSM_UNAVAILABLE
    assert "no-such-token" in caught.value.message


def test_unknown_key_label_is_key_not_found(keyed: Hsm) -> None:
    with pytest.raises(SignerError) as caught:
        keyed.key("no-such-key")
    assert caught.value.code == ErrorCode.HSM_KEY_NOT_FOUND
    assert "no-such-key" in caught.value.message
    keyed.key("rsa").sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())  # still usable


def test_token_removed_and_restored(hsm: Hsm, softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    key = hsm.generate_key("ca", "ec-p256")
    sign = lambda: key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))  # noqa: E731
    key.public_key().verify(sign(), MESSAGE, ec.ECDSA(hashes.SHA256()))
    parked = tmp_path / "parked-token"
    shutil.move(softhsm_token.directory, parked)
    try:
        for _ in range(2):  # a clear error every time while it is gone, no crash
            with pytest.raises(SignerError) as caught:
                sign()
            assert caught.value.code == ErrorCode.HSM_UNAVAILABLE
            assert softhsm_token.label in caught.value.message
        status = hsm.status(["ca"])
        assert status["token_present"] is False and status["logged_in"] is False
        assert status["keys"][0]["test_signature_ok"] is False
        assert status["keys"][0]["error"]
    finally:
        shutil.move(parked, softhsm_token.directory)
    # Back: the same Hsm and the same key object sign again.
    key.public_key().verify(sign(), MESSAGE, ec.ECDSA(hashes.SHA256()))
    status = hsm.status(["ca"])
    assert status["token_present"] and status["logged_in"]
    assert status["keys"][0]["test_signature_ok"] is True


@pytest.mark.parametrize("retry", [True, False])
def test_dead_session_recovers_by_reinitialising(softhsm_token: SoftHsmToken, retry: bool) -> None:
    """Someone finalises the library under us (all sessions die): with retry_reinit the sign is
    retried transparently; without, it fails once and the next call recovers."""
    with Hsm(softhsm_token.settings(retry_reinit=retry), read_write=True) as hsm:
        key = hsm.generate_key("ca", "rsa-2048")
        key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())
        with PKCS11_LOCK:
            pkcs11.lib(softhsm_token.store.module).reinitialize()
        if retry:
            signature = key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())
        else:
            with pytest.raises(SignerError) as caught:
                key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())
            assert caught.value.code in (ErrorCode.HSM_ERROR, ErrorCode.HSM_UNAVAILABLE)
            assert "re-initialise" in caught.value.message
            signature = key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256())
        key.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())


@pytest.mark.parametrize("shared", [True, False], ids=["one-hsm", "hsm-per-thread"])
def test_concurrent_signing_from_threads(
    keyed: Hsm, keyed_token: SoftHsmToken, shared: bool
) -> None:
    """Threads sign through one Hsm, or each through its own Hsm (own session): without the
    process-wide lock python-pkcs11 + SoftHSM crash or fail with several sessions."""
    errors: list[BaseException] = []
    done: list[int] = []
    start = threading.Barrier(6)

    def work(index: int) -> None:
        hsm = keyed if shared else Hsm(keyed_token.settings())
        try:
            keys = [hsm.key("rsa"), hsm.key("p256"), hsm.key("p384")]
            start.wait()
            for round_ in range(30):
                key = keys[(index + round_) % 3]
                data = f"{index}-{round_}".encode()
                if isinstance(key, rsa.RSAPrivateKey):
                    sig = key.sign(data, padding.PKCS1v15(), hashes.SHA256())
                    key.public_key().verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
                else:
                    sig = key.sign(data, ec.ECDSA(hashes.SHA256()))
                    key.public_key().verify(sig, data, ec.ECDSA(hashes.SHA256()))
                if round_ % 10 == 0:
                    _ca_certificate(key, hashes.SHA256())
                    assert hsm.status(["p256"])["keys"][0]["test_signature_ok"]
            done.append(index)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)
        finally:
            if hsm is not keyed:
                hsm.close()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert sorted(done) == list(range(6))


class _HeldHandle:
    """A key handle whose signatures first wait at `gate` (a Barrier or an Event's wait): shows
    which signatures are inside the HSM at the same time."""

    def __init__(self, handle: object, gate: Callable[[], object]) -> None:
        self._handle = handle
        self._gate = gate

    def sign(self, *args: object, **kwargs: object) -> bytes:
        self._gate()
        return self._handle.sign(*args, **kwargs)  # type: ignore[attr-defined, no-any-return]


def _hold_signatures(monkeypatch: pytest.MonkeyPatch, hsm: Hsm, gate: Callable[[], object]) -> None:
    find = hsm._private_object
    monkeypatch.setattr(
        hsm, "_private_object", lambda session, label: _HeldHandle(find(session, label), gate)
    )


def _sign_in_threads(key: HsmPrivateKey, count: int) -> list[bytes]:
    """`count` RSA signatures of MESSAGE, one per thread; re-raises a thread's failure."""
    signatures: list[bytes] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            assert isinstance(key, HsmRsaPrivateKey)
            signatures.append(key.sign(MESSAGE, padding.PKCS1v15(), hashes.SHA256()))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    return signatures


def test_signatures_run_in_parallel_sessions(
    keyed_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two signatures meet inside the HSM call (a barrier only both together pass): neither
    holds a lock the other needs. The pool opens one session per signature and no more."""
    with Hsm(keyed_token.settings(signing_sessions=2)) as hsm:
        key = hsm.key("rsa")
        assert hsm.concurrent_signing is True and hsm.signing_sessions == 2
        meeting: list[threading.Barrier] = [threading.Barrier(2, timeout=20)]
        _hold_signatures(monkeypatch, hsm, lambda: meeting and meeting[0].wait())
        for signature in _sign_in_threads(key, 2) + _sign_in_threads(key, 2):
            key.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
        assert hsm._pooled == 2 and len(hsm._idle) == 2
        meeting.clear()  # alone from here on
        status = hsm.status(["rsa"])
        assert status["keys"][0]["test_signature_ok"] is True
        assert status["concurrent_signing"] is True and status["signing_sessions"] == 2


def test_pool_never_exceeds_signing_sessions(keyed_token: SoftHsmToken) -> None:
    """Six threads, two sessions: the others wait for a session to come back."""
    with Hsm(keyed_token.settings(signing_sessions=2)) as hsm:
        key = hsm.key("rsa")
        most = [0]
        find = hsm._private_object

        def counting(session: object, label: str) -> object:
            most[0] = max(most[0], hsm._pooled)
            return find(session, label)

        hsm._private_object = counting  # type: ignore[method-assign]
        for signature in _sign_in_threads(key, 6):
            key.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
        assert most[0] == 2 and hsm._pooled == 2


def test_reinitialisation_waits_for_a_running_signature(
    keyed_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dead session seen by one thread re-initialises the library only after the signature
    another thread is making has ended: finalising under it would crash or spoil it."""
    with Hsm(keyed_token.settings(signing_sessions=2)) as hsm:
        key = hsm.key("rsa")  # looked up in the main session: no pooled session yet
        module = hsm._module
        assert module is not None
        generation = module.generation
        inside, release = threading.Event(), threading.Event()

        def gate() -> None:
            inside.set()
            assert release.wait(20)

        _hold_signatures(monkeypatch, hsm, gate)
        first: list[bytes] = []
        slow = threading.Thread(target=lambda: first.extend(_sign_in_threads(key, 1)))
        slow.start()
        assert inside.wait(20)
        with PKCS11_LOCK:
            hsm._mark_broken("a test", RuntimeError("session gone"))
        monkeypatch.undo()  # the next signature goes straight through
        second: list[bytes] = []
        recovering = threading.Thread(target=lambda: second.extend(_sign_in_threads(key, 1)))
        recovering.start()
        recovering.join(0.5)
        assert recovering.is_alive() and module.generation == generation  # waiting for `slow`
        release.set()
        slow.join(30)
        recovering.join(30)
        assert module.generation == generation + 1
        for signature in first + second:
            key.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())


def test_module_that_cannot_lock_signs_one_at_a_time(
    keyed_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A module answering CKR_CANT_LOCK to CKF_OS_LOCKING_OK (some vendor HSMs; SoftHSM2 locks)
    is initialised without locking: then every signature runs under PKCS11_LOCK in the main
    session, no pool, and health says so."""
    real_initialize = hsm_module._Cryptoki.initialize
    calls: list[int | None] = []

    def cannot_lock(self: hsm_module._Cryptoki) -> bool:
        def table_initialize(args: int | None) -> int:
            calls.append(args)
            return 0x0A if args is not None else int(self._table.initialize(None))

        return hsm_module._Cryptoki._initialize_with(table_initialize)

    with Hsm(keyed_token.settings(signing_sessions=4)) as hsm:
        key = hsm.key("rsa")
        monkeypatch.setattr(hsm_module._Cryptoki, "initialize", cannot_lock)
        with PKCS11_LOCK, caplog.at_level(logging.WARNING):
            hsm._mark_broken("a test", RuntimeError("session gone"))
            hsm._ensure_session()  # re-initialises the module, now without locking
        assert "cannot lock" in caplog.text
        assert len(calls) == 2 and calls[0] is not None and calls[1] is None
        assert hsm.concurrent_signing is False and hsm.signing_sessions == 1
        for signature in _sign_in_threads(key, 3):
            key.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
        assert hsm._pooled == 0
        status = hsm.status(["rsa"])
        assert status["concurrent_signing"] is False and status["signing_sessions"] == 1
        monkeypatch.setattr(hsm_module._Cryptoki, "initialize", real_initialize)
        with PKCS11_LOCK:
            hsm._mark_broken("a test", RuntimeError("back to locking"))
            hsm._ensure_session()
        assert hsm.concurrent_signing is True


def test_signing_sessions_setting() -> None:
    base = {"module": "libsofthsm2.so", "token_label": "t", "pin_env": "PIN"}
    assert 1 <= HsmSettings(**base).signing_sessions <= 4
    assert HsmSettings(**base, signing_sessions=8).signing_sessions == 8
    for wrong in (0, 65):
        with pytest.raises(ValidationError):
            HsmSettings(**base, signing_sessions=wrong)


async def test_run_uses_one_worker_thread(keyed: Hsm) -> None:
    key = keyed.key("p256")
    names = await asyncio.gather(
        *(keyed.run(lambda: threading.current_thread().name) for _ in range(5))
    )
    assert len(set(names)) == 1 and names[0].startswith("hsm")
    assert names[0] != threading.current_thread().name
    signature = await keyed.run(key.sign, MESSAGE, ec.ECDSA(hashes.SHA256()))
    key.public_key().verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))  # type: ignore[call-arg]
    # The event loop keeps running while the worker waits for the PKCS#11 lock and signs.
    tick_times: list[float] = []

    async def ticker() -> None:
        while True:
            tick_times.append(time.monotonic())
            await asyncio.sleep(0.001)

    holding = threading.Event()
    released_at: list[float] = []

    def hold_the_lock() -> None:
        with PKCS11_LOCK:
            holding.set()
            time.sleep(0.3)  # as a slow smart-card signature would
            released_at.append(time.monotonic())

    rsa_key = keyed.key("rsa")  # looked up now; later key() calls need no lock
    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    holding.wait()
    task = asyncio.create_task(ticker())
    assert keyed.key("rsa") is rsa_key
    signature = await keyed.run(rsa_key.sign, MESSAGE, padding.PKCS1v15(), hashes.SHA256())
    task.cancel()
    holder.join()
    rsa_key.public_key().verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())  # type: ignore[call-arg]
    assert len([t for t in tick_times if t < released_at[0]]) > 10


def test_status_reports_each_key(keyed: Hsm) -> None:
    status = keyed.status(["rsa", "p384", "nope"])
    assert status["token_present"] is True and status["logged_in"] is True
    by_label = {entry["label"]: entry for entry in status["keys"]}
    for label, algorithm in (("rsa", "rsa-2048"), ("p384", "ec-p384")):
        assert by_label[label]["algorithm"] == algorithm
        assert by_label[label]["test_signature_ok"] is True
        assert by_label[label]["latency_ms"] >= 0
        assert by_label[label]["error"] is None
    assert by_label["nope"]["test_signature_ok"] is False
    assert "hsm_key_not_found" in by_label["nope"]["error"]


# -- PIN handling -------------------------------------------------------------------------------


def test_pin_never_in_logs_reprs_or_errors(
    softhsm_token_factory: Callable[..., SoftHsmToken],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pin = "Pin-7e3a91c4d2"
    token = softhsm_token_factory(pin=pin)
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TEST_SIGNER_PIN", pin)
    settings = token.settings(pin_env="TEST_SIGNER_PIN")
    texts = [repr(settings), str(settings), settings.model_dump_json()]
    with Hsm(settings, read_write=True) as hsm:
        key = hsm.generate_key("ca", "ec-p256")
        key.sign(MESSAGE, ec.ECDSA(hashes.SHA256()))
        texts += [repr(hsm), repr(key), str(hsm.status(["ca", "missing"]))]
        with pytest.raises(SignerError) as missing:
            hsm.key("missing")
        texts += [str(missing.value), repr(missing.value.to_wire())]
    # A wrong PIN must not show up either.
    monkeypatch.setenv("TEST_SIGNER_PIN", "Wrong-5b8c0f")
    with Hsm(settings) as wrong, pytest.raises(SignerError) as refused:
        wrong.key("ca")
    texts += [str(refused.value), repr(wrong)]
    assert refused.value.code == ErrorCode.HSM_LOGIN_FAILED
    assert caplog.records, "expected log lines from signer.server.hsm"
    texts.append(caplog.text)
    for text in texts:
        assert pin not in text
        assert "Wrong-5b8c0f" not in text


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_pin_file_readable_by_others_is_refused(
    softhsm_token: SoftHsmToken, tmp_path: Path, mode: int
) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(softhsm_token.pin)
    pin_file.chmod(mode)
    with pytest.raises(SignerError) as caught:
        Hsm(softhsm_token.settings(pin_file=pin_file)).key("k")
    assert caught.value.code == ErrorCode.HSM_LOGIN_FAILED
    assert "chmod 600" in caught.value.message
    assert softhsm_token.pin not in caught.value.message


def test_pin_env_missing_is_login_failed(
    softhsm_token: SoftHsmToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TEST_SIGNER_UNSET_PIN", raising=False)
    with pytest.raises(SignerError) as caught:
        Hsm(softhsm_token.settings(pin_env="TEST_SIGNER_UNSET_PIN")).key("k")
    assert caught.value.code == ErrorCode.HSM_LOGIN_FAILED
    assert "TEST_SIGNER_UNSET_PIN" in caught.value.message


def test_settings_validation(tmp_path: Path) -> None:
    so = "/usr/lib/softhsm/libsofthsm2.so"
    with pytest.raises(ValidationError, match="exactly one"):
        HsmSettings(module=so, token_label="t", pin_env="A", pin_file=tmp_path / "p")
    with pytest.raises(ValidationError, match="exactly one"):
        HsmSettings(module=so, token_label="t")
    with pytest.raises(ValidationError, match="Extra inputs"):
        HsmSettings(module=so, token_label="t", pin_env="A", pin="1234")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="module"):  # no silent default PKCS#11 module
        HsmSettings(token_label="t", pin_env="A")  # type: ignore[call-arg]
    settings = HsmSettings(module=so, token_label="t", pin_env="A")
    assert settings.module == so
    assert settings.retry_reinit is True
    resolved = HsmSettings(
        module="lib/p11.so", token_label="t", pin_file=Path("pin"), softhsm_conf=Path("s.conf")
    ).resolved(tmp_path)
    assert resolved.module == str(tmp_path / "lib/p11.so")
    assert resolved.pin_file == tmp_path / "pin" and resolved.softhsm_conf == tmp_path / "s.conf"
