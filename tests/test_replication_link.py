"""The replication link's guards and the log's entry bound, with real signers on 127.0.0.1:
what a peer without the secret can make a signer do (little, briefly), and entries near the
bound travelling to a fresh and to a reconnecting follower (docs/replication.md, Security)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import pickle
import select
import socket
import struct
import time
import zlib
from typing import Any

import pytest
from pysyncobj.encryptor import getEncryptor
from raft_cluster import Cluster, commit, issue, wait_for

from replication import transport as transport_module
from replication.connection import GuardedConnection, session_key, session_secret
from replication.errors import EntryTooLarge
from replication.log import MAX_ENTRY_BYTES
from replication.pysyncobj_adapter import APPEND_BATCH_BYTES, DISCONNECTED, EVENT_READ
from replication.raft import RaftLog
from storage import Issued, encode

pytestmark = pytest.mark.timeout(120)


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def link(raft: RaftLog[Any]) -> Any:
    assert raft._transport is not None
    return raft._transport.counters


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


STRANGER = "127.0.0.2"  # a loopback address that is no member's (the members use 127.0.0.1)


def dial(port: int) -> socket.socket:
    """A connection from a stranger's address."""
    return socket.create_connection(("127.0.0.1", port), source_address=(STRANGER, 0))


def big_issue(number: int, size: int) -> Any:
    """An issuance whose log entry is exactly `size` bytes."""
    command = issue(number)
    for _ in range(3):  # the bin header grows with the DER: settle in a step or two
        padding = size - len(encode(command))
        der = command.der + b"x" * padding if padding >= 0 else command.der[:padding]
        command = dataclasses.replace(command, der=der)
    assert len(encode(command)) == size
    return command


async def test_entries_up_to_the_bound_reach_fresh_and_reconnecting_followers(
    tmp_path, monkeypatch
):
    """pysyncobj 0.3.17 sends an entry of at least its batch size (64 KiB) in chunks and marks
    the last one a chunk early: followers failed to unpickle it after a reconnect. Entries
    over MAX_ENTRY_BYTES are refused before they are proposed, on the leader and on a
    follower, so none exists; entries at the bound travel whole, also in the catch-up of a
    fresh follower and of a reconnecting one."""
    chunked: list[str] = []
    deliver = transport_module.ReplicationTransport._deliver

    def watching(self: Any, node: Any, message: Any) -> bool:
        if isinstance(message, dict) and "transmission" in message:
            chunked.append(node.id)
        return bool(deliver(self, node, message))

    monkeypatch.setattr(transport_module.ReplicationTransport, "_deliver", watching)
    cluster = Cluster(tmp_path, size=3)
    try:
        a, b, c = cluster.addresses
        cluster.start(a)
        cluster.start(b)  # c, the fresh follower, is not there yet
        leader = await cluster.wait_leader(among=[a, b])
        follower = cluster.logs[b if leader.address == a else a]
        for raft in (leader, follower):
            with pytest.raises(EntryTooLarge):
                await commit(raft, big_issue(900, MAX_ENTRY_BYTES + 1))
        assert MAX_ENTRY_BYTES + 1 < APPEND_BATCH_BYTES  # refused below pysyncobj's chunk size
        with pytest.raises(EntryTooLarge):
            await commit(leader, big_issue(901, APPEND_BATCH_BYTES + 100))
        for n in range(4):
            result = await commit([leader, follower][n % 2], big_issue(n, MAX_ENTRY_BYTES))
            assert isinstance(result, Issued)
        cluster.start(c)  # fresh: gets the whole log, large entries included
        await cluster.converge(timeout=30)
        cluster.stop(c)
        for n in range(4, 8):
            await commit(leader, big_issue(n, MAX_ENTRY_BYTES))
        cluster.start(c)  # reconnecting: gets what it missed
        await commit(leader, big_issue(8, MAX_ENTRY_BYTES))
        await cluster.converge(timeout=30)
        for address in (a, b, c):
            assert cluster.repos[address].get_request("issue-900") is None
            assert cluster.repos[address].get_request("issue-8") is not None
        assert chunked == []  # no entry ever took pysyncobj's chunked path
    finally:
        cluster.close()


@pytest.fixture
async def lone(tmp_path):
    """One signer listening (its peer never starts): what strangers can do to it."""
    cluster = Cluster(tmp_path)
    a, _ = cluster.addresses
    raft = cluster.start(a)
    yield raft
    cluster.close()


async def test_a_peer_without_the_secret_cannot_fill_memory(lone):
    """4 connections announce 2 GB frames and stream junk: each is closed at its header, and
    what they send never accumulates (pysyncobj's own connection buffered all of it)."""
    port = port_of(lone.address)
    junk = b"\0" * (1 << 20)
    before = rss_bytes()
    sent = 0

    def attack() -> int:
        total = 0
        sockets = [dial(port) for _ in range(4)]
        deadline = time.monotonic() + 3
        for sock in sockets:
            sock.settimeout(0.5)
            sock.sendall(struct.pack("i", 2**31 - 1))
        while time.monotonic() < deadline and sockets:
            for sock in list(sockets):
                try:
                    total += sock.send(junk)
                except OSError:  # closed by the signer: as it should
                    sockets.remove(sock)
                    sock.close()
        for sock in sockets:
            sock.close()
        return total

    sent = await asyncio.to_thread(attack)
    await wait_for(lambda: link(lone).refused_frames >= 4, 10, "four frames refused")
    grown = rss_bytes() - before
    assert grown < 32 << 20, f"RSS grew by {grown >> 20} MiB while {sent >> 20} MiB were sent"


async def test_a_frame_over_the_handshake_limit_or_without_the_secret_is_refused(lone):
    port = port_of(lone.address)
    with dial(port) as sock:
        sock.sendall(struct.pack("i", 8192))  # over 4 KiB before the secret was shown
        await wait_for(lambda: link(lone).refused_frames >= 1, 10, "an oversized frame")
    with dial(port) as sock:
        sock.sendall(struct.pack("i", 100) + b"not a fernet token".ljust(100, b"!"))
        await wait_for(lambda: link(lone).refused_frames >= 2, 10, "a frame without the secret")


async def test_a_silent_connection_is_closed_after_the_handshake_deadline(lone):
    port = port_of(lone.address)
    began = time.monotonic()
    with dial(port) as sock:
        sock.settimeout(10)
        assert sock.recv(1) == b""  # closed by the signer, never answered
    waited = time.monotonic() - began
    assert link(lone).handshake_timeouts >= 1
    assert waited >= lone.handshake_timeout * 0.9


async def test_unauthenticated_connections_are_capped_and_cannot_crowd_a_member_out(tmp_path):
    cluster = Cluster(tmp_path)
    a, b = sorted(cluster.addresses)  # b, the higher address, dials a: through the crowd
    lone = cluster.start(a)
    port = port_of(a)
    stop = False

    def crowd() -> None:  # strangers keep every slot taken while the member connects
        sockets: list[socket.socket] = []
        while not stop:
            sockets = [s for s in sockets if s.fileno() >= 0]
            with contextlib.suppress(OSError):
                sockets.append(dial(port))
            time.sleep(0.01)
        for sock in sockets:
            sock.close()

    crowding = asyncio.create_task(asyncio.to_thread(crowd))
    try:
        limit = transport_module.MAX_PENDING
        await wait_for(lambda: link(lone).over_limit >= 8, 10, "strangers over the limit")
        assert len(lone._transport.incoming_pending()) <= limit + 1
        cluster.start(b)  # the member still gets through
        await cluster.wait_leader(timeout=20)
        section = await lone.health()
        assert section.data["link"]["over_limit"] >= 8
    finally:
        stop = True
        await crowding
        cluster.close()


class ReadPoller:
    """Just enough of pysyncobj's poller for two connections over a socketpair."""

    def __init__(self) -> None:
        self.handlers: dict[int, Any] = {}

    def subscribe(self, fd: int, handler: Any, _mask: int) -> None:
        self.handlers[fd] = handler

    def unsubscribe(self, fd: int) -> None:
        self.handlers.pop(fd, None)

    def poll_until(self, predicate: Any) -> None:
        deadline = time.monotonic() + 5
        while not predicate():
            assert time.monotonic() < deadline, "timed out"
            ready, _, _ = select.select(list(self.handlers), [], [], 0.05)
            for fd in ready:
                if fd in self.handlers:
                    self.handlers[fd](fd, EVENT_READ)


def test_frames_after_the_key_exchange_are_sealed_per_connection_and_direction():
    """AES-GCM under keys derived from the secret and both random keys, the nonce counted by
    both ends: a replayed, reflected, tampered with or foreign frame closes the connection."""
    secret = session_secret(b"test replication secret 0123456789")
    encryptor = getEncryptor(b"test replication secret 0123456789")

    def connected() -> tuple[ReadPoller, socket.socket, GuardedConnection, list, list]:
        poller = ReadPoller()
        left, right = socket.socketpair()
        left.setblocking(False)
        right.setblocking(False)
        got: list[Any] = []
        refused: list[str] = []
        ours = GuardedConnection(poller, onMessageReceived=got.append, socket=right, timeout=5,
                                 on_refused=refused.append)  # fmt: skip
        ours.encryptor, ours.session_secret = encryptor, secret
        return poller, left, ours, got, refused

    def exchange(
        poller: ReadPoller, left: socket.socket, ours: GuardedConnection, got: list[Any]
    ) -> tuple[bytes, bytes]:
        """We dial from `left` (keys by hand); `ours` accepts."""
        theirs, mine = b"a" * 32, b"b" * 32
        token = encryptor.encrypt(zlib.compress(pickle.dumps(theirs)))
        left.sendall(struct.pack("i", len(token)) + token)
        poller.poll_until(lambda: got == [theirs])
        ours.sendRandKey, ours.recvRandKey = theirs, mine  # as the transport sets them
        return theirs, mine

    def frame(key: Any, counter: int, message: Any) -> bytes:
        data = key.encrypt(counter.to_bytes(12, "big"), pickle.dumps(message), None)
        return struct.pack("i", len(data)) + data

    poller, left, ours, got, refused = connected()
    try:
        theirs, mine = exchange(poller, left, ours, got)
        to_ours = session_key(secret, mine, theirs)  # frames we send carry `mine`
        sealed = [frame(to_ours, n, {"n": n}) for n in range(3)]
        left.sendall(sealed[0] + sealed[1])
        poller.poll_until(lambda: len(got) == 3)
        assert got[1:] == [{"n": 0}, {"n": 1}] and ours.authenticated
        ours.send({"back": 1})  # its first frame: the exchange (Fernet) ...
        ours.send({"back": 2})  # ... then sealed under the other direction's key
        left.setblocking(True)
        replies = []
        for _ in range(2):
            (length,) = struct.unpack("i", left.recv(4, socket.MSG_WAITALL))
            replies.append(left.recv(length, socket.MSG_WAITALL))
        assert pickle.loads(zlib.decompress(encryptor.decrypt(replies[0]))) == (theirs, {"back": 1})
        from_ours = session_key(secret, theirs, mine)
        assert pickle.loads(from_ours.decrypt((0).to_bytes(12, "big"), replies[1], None)) == {
            "back": 2
        }
        left.sendall(sealed[1])  # a replay: the counter has moved on
        poller.poll_until(lambda: refused)
        assert ours.state == DISCONNECTED and len(got) == 3
    finally:
        ours.disconnect()
        left.close()
    other = session_secret(b"another secret, just as long as it")
    for bad in ("reflected", "tampered", "foreign", "skipped"):
        poller, left, ours, got, refused = connected()
        try:
            theirs, mine = exchange(poller, left, ours, got)
            key = {
                "reflected": session_key(secret, theirs, mine),
                "foreign": session_key(other, mine, theirs),
            }.get(bad, session_key(secret, mine, theirs))
            data = frame(key, 1 if bad == "skipped" else 0, {"n": 0})
            if bad == "tampered":
                data = data[:-1] + bytes([data[-1] ^ 1])
            left.sendall(data)
            poller.poll_until(refused.copy)
            assert got == [theirs] and ours.state == DISCONNECTED, bad
        finally:
            ours.disconnect()
            left.close()
