"""The replication link: pysyncobj's TCP transport with a handshake, clocks and durability hooks.

What it adds to `pysyncobj.transport.TCPTransport` (all on the Raft thread):

- **Handshake**: on connecting, each side sends a hello (cluster record, applied index) and
  passes Raft messages for a peer only once that peer's hello was judged acceptable
  (replication/cluster.py). A stale, foreign or diverged signer never gets to vote or append.
- **Durability**: the journal is synced before entries leave the leader and before a follower
  acknowledges them, so "committed" means on disk on both signers (one fdatasync per batch).
- **Clocks**: a ping every second measures each peer's clock offset and round trip.
- **Snapshots**: the follower acknowledges snapshot chunks as they arrive (keepalives, or the
  leader would step down during a long transfer), both sides log progress, and the leader stops
  reading the snapshot file while the peer's send buffer is full.
- pysyncobj's utility commands (add/remove nodes from any TCP client) are switched off:
  cluster changes go through `signer cluster` on the signer's own UNIX socket.

Messages of our own have types starting with `x_`; pysyncobj never sees them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from pysyncobj.transport import TCPTransport

from replication.cluster import Hello, Verdict

log = logging.getLogger(__name__)

CLOCK_INTERVAL = 1.0
PROGRESS_STEP = 10  # percent


class LinkOwner(Protocol):
    """What the transport needs from the RaftLog (replication/raft.py)."""

    def hello(self) -> Hello: ...

    def judge(self, peer: Hello) -> tuple[Verdict, str]: ...

    def fence(self, reason: str) -> None: ...

    def sync_journal(self) -> None: ...

    def snapshot_size(self) -> int: ...

    def attach(self, transport: ReplicationTransport) -> None: ...


@dataclass
class PeerState:
    accepted: bool = False
    verdict: str = ""  # why the last hello was accepted or refused
    refused: str | None = None  # set while the peer is refused
    clock_offset: float | None = None  # peer's clock minus ours, seconds
    rtt: float | None = None
    clock_at: float = 0.0  # monotonic time of the last measurement
    refusals: int = 0


@dataclass
class Transfer:
    """One snapshot transfer's progress (either direction)."""

    total: int = 0
    done: int = 0
    logged: int = -PROGRESS_STEP
    started: float = field(default_factory=time.monotonic)
    keepalive: float = 0.0


class ReplicationTransport(TCPTransport):
    def __init__(self, syncObj: Any, selfNode: Any, otherNodes: Any):
        self.owner: LinkOwner = syncObj.link_owner
        self.peers: dict[str, PeerState] = {}
        self.outgoing: dict[str, Transfer] = {}
        self.incoming: Transfer | None = None
        self._next_clock = 0.0
        self._outbox: list[tuple[Any, Any]] = []
        self.owner.attach(self)
        super().__init__(syncObj, selfNode, otherNodes)

    # --- hooks for tests (partitions) -----------------------------------------------------

    def blocked(self, node: Any) -> bool:
        """Whether the link to `node` is cut (tests override this to make partitions)."""
        return False

    def _cut(self, node: Any) -> None:
        """A cut link behaves like a dead connection: dropped, redialled, dropped again."""
        connection = self._connections.get(node)
        if connection is not None:
            connection.disconnect()

    # --- pysyncobj utility commands: off ---------------------------------------------------

    def setOnUtilityMessageCallback(self, message: str, callback: Any) -> None:
        return None

    def _onUtilityMessage(self, conn: Any, message: Any) -> bool:
        conn.disconnect()
        return True

    # --- handshake ------------------------------------------------------------------------

    def peer(self, node: Any) -> PeerState:
        return self.peers.setdefault(node.id, PeerState())

    def _onNodeConnected(self, node: Any) -> None:
        state = self.peer(node)
        if state.accepted:  # a new connection replaced one pysyncobj still counts: drop it first
            state.accepted = False
            super()._onNodeDisconnected(node)
        self._raw_send(node, {"type": "x_hello", **self.owner.hello().wire()})

    def _onNodeDisconnected(self, node: Any) -> None:
        state = self.peer(node)
        self.outgoing.pop(node.id, None)
        if state.accepted:
            state.accepted = False
            log.warning("replication: lost the connection to %s", node.id)
            super()._onNodeDisconnected(node)

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
            state.refused = reason
            if state.verdict != reason:
                log.error("replication: refusing %s: %s", node.id, reason)
            state.verdict = reason
            connection = self._connections.get(node)
            if connection is not None:
                connection.disconnect()
            return
        if state.verdict != reason or not state.accepted:
            log.info("replication: connected to %s (%s)", node.id, reason)
        state.verdict = reason
        state.refused = None
        if not state.accepted:
            state.accepted = True
            super()._onNodeConnected(node)

    # --- messages -------------------------------------------------------------------------

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        if self.blocked(node):
            self._cut(node)
            return
        kind = message.get("type") if isinstance(message, dict) else None
        if isinstance(kind, str) and kind.startswith("x_"):
            self._on_own_message(node, kind, message)
            return
        if not self.peer(node).accepted:
            return
        if kind == "append_entries" and "serialized" in message:
            self._on_snapshot_chunk(node, message["serialized"])
        super()._onMessageReceived(node, message)

    def _on_own_message(self, node: Any, kind: str, message: dict[str, Any]) -> None:
        if kind == "x_hello":
            self._on_hello(node, message)
        elif kind == "x_clock":
            self._raw_send(node, {"type": "x_clock_reply", "m0": message["m0"], "t1": time.time()})
        elif kind == "x_clock_reply":
            self._on_clock_reply(node, message)
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
            TCPTransport.send(self, node, message)

    def send(self, node: Any, message: Any) -> bool:
        if self.blocked(node):
            self._cut(node)
            return False
        if not self.peer(node).accepted:
            return False
        if self._outbox or _needs_sync(message):
            self._outbox.append((node, message))  # sent, in order, after one journal sync
            return True
        return self._deliver(node, message)

    def _deliver(self, node: Any, message: Any) -> bool:
        if message.get("type") == "append_entries" and "serialized" in message:
            self._on_snapshot_send(node, message["serialized"])
        return bool(super().send(node, message))

    def flush_outbox(self) -> None:
        """Once per turn: make the journal durable, then send what waited for it.

        The leader's entries are on disk before any follower can acknowledge them, and a
        follower's before its acknowledgement leaves: one fdatasync for everything the turn
        appended, however many proposals or entries arrived together."""
        if not self._outbox:
            return
        self.owner.sync_journal()
        outbox, self._outbox = _coalesce(self._outbox), []
        for node, message in outbox:
            if self.peer(node).accepted and not self.blocked(node):
                self._deliver(node, message)

    # --- clocks ---------------------------------------------------------------------------

    def _onTick(self) -> None:
        super()._onTick()
        self.flush_outbox()
        now = time.monotonic()
        if now < self._next_clock:
            return
        self._next_clock = now + CLOCK_INTERVAL
        for node in list(self._nodes):
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
        connection = self._connections.get(node)
        return connection.getSendBufferSize() if connection is not None else 0

    def _on_snapshot_send(self, node: Any, serialized: Any) -> None:
        if not serialized:
            return
        data, first, last = serialized
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

    def _on_snapshot_chunk(self, node: Any, serialized: Any) -> None:
        if not serialized:
            return
        data, first, last = serialized
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
            keepalive = {
                "type": "next_node_idx",
                "next_node_idx": 0,
                "reset": False,
                "success": False,
            }
            self._raw_send(node, keepalive)


def _needs_sync(message: dict[str, Any]) -> bool:
    """Messages that let a peer count entries as stored here: they wait for the journal."""
    kind = message.get("type")
    if kind == "append_entries":
        return bool(message.get("entries") or "transmission" in message)
    return kind == "next_node_idx" and bool(message.get("success"))


MAX_MERGED_ENTRIES = 2000


def _coalesce(outbox: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Fewer, larger messages: pysyncobj sends one append per proposal (and a follower one ack
    per append); under load a turn holds hundreds, each pickled, compressed and encrypted.

    Per peer, an append that continues the previous one (same term, its entries start right
    after the previous one's) is merged into it, and of two success acks in a row only the one
    with the higher index is kept (it says all the other one did)."""
    merged: list[tuple[Any, Any]] = []
    last: dict[Any, int] = {}  # peer -> position of its latest message in `merged`
    for node, message in outbox:
        position = last.get(node)
        previous = merged[position][1] if position is not None else None
        if position is None or previous is None:
            last[node] = len(merged)
            merged.append((node, message))
        elif _continues(previous, message):
            merged[position] = (node, _merge(previous, message))
        elif _acks(previous) and _acks(message):
            if message["next_node_idx"] >= previous["next_node_idx"]:
                merged[position] = (node, message)
        else:
            last[node] = len(merged)
            merged.append((node, message))
    return merged


def _continues(previous: dict[str, Any], message: dict[str, Any]) -> bool:
    if previous.get("type") != "append_entries" or message.get("type") != "append_entries":
        return False
    if not previous.get("entries") or not message.get("entries"):
        return False
    if "transmission" in previous or "transmission" in message:
        return False
    return bool(
        previous["term"] == message["term"]
        and message["prevLogIdx"] == previous["entries"][-1][1]
        and message["prevLogTerm"] == previous["entries"][-1][2]
        and len(previous["entries"]) + len(message["entries"]) <= MAX_MERGED_ENTRIES
    )


def _merge(previous: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    return {
        **previous,
        "entries": [*previous["entries"], *message["entries"]],
        "commit_index": message["commit_index"],
    }


def _acks(message: dict[str, Any]) -> bool:
    return bool(
        message.get("type") == "next_node_idx" and message["success"] and not message["reset"]
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
