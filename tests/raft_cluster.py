"""In-process clusters of real RaftLogs (pysyncobj nodes on 127.0.0.1, LMDB repositories) for the
replication tests, with partitions made by a transport that drops traffic between cut pairs."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from replication.cluster import CLUSTER_META, ClusterRecord
from replication.raft import RaftLog
from replication.settings import ReplicationSettings
from replication.transport import ReplicationTransport
from signer.pki import merkle
from storage import (
    Command,
    Duplicate,
    Issued,
    IssueX509,
    Repository,
    Result,
    Revocation,
    RevokeX509,
    encode,
)

SECRET = b"test replication secret 0123456789"
ISSUER = bytes(range(20))
FAST = {
    "append_entries_period": 0.02,
    "election_min_timeout": 0.12,
    "election_max_timeout": 0.3,
    "connection_timeout": 0.5,
    "connection_retry": 0.1,
    "leader_fallback_timeout": 1.0,
    "tick": 0.01,
    "commit_timeout": 2.0,
    "leader_wait": 1.5,
    "snapshot_chunk_bytes": 65536,
}


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class Partitions:
    """Which pairs of nodes cannot talk; shared by every node's transport."""

    def __init__(self) -> None:
        self.cut: set[frozenset[str]] = set()

    def isolate(self, node: str, others: list[str]) -> None:
        self.cut |= {frozenset((node, other)) for other in others if other != node}

    def heal(self) -> None:
        self.cut.clear()

    def transport(self) -> type[ReplicationTransport]:
        partitions = self

        class PartitionedTransport(ReplicationTransport):
            def blocked(self, node: Any) -> bool:
                return frozenset((self._selfNode.address, node.id)) in partitions.cut

        return PartitionedTransport


def issue(number: int, request_id: str | None = None, serial: int | None = None) -> IssueX509:
    """A synthetic issue_x509 command (serials beyond 64 bits, as real ones are)."""
    return IssueX509(
        request_id=request_id or f"issue-{number}",
        request_digest=b"digest-%d" % number,
        issuer=ISSUER,
        serial=serial if serial is not None else 2**140 + number,
        der=b"fake certificate %d " % number + os.urandom(64),
        profile="server",
        not_before=1_700_000_000,
        not_after=1_800_000_000,
        issued_at=1_700_000_000 + number,
    )


def revoke(number: int, serial: int, request_id: str | None = None) -> RevokeX509:
    return RevokeX509(
        request_id=request_id or f"revoke-{number}",
        request_digest=b"revoke-digest-%d" % number,
        issuer=ISSUER,
        serial=serial,
        reason=1,
        revoked_at=1_750_000_000 + number,
        invalidity_date=None,
        crl_entry=b"crl entry %d" % number,
    )


async def commit(log: RaftLog[Result], command: Command) -> Result:
    """Commit a command as the signer's services do: its log entry's bytes."""
    return await log.commit(encode(command))


def settled(result: Result) -> Issued | Revocation:
    """What a request came to: the first result of a duplicate, an issuance or a revocation."""
    outcome = result.original if isinstance(result, Duplicate) else result
    assert isinstance(outcome, Issued | Revocation), result
    return outcome


def cluster_record(repository: Repository) -> ClusterRecord | None:
    raw = repository.meta(CLUSTER_META)
    return None if raw is None else ClusterRecord.unpack(raw)


class Cluster:
    """N voters on 127.0.0.1, each a RaftLog over its own LMDB repository and journal dir."""

    def __init__(self, base: Path, size: int = 2, **overrides: Any):
        self.base = base
        self.partitions = Partitions()
        self.addresses = [f"127.0.0.1:{port}" for port in free_ports(size)]
        self.overrides = {**FAST, **overrides}
        self.logs: dict[str, RaftLog[Result]] = {}
        self.repos: dict[str, Repository] = {}

    def settings(self, address: str, peers: list[str] | None = None) -> ReplicationSettings:
        index = self.addresses.index(address)
        others = [a for a in self.addresses if a != address] if peers is None else peers
        return ReplicationSettings(
            self_address=address,
            peers=others,
            secret_env="UNUSED_IN_TESTS",
            journal_dir=self.base / f"journal-{index}",
            **self.overrides,
        )

    def repo_path(self, address: str) -> Path:
        return self.base / f"repo-{self.addresses.index(address)}"

    def start(self, address: str, peers: list[str] | None = None, **extra: Any) -> RaftLog[Result]:
        repository = Repository(self.repo_path(address), 1 << 30)
        settings = self.settings(address, peers)
        if extra:
            settings = settings.model_copy(update=extra)
        raft: RaftLog[Result] = RaftLog(
            settings, repository, secret=SECRET, transport_class=self.partitions.transport()
        )
        try:
            raft.start()
        except BaseException:
            repository.close()
            raise
        self.logs[address] = raft
        self.repos[address] = repository
        return raft

    def start_all(self) -> None:
        for address in self.addresses:
            self.start(address)

    def stop(self, address: str) -> None:
        raft = self.logs.pop(address, None)
        if raft is not None:
            raft.close()
        repository = self.repos.pop(address, None)
        if repository is not None:
            repository.close()

    def wipe(self, address: str) -> None:
        self.stop(address)
        index = self.addresses.index(address)
        shutil.rmtree(self.base / f"journal-{index}", ignore_errors=True)
        shutil.rmtree(self.repo_path(address), ignore_errors=True)

    def close(self) -> None:
        for address in list(self.logs):
            self.stop(address)

    def add_address(self) -> str:
        address = f"127.0.0.1:{free_ports(1)[0]}"
        self.addresses.append(address)
        return address

    def leader(self) -> RaftLog[Result] | None:
        leaders = [raft for raft in self.logs.values() if raft.view.role == "leader"]
        return leaders[0] if len(leaders) == 1 else None

    async def wait_leader(
        self, timeout: float = 10.0, among: list[str] | None = None
    ) -> RaftLog[Result]:
        def found() -> RaftLog[Result] | None:
            nodes = [self.logs[a] for a in (among or list(self.logs)) if a in self.logs]
            leaders = [n for n in nodes if n.view.role == "leader" and n.view.has_quorum]
            if len(leaders) == 1 and all(
                n.view.leader == leaders[0].address
                and n.view.has_quorum
                and n.view.leader_connected
                for n in nodes
            ):
                return leaders[0]
            return None

        return await wait_for(found, timeout, "a leader known to every node")

    async def converge(self, timeout: float = 15.0, among: list[str] | None = None) -> None:
        """Wait until every (chosen) repository has applied the same index and content."""
        addresses = among or list(self.logs)

        def same() -> bool:
            indexes = {self.repos[a].last_applied_index() for a in addresses}
            views = [self.logs[a].view for a in addresses]
            caught_up = all(v.applied_index >= v.commit_index for v in views)
            if len(indexes) != 1 or not caught_up:
                return False
            digests = {self.repos[a].content_digest() for a in addresses}
            return len(digests) == 1

        await wait_for(same, timeout, f"identical repositories on {addresses}")


async def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def assert_same_audit_logs(repos: list[Repository]) -> None:
    """The audit logs are one log: the same records at the same positions, the same tree."""
    sizes = {repo.audit_size() for repo in repos}
    assert len(sizes) == 1, f"audit logs of different sizes {sizes}"
    [size] = sizes
    records = repos[0].audit_records(0, size + 1)
    assert len(records) == size
    for repo in repos[1:]:
        assert repo.audit_records(0, size + 1) == records, f"{repo.path}: other records"
    roots = set()
    for repo in repos:
        with repo.audit_tree() as (held, perfect):
            roots.add(merkle.root(perfect, held))
    assert roots == {merkle.tree_root(records)}, "the audit trees differ"


def check_invariants(repos: list[Repository], acknowledged: dict[str, Any]) -> None:
    """Every acknowledged operation on every repository, identical repositories (their audit
    logs too), each serial issued once, consistent indexes."""
    digests = {repo.content_digest() for repo in repos}
    assert len(digests) == 1, "repositories differ"
    assert_same_audit_logs(repos)
    for repo in repos:
        report = repo.check_consistency()
        assert report.ok, report.problems[:5]
        for request_id, result in acknowledged.items():
            recorded = repo.get_request(request_id)
            assert recorded is not None, f"acknowledged {request_id} missing from {repo.path}"
            assert recorded.result.serial == settled(result).serial, request_id
    counts = repos[0].counts()
    serials = {
        repos[0].get_request(rid).result.serial  # type: ignore[union-attr]
        for rid in acknowledged
        if rid.startswith("issue")
    }
    issued = [rid for rid in acknowledged if rid.startswith("issue")]
    assert len(serials) == len(issued), "a serial was issued twice"
    assert counts["certificates"] >= len(issued)
