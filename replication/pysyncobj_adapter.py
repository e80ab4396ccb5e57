"""pysyncobj as this project uses it: every reliance on its internals, in this one module.

pysyncobj 0.3.17 offers no API for several things the replicated log needs. Each assumption is
listed here under a name, and `tests/test_pysyncobj_contract.py` checks each one against the
installed pysyncobj, so an upgrade fails one clear test instead of corrupting state. The
version is pinned too (`TESTED_VERSIONS`, checked at start). The rest of `replication/` uses
pysyncobj only through the names below and its public API (`SyncObj` methods and properties,
`SyncObjConf`, `FAIL_REASON`, `SERIALIZER_STATE`).

- A1 `JOURNAL`: `SyncObj.__init__` gets its journal from the module-level
  `pysyncobj.syncobj.createJournal`; it is swapped, under a lock, while a node is constructed.
  The journal interface is `pysyncobj.journal.Journal`, whose `_destroy` pysyncobj calls.
- A2 `APPLY_INDEX`: inside a `@replicated` method the entry being applied has index
  `raftLastApplied + 1` (entries are applied in order, the counter moves after each).
- A3 `SERIALIZER`: the snapshot serializer is `_SyncObj__serializer`; its
  `getTransmissionData(node)` reads the next snapshot chunk for a peer (None: nothing now).
- A4 `LEADER`: `_getLeader()` is the known leader node (or None), `_isLeader()` our role.
- A5 `TRANSPORT_HOOKS`: `TCPTransport` calls `_onNodeConnected`, `_onNodeDisconnected`,
  `_onMessageReceived` to pass events to the node, registers `_onTick` as a tick callback,
  answers `_onUtilityMessage`, keeps `_connections` (node -> connection), `_nodes`,
  `_unknownConnections`, `_selfNode`, creates its server in `_createServer` and its outgoing
  connections in `addNode`, and hands accepted connections to `_onNewIncomingConnection`,
  whose first frames go to `_onIncomingMessageReceived`.
- A6 `CONNECTION`: a connection is `TcpConnection`'s interface and frame format (replicated
  by replication/connection.py): native 4-byte length, Fernet(zlib(pickle protocol 2)), a
  random key exchanged first and carried by every later frame. The exchange: the dialling
  side sets `recvRandKey` to 32 random bytes and sends it as its first frame; the accepting
  side takes it as its `sendRandKey`, sets its `recvRandKey` to 32 random bytes and sends it
  as its first frame; the dialling side takes that as its `sendRandKey`. Nothing else is sent
  before (replication/connection.py seals every later frame with keys derived from both).
- A7 `MESSAGES`: Raft messages are dicts: `append_entries` (`term`, `commit_index`,
  `prevLogIdx`, `prevLogTerm`, `entries` [(command, index, term)] or a snapshot chunk
  `serialized` (data, first, last), or `transmission` chunks of one large entry) and
  `next_node_idx` (`next_node_idx`, `reset`, `success`: a follower's answer).
- A8 `CHUNKS`: an entry at least `appendEntriesBatchSizeBytes` long is sent in `transmission`
  chunks, and 0.3.17 marks the last chunk one chunk early (followers fail to unpickle it).
  Entries are kept below `MAX_ENTRY_BYTES` so that this path is never taken.
- A9 `COMMANDS`: a journal entry's first byte is its type (0 regular, 1 no-op, 2 membership);
  a regular entry is `pickle((method id, (argument,)))` after that byte.
- A10 `POLLER`: `SyncObj._poller` is the poller `doTick` waits on; a descriptor subscribed to
  it ends the wait when readable.
- A12 `SEND`: `_SyncObj__sendAppendEntries()` sends every peer what it lacks (entries or the
  next snapshot chunks); pysyncobj calls it once per `appendEntriesPeriod`, which paces a
  snapshot transfer to a few chunks per period unless it is called more often.
- A11 `COMMIT`: a leader counts its own journal as holding every entry it appended (it
  commits an index once enough `next_node_idx` successes arrived, itself included unasked), so
  acknowledgements must reach it only once its own journal is durable (replication/
  transport.py holds them back until then).
- A13 `REPEATED_ACK`: a leader that gets a `next_node_idx` success at or below the index it
  has recorded for that follower changes nothing but the time it last heard it (the
  transport does not send such a repeat within half a heartbeat of the previous one).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

import pysyncobj.pickle as _pickle
import pysyncobj.syncobj as _syncobj
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.config import FAIL_REASON, SERIALIZER_STATE
from pysyncobj.journal import Journal
from pysyncobj.node import TCPNode
from pysyncobj.poller import POLL_EVENT_TYPE
from pysyncobj.tcp_connection import CONNECTION_STATE, set_keepalive
from pysyncobj.transport import TCPTransport
from pysyncobj.version import VERSION

from replication.log import MAX_ENTRY_BYTES

__all__ = [
    "FAIL_REASON",
    "SERIALIZER_STATE",
    "VERSION",
    "Journal",
    "SyncObjConf",
    "TCPNode",
    "set_keepalive",
]

TESTED_VERSIONS = ("0.3.17",)

# A6: connection states and poller events, as pysyncobj's poller and transport use them
DISCONNECTED = CONNECTION_STATE.DISCONNECTED
CONNECTING = CONNECTION_STATE.CONNECTING
CONNECTED = CONNECTION_STATE.CONNECTED
EVENT_READ = POLL_EVENT_TYPE.READ
EVENT_WRITE = POLL_EVENT_TYPE.WRITE
EVENT_ERROR = POLL_EVENT_TYPE.ERROR
pickle_dumps: Callable[[Any], bytes] = _pickle.dumps
pickle_loads: Callable[[bytes], Any] = _pickle.loads

# A9: journal entry types
REGULAR = 0
NO_OP = b"\x01"
MEMBERSHIP = 2

# A8: appends are batched up to this many bytes; a single entry this long would be chunked
APPEND_BATCH_BYTES = 1 << 16
ENVELOPE_BYTES = 1024  # what pysyncobj and RaftLog wrap around an entry's bytes, at most
if MAX_ENTRY_BYTES + ENVELOPE_BYTES > APPEND_BATCH_BYTES:
    raise ImportError("log entries would reach pysyncobj's chunked appends (A8)")


def configuration(**options: Any) -> SyncObjConf:
    """A SyncObjConf with the batch size the entry bound relies on (A8)."""
    return SyncObjConf(appendEntriesBatchSizeBytes=APPEND_BATCH_BYTES, **options)


# --------------------------------------------------------------------------- the node (A1-A4)

_CONSTRUCT_LOCK = threading.Lock()


class RaftNode(SyncObj):
    """pysyncobj's SyncObj with one replicated method, which hands each entry and its index to
    `apply(index, entry)`."""

    def __init__(
        self,
        address: str,
        peers: list[str],
        conf: SyncObjConf,
        journal: Journal,
        apply: Callable[[int, Any], None],
        transport_class: type[TCPTransport],
        link_owner: Any,
    ):
        self.link_owner = link_owner  # what our transport reads while it is constructed
        self._apply = apply
        with _CONSTRUCT_LOCK:  # A1: pysyncobj has no journal option
            original = _syncobj.createJournal
            _syncobj.createJournal = lambda _path: journal
            try:
                super().__init__(address, peers, conf, transportClass=transport_class)
            finally:
                _syncobj.createJournal = original

    @replicated
    def _entry(self, entry: Any) -> None:
        self._apply(self.raftLastApplied + 1, entry)  # A2

    def propose(self, entry: Any, callback: Callable[[Any, int], None] | None) -> None:
        """Hand `entry` to the leader (thread-safe: pysyncobj queues it)."""
        self._entry(entry, callback=callback)

    @property
    def leader_id(self) -> str | None:
        leader = self._getLeader()  # A4
        return None if leader is None else str(leader.id)

    @property
    def is_leader(self) -> bool:
        return bool(self._isLeader())  # A4

    def leader_connected(self) -> bool:
        leader = self._getLeader()
        if leader is None:
            return False
        return bool(leader.id == self.selfNode.id or self.isNodeConnected(leader))

    def enable_wakeups(self) -> None:
        """`wake()` then ends the wait of the current `doTick` at once (A10: `_poller` is
        the poller doTick waits on; pysyncobj wakes it only for proposals)."""
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        self._wake_pipe: tuple[int, int] | None = (read, write)

        def drain(_descr: int, _event: int) -> None:
            try:
                while os.read(read, 4096):
                    pass
            except BlockingIOError:
                pass

        self._poller.subscribe(read, drain, EVENT_READ)

    def wake(self) -> None:
        pipe = getattr(self, "_wake_pipe", None)
        if pipe is not None:
            with contextlib.suppress(OSError):  # full (a wake-up is pending) or closed
                os.write(pipe[1], b"w")

    def destroy(self) -> None:
        super().destroy()
        pipe = getattr(self, "_wake_pipe", None)
        if pipe is not None:
            self._wake_pipe = None
            self._poller.unsubscribe(pipe[0])
            for fd in pipe:
                os.close(fd)

    def send_appends(self) -> None:
        """Send every peer what it lacks now, not at the next heartbeat (A12)."""
        self._SyncObj__sendAppendEntries()

    def pace_snapshot_reads(self, may_read: Callable[[Any], bool]) -> None:
        """Read the next snapshot chunk for a peer only when `may_read(peer)` (A3)."""
        serializer = self._SyncObj__serializer
        read_chunk = serializer.getTransmissionData

        def paced(peer: Any) -> Any:
            return read_chunk(peer) if may_read(peer) else None

        serializer.getTransmissionData = paced


# --------------------------------------------------------------------------- the transport (A5)


class TransportBase(TCPTransport):
    """pysyncobj's TCP transport with its hooks under names of ours; connections are the
    `connection_class` (A6) and pysyncobj's utility commands (node changes from any TCP client
    that knows the secret) are switched off.

    Subclasses override `on_node_connected`, `on_node_disconnected`, `on_message`, `on_tick`,
    `on_new_connection` and call `raft_*` to pass events on to the node."""

    connection_class: Any = None  # set by the subclass: GuardedConnection

    # --- from pysyncobj -------------------------------------------------------------------

    def _onNodeConnected(self, node: Any) -> None:
        self.on_node_connected(node)

    def _onNodeDisconnected(self, node: Any) -> None:
        self.on_node_disconnected(node)

    def _onMessageReceived(self, node: Any, message: Any) -> None:
        self.on_message(node, message)

    def _onTick(self) -> None:
        TCPTransport._onTick(self)
        self.on_tick()

    def setOnUtilityMessageCallback(self, message: str, callback: Any) -> None:
        return None

    def _onUtilityMessage(self, conn: Any, message: Any) -> bool:
        conn.disconnect()
        return True

    def _createServer(self) -> None:
        host, port = self._syncObj.conf.bindAddress.rsplit(":", 1)
        conf = self._syncObj.conf
        self._server = self.server_class(
            self._syncObj._poller,
            host,
            int(port),
            self._accepted,
            conf.sendBufferSize,
            conf.recvBufferSize,
        )

    def addNode(self, node: Any) -> None:
        self._nodes.add(node)
        self._nodeAddrToNode[node.address] = node
        if self._shouldConnect(node):
            conn = self.new_connection()
            conn.setOnConnectedCallback(functools.partial(self._onOutgoingConnected, conn))
            conn.setOnMessageReceivedCallback(functools.partial(self._onMessageReceived, node))
            conn.setOnDisconnectedCallback(functools.partial(self._onDisconnected, conn))
            self._connections[node] = conn

    def _accepted(self, sock: socket.socket) -> None:
        try:
            address = str(sock.getpeername()[0])
        except OSError:
            sock.close()
            return
        if not self.on_new_connection(address):
            sock.close()
            return
        conn = self.new_connection(sock)
        conn.peer_ip = address
        self._onNewIncomingConnection(conn)

    def _onIncomingMessageReceived(self, conn: Any, message: Any) -> None:
        if self._syncObj.encryptor and not conn.sendRandKey:
            TCPTransport._onIncomingMessageReceived(self, conn, message)  # the key exchange
            return
        if not isinstance(message, str) or message not in self._nodeAddrToNode:
            conn.disconnect()  # a utility command, 'readonly' or a stranger: not served
            self._unknownConnections.discard(conn)
            self.on_stranger(message)
            return
        conn.identified = True
        TCPTransport._onIncomingMessageReceived(self, conn, message)

    def _onOutgoingMessageReceived(self, conn: Any, message: Any) -> None:
        conn.identified = True
        TCPTransport._onOutgoingMessageReceived(self, conn, message)

    # --- to pysyncobj ---------------------------------------------------------------------

    def raft_node_connected(self, node: Any) -> None:
        TCPTransport._onNodeConnected(self, node)

    def raft_node_disconnected(self, node: Any) -> None:
        TCPTransport._onNodeDisconnected(self, node)

    def raft_message(self, node: Any, message: Any) -> None:
        TCPTransport._onMessageReceived(self, node, message)

    def raft_send(self, node: Any, message: Any) -> bool:
        return bool(TCPTransport.send(self, node, message))

    # --- what subclasses read -------------------------------------------------------------

    @property
    def self_address(self) -> str:
        return str(self._selfNode.address)

    def peer_nodes(self) -> list[Any]:
        return list(self._nodes)

    def connection(self, node: Any) -> Any:
        return self._connections.get(node)

    def pending_connections(self) -> list[Any]:
        """Connections not yet tied to a node: incoming ones before the peer named itself,
        outgoing ones before the peer answered the key exchange."""
        pending = list(self._unknownConnections)
        pending += [c for c in self._connections.values() if c.state != DISCONNECTED]
        return [c for c in pending if not c.identified]

    def incoming_pending(self) -> list[Any]:
        """Accepted connections whose peer has not named itself yet."""
        return list(self._unknownConnections)

    def member_hosts(self) -> set[str]:
        """The IP addresses of the other voters."""
        return {str(node.host) for node in self._nodes}

    def drop_pending(self, conn: Any) -> None:
        self._unknownConnections.discard(conn)
        conn.disconnect()

    # --- overridden by subclasses ---------------------------------------------------------

    server_class: Any = None

    def new_connection(self, sock: socket.socket | None = None) -> Any:
        conf = self._syncObj.conf
        conn = self.connection_class(
            poller=self._syncObj._poller,
            socket=sock,
            timeout=conf.connectionTimeout,
            sendBufferSize=conf.sendBufferSize,
            recvBufferSize=conf.recvBufferSize,
            keepalive=conf.tcp_keepalive,
        )
        conn.encryptor = self._syncObj.encryptor
        return conn

    def on_new_connection(self, address: str) -> bool:
        return True

    def on_stranger(self, name: Any) -> None:
        """A connection with the secret named no member (a removed signer, say): closed."""

    def on_node_connected(self, node: Any) -> None:
        self.raft_node_connected(node)

    def on_node_disconnected(self, node: Any) -> None:
        self.raft_node_disconnected(node)

    def on_message(self, node: Any, message: Any) -> None:
        self.raft_message(node, message)

    def on_tick(self) -> None:
        return None


# --------------------------------------------------------------------------- messages (A7)


def kind(message: Any) -> str | None:
    value = message.get("type") if isinstance(message, dict) else None
    return value if isinstance(value, str) else None


def carries_entries(message: dict[str, Any]) -> bool:
    """An append with log entries (or a chunk of one)."""
    return kind(message) == "append_entries" and bool(
        message.get("entries") or "transmission" in message
    )


def is_success_ack(message: dict[str, Any]) -> bool:
    """A follower's answer that it stored entries up to `ack_index(message)`."""
    return kind(message) == "next_node_idx" and bool(message.get("success"))


def append_term(message: dict[str, Any]) -> int | None:
    """The leader's term an append carries, or None for any other message."""
    return int(message["term"]) if kind(message) == "append_entries" else None


def ack_index(message: dict[str, Any]) -> int:
    return int(message["next_node_idx"]) - 1


def is_plain_ack(message: dict[str, Any]) -> bool:
    return is_success_ack(message) and not message["reset"]


def continues(previous: dict[str, Any], message: dict[str, Any]) -> bool:
    """Whether append `message` starts right after append `previous` ends (same term)."""
    if kind(previous) != "append_entries" or kind(message) != "append_entries":
        return False
    if not previous.get("entries") or not message.get("entries"):
        return False
    if "transmission" in previous or "transmission" in message:
        return False
    last = previous["entries"][-1]
    return bool(
        previous["term"] == message["term"]
        and message["prevLogIdx"] == last[1]
        and message["prevLogTerm"] == last[2]
    )


def merge(previous: dict[str, Any], message: dict[str, Any]) -> dict[str, Any]:
    return {
        **previous,
        "entries": [*previous["entries"], *message["entries"]],
        "commit_index": message["commit_index"],
    }


def entries_of(message: dict[str, Any]) -> list[tuple[bytes, int, int]]:
    return list(message.get("entries") or [])


def snapshot_chunk(message: dict[str, Any]) -> tuple[bytes, bool, bool] | None:
    """(data, first, last) of a snapshot chunk in an append, or None."""
    if kind(message) != "append_entries" or not message.get("serialized"):
        return None
    data, first, last = message["serialized"]
    return data, bool(first), bool(last)


def keepalive_ack() -> dict[str, Any]:
    """An answer that keeps the leader counting us as alive without moving its indexes."""
    return {"type": "next_node_idx", "next_node_idx": 0, "reset": False, "success": False}


def entry_argument(command: bytes) -> Any:
    """The argument of our replicated method in a regular journal entry (A9), else None."""
    if command[:1] != bytes([REGULAR]):
        return None
    call = _pickle.loads(command[1:])
    return call[1][0]
