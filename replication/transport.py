"""The replication link: pysyncobj's TCP transport with a guard, a handshake, clocks and
durability hooks (pysyncobj's internals through replication/pysyncobj_adapter.py).

What it adds (all on the Raft thread):

- **Guard**: connections are `GuardedConnection`s (replication/connection.py): frames bounded
  before and after the peer proved the secret. A connection must finish the key exchange and
  name a member within `handshake_timeout`, at most `MAX_PENDING` such connections from
  strangers exist at once (members' addresses have their own allowance, so strangers cannot
  crowd them out), and every refusal is counted (`LinkCounters`, shown by health).
- **Handshake**: each side then sends a hello (cluster record, applied index) and passes Raft
  messages for a peer only once that peer's hello was judged acceptable (replication/
  cluster.py). A stale, foreign or diverged signer never gets to vote or append.
- **Durability**: "committed" means on disk on both signers. A follower's acknowledgement
  leaves only after its journal was fdatasync'ed; the leader sends its appends first and
  fdatasyncs while they travel, and an acknowledgement reaches pysyncobj only once this
  signer's own journal durably holds what it acknowledges (pysyncobj counts the leader's copy
  without asking). One fdatasync per turn covers everything the turn appended. A journal that
  cannot be written (disk full) holds every acknowledgement back until it can, and says so
  to the peer (`x_disk`).
- **Clocks**: a ping every second measures each peer's clock offset and round trip.
- **Snapshots**: the follower acknowledges snapshot chunks as they arrive (keepalives, or the
  leader would step down during a long transfer), both sides log progress, and the leader stops
  reading the snapshot file while the peer's send buffer is full.

Messages of our own have types starting with `x_`; pysyncobj never sees them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from replication import pysyncobj_adapter as raft
from replication.cluster import Hello, Verdict
from replication.connection import GuardedConnection, GuardedServer

log = logging.getLogger(__name__)

CLOCK_INTERVAL = 1.0
PROGRESS_STEP = 10  # percent
MAX_PENDING = 4  # connections from strangers that have not finished the handshake, at once
MAX_PENDING_MEMBER = 2  # the same, from each member's address
MAX_MERGED_ENTRIES = 2000
MAX_MERGED_BYTES = 1 << 20  # entry bytes in one coalesced append


class LinkOwner(Protocol):
    """What the transport needs from the RaftLog (replication/raft.py)."""

    def hello(self) -> Hello: ...

    def judge(self, peer: Hello) -> tuple[Verdict, str]: ...

    def fence(self, reason: str) -> None: ...

    def sync_journal(self) -> bool: ...

    def durable_index(self) -> int: ...

    def journal_failure(self) -> str | None: ...

    def snapshot_size(self) -> int: ...

    @property
    def heartbeat(self) -> float: ...

    @property
    def session_secret(self) -> bytes | None: ...

    def attach(self, transport: ReplicationTransport) -> None: ...

    @property
    def handshake_timeout(self) -> float: ...

    @property
    def frame_limit(self) -> int: ...


@dataclass
class PeerState:
    accepted: bool = False
    verdict: str = ""  # why the last hello was accepted or refused
    refused: str | None = None  # set while the peer is refused
    clock_offset: float | None = None  # peer's clock minus ours, seconds
    rtt: float | None = None
    clock_at: float = 0.0  # monotonic time of the last measurement
    refusals: int = 0
    disk_error: str | None = None  # the peer cannot write its journal


@dataclass
class LinkCounters:
    """Connections the guard closed, by why (health shows them; tests wait on them)."""

    accepted: int = 0  # connections that finished the handshake
    over_limit: int = 0  # more than MAX_PENDING unauthenticated connections at once
    handshake_timeouts: int = 0  # no key exchange or no member's name in time
    refused_frames: int = 0  # a frame over its limit, or one that does not decrypt
    refused_peers: int = 0  # hellos judged unacceptable
    strangers: int = 0  # connections with the secret that named no member

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Transfer:
    """One snapshot transfer's progress (either direction)."""

    total: int = 0
    done: int = 0
    logged: int = -PROGRESS_STEP
    started: float = field(default_factory=time.monotonic)
    keepalive: float = 0.0


class ReplicationTransport(raft.TransportBase):
    connection_class = GuardedConnection
    server_class = GuardedServer

    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any):
        self.owner: LinkOwner = syncObj.link_owner
        self.peers: dict[str, PeerState] = {}
        self.counters = LinkCounters()
        self.outgoing: dict[str, Transfer] = {}
        self.incoming: Transfer | None = None
        self._next_clock = 0.0
        self._outbox: list[tuple[Any, Any]] = []
        self._held_acks: dict[Any, dict[str, Any]] = {}  # peer -> its latest unheard ack
        self._leader_term: dict[Any, int] = {}  # peer -> term of the last append it sent us
        self._acked: dict[Any, tuple[int, int, float]] = {}  # peer -> (index, term, when sent)
        self._disk_said: str | None = None
        self.owner.attach(self)
        super().__init__(syncObj, selfNode, otherNodes)

    # --- hooks for tests (partitions) -----------------------------------------------------

    def blocked(self, node: Any) -> bool:
        """Whether the link to `node` is cut (tests override this to make partitions)."""
        return False

    def _cut(self, node: Any) -> None:
        """A cut link behaves like a dead connection: dropped, redialled, dropped again."""
        connection = self.connection(node)
        if connection is not None:
            connection.disconnect()

    # --- the guard ------------------------------------------------------------------------

    def new_connection(self, sock: Any = None) -> Any:
        conn = super().new_connection(sock)
        conn.frame_limit = self.owner.frame_limit
        conn.session_secret = self.owner.session_secret
        conn._on_refused = self._frame_refused
        return conn

    def _frame_refused(self, reason: str) -> None:
        self.counters.refused_frames += 1
        log.warning("replication: closed a connection: %s", reason)

    def on_stranger(self, name: Any) -> None:
        self.counters.strangers += 1
        log.warning("replication: closed a connection from %.64r: not a member", name)

    def on_new_connection(self, address: str) -> bool:
        """At most MAX_PENDING unidentified connections from strangers, and apart from them
        MAX_PENDING_MEMBER from each member's address: strangers cannot crowd a member out."""
        members = self.member_hosts()
        pending = [c.peer_ip for c in self.incoming_pending()]
        if address in members:
            allowed = pending.count(address) < MAX_PENDING_MEMBER
        else:
            allowed = len([ip for ip in pending if ip not in members]) < MAX_PENDING
        if not allowed:
            self.counters.over_limit += 1
        return allowed

    def _close_late_handshakes(self) -> None:
        deadline = time.monotonic() - self.owner.handshake_timeout
        for conn in self.pending_connections():
            if conn.opened < deadline:
                self.counters.handshake_timeouts += 1
                self.drop_pending(conn)

    # --- handshake ------------------------------------------------------------------------

    def peer(self, node: Any) -> PeerState:
        return self.peers.setdefault(node.id, PeerState())

    def on_node_connected(self, node: Any) -> None:
        state = self.peer(node)
        if state.accepted:  # a new connection replaced one pysyncobj still counts: drop it first
            state.accepted = False
            self.raft_node_disconnected(node)
        self._raw_send(node, {"type": "x_hello", **self.owner.hello().wire()})

    def on_node_disconnected(self, node: Any) -> None:
        state = self.peer(node)
        self.outgoing.pop(node.id, None)
        self._held_acks.pop(node, None)
        self._acked.pop(node, None)
        if state.accepted:
            state.accepted = False
            log.warning("replication: lost the connection to %s", node.id)
            self.raft_node_disconnected(node)

    def _on_hello(self, node: Any, message: dict[str, Any]) -> None:
        state = self.peer(node)
        try:
            hello = Hello.from_wire(message)
            verdict, reason = self.owner.judge(hello)
            if hello.node != node.id:
                verdict, reason = Verdict.REFUSE, f"hello names {hello.node!r}, not {node.id}"
        except (KeyError, TypeError, ValueError) as exc:
            verdict, reason = Verdict.REFUSE, f"malformed hello: {exc}"
        if verdict is Verdict.FENCE_SELF:
            self.owner.fence(reason)
            return
        if verdict is Verdict.REFUSE:
            state.refusals += 1
            self.counters.refused_peers += 1
            state.refused = reason
            if state.verdict != reason:
                log.error("replication: refusing %s: %s", node.id, reason)
            state.verdict = reason
            self._cut(node)
            return
        if state.verdict != reason or not state.accepted:
            log.info("replication: connected to %s (%s)", node.id, reason)
        state.verdict = reason
        state.refused = None
        if not state.accepted:
            state.accepted = True
            state.disk_error = None  # it says so again if its disk still fails
            self.counters.accepted += 1
            self._disk_said = None  # and so do we
            self.raft_node_connected(node)

    # --- messages -------------------------------------------------------------------------

    def on_message(self, node: Any, message: Any) -> None:
        if self.blocked(node):
            self._cut(node)
            return
        kind = raft.kind(message)
        if kind is not None and kind.startswith("x_"):
            self._on_own_message(node, kind, message)
            return
        if not self.peer(node).accepted:
            return
        if raft.is_success_ack(message) and raft.ack_index(message) > self.owner.durable_index():
            self._held_acks[node] = message  # heard once our own journal holds it too
            return
        term = raft.append_term(message)
        if term is not None:
            self._leader_term[node] = term
        chunk = raft.snapshot_chunk(message)
        if chunk is not None:
            self._on_snapshot_chunk(node, chunk)
        self.raft_message(node, message)

    def _on_own_message(self, node: Any, kind: str, message: dict[str, Any]) -> None:
        if kind == "x_hello":
            self._on_hello(node, message)
        elif kind == "x_clock":
            self._raw_send(node, {"type": "x_clock_reply", "m0": message["m0"], "t1": time.time()})
        elif kind == "x_clock_reply":
            self._on_clock_reply(node, message)
        elif kind == "x_disk":
            self.peer(node).disk_error = message.get("error")
        elif kind == "x_snapshot":
            self.incoming = Transfer(total=int(message["size"]))
            log.info(
                "replication: receiving a %.1f MB snapshot from %s", message["size"] / 1e6, node.id
            )

    def _raw_send(self, node: Any, message: dict[str, Any]) -> None:
        """Our own messages: sent before the handshake completes, never to a blocked peer."""
        if self.blocked(node):
            self._cut(node)
        else:
            self.raft_send(node, message)

    def send(self, node: Any, message: Any) -> bool:
        if self.blocked(node):
            self._cut(node)
            return False
        if not self.peer(node).accepted:
            return False
        if self._outbox or raft.carries_entries(message) or raft.is_success_ack(message):
            self._outbox.append((node, message))  # sent in order at the end of the turn
            return True
        return self._deliver(node, message)

    def _deliver(self, node: Any, message: Any) -> bool:
        if not self.peer(node).accepted or self.blocked(node):
            return False
        ack = raft.is_plain_ack(message)
        if ack:
            said = (raft.ack_index(message), self._leader_term.get(node, -1))
            if self._repeats_ack(node, said):
                return True
        chunk = raft.snapshot_chunk(message)
        if chunk is not None:
            self._on_snapshot_send(node, chunk)
        sent = self.raft_send(node, message)
        if ack and sent:
            self._acked[node] = (*said, time.monotonic())
        return sent

    def _repeats_ack(self, node: Any, said: tuple[int, int]) -> bool:
        """Whether an acknowledgement (index, leader's term) says only what the last one sent
        on this connection said, less than half a heartbeat ago: then it is not sent.

        pysyncobj answers every append, also one that only carries the leader's commit index
        (sent right after each commit): that answer repeats the previous index, and the leader
        would spend a turn of its loop on it while the commit's answer waits. It changes
        nothing on the leader but the time it last heard us (its fallback timeout), which one
        acknowledgement per half heartbeat keeps fresh. A new connection or term sends again.
        """
        last = self._acked.get(node)
        return (
            last is not None
            and last[:2] == said
            and time.monotonic() - last[2] < self.owner.heartbeat / 2
        )

    def flush_outbox(self) -> None:
        """Once per turn: send what may leave before the journal is durable (appends), make
        the journal durable, then send the rest (acknowledgements), in order.

        The leader's appends travel while its fdatasync runs; a follower's acknowledgement
        leaves only once its journal holds the entries. One fdatasync for everything the turn
        appended, however many proposals or entries arrived together."""
        outbox, self._outbox = _coalesce(self._outbox), []
        position = 0
        while position < len(outbox) and not raft.is_success_ack(outbox[position][1]):
            self._deliver(*outbox[position])
            position += 1
        if not self.owner.sync_journal():
            self._outbox = outbox[position:]  # held until the journal can be written
            self._tell_disk(self.owner.journal_failure())
            return
        self._tell_disk(None)
        for node, message in outbox[position:]:
            self._deliver(node, message)
        self._release_acks()

    def _release_acks(self) -> None:
        durable = self.owner.durable_index()
        for node, message in list(self._held_acks.items()):
            if raft.ack_index(message) <= durable:
                del self._held_acks[node]
                if self.peer(node).accepted:
                    self.raft_message(node, message)

    def _tell_disk(self, error: str | None) -> None:
        if error == self._disk_said:
            return
        self._disk_said = error
        for node in self.peer_nodes():
            if self.peer(node).accepted:
                self._raw_send(node, {"type": "x_disk", "error": error})

    # --- every turn -----------------------------------------------------------------------

    def on_tick(self) -> None:
        self.flush_outbox()
        self._close_late_handshakes()
        now = time.monotonic()
        if now < self._next_clock:
            return
        self._next_clock = now + CLOCK_INTERVAL
        for node in self.peer_nodes():
            if self.peer(node).accepted:
                self._raw_send(node, {"type": "x_clock", "m0": now, "t0": time.time()})

    def _on_clock_reply(self, node: Any, message: dict[str, Any]) -> None:
        now = time.monotonic()
        rtt = now - float(message["m0"])
        state = self.peer(node)
        # The peer read its clock about half a round trip before we got the answer.
        state.clock_offset = float(message["t1"]) - (time.time() - rtt / 2)
        state.rtt = rtt
        state.clock_at = now

    # --- snapshots ------------------------------------------------------------------------

    def backlog(self, node: Any) -> int:
        """Bytes waiting in our send buffer for `node` (the snapshot sender's flow control)."""
        connection = self.connection(node)
        return int(connection.getSendBufferSize()) if connection is not None else 0

    def _on_snapshot_send(self, node: Any, chunk: tuple[bytes, bool, bool]) -> None:
        data, first, last = chunk
        if first:
            size = self.owner.snapshot_size()
            self.outgoing[node.id] = Transfer(total=size)
            self._raw_send(node, {"type": "x_snapshot", "size": size})
            log.info("replication: sending a %.1f MB snapshot to %s", size / 1e6, node.id)
        transfer = self.outgoing.get(node.id)
        if transfer is None:
            return
        transfer.done += len(data)
        _progress("sent", node.id, transfer, last)
        if last:
            self.outgoing.pop(node.id, None)

    def _on_snapshot_chunk(self, node: Any, chunk: tuple[bytes, bool, bool]) -> None:
        data, first, last = chunk
        if first and self.incoming is None:
            self.incoming = Transfer()
        transfer = self.incoming
        if transfer is None:
            return
        transfer.done += len(data)
        _progress("received", node.id, transfer, last)
        now = time.monotonic()
        if last:
            self.incoming = None
        elif now - transfer.keepalive > 0.2:
            # A follower answers only the last chunk; without this the leader would count it
            # as gone and step down (leaderFallbackTimeout) during a long transfer.
            transfer.keepalive = now
            self._raw_send(node, raft.keepalive_ack())


def _coalesce(outbox: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Fewer, larger messages: pysyncobj sends one append per proposal (and a follower one ack
    per append); under load a turn holds hundreds, each pickled, compressed and encrypted.

    Per peer, an append that continues the previous one (same term, its entries start right
    after the previous one's) is merged into it, up to MAX_MERGED_ENTRIES entries and
    MAX_MERGED_BYTES, and of two success acks in a row only the one with the higher index is
    kept (it says all the other one did)."""
    merged: list[tuple[Any, Any]] = []
    last: dict[Any, int] = {}  # peer -> position of its latest message in `merged`
    sizes: dict[Any, int] = {}  # peer -> entry bytes in its latest (merged) append
    for node, message in outbox:
        position = last.get(node)
        previous = merged[position][1] if position is not None else None
        size = sum(len(entry[0]) for entry in raft.entries_of(message))
        if position is None or previous is None:
            last[node], sizes[node] = len(merged), size
            merged.append((node, message))
        elif _fits(previous, message, sizes[node] + size):
            merged[position] = (node, raft.merge(previous, message))
            sizes[node] += size
        elif raft.is_plain_ack(previous) and raft.is_plain_ack(message):
            if message["next_node_idx"] >= previous["next_node_idx"]:
                merged[position] = (node, message)
        else:
            last[node], sizes[node] = len(merged), size
            merged.append((node, message))
    return merged


def _fits(previous: dict[str, Any], message: dict[str, Any], size: int) -> bool:
    return (
        raft.continues(previous, message)
        and len(previous["entries"]) + len(message["entries"]) <= MAX_MERGED_ENTRIES
        and size <= MAX_MERGED_BYTES
    )


def _progress(verb: str, peer: str, transfer: Transfer, last: bool) -> None:
    if transfer.total <= 0:
        return
    percent = min(100, transfer.done * 100 // transfer.total)
    if last or percent >= transfer.logged + PROGRESS_STEP:
        transfer.logged = percent
        elapsed = time.monotonic() - transfer.started
        rate = transfer.done / elapsed / 1e6 if elapsed > 0 else 0.0
        log.info(
            "replication: snapshot %s %s: %d%% (%.1f of %.1f MB, %.1f MB/s)",
            verb,
            peer,
            100 if last else percent,
            transfer.done / 1e6,
            transfer.total / 1e6,
            rate,
        )
