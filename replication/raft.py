"""The replicated log: the same `Log` interface as LocalLog, committed by Raft on every signer.

`RaftLog.commit(command)` answers once the command is committed (on disk on a majority of the
voters: both, in a pair) and applied to this signer's repository. Either signer may commit:
pysyncobj forwards a follower's proposal to the leader and the follower's answer waits until it
has applied the entry itself. Entries are opaque bytes and results whatever the state machine
answers: this module knows nothing of certificates (replication/log.py).

Threads: pysyncobj runs in one thread of ours (the Raft thread) that owns the SyncObj, the
journal and all pysyncobj state; asyncio callers hand proposals over and get their futures
resolved with `call_soon_threadsafe`. Applying is batched: entries are collected while pysyncobj
applies them and written in one LMDB transaction (one fsync) at the end of each loop turn, which
is also when waiting callers get their results. Snapshots are built and restored in worker
threads, so the Raft thread never stalls past an election timeout.

Guarantees and failure modes are in docs/replication.md. pysyncobj's internals are reached only
through replication/pysyncobj_adapter.py (each reliance named there and checked by a test).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from replication import snapshot
from replication.cluster import CLUSTER_META, ClusterRecord, Hello, Verdict, judge, next_record
from replication.connection import session_secret
from replication.errors import (
    ApplyFailed,
    ClockBehind,
    EntryTooLarge,
    Fenced,
    JournalFailed,
    MembershipConflict,
    MembershipRefused,
    NoQuorum,
    NotCommitted,
    QueueFull,
    ReplicationError,
    StartRefused,
)
from replication.journal import DurableJournal, read_entries
from replication.log import MAX_ENTRY_BYTES, ReplicatedMachine, settle, settle_all
from replication.pysyncobj_adapter import (
    FAIL_REASON,
    NO_OP,
    SERIALIZER_STATE,
    TESTED_VERSIONS,
    VERSION,
    RaftNode,
    TCPNode,
    configuration,
)
from replication.settings import ReplicationSettings, parse_address
from replication.transport import MAX_MERGED_BYTES, ReplicationTransport

log = logging.getLogger(__name__)

TESTED_PYSYNCOBJ = TESTED_VERSIONS
MAX_BATCH = 2000  # entries applied in one LMDB transaction
CATCH_UP_REPORT = 1000  # entries behind before catch-up progress is logged

R = TypeVar("R")


@dataclass(frozen=True)
class View:
    """What asyncio callers may read without asking the Raft thread (refreshed every turn)."""

    running: bool = False
    role: str = "stopped"
    leader: str | None = None
    term: int = 0
    commit_index: int = 0
    applied_index: int = 0  # in the repository (handed over by pysyncobj and applied)
    last_index: int = 0
    has_quorum: bool = False
    members: tuple[str, ...] = ()
    leader_connected: bool = False  # proposals can reach the leader now


@dataclass(frozen=True)
class ClusterHealth:
    """The cluster as health reports it: plain data, warnings and errors (the signer host
    turns it into its `cluster` section)."""

    data: dict[str, Any]
    warnings: list[str]
    errors: list[str]


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _failure(reason: int) -> ReplicationError:
    if reason == FAIL_REASON.MISSING_LEADER:
        return NoQuorum("no leader: the cluster has no quorum")
    if reason == FAIL_REASON.QUEUE_FULL:
        return QueueFull("the replication queue is full; retry later")
    return NotCommitted(
        "the leader changed before the commit was confirmed; retry with the same request id"
    )


class RaftLog(Generic[R]):
    """The replicated commit log of one signer (see the module docstring)."""

    def __init__(
        self,
        settings: ReplicationSettings,
        machine: ReplicatedMachine[R],
        *,
        secret: bytes | None = None,
        transport_class: type[ReplicationTransport] = ReplicationTransport,
    ):
        self.settings = settings
        self.machine = machine
        self.address = settings.self_address
        self.transport_class = transport_class
        self._secret = secret
        self._session_secret: bytes | None = None
        base = settings.journal_dir
        self.journal_path = base / "raft.journal"
        self.snapshot_path = base / "snapshot" / snapshot.DATA_FILE
        self.fence_path = base / "FENCED"
        self._build_dir = base / "snapshot.building"
        self._restore_dir = base / "restore"
        self._boot = secrets.token_bytes(8)  # tells this process's proposals from replays
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._waiters: dict[int, _Waiter] = {}
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Any, Any]] = queue.SimpleQueue()
        self._pending: list[tuple[int, bytes | None, int | None]] = []
        self._pending_since = 0.0  # when the oldest pending entry was handed over
        self._floor_ms = 0
        self._view = View()
        self._peers = list(settings.peers)
        self._node: RaftNode | None = None
        self._journal: DurableJournal | None = None
        self._transport: ReplicationTransport | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._settled_at = 0.0  # until then, a missing quorum may just be connections starting
        self._last_raft_applied = 0
        self._fenced: str | None = None
        self._record: ClusterRecord | None = None
        self._record_raw: bytes | None = None  # as stored: what a change compares against
        self._bootstrap_after = 0.0
        self._apply_error: str | None = None
        self._restore_lock = threading.Lock()
        self._restore_source: Path | None = None
        self._restoring = False
        self._restored = False
        self._restore_error: str | None = None
        self._snap_request: snapshot.SnapshotMeta | None = None
        self._snap_thread: threading.Thread | None = None
        self._snap_result: int | None = None
        self.last_snapshot: snapshot.SnapshotMeta | None = None
        self.snapshot_seconds: float | None = None
        self._catch_up_logged = 0.0
        self.max_loop = 0.0  # longest turn of the Raft loop, seconds (stalls show here)
        self._term_start = (0, 0)  # (term, index of its first entry) while leader
        self._read_waiters: list[tuple[int, asyncio.AbstractEventLoop, asyncio.Future[Any]]] = []
        self.counters = {
            "commits": 0,
            "barriers": 0,
            "local_reads": 0,
            "applied": 0,
            "batches": 0,
        }

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> RaftLog[R]:
        """Check the local state, then join the cluster; raises StartRefused when unsafe."""
        if VERSION not in TESTED_PYSYNCOBJ:
            raise StartRefused(
                f"pysyncobj {VERSION} is installed; this signer is tested with "
                f"{', '.join(TESTED_PYSYNCOBJ)} only (it relies on its apply order)"
            )
        if self._secret is None:
            try:
                self._secret = self.settings.read_secret()
            except ValueError as exc:
                raise StartRefused(str(exc)) from None
        self.settings.journal_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.fence_path.exists():
            raise StartRefused(
                f"this signer was fenced out of its cluster: {self.fence_path.read_text().strip()}"
                f"; wipe {self.settings.journal_dir} and the repository, then add it again"
            )
        try:
            self._load_record()
        except ValueError as exc:
            raise StartRefused(f"the repository's cluster record is unreadable: {exc}") from None
        if self._record is not None and self.address not in self._record.members:
            raise StartRefused(
                f"this signer ({self.address}) is not a member of its cluster (generation "
                f"{self._record.generation}: {', '.join(self._record.members)}); wipe "
                "its journal directory and repository, then add it again"
            )
        self._reconcile_snapshot()
        self._journal = DurableJournal(self.journal_path)
        self._check_journal()
        self._commit_up_to_snapshot()
        self._start_loop()
        return self

    def close(self) -> None:
        self._stop_loop()
        for thread in (self._snap_thread,):
            if thread is not None:
                thread.join(timeout=60)

    def _reconcile_snapshot(self) -> None:
        """Before Raft runs: the repository must hold at least what the local snapshot holds."""
        applied = self.machine.last_applied_index()
        if self.snapshot_path.exists():
            try:
                meta = snapshot.read_meta(self.snapshot_path)
            except snapshot.SnapshotError as exc:
                raise StartRefused(
                    f"{exc}; move {self.snapshot_path} away and the leader will send a new one"
                ) from None
            self._floor_ms = max(self._floor_ms, meta.floor_ms)
            self.last_snapshot = meta
            if meta.applied > applied:
                log.warning(
                    "the repository (index %d) is behind the local snapshot (index %d), "
                    "which an interrupted restore left: restoring it now",
                    applied,
                    meta.applied,
                )
                snapshot.restore(self.machine, self.snapshot_path, self._restore_dir)
            return
        entries, _, _ = read_entries(self.journal_path)
        if applied and not entries and self._record is None:
            # A standalone signer's repository becomes the start of the replicated log, its
            # cluster identity recorded first (a joining signer then knows where data is from).
            members = sorted([self.address, *self._peers])
            record = next_record(None, members, "create from a standalone signer")
            applied += 1
            self.machine.apply_batch([(applied, self._record_entry(record))])
            self._load_record()
            log.info("starting the replicated log at the repository's index %d", applied)
            meta = snapshot.SnapshotMeta(
                last=(NO_OP, applied, 0),
                prev=(NO_OP, applied - 1, 0),
                cluster=sorted([self.address, *self._peers]),
                applied=0,
                floor_ms=0,
                created=time.time(),
            )
            self.last_snapshot = snapshot.build(
                self.machine, self._build_dir, self.snapshot_path, meta
            )

    def recover_standalone(self, first: Sequence[bytes] = ()) -> int:
        """Offline (signer stopped, journal directory empty): make this repository, restored
        from a backup after losing every signer, the start of a new log with this signer as the
        only member; returns the new generation. `first`: entries the owner applies before the
        new log begins (the signer's restore rule). Signers that kept other data are refused by
        it (their histories diverge): they are wiped and added again."""
        if self.journal_path.exists() or self.snapshot_path.exists():
            raise StartRefused(
                f"{self.settings.journal_dir} is not empty: recovery starts a new log from the "
                "repository alone; move the old journal directory away first"
            )
        applied = self.machine.last_applied_index()
        if not applied:
            raise StartRefused("the repository is empty: nothing to recover, just start")
        self.settings.journal_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if first:
            self.machine.apply_batch([(applied + 1 + i, e) for i, e in enumerate(first)])
            applied += len(first)
        self._load_record()
        record = next_record(self._record, [self.address], "recover from a backup")
        self.machine.apply_batch([(applied + 1, self._record_entry(record))])
        if self.machine.meta(CLUSTER_META) != record.pack():
            raise ReplicationError("recording the recovery in the repository failed")
        meta = snapshot.SnapshotMeta(
            last=(NO_OP, applied + 1, 0),
            prev=(NO_OP, applied, 0),
            cluster=[self.address],
            applied=0,
            floor_ms=0,
            created=time.time(),
        )
        self.last_snapshot = snapshot.build(self.machine, self._build_dir, self.snapshot_path, meta)
        return record.generation

    def _commit_up_to_snapshot(self) -> None:
        """What a snapshot holds is committed: say so in the journal. pysyncobj would otherwise
        start from a commit index below its journal (after a bootstrap snapshot, say) and its
        leader would walk every index up to it one by one: seconds at a million entries."""
        assert self._journal is not None
        snapshot_end = self.last_snapshot.last[1] if self.last_snapshot else 0
        if self._journal.getRaftCommitIndex() < snapshot_end:
            self._journal.setRaftCommitIndex(snapshot_end)
            self._journal.onOneSecondTimer()  # stores it

    def _check_journal(self) -> None:
        assert self._journal is not None
        snapshot_end = self.last_snapshot.last[1] if self.last_snapshot else 0
        covered = max(self._journal.last_index, snapshot_end)
        applied = self.machine.last_applied_index()
        if applied > covered:
            raise StartRefused(
                f"the repository is at index {applied} but the Raft journal ends at {covered}: "
                "the journal was lost or belongs to another repository; wipe both (the signer "
                "then catches up from its peer) or restore the matching journal directory"
            )

    def _start_loop(self) -> None:
        s = self.settings
        self._settled_at = time.monotonic() + s.connection_timeout + s.election_max_timeout
        self._stop.clear()
        started = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=self._run, args=(started, errors), name=f"raft {self.address}", daemon=True
        )
        self._thread.start()
        started.wait()
        if errors:
            raise errors[0]

    def _stop_loop(self) -> None:
        thread = self._thread
        if thread is None:
            return
        self._stop.set()
        thread.join(timeout=30)
        self._thread = None

    def _run(self, started: threading.Event, errors: list[BaseException]) -> None:
        try:
            node = self._construct()
        except Exception as exc:  # bind failure, bad state: the starter reports it
            if self._journal is not None:
                self._journal.close()
            errors.append(StartRefused(f"replication could not start: {exc}"))
            started.set()
            return
        self._node = node
        node.addOnTickCallback(self._after_tick)
        node.pace_snapshot_reads(self._may_send_snapshot_chunk)
        node.enable_wakeups()
        started.set()
        log.info("replication: %s started with peers %s", self.address, self._peers or "none")
        first = True
        failures = 0.0
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                node.doTick(self.settings.tick)
            except Exception:
                if time.monotonic() - failures > 10:
                    log.exception("replication: the Raft loop failed (retrying)")
                    failures = time.monotonic()
                time.sleep(0.2)
            took = time.monotonic() - began
            self.max_loop = max(self.max_loop, took)
            if took > self.settings.election_min_timeout:
                log.warning("replication: the Raft loop was busy for %.0f ms", took * 1000)
            if first:
                assert self._journal is not None
                self._journal.retain_suffix = False  # from now on a snapshot load is an install
                first = False
        self._shutdown(node)

    def _shutdown(self, node: RaftNode) -> None:
        try:
            self._flush()
        except Exception:
            log.exception("replication: applying the last entries failed")
        self._last_raft_applied = node.raftLastApplied
        with self._lock:
            self._node = None
        self._view = View()
        self._fail_waiters(NoQuorum("replication stopped on this signer"))
        node.destroy()  # autoTick is off: destroys at once, closes the transport and the journal
        log.info("replication: %s stopped", self.address)

    def _construct(self) -> RaftNode:
        s = self.settings
        conf = configuration(
            password=self._secret,
            autoTick=False,
            appendEntriesUseBatch=False,
            commandsWaitLeader=False,
            dynamicMembershipChange=True,
            bindAddress=self.address,
            maxBindRetries=1,
            appendEntriesPeriod=s.append_entries_period,
            raftMinTimeout=s.election_min_timeout,
            raftMaxTimeout=s.election_max_timeout,
            connectionTimeout=s.connection_timeout,
            connectionRetryTime=s.connection_retry,
            leaderFallbackTimeout=s.leader_fallback_timeout,
            logCompactionMinEntries=s.snapshot_every_entries,
            logCompactionMinTime=s.snapshot_interval,
            logCompactionBatchSize=s.snapshot_chunk_bytes,
            sendBufferSize=s.socket_buffer_bytes,
            recvBufferSize=s.socket_buffer_bytes,
            fullDumpFile=str(self.snapshot_path),
            journalFile=str(self.journal_path),
            serializer=self._serialize,
            deserializer=self._deserialize,
            serializeChecker=self._check_snapshot,
            onStateChanged=self._on_state_changed,
        )
        self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
        assert self._journal is not None
        return RaftNode(
            self.address,
            self._peers,
            conf,
            self._journal,
            self.on_entry,
            self.transport_class,
            link_owner=self,
        )

    def _may_send_snapshot_chunk(self, peer: Any) -> bool:
        """Read the next snapshot chunk only when the peer's send buffer has room."""
        transport = self._transport
        return transport is None or transport.backlog(peer) <= self.settings.snapshot_send_buffer

    # --- the transport's side (Raft thread) -----------------------------------------------

    def attach(self, transport: ReplicationTransport) -> None:
        self._transport = transport

    def hello(self) -> Hello:
        return Hello(self.address, self.machine.last_applied_index(), self._record)

    def judge(self, peer: Hello) -> tuple[Verdict, str]:
        return judge(self.hello(), peer)

    def sync_journal(self) -> bool:
        """Make the journal durable; False while it cannot be written (disk full)."""
        return self._journal is None or self._journal.sync()

    def durable_index(self) -> int:
        return 0 if self._journal is None else self._journal.durable_index

    def journal_failure(self) -> str | None:
        return None if self._journal is None else self._journal.failure

    @property
    def handshake_timeout(self) -> float:
        return self.settings.connection_timeout

    @property
    def heartbeat(self) -> float:
        return self.settings.append_entries_period

    @property
    def session_secret(self) -> bytes | None:
        """What the link's session keys are derived from (docs/replication.md, Security)."""
        if self._session_secret is None and self._secret is not None:
            self._session_secret = session_secret(self._secret)
        return self._session_secret

    @property
    def frame_limit(self) -> int:
        """The largest frame a member may send: a snapshot chunk or a coalesced append, as
        Fernet's base64 grows them, with room to spare."""
        return 2 * max(self.settings.snapshot_chunk_bytes, MAX_MERGED_BYTES) + (1 << 20)

    def snapshot_size(self) -> int:
        try:
            return self.snapshot_path.stat().st_size
        except OSError:
            return 0

    def fence(self, reason: str) -> None:
        """This signer is stale: stop replicating for good (until wiped) and say why."""
        if self._fenced is not None:
            return
        self._fenced = reason
        log.error("replication: FENCED: %s", reason)
        try:
            self.fence_path.write_text(f"{reason} (at {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        except OSError:
            log.exception("replication: could not write %s", self.fence_path)
        self._stop.set()
        self._fail_waiters(Fenced(f"this signer is fenced: {reason}"))

    # --- applying (Raft thread) -----------------------------------------------------------

    def on_entry(self, index: int, entry: Any) -> None:
        try:
            kind, (origin, boot), pid, stamp, payload = entry
        except (TypeError, ValueError):
            log.error("replication: skipping a malformed entry at index %d", index)
            return
        self._floor_ms = max(self._floor_ms, int(stamp))
        mine = pid if origin == self.address and boot == self._boot else None
        if kind == "c" and not isinstance(payload, bytes):
            # Not an entry of this version (an older one carried dicts): every replica hands
            # the machine the same empty entry, which it rejects; nothing is written.
            log.error("replication: the entry at index %d is not bytes", index)
            payload = b""
        if not self._pending:
            self._pending_since = time.monotonic()
        self._pending.append((index, payload if kind == "c" else None, mine))
        if len(self._pending) >= MAX_BATCH:
            self._flush()

    def _flush(self) -> None:
        """Apply what pysyncobj handed over in one transaction; answer the waiting callers."""
        if not self._pending or self._restoring:
            return
        if not self.sync_journal():
            return  # nothing reaches the repository before the journal holds it
        pending = self._pending
        commands = [(index, command) for index, command, _ in pending if command is not None]
        try:
            results = iter(self.machine.apply_batch(commands) if commands else [])
        except Exception as exc:
            if self._apply_error is None:
                log.exception("replication: applying to the repository failed (will retry)")
            self._apply_error = f"{type(exc).__name__}: {exc}"
            error = ApplyFailed(f"applying failed: {exc}")
            for _, _, pid in pending:
                if pid is not None:
                    self._resolve(pid, error)
            return
        self._apply_error = None
        self._pending = []
        answers: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        with self._lock:
            for _, command, pid in pending:
                result = next(results) if command is not None else None
                waiter = self._waiters.pop(pid, None) if pid is not None else None
                if waiter is not None:
                    answers.setdefault(waiter.loop, []).append((waiter.future, result))
        for loop, settled in answers.items():  # one wake-up per event loop, not per answer
            loop.call_soon_threadsafe(settle_all, settled)
        self.counters["applied"] += len(commands)
        self.counters["batches"] += 1
        if commands:
            self._load_record()  # one read: any of them may have changed the membership

    def _flush_due(self) -> None:
        """Apply now what a caller here waits for (a commit, a local read); entries nobody
        here waits for (the other signer's commands) wait up to a heartbeat and are applied
        together: their LMDB commit (an fdatasync) would otherwise run while the other signer
        commits the same entry for its caller, the two disks' flushes in each other's way."""
        if not self._pending:
            return
        due = self._pending_since + self.settings.append_entries_period
        awaited = any(mine is not None for _, _, mine in self._pending)
        if awaited or self._read_waiters or time.monotonic() >= due:
            self._flush()

    def _resolve(self, pid: int, value: Any) -> None:
        with self._lock:
            waiter = self._waiters.pop(pid, None)
        if waiter is not None:
            waiter.loop.call_soon_threadsafe(settle, waiter.future, value)

    def _callback(self, pid: int, _result: Any, reason: int) -> None:
        if reason != FAIL_REASON.SUCCESS:
            self._resolve(pid, _failure(reason))

    def _fail_waiters(self, error: ReplicationError) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.loop.call_soon_threadsafe(settle, waiter.future, error)
        reads, self._read_waiters = self._read_waiters, []
        for _, loop, future in reads:
            loop.call_soon_threadsafe(settle, future, error)

    # --- every turn of the Raft loop ------------------------------------------------------

    def _after_tick(self) -> None:
        """The end of each turn; applying and answering last, so that the loop waits for
        events right after the answers (the event loop takes the interpreter then)."""
        self._keep_sending_snapshots()
        if self._restored:
            self._restored = False
            self._load_record()
        self._update_view()
        self._check_membership()
        self._maybe_bootstrap_record()
        self._report_catch_up()
        self._flush_due()
        self._run_calls()
        self._answer_reads()

    def _keep_sending_snapshots(self) -> None:
        """While a snapshot goes out, send its next chunks every turn the socket drained
        (the poll wakes when it can write), not once per heartbeat period."""
        transport, node = self._transport, self._node
        if transport is not None and node is not None and transport.outgoing and node.is_leader:
            node.send_appends()

    def _run_calls(self) -> None:
        while True:
            try:
                function, loop, future = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                value = function()
            except Exception as exc:
                value = exc
            loop.call_soon_threadsafe(settle, future, value)

    def _update_view(self) -> None:
        node = self._node
        assert node is not None and self._journal is not None
        leader = node.leader_id
        role = "leader" if node.is_leader else "follower" if leader is not None else "electing"
        members = (self.address, *(peer.id for peer in node.otherNodes))
        term = node.raftCurrentTerm
        if role == "leader" and self._term_start[0] != term:
            self._term_start = (term, self._first_index_of(term))
        self._view = View(
            running=True,
            role=role,
            leader=leader,
            term=term,
            commit_index=node.raftCommitIndex,
            applied_index=self._pending[0][0] - 1 if self._pending else node.raftLastApplied,
            last_index=self._journal.last_index,
            has_quorum=node.hasQuorum,
            members=tuple(sorted(members)),
            leader_connected=node.leader_connected(),
        )

    def _first_index_of(self, term: int) -> int:
        """The index of this term's first entry in the journal (a new leader's no-op)."""
        journal = self._journal
        assert journal is not None
        position = len(journal)
        if not position or journal[position - 1][2] != term:
            return journal.last_index + 1
        while position > 1 and journal[position - 2][2] == term:
            position -= 1
        return int(journal[position - 1][1])

    def _check_membership(self) -> None:
        """Removed by a committed record, once caught up: stop (a later re-add needs a wipe)."""
        record, view = self._record, self._view
        if record is None or self.address in record.members or self._pending:
            return
        if view.applied_index >= view.commit_index:
            self.fence(
                f"this signer was removed from the cluster at generation {record.generation}"
                f" ({record.event})"
            )

    def _maybe_bootstrap_record(self) -> None:
        """The first leader records the cluster's identity (id, generation 1, members)."""
        view = self._view
        if self._record is not None or view.role != "leader" or self._pending:
            return
        if view.applied_index < view.commit_index or time.monotonic() < self._bootstrap_after:
            return
        self._bootstrap_after = time.monotonic() + 5
        entry = self._record_entry(next_record(None, list(view.members), "create"))
        assert self._node is not None
        self._node.propose(("c", (self.address, self._boot), 0, self._now_ms(), entry), None)

    def _report_catch_up(self) -> None:
        view = self._view
        behind = view.commit_index - view.applied_index
        now = time.monotonic()
        if behind > CATCH_UP_REPORT and now - self._catch_up_logged > 2:
            self._catch_up_logged = now
            log.info(
                "replication: catching up: applied %d of %d (%.0f%%)",
                view.applied_index,
                view.commit_index,
                100 * view.applied_index / max(1, view.commit_index),
            )

    def _on_state_changed(self, old: int, new: int) -> None:
        names = {0: "follower", 1: "candidate", 2: "leader"}
        node = self._node
        term = node.raftCurrentTerm if node is not None else "?"
        log.info("replication: %s is now %s (term %s)", self.address, names.get(new, new), term)

    # --- snapshots (serializer on the Raft thread, work in threads) -----------------------

    def _serialize(self, _temp_file: str, data: Any) -> None:
        """pysyncobj wants a snapshot covering `data[0]`: build it in a worker thread."""
        last, prev, cluster = data
        self._snap_request = snapshot.SnapshotMeta(
            last=tuple(last),
            prev=tuple(prev),
            cluster=[node.id for node in cluster],
            applied=0,
            floor_ms=self._floor_ms,
            created=time.time(),
        )
        self._snap_result = None
        self._begin_snapshot()

    def _begin_snapshot(self) -> None:
        """Start the requested build unless a restore or a failing apply must finish first."""
        request = self._snap_request
        if request is None or self._restoring or self._apply_error is not None:
            return
        self._flush()
        if self._pending:
            return
        self._snap_request = None
        self._snap_thread = threading.Thread(
            target=self._build_snapshot, args=(request,), name="raft snapshot", daemon=True
        )
        self._snap_thread.start()

    def _build_snapshot(self, request: snapshot.SnapshotMeta) -> None:
        began = time.monotonic()
        try:
            self.last_snapshot = snapshot.build(
                self.machine, self._build_dir, self.snapshot_path, request
            )
        except Exception:
            log.exception("replication: building a snapshot failed")
            self._snap_result = SERIALIZER_STATE.FAILED
            return
        self.snapshot_seconds = time.monotonic() - began
        self._snap_result = SERIALIZER_STATE.SUCCESS

    def _check_snapshot(self) -> int:
        """pysyncobj polls this every turn; SUCCESS or FAILED is reported exactly once."""
        if self._snap_request is not None:
            self._begin_snapshot()
            return SERIALIZER_STATE.SERIALIZING
        thread = self._snap_thread
        if thread is None:
            return SERIALIZER_STATE.NOT_SERIALIZING
        if thread.is_alive():
            return SERIALIZER_STATE.SERIALIZING
        self._snap_thread = None
        return self._snap_result or SERIALIZER_STATE.FAILED

    def _deserialize(self, filename: str) -> tuple[Any, Any, set[TCPNode]]:
        """A snapshot is loaded (at start, or received from the leader): its Raft metadata."""
        meta = snapshot.read_meta(Path(filename))
        self._floor_ms = max(self._floor_ms, meta.floor_ms)
        self.last_snapshot = meta
        if meta.applied > self.machine.last_applied_index():
            self._begin_restore(Path(filename))
        return meta.last, meta.prev, {TCPNode(address) for address in meta.cluster}

    def _begin_restore(self, source: Path) -> None:
        with self._restore_lock:
            self._restore_source = source
            if self._restoring:
                return  # the running worker picks the newer source up
            self._restoring = True
        threading.Thread(target=self._restore_worker, name="raft restore", daemon=True).start()

    def _restore_worker(self) -> None:
        while True:
            with self._restore_lock:
                source, self._restore_source = self._restore_source, None
                if source is None:
                    self._restoring = False
                    self._restored = True
                    return
            try:
                snapshot.restore(self.machine, source, self._restore_dir)
            except Exception as exc:
                log.exception("replication: restoring a snapshot failed")
                self._restore_error = f"restoring the snapshot failed: {exc}; restart the signer"
                return  # stays `restoring`: nothing may be applied on top of the old contents

    # --- proposals (asyncio side) ---------------------------------------------------------

    @staticmethod
    def _now_ms() -> int:
        return int(time.time() * 1000)

    async def commit(self, entry: bytes) -> R:
        """Commit `entry` on the cluster and apply it here; the state machine's result."""
        if len(entry) > MAX_ENTRY_BYTES:
            raise EntryTooLarge(
                f"a log entry of {len(entry)} bytes is over the bound of {MAX_ENTRY_BYTES}"
            )
        result: R = await self._propose("c", entry)
        self.counters["commits"] += 1
        return result

    async def barrier(self) -> None:
        """Wait until this signer has applied everything committed before now.

        Writers call it before deciding anything (request-id lookup, serial, times): a retried
        request is then found here even if its first attempt was committed elsewhere, and this
        signer's clock is checked against the latest time the cluster recorded.

        A leader of at most two voters that has committed an entry of its term waits for its
        own commit index to be applied instead of committing a barrier entry: no other signer
        can have committed anything it does not know (docs/replication.md, "The barrier").
        """
        await self._ready()
        if await self._local_read():
            self.counters["local_reads"] += 1
        else:
            await self._propose("b", None)
            self.counters["barriers"] += 1
        await self._clock_guard()

    async def _local_read(self) -> bool:
        """Wait until the commit index of now is applied here, if this signer may read
        locally (a leader of at most two voters, its term begun); False when it may not."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Any] = loop.create_future()

        def register() -> bool:
            target = self._local_read_target()
            if target is None:
                return False
            self._read_waiters.append((target, loop, done))
            return True

        if not await self.on_raft_thread(register):
            return False
        try:
            await asyncio.wait_for(done, self.settings.commit_timeout)
        except TimeoutError:
            raise NotCommitted("this signer could not apply what is committed in time") from None
        return True

    def _local_read_target(self) -> int | None:
        """Raft thread: the index to have applied before deciding, or None (use a barrier)."""
        node = self._node
        if node is None or not node.is_leader or len(node.otherNodes) > 1:
            return None
        term = node.raftCurrentTerm
        if self._term_start[0] != term or node.raftCommitIndex < self._term_start[1]:
            return None
        return int(node.raftCommitIndex)

    def _answer_reads(self) -> None:
        """Raft thread, after applying: local reads whose index is applied may go on."""
        if not self._read_waiters or self._pending or self._node is None:
            return
        applied = self._node.raftLastApplied
        waiting = []
        for target, loop, future in self._read_waiters:
            if target <= applied:
                loop.call_soon_threadsafe(settle, future, True)
            else:
                waiting.append((target, loop, future))
        self._read_waiters = waiting

    async def _clock_guard(self) -> None:
        lag = self._floor_ms / 1000 - time.time()
        if lag <= 0:
            return
        if lag > self.settings.clock_wait:
            raise ClockBehind(
                f"this signer's clock is {lag:.1f} s behind times the cluster already recorded; "
                "fix its clock (NTP) before it issues anything",
            )
        await asyncio.sleep(lag)

    async def _ready(self) -> None:
        """Return once a leader is known; refuse at once when there is no quorum (except just
        after start, while connections are being made: then wait up to `leader_wait`)."""
        deadline = time.monotonic() + self.settings.leader_wait
        while True:
            if self._fenced is not None:
                raise Fenced(f"this signer is fenced: {self._fenced}")
            if self._restore_error is not None:
                raise ApplyFailed(self._restore_error)
            self._check_disks()
            view = self._view
            if view.running and view.has_quorum and view.leader_connected and self._record:
                return  # (data is committed only after the cluster's identity)
            settled = time.monotonic() > self._settled_at
            if view.running and not view.has_quorum and settled:
                raise NoQuorum(
                    f"no quorum: this signer reaches too few of the voters "
                    f"{', '.join(view.members)}",
                )
            if time.monotonic() > deadline:
                what = "not running"
                if view.running:
                    what = "no leader was elected in time"
                    if view.leader_connected:
                        what = "the cluster's identity is not recorded yet"
                raise NoQuorum(f"replication: {what}")
            await asyncio.sleep(0.01)

    def _check_disks(self) -> None:
        """Refuse at once while this signer, or too many others, cannot write a journal."""
        failure = self.journal_failure()
        if failure is not None:
            raise JournalFailed(f"this signer cannot write its Raft journal: {failure}")
        transport = self._transport
        if transport is None:
            return
        failing = {name: p.disk_error for name, p in transport.peers.items() if p.disk_error}
        members = self._view.members
        if failing and len(members) - len([m for m in members if m in failing]) <= len(members) / 2:
            name, error = sorted(failing.items())[0]
            raise JournalFailed(f"{name} cannot write its Raft journal: {error}")

    async def _propose(self, kind: str, payload: bytes | None) -> Any:
        await self._ready()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        pid = next(self._ids)
        with self._lock:
            node = self._node
            if node is None:
                raise NoQuorum("replication is not running")
            self._waiters[pid] = _Waiter(loop, future)
        entry = (kind, (self.address, self._boot), pid, self._now_ms(), payload)
        timeout = self.settings.commit_timeout
        try:
            node.propose(entry, functools.partial(self._callback, pid))
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise NotCommitted(
                f"the commit was not confirmed within {timeout:g} s and may still happen; "
                "retry with the same request id to learn its single outcome",
            ) from None
        finally:
            with self._lock:
                self._waiters.pop(pid, None)

    async def on_raft_thread(self, function: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run `function` on the Raft thread (pysyncobj state is not thread-safe)."""
        if self._node is None:
            raise NoQuorum("replication is not running on this signer")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._calls.put((function, loop, future))
        node = self._node
        if node is not None:
            node.wake()
        return await asyncio.wait_for(future, timeout)

    def guard(self, handler: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        """A writing command's handler that first passes the barrier (see `barrier`)."""

        @functools.wraps(handler)
        async def guarded(args: Any, ctx: Any) -> Any:
            await self.barrier()
            return await handler(args, ctx)

        return guarded

    # --- status ---------------------------------------------------------------------------

    async def health(self) -> ClusterHealth:
        """The cluster for `health`: errors when nothing can be issued."""
        data = await self.status()
        warnings: list[str] = []
        errors: list[str] = []
        if data.get("fenced"):
            errors.append(f"fenced: {data['fenced']}")
        elif data["role"] == "stopped":
            errors.append("replication is not running")
        else:
            if not data["quorum"] or data["leader"] is None:
                errors.append("no quorum: nothing can be issued or revoked (docs/operations.md)")
            if data.get("apply_error"):
                errors.append(f"applying to the repository fails: {data['apply_error']}")
            if data["journal"].get("failure"):
                errors.append(f"the Raft journal cannot be written: {data['journal']['failure']}")
            if self._restore_error:
                errors.append(self._restore_error)
            elif data["restoring"]:
                warnings.append("restoring a snapshot received from the leader")
            for peer, state in data["peers"].items():
                warnings += self._peer_warnings(peer, state, errors)
        return ClusterHealth(data, warnings, errors)

    def _peer_warnings(self, peer: str, state: dict[str, Any], errors: list[str]) -> list[str]:
        warnings = []
        if state.get("disk_error"):
            errors.append(f"{peer} cannot write its Raft journal: {state['disk_error']}")
        if state["refused"]:
            errors.append(f"{peer} refused: {state['refused']}")
        elif not state["connected"]:
            warnings.append(f"{peer} is not connected")
        offset = state["clock_offset_s"]
        if offset is not None and abs(offset) > self.settings.clock_warn:
            warnings.append(
                f"the clock of {peer} differs by {offset:+.2f} s "
                f"(bound {self.settings.clock_warn:g} s)"
            )
        if state["lag"] is not None and state["lag"] > CATCH_UP_REPORT:
            warnings.append(f"{peer} is {state['lag']} entries behind")
        return warnings

    @property
    def view(self) -> View:
        return self._view

    async def status(self) -> dict[str, Any]:
        """The cluster as this signer sees it (the health section's data)."""
        if self._node is None:
            return self._status_stopped()
        try:
            return dict(await self.on_raft_thread(self._status_now))
        except ReplicationError:
            return self._status_stopped()

    def _status_stopped(self) -> dict[str, Any]:
        return {
            "self": self.address,
            "role": "fenced" if self._fenced else "stopped",
            "fenced": self._fenced,
            "quorum": False,
            "cluster": self._record.summary() if self._record else None,
            "repository_index": self.machine.last_applied_index(),
        }

    def _status_now(self) -> dict[str, Any]:
        node, transport, view = self._node, self._transport, self._view
        assert node is not None and transport is not None and self._journal is not None
        raw = node.getStatus()
        peers = {}
        for peer in sorted(node.otherNodes, key=lambda n: n.id):
            state = transport.peer(peer)
            match = raw.get(f"match_idx_server_{peer.id}")
            peers[peer.id] = {
                "connected": state.accepted and node.isNodeConnected(peer),
                "match_index": match if view.role == "leader" else None,
                "lag": view.last_index - match if view.role == "leader" and match else None,
                "clock_offset_s": _round(state.clock_offset, 4),
                "rtt_ms": _round(state.rtt * 1000 if state.rtt is not None else None, 2),
                "refused": state.refused,
                "disk_error": state.disk_error,
            }
        return {
            "self": self.address,
            "role": view.role,
            "leader": view.leader,
            "term": view.term,
            "commit_index": view.commit_index,
            "applied_index": view.applied_index,
            "last_log_index": view.last_index,
            "repository_index": self.machine.last_applied_index(),
            "quorum": view.has_quorum,
            "members": list(view.members),
            "cluster": self._record.summary() if self._record else None,
            "peers": peers,
            "snapshot": self._snapshot_summary(),
            "restoring": self._restoring,
            "apply_error": self._apply_error,
            "fenced": self._fenced,
            "clock_floor_ms": self._floor_ms,
            "max_loop_ms": round(self.max_loop * 1000, 1),
            "journal": {
                "entries": len(self._journal),
                "syncs": self._journal.syncs,
                "durable_index": self._journal.durable_index,
                "failure": self._journal.failure,
            },
            "link": transport.counters.as_dict(),
            "counters": dict(self.counters),
        }

    def _snapshot_summary(self) -> dict[str, Any] | None:
        meta = self.last_snapshot
        if meta is None:
            return None
        return {
            "raft_index": meta.last[1],
            "repository_index": meta.applied,
            "size_bytes": meta.size,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(meta.created)),
            "build_seconds": _round(self.snapshot_seconds, 2),
            "building": self._snap_thread is not None or self._snap_request is not None,
        }

    # --- cluster changes (from `signer cluster`, asyncio side) ----------------------------

    async def add_member(self, address: str) -> dict[str, Any]:
        """Record and make a new voter; it then catches up by itself (snapshot and log)."""
        _check_address(address)
        members = list(self._view.members)
        if address in members:
            raise MembershipRefused(f"{address} is already a member")
        await self.barrier()
        await self._record_members([*members, address], f"add {address}")
        await self._change_membership("add", address, wait=False)
        return {
            "status": "added",
            "members": sorted([*members, address]),
            "next": f"start the new signer with peers {members}: it receives a snapshot and "
            "the log by itself; until it has caught up, commits need it if it makes the majority",
        }

    async def transfer_leadership(self) -> None:
        """Hand leadership to the most caught-up connected voter (before maintenance)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(_result: Any, reason: int) -> None:
            value = None if reason == FAIL_REASON.SUCCESS else _failure(reason)
            loop.call_soon_threadsafe(settle, future, value)

        def transfer() -> None:
            assert self._node is not None
            self._node.transferLeadership(callback=done)

        await self.on_raft_thread(transfer)
        error = await asyncio.wait_for(future, self.settings.commit_timeout)
        if error is not None:
            raise error

    async def remove_member(self, address: str) -> dict[str, Any]:
        """Remove a voter while the cluster has quorum (its data may never come back)."""
        _check_address(address)
        members = list(self._view.members)
        if address == self.address:
            raise MembershipRefused("run remove on another signer")
        if address not in members:
            raise MembershipRefused(f"{address} is not a member")
        await self.barrier()
        remaining = [member for member in members if member != address]
        await self._record_members(remaining, f"remove {address}")
        await self._change_membership("remove", address, wait=True)
        return {"status": "removed", "members": remaining}

    async def force_standalone(self, fenced: list[str]) -> dict[str, Any]:
        """Continue alone after the other voters were fenced (powered off, cable pulled)."""
        view = self._view
        others = sorted(member for member in view.members if member != self.address)
        if view.has_quorum and view.leader is not None and others:
            raise MembershipRefused("the cluster has quorum: use `signer cluster remove` instead")
        if sorted(fenced) != others:
            raise MembershipRefused(
                f"name every other voter as fenced ({', '.join(others) or 'none'}), after making "
                "sure it cannot run: two signers issuing alone would diverge",
            )
        started = time.monotonic()
        await asyncio.to_thread(self._standalone_offline)
        record = await self._record_members(
            [self.address], f"force-standalone (fenced {', '.join(fenced)})"
        )
        log.warning("replication: %s continues alone; fenced: %s", self.address, fenced)
        return {
            "status": "standalone",
            "members": [self.address],
            "generation": record.generation,
            "seconds": round(time.monotonic() - started, 2),
        }

    def _standalone_offline(self) -> None:
        """Stop Raft; take a snapshot at the last applied entry with this signer as the only
        member; drop membership changes from the journal; start again alone. Entries after the
        snapshot (this signer's uncommitted tail) are committed by the new single-voter term."""
        self._stop_loop()
        journal = DurableJournal(self.journal_path)
        journal.neutralize_membership()
        applied = self._last_raft_applied
        if applied - 1 < journal[0][1]:
            if applied != journal.last_index:
                raise ReplicationError("the journal does not hold the last applied entry")
            journal.add(NO_OP, applied + 1, journal[-1][2])
            applied += 1
        first = journal[0][1]
        prev, last = journal[applied - 1 - first], journal[applied - first]
        meta = snapshot.SnapshotMeta(
            last=last,
            prev=prev,
            cluster=[self.address],
            applied=0,
            floor_ms=self._floor_ms,
            created=time.time(),
        )
        self.last_snapshot = snapshot.build(self.machine, self._build_dir, self.snapshot_path, meta)
        journal.deleteEntriesTo(applied - 1 - first)
        journal.close()
        self._journal = DurableJournal(self.journal_path)
        self._commit_up_to_snapshot()
        self._peers = []
        self._start_loop()

    async def _record_members(self, members: list[str], event: str) -> ClusterRecord:
        """Commit the next generation's record; it must be the stored one afterwards (the
        machine compares and sets it, so a concurrent change makes this one fail)."""
        raw, current = self._read_record()
        try:
            record = next_record(current, members, event)
        except ValueError as exc:
            raise MembershipRefused(str(exc)) from None
        await self.commit(self.machine.meta_entry(CLUSTER_META, raw, record.pack()))
        if self.machine.meta(CLUSTER_META) != record.pack():
            raise MembershipConflict(
                "the membership record changed meanwhile (another change was recorded); "
                "look at `signer cluster status` and retry"
            )
        return record

    # --- the cluster record ----------------------------------------------------------------

    def _read_record(self) -> tuple[bytes | None, ClusterRecord | None]:
        """The stored cluster record, as bytes and parsed (None before the first one)."""
        raw = self.machine.meta(CLUSTER_META)
        return raw, None if raw is None else ClusterRecord.unpack(raw)

    def _load_record(self) -> None:
        """Refresh this signer's view of the record (Raft thread, or before Raft runs)."""
        raw = self.machine.meta(CLUSTER_META)
        if raw != self._record_raw:
            self._record = None if raw is None else ClusterRecord.unpack(raw)
            self._record_raw = raw

    def _record_entry(self, record: ClusterRecord) -> bytes:
        """The log entry that makes `record` the next one after the stored one."""
        return self.machine.meta_entry(CLUSTER_META, self._record_raw, record.pack())

    async def _change_membership(self, op: str, address: str, wait: bool) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(_result: Any, reason: int) -> None:
            value = None if reason == FAIL_REASON.SUCCESS else _failure(reason)
            loop.call_soon_threadsafe(settle, future, value)

        def change() -> None:
            node = self._node
            assert node is not None
            if op == "add":
                node.addNodeToCluster(address, callback=done)
            else:
                node.removeNodeFromCluster(address, callback=done)

        await self.on_raft_thread(change)
        if wait:
            error = await asyncio.wait_for(future, self.settings.commit_timeout)
            if error is not None:
                raise error


def _check_address(address: str) -> None:
    try:
        parse_address(address)
    except ValueError as exc:
        raise MembershipRefused(str(exc)) from None


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
