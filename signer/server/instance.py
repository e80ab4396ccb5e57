"""One signer per repository and per serial line: exclusive locks taken at start.

Two `signer serve` on the same repository both ran and both issued (issue 11, item 9): each
applied its own commands to the same LMDB files, and the line answered from whichever read the
request. The first signer now holds an exclusive flock on `signer.pid` in its repository
directory (the file names its PID) and on its serial device (the link opens it with flock,
LOCK_EX); a second one refuses to start, naming the process that holds the lock. flock locks go
with the process: a killed signer leaves nothing to clean up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from signer.errors import ConfigError

LOCK_FILE = "signer.pid"


class AlreadyRunning(ConfigError):
    """Another process holds the repository or the serial device (exit code 2)."""


class InstanceLock:
    """The locks of one running signer; `release` (or the process's end) lets them go."""

    def __init__(self) -> None:
        self._held: list[int] = []

    def hold_directory(self, directory: Path) -> None:
        """Lock `directory/signer.pid` for this process and write its PID there."""
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _pid_in(fd) or holder_of(path)
            os.close(fd)
            raise AlreadyRunning(
                f"{directory} is in use by another signer (process {holder or 'unknown'}, "
                f"lock {path}): stop it first; two signers on one repository both issue"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._held.append(fd)

    def check_device(self, device: str | os.PathLike[str]) -> None:
        """Refuse a serial device another process holds a flock on (the link takes its own
        when it opens the port). Read from /proc/locks, without opening the device: opening a
        real UART raises DTR, which the other end may see. A device not there yet is not
        checked (the link waits for it)."""
        holder = holder_of(Path(device))
        if holder is not None and holder != os.getpid():
            raise AlreadyRunning(
                f"serial device {device} is in use by process {holder}: one signer (or client) "
                "per line"
            )

    def release(self) -> None:
        while self._held:
            os.close(self._held.pop())


def _pid_in(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip() or "x")
    return None


def holder_of(path: Path) -> int | None:
    """The PID holding a flock on `path`, from /proc/locks (Linux); None when unknown."""
    try:
        status = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
    for line in lines:
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            with contextlib.suppress(ValueError):
                return int(fields[4])
    return None
