"""Shared fixtures.

SoftHSM2: python-pkcs11 loads the PKCS#11 library once per process and SoftHSM reads
SOFTHSM2_CONF when the library is initialised, so the whole pytest process uses ONE private token
store (a session tmp dir) and SOFTHSM2_CONF points at it before any test loads the library. Each
test that needs a token gets a fresh token label in that store (`softhsm_token`); `Hsm`
re-initialises the library by itself when it does not see a newly created token yet.
Never set SOFTHSM2_CONF in a test or point an Hsm at another store: use these fixtures.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from signer.server.hsm import Hsm, HsmSettings
from signer.tools.softhsm import create_token_store, find_softhsm_module, init_token, softhsm_util


@dataclass(frozen=True)
class SoftHsmStore:
    """The session's SoftHSM2 store: config file (SOFTHSM2_CONF), module path, token dir."""

    conf_path: Path
    module: str
    tokendir: Path


@dataclass(frozen=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token with a user PIN, also written to a mode-0600 PIN file."""

    store: SoftHsmStore
    label: str
    pin: str
    so_pin: str
    pin_file: Path
    directory: Path  # the token's directory in the store (move it away to "remove" the token)

    def settings(self, **overrides: Any) -> HsmSettings:
        """HsmSettings for this token (PIN from pin_file unless overridden)."""
        values: dict[str, Any] = {
            "module": self.store.module,
            "token_label": self.label,
            "pin_file": self.pin_file,
        }
        values.update(overrides)
        if "pin_env" in overrides and "pin_file" not in overrides:
            values.pop("pin_file")
        return HsmSettings(**values)


@pytest.fixture(scope="session")
def softhsm_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsmStore]:
    """One SoftHSM2 token store for the session, with SOFTHSM2_CONF set for the process."""
    module = find_softhsm_module()
    if module is None:
        pytest.fail("SoftHSM2 is not installed (run ops/setup.sh: it installs softhsm2)")
    try:
        softhsm_util()
    except RuntimeError as exc:
        pytest.fail(str(exc))
    base = tmp_path_factory.mktemp("softhsm")
    conf = create_token_store(base)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTHSM2_CONF", str(conf))
        yield SoftHsmStore(conf_path=conf, module=module, tokendir=base / "tokens")


@pytest.fixture(scope="session")
def softhsm_token_factory(
    softhsm_store: SoftHsmStore, tmp_path_factory: pytest.TempPathFactory
) -> Callable[..., SoftHsmToken]:
    """make(label=None, pin=None) -> a new initialised token; usable from any fixture scope."""
    pin_dir = tmp_path_factory.mktemp("pins")

    def make(label: str | None = None, pin: str | None = None) -> SoftHsmToken:
        label = label or f"t-{secrets.token_hex(6)}"
        pin = pin or secrets.token_hex(8)
        so_pin = secrets.token_hex(8)
        directory = init_token(softhsm_store.conf_path, label, so_pin, pin)
        pin_file = pin_dir / f"{label}.pin"
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(pin + "\n")
        return SoftHsmToken(softhsm_store, label, pin, so_pin, pin_file, directory)

    return make


@pytest.fixture
def softhsm_token(softhsm_token_factory: Callable[..., SoftHsmToken]) -> SoftHsmToken:
    """A fresh, initialised, empty token for this test."""
    return softhsm_token_factory()


@pytest.fixture
def hsm_settings(softhsm_token: SoftHsmToken) -> HsmSettings:
    """HsmSettings for `softhsm_token` (PIN from its mode-0600 PIN file)."""
    return softhsm_token.settings()


@pytest.fixture
def hsm(hsm_settings: HsmSettings) -> Iterator[Hsm]:
    """A read-write Hsm on `softhsm_token` (can generate keys); closed after the test."""
    with Hsm(hsm_settings, read_write=True) as opened:
        yield opened


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private MariaDB server for the session (tests/mariadb.py), ended by its PID."""
    from mariadb import start_mariadb

    server = start_mariadb(tmp_path_factory.mktemp("mariadb"))
    try:
        yield server
    finally:
        server.stop()
