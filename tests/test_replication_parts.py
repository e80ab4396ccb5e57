"""The replication's parts one by one: the durable journal, snapshot files, the cluster identity
rules, the settings and secret, the transport's message coalescing, the pysyncobj pin."""

from __future__ import annotations

import base64
import dataclasses
import os
import time
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION
from raft_cluster import issue

from replication import snapshot
from replication.cluster import (
    CLUSTER_META,
    ClusterRecord,
    Hello,
    Verdict,
    judge,
    next_record,
)
from replication.journal import NO_OP, DurableJournal, read_entries
from replication.raft import TESTED_PYSYNCOBJ
from replication.settings import ReplicationSettings
from replication.transport import PeerState, ReplicationTransport, _coalesce
from signer.config import load
from signer.server.config import SignerConfig
from storage import MetaSet, Reason, Rejected, Repository

ROOT = Path(__file__).resolve().parent.parent


# --- the journal ---------------------------------------------------------------------------


def entries(count: int, term: int = 1, start: int = 1) -> list[tuple[bytes, int, int]]:
    return [(b"\x00command %d" % i, i, term) for i in range(start, start + count)]


def test_the_journal_directory_is_private_even_when_it_exists(tmp_path):
    """Issue 11, item 7: the journal directory (the log holds every certificate and address)
    kept whatever mode it already had; it is made 0700 and its files 0600 when opened."""
    journal_dir = tmp_path / "raft"
    journal_dir.mkdir(mode=0o755)
    os.chmod(journal_dir, 0o755)
    (journal_dir / "raft.journal.meta").write_text("{}")
    os.chmod(journal_dir / "raft.journal.meta", 0o644)
    journal = DurableJournal(journal_dir / "raft.journal")
    journal.add(*entries(1)[0])
    journal.sync()
    assert journal_dir.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in journal_dir.iterdir()} == {
        "raft.journal": 0o600,
        "raft.journal.meta": 0o600,
    }
    journal._destroy()


def test_journal_survives_reopen_and_cuts_a_torn_tail(tmp_path):
    path = tmp_path / "raft.journal"
    journal = DurableJournal(path)
    for entry in entries(5):
        journal.add(*entry)
    journal.sync()
    journal.setCurrentTerm(3, "127.0.0.1:1")
    journal._destroy()
    with open(path, "ab") as handle:
        handle.write(b"\x40\x00\x00\x00half a record")  # a power cut in the middle of an append
    reopened = DurableJournal(path)
    assert list(reopened) == entries(5)
    assert reopened.getCurrentTerm() == 3 and reopened.getVotedForNodeId() == "127.0.0.1:1"
    assert path.stat().st_size == read_entries(path)[2]  # the torn bytes are gone
    reopened.add(*entries(1, start=6)[0])
    reopened._destroy()
    assert [e[1] for e in DurableJournal(path)] == [1, 2, 3, 4, 5, 6]


def test_journal_flips_one_bit_and_stops_there(tmp_path):
    path = tmp_path / "raft.journal"
    journal = DurableJournal(path)
    for entry in entries(4):
        journal.add(*entry)
    journal._destroy()
    _, offsets, _ = read_entries(path)
    data = bytearray(path.read_bytes())
    data[offsets[2] + 20] ^= 1
    path.write_bytes(bytes(data))
    assert [e[1] for e in DurableJournal(path)] == [1, 2]


def test_journal_truncation_and_compaction_are_durable(tmp_path):
    path = tmp_path / "raft.journal"
    journal = DurableJournal(path)
    for entry in entries(10):
        journal.add(*entry)
    journal.deleteEntriesFrom(7)  # a follower drops a conflicting tail
    journal.add(b"\x00other", 8, 2)
    journal.deleteEntriesTo(3)  # compaction after a snapshot
    journal.sync()
    expected = [*entries(7)[3:], (b"\x00other", 8, 2)]
    assert list(journal) == expected
    journal._destroy()
    assert list(DurableJournal(path)) == expected


@pytest.mark.parametrize("retain", [True, False])
def test_snapshot_load_keeps_the_suffix_only_at_start(tmp_path, retain):
    """pysyncobj loads a snapshot as clear() + add(prev) + add(last). At start (a crash between
    writing the snapshot and compacting) the entries after it are ours and are kept; for a
    snapshot installed from the leader they are dropped (the leader resends what it has)."""
    journal = DurableJournal(tmp_path / "raft.journal")
    for entry in entries(10):
        journal.add(*entry)
    journal.retain_suffix = retain
    journal.clear()
    journal.add(*entries(10)[5])
    journal.add(*entries(10)[6])
    expected = entries(10)[5:] if retain else entries(10)[5:7]
    assert list(journal) == expected
    journal._destroy()
    assert list(DurableJournal(tmp_path / "raft.journal")) == expected


def test_neutralize_membership_keeps_indexes(tmp_path):
    journal = DurableJournal(tmp_path / "raft.journal")
    journal.add(b"\x00cmd", 1, 1)
    journal.add(b"\x02membership", 2, 1)
    journal.add(b"\x00cmd", 3, 1)
    assert journal.neutralize_membership() == 1
    assert list(journal) == [(b"\x00cmd", 1, 1), (NO_OP, 2, 1), (b"\x00cmd", 3, 1)]


# --- snapshots -----------------------------------------------------------------------------


def test_snapshot_file_round_trip_and_restore(tmp_path):
    source = Repository(tmp_path / "a", 1 << 28)
    source.apply_batch([(i, issue(i)) for i in range(1, 50)])
    meta = snapshot.SnapshotMeta(
        last=(b"\x00x", 60, 2),
        prev=(b"\x00y", 59, 2),
        cluster=["127.0.0.1:2", "127.0.0.1:1"],
        applied=0,
        floor_ms=123,
        created=1.5,
    )
    built = snapshot.build(source, tmp_path / "work", tmp_path / "snap" / "data.mdb", meta)
    read = snapshot.read_meta(tmp_path / "snap" / "data.mdb")
    assert read == built and read.applied == 49 and read.last == (b"\x00x", 60, 2)
    assert read.cluster == ["127.0.0.1:1", "127.0.0.1:2"] and read.floor_ms == 123
    target = Repository(tmp_path / "b", 1 << 28)
    assert snapshot.restore(target, tmp_path / "snap" / "data.mdb", tmp_path / "restore") == 49
    assert target.content_digest() == source.content_digest()
    assert target.check_consistency().ok
    target.apply(50, issue(50))  # LMDB writes over the trailer as the file grows
    assert target.check_consistency().ok and target.counts()["certificates"] == 50
    source.close()
    target.close()


def test_a_damaged_snapshot_file_is_refused(tmp_path):
    bad = tmp_path / "data.mdb"
    bad.write_bytes(b"x" * 100)
    with pytest.raises(snapshot.SnapshotError, match="trailer"):
        snapshot.read_meta(bad)
    bad.write_bytes(b"x" * 100 + (10**9).to_bytes(8, "big") + snapshot.TRAILER_MAGIC)
    with pytest.raises(snapshot.SnapshotError, match="impossible"):
        snapshot.read_meta(bad)
    with pytest.raises(snapshot.SnapshotError, match="cannot read"):
        snapshot.read_meta(tmp_path / "absent")


# --- cluster identity ----------------------------------------------------------------------

A, B, C = "10.0.0.1:4321", "10.0.0.2:4321", "10.0.0.3:4321"


def records() -> dict[str, ClusterRecord]:
    """create [A B] -> force-standalone [A] -> add C [A C]."""
    made = {}
    current = None
    for name, members in (("create", [A, B]), ("alone", [A]), ("add", [A, C])):
        current = next_record(current, members, name)
        made[name] = current
    return made


def test_judge_fresh_lagging_stale_foreign_and_diverged():
    r = records()
    assert judge(Hello(A, 9, r["add"]), Hello(C, 0, None))[0] is Verdict.ACCEPT  # new signer
    assert judge(Hello(C, 0, None), Hello(A, 9, r["add"]))[0] is Verdict.ACCEPT
    assert judge(Hello(A, 9, r["add"]), Hello(C, 9, r["add"]))[0] is Verdict.ACCEPT
    # B was removed by force-standalone: A refuses it; B, judging A, fences itself
    verdict, reason = judge(Hello(A, 9, r["add"]), Hello(B, 5, r["create"]))
    assert verdict is Verdict.REFUSE and "removed at generation 2" in reason
    assert judge(Hello(B, 5, r["create"]), Hello(A, 9, r["add"]))[0] is Verdict.FENCE_SELF
    # a member that was only behind (A at "alone", C joined later) is accepted
    assert judge(Hello(C, 9, r["add"]), Hello(A, 5, r["alone"]))[0] is Verdict.ACCEPT
    # data without a record next to a cluster: refused / fences itself
    assert judge(Hello(A, 9, r["add"]), Hello(C, 3, None))[0] is Verdict.REFUSE
    assert judge(Hello(C, 3, None), Hello(A, 9, r["add"]))[0] is Verdict.FENCE_SELF
    assert judge(Hello(A, 3, None), Hello(B, 3, None))[0] is Verdict.REFUSE
    # another cluster, or two survivors that both went standalone
    other = next_record(None, [A, B], "create")
    foreign = dataclasses.replace(r["create"], cluster_id=other.cluster_id)
    assert judge(Hello(A, 9, r["add"]), Hello(B, 9, foreign))[0] is Verdict.REFUSE
    split = dataclasses.replace(
        r["alone"],
        epoch=b"\x00" * 8,
        members=(B,),
        history=(r["create"].history[0], (2, b"\x00" * 8, (B,))),
    )
    verdict, reason = judge(Hello(A, 9, r["alone"]), Hello(B, 9, split))
    assert verdict is Verdict.REFUSE and "diverged" in reason
    # a hello carries the record as a map; a malformed one is refused by the transport
    hello = Hello(A, 9, r["add"])
    assert Hello.from_wire(hello.wire()) == hello
    with pytest.raises(ValueError, match="sorted"):
        Hello.from_wire({**hello.wire(), "record": {**r["add"].to_map(), "members": [C, A]}})


def test_next_record_keeps_the_cluster_and_counts_generations():
    first = next_record(None, [B, A], "create", now=5)
    assert first.generation == 1 and first.members == (A, B) and first.at == 5
    assert first.history == ((1, first.epoch, (A, B)),)
    second = next_record(first, [A], "force-standalone")
    assert second.cluster_id == first.cluster_id and second.generation == 2
    assert second.epoch != first.epoch and second.history[:1] == first.history
    assert ClusterRecord.unpack(second.pack()) == second
    with pytest.raises(ValueError, match="distinct"):
        next_record(first, [A, A], "add twice")
    # a record stored by the earlier version (its `index` field) is still read
    older = msgpack.packb({**second.to_map(), "index": 7}, use_bin_type=True)
    assert ClusterRecord.unpack(older) == second


def test_the_record_is_written_by_compare_and_set(tmp_path):
    """The repository keeps the record opaque: set only when the stored value is the expected
    one, so two changes based on the same record cannot both land (generation order)."""
    repo = Repository(tmp_path / "r", 1 << 28)
    first = next_record(None, [A, B], "create")
    assert repo.apply(1, repo.meta_entry(CLUSTER_META, None, first.pack())) == MetaSet("cluster")
    again = repo.apply(2, repo.meta_entry(CLUSTER_META, None, first.pack()))  # not absent now
    assert isinstance(again, Rejected) and again.reason is Reason.META_CONFLICT
    second = next_record(first, [A], "force-standalone")
    stale = next_record(first, [A, C], "add")  # decided from the same record, second lands first
    assert isinstance(
        repo.apply(3, repo.meta_entry(CLUSTER_META, first.pack(), second.pack())), MetaSet
    )
    late = repo.apply(4, repo.meta_entry(CLUSTER_META, first.pack(), stale.pack()))
    assert isinstance(late, Rejected) and late.reason is Reason.META_CONFLICT
    for index, name in enumerate(("applied_index", "schema_version"), start=5):
        refused = repo.apply(index, repo.meta_entry(name, None, b"x"))  # the repository's own
        assert isinstance(refused, Rejected) and refused.reason is Reason.MALFORMED
    info = ClusterRecord.unpack(repo.meta(CLUSTER_META))  # type: ignore[arg-type]
    assert info.generation == 2 and info.members == (A,) and len(info.history) == 2
    assert repo.last_applied_index() == 6
    assert repo.check_consistency().ok
    repo.close()


# --- settings and secret -------------------------------------------------------------------


def settings(tmp_path: Path, **values) -> ReplicationSettings:
    base = {"self_address": A, "peers": [B], "journal_dir": str(tmp_path), "secret_env": "S"}
    return ReplicationSettings.model_validate({**base, **values})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"secret_env": None}, "exactly one of secret_file and secret_env"),
        ({"secret_file": "/x"}, "exactly one of secret_file and secret_env"),
        ({"self_address": "0.0.0.0:4321"}, "not to every interface"),
        ({"self_address": "signer-a:4321"}, "must be an IP address"),
        ({"peers": [A]}, "must not include self_address"),
        ({"election_min_timeout": 0.1}, "3 x append_entries_period"),
        ({"connection_timeout": 0.5}, "at least election_max_timeout"),
    ],
)
def test_bad_settings_are_refused(tmp_path, values, message):
    with pytest.raises(ValueError, match=message):
        settings(tmp_path, **values)


def test_secret_from_a_private_file_or_the_environment(tmp_path, monkeypatch):
    secret_file = tmp_path / "secret"
    proper = base64.b64encode(os.urandom(32))
    secret_file.write_bytes(proper + b"\n")
    secret_file.chmod(0o640)
    chosen = settings(tmp_path, secret_env=None, secret_file=str(secret_file))
    with pytest.raises(ValueError, match="accessible by group or others"):
        chosen.read_secret()
    secret_file.chmod(0o600)
    assert chosen.read_secret() == proper
    monkeypatch.setenv("S", "tiny-secret")
    with pytest.raises(ValueError, match="refusing to start") as caught:
        settings(tmp_path).read_secret()
    assert "tiny-secret" not in str(caught.value)  # never the secret itself


LOW_ENTROPY = [
    "a" * 64,
    "0123456789abcdef" * 4,
    "password" * 8,
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "correct horse battery staple",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab",
    "0000111122223333444455556666777788889999",
]


@pytest.mark.parametrize("weak", LOW_ENTROPY)
def test_a_low_entropy_secret_is_refused_however_long(tmp_path, monkeypatch, weak):
    """Issue 11, item 8: only the length was checked, so `aaaa...` (or `password` eight times)
    authenticated the replication link. A secret must hold about 128 bits by the signer's
    estimate; the message says how to make one, and never shows the secret."""
    monkeypatch.setenv("S", weak)
    with pytest.raises(ValueError, match="signer replication-secret") as caught:
        settings(tmp_path).read_secret()
    assert weak not in str(caught.value)


def test_the_generated_secret_is_accepted_private_and_never_overwritten(tmp_path, monkeypatch):
    import subprocess
    import sys

    path = tmp_path / "etc" / "replication.secret"
    command = [sys.executable, "-m", "signer", "replication-secret", "--out", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert path.stat().st_mode & 0o777 == 0o600
    chosen = settings(tmp_path, secret_env=None, secret_file=str(path))
    secret = chosen.read_secret()
    assert len(base64.b64decode(secret)) == 32 and secret.decode() not in done.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "exists" in again.stderr
    assert chosen.read_secret() == secret
    for _ in range(200):  # what the generator makes always passes the estimate
        monkeypatch.setenv("S", base64.b64encode(os.urandom(32)).decode())
        settings(tmp_path).read_secret()


def test_shipped_pair_configs_load(tmp_path):
    for name in ("signer-a.yaml", "signer-b.yaml"):
        config = load(ROOT / "config" / name, SignerConfig)
        assert config.replication is not None and config.replication.peers
        assert config.replication.journal_dir.is_absolute()


# --- transport and pins --------------------------------------------------------------------


def test_outbox_coalesces_appends_and_acks():
    def append(first: int, count: int, commit: int) -> dict:
        return {
            "type": "append_entries",
            "term": 3,
            "commit_index": commit,
            "entries": [(b"c", i, 3) for i in range(first, first + count)],
            "prevLogIdx": first - 1,
            "prevLogTerm": 3,
        }

    def ack(index: int) -> dict:
        return {"type": "next_node_idx", "next_node_idx": index, "reset": False, "success": True}

    heartbeat = {"type": "append_entries", "term": 3, "commit_index": 9, "prevLogIdx": 9}
    out = _coalesce(
        [
            ("b", append(5, 2, 4)),
            ("b", append(7, 1, 5)),
            ("c", ack(8)),
            ("c", ack(7)),
            ("b", heartbeat),
            ("b", append(8, 1, 6)),
            ("c", ack(9)),
        ]
    )
    assert [(n, m["type"]) for n, m in out] == [
        ("b", "append_entries"),
        ("c", "next_node_idx"),
        ("b", "append_entries"),
        ("b", "append_entries"),
    ]
    assert [e[1] for e in out[0][1]["entries"]] == [5, 6, 7] and out[0][1]["commit_index"] == 5
    assert out[1][1]["next_node_idx"] == 9  # the highest ack stands for the others
    assert out[2][1] is heartbeat and [e[1] for e in out[3][1]["entries"]] == [8]


@dataclasses.dataclass(frozen=True)
class Peer:
    id: str


def test_an_acknowledgement_that_says_nothing_new_is_not_sent_again_at_once():
    """pysyncobj answers the append that only brings the commit index with the index it
    acknowledged just before: not sent within half a heartbeat on the same connection and
    term; a new index, a new term, a reset, a refusal or a new connection always are."""
    transport = ReplicationTransport.__new__(ReplicationTransport)  # the parts _deliver uses
    transport.owner = SimpleNamespace(heartbeat=0.1)
    transport.peers = {"b": PeerState(accepted=True)}
    transport._acked, transport._leader_term = {}, {}
    sent: list[dict] = []
    transport.raft_send = lambda _node, message: sent.append(message) or True  # type: ignore
    peer = Peer("b")

    def ack(index: int, reset: bool = False, success: bool = True) -> dict:
        return {"type": "next_node_idx", "next_node_idx": index, "reset": reset,
                "success": success}  # fmt: skip

    def deliver(message: dict) -> int:
        before = len(sent)
        assert transport._deliver(peer, message)
        return len(sent) - before

    transport._leader_term[peer] = 3
    assert deliver(ack(8)) == 1
    assert deliver(ack(8)) == 0  # the answer to the commit index: nothing new
    assert deliver(ack(9)) == 1
    assert deliver(ack(9, reset=True)) == 1 and deliver(ack(9, success=False)) == 1
    transport._leader_term[peer] = 4
    assert deliver(ack(9)) == 1  # a new term: its leader may have forgotten
    transport._acked.pop(peer)  # what a lost connection does
    assert deliver(ack(9)) == 1
    time.sleep(0.06)
    assert deliver(ack(9)) == 1  # half a heartbeat later: the leader hears us again


def test_pysyncobj_is_the_tested_version():
    # The apply index (raftLastApplied + 1) and the serializer hooks are pysyncobj internals.
    assert PYSYNCOBJ_VERSION in TESTED_PYSYNCOBJ


# --- the control socket --------------------------------------------------------------------


async def test_control_socket_is_private_and_refuses_bad_requests(tmp_path):
    import asyncio

    from replication.raft import RaftLog
    from signer.server.control import ControlServer, call
    from storage import Result

    repository = Repository(tmp_path / "repo", 1 << 28)
    raft: RaftLog[Result] = RaftLog(settings(tmp_path / "raft"), repository)  # not started
    server = ControlServer(raft, tmp_path / "raft" / "control.sock")
    await server.start()
    try:
        assert (tmp_path / "raft" / "control.sock").stat().st_mode & 0o777 == 0o600
        answers = [
            await server.handle(line)
            for line in (b"not json", b"[1]", b'{"cmd": "nope"}', b'{"cmd": "force_standalone"}',
                         b'{"cmd": "force_standalone", "fenced": "10.0.0.2:4321"}',
                         b'{"cmd": "add", "address": "somewhere"}')
        ]  # fmt: skip
        codes = [answer["error"]["code"] for answer in answers]
        assert codes == ["bad_arguments", "bad_arguments", "unknown_command", "bad_arguments",
                         "bad_arguments", "bad_arguments"]  # fmt: skip
        status = await asyncio.to_thread(call, server.path, {"cmd": "status"})
        assert status["ok"] and status["result"]["role"] == "stopped"
    finally:
        await server.close()
        repository.close()
    assert not server.path.exists()


# --- the journal on a failing disk ---------------------------------------------------------


def _failing(monkeypatch, name: str) -> list[bool]:
    """Make `os.<name>` in the journal fail with ENOSPC while the returned flag is set."""
    import errno
    import os

    from replication import journal as journal_module

    flag = [True]
    real = getattr(os, name)

    def maybe(*args):
        if flag[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    fake_os = type("os", (), {k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    setattr(fake_os, name, staticmethod(maybe))
    monkeypatch.setattr(journal_module, "os", fake_os)
    return flag


def test_journal_appends_that_fail_are_written_by_a_later_sync(tmp_path, monkeypatch):
    path = tmp_path / "raft.journal"
    journal = DurableJournal(path)
    for entry in entries(3):
        journal.add(*entry)
    assert journal.sync() and journal.durable_index == 3
    failing = _failing(monkeypatch, "pwrite")
    for entry in entries(3, start=4):
        journal.add(*entry)  # never raises into pysyncobj
    assert len(journal) == 6 and journal.last_index == 6
    assert journal.sync() is False and "No space left" in (journal.failure or "")
    assert journal.durable_index == 3  # nothing new counts as stored
    assert [e[1] for e in read_entries(path)[0]] == [1, 2, 3]
    failing[0] = False  # space again
    assert journal.sync() and journal.failure is None and journal.durable_index == 6
    journal._destroy()
    assert list(DurableJournal(path)) == entries(6)


def test_journal_a_failed_compaction_leaves_the_file_and_is_redone(tmp_path, monkeypatch):
    path = tmp_path / "raft.journal"
    journal = DurableJournal(path)
    for entry in entries(10):
        journal.add(*entry)
    journal.sync()
    failing = _failing(monkeypatch, "write")
    journal.deleteEntriesTo(4)  # compaction after a snapshot: the new file cannot be written
    assert list(journal) == entries(10)[4:]
    assert journal.sync() is False
    assert [e[1] for e in read_entries(path)[0]] == list(range(1, 11))  # the old file, whole
    journal.add(*entries(1, start=11)[0])
    failing[0] = False
    assert journal.sync() and journal.durable_index == 11
    journal._destroy()
    assert [e[1] for e in DurableJournal(path)] == list(range(5, 12))


def test_journal_state_is_overwritten_in_place_and_old_json_is_read(tmp_path):
    import json

    path = tmp_path / "raft.journal"
    (tmp_path / "raft.journal.meta").write_text(json.dumps({"term": 4, "voted_for": "x"}))
    journal = DurableJournal(path)  # an earlier version's JSON file, converted
    assert journal.getCurrentTerm() == 4 and journal.getVotedForNodeId() == "x"
    size = (tmp_path / "raft.journal.meta").stat().st_size
    for term in range(5, 12):
        journal.setCurrentTerm(term, f"node-{term}")
    journal.setRaftCommitIndex(99)
    journal.onOneSecondTimer()
    assert (tmp_path / "raft.journal.meta").stat().st_size == size  # no new blocks needed
    journal._destroy()
    reopened = DurableJournal(path)
    assert (reopened.getCurrentTerm(), reopened.getRaftCommitIndex()) == (11, 99)
    reopened._destroy()  # (stores once more: both slots now hold term 11)
    data = bytearray((tmp_path / "raft.journal.meta").read_bytes())
    data[len(b"cacert-signer raft state v1\n") + 20] ^= 0xFF  # one slot torn
    (tmp_path / "raft.journal.meta").write_bytes(bytes(data))
    fallback = DurableJournal(path)
    assert (fallback.getCurrentTerm(), fallback.getRaftCommitIndex()) == (11, 99)
    fallback._destroy()
