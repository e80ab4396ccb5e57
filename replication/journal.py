"""The Raft journal, durable: pysyncobj's log entries and term/vote on disk, flushed on demand.

pysyncobj's own FileJournal writes through mmap and never flushes, and rewrites itself in place
when compacting, so a power cut can lose acknowledged entries. This journal keeps the same
interface (`pysyncobj.journal.Journal`) with three differences:

- `sync()` makes every added entry durable (one fdatasync for any number of entries). The
  transport calls it before an entry can be counted anywhere: before the leader sends entries,
  before a follower acknowledges them, and before anything is applied to the repository.
- Records carry a CRC32; a torn tail (power cut mid-append) is cut off at the next open.
- Compaction writes a new file and renames it over the old one, so a crash leaves either.
- A write that fails (disk full, I/O error) never raises into pysyncobj: the entry stays in
  memory, `sync()` writes what the file lacks before it flushes and returns False while it
  cannot (`failure` says why), and `durable_index` stays where the disk is. Nothing is
  counted as stored before `sync()` succeeded (replication/transport.py), so a full disk
  stops commits instead of losing them, and they go on by themselves once there is space.
- Term, vote and commit index live in two fixed slots of a small file, overwritten in place
  (a CRC and a sequence number each): storing them needs no new disk blocks, and a torn write
  leaves the other slot.

`clear()` followed by the two `add()`s of a snapshot load keeps the entries after the
snapshot's last entry when this journal holds that same entry (Raft's rule for snapshots),
while `retain_suffix` is set: pysyncobj loads the local snapshot that way at start, and a crash
between writing a snapshot and compacting the journal must not lose committed entries.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from replication.pysyncobj_adapter import MEMBERSHIP, NO_OP, Journal

log = logging.getLogger(__name__)

MAGIC = b"cacert-signer raft journal v1\n"
_RECORD = struct.Struct("<II")  # payload length, CRC32 of the payload
_ENTRY = struct.Struct("<QQ")  # index, term
_SLOT = struct.Struct("<QII")  # sequence number, payload length, CRC32 of the payload
SLOT_BYTES = 512
META_MAGIC = b"cacert-signer raft state v1\n"

Entry = tuple[bytes, int, int]  # (command, index, term), as pysyncobj keeps them


_fdatasync = os.fdatasync  # (bench/replication.py measures the journal without it)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(entry: Entry) -> bytes:
    command, index, term = entry
    payload = _ENTRY.pack(index, term) + bytes(command)
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def read_entries(path: Path) -> tuple[list[Entry], list[int], int]:
    """Entries of a journal file, the offset of each, and where the valid part ends."""
    data = path.read_bytes() if path.exists() else b""
    if not data.startswith(MAGIC):
        if data:
            raise ValueError(f"{path}: not a cacert-signer raft journal")
        return [], [], 0
    entries: list[Entry] = []
    offsets: list[int] = []
    pos = len(MAGIC)
    while pos + _RECORD.size <= len(data):
        size, crc = _RECORD.unpack_from(data, pos)
        payload = data[pos + _RECORD.size : pos + _RECORD.size + size]
        if len(payload) != size or size < _ENTRY.size or zlib.crc32(payload) != crc:
            break
        index, term = _ENTRY.unpack_from(payload)
        entries.append((payload[_ENTRY.size :], index, term))
        offsets.append(pos)
        pos += _RECORD.size + size
    return entries, offsets, pos


class DurableJournal(Journal):
    """pysyncobj's journal interface on an append-only file with CRC'd records."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._meta_path = self.path.with_name(self.path.name + ".meta")
        entries, offsets, end = read_entries(self.path)
        size = self.path.stat().st_size if self.path.exists() else 0
        if end and size > end:
            log.warning("journal %s: cut off a torn tail of %d bytes", self.path, size - end)
        self._entries, self._offsets = entries, offsets
        self._fd = -1
        self._end = end
        self._unwritten = len(entries)  # entries from this position are not in the file yet
        self._needs_rewrite = False
        self.failure: str | None = None  # why the file cannot be written now
        if not end:
            self._rewrite()
        else:
            self._fd = os.open(self.path, os.O_RDWR)
            os.ftruncate(self._fd, end)
        self.durable_index = self.last_index
        self._dirty = False
        self._meta_fd, self._meta_seq, self._meta = self._open_meta()
        self._meta_dirty = False
        self._stash: list[Entry] | None = None
        self.retain_suffix = True
        self.syncs = 0

    # --- pysyncobj's interface ------------------------------------------------------------

    def add(self, command: bytes, idx: int, term: int) -> None:
        entry = (bytes(command), idx, term)
        self._entries.append(entry)
        if self._stash is not None:
            self._after_clear()
            return
        self._dirty = True
        if self._unwritten == len(self._entries) - 1 and not self._needs_rewrite:
            self._write_pending()

    def clear(self) -> None:
        """Called only by pysyncobj's snapshot load, which adds the snapshot's two entries next."""
        self._stash = self._entries
        self._entries = []

    def deleteEntriesFrom(self, entryFrom: int) -> None:
        self._settle()
        if entryFrom >= len(self._entries):
            return
        del self._entries[entryFrom:]
        self.durable_index = min(self.durable_index, self.last_index)
        self._dirty = True
        if self._needs_rewrite:
            return
        if entryFrom < self._unwritten:
            self._end = self._offsets[entryFrom]
            self._unwritten = entryFrom
            del self._offsets[entryFrom:]
            try:
                os.ftruncate(self._fd, self._end)
            except OSError as exc:
                self._fail(exc)
                self._needs_rewrite = True

    def deleteEntriesTo(self, entryTo: int) -> None:
        self._settle()
        self._entries = self._entries[entryTo:]
        self._try_rewrite()

    def __getitem__(self, item: Any) -> Any:
        return self._entries[item]

    def __len__(self) -> int:
        return len(self._entries)

    def _destroy(self) -> None:
        """pysyncobj's name for close()."""
        self.close()

    def setRaftCommitIndex(self, raftCommitIndex: int) -> None:
        if self._meta.get("commit") != raftCommitIndex:
            self._meta["commit"] = raftCommitIndex
            self._meta_dirty = True

    def getRaftCommitIndex(self) -> int:
        return int(self._meta.get("commit", 1))

    def setCurrentTerm(self, term: int, votedForNodeId: Any) -> None:
        # Raft needs term and vote on disk before any message reflecting them goes out.
        self._meta["term"] = term
        self._meta["voted_for"] = votedForNodeId
        self._store_meta()

    def getCurrentTerm(self) -> int:
        return int(self._meta.get("term", 0))

    def getVotedForNodeId(self) -> Any:
        return self._meta.get("voted_for")

    def onOneSecondTimer(self) -> None:
        if self._meta_dirty:
            try:
                self._store_meta()
            except OSError:
                log.exception("journal %s: storing the commit index failed", self.path)

    # --- durability -----------------------------------------------------------------------

    def sync(self) -> bool:
        """Make every entry added so far durable (no-op when nothing changed); False when the
        file cannot be written now (`failure` says why): nothing new is durable then."""
        self._settle()
        if self._needs_rewrite and not self._try_rewrite():
            return False
        if self._unwritten < len(self._entries) and not self._write_pending():
            return False
        if self._dirty:
            try:
                _fdatasync(self._fd)
            except OSError as exc:
                self._fail(exc)
                return False
            self._dirty = False
            self.syncs += 1
        if self.failure is not None:
            log.warning("journal %s: writing again", self.path)
            self.failure = None
        self.durable_index = self.last_index
        return True

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            self._store_meta()
            os.close(self._fd)
            self._fd = -1
        if self._meta_fd >= 0:
            os.close(self._meta_fd)
            self._meta_fd = -1

    @property
    def last_index(self) -> int:
        return self._entries[-1][1] if self._entries else 0

    def neutralize_membership(self) -> int:
        """Turn membership-change entries into no-ops (same index and term); return how many.

        Used by force-standalone: the survivor's membership is decided by the operator, so
        changes still in the journal must not re-add the fenced signer when replayed.
        """
        changed = 0
        for i, (command, index, term) in enumerate(self._entries):
            if command[:1] == bytes([MEMBERSHIP]):
                self._entries[i] = (NO_OP, index, term)
                changed += 1
        if changed and not self._try_rewrite():
            raise OSError(f"journal {self.path}: cannot rewrite: {self.failure}")
        return changed

    # --- internals ------------------------------------------------------------------------

    def _fail(self, exc: OSError) -> None:
        if self.failure is None:
            log.error("journal %s: cannot write: %s", self.path, exc)
        self.failure = f"{exc.strerror or exc} (journal {self.path})"

    def _write_pending(self) -> bool:
        """Append the records the file lacks; False (and `failure`) when it cannot."""
        records = [_encode(entry) for entry in self._entries[self._unwritten :]]
        data = b"".join(records)
        try:
            written = os.pwrite(self._fd, data, self._end)
            if written != len(data):
                raise OSError(errno.ENOSPC, "No space left on device (a short write)")
        except OSError as exc:
            self._fail(exc)
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)  # no torn record left behind
            return False
        for record in records:
            self._offsets.append(self._end)
            self._end += len(record)
        self._unwritten = len(self._entries)
        return True

    def _after_clear(self) -> None:
        """After clear(): once the snapshot's two entries are in, keep what followed them."""
        if len(self._entries) < 2:
            return
        stash, self._stash = self._stash or [], None
        _, last_index, last_term = self._entries[-1]
        if self.retain_suffix:
            for position, (_, index, term) in enumerate(stash):
                if index == last_index and term == last_term:
                    kept = stash[position + 1 :]
                    if kept:
                        log.info("journal: kept %d entries after the snapshot", len(kept))
                    self._entries.extend(kept)
                    break
        self.durable_index = 0
        self._try_rewrite()

    def _settle(self) -> None:
        """A clear() not followed by its adds (never seen): write what we have."""
        if self._stash is not None:
            self._stash = None
            self._try_rewrite()

    def _try_rewrite(self) -> bool:
        """The file made to hold exactly the entries in memory; on failure it is retried by
        the next sync(), which fails until then (the file keeps its old content meanwhile)."""
        try:
            self._rewrite()
        except OSError as exc:
            self._fail(exc)
            self._needs_rewrite = True
            self._dirty = True
            self.durable_index = min(self.durable_index, self.last_index)
            return False
        self._needs_rewrite = False
        self.durable_index = self.last_index
        return True

    def _rewrite(self) -> None:
        """Write all entries to a new file, make it durable, rename it over the journal."""
        temp = self.path.with_name(self.path.name + ".tmp")
        records = [_encode(entry) for entry in self._entries]
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            data = MAGIC + b"".join(records)
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "No space left on device (a short write)")
            os.fsync(fd)
        except OSError:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(temp, self.path)
        _fsync_dir(self.path.parent)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR)
        self._offsets = []
        pos = len(MAGIC)
        for record in records:
            self._offsets.append(pos)
            pos += len(record)
        self._end = pos
        self._unwritten = len(self._entries)
        self._dirty = False

    # --- term, vote, commit index: two slots overwritten in place ---------------------------

    def _open_meta(self) -> tuple[int, int, dict[str, Any]]:
        """The state file (created with both slots allocated), its newest slot's sequence
        number and content. A legacy JSON file (written by rename) is read and converted."""
        try:
            raw = self._meta_path.read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            raise ValueError(f"{self._meta_path}: unreadable raft state: {exc}") from exc
        if raw.startswith(META_MAGIC):
            seq, meta = _newest_slot(raw[len(META_MAGIC) :])
            fd = os.open(self._meta_path, os.O_RDWR)
            return fd, seq, meta
        meta = {}
        if raw:
            try:
                meta = dict(json.loads(raw.decode("utf-8")))
            except ValueError as exc:
                raise ValueError(f"{self._meta_path}: unreadable raft state: {exc}") from exc
        temp = self._meta_path.with_name(self._meta_path.name + ".tmp")
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, META_MAGIC + _slot(1, meta) + bytes(SLOT_BYTES))
            os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        os.replace(temp, self._meta_path)
        _fsync_dir(self._meta_path.parent)
        return fd, 1, meta

    def _store_meta(self) -> None:
        if self._meta_fd < 0:
            return
        self._meta_seq += 1
        offset = len(META_MAGIC) + (self._meta_seq % 2) * SLOT_BYTES
        os.pwrite(self._meta_fd, _slot(self._meta_seq, self._meta), offset)
        os.fdatasync(self._meta_fd)
        self._meta_dirty = False


def _slot(seq: int, meta: dict[str, Any]) -> bytes:
    payload = json.dumps(meta, sort_keys=True).encode()
    if len(payload) > SLOT_BYTES - _SLOT.size:
        raise ValueError("raft state too large for its slot")
    record = _SLOT.pack(seq, len(payload), zlib.crc32(payload)) + payload
    return record + bytes(SLOT_BYTES - len(record))


def _newest_slot(data: bytes) -> tuple[int, dict[str, Any]]:
    best: tuple[int, dict[str, Any]] = (0, {})
    for offset in (0, SLOT_BYTES):
        seq, size, crc = _SLOT.unpack_from(data.ljust(2 * SLOT_BYTES, b"\0"), offset)
        payload = data[offset + _SLOT.size : offset + _SLOT.size + size]
        if len(payload) == size and zlib.crc32(payload) == crc and seq > best[0]:
            best = (seq, dict(json.loads(payload.decode())))
    return best
