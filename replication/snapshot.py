"""Raft snapshots of the repository: a compacted LMDB copy with a trailer of Raft metadata.

pysyncobj keeps one snapshot file (`fullDumpFile`), which it sends to a follower that is too far
behind, in chunks, as is. Ours is the repository's `data.mdb` exactly as `Repository.snapshot`
writes it, followed by a trailer:

    data.mdb bytes || msgpack(meta) || u64be(len(meta)) || b"CSSNAP01"

LMDB ignores bytes past its last page, so the received file is restored with
`Repository.restore` as it is, without another copy. `meta` holds the last two Raft entries the
snapshot covers, the cluster membership, the repository's applied index inside the copy, the
clock floor (the latest proposal time) and when the snapshot was made.

Building and restoring take seconds for a large repository, so both run in a worker thread,
never on the Raft thread (see replication/raft.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from replication.journal import Entry
from replication.log import ReplicatedMachine

log = logging.getLogger(__name__)

TRAILER_MAGIC = b"CSSNAP01"
_TAIL = struct.Struct(">Q")
MAX_META = 1 << 20
DATA_FILE = "data.mdb"


class SnapshotError(Exception):
    """A snapshot file is missing, truncated or not ours."""


@dataclass(frozen=True)
class SnapshotMeta:
    last: Entry
    prev: Entry
    cluster: list[str]
    applied: int  # the repository's applied index inside the copy (<= last index)
    floor_ms: int  # the latest proposal time the snapshot covers
    created: float  # Unix time
    size: int = 0  # bytes of the whole file (set when read)

    def pack(self) -> bytes:
        fields = {
            "last": list(self.last),
            "prev": list(self.prev),
            "cluster": sorted(self.cluster),
            "applied": self.applied,
            "floor_ms": self.floor_ms,
            "created": self.created,
        }
        packed: bytes = msgpack.packb(fields, use_bin_type=True)
        return packed

    @classmethod
    def unpack(cls, data: bytes, size: int) -> SnapshotMeta:
        try:
            fields: dict[str, Any] = msgpack.unpackb(data, raw=False)
            return cls(
                last=_entry(fields["last"]),
                prev=_entry(fields["prev"]),
                cluster=[str(node) for node in fields["cluster"]],
                applied=int(fields["applied"]),
                floor_ms=int(fields["floor_ms"]),
                created=float(fields["created"]),
                size=size,
            )
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise SnapshotError(f"snapshot metadata unreadable: {exc}") from exc


def _entry(value: Any) -> Entry:
    command, index, term = value
    if not isinstance(command, bytes) or not isinstance(index, int) or not isinstance(term, int):
        raise TypeError("a snapshot entry must be [bytes, int, int]")
    return (command, index, term)


def read_meta(path: Path) -> SnapshotMeta:
    """The trailer of a snapshot file (reads only its end)."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size < _TAIL.size + len(TRAILER_MAGIC):
                raise SnapshotError(f"{path}: too short for a snapshot")
            handle.seek(size - _TAIL.size - len(TRAILER_MAGIC))
            tail = handle.read()
            if tail[_TAIL.size :] != TRAILER_MAGIC:
                raise SnapshotError(f"{path}: no snapshot trailer (truncated or not a snapshot)")
            (length,) = _TAIL.unpack(tail[: _TAIL.size])
            if length > MAX_META or length > size - len(tail):
                raise SnapshotError(f"{path}: snapshot trailer length {length} is impossible")
            handle.seek(size - len(tail) - length)
            return SnapshotMeta.unpack(handle.read(length), size)
    except OSError as exc:
        raise SnapshotError(f"{path}: cannot read snapshot: {exc.strerror}") from exc


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build(
    repository: ReplicatedMachine[Any], work_dir: Path, dest: Path, meta: SnapshotMeta
) -> SnapshotMeta:
    """Copy the repository into `dest` with the trailer; atomic: `dest` is replaced at the end.

    The copy may contain more than `meta.last` covers (commands applied while copying): replays
    of those are skipped by the repository's applied index, so that is harmless.
    """
    started = time.monotonic()
    shutil.rmtree(work_dir, ignore_errors=True)
    applied = repository.snapshot(work_dir)
    data = work_dir / DATA_FILE
    meta = dataclasses.replace(meta, applied=applied, cluster=sorted(meta.cluster))
    packed = meta.pack()
    with open(data, "ab") as handle:
        handle.write(packed + _TAIL.pack(len(packed)) + TRAILER_MAGIC)
        handle.flush()
        os.fsync(handle.fileno())
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(data, dest)
    _fsync(dest.parent)
    shutil.rmtree(work_dir, ignore_errors=True)
    size = dest.stat().st_size
    log.info(
        "snapshot at raft index %d (repository index %d): %.1f MB in %.2f s",
        meta.last[1],
        applied,
        size / 1e6,
        time.monotonic() - started,
    )
    return dataclasses.replace(meta, size=size)


def restore(repository: ReplicatedMachine[Any], source: Path, work_dir: Path) -> int:
    """Replace the repository's contents with snapshot file `source`; return its applied index.

    The file is hard-linked into `work_dir` so that pysyncobj may replace `source` meanwhile.
    """
    started = time.monotonic()
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    try:
        os.link(source, work_dir / DATA_FILE)
        size = (work_dir / DATA_FILE).stat().st_size
        log.info("restoring the repository from a %.1f MB snapshot", size / 1e6)
        applied = int(repository.restore(work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    log.info("repository restored to index %d in %.2f s", applied, time.monotonic() - started)
    return applied
