"""pysyncobj's internals that replication relies on, one test per assumption (the list is in
replication/pysyncobj_adapter.py, A1 to A13): an upgrade of pysyncobj fails here, by name,
instead of corrupting state somewhere else."""

from __future__ import annotations

import inspect
import pickle
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pysyncobj
import pysyncobj.syncobj as syncobj_module
import pytest
from pysyncobj.encryptor import getEncryptor
from pysyncobj.poller import createPoller
from pysyncobj.tcp_connection import TcpConnection
from pysyncobj.transport import TCPTransport
from raft_cluster import Cluster, commit, free_ports, issue, wait_for

from replication import pysyncobj_adapter as adapter
from replication.connection import GuardedConnection, GuardedServer
from replication.errors import NotCommitted
from replication.journal import DurableJournal
from replication.log import MAX_ENTRY_BYTES

pytestmark = pytest.mark.timeout(60)


class PlainTransport(adapter.TransportBase):
    connection_class = GuardedConnection
    server_class = GuardedServer


class LoneNode:
    """A one-voter RaftNode over a DurableJournal, ticked by a thread of its own."""

    def __init__(self, tmp: Path):
        self.journal = DurableJournal(tmp / "raft.journal")
        self.applied: list[tuple[int, Any]] = []
        self.address = f"127.0.0.1:{free_ports(1)[0]}"
        conf = adapter.configuration(
            autoTick=False, appendEntriesUseBatch=False, commandsWaitLeader=False,
            bindAddress=self.address, password=b"contract test secret 0123",
            raftMinTimeout=0.1, raftMaxTimeout=0.2, appendEntriesPeriod=0.02,
            connectionTimeout=0.5, fullDumpFile=str(tmp / "dump"),
        )  # fmt: skip
        self.original_create = syncobj_module.createJournal
        self.node = adapter.RaftNode(
            self.address, [], conf, self.journal, self._apply, PlainTransport, link_owner=None
        )
        self.node.enable_wakeups()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _apply(self, index: int, entry: Any) -> None:
        self.applied.append((index, entry))

    def _run(self) -> None:
        while not self.stop.is_set():
            self.node.doTick(0.01)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.node.destroy()


@pytest.fixture
def lone(tmp_path):
    node = LoneNode(tmp_path)
    yield node
    node.close()


def test_the_version_is_pinned():
    assert adapter.VERSION in adapter.TESTED_VERSIONS


def test_a1_the_journal_is_the_one_handed_over_while_constructing(lone):
    assert lone.node._SyncObj__raftLog is lone.journal
    assert syncobj_module.createJournal is lone.original_create  # put back after
    assert {"add", "clear", "deleteEntriesFrom", "deleteEntriesTo", "_destroy",
            "setRaftCommitIndex", "getRaftCommitIndex", "setCurrentTerm", "getCurrentTerm",
            "getVotedForNodeId", "onOneSecondTimer"} <= set(dir(adapter.Journal))  # fmt: skip


def test_a2_a9_the_index_applied_is_the_journal_index_of_the_entry(lone):
    wait_until(lambda: lone.node.is_leader)
    done: list[int] = []
    for n in range(5):
        lone.node.propose(("c", n), lambda _result, reason: done.append(reason))
    wait_until(lambda: len(lone.applied) == 5)
    assert done == [adapter.FAIL_REASON.SUCCESS] * 5
    carried = {
        index: adapter.entry_argument(command)
        for command, index, _term in lone.journal
        if command[:1] == bytes([adapter.REGULAR])
    }
    for index, entry in lone.applied:
        assert carried[index] == entry  # A2: raftLastApplied + 1 is the entry's own index
    kinds = {
        name: getattr(syncobj_module._COMMAND_TYPE, name)
        for name in ("REGULAR", "NO_OP", "MEMBERSHIP")
    }
    assert kinds == {"REGULAR": adapter.REGULAR, "NO_OP": adapter.NO_OP[0],
                     "MEMBERSHIP": adapter.MEMBERSHIP}  # fmt: skip


def test_a3_the_snapshot_reader_is_the_serializers(lone):
    serializer = lone.node._SyncObj__serializer
    asked: list[Any] = []
    lone.node.pace_snapshot_reads(lambda peer: asked.append(peer) or False)
    assert serializer.getTransmissionData("peer") is None and asked == ["peer"]
    assert callable(type(serializer).getTransmissionData)
    source = inspect.getsource(syncobj_module.SyncObj)
    assert "self.__serializer.getTransmissionData(node)" in source


def test_a4_leader_and_role(lone):
    wait_until(lambda: lone.node.is_leader)
    assert lone.node.leader_id == lone.address and lone.node.leader_connected()
    assert callable(syncobj_module.SyncObj._getLeader) and callable(
        syncobj_module.SyncObj._isLeader
    )


def test_a5_the_transport_hooks_exist_with_their_shapes():
    for name, parameters in {
        "_onNodeConnected": ["self", "node"],
        "_onNodeDisconnected": ["self", "node"],
        "_onMessageReceived": ["self", "node", "message"],
        "_onTick": ["self"],
        "_onUtilityMessage": ["self", "conn", "message"],
        "_onNewIncomingConnection": ["self", "conn"],
        "_onIncomingMessageReceived": ["self", "conn", "message"],
        "_onOutgoingMessageReceived": ["self", "conn", "message"],
        "_onOutgoingConnected": ["self", "conn"],
        "_onDisconnected": ["self", "conn"],
        "_createServer": ["self"],
        "addNode": ["self", "node"],
        "_shouldConnect": ["self", "node"],
    }.items():
        method = getattr(TCPTransport, name)
        assert list(inspect.signature(method).parameters) == parameters, name
    source = inspect.getsource(TCPTransport.__init__)
    for attribute in ("_connections", "_unknownConnections", "_nodes", "_nodeAddrToNode",
                      "_selfNode", "_server", "_syncObj"):  # fmt: skip
        assert f"self.{attribute} =" in source, attribute
    assert "addOnTickCallback(self._onTick)" in source


async def test_a5_a7_the_hooks_are_called_with_these_messages(tmp_path, monkeypatch):
    seen: dict[str, set[str]] = {}
    original = adapter.TransportBase.raft_message

    def record(self: Any, node: Any, message: Any) -> None:
        if isinstance(message, dict):
            seen.setdefault(message["type"], set()).update(message)
        original(self, node, message)

    monkeypatch.setattr(adapter.TransportBase, "raft_message", record)
    cluster = Cluster(tmp_path)
    try:
        cluster.start_all()
        leader = await cluster.wait_leader()
        for n in range(3):
            await commit(leader, issue(n))
        assert {"type", "term", "commit_index", "prevLogIdx", "prevLogTerm", "entries"} <= seen[
            "append_entries"
        ]
        assert seen["next_node_idx"] == {"type", "next_node_idx", "reset", "success"}
        assert all(t.counters.accepted for t in (cluster.logs[a]._transport for a in cluster.logs))
    finally:
        cluster.close()


def test_a6_frames_interoperate_with_pysyncobjs_connection():
    """Our connection speaks TcpConnection's frames both ways, the key exchange included."""
    poller = createPoller("auto")
    left, right = socket.socketpair()
    for sock in (left, right):
        sock.setblocking(False)
    theirs_got: list[Any] = []
    ours_got: list[Any] = []
    encryptor = getEncryptor(b"contract test secret 0123")
    theirs = TcpConnection(poller, onMessageReceived=theirs_got.append, socket=left, timeout=5)
    ours = GuardedConnection(poller, onMessageReceived=ours_got.append, socket=right, timeout=5)
    theirs.encryptor = ours.encryptor = encryptor
    try:
        ours.send(b"our random key")
        theirs.send(b"their random key")
        messages = [{"type": "append_entries", "entries": [(b"\x00" + bytes(3000), 7, 2)]}, "x"]
        poll_until(poller, lambda: theirs_got and ours_got)
        ours.sendRandKey, theirs.recvRandKey = theirs_got[0], theirs_got[0]
        theirs.sendRandKey, ours.recvRandKey = ours_got[0], ours_got[0]
        for message in messages:
            ours.send(message)
            theirs.send(message)
        poll_until(poller, lambda: len(theirs_got) == 3 and len(ours_got) == 3)
        assert theirs_got[1:] == messages and ours_got[1:] == messages
        assert ours.authenticated
    finally:
        theirs.disconnect()
        ours.disconnect()


class RecordingConnection:
    """What pysyncobj's transport does to a connection during the key exchange."""

    def __init__(self) -> None:
        self.sendRandKey: bytes | None = None
        self.recvRandKey: bytes | None = None
        self.sent: list[Any] = []
        self.callback: Any = None

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def setOnMessageReceivedCallback(self, callback: Any) -> None:
        self.callback = callback


def test_a6_the_key_exchange_is_one_random_key_each_way_before_anything_else():
    """replication/connection.py seals every frame after the first one each way with keys
    derived from both random keys: the exchange must be exactly that."""
    events: list[str] = []
    stub = SimpleNamespace(
        _syncObj=SimpleNamespace(encryptor=object()),
        _selfIsReadonlyNode=False,
        _selfNode=SimpleNamespace(address="127.0.0.1:1"),
        _nodeAddrToNode={},
        _connToNode=lambda conn: "peer",
        _onMessageReceived=lambda node, message: None,
        _onOutgoingMessageReceived=lambda conn, message: None,
        _onNodeConnected=lambda node: events.append("connected"),
    )
    stub._sendSelfAddress = lambda conn: TCPTransport._sendSelfAddress(stub, conn)
    dialling, accepting = RecordingConnection(), RecordingConnection()
    TCPTransport._onOutgoingConnected(stub, dialling)
    assert isinstance(dialling.recvRandKey, bytes) and len(dialling.recvRandKey) == 32
    assert dialling.sent == [dialling.recvRandKey] and dialling.sendRandKey is None
    TCPTransport._onIncomingMessageReceived(stub, accepting, dialling.sent[0])
    assert accepting.sendRandKey == dialling.recvRandKey
    assert isinstance(accepting.recvRandKey, bytes) and len(accepting.recvRandKey) == 32
    assert (
        accepting.sent == [accepting.recvRandKey] and accepting.recvRandKey != dialling.recvRandKey
    )
    TCPTransport._onOutgoingMessageReceived(stub, dialling, accepting.sent[0])
    assert dialling.sendRandKey == accepting.recvRandKey
    assert dialling.sent[1:] == ["127.0.0.1:1"] and events == ["connected"]  # then sealed


def test_a8_entries_stay_below_the_chunked_appends():
    conf = adapter.configuration()
    assert conf.appendEntriesBatchSizeBytes == adapter.APPEND_BATCH_BYTES
    longest = "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535"
    entry = ("c", (longest, b"\xff" * 8), 2**62, 2**62, b"x" * MAX_ENTRY_BYTES)
    call = pickle.dumps((2**30, (entry,)), protocol=2)  # as `replicated` pickles the call
    assert 1 + len(call) < adapter.APPEND_BATCH_BYTES  # never `len(entry) >= batch size`
    source = inspect.getsource(syncobj_module.SyncObj)
    assert "len(entries[0][0]) >= batchSizeBytes" in source  # the chunked path, still there


def test_a10_a_wake_up_ends_the_wait_of_a_tick(tmp_path):
    node = LoneNode(tmp_path)
    node.stop.set()
    node.thread.join(5)
    try:
        for _ in range(5):
            node.node.doTick(0)  # nothing left to do
        waker = threading.Timer(0.2, node.node.wake)
        waker.start()
        began = time.monotonic()
        node.node.doTick(5.0)
        assert 0.15 < time.monotonic() - began < 2.5  # woken, not the 5 s of an idle tick
    finally:
        node.node.destroy()


async def test_a11_a_leader_commits_only_on_acknowledgements_it_hears(tmp_path, monkeypatch):
    """The leader counts its own journal unasked: holding acknowledgements back until our
    journal is durable is what keeps "committed" meaning on disk on both."""
    cluster = Cluster(tmp_path, commit_timeout=1.0)
    try:
        cluster.start_all()
        leader = await cluster.wait_leader()
        await commit(leader, issue(1))
        monkeypatch.setattr(type(leader), "durable_index", lambda self: 0)
        with pytest.raises(NotCommitted):
            await commit(leader, issue(2))
        monkeypatch.undo()
        await wait_for(lambda: cluster.repos[leader.address].get_request("issue-2"), 10, "2")
    finally:
        cluster.close()


async def test_a13_a_repeated_acknowledgement_only_says_the_follower_is_there(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_all()
        leader = await cluster.wait_leader()
        await commit(leader, issue(1))
        node = leader._node
        assert node is not None
        peer = next(iter(node.otherNodes))
        key = f"match_idx_server_{peer.id}"
        heard = node._SyncObj__lastResponseTime

        def repeat() -> tuple[dict[str, Any], float, dict[str, Any], float]:
            before, then = node.getStatus(), heard[peer]
            index = before[key]
            time.sleep(0.002)
            node._SyncObj__onMessageReceived(
                peer,
                {"type": "next_node_idx", "next_node_idx": index + 1, "reset": False,
                 "success": True},
            )  # fmt: skip
            return before, then, node.getStatus(), heard[peer]

        before, then, after, now = await leader.on_raft_thread(repeat)
        assert after[key] == before[key] and after["commit_idx"] == before["commit_idx"]
        assert after[f"next_node_idx_server_{peer.id}"] == before[f"next_node_idx_server_{peer.id}"]
        assert now > then
    finally:
        cluster.close()


def test_pysyncobj_exports_what_the_adapter_names():
    assert pysyncobj.SyncObj is adapter.SyncObj
    assert adapter.SERIALIZER_STATE.SUCCESS != adapter.SERIALIZER_STATE.FAILED


def wait_until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def poll_until(poller: Any, predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        poller.poll(0.05)
