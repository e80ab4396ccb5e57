"""HSM access over PKCS#11: CA keys that never leave the token, usable as `cryptography` keys.

`Hsm(settings).key(label)` returns an object that *is* an `rsa.RSAPrivateKey` or an
`ec.EllipticCurvePrivateKey`, so `CertificateBuilder.sign(key, hashes.SHA256())` and
`CertificateRevocationListBuilder.sign(...)` work directly while the private key stays in the
token: hashing happens here and only a digest (or a ~51-byte DigestInfo) goes to the HSM.

Rules this module enforces (from the measurements in the team's HSM reference notes):
- The module is initialised with CKF_OS_LOCKING_OK (python-pkcs11 passes NULL, with which SoftHSM
  takes no locks and crashes when two threads call at once). Signatures then run in parallel, each
  in its own session from a small per-Hsm pool (`signing_sessions`), outside any lock: an RSA-4096
  signature takes ~5 ms of a core and a 2-core signer makes two at a time. Everything else
  (look-ups, login, re-initialisation) runs under one lock (`PKCS11_LOCK`). A module that answers
  CKR_CANT_LOCK is initialised without locking and signs one signature at a time under the lock.
- HSM sessions die in production (device errors, stale handles, token unplugged). A failure of
  the session or token marks the Hsm broken; the next call re-initialises the library, logs in
  and looks keys up again, without a process restart. Key objects survive that: they hold only
  a label and find their handle through the Hsm.
- The PIN is read from a file or an environment variable when logging in and is never stored,
  logged or shown in reprs and messages. A PIN the token refused is not tried again (real HSMs
  lock the PIN after a few failures) until the PIN source changes.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import hashlib
import logging
import os
import stat
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar, get_args

import pkcs11
from asn1crypto.core import OctetString
from asn1crypto.keys import ECDomainParameters
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pkcs11 import Attribute, CertificateType, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.mechanisms import MGF
from pkcs11.util import biginteger
from pkcs11.util.ec import encode_named_curve_parameters
from pydantic import BaseModel, ConfigDict, Field, model_validator

from signer.errors import ErrorCode, HsmError, SignerError

log = logging.getLogger(__name__)

T = TypeVar("T")

KeyKind = Literal["rsa-2048", "rsa-3072", "rsa-4096", "ec-p256", "ec-p384"]
KEY_KINDS: tuple[str, ...] = get_args(KeyKind)

#: The lock around every PKCS#11 call of the process except signatures in a pooled session (and
#: around those too when the module cannot lock itself). Re-entrant because an Hsm call may
#: re-open the session inside it.
PKCS11_LOCK = threading.RLock()
#: Signals a pooled session given back: waited on by signers when the pool is exhausted and by a
#: re-initialisation, which must not finalise the library under a running signature.
_SESSION_RETURNED = threading.Condition(PKCS11_LOCK)

_CKR_OK = 0x0
_CKR_CANT_LOCK = 0x0A
_CKF_OS_LOCKING_OK = 0x2

_CURVES: dict[str, ec.EllipticCurve] = {
    "secp256r1": ec.SECP256R1(),
    "secp384r1": ec.SECP384R1(),
    "secp521r1": ec.SECP521R1(),
}
_KIND_CURVES = {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}
_CURVE_KINDS = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}

# RFC 8017 9.2 note 1: DER prefix of DigestInfo per hash; the digest follows.
_DIGEST_INFO_PREFIX: dict[str, bytes] = {
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
_PSS_HASH: dict[str, tuple[Mechanism, MGF]] = {
    "sha224": (Mechanism.SHA224, MGF.SHA224),
    "sha256": (Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512, MGF.SHA512),
}

# Failures of the session or token: the Hsm is marked broken and re-initialised on the next call.
_STALE_ERRORS: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.UserNotLoggedIn,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.DeviceMemory,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.SlotIDInvalid,
    p11e.GeneralError,
    p11e.FunctionFailed,
)
_GONE_ERRORS: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.SlotIDInvalid,
)
_PIN_ERRORS: dict[type[p11e.PKCS11Error], str] = {
    p11e.PinIncorrect: "the token refused the PIN",
    p11e.PinLocked: "the token's user PIN is locked: the security officer must unblock it",
    p11e.PinExpired: "the token's user PIN has expired",
    p11e.PinInvalid: "the PIN contains characters the token does not accept",
    p11e.PinLenRange: "the PIN has a length the token does not accept",
    p11e.UserPinNotInitialized: "the token's user PIN is not initialised",
}


class HsmSettings(BaseModel):
    """Where the HSM is and how to log in; embedded in the signer's and the ceremony's YAML.

    Exactly one of `pin_file` / `pin_env` says where the user PIN comes from; the PIN itself is
    never part of the settings, so reprs and dumps of this model cannot leak it.
    """

    model_config = ConfigDict(extra="forbid")

    module: str = Field(
        min_length=1,
        description="path of the PKCS#11 module (.so): OpenSC, the HSM vendor's, or SoftHSM2",
    )
    token_label: str = Field(min_length=1, max_length=32)
    pin_file: Path | None = None
    pin_env: str | None = None
    softhsm_conf: Path | None = Field(
        default=None, description="sets SOFTHSM2_CONF before the module is loaded"
    )
    retry_reinit: bool = True
    signing_sessions: int = Field(
        default_factory=lambda: min(4, os.cpu_count() or 1),
        ge=1,
        le=64,
        description="signatures made at once, each in its own session (default: the CPUs, "
        "at most 4); a smart-card HSM signs one at a time whatever this says",
    )

    @model_validator(mode="after")
    def _check(self) -> HsmSettings:
        if (self.pin_file is None) == (self.pin_env is None):
            raise ValueError("set exactly one of pin_file and pin_env")
        if self.pin_env is not None and not self.pin_env:
            raise ValueError("pin_env must name an environment variable")
        return self

    def resolved(self, base_dir: str | os.PathLike[str]) -> HsmSettings:
        """A copy with relative paths (pin_file, softhsm_conf, a module path with a '/') made
        absolute against `base_dir`: config files name paths relative to themselves."""
        base = Path(base_dir)
        update: dict[str, Any] = {}
        if self.pin_file is not None and not self.pin_file.is_absolute():
            update["pin_file"] = base / self.pin_file
        if self.softhsm_conf is not None and not self.softhsm_conf.is_absolute():
            update["softhsm_conf"] = base / self.softhsm_conf
        if "/" in self.module and not os.path.isabs(self.module):
            update["module"] = str(base / self.module)
        return self.model_copy(update=update)


def status_problems(status: dict[str, Any]) -> list[str]:
    """What an `Hsm.status` report says is wrong, one line each, for a health section."""
    problems = [
        f"key {key['label']}: {key.get('error') or 'test signature failed'}"
        for key in status.get("keys", [])
        if not key.get("test_signature_ok")
    ]
    if not status.get("token_present"):
        problems.insert(0, "token not present")
    return problems


class KeyNotExtractableError(HsmError):
    """Raised by the private-key methods an HSM key cannot support (export, decrypt, ECDH)."""

    def __init__(self, label: str, operation: str) -> None:
        super().__init__(
            ErrorCode.HSM_ERROR,
            f"key {label!r} lives in the HSM and is not extractable: {operation} is not possible",
        )


@dataclass
class _Login:
    """The process's login to one token. PKCS#11 login is per process and token, and closing a
    logged-in session (C_Logout) logs out every session of the process; so one dedicated session
    holds the login for all Hsm objects on the token and is closed when the last one closes.
    Hsm objects use sessions opened without a PIN: closing them never logs anybody out."""

    session: Any
    pin_check: bytes  # salted hash of the PIN that worked (never the PIN)
    users: weakref.WeakSet[Hsm] = field(default_factory=weakref.WeakSet)


class _InitArgs(ctypes.Structure):
    """CK_C_INITIALIZE_ARGS: no mutex callbacks, the flags, a reserved pointer."""

    _fields_ = [
        ("create_mutex", ctypes.c_void_p),
        ("destroy_mutex", ctypes.c_void_p),
        ("lock_mutex", ctypes.c_void_p),
        ("unlock_mutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("reserved", ctypes.c_void_p),
    ]


_CkFunction = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _FunctionListHead(ctypes.Structure):
    """The start of CK_FUNCTION_LIST: the version, then C_Initialize and C_Finalize."""

    _fields_ = [
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("initialize", _CkFunction),
        ("finalize", _CkFunction),
    ]


class _Cryptoki:
    """C_Initialize with CKF_OS_LOCKING_OK, and C_Finalize, through the module's own function
    list: python-pkcs11 only ever passes NULL, which leaves the module without locks."""

    def __init__(self, path: str) -> None:
        try:
            library = ctypes.CDLL(path)  # the handle python-pkcs11 already holds (dlopen counts)
        except OSError as exc:
            raise HsmError(ErrorCode.HSM_UNAVAILABLE, f"cannot load {path}: {exc}") from exc
        get_function_list = library.C_GetFunctionList
        get_function_list.restype = ctypes.c_ulong
        table = ctypes.POINTER(_FunctionListHead)()
        rv = get_function_list(ctypes.byref(table))
        if rv != _CKR_OK or not table:
            raise HsmError(
                ErrorCode.HSM_UNAVAILABLE, f"C_GetFunctionList of {path} failed (0x{rv:x})"
            )
        self._library = library
        self._table = table.contents

    def initialize(self) -> bool:
        """Initialise; True when the module locks itself, False when it answered CKR_CANT_LOCK
        and was initialised without locking (then one thread at a time may call it)."""
        return self._initialize_with(self._table.initialize)

    @staticmethod
    def _initialize_with(c_initialize: Callable[[int | None], int]) -> bool:
        args = _InitArgs(flags=_CKF_OS_LOCKING_OK)
        rv = c_initialize(ctypes.addressof(args))
        locking = rv != _CKR_CANT_LOCK
        if not locking:
            rv = c_initialize(None)
        if rv != _CKR_OK:
            raise HsmError(ErrorCode.HSM_UNAVAILABLE, f"C_Initialize failed (0x{rv:x})")
        return locking

    def finalize(self) -> int:
        return int(self._table.finalize(None))


@dataclass
class _PooledSession:
    """A session that signs outside the lock, with the key handles found in it."""

    session: Any
    module: _Module
    generation: int
    handles: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Module:
    """A loaded PKCS#11 library, shared by all Hsm objects of the process that use it."""

    path: str
    lib: Any
    cryptoki: _Cryptoki
    os_locking: bool
    signing: int = 0  # pooled sessions signing right now, over all Hsm objects
    draining: bool = False  # a re-initialisation waits for `signing` to reach 0
    # Bumped on every re-initialisation: sessions of an older generation are dead.
    generation: int = 0
    logins: dict[str, _Login] = field(default_factory=dict)  # by token label
    refused_pins: dict[str, bytes] = field(default_factory=dict)  # token label -> PIN hash


_MODULES: dict[str, _Module] = {}
_PIN_SALT = os.urandom(32)


def _pin_check(pin: str) -> bytes:
    """A salted hash to compare PINs in memory without keeping the PIN."""
    return hashlib.sha256(_PIN_SALT + pin.encode("utf-8")).digest()


def _p11_name(exc: BaseException) -> str:
    """Name and (often empty) message of a PKCS#11 error for diagnostics."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _find(session: Any, attrs: dict[Attribute, Any]) -> list[Any]:
    """All objects matching attrs; consumes the search so C_FindObjectsFinal always runs."""
    return list(session.get_objects(attrs))


def _get_attr(obj: Any, attribute: Attribute) -> Any:
    """An attribute, or None when the token does not have or show it."""
    try:
        return obj[attribute]
    except (p11e.AttributeTypeInvalid, p11e.AttributeSensitive):
        return None


def _hash_name(algorithm: hashes.HashAlgorithm) -> str:
    return algorithm.name.replace("-", "").lower()


def _digest(data: bytes | bytearray | memoryview, algorithm: Any) -> tuple[bytes, str]:
    """(digest, hash name): hash locally, or take `data` as the digest for Prehashed."""
    if isinstance(algorithm, Prehashed):
        hash_alg = algorithm._algorithm
        if len(data) != hash_alg.digest_size:
            raise ValueError("the provided data must be the same length as the hash algorithm")
        return bytes(data), _hash_name(hash_alg)
    if not isinstance(algorithm, hashes.HashAlgorithm):
        raise TypeError("algorithm must be a hashes.HashAlgorithm or Prehashed")
    h = hashes.Hash(algorithm)
    h.update(data)
    return h.finalize(), _hash_name(algorithm)


class HsmPrivateKey:
    """A private key in the HSM: a label plus its public key; signing goes through the Hsm.

    Concrete objects are `HsmRsaPrivateKey` (an `rsa.RSAPrivateKey`) or `HsmEcPrivateKey` (an
    `ec.EllipticCurvePrivateKey`). They stay valid across HSM re-initialisation.
    """

    def __init__(self, hsm: Hsm, label: str, public: Any) -> None:
        self._hsm = hsm
        self._label = label
        self._public = public

    @property
    def label(self) -> str:
        return self._label

    @property
    def hsm(self) -> Hsm:
        return self._hsm

    @property
    def kind(self) -> str:
        """rsa-<bits> or ec-p256 / ec-p384, as in the ceremony config."""
        raise NotImplementedError

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        """The key's public half, read from the token when the key was looked up."""
        public: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = self._public
        return public

    def _sign_raw(self, mechanism: Mechanism, param: Any, payload: bytes) -> bytes:
        return self._hsm._sign(self._label, mechanism, param, payload)

    def _refuse(self, operation: str) -> NoReturn:
        raise KeyNotExtractableError(self._label, operation)

    def private_bytes(self, *args: Any, **kwargs: Any) -> bytes:
        self._refuse("private_bytes (export)")

    def private_numbers(self) -> NoReturn:
        self._refuse("private_numbers (export)")

    def __copy__(self) -> Any:
        # Immutable handle on a token object: a copy is the same key.
        return self

    def __deepcopy__(self, memo: dict[Any, Any]) -> Any:
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError(f"HSM key {self._label!r} cannot be pickled")

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} label={self._label!r} kind={self.kind} "
            f"token={self._hsm.settings.token_label!r}>"
        )


class HsmRsaPrivateKey(HsmPrivateKey, rsa.RSAPrivateKey):
    """RSA key in the HSM: PKCS#1 v1.5 via CKM_RSA_PKCS on a local DigestInfo, PSS via
    CKM_RSA_PKCS_PSS on a local digest."""

    _public: rsa.RSAPublicKey

    @property
    def kind(self) -> str:
        return f"rsa-{self.key_size}"

    @property
    def key_size(self) -> int:
        return self._public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public

    def sign(
        self,
        data: bytes,
        padding: asym_padding.AsymmetricPadding,
        algorithm: Any,  # hashes.HashAlgorithm | Prehashed; anything else is refused
    ) -> bytes:
        digest, name = _digest(data, algorithm)
        if isinstance(padding, asym_padding.PKCS1v15):
            prefix = _DIGEST_INFO_PREFIX.get(name)
            if prefix is None:
                raise UnsupportedAlgorithm(f"hash {name} is not supported for HSM RSA signatures")
            return self._sign_raw(Mechanism.RSA_PKCS, None, prefix + digest)
        if isinstance(padding, asym_padding.PSS):
            if name not in _PSS_HASH:
                raise UnsupportedAlgorithm(f"hash {name} is not supported for HSM RSA-PSS")
            mgf = padding._mgf
            if not isinstance(mgf, asym_padding.MGF1):
                raise UnsupportedAlgorithm("only MGF1 is supported for RSA-PSS")
            mgf_name = _hash_name(mgf._algorithm)
            if mgf_name not in _PSS_HASH:
                raise UnsupportedAlgorithm(f"MGF1 hash {mgf_name} is not supported")
            salt = padding._salt_length
            if isinstance(salt, int):
                salt_length = salt
            elif salt is asym_padding.PSS.MAX_LENGTH:
                salt_length = (self.key_size + 6) // 8 - len(digest) - 2
            elif salt is asym_padding.PSS.DIGEST_LENGTH:
                salt_length = len(digest)
            else:
                raise ValueError("PSS salt length AUTO is only valid for verification")
            param = (_PSS_HASH[name][0], _PSS_HASH[mgf_name][1], salt_length)
            return self._sign_raw(Mechanism.RSA_PKCS_PSS, param, digest)
        raise UnsupportedAlgorithm(f"padding {padding.name} is not supported for HSM keys")

    def decrypt(self, ciphertext: bytes, padding: asym_padding.AsymmetricPadding) -> bytes:
        self._refuse("decrypt (the key is sign-only)")


class HsmEcPrivateKey(HsmPrivateKey, ec.EllipticCurvePrivateKey):
    """ECDSA key in the HSM: hash locally, CKM_ECDSA on the digest, r||s re-encoded as DER
    (SoftHSM 2.6 has no CKM_ECDSA_SHA256)."""

    _public: ec.EllipticCurvePublicKey

    @property
    def kind(self) -> str:
        return _CURVE_KINDS.get(self.curve.name, f"ec-{self.curve.name}")

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public.curve

    @property
    def key_size(self) -> int:
        return self._public.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithm("only ECDSA is supported for HSM EC keys")
        if getattr(signature_algorithm, "deterministic_signing", False):
            raise UnsupportedAlgorithm("deterministic ECDSA is not available through PKCS#11")
        digest, _ = _digest(data, signature_algorithm.algorithm)
        raw = self._sign_raw(Mechanism.ECDSA, None, digest)
        half = len(raw) // 2
        if len(raw) % 2 or half == 0:
            raise HsmError(ErrorCode.HSM_ERROR, "the HSM returned a malformed ECDSA signature")
        r = int.from_bytes(raw[:half], "big")
        s = int.from_bytes(raw[half:], "big")
        return encode_dss_signature(r, s)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        self._refuse("key exchange (the key is sign-only)")


def _public_rsa(priv: Any, pub: Any | None) -> rsa.RSAPublicKey:
    for obj in (priv, pub):
        if obj is None:
            continue
        modulus = _get_attr(obj, Attribute.MODULUS)
        exponent = _get_attr(obj, Attribute.PUBLIC_EXPONENT)
        if modulus and exponent:
            return rsa.RSAPublicNumbers(
                int.from_bytes(exponent, "big"), int.from_bytes(modulus, "big")
            ).public_key()
    raise HsmError(ErrorCode.HSM_ERROR, "the token does not show the RSA key's public values")


def _public_ec(priv: Any, pub: Any | None) -> ec.EllipticCurvePublicKey:
    params = _get_attr(priv, Attribute.EC_PARAMS) or (
        _get_attr(pub, Attribute.EC_PARAMS) if pub is not None else None
    )
    if not params:
        raise HsmError(ErrorCode.HSM_ERROR, "the token does not show the EC key's curve")
    domain = ECDomainParameters.load(params)
    curve_name = domain.chosen.native if domain.name == "named" else None
    curve = _CURVES.get(curve_name or "")
    if curve is None:
        raise HsmError(ErrorCode.HSM_ERROR, f"unsupported EC curve {curve_name or 'explicit'}")
    point = _get_attr(pub, Attribute.EC_POINT) if pub is not None else None
    if not point:
        raise HsmError(
            ErrorCode.HSM_ERROR,
            "no public key object next to the EC private key: cannot read the public point",
        )
    coord = (curve.key_size + 7) // 8
    if len(point) != 1 + 2 * coord:  # DER OctetString wrapping (the PKCS#11 standard form)
        point = bytes(OctetString.load(point))
    return ec.EllipticCurvePublicKey.from_encoded_point(curve, point)


_IMPORT_CURVES = {"secp256r1": "secp256r1", "secp384r1": "secp384r1", "secp521r1": "secp521r1"}


def _key_templates(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
) -> tuple[dict[Attribute, Any], dict[Attribute, Any]]:
    """(private, public) object templates for an imported key: the private one sensitive,
    never extractable, sign-only, as `generate_key` makes them."""
    private: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    public: dict[Attribute, Any] = {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
    }
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        shared = {
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.MODULUS: biginteger(numbers.public_numbers.n),
            Attribute.PUBLIC_EXPONENT: biginteger(numbers.public_numbers.e),
        }
        private.update(shared)
        private[Attribute.PRIVATE_EXPONENT] = biginteger(numbers.d)
        private[Attribute.PRIME_1] = biginteger(numbers.p)
        private[Attribute.PRIME_2] = biginteger(numbers.q)
        private[Attribute.EXPONENT_1] = biginteger(numbers.dmp1)
        private[Attribute.EXPONENT_2] = biginteger(numbers.dmq1)
        private[Attribute.COEFFICIENT] = biginteger(numbers.iqmp)
        public.update(shared)
        return private, public
    curve = _IMPORT_CURVES.get(key.curve.name)
    if curve is None:
        raise HsmError(ErrorCode.HSM_ERROR, f"unsupported EC curve {key.curve.name}")
    params = encode_named_curve_parameters(curve)
    point = key.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
    size = (key.curve.key_size + 7) // 8
    private.update(
        {
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: params,
            Attribute.VALUE: key.private_numbers().private_value.to_bytes(size, "big"),
        }
    )
    public.update(
        {
            Attribute.KEY_TYPE: KeyType.EC,
            Attribute.EC_PARAMS: params,
            Attribute.EC_POINT: OctetString(point).dump(),
        }
    )
    return private, public


class Hsm:
    """One PKCS#11 token found by label, opened lazily; safe to share by threads.
    `read_write=True` only for the ceremony (key generation).

    One session does look-ups and key management under `PKCS11_LOCK`; signatures take a session
    of the pool (at most `signing_sessions`) and run outside the lock. Use
    `await hsm.run(fn, *args)` from asyncio code so that HSM work runs in the Hsm's worker thread
    instead of blocking the event loop. Several
    Hsm objects of one process may use the same token: they share the process's login (see
    `_Login`), and one with a different PIN is refused.
    """

    def __init__(self, settings: HsmSettings, *, read_write: bool = False) -> None:
        self._settings = settings
        self._read_write = read_write
        self._module: _Module | None = None
        self._session: Any = None
        self._generation = -1
        self._broken = False
        self._handles: dict[str, Any] = {}
        self._keys: dict[str, HsmPrivateKey] = {}
        self._token_found = False
        self._token: Any = None
        self._idle: list[_PooledSession] = []
        self._pooled = 0  # pooled sessions open: idle or lent
        self._lent = 0
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self._closed = False

    # -- public API --------------------------------------------------------------------------

    @property
    def settings(self) -> HsmSettings:
        return self._settings

    def key(self, label: str) -> HsmPrivateKey:
        """The private key with this label, as a `cryptography` private key object.

        Raises HsmError(HSM_KEY_NOT_FOUND) when the token has no private key with the label.
        """
        cached = self._keys.get(label)  # no lock: a known key never waits for a signature
        if cached is not None:
            return cached
        with PKCS11_LOCK:
            cached = self._keys.get(label)
            if cached is not None:
                return cached

            def op(session: Any) -> HsmPrivateKey:
                priv = self._private_object(session, label)
                pub = self._public_object(session, label, _get_attr(priv, Attribute.ID))
                key_type = _get_attr(priv, Attribute.KEY_TYPE)
                if key_type == KeyType.RSA:
                    return HsmRsaPrivateKey(self, label, _public_rsa(priv, pub))
                if key_type == KeyType.EC:
                    return HsmEcPrivateKey(self, label, _public_ec(priv, pub))
                raise HsmError(
                    ErrorCode.HSM_ERROR, f"key {label!r} has unsupported key type {key_type!r}"
                )

            key = self._call(f"looking up key {label!r}", op, retry=True)
            self._keys[label] = key
            return key

    def has_key(self, label: str) -> bool:
        """True when the token holds any key object (private or public) with this label."""

        def op(session: Any) -> bool:
            return bool(_find(session, {Attribute.LABEL: label}))

        return self._call(f"looking for key {label!r}", op, retry=True)

    def key_info(self, label: str) -> dict[str, Any]:
        """Attributes of the private key object that matter for audits (extractable, ...)."""

        def op(session: Any) -> dict[str, Any]:
            priv = self._private_object(session, label)
            key_id = _get_attr(priv, Attribute.ID)
            key_type = _get_attr(priv, Attribute.KEY_TYPE)
            return {
                "label": label,
                "id": key_id.hex() if key_id else None,
                "key_type": key_type.name if isinstance(key_type, KeyType) else key_type,
                "token": _get_attr(priv, Attribute.TOKEN),
                "private": _get_attr(priv, Attribute.PRIVATE),
                "sensitive": _get_attr(priv, Attribute.SENSITIVE),
                "always_sensitive": _get_attr(priv, Attribute.ALWAYS_SENSITIVE),
                "extractable": _get_attr(priv, Attribute.EXTRACTABLE),
                "never_extractable": _get_attr(priv, Attribute.NEVER_EXTRACTABLE),
                "sign": _get_attr(priv, Attribute.SIGN),
                "decrypt": _get_attr(priv, Attribute.DECRYPT),
                "unwrap": _get_attr(priv, Attribute.UNWRAP),
                "derive": _get_attr(priv, Attribute.DERIVE),
            }

        return self._call(f"reading attributes of key {label!r}", op, retry=True)

    def generate_key(self, label: str, kind: str) -> HsmPrivateKey:
        """Generate a key pair in the token: private, sensitive, non-extractable, sign-only.

        Refuses (SignerError HSM_ERROR) when any object with this label exists: a CA key is never
        replaced by accident.
        """
        if kind not in KEY_KINDS:
            raise SignerError(
                ErrorCode.BAD_ARGUMENTS, f"unknown key kind {kind!r}; use one of {KEY_KINDS}"
            )
        if not label or len(label) > 64:
            raise SignerError(ErrorCode.BAD_ARGUMENTS, "key label must be 1-64 characters")
        if not self._read_write:
            raise HsmError(
                ErrorCode.HSM_ERROR, "this Hsm was opened read-only: cannot generate keys"
            )

        def op(session: Any) -> None:
            if _find(session, {Attribute.LABEL: label}):
                raise HsmError(
                    ErrorCode.HSM_ERROR,
                    f"a key labelled {label!r} already exists in token "
                    f"{self._settings.token_label!r}: refusing to overwrite it",
                )
            key_id = os.urandom(16)
            public_template: dict[Attribute, Any] = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: False,
                Attribute.VERIFY: True,
                Attribute.ENCRYPT: False,
                Attribute.WRAP: False,
            }
            private_template: dict[Attribute, Any] = {
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.SENSITIVE: True,
                Attribute.EXTRACTABLE: False,
                Attribute.SIGN: True,
                Attribute.DECRYPT: False,
                Attribute.UNWRAP: False,
                Attribute.DERIVE: False,
            }
            common: dict[str, Any] = {
                "id": key_id,
                "label": label,
                "store": True,
                "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
                "private_template": private_template,
            }
            if kind.startswith("rsa-"):
                pub, priv = session.generate_keypair(
                    KeyType.RSA, int(kind[4:]), public_template=public_template, **common
                )
            else:
                public_template[Attribute.EC_PARAMS] = encode_named_curve_parameters(
                    _KIND_CURVES[kind]
                )
                pub, priv = session.generate_keypair(
                    KeyType.EC, public_template=public_template, **common
                )
            if _get_attr(priv, Attribute.EXTRACTABLE) or not _get_attr(priv, Attribute.SENSITIVE):
                priv.destroy()
                pub.destroy()
                raise HsmError(
                    ErrorCode.HSM_ERROR,
                    f"the token made key {label!r} extractable or not sensitive; destroyed it",
                )

        log.info("generating %s key %r in token %r", kind, label, self._settings.token_label)
        self._call(f"generating key {label!r}", op, retry=False)
        return self.key(label)

    def import_key(
        self,
        label: str,
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        key_id: bytes,
    ) -> HsmPrivateKey:
        """Write an existing key into the token (C_CreateObject): private, sensitive,
        non-extractable, sign-only, with its public key next to it, both labelled `label` and
        identified by `key_id`. A public key left by an interrupted import is completed.

        Refuses (HsmError) when a private key with this label exists: a CA key is never replaced.
        Tokens that refuse to create private keys this way need their own import path
        (docs/migration.md: OpenSC's pkcs11-tool, SmartCard-HSM key wrapping)."""
        if not self._read_write:
            raise HsmError(ErrorCode.HSM_ERROR, "this Hsm was opened read-only: cannot import keys")
        private_template, public_template = _key_templates(private_key)
        common = {Attribute.TOKEN: True, Attribute.LABEL: label, Attribute.ID: key_id}

        def op(session: Any) -> None:
            private_class = {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}
            if _find(session, private_class):
                raise HsmError(
                    ErrorCode.HSM_ERROR,
                    f"a private key labelled {label!r} already exists in token "
                    f"{self._settings.token_label!r}: refusing to overwrite it",
                )
            priv = session.create_object({**private_template, **common})
            if _get_attr(priv, Attribute.EXTRACTABLE) or not _get_attr(priv, Attribute.SENSITIVE):
                priv.destroy()
                raise HsmError(
                    ErrorCode.HSM_ERROR,
                    f"the token made key {label!r} extractable or not sensitive; destroyed it",
                )
            public_class = {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.LABEL: label}
            if not _find(session, public_class):
                session.create_object({**public_template, **common})

        log.info("importing key %r into token %r", label, self._settings.token_label)
        self._call(f"importing key {label!r}", op, retry=False)
        return self.key(label)

    def store_certificate(
        self, label: str, key_id: bytes, der: bytes, fields: dict[str, bytes]
    ) -> bool:
        """Keep a certificate in the token next to its key (same label and id), as PKCS#11
        tools expect; `fields` gives its DER subject, issuer and serial. False if it is there."""
        if not self._read_write:
            raise HsmError(ErrorCode.HSM_ERROR, "this Hsm was opened read-only: cannot store")

        def op(session: Any) -> bool:
            found = _find(
                session, {Attribute.CLASS: ObjectClass.CERTIFICATE, Attribute.LABEL: label}
            )
            if any(_get_attr(obj, Attribute.VALUE) == der for obj in found):
                return False
            if found:
                raise HsmError(
                    ErrorCode.HSM_ERROR,
                    f"another certificate labelled {label!r} is in the token: refusing to add one",
                )
            session.create_object(
                {
                    Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.LABEL: label,
                    Attribute.ID: key_id,
                    Attribute.SUBJECT: fields["subject"],
                    Attribute.ISSUER: fields["issuer"],
                    Attribute.SERIAL_NUMBER: fields["serial"],
                    Attribute.VALUE: der,
                }
            )
            return True

        return self._call(f"storing certificate {label!r}", op, retry=False)

    def status(self, labels: Iterable[str] | None = None) -> dict[str, Any]:
        """Health: token present, logged in, one test signature per key (`labels`, default:
        every key obtained through `key()` so far). Never raises for HSM faults."""
        wanted = list(labels) if labels is not None else sorted(self._keys)
        result: dict[str, Any] = {
            "token_present": False,
            "logged_in": False,
            "error": None,
            "concurrent_signing": None,
            "signing_sessions": None,
            "keys": [],
        }
        try:
            with PKCS11_LOCK:
                self._ensure_session()
                result["concurrent_signing"] = self.concurrent_signing
                result["signing_sessions"] = self.signing_sessions
            result["token_present"] = result["logged_in"] = True
        except SignerError as exc:
            result["token_present"] = self._token_found
            result["error"] = str(exc)
        message = b"cacert-signer health check"
        for label in wanted:
            if result["error"] is not None:
                # No session: do not hammer the HSM with one re-initialisation per key.
                result["keys"].append(
                    {
                        "label": label,
                        "algorithm": None,
                        "test_signature_ok": False,
                        "latency_ms": None,
                        "error": result["error"],
                    }
                )
                continue
            entry: dict[str, Any] = {
                "label": label,
                "algorithm": None,
                "test_signature_ok": False,
                "latency_ms": None,
                "error": None,
            }
            try:
                key = self.key(label)
                entry["algorithm"] = key.kind
                started = time.perf_counter()
                if isinstance(key, HsmRsaPrivateKey):
                    sig = key.sign(message, asym_padding.PKCS1v15(), hashes.SHA256())
                    entry["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
                    key.public_key().verify(sig, message, asym_padding.PKCS1v15(), hashes.SHA256())
                else:
                    assert isinstance(key, HsmEcPrivateKey)
                    sig = key.sign(message, ec.ECDSA(hashes.SHA256()))
                    entry["latency_ms"] = round((time.perf_counter() - started) * 1000, 3)
                    key.public_key().verify(sig, message, ec.ECDSA(hashes.SHA256()))
                entry["test_signature_ok"] = True
            except SignerError as exc:
                entry["error"] = str(exc)
            except Exception as exc:  # e.g. InvalidSignature: wrong public key next to the key
                entry["error"] = f"test signature failed: {type(exc).__name__}"
            result["keys"].append(entry)
        return result

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run blocking (HSM) work in this Hsm's single worker thread; the event loop stays free."""
        loop = asyncio.get_running_loop()
        # Not PKCS11_LOCK: another thread may hold it for seconds (smart-card RSA) and the event
        # loop must not wait for it.
        with self._executor_lock:
            if self._closed:
                raise HsmError(ErrorCode.HSM_UNAVAILABLE, "the HSM connection is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hsm")
            executor = self._executor
        return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))

    @property
    def concurrent_signing(self) -> bool | None:
        """Whether signatures run in parallel (the module locks itself); None before the
        module is loaded."""
        module = self._module
        return None if module is None else module.os_locking

    @property
    def signing_sessions(self) -> int:
        """How many signatures this Hsm makes at once."""
        return self._settings.signing_sessions if self.concurrent_signing is not False else 1

    def close(self) -> None:
        """Close the sessions and the worker thread, after the signatures running. Safe to call
        twice."""
        with PKCS11_LOCK:
            self._closed = True
            while self._lent:
                _SESSION_RETURNED.wait()
            session, self._session = self._session, None
            self._handles.clear()
            module = self._module
            if module is not None and self._generation == module.generation:
                self._drop_idle(close=True)
                if session is not None:
                    try:
                        session.close()  # opened without PIN: no C_Logout
                    except p11e.PKCS11Error as exc:
                        log.debug("closing HSM session: %s", _p11_name(exc))
                self._release_login(module)
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def __enter__(self) -> Hsm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._broken:
            state = "broken"
        elif self._session is not None:
            state = "open"
        else:
            state = "not opened"
        return (
            f"<Hsm module={self._settings.module!r} token={self._settings.token_label!r} {state}>"
        )

    # -- signing (called by HsmPrivateKey) --------------------------------------------------

    def _sign(self, label: str, mechanism: Mechanism, param: Any, payload: bytes) -> bytes:
        what = f"signing with key {label!r}"
        signature = self._sign_in_pool(what, label, mechanism, param, payload)
        if signature is not None:
            return signature

        def op(session: Any) -> bytes:
            handle = self._handles.get(label)
            if handle is None:
                handle = self._handles[label] = self._private_object(session, label)
            return bytes(handle.sign(payload, mechanism=mechanism, mechanism_param=param))

        return self._call(what, op, retry=True)

    def _sign_in_pool(
        self, what: str, label: str, mechanism: Mechanism, param: Any, payload: bytes
    ) -> bytes | None:
        """Sign in a session of the pool, outside the lock; on a dead session, as `_call`.
        None when the module cannot lock itself: then the caller signs under the lock."""
        attempts = 2 if self._settings.retry_reinit else 1
        for attempt in range(1, attempts + 1):
            lease = self._lend(what)
            if lease is None:
                return None
            failure: p11e.PKCS11Error | None = None
            try:
                handle = lease.handles.get(label)
                if handle is None:
                    handle = lease.handles[label] = self._private_object(lease.session, label)
                return bytes(handle.sign(payload, mechanism=mechanism, mechanism_param=param))
            except p11e.PKCS11Error as exc:
                failure = exc
            finally:
                self._give_back(lease, healthy=failure is None)
            with PKCS11_LOCK:
                self._retry_or_raise(what, failure, retry=attempt < attempts)
        raise AssertionError("unreachable")  # pragma: no cover

    def _lend(self, what: str) -> _PooledSession | None:
        """An idle pooled session, a new one while fewer than `signing_sessions` are open, or
        wait for one to come back; None when the module cannot lock (no pool)."""
        with PKCS11_LOCK:
            while True:
                self._ensure_session()
                module = self._module
                assert module is not None
                if not module.os_locking:
                    return None
                if module.draining:
                    _SESSION_RETURNED.wait()
                    continue
                if self._idle:
                    lease = self._idle.pop()
                elif self._pooled < self._settings.signing_sessions:
                    try:
                        session = self._token.open(rw=self._read_write)
                    except p11e.PKCS11Error as exc:
                        if self._is_stale(exc):
                            self._mark_broken(what, exc)
                        raise self._map_error(what, exc) from exc
                    lease = _PooledSession(session, module, module.generation)
                    self._pooled += 1
                else:
                    _SESSION_RETURNED.wait()
                    continue
                self._lent += 1
                module.signing += 1
                return lease

    def _give_back(self, lease: _PooledSession, *, healthy: bool) -> None:
        with PKCS11_LOCK:
            lease.module.signing -= 1
            self._lent -= 1
            current = self._module is lease.module and lease.generation == lease.module.generation
            if healthy and current and not self._closed and not self._broken:
                self._idle.append(lease)
            else:
                self._pooled -= 1
                if current:  # an older generation's handle may now name another session
                    self._close_quietly(lease.session)
            _SESSION_RETURNED.notify_all()

    def _drop_idle(self, *, close: bool) -> None:
        """Forget the idle pooled sessions; close them only while their generation lives."""
        idle, self._idle = self._idle, []
        self._pooled -= len(idle)
        if close:
            for lease in idle:
                self._close_quietly(lease.session)

    @staticmethod
    def _close_quietly(session: Any) -> None:
        try:
            session.close()  # opened without PIN: no C_Logout
        except p11e.PKCS11Error as exc:
            log.debug("closing HSM session: %s", _p11_name(exc))

    # -- session management -----------------------------------------------------------------

    def _call(self, what: str, op: Callable[[Any], T], *, retry: bool) -> T:
        """Run op(session) under the lock; map PKCS#11 errors; recover from dead sessions."""
        attempts = 2 if retry and self._settings.retry_reinit else 1
        with PKCS11_LOCK:
            for attempt in range(1, attempts + 1):
                session = self._ensure_session()
                try:
                    return op(session)
                except p11e.PKCS11Error as exc:
                    self._retry_or_raise(what, exc, retry=attempt < attempts)
        raise AssertionError("unreachable")  # pragma: no cover

    def _retry_or_raise(self, what: str, exc: p11e.PKCS11Error, *, retry: bool) -> None:
        """After a failed call (lock held): a dead session marks the Hsm broken and returns when
        one more attempt is allowed; anything else raises the error mapped to a wire code."""
        if self._is_stale(exc):
            self._mark_broken(what, exc)
            if retry:
                log.warning("retrying %s after re-initialising the HSM", what)
                return
        raise self._map_error(what, exc) from exc

    @staticmethod
    def _is_stale(exc: p11e.PKCS11Error) -> bool:
        if isinstance(exc, _STALE_ERRORS):
            return True
        # python-pkcs11 raises a plain PKCS11Error for CKR_CRYPTOKI_NOT_INITIALIZED.
        return type(exc) is p11e.PKCS11Error and "not initialized" in str(exc)

    def _mark_broken(self, what: str, exc: BaseException) -> None:
        if not self._broken:
            log.warning(
                "HSM token %r failed while %s (%s): will re-initialise on the next call",
                self._settings.token_label,
                what,
                _p11_name(exc),
            )
        self._broken = True
        self._handles.clear()

    def _map_error(self, what: str, exc: p11e.PKCS11Error) -> SignerError:
        token = self._settings.token_label
        detail = _p11_name(exc)
        if isinstance(exc, _GONE_ERRORS):
            return HsmError(
                ErrorCode.HSM_UNAVAILABLE,
                f"token {token!r} is not present (removed?) while {what} ({detail})",
            )
        if isinstance(exc, (p11e.DeviceError, p11e.DeviceMemory, p11e.GeneralError)):
            return HsmError(
                ErrorCode.HSM_ERROR, f"HSM device error while {what} ({detail}); will re-initialise"
            )
        if self._is_stale(exc):
            return HsmError(
                ErrorCode.HSM_ERROR,
                f"HSM session lost while {what} ({detail}); will re-initialise",
            )
        if isinstance(exc, p11e.NoSuchKey):
            return HsmError(ErrorCode.HSM_KEY_NOT_FOUND, f"no key for {what} in token {token!r}")
        if isinstance(exc, tuple(_PIN_ERRORS)):
            return HsmError(ErrorCode.HSM_LOGIN_FAILED, _PIN_ERRORS[type(exc)])
        return HsmError(ErrorCode.HSM_ERROR, f"the HSM refused {what} ({detail})")

    def _ensure_session(self) -> Any:
        """The live session; (re)open it when missing, broken or from an older generation."""
        if self._closed:
            raise HsmError(ErrorCode.HSM_UNAVAILABLE, "the HSM connection is closed")
        module = self._module
        if (
            self._session is not None
            and not self._broken
            and module is not None
            and self._generation == module.generation
        ):
            return self._session
        try:
            self._open()
        except BaseException:
            self._broken = True
            self._session = None
            raise
        return self._session

    def _load_module(self) -> _Module:
        path = self._settings.module
        module = _MODULES.get(path)
        if module is not None:
            return module
        if "/" in path and not os.path.exists(path):
            raise HsmError(ErrorCode.HSM_UNAVAILABLE, f"PKCS#11 module {path} does not exist")
        self._apply_softhsm_conf()
        try:
            lib = pkcs11.lib(path)
        except p11e.PKCS11Error as exc:
            hint = " (check SOFTHSM2_CONF)" if "softhsm" in path.lower() else ""
            raise HsmError(
                ErrorCode.HSM_UNAVAILABLE,
                f"cannot load or initialise PKCS#11 module {path}{hint}: {_p11_name(exc)}",
            ) from exc
        cryptoki = _Cryptoki(path)
        cryptoki.finalize()  # python-pkcs11 initialised it without locking: again, with
        os_locking = cryptoki.initialize()
        module = _MODULES[path] = _Module(path, lib, cryptoki, os_locking)
        log.info("loaded PKCS#11 module %s (%s)", path, lib.library_description)
        self._warn_if_serial(module)
        return module

    @staticmethod
    def _warn_if_serial(module: _Module) -> None:
        if not module.os_locking:
            log.warning(
                "PKCS#11 module %s cannot lock (CKR_CANT_LOCK): signing one signature at a time",
                module.path,
            )

    def _apply_softhsm_conf(self) -> None:
        if self._settings.softhsm_conf is not None:
            os.environ["SOFTHSM2_CONF"] = str(self._settings.softhsm_conf)

    def _reinitialize(self, module: _Module) -> None:
        """C_Finalize + C_Initialize: drops every session of the process on this module, once
        the signatures running in pooled sessions have ended."""
        generation = module.generation
        module.draining = True
        try:
            while module.signing:
                _SESSION_RETURNED.wait()
        finally:
            module.draining = False
            _SESSION_RETURNED.notify_all()
        if module.generation != generation:
            return  # another Hsm re-initialised it while we waited
        log.warning("re-initialising PKCS#11 module %s", module.path)
        self._apply_softhsm_conf()
        module.generation += 1
        module.logins.clear()  # C_Finalize logs the process out of every token
        rv = module.cryptoki.finalize()
        if rv != _CKR_OK:
            log.debug("C_Finalize: 0x%x", rv)
        try:
            module.os_locking = module.cryptoki.initialize()
        except HsmError as exc:
            raise HsmError(
                ErrorCode.HSM_UNAVAILABLE,
                f"cannot re-initialise PKCS#11 module {module.path}: {exc.message}",
            ) from exc
        self._warn_if_serial(module)

    def _open(self) -> None:
        module = self._load_module()
        reinitialised = False
        if self._broken and self._module is module and self._generation == module.generation:
            # Nobody else re-initialised since our failure: do it ourselves.
            self._reinitialize(module)
            reinitialised = True
        if self._module is module and self._generation == module.generation:
            self._drop_idle(close=True)  # broken: closed sessions are re-opened
        else:
            self._drop_idle(close=False)  # their generation is gone
        self._module = module
        self._session = None
        self._handles.clear()
        self._token_found = False
        self._token = None
        label = self._settings.token_label
        token = None
        while token is None:
            try:
                token = module.lib.get_token(token_label=label)
            except p11e.NoSuchToken as exc:
                if not reinitialised:
                    # SoftHSM and some HSM modules see tokens added after C_Initialize only
                    # after a re-initialisation (token plugged in, softhsm2-util run).
                    self._reinitialize(module)
                    reinitialised = True
                    continue
                raise HsmError(
                    ErrorCode.HSM_UNAVAILABLE,
                    f"no token labelled {label!r} in {module.path} (not connected or removed?)",
                ) from exc
            except p11e.MultipleTokensReturned as exc:
                raise HsmError(
                    ErrorCode.HSM_ERROR, f"several tokens are labelled {label!r}"
                ) from exc
            except p11e.PKCS11Error as exc:
                if not reinitialised:
                    self._reinitialize(module)
                    reinitialised = True
                    continue
                raise HsmError(
                    ErrorCode.HSM_UNAVAILABLE,
                    f"cannot list the tokens of {module.path}: {_p11_name(exc)}",
                ) from exc
        self._token_found = True
        login = self._login(module, token)
        try:
            session = token.open(rw=self._read_write)
        except p11e.PKCS11Error as exc:
            raise HsmError(
                ErrorCode.HSM_UNAVAILABLE,
                f"cannot open a session on token {label!r}: {_p11_name(exc)}",
            ) from exc
        login.users.add(self)
        self._token = token
        self._session = session
        self._generation = module.generation
        self._broken = False
        log.info("opened token %r (%s)", label, "read-write" if self._read_write else "read-only")

    def _login(self, module: _Module, token: Any) -> _Login:
        """Log the process in to the token, or join the existing login after checking that
        this Hsm's PIN is the one that worked (a wrong PIN must not ride on another's login)."""
        label = self._settings.token_label
        pin = self._read_pin()
        check = _pin_check(pin)
        login = module.logins.get(label)
        if login is not None:
            if check != login.pin_check:
                raise HsmError(
                    ErrorCode.HSM_LOGIN_FAILED,
                    f"the PIN for token {label!r} differs from the one this process logged in "
                    "with: refusing it",
                )
            return login
        if module.refused_pins.get(label) == check:
            raise HsmError(
                ErrorCode.HSM_LOGIN_FAILED,
                f"token {label!r} refused this PIN before; not trying it again so that the HSM "
                "does not lock the PIN: correct the PIN source",
            )
        try:
            session = token.open(user_pin=pin)
        except p11e.UserAlreadyLoggedIn:
            # Logged in by code outside this module (same process): it holds the login.
            log.warning("token %r was already logged in by this process", label)
            session = None
        except tuple(_PIN_ERRORS) as exc:
            if isinstance(exc, (p11e.PinIncorrect, p11e.PinLocked)):
                module.refused_pins[label] = check
            raise HsmError(
                ErrorCode.HSM_LOGIN_FAILED,
                f"login to token {label!r} failed: {_PIN_ERRORS[type(exc)]}",
            ) from None
        except p11e.PKCS11Error as exc:
            raise HsmError(
                ErrorCode.HSM_UNAVAILABLE,
                f"cannot log in to token {label!r}: {_p11_name(exc)}",
            ) from exc
        module.refused_pins.pop(label, None)
        login = module.logins[label] = _Login(session=session, pin_check=check)
        log.info("logged in to token %r", label)
        return login

    def _release_login(self, module: _Module) -> None:
        """Drop this Hsm from the token's login; the last one out logs the process out."""
        label = self._settings.token_label
        login = module.logins.get(label)
        if login is None or self not in login.users:
            return
        login.users.discard(self)
        if len(login.users) == 0:
            del module.logins[label]
            if login.session is not None:
                try:
                    login.session.close()  # C_Logout + C_CloseSession
                except p11e.PKCS11Error as exc:
                    log.debug("logging out of token %r: %s", label, _p11_name(exc))

    def _read_pin(self) -> str:
        """Read the PIN now (never cached); refuse a PIN file others can read, as ssh does."""
        settings = self._settings
        if settings.pin_env is not None:
            value = os.environ.get(settings.pin_env)
            if not value:
                raise HsmError(
                    ErrorCode.HSM_LOGIN_FAILED,
                    f"environment variable {settings.pin_env} (the HSM PIN) is not set or empty",
                )
            return value
        assert settings.pin_file is not None
        path = settings.pin_file
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise HsmError(
                ErrorCode.HSM_LOGIN_FAILED, f"cannot open PIN file {path}: {exc.strerror}"
            ) from None
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise HsmError(ErrorCode.HSM_LOGIN_FAILED, f"PIN file {path} is not a file")
            if mode & 0o077:
                raise HsmError(
                    ErrorCode.HSM_LOGIN_FAILED,
                    f"PIN file {path} is accessible by group or others (mode "
                    f"{stat.S_IMODE(mode):04o}): refusing to use it; run chmod 600 on it",
                )
            with os.fdopen(os.dup(fd), "rb") as handle:
                raw = handle.read(4096)
        finally:
            os.close(fd)
        value = raw.decode("utf-8", errors="strict").rstrip("\r\n")
        if not value:
            raise HsmError(ErrorCode.HSM_LOGIN_FAILED, f"PIN file {path} is empty")
        return value

    # -- object lookup ------------------------------------------------------------------------

    def _private_object(self, session: Any, label: str) -> Any:
        found = _find(session, {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label})
        if not found:
            raise HsmError(
                ErrorCode.HSM_KEY_NOT_FOUND,
                f"no private key labelled {label!r} in token {self._settings.token_label!r}",
            )
        if len(found) > 1:
            raise HsmError(
                ErrorCode.HSM_ERROR,
                f"{len(found)} private keys are labelled {label!r}: labels must be unique",
            )
        return found[0]

    @staticmethod
    def _public_object(session: Any, label: str, key_id: bytes | None) -> Any | None:
        attrs: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.LABEL: label,
        }
        if key_id:
            attrs[Attribute.ID] = key_id
        found = _find(session, attrs)
        return found[0] if len(found) == 1 else None
