"""A full disk on one signer of a pair: its Raft journal and repository on a small tmpfs of its
own (a private mount namespace made with `unshare`, so no root is needed), filled up by a
ballast file, then freed. The pair must refuse writes with a clear error, acknowledge nothing
that is not on disk on both, report it in health, stay consistent and carry on by itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from raft_cluster import FAST, SECRET, free_ports, issue, settled, wait_for

from replication.errors import JournalFailed, NoQuorum, NotCommitted, ReplicationError
from replication.raft import RaftLog
from replication.settings import ReplicationSettings
from storage import Issued, Repository, encode

ROOT = Path(__file__).resolve().parent.parent
NODE = ROOT / "tests" / "raft_node.py"
DISK_BYTES = 16 << 20

pytestmark = pytest.mark.timeout(180)


def _namespaces_work(tmp: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = tmp / "probe"
    probe.mkdir()
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"],
        capture_output=True,
    )
    return done.returncode == 0


class SmallDiskNode:
    """tests/raft_node.py in a mount namespace of its own, its files on a DISK_BYTES tmpfs."""

    def __init__(self, settings: ReplicationSettings, disk: Path):
        self.settings, self.disk = settings, disk
        self.process: asyncio.subprocess.Process | None = None
        self.next_id = 0

    async def start(self) -> None:
        self.disk.mkdir(parents=True, exist_ok=True)
        script = f'mount -t tmpfs -o size={DISK_BYTES} tmpfs "{self.disk}" && exec "$0" "$@"'
        self.process = await asyncio.create_subprocess_exec(
            "unshare", "-rm", "sh", "-c", script, sys.executable, str(NODE),
            self.settings.model_dump_json(), str(self.disk / "repo"),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=open(self.disk.with_suffix(".log"), "ab"),  # noqa: SIM115 (the child's)
        )  # fmt: skip
        assert self.process.stdout is not None
        assert json.loads(await self.process.stdout.readline()) == {"ready": True}

    @property
    def inside(self) -> Path:
        """The tmpfs as this process sees it (through the child's root)."""
        assert self.process is not None
        return Path(f"/proc/{self.process.pid}/root") / self.disk.relative_to("/")

    async def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process is not None and self.process.stdin and self.process.stdout
        self.next_id += 1
        self.process.stdin.write(json.dumps({"id": self.next_id, **request}).encode() + b"\n")
        await self.process.stdin.drain()
        while True:
            answer = json.loads(await self.process.stdout.readline())
            if answer.get("id") == self.next_id:
                return dict(answer)

    def fill(self) -> None:
        """Write a ballast file until the tmpfs is full."""
        with contextlib.suppress(OSError), open(self.inside / "ballast", "wb") as ballast:
            while True:
                ballast.write(b"\0" * (1 << 16))
                ballast.flush()

    def free(self) -> None:
        (self.inside / "ballast").unlink()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


async def test_a_full_disk_on_one_signer_stops_commits_until_there_is_space(tmp_path):
    if not _namespaces_work(tmp_path):
        pytest.skip("unshare cannot make a mount namespace with a tmpfs here")
    a, b = (f"127.0.0.1:{port}" for port in free_ports(2))
    base = dict(secret_env="UNUSED", **FAST)
    settings_a = ReplicationSettings(
        self_address=a, peers=[b], journal_dir=tmp_path / "journal-a", **base
    )
    disk = tmp_path / "disk-b"
    settings_b = ReplicationSettings(
        self_address=b, peers=[a], journal_dir=disk / "journal", **base
    )
    repository = Repository(tmp_path / "repo-a", 1 << 30, metasync=False)
    raft: RaftLog[Any] = RaftLog(settings_a, repository, secret=SECRET).start()
    node = SmallDiskNode(settings_b, disk)
    await node.start()
    acknowledged: list[Any] = []
    try:
        await wait_for(lambda: raft.view.has_quorum and raft.view.leader_connected, 20, "leader")
        for n in range(5):
            acknowledged.append(await _retrying(raft, n))
        await _full_then_freed(raft, node, repository, acknowledged, range(5, 20))
        if raft.view.role == "leader":  # the same with the full disk on the leader
            await raft.transfer_leadership()
        await wait_for(lambda: raft.view.role == "follower" and raft.view.has_quorum, 20, "b")
        await _full_then_freed(raft, node, repository, acknowledged, range(20, 35))
        target = repository.last_applied_index()
        while (status := await node.ask(status=1, digest=1))["result"]["applied_index"] < target:
            await asyncio.sleep(0.05)
        assert status["result"]["digest"] == repository.content_digest().hex()
        assert status["result"]["journal_failure"] is None
        for n in range(35):
            assert repository.get_request(f"issue-{n}") is not None
        assert repository.check_consistency().ok
    finally:
        await node.stop()
        raft.close()
        repository.close()


async def _full_then_freed(
    raft: RaftLog[Any],
    node: SmallDiskNode,
    repository: Repository,
    acknowledged: list[Any],
    numbers: range,
) -> None:
    """b's disk fills up: commits are refused (never acknowledged), health says why; once it
    has space again, commits go on and the refused requests settle to one outcome each."""
    await asyncio.to_thread(node.fill)
    first, middle, last = numbers[0], numbers[0] + len(numbers) // 3, numbers[-1] + 1
    refused = []
    for n in range(first, middle):
        try:
            acknowledged.append(await _commit(raft, n))
        except (JournalFailed, NotCommitted, NoQuorum) as exc:  # (the others: before a learns why)
            refused.append(exc)
    assert refused, "commits went on with a full disk on one signer"
    failure = await _until_failing(raft)
    assert "cannot write its Raft journal" in failure and "No space left" in failure, failure
    status = await node.ask(status=1)
    assert "No space left" in (status["result"]["journal_failure"] or "")
    before = repository.content_digest()
    with pytest.raises(JournalFailed, match="cannot write its Raft journal"):
        await _commit(raft, 999)
    assert repository.content_digest() == before  # nothing acknowledged, nothing applied
    node.free()
    await wait_for(lambda: _healthy(raft), 30, "b writes again")
    for n in range(middle, last):
        acknowledged.append(await _retrying(raft, n))
    for n in range(first, middle):  # the refused ones, retried with their request ids
        acknowledged.append(await _retrying(raft, n))
    assert all(isinstance(settled(result), Issued) for result in acknowledged)
    assert repository.get_request("issue-999") is None


async def _retrying(raft: RaftLog[Any], n: int) -> Any:
    """As a client does: a request that may have committed is retried with its id."""
    for _ in range(50):
        try:
            return await _commit(raft, n)
        except (NotCommitted, JournalFailed, NoQuorum):  # a busy machine may hold an election
            await asyncio.sleep(0.1)
    raise AssertionError(f"issue-{n} never settled")


async def _commit(raft: RaftLog[Any], n: int) -> Any:
    return await raft.commit(encode(issue(n, serial=2**140 + n)))


async def _until_failing(raft: RaftLog[Any]) -> str:
    async def failing() -> str:
        while True:
            section = await raft.health()
            found = [e for e in section.errors if "cannot write" in e]
            if found:
                return found[0]
            await asyncio.sleep(0.05)

    return await asyncio.wait_for(failing(), 20)


def _healthy(raft: RaftLog[Any]) -> bool:
    transport = raft._transport
    return transport is not None and not any(p.disk_error for p in transport.peers.values())


def test_the_error_family() -> None:
    assert issubclass(JournalFailed, ReplicationError)
    assert os.strerror(28) == "No space left on device"
