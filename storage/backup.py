"""Backups of the repository: a consistent copy taken while the signer serves, with a manifest
that says what it holds, and the verification of both.

A backup is one tar file of two members: `data.mdb`, the compacted LMDB copy taken in one read
transaction (readers never block the writer, so the signer keeps serving), and
`manifest.json`, computed from that copy itself, so it describes exactly what was copied:
the applied index, each issuer's last CRL number, the content digest (`content_digest`, the
one both replicas agree on), counts, the schema version and the SHA-256 of `data.mdb`.
Verification recomputes all of it from the file. The file is written as `FILE.partial`,
fsync'ed and renamed: a backup that exists is complete.

`extract` gives a verified copy as a snapshot directory, which `Repository.restore` takes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

from storage.errors import RepositoryError
from storage.layout import DATA_FILE
from storage.repository import Repository
from storage.schema import SCHEMA_VERSION

FORMAT = "cacert-signer backup 1"
MANIFEST = "manifest.json"
CHUNK = 1 << 20
Progress = Callable[[int, int], None]  # (done, total) bytes


class BackupError(Exception):
    """The file is not a backup, or does not hold what its manifest says (each problem named)."""

    def __init__(self, path: Path, problems: list[str]):
        super().__init__(f"{path}: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Manifest:
    """What a backup holds. `crls`: issuer key id (hex) -> its last CRL's number and times."""

    created: int
    schema_version: int
    applied_index: int
    content_digest: str
    data_sha256: str
    data_bytes: int
    counts: dict[str, int]
    crls: dict[str, dict[str, int]]
    extra: dict[str, Any] = field(default_factory=dict)  # the caller's (cluster record, source)
    format: str = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        fields = json.loads(data)
        if not isinstance(fields, dict) or fields.get("format") != FORMAT:
            raise ValueError(f"not a manifest of {FORMAT!r}")
        return cls(**fields)


def make_backup(
    source: Path,
    out: Path,
    now: int,
    extra: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Copy the repository at `source` (open or not, by the signer or not) into backup `out`."""
    out = Path(out)
    work = Path(tempfile.mkdtemp(prefix=".backup-", dir=out.parent))
    try:
        with Repository(source, readonly=True) as repository:
            estimate = (Path(source) / DATA_FILE).stat().st_size  # the copy is compacted
            with _watching(work / "copy" / DATA_FILE, estimate, progress):
                repository.snapshot(work / "copy")
        facts = _describe(work / "copy")
        partial = out.with_name(out.name + ".partial")
        digest, size = _write_archive(partial, work / "copy" / DATA_FILE, progress)
        manifest = Manifest(created=now, data_sha256=digest, data_bytes=size,
                            extra=dict(extra or {}), **facts)  # fmt: skip
        _finish_archive(partial, manifest)
        os.replace(partial, out)
        _fsync_dir(out.parent)
        return manifest
    except OSError as exc:
        raise RepositoryError(f"backup to {out}: {exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
        out.with_name(out.name + ".partial").unlink(missing_ok=True)


def read_manifest(path: Path) -> Manifest:
    """The manifest alone (cheap: the archive's last member)."""
    with _archive(path) as archive:
        return _manifest_of(path, archive)


def verify_backup(path: Path, progress: Progress | None = None) -> Manifest:
    """Check the file against its manifest (data digest, applied index, CRL numbers, content
    digest, counts) and the copy's consistency; `BackupError` names every problem."""
    work = Path(tempfile.mkdtemp(prefix=".verify-", dir=Path(path).parent))
    try:
        return extract(path, work, progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def extract(path: Path, directory: Path, progress: Progress | None = None) -> Manifest:
    """Verify the backup and leave its copy in `directory` (a snapshot for `restore`)."""
    path, directory = Path(path), Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with _archive(path) as archive:
        manifest = _manifest_of(path, archive)
        data = _member(path, archive, DATA_FILE)
        digest, size = _copy(data, directory / DATA_FILE, manifest.data_bytes, progress)
    problems = []
    if (digest, size) != (manifest.data_sha256, manifest.data_bytes):
        problems.append(f"data.mdb differs from the manifest ({size} bytes, sha256 {digest})")
        raise BackupError(path, problems)
    if manifest.schema_version != SCHEMA_VERSION:
        return manifest  # an older format: its file digest holds; restoring migrates it
    facts = _describe(directory)
    for name, value in facts.items():
        if getattr(manifest, name) != value:
            problems.append(f"{name}: the copy has {value}, the manifest says "
                            f"{getattr(manifest, name)}")  # fmt: skip
    with Repository(directory, readonly=True) as repository:
        report = repository.check_consistency()
    problems += [f"inconsistent: {problem}" for problem in report.problems[:20]]
    (directory / "lock.mdb").unlink(missing_ok=True)
    if problems:
        raise BackupError(path, problems)
    return manifest


# --------------------------------------------------------------------------- helpers


def _describe(directory: Path) -> dict[str, Any]:
    """The manifest's facts about a copy, read from the copy."""
    with Repository(directory, readonly=True) as repository:
        counts = repository.counts()
        crls = {}
        for issuer in sorted(counts.pop("issuers")):
            last = repository.last_crl_history(issuer)
            if last is not None:
                crls[issuer.hex()] = {
                    "crl_number": int(last["crl_number"]),
                    "this_update": int(last["this_update"]),
                    "next_update": int(last["next_update"]),
                }
        facts = {
            "schema_version": repository.schema_version(),
            "applied_index": repository.last_applied_index(),
            "content_digest": repository.content_digest().hex(),
            "counts": {name: int(value) for name, value in counts.items()},
            "crls": crls,
        }
    (directory / "lock.mdb").unlink(missing_ok=True)
    return facts


@contextmanager
def _watching(path: Path, total: int, progress: Progress | None) -> Iterator[None]:
    """Report the size of a file LMDB writes in one call, twice a second, until it returns."""
    if progress is None:
        yield
        return
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            with suppress(OSError):
                progress(path.stat().st_size, total)

    watcher = threading.Thread(target=watch, name="backup-progress", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _write_archive(partial: Path, data: Path, progress: Progress | None) -> tuple[str, int]:
    """The archive's first member, data.mdb, hashed on the way; the manifest comes after."""
    size = data.stat().st_size
    digest = hashlib.sha256()
    partial.touch(mode=0o600)
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive, data.open("rb") as src:
        info = tarfile.TarInfo(DATA_FILE)
        info.size, info.mode = size, 0o600  # no time of its own: the manifest has `created`
        archive.addfile(info, _Hashing(src, digest, size, progress))
    return digest.hexdigest(), size


def _finish_archive(partial: Path, manifest: Manifest) -> None:
    with tarfile.open(partial, "a", format=tarfile.PAX_FORMAT) as archive:
        body = manifest.to_json()
        info = tarfile.TarInfo(MANIFEST)
        info.size, info.mode, info.mtime = len(body), 0o600, manifest.created
        archive.addfile(info, _Bytes(body))
    with partial.open("rb+") as handle:
        os.fsync(handle.fileno())


class _Hashing:
    """A file read by tarfile, hashed and reported as it goes."""

    def __init__(self, src: BinaryIO, digest: Any, total: int, progress: Progress | None):
        self.src, self.digest, self.total, self.progress = src, digest, total, progress
        self.done = 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.src.read(size)
        self.digest.update(chunk)
        self.done += len(chunk)
        if self.progress is not None:
            self.progress(self.done, self.total)
        return chunk


class _Bytes:
    def __init__(self, data: bytes):
        self.data = data

    def read(self, size: int = -1) -> bytes:
        chunk, self.data = (self.data, b"") if size < 0 else (self.data[:size], self.data[size:])
        return chunk


@contextmanager
def _archive(path: Path) -> Iterator[tarfile.TarFile]:
    try:
        with tarfile.open(path, "r:") as archive:
            yield archive
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(Path(path), [f"not a readable backup: {exc}"]) from None


def _member(path: Path, archive: tarfile.TarFile, name: str) -> IO[bytes]:
    try:
        info = archive.getmember(name)
    except KeyError:
        raise BackupError(path, [f"no {name} in the archive"]) from None
    handle = archive.extractfile(info) if info.isfile() else None
    if handle is None:
        raise BackupError(path, [f"{name} is not a regular file"])
    return handle


def _manifest_of(path: Path, archive: tarfile.TarFile) -> Manifest:
    try:
        return Manifest.from_json(_member(path, archive, MANIFEST).read(1 << 20))
    except (ValueError, TypeError) as exc:
        raise BackupError(path, [f"bad manifest: {exc}"]) from None


def _copy(src: IO[bytes], target: Path, total: int, progress: Progress | None) -> tuple[str, int]:
    digest = hashlib.sha256()
    done = 0
    with target.open("wb") as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest(), done


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
