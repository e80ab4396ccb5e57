"""The replicated log with real pysyncobj nodes on 127.0.0.1 and real LMDB repositories:
commits on both signers, proposals from either, quorum loss, partitions, restarts, catch-up,
force-standalone and replacement, fencing, health. Every scenario ends with an invariant check."""

from __future__ import annotations

import asyncio
import dataclasses
import pickle
import shutil
import socket
import time

import pytest
from conditions import eventually
from raft_cluster import (
    Cluster,
    check_invariants,
    cluster_record,
    commit,
    issue,
    revoke,
    settled,
    wait_for,
)

from replication.errors import (
    ClockBehind,
    MembershipRefused,
    NoQuorum,
    NotCommitted,
    StartRefused,
)
from replication.journal import read_entries
from replication.raft import RaftLog
from replication.settings import ReplicationSettings
from storage import Command, Duplicate, Issued, Repository, decode

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def cluster(tmp_path):
    made = Cluster(tmp_path)
    yield made
    made.close()


@pytest.fixture
async def pair(cluster):
    cluster.start_all()
    await cluster.wait_leader()
    return cluster


def refused(raft: RaftLog) -> int:
    """Connections of stale or foreign peers this signer closed: hellos judged unacceptable,
    or peers that are no members."""
    counters = raft._transport.counters if raft._transport else None
    return counters.refused_peers + counters.strangers if counters else 0


def turned_away(survivor: RaftLog, old: RaftLog) -> bool:
    """The old signer was refused or fenced itself, or had all the time it needs to connect
    (when the survivor, not knowing it, never dials it: the higher address dials)."""
    return bool(refused(survivor) or old._fenced or time.monotonic() > old._settled_at)


def frames_refused(raft: RaftLog) -> int:
    """Frames this signer's link refused (over the limit, or not made with the secret)."""
    return raft._transport.counters.refused_frames if raft._transport else 0


def entry_command(raw: bytes) -> Command | None:
    """The command carried by a journal entry (our one replicated method, pickled by pysyncobj;
    the command as the repository's codec encoded it)."""
    if raw[:1] != b"\x00":
        return None
    _method, (entry,) = pickle.loads(raw[1:])[:2]
    return decode(entry[4])


async def test_commit_on_either_signer_is_applied_on_both(pair):
    a, b = (pair.logs[x] for x in pair.addresses)
    acknowledged = {}
    for n in range(20):
        raft = a if n % 2 else b  # leader and follower alike
        result = await commit(raft, issue(n))
        assert isinstance(result, Issued)
        acknowledged[result.request_id] = result
    await pair.converge()
    check_invariants(list(pair.repos.values()), acknowledged)
    # The repository index is the Raft index of the entry (raftLastApplied + 1 when applied).
    entries, _, _ = read_entries(pair.logs[pair.addresses[0]].journal_path)
    by_index = {index: entry_command(raw) for raw, index, _ in entries}
    for result in acknowledged.values():
        assert by_index[result.index].request_id == result.request_id


async def test_a_committed_command_is_durable_before_the_answer(pair):
    leader = await pair.wait_leader()
    follower = next(r for r in pair.logs.values() if r is not leader)
    before = follower._journal.syncs
    result = await commit(leader, issue(1))
    # The follower's journal was fdatasync'ed before it acknowledged (the leader only counts
    # acknowledged copies), and the answering leader applied it (LMDB sync) before answering.
    assert follower._journal.syncs > before
    assert pair.repos[leader.address].get_request("issue-1") is not None
    assert result.index <= follower.view.last_index


async def test_retry_with_the_same_request_id_gives_the_single_outcome(pair):
    a, b = (pair.logs[x] for x in pair.addresses)
    first = await commit(a, issue(7, serial=2**150 + 1))
    again = await commit(b, issue(7, serial=2**150 + 2))  # retried elsewhere, another serial
    assert isinstance(again, Duplicate) and again.original.serial == first.serial
    await pair.converge()
    assert all(repo.counts()["certificates"] == 1 for repo in pair.repos.values())


async def test_without_quorum_the_answer_is_fast_and_specific(pair):
    a, b = pair.addresses
    pair.stop(b)
    survivor = pair.logs[a]
    await wait_for(lambda: not survivor.view.has_quorum, 5, "quorum lost")
    await wait_for(lambda: time.monotonic() > survivor._settled_at, 5, "start-up settled")
    started = time.monotonic()
    with pytest.raises(NoQuorum):
        await commit(survivor, issue(1))
    # refused at once: never waits for the commit timeout, let alone hangs
    assert time.monotonic() - started < survivor.settings.commit_timeout / 4
    with pytest.raises(NoQuorum):
        await survivor.barrier()
    assert pair.repos[a].get_request("issue-1") is None


async def test_timed_out_commit_lands_later_and_a_retry_finds_it(pair):
    """The follower is cut off after acknowledging nothing yet: the leader's proposal cannot
    commit in time (not_committed); after the heal it commits, and a retry with the same id on
    the other signer returns that single outcome."""
    leader = await pair.wait_leader()
    follower = next(r for r in pair.logs.values() if r is not leader)
    pair.partitions.isolate(leader.address, [follower.address])
    command = issue(3)
    with pytest.raises((NotCommitted, NoQuorum)):
        await commit(leader, command)
    pair.partitions.heal()
    await pair.wait_leader()
    retry = dataclasses.replace(command, serial=2**150 + 99)  # a retry decides a fresh serial
    result = await commit_retrying(follower, retry)
    await pair.converge()
    recorded = pair.repos[follower.address].get_request("issue-3")
    assert recorded.result.serial == settled(result).serial
    check_invariants(list(pair.repos.values()), {"issue-3": result})


async def test_barrier_makes_a_lagging_signer_see_what_was_committed(pair):
    leader = await pair.wait_leader()
    follower = next(r for r in pair.logs.values() if r is not leader)
    for n in range(30):
        await commit(leader, issue(n))
    await follower.barrier()  # everything committed before it is applied here
    assert pair.repos[follower.address].get_request("issue-29") is not None


def _accepts(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=2):
            return True
    except OSError:
        return False


async def commit_retrying(log, command, attempts: int = 10):
    """Commit like a client: the same command again after a refusal for lack of quorum."""
    for _ in range(attempts - 1):
        try:
            return await commit(log, command)
        except (NoQuorum, NotCommitted):
            await asyncio.sleep(0.3)
    return await commit(log, command)


async def test_isolated_leader_split_pair_and_heal(tmp_path):
    """Three voters: the isolated leader loses quorum and the other two elect a new leader and
    keep committing; after the heal the old leader catches up and nothing was lost."""
    cluster = Cluster(tmp_path, size=3)
    try:
        cluster.start_all()
        old = await cluster.wait_leader()
        acknowledged = {}
        for n in range(10):
            result = await commit(old, issue(n))
            acknowledged[settled(result).request_id] = result
        others = [a for a in cluster.addresses if a != old.address]
        cluster.partitions.isolate(old.address, others)
        new = await cluster.wait_leader(among=others)
        assert new.address != old.address
        with pytest.raises((NoQuorum, NotCommitted)):
            await commit(old, issue(100))
        for n in range(10, 20):
            result = await commit(cluster.logs[others[n % 2]], issue(n))
            acknowledged[settled(result).request_id] = result
        # split the remaining pair too: nobody has a majority
        cluster.partitions.isolate(others[0], [others[1]])
        await wait_for(
            lambda: not any(cluster.logs[a].view.has_quorum for a in cluster.addresses),
            5,
            "no quorum anywhere",
        )
        with pytest.raises((NoQuorum, NotCommitted)):
            await commit(cluster.logs[others[0]], issue(200))
        cluster.partitions.heal()
        await cluster.wait_leader()
        # Outcomes of the refused proposals are unknown to their callers: retries settle them
        # (as a client does: the rejoining old leader may still force one more election).
        for n in (100, 200):
            result = await commit_retrying(cluster.logs[others[0]], issue(n))
            acknowledged[settled(result).request_id] = result
        await cluster.converge()
        check_invariants(list(cluster.repos.values()), acknowledged)
    finally:
        cluster.close()


async def test_restart_replays_without_applying_twice(pair):
    a, b = pair.addresses
    acknowledged = {}
    for n in range(15):
        result = await commit(pair.logs[a], issue(n))
        acknowledged[settled(result).request_id] = result
    result = await commit(pair.logs[b], revoke(1, settled(acknowledged["issue-3"]).serial))
    await pair.converge()
    digest = pair.repos[a].content_digest()
    pair.stop(a)
    pair.stop(b)
    pair.start(a)
    pair.start(b)
    await pair.wait_leader()
    await pair.converge()
    assert pair.repos[a].content_digest() == digest  # replayed entries changed nothing
    for n in range(15, 20):
        result = await commit_retrying(pair.logs[b], issue(n))
        acknowledged[settled(result).request_id] = result
    await pair.converge()
    check_invariants(list(pair.repos.values()), acknowledged)
    assert pair.repos[a].counts()["revoked"] == 1


async def test_returning_signer_replays_what_it_missed(tmp_path):
    """Three voters: one is down while the others commit; back, it replays the log it missed."""
    cluster = Cluster(tmp_path, size=3)
    try:
        cluster.start_all()
        a, b, c = cluster.addresses
        await cluster.wait_leader()
        cluster.stop(c)
        await cluster.wait_leader(among=[a, b])
        acknowledged = {}
        for n in range(60):
            result = await commit(cluster.logs[a if n % 2 else b], issue(n))
            acknowledged[settled(result).request_id] = result
        missed = cluster.logs[a].view.commit_index
        cluster.start(c)
        await cluster.converge()
        status = await cluster.logs[c].status()
        assert status["snapshot"] is None  # caught up from the log, not from a snapshot
        assert status["applied_index"] >= missed
        check_invariants(list(cluster.repos.values()), acknowledged)
    finally:
        cluster.close()


async def test_wiped_signer_gets_a_snapshot_and_the_log(tmp_path):
    cluster = Cluster(tmp_path, snapshot_every_entries=40)
    try:
        cluster.start_all()
        leader = await cluster.wait_leader()
        acknowledged = {}
        for n in range(150):
            result = await commit(leader, issue(n))
            acknowledged[settled(result).request_id] = result
        await wait_for(lambda: leader.last_snapshot is not None, 10, "a snapshot")
        other = next(a for a in cluster.addresses if a != leader.address)
        cluster.wipe(other)
        cluster.start(other)
        await cluster.wait_leader()
        for n in range(150, 160):
            result = await commit_retrying(leader, issue(n))
            acknowledged[settled(result).request_id] = result
        await cluster.converge(timeout=30)
        check_invariants(list(cluster.repos.values()), acknowledged)
        status = await cluster.logs[other].status()
        assert status["snapshot"]["raft_index"] > 1  # it was installed, not replayed
        # Installing the snapshot never holds the Raft loop for an election timeout: the
        # production one (this cluster's timings are shortened for speed; a single fsync on
        # this shared VM's disk has taken 125 ms while the loop's turns here take ~12 ms).
        production = ReplicationSettings.model_fields["election_min_timeout"].default
        assert status["max_loop_ms"] < 1000 * production
    finally:
        cluster.close()


async def test_force_standalone_then_a_replacement_joins(tmp_path):
    cluster = Cluster(tmp_path, snapshot_every_entries=30)
    try:
        cluster.start_all()
        a, b = cluster.addresses
        acknowledged = {}
        for n in range(40):
            result = await commit(cluster.logs[a if n % 2 else b], issue(n))
            acknowledged[settled(result).request_id] = result
        await cluster.converge()
        cluster.stop(b)  # b dies (the operator then fences it: powered off)
        survivor = cluster.logs[a]
        await wait_for(lambda: not survivor.view.has_quorum, 5, "quorum lost")
        with pytest.raises(MembershipRefused):  # must name the fenced peer
            await survivor.force_standalone(fenced=[])
        outcome = await survivor.force_standalone(fenced=[b])
        assert outcome["members"] == [a]
        for n in range(40, 50):
            result = await commit(survivor, issue(n))  # issuing again, alone
            acknowledged[settled(result).request_id] = result
        record = cluster_record(cluster.repos[a])
        assert record is not None
        assert record.members == (a,) and "force-standalone" in record.event
        # A replacement (new machine, new address) is added and catches up by itself.
        c = cluster.add_address()
        added = await survivor.add_member(c)
        assert added["members"] == sorted([a, c])
        cluster.start(c, peers=[a])
        await cluster.wait_leader()
        for n in range(50, 55):
            result = await commit(cluster.logs[c], issue(n))  # the replacement answers too
            acknowledged[settled(result).request_id] = result
        await cluster.converge(timeout=30)
        check_invariants([cluster.repos[a], cluster.repos[c]], acknowledged)
        # The fenced signer comes back with its old data: nobody talks to it, it gets nothing.
        old_b = cluster.start(b, peers=[a])
        await wait_for(lambda: turned_away(survivor, old_b), 10, "b refused")
        assert not old_b.view.has_quorum
        with pytest.raises(NoQuorum):
            await commit(old_b, issue(999))
        assert cluster.repos[b].get_request("issue-50") is None
        assert (await survivor.status())["members"] == sorted([a, c])
        # An orderly removal: c applies the record without itself and stops for good.
        await survivor.remove_member(c)
        await wait_for(lambda: cluster.logs[c]._fenced is not None, 10, "c stops, removed")
        result = await commit(survivor, issue(60))  # alone again, still issuing
        assert isinstance(result, Issued)
    finally:
        cluster.close()


async def test_a_removed_signer_never_comes_back_with_its_old_data(tmp_path):
    cluster = Cluster(tmp_path, size=3)
    try:
        cluster.start_all()
        a, b, c = cluster.addresses
        leader = await cluster.wait_leader()
        for n in range(10):
            await commit(leader, issue(n))
        await cluster.converge()
        cluster.stop(c)
        survivor = cluster.logs[a] if leader.address == c else leader
        await cluster.wait_leader(among=[a, b])
        await survivor.remove_member(c)
        await survivor.add_member(c)  # the operator re-adds the address for a replacement ...
        await commit(survivor, issue(10))
        # ... but the old machine comes back with its old data instead of a wiped one
        cluster.start(c)
        await wait_for(lambda: c not in cluster.logs or cluster.logs[c]._fenced, 10, "fenced")
        assert "removed" in cluster.logs[c]._fenced
        assert cluster.repos[c].get_request("issue-10") is None  # it never got newer data
        cluster.stop(c)
        with pytest.raises(Exception, match="fenced"):
            cluster.start(c)  # and it refuses to start until wiped
        cluster.wipe(c)
        cluster.start(c)
        await cluster.converge(timeout=20)
        assert cluster.repos[c].get_request("issue-10") is not None
    finally:
        cluster.close()


async def test_health_section_reports_the_cluster(pair):
    leader = await pair.wait_leader()
    await commit(leader, issue(1))
    await asyncio.sleep(1.2)  # a clock measurement
    section = await leader.health()
    data = section.data
    assert data["role"] == "leader" and data["quorum"] is True and not section.errors
    assert data["cluster"]["generation"] == 1
    [(peer, state)] = data["peers"].items()
    assert state["connected"] and state["lag"] == 0
    assert abs(state["clock_offset_s"]) < 0.5
    pair.stop(peer)
    await wait_for(lambda: not leader.view.has_quorum, 5, "quorum lost")
    section = await leader.health()
    assert any("no quorum" in text for text in section.errors)
    assert any("not connected" in text for text in section.warnings)


async def test_clock_behind_the_cluster_refuses_to_decide(pair):
    leader = await pair.wait_leader()
    follower = next(r for r in pair.logs.values() if r is not leader)
    leader._floor_ms = follower._floor_ms = int((time.time() + 3600) * 1000)
    with pytest.raises(ClockBehind):
        await follower.barrier()


async def test_a_peer_without_the_secret_is_not_heard(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        a, b = cluster.addresses
        cluster.start(a)
        intruder = RaftLog(
            cluster.settings(b),
            Repository(cluster.repo_path(b), 1 << 30),
            secret=b"a different secret 0123456789",
        )
        intruder.start()
        try:
            await wait_for(  # whichever dials, the other refuses its first frame
                lambda: frames_refused(cluster.logs[a]) + frames_refused(intruder) >= 2,
                10,
                "frames refused",
            )
            assert cluster.logs[a].view.has_quorum is False
            assert intruder.view.has_quorum is False
        finally:
            intruder.close()
            intruder.machine.close()
    finally:
        cluster.close()


async def test_binds_to_the_link_address_only_and_needs_a_secret(tmp_path, monkeypatch):
    cluster = Cluster(tmp_path)
    try:
        a, b = cluster.addresses
        port = int(a.rsplit(":", 1)[1])
        raft = cluster.start(a)
        await eventually(lambda: _accepts(("127.0.0.1", port)), what="(the link address)")
        with pytest.raises(OSError), socket.create_connection(("127.0.0.2", port), timeout=2):
            pass  # ... another address of this host does not (no 0.0.0.0)
        raft.close()
        monkeypatch.delenv("UNUSED_IN_TESTS", raising=False)
        repository = Repository(cluster.repo_path(b), 1 << 30)
        try:
            with pytest.raises(StartRefused, match="refusing to start without one"):
                RaftLog(cluster.settings(b), repository).start()  # no secret given
        finally:
            repository.close()
    finally:
        cluster.close()


async def test_recovery_from_a_backup_after_losing_both_signers(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        cluster.start_all()
        a, b = cluster.addresses
        leader = await cluster.wait_leader()
        acknowledged = {}
        for n in range(10):
            result = await commit(leader, issue(n))
            acknowledged[settled(result).request_id] = result
        await cluster.converge()
        cluster.repos[a].snapshot(tmp_path / "backup")  # the nightly backup, taken live
        await commit(leader, issue(10))  # after the backup: lost with the machines
        cluster.stop(a)
        cluster.stop(b)
        # Both signers are lost. A new machine at a's address gets the backup and recovers.
        shutil.rmtree(cluster.repo_path(a))
        shutil.rmtree(tmp_path / "journal-0")
        Repository(cluster.repo_path(a), 1 << 30).close()
        repository = Repository(cluster.repo_path(a), 1 << 30)
        repository.restore(tmp_path / "backup")
        generation = RaftLog(cluster.settings(a), repository).recover_standalone()
        repository.close()
        assert generation == 2
        survivor = cluster.start(a)
        result = await commit(survivor, issue(11))
        assert isinstance(result, Issued)
        check_invariants([cluster.repos[a]], acknowledged)
        assert cluster.repos[a].get_request("issue-10") is None  # newer than the backup
        # b, with its old data (and issue-10), is not a member any more: nobody answers it
        old_b = cluster.start(b)
        await wait_for(lambda: turned_away(survivor, old_b), 10, "b refused")
        assert not old_b.view.has_quorum
        status = await survivor.status()
        assert status["members"] == [a]
    finally:
        cluster.close()
