"""The `replication:` section of a signer's YAML: who the peers are and how Raft is timed.

The secret that authenticates and encrypts the replication link is never part of the settings
(only where it comes from), so reprs and dumps of this model cannot leak it.
"""

from __future__ import annotations

import base64
import ipaddress
import itertools
import math
import os
import stat
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MIN_SECRET_BYTES = 16
MIN_SECRET_BITS = 128  # estimated (`estimated_bits`): 24 random bytes in hex or base64 or more
NEW_SECRET_BYTES = 32
MAKE_SECRET = "signer replication-secret --out FILE"


def parse_address(value: str) -> tuple[str, int]:
    """`host:port` with host an IP literal (v4, or v6 without brackets); raise ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{value!r}: expected IP:port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: the host must be an IP address of the link") from None
    if ip.is_unspecified:
        raise ValueError(f"{value!r}: bind to the link's own address, not to every interface")
    return host, int(port)


class ReplicationSettings(BaseModel):
    """Raft between the signers (pysyncobj over a dedicated link; see docs/replication.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    self_address: str = Field(description="this signer's IP:port on the replication link")
    peers: list[str] = Field(default_factory=list, description="the other voters' IP:port")
    secret_file: Path | None = Field(default=None, description="file (mode 0600) with the secret")
    secret_env: str | None = Field(default=None, description="or: environment variable")
    journal_dir: Path = Field(description="Raft journal, term/vote, snapshots (mode 0700)")
    control_socket: Path | None = Field(
        default=None, description="UNIX socket for `signer cluster` (default: journal_dir)"
    )
    commit_timeout: float = Field(default=5.0, gt=0, le=300)
    leader_wait: float = Field(default=3.0, ge=0, le=60, description="wait for an election")
    append_entries_period: float = Field(default=0.05, gt=0, le=5)
    election_min_timeout: float = Field(default=0.6, gt=0, le=60)
    election_max_timeout: float = Field(default=1.2, gt=0, le=120)
    connection_timeout: float = Field(default=2.0, gt=0, le=120)
    connection_retry: float = Field(default=0.5, ge=0, le=60)
    leader_fallback_timeout: float = Field(default=10.0, gt=0, le=3600)
    tick: float = Field(default=0.02, gt=0, le=1, description="longest wait of the Raft loop")
    snapshot_every_entries: int = Field(default=20000, ge=10)
    snapshot_interval: float = Field(default=86400.0, gt=0)
    snapshot_chunk_bytes: int = Field(default=256 * 1024, ge=4096, le=16 * 1024 * 1024)
    snapshot_send_buffer: int = Field(default=512 * 1024, ge=65536)
    socket_buffer_bytes: int = Field(default=1024 * 1024, ge=65536, le=64 * 1024 * 1024)
    clock_warn: float = Field(default=1.0, gt=0, description="warn above this clock difference")
    clock_wait: float = Field(default=2.0, ge=0, le=60, description="longest wait for the clock")

    @field_validator("self_address")
    @classmethod
    def _self_address(cls, value: str) -> str:
        parse_address(value)
        return value

    @field_validator("peers")
    @classmethod
    def _peers(cls, value: list[str]) -> list[str]:
        for peer in value:
            parse_address(peer)
        if len(set(value)) != len(value):
            raise ValueError("peers must be distinct")
        return value

    @model_validator(mode="after")
    def _check(self) -> ReplicationSettings:
        if (self.secret_file is None) == (self.secret_env is None):
            raise ValueError("set exactly one of secret_file and secret_env")
        if self.self_address in self.peers:
            raise ValueError("peers must not include self_address")
        if self.election_min_timeout <= 3 * self.append_entries_period:
            raise ValueError("election_min_timeout must exceed 3 x append_entries_period")
        if self.election_max_timeout <= self.election_min_timeout:
            raise ValueError("election_max_timeout must exceed election_min_timeout")
        if self.connection_timeout < self.election_max_timeout:
            raise ValueError("connection_timeout must be at least election_max_timeout")
        if self.leader_fallback_timeout <= self.append_entries_period:
            raise ValueError("leader_fallback_timeout must exceed append_entries_period")
        return self

    @property
    def socket_path(self) -> Path:
        return self.control_socket or self.journal_dir / "control.sock"

    def resolved(self, base_dir: str | os.PathLike[str]) -> ReplicationSettings:
        """A copy with relative paths made absolute against the config file's directory."""
        base = Path(base_dir)
        update: dict[str, Any] = {}
        for name in ("secret_file", "journal_dir", "control_socket"):
            value = getattr(self, name)
            if value is not None and not value.is_absolute():
                update[name] = base / value
        return self.model_copy(update=update)

    @classmethod
    def local_pair(
        cls, workdir: Path, ports: tuple[int, int], **timings: Any
    ) -> list[dict[str, Any]]:
        """`replication:` sections for two signers on this host (the demo, tests): 127.0.0.1,
        a shared secret in `workdir/replication.secret` (mode 0600), a journal dir each."""
        secret = workdir / "replication.secret"
        if not secret.exists():
            write_secret(secret)
        addresses = [f"127.0.0.1:{port}" for port in ports]
        return [
            {
                "self_address": address,
                "peers": [other for other in addresses if other != address],
                "secret_file": str(secret),
                "journal_dir": str(workdir / f"raft-{name}"),
                **timings,
            }
            for name, address in zip("ab", addresses, strict=True)
        ]

    def read_secret(self) -> bytes:
        """The replication secret; raises ValueError (never with the secret in the message)."""
        if self.secret_file is not None:
            check_private_file(self.secret_file)
            try:
                secret = self.secret_file.read_bytes().strip()
            except OSError as exc:
                raise ValueError(f"{self.secret_file}: cannot read: {exc.strerror}") from None
            where = str(self.secret_file)
        else:
            assert self.secret_env is not None
            secret = os.environ.get(self.secret_env, "").strip().encode()
            where = f"environment variable {self.secret_env}"
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(
                f"replication secret from {where} is missing or shorter than "
                f"{MIN_SECRET_BYTES} bytes; refusing to start without one (make one with "
                f"`{MAKE_SECRET}`)"
            )
        if (bits := estimated_bits(secret)) < MIN_SECRET_BITS:
            raise ValueError(
                f"replication secret from {where} is too predictable (about {bits:.0f} bits; "
                f"at least {MIN_SECRET_BITS} needed): refusing to start with it; make a "
                f"random one with `{MAKE_SECRET}` and copy it to every signer"
            )
        return secret


def estimated_bits(secret: bytes) -> float:
    """A cautious estimate of a secret's entropy: the least of three views that each see one
    kind of pattern: the symbols' frequencies (`aaaa`, a small alphabet), the steps between
    neighbours (`0123...`, `abcd...`) and what deflate leaves of it (`passwordpassword...`).
    Random bytes score close to their real entropy; dictionary words do not score low enough
    to be caught, hence the generator."""
    if not secret:
        return 0.0
    steps = bytes((b - a) % 256 for a, b in itertools.pairwise(secret))
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    packed = compressor.compress(secret) + compressor.flush()
    return min(
        len(secret) * _shannon(secret),
        len(steps) * _shannon(steps),
        8.0 * max(0, len(packed) - 2),
    )


def _shannon(data: bytes) -> float:
    """Bits per symbol of `data`'s own symbol frequencies."""
    total = len(data)
    if not total:
        return 0.0
    return -sum(n / total * math.log2(n / total) for n in Counter(data).values())


def new_secret() -> bytes:
    """A replication secret: 32 bytes from the OS's CSPRNG, base64 (one line of text)."""
    return base64.b64encode(os.urandom(NEW_SECRET_BYTES))


def write_secret(path: Path) -> None:
    """Write a new secret to `path`, mode 0600 from its creation; never overwrites (raises
    FileExistsError)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(new_secret() + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def check_private_file(path: Path) -> None:
    """Refuse a secret file that others can read (like ssh does for its keys); ValueError."""
    try:
        status = path.stat()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    if status.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(
            f"{path}: holds a secret but is accessible by group or others "
            f"(mode {stat.S_IMODE(status.st_mode):04o}); run: chmod 600 {path}"
        )
    if hasattr(os, "getuid") and status.st_uid not in (os.getuid(), 0):
        raise ValueError(f"{path}: holds a secret but belongs to another user")
