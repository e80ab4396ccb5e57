"""SoftHSM2 helpers for tests, the demo and benchmarks.

SoftHSM2 is a software PKCS#11 token: it lets the signer run the same PKCS#11 code path as in
production without a hardware HSM. These helpers create a private token store (never the
system-wide one) and initialise tokens without prompts.

Note: SoftHSM reads SOFTHSM2_CONF when the library is initialised (C_Initialize), and it only
notices tokens created by another process after a re-initialisation. `Hsm` does that
by itself when a token label is not found.
"""

from __future__ import annotations

import glob
import os
import platform
import secrets
import shutil
import subprocess
from pathlib import Path

# Where distributions put the module; multiarch directories first (Debian/Ubuntu), then the
# generic ones (Fedora, Arch, Alpine, Homebrew).
_MODULE_PATTERNS = (
    "/usr/lib/{multiarch}/softhsm/libsofthsm2.so",
    "/usr/lib/*-linux-gnu*/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
    "/usr/local/opt/softhsm/lib/softhsm/libsofthsm2.so",
)

_MULTIARCH = {
    "x86_64": "x86_64-linux-gnu",
    "aarch64": "aarch64-linux-gnu",
    "arm64": "aarch64-linux-gnu",
}


class SoftHsmError(RuntimeError):
    """SoftHSM2 is missing or a softhsm2-util call failed."""


def find_softhsm_module() -> str | None:
    """Return the path of libsofthsm2.so on this machine, or None when SoftHSM2 is not installed.

    The SOFTHSM2_MODULE environment variable wins, so unusual installs need no code change.
    """
    override = os.environ.get("SOFTHSM2_MODULE")
    if override:
        return override
    multiarch = _MULTIARCH.get(platform.machine(), platform.machine() + "-linux-gnu")
    for pattern in _MODULE_PATTERNS:
        for candidate in sorted(glob.glob(pattern.format(multiarch=multiarch))):
            if os.path.isfile(candidate):
                return candidate
    return None


def softhsm_util() -> str:
    """Path of softhsm2-util; raises SoftHsmError when it is not installed."""
    path = shutil.which("softhsm2-util")
    if path is None:
        raise SoftHsmError("softhsm2-util not found: install the softhsm2 package")
    return path


def create_token_store(directory: str | os.PathLike[str]) -> Path:
    """Create a private SoftHSM2 store in `directory` and return the path of its config file.

    Point SOFTHSM2_CONF at the returned file before the PKCS#11 library is first loaded.
    """
    base = Path(directory).resolve()
    tokendir = base / "tokens"
    tokendir.mkdir(parents=True, exist_ok=True)
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n",
        encoding="utf-8",
    )
    return conf


def token_dir_of(conf_path: str | os.PathLike[str]) -> Path:
    """The tokendir named in a SoftHSM2 config file."""
    for line in Path(conf_path).read_text(encoding="utf-8").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "directories.tokendir":
            return Path(value.strip())
    raise SoftHsmError(f"{conf_path}: no directories.tokendir line")


def init_token(conf_path: str | os.PathLike[str], label: str, so_pin: str, pin: str) -> Path:
    """Initialise a new token in the first free slot of the store; return the token's directory.

    The directory is what a test moves away to simulate a removed token. PINs are passed on the
    command line: fine for throwaway test tokens, never do this with a production token.
    """
    tokendir = token_dir_of(conf_path)
    before = set(tokendir.iterdir()) if tokendir.exists() else set()
    env = dict(os.environ, SOFTHSM2_CONF=str(conf_path))
    result = subprocess.run(
        [
            softhsm_util(),
            "--init-token",
            "--free",
            "--label",
            label,
            "--so-pin",
            so_pin,
            "--pin",
            pin,
        ],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        # softhsm2-util does not echo PINs, but be safe: never include the arguments.
        raise SoftHsmError(
            f"softhsm2-util --init-token failed for token {label!r}: "
            f"{(result.stderr or result.stdout).strip()}"
        )
    created = sorted(set(tokendir.iterdir()) - before)
    if len(created) != 1:
        raise SoftHsmError(f"cannot tell which directory holds token {label!r} in {tokendir}")
    return created[0]


def new_token(directory: str | os.PathLike[str], label: str) -> tuple[Path, Path]:
    """A private store in `directory` with one token whose random PIN is written to
    `directory/pin` (mode 0600); returns (SOFTHSM2_CONF path, PIN file). For the demo and the
    benchmarks: a throwaway token, nothing to type."""
    conf = create_token_store(directory)
    pin = secrets.token_hex(8)
    init_token(conf, label, secrets.token_hex(8), pin)
    pin_file = Path(directory) / "pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(pin + "\n")
    return conf, pin_file
