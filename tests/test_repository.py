"""Tests of the certificate repository (storage/) on real LMDB files."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import storage.layout as layout
import storage.repository as repository_module
import storage.schema as schema_module
from storage import (
    SCHEMA_VERSION,
    AlreadyRevoked,
    Certified,
    CertifyOpenpgp,
    Command,
    CrlRecorded,
    Done,
    Duplicate,
    InvalidArgument,
    Issued,
    IssueX509,
    Noop,
    PublishCrl,
    Reason,
    RecordCrl,
    Rejected,
    Replayed,
    Repository,
    RepositoryError,
    RequestRecord,
    Result,
    Revoked,
    RevokeX509,
    encode,
)
from storage.layout import STATE_DB_NAMES

ISSUER_A = bytes(range(20))
ISSUER_B = bytes(range(100, 120))
BIG_SERIAL = 2**159 - 1
FP20 = b"\xaa" * 20


def issue(
    request_id: str = "req-1",
    serial: int = 1,
    issuer: bytes = ISSUER_A,
    digest: bytes = b"digest-1",
    **overrides: Any,
) -> IssueX509:
    command = {
        "request_id": request_id,
        "request_digest": digest,
        "issuer": issuer,
        "serial": serial,
        "der": b"\x30\x82" + str(serial).encode(),
        "profile": "server",
        "not_before": 1_700_000_000,
        "not_after": 1_731_536_000,
        "issued_at": 1_700_000_010,
    }
    return IssueX509(**{**command, **overrides})


def revoke(
    request_id: str = "rev-1",
    serial: int = 1,
    issuer: bytes = ISSUER_A,
    digest: bytes = b"rev-digest",
    **overrides: Any,
) -> RevokeX509:
    command = {
        "request_id": request_id,
        "request_digest": digest,
        "issuer": issuer,
        "serial": serial,
        "reason": 1,
        "revoked_at": 1_710_000_000,
        "invalidity_date": None,
        "crl_entry": b"\x30\x21" + str(serial).encode(),
    }
    return RevokeX509(**{**command, **overrides})


def record_crl(number: int = 1, issuer: bytes = ISSUER_A, **overrides: Any) -> RecordCrl:
    command = {
        "issuer": issuer,
        "crl_number": number,
        "this_update": 1_710_000_000 + number % 1000,
        "next_update": 1_710_086_400 + number % 1000,
        "der": b"crl-" + str(number).encode(),
    }
    return RecordCrl(**{**command, **overrides})


def certify(
    request_id: str = "pgp-1", fingerprint: bytes = FP20, digest: bytes = b"pgp", **overrides: Any
) -> CertifyOpenpgp:
    command = {
        "request_id": request_id,
        "request_digest": digest,
        "fingerprint": fingerprint,
        "uids": ("Alice <alice@example.org>",),
        "expires": 1_800_000_000,
        "certified_at": 1_700_000_000,
        "result": b"\x88\x01sig",
    }
    return CertifyOpenpgp(**{**command, **overrides})


def pack(value: Any) -> bytes:
    """A log entry made by hand (whatever msgpack can hold, valid or not)."""
    return msgpack.packb(value, use_bin_type=True)


def raw(command: Command, drop: tuple[str, ...] = (), **changes: Any) -> bytes:
    """The log entry of `command` with fields dropped or replaced by values as they are."""
    fields_ = msgpack.unpackb(encode(command), raw=False)
    for name in drop:
        del fields_[name]
    return pack({**fields_, **changes})


def apply_next(repo: Repository, command: Any) -> Result:
    """What the standalone signer does: the next index after the last applied one."""
    return repo.apply(repo.last_applied_index() + 1, command)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repository]:
    with Repository(tmp_path / "repo") as repository:
        yield repository


def assert_rejected_without_writes(repo: Repository, command: Any, reason: Reason) -> Rejected:
    before = repo.content_digest(include_applied_index=False, include_audit=False)
    audited = repo.audit_size()
    index = repo.last_applied_index() + 1
    result = repo.apply(index, command)
    assert isinstance(result, Rejected), result
    assert result.reason is reason, result
    assert isinstance(result.message, str) and result.message
    assert repo.content_digest(include_applied_index=False, include_audit=False) == before
    assert repo.audit_size() == audited + 1  # but the refusal is in the audit log
    assert repo.last_applied_index() == index
    return result


# --------------------------------------------------------------------------- basics


def test_new_repository_is_empty_and_consistent(repo: Repository) -> None:
    assert repo.last_applied_index() == 0
    assert repo.schema_version() == SCHEMA_VERSION
    counts = repo.counts()
    assert (counts["certificates"], counts["revoked"], counts["openpgp"]) == (0, 0, 0)
    assert counts["issuers"] == {}
    assert repo.check_consistency().ok


def test_durability_settings(repo: Repository) -> None:
    flags = repo._env.flags()  # type: ignore[union-attr]
    assert flags["sync"] and flags["metasync"]
    assert not flags["writemap"] and not flags["map_async"]
    assert repo._env.info()["map_size"] == repository_module.DEFAULT_MAP_SIZE  # type: ignore


def test_noop(repo: Repository) -> None:
    before = repo.content_digest(include_applied_index=False, include_audit=False)
    assert repo.apply(1, Noop()) == Done()
    assert repo.last_applied_index() == 1
    assert repo.content_digest(include_applied_index=False, include_audit=False) == before
    assert repo.content_digest() != before


def test_bad_index_raises_and_writes_nothing(repo: Repository) -> None:
    for index in (0, -1, True, "1", 2**63):
        with pytest.raises(InvalidArgument):
            repo.apply(index, Noop())  # type: ignore[arg-type]
    assert repo.last_applied_index() == 0


def test_closed_repository_raises(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "r")
    repo.close()
    repo.close()
    with pytest.raises(RepositoryError, match="closed"):
        repo.last_applied_index()
    with pytest.raises(RepositoryError):
        repo.apply(1, Noop())


def test_reopen_keeps_state(tmp_path: Path) -> None:
    with Repository(tmp_path / "r") as repo:
        repo.apply(1, issue())
        digest = repo.content_digest()
    with Repository(tmp_path / "r") as repo:
        assert repo.content_digest() == digest
        assert repo.last_applied_index() == 1


@pytest.mark.parametrize("db", layout.DB_NAMES)
def test_content_digest_covers_every_sub_database(tmp_path: Path, db: str) -> None:
    path = tmp_path / "repo"
    _populated(path)
    with Repository(path) as repo:
        full, without_index = repo.content_digest(), repo.content_digest(False)
    _tamper(path, db, b"\xfe" * 20, b"\x00")
    with Repository(path) as repo:
        assert repo.content_digest() != full
        assert repo.content_digest(include_applied_index=False) != without_index


def test_content_digest_can_leave_out_the_applied_index(repo: Repository) -> None:
    repo.apply(1, issue())
    full, without_index = repo.content_digest(), repo.content_digest(False)
    repo.apply(5, Noop())
    assert repo.content_digest() != full
    assert repo.content_digest(include_applied_index=False) == without_index


# --------------------------------------------------------------------------- issue_x509


def test_issue_happy_path(repo: Repository) -> None:
    command = issue(serial=BIG_SERIAL)
    result = repo.apply(1, command)
    assert result == Issued(
        request_id="req-1",
        issuer=ISSUER_A,
        serial=BIG_SERIAL,
        profile="server",
        not_before=1_700_000_000,
        not_after=1_731_536_000,
        issued_at=1_700_000_010,
        index=1,
    )
    cert = repo.get_certificate(ISSUER_A, BIG_SERIAL)
    assert cert is not None
    assert cert["der"] == command.der and cert["revocation"] is None
    assert cert["request_digest"] == b"digest-1"
    assert repo.serial_exists(ISSUER_A, BIG_SERIAL)
    assert not repo.serial_exists(ISSUER_B, BIG_SERIAL)
    assert repo.get_certificate(ISSUER_A, 2) is None
    assert repo.get_request("req-1") == RequestRecord("req-1", "issue_x509", b"digest-1", 1, result)
    assert repo.counts()["issuers"][ISSUER_A] == {
        "certificates": 1,
        "revoked": 0,
        "revocation_seq": 0,
    }
    assert repo.check_consistency().ok


def test_issue_duplicate_returns_original_and_writes_nothing(repo: Repository) -> None:
    original = repo.apply(1, issue(serial=5))
    before = repo.content_digest(include_applied_index=False, include_audit=False)
    again = repo.apply(2, issue(serial=6))  # a retry that decided another serial
    assert again == Duplicate(original)  # type: ignore[arg-type]
    assert isinstance(again, Duplicate) and again.original.serial == 5
    assert repo.content_digest(include_applied_index=False, include_audit=False) == before
    assert not repo.serial_exists(ISSUER_A, 6)
    assert repo.last_applied_index() == 2


def test_issue_request_id_conflict(repo: Repository) -> None:
    repo.apply(1, issue(serial=5))
    result = assert_rejected_without_writes(
        repo, issue(serial=6, digest=b"other"), Reason.REQUEST_ID_CONFLICT
    )
    assert "req-1" in result.message
    # the same id used by another op conflicts too, even with the same digest
    assert_rejected_without_writes(
        repo,
        revoke(request_id="req-1", serial=5, digest=b"digest-1"),
        Reason.REQUEST_ID_CONFLICT,
    )


def test_issue_serial_reuse_rejected(repo: Repository) -> None:
    repo.apply(1, issue(serial=5))
    assert_rejected_without_writes(
        repo, issue(request_id="req-2", serial=5, digest=b"x"), Reason.SERIAL_TAKEN
    )
    # the same serial under another issuer is fine
    assert isinstance(repo.apply(3, issue(request_id="req-3", serial=5, issuer=ISSUER_B)), Issued)
    assert repo.get_request("req-2") is None


BAD = Reason.MALFORMED
MALFORMED: list[tuple[Any, Reason]] = [
    (pack(None), BAD),
    (pack([("op", "noop")]), BAD),
    (pack({}), BAD),
    (pack({"op": 3}), BAD),
    (pack({"op": "delete_everything"}), Reason.UNKNOWN_OP),
    (pack({"op": "noop", "extra": 1}), BAD),
    (pack({"op": "noop", 1: 1}), BAD),
    (raw(issue(), drop=("der",)), BAD),
    (issue(serial=0), BAD),
    (issue(serial=2**159), BAD),
    (issue(serial=True), BAD),
    (issue(serial="1"), BAD),
    (raw(issue(), serial=1), BAD),  # a plain int: serials travel as 20 bytes
    (raw(issue(), serial=b"\x01" * 19), BAD),
    (issue(issuer=b"\x01" * 19), BAD),
    (issue(issuer="x" * 20), BAD),
    (issue(request_id=""), BAD),
    (issue(request_id="\udc80"), BAD),  # not encodable as UTF-8: never a log entry
    (issue(request_id="x" * 257), BAD),
    (issue(request_digest=b""), BAD),
    (issue(der=b""), BAD),
    (raw(issue(), der="x"), BAD),  # text where bytes are required
    (issue(not_before=-1), BAD),
    (issue(not_after=1.5), BAD),
    (issue(not_before=10, not_after=9), BAD),
    (issue(profile=None), BAD),
    (revoke(reason=7), Reason.BAD_REASON),
    (revoke(reason=False), Reason.BAD_REASON),
    (revoke(invalidity_date="yesterday"), BAD),
    (record_crl(number=-1), BAD),
    (record_crl(this_update=10, next_update=9), BAD),
    (certify(fingerprint=b"\x01" * 21), BAD),
    (certify(uids=()), BAD),
    (certify(uids="Alice"), BAD),
    (certify(uids=("ok", 3)), BAD),
    (b"", BAD),  # not msgpack
    (b"\xc1", BAD),
    (encode(issue()) + b"\x00", BAD),  # trailing bytes
    ({"op": "noop"}, BAD),  # not a log entry: a dict is not bytes
]


@pytest.mark.parametrize(("command", "reason"), MALFORMED)
def test_malformed_command_rejected(repo: Repository, command: Any, reason: Reason) -> None:
    repo.apply(1, issue(request_id="seed", serial=1))
    assert_rejected_without_writes(repo, command, reason)
    assert repo.check_consistency().ok


# --------------------------------------------------------------------------- revoke_x509


def test_revoke_happy_path(repo: Repository) -> None:
    repo.apply(1, issue(serial=BIG_SERIAL))
    command = revoke(serial=BIG_SERIAL, reason=None, invalidity_date=1_709_000_000)
    result = repo.apply(2, command)
    assert result == Revoked(
        request_id="rev-1",
        issuer=ISSUER_A,
        serial=BIG_SERIAL,
        seq=1,
        reason=None,
        revoked_at=1_710_000_000,
        invalidity_date=1_709_000_000,
        index=2,
    )
    assert [tuple(e) for e in repo.iter_revoked(ISSUER_A)] == [
        (BIG_SERIAL, 1_710_000_000, None, 1_709_000_000, 1_731_536_000, command.crl_entry, 1)
    ]
    assert repo.revocation_seq(ISSUER_A) == 1
    assert repo.revocation_seq(ISSUER_B) == 0
    cert = repo.get_certificate(ISSUER_A, BIG_SERIAL)
    assert cert is not None and cert["revocation"].seq == 1
    assert repo.get_request("rev-1").result == result  # type: ignore[union-attr]
    assert repo.counts()["revoked"] == 1
    assert repo.check_consistency().ok


def test_revoke_unknown_certificate(repo: Repository) -> None:
    repo.apply(1, issue(serial=1))
    assert_rejected_without_writes(repo, revoke(serial=2), Reason.UNKNOWN_CERTIFICATE)
    assert_rejected_without_writes(
        repo, revoke(serial=1, issuer=ISSUER_B), Reason.UNKNOWN_CERTIFICATE
    )
    assert repo.get_request("rev-1") is None


def test_revoke_twice_is_idempotent(repo: Repository) -> None:
    repo.apply(1, issue(serial=3))
    first = repo.apply(2, revoke(serial=3))
    before = repo.content_digest(include_applied_index=False, include_audit=False)
    second = repo.apply(3, revoke(request_id="rev-2", serial=3, digest=b"d2", reason=4))
    expected = {f.name: getattr(first, f.name) for f in fields(AlreadyRevoked)}
    assert second == AlreadyRevoked(**expected)
    assert isinstance(second, AlreadyRevoked)
    assert second.request_id == "rev-1" and second.reason == 1
    assert repo.content_digest(include_applied_index=False, include_audit=False) == before
    assert repo.revocation_seq(ISSUER_A) == 1
    # the same request again is a duplicate of the first result
    assert repo.apply(4, revoke(serial=3)) == Duplicate(first)  # type: ignore[arg-type]


def test_iter_revoked_is_in_serial_order_per_issuer(repo: Repository) -> None:
    rng = random.Random(7)
    serials = [*{rng.randrange(2, 2**64 - 1) for _ in range(40)}, BIG_SERIAL, 1, 2**64, 2**64 - 1]
    rng.shuffle(serials)
    commands = [issue(f"i-{s}", s, ISSUER_A, b"d") for s in serials]
    commands += [issue(f"j-{s}", s, ISSUER_B, b"d") for s in serials[:10]]
    revoked = rng.sample(serials, 25)
    commands += [revoke(f"r-{s}", s, ISSUER_A, b"d") for s in revoked]
    commands += [revoke(f"q-{s}", s, ISSUER_B, b"d") for s in serials[:3]]
    results = repo.apply_batch(list(enumerate(commands, start=1)))
    assert all(isinstance(r, Issued | Revoked) for r in results)
    assert [e.serial for e in repo.iter_revoked(ISSUER_A)] == sorted(revoked)
    assert [e.serial for e in repo.iter_revoked(ISSUER_B)] == sorted(serials[:3])
    assert list(repo.iter_revoked(b"\xff" * 20)) == []
    # sequence numbers follow revocation order, per issuer
    assert [e.serial for e in repo.iter_revocations_since(ISSUER_A, 0)] == revoked
    assert [e.seq for e in repo.iter_revocations_since(ISSUER_A, 20)] == [21, 22, 23, 24, 25]
    assert [e.serial for e in repo.iter_revocations_since(ISSUER_A, 20)] == revoked[20:]
    assert list(repo.iter_revocations_since(ISSUER_A, 25)) == []
    assert repo.revocation_seq(ISSUER_A) == 25 and repo.revocation_seq(ISSUER_B) == 3
    counts = repo.counts()
    assert counts["certificates"] == len(serials) + 10 and counts["revoked"] == 28
    assert counts["issuers"][ISSUER_B] == {"certificates": 10, "revoked": 3, "revocation_seq": 3}
    assert repo.check_consistency().ok


# --------------------------------------------------------------------------- CRLs, OpenPGP


def test_record_crl(repo: Repository) -> None:
    assert repo.latest_crl(ISSUER_A) is None
    assert repo.apply(1, record_crl(5)) == CrlRecorded(
        issuer=ISSUER_A, crl_number=5, this_update=1_710_000_005, next_update=1_710_086_405
    )
    assert_rejected_without_writes(repo, record_crl(5), Reason.CRL_NUMBER_NOT_NEWER)
    assert_rejected_without_writes(repo, record_crl(4), Reason.CRL_NUMBER_NOT_NEWER)
    big = 2**159 - 1
    assert isinstance(repo.apply(4, record_crl(big)), CrlRecorded)
    assert isinstance(repo.apply(5, record_crl(1, issuer=ISSUER_B)), CrlRecorded)
    latest = repo.latest_crl(ISSUER_A)
    assert latest is not None and latest["crl_number"] == big
    assert latest["der"] == record_crl(big).der
    assert repo.latest_crl(ISSUER_B)["crl_number"] == 1  # type: ignore[index]


def test_certify_openpgp(repo: Repository) -> None:
    result = repo.apply(1, certify(uids=("Alice <a@example.org>", "Alice <b@example.org>")))
    assert result == Certified(
        request_id="pgp-1",
        fingerprint=FP20,
        uids=("Alice <a@example.org>", "Alice <b@example.org>"),
        expires=1_800_000_000,
        certified_at=1_700_000_000,
        index=1,
    )
    assert repo.apply(2, certify(uids=("other",))) == Duplicate(result)  # type: ignore[arg-type]
    assert_rejected_without_writes(repo, certify(digest=b"x"), Reason.REQUEST_ID_CONFLICT)
    repo.apply(4, certify(request_id="pgp-2", fingerprint=b"\xbb" * 32))
    records = list(repo.iter_openpgp(FP20))
    assert [r["request_id"] for r in records] == ["pgp-1"]
    assert records[0]["result"] == b"\x88\x01sig"
    assert repo.counts()["openpgp"] == 2
    assert repo.check_consistency().ok


# --------------------------------------------------------------------------- replay, batches


def test_replay_of_old_index_changes_nothing(repo: Repository) -> None:
    commands: list[Any] = [
        issue(serial=1),  # 1 issued
        issue(serial=9),  # 2 duplicate
        issue(serial=2, digest=b"other"),  # 3 conflict
        pack({"op": "bogus"}),  # 4 rejected by validation
        record_crl(1),  # 5
        Noop(),  # 6
        revoke(serial=1),  # 7 revoked
        revoke(request_id="rev-x", serial=44),  # 8 unknown certificate
    ]
    first = [repo.apply(i, c) for i, c in enumerate(commands, start=1)]
    digest = repo.content_digest()
    replays = [repo.apply(i, c) for i, c in enumerate(commands, start=1)]
    assert repo.content_digest() == digest
    assert repo.last_applied_index() == len(commands)
    for index in (1, 2, 3, 4, 7):  # cheaply known: the result recorded the first time
        assert replays[index - 1] == first[index - 1], index
    for index in (5, 6, 8):
        assert replays[index - 1] == Replayed(), index
    # a replayed index carrying a different command still changes nothing
    assert repo.apply(1, issue(request_id="new", serial=77)) == Replayed()
    assert repo.content_digest() == digest


def test_batch_matches_single_applies_and_handles_replays(tmp_path: Path) -> None:
    items: list[tuple[int, Any]] = [
        (1, issue(serial=1)),
        (2, encode(revoke(serial=1))),  # log bytes and commands are the same
        (2, revoke(serial=1)),  # replay inside the batch
        (3, issue(request_id="b", serial=1, digest=b"z")),  # serial reused: rejected
        (5, certify()),  # a gap in the indices is allowed
        (4, Noop()),  # older than 5: replay
    ]
    with Repository(tmp_path / "single") as single, Repository(tmp_path / "batch") as batch:
        singles = [single.apply(i, c) for i, c in items]
        assert batch.apply_batch(items) == singles
        assert batch.content_digest() == single.content_digest()
        assert batch.last_applied_index() == 5
        assert batch.apply_batch([]) == []
        assert singles[2] == singles[1]
        assert isinstance(singles[3], Rejected) and singles[5] == Replayed()


def test_storage_failure_raises_and_aborts_the_whole_batch(tmp_path: Path) -> None:
    with Repository(tmp_path / "small", map_size=256 * 1024) as repo:
        repo.apply(1, issue(serial=1))
        digest = repo.content_digest()
        huge = issue(request_id="huge", serial=2, der=b"\x00" * (1024 * 1024))
        with pytest.raises(RepositoryError, match="map_size"):
            repo.apply_batch([(2, issue(request_id="ok", serial=3)), (3, huge)])
        assert repo.content_digest() == digest
        assert repo.last_applied_index() == 1
        assert repo.apply(2, Noop()) == Done()


# --------------------------------------------------------------------------- determinism

ISSUERS = st.sampled_from([ISSUER_A, ISSUER_B])
SERIALS = st.sampled_from([1, 2, 3, 2**64, BIG_SERIAL])
REQUEST_IDS = st.sampled_from(["r0", "r1", "r2", "r3", "r4", "r5"])
DIGESTS = st.sampled_from([b"a", b"b"])
TIMES = st.integers(min_value=0, max_value=2_000_000_000)
MSGPACK_INTS = st.integers(min_value=-(2**63), max_value=2**64 - 1)


@st.composite
def commands(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["issue", "revoke", "crl", "pgp", "noop", "bad", "junk"]))
    rid, digest, issuer = draw(REQUEST_IDS), draw(DIGESTS), draw(ISSUERS)
    if kind == "issue":
        return issue(rid, draw(SERIALS), issuer, digest, issued_at=draw(TIMES))
    if kind == "revoke":
        reason = draw(st.sampled_from([None, 0, 1, 4, 7]))
        return revoke(rid, draw(SERIALS), issuer, digest, reason=reason, revoked_at=draw(TIMES))
    if kind == "crl":
        return record_crl(draw(st.integers(0, 6)), issuer)
    if kind == "pgp":
        return certify(rid, draw(st.sampled_from([FP20, b"\xbb" * 32])), digest)
    if kind == "noop":
        return Noop()
    if kind == "bad":
        base = draw(st.sampled_from([issue(rid), revoke(rid), record_crl(), certify(rid)]))
        key = draw(st.sampled_from(sorted(f.name for f in fields(base))))
        value = draw(st.one_of(st.none(), MSGPACK_INTS, st.binary(), st.text()))
        return raw(base, **{key: value})
    junk = st.one_of(
        st.none(),
        MSGPACK_INTS,
        st.text(max_size=5),
        st.dictionaries(st.text(max_size=5), MSGPACK_INTS, max_size=3),
        st.dictionaries(st.just("op"), st.text(max_size=12), min_size=1),
    )
    return draw(st.one_of(junk.map(pack), st.binary(max_size=12)))


@st.composite
def logs(draw: st.DrawFn) -> list[tuple[int, Any]]:
    """A log with mostly increasing indices, some gaps and some replays of old indices."""
    items, index = [], 0
    for command in draw(st.lists(commands(), max_size=30)):
        index = max(1, index + draw(st.sampled_from([1, 1, 1, 1, 2, 0, -1, -3])))
        items.append((index, command))
    return items


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(log=logs(), cuts=st.lists(st.integers(1, 8), min_size=1, max_size=10))
def test_replicas_fed_the_same_log_end_identical(log: list[tuple[int, Any]], cuts: list[int]):
    with tempfile.TemporaryDirectory() as tmp:
        single = Repository(Path(tmp) / "single", map_size=1 << 26)
        batched = Repository(Path(tmp) / "batched", map_size=1 << 26)
        try:
            single_results = [single.apply(index, command) for index, command in log]
            batched_results: list[Result] = []
            position, cut = 0, 0
            while position < len(log):
                size = cuts[cut % len(cuts)]
                batched_results += batched.apply_batch(log[position : position + size])
                position, cut = position + size, cut + 1
            assert batched_results == single_results
            assert batched.content_digest() == single.content_digest()
            highest = [max([0] + [i for i, _c in log[:n]]) for n in range(len(log))]
            for result, (index, _c), before in zip(single_results, log, highest, strict=True):
                assert not isinstance(result, Replayed) or index <= before
            report = single.check_consistency()
            assert report.ok, report.problems
        finally:
            single.close()
            batched.close()


# --------------------------------------------------------------------------- the stored format


def layout_log() -> list[Command]:
    """Every op and outcome once: issued, duplicate, revoked, already revoked, a recorded and
    two published CRLs (one dropping an entry), a certification, a noop, a conflict."""
    issued = [
        issue(f"i{n}", 2**140 + n, ISSUER_A if n % 2 else ISSUER_B, b"d%d" % n) for n in range(1, 9)
    ]
    issued = [
        dataclasses.replace(c, der=b"\x30\x03der%d" % n, not_after=1_700_000_000 + n * 86400)
        for n, c in enumerate(issued, start=1)
    ]
    revocations = [
        revoke(
            f"r{n}",
            2**140 + n,
            ISSUER_A,
            b"r",
            reason=None if n == 3 else 1,
            revoked_at=1_710_000_000 + n,
            invalidity_date=1_709_000_000 if n == 5 else None,
            crl_entry=b"\x30\x05e%d" % n,
        )
        for n in (1, 3, 5)
    ]

    def published(number: int, seq: int, removed: tuple[int, ...], before: int | None) -> Any:
        der = b"crl%d" % number
        return PublishCrl(
            issuer=ISSUER_A,
            crl_number=number,
            this_update=1_709_900_000 + number * 100_000,
            next_update=1_710_500_000 + number * 100_000,
            revocation_seq=seq,
            removed=removed,
            entries=2,
            removed_before=before,
            expired_certs_on_crl=before,
            signature_algorithm=b"\x30\x0a",
            signature=b"sig%d" % number,
            sha256=hashlib.sha256(der).digest(),
            size=len(der),
        )

    return [
        *issued,
        issue("i1", 77, ISSUER_A, b"d1", der=b"x", not_before=1, not_after=2, issued_at=3),
        *revocations,
        revoke("r1b", 2**140 + 1, ISSUER_A, b"r", reason=4, revoked_at=1, crl_entry=b"z"),
        record_crl(5, ISSUER_B, this_update=10, next_update=20, der=b"crl-j"),
        published(2, 2, (), None),
        published(3, 3, (2**140 + 1,), 1_700_086_401),
        certify("p1", digest=b"p", uids=("Alice <a@example.org>", "Al <b@example.org>")),
        Noop(),
        issue("i2", 5, ISSUER_A, b"other", der=b"x", not_before=1, not_after=2, issued_at=3),
    ]


# The content digest this log gives with the repository of before typed commands (commit
# 8317627, its commands as dicts): the stored bytes are unchanged (docs/repository.md §3).
LAYOUT_DIGEST = "f2c07a512cf47ecbed04294715475626e8569b2a47643e0dc3328a0816d7de03"  # version 1
LAYOUT_DIGEST_V2 = "861800a17a3596c1d0855ace91b13d5eec2cce86b0afe066316aceb63dbb9efc"


LAYOUT_DIGEST_V3 = "36385a7b81af08f13d5185f5969f7211b16ca76a6669e8f5ac18a3dee59e245a"
# version 3's state + the audit log (docs/audit.md)
LAYOUT_DIGEST_V4 = "39d73cf2cdc4768471c8281c8945e82d58c30dea41cb296f598e4beb6970b67d"


def test_the_stored_bytes_are_those_of_the_earlier_version(repo: Repository) -> None:
    results = repo.apply_batch(list(enumerate(layout_log(), start=1)))
    assert [r.status for r in results] == [
        *["issued"] * 8,
        "duplicate",
        *["revoked"] * 3,
        "already_revoked",
        "recorded",
        "published",
        "published",
        "certified",
        "ok",
        "rejected",
    ]
    assert repo.check_consistency().ok
    assert repo.content_digest().hex() == LAYOUT_DIGEST_V4
    state = repo.content_digest(include_audit=False)
    repo.close()
    # Version 4 added the audit log and changed no byte of the state but the version.
    _set_version(repo.path, 3)
    env = lmdb.open(str(repo.path), max_dbs=16, readonly=True)
    try:
        assert _digest_of(env).hex() == LAYOUT_DIGEST_V3
    finally:
        env.close()
    # Version 3 changed one value: the last published CRL's DER is no longer kept (it is
    # rebuilt from the history). With it put back, the bytes are version 2's and version 1's.
    _put_crl_der(repo.path, ISSUER_A, b"crl3")
    _set_version(repo.path, 2)
    env = lmdb.open(str(repo.path), max_dbs=16, readonly=True)
    try:
        assert _digest_of(env).hex() == LAYOUT_DIGEST_V2
    finally:
        env.close()
    _set_version(repo.path, 1)  # version 2 (imports) changed no byte of this log's state but that
    env = lmdb.open(str(repo.path), max_dbs=16, readonly=True)
    try:
        assert _digest_of(env).hex() == LAYOUT_DIGEST
    finally:
        env.close()
    with Repository(repo.path) as migrated:  # 1 -> ... -> 4: the DER goes, as if applied today
        assert migrated.content_digest(include_audit=False) == state
        assert migrated.audit_size() == 0  # the audit log starts at the migration


def _put_crl_der(path: Path, issuer: bytes, der: bytes) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            crls = env.open_db(b"crls", txn=txn)
            value = msgpack.unpackb(txn.get(issuer, db=crls))
            txn.put(issuer, msgpack.packb({**value, "der": der}, use_bin_type=True), db=crls)
    finally:
        env.close()


def _digest_of(env: lmdb.Environment) -> bytes:
    """content_digest of a closed store, without opening it as a Repository (which migrates)."""
    digest = hashlib.sha256(b"cacert-signer repository content v1\x00")
    with env.begin() as txn:
        for name in STATE_DB_NAMES:  # what versions 1 to 3 had
            digest.update(b"D" + _frame(name.encode()))
            for key, value in txn.cursor(env.open_db(name.encode(), txn=txn, create=False)):
                digest.update(b"K" + _frame(key) + b"V" + _frame(value))
    return digest.digest()


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(8, "big") + bytes(data)


# --------------------------------------------------------------------------- consistency check


def _populated(path: Path) -> None:
    with Repository(path) as repo:
        repo.apply_batch(
            [
                (1, issue("i1", 1)),
                (2, issue("i2", 2)),
                (3, issue("i3", 3, ISSUER_B)),
                (4, revoke("r1", 1)),
                (5, revoke("r2", 2)),
                (6, certify()),
                (7, record_crl(1)),
            ]
        )
        assert repo.check_consistency().ok


def _tamper(path: Path, db: str, key: bytes, value: Any = None, delete: bool = False) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            handle = env.open_db(db.encode(), txn=txn)
            if delete:
                assert txn.delete(key, db=handle)
            else:
                raw = value if isinstance(value, bytes) else msgpack.packb(value)
                txn.put(key, raw, db=handle)
    finally:
        env.close()


def _cert_key(issuer: bytes, serial: int) -> bytes:
    return issuer + serial.to_bytes(20, "big")


def _cert_value(path: Path, key: bytes) -> dict[str, Any]:
    with Repository(path) as repo, repo._reading() as txn:
        return msgpack.unpackb(txn.get(key, db=repo._dbs["certs"]))


CORRUPTIONS = {
    "revseq entry deleted": ("revseq", ISSUER_A + (2).to_bytes(8, "big"), None, True),
    "issuer counter wrong": (
        "issuers",
        ISSUER_A,
        {"certificates": 2, "revoked": 1, "revocation_seq": 2},
        False,
    ),
    "request record deleted": ("requests", b"i3", None, True),
    "openpgp request deleted": ("requests", b"pgp-1", None, True),
    "revoked entry deleted": ("revoked", _cert_key(ISSUER_A, 1), None, True),
    "certificate deleted": ("certs", _cert_key(ISSUER_B, 3), None, True),
    "garbage value": ("certs", _cert_key(ISSUER_A, 2), b"\xc1not msgpack", False),
    "stray revseq": ("revseq", ISSUER_B + (9).to_bytes(8, "big"), b"\x00" * 20, False),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_consistency_check_reports_injected_corruption(tmp_path: Path, corruption: str) -> None:
    path = tmp_path / "repo"
    _populated(path)
    db, key, value, delete = CORRUPTIONS[corruption]
    _tamper(path, db, key, msgpack.packb(value) if isinstance(value, dict) else value, delete)
    with Repository(path) as repo:
        report = repo.check_consistency()
    assert not report.ok
    assert report.problems, corruption


def test_consistency_check_reports_unrevoked_cert_with_revocation(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    _populated(path)
    key = _cert_key(ISSUER_A, 1)
    cert = _cert_value(path, key)
    _tamper(path, "certs", key, msgpack.packb({**cert, "revocation_seq": None}))
    with Repository(path) as repo:
        problems = repo.check_consistency().problems
    assert any("not marked revoked" in p for p in problems), problems


# --------------------------------------------------------------------------- snapshot / restore


def test_snapshot_then_restore_gives_the_same_digest(tmp_path: Path) -> None:
    _populated(tmp_path / "repo")
    with Repository(tmp_path / "repo") as repo:
        digest = repo.content_digest()
        assert repo.snapshot(tmp_path / "snap") == 7
        with pytest.raises(RepositoryError, match="not empty"):
            repo.snapshot(tmp_path / "snap")
        repo.apply(8, issue("late", 50))
        assert repo.content_digest() != digest
    with Repository(tmp_path / "replica") as replica:
        replica.apply(1, issue("other", 99, ISSUER_B))
        assert replica.restore(tmp_path / "snap") == 7
        assert replica.content_digest() == digest
        assert replica.last_applied_index() == 7
        assert replica.check_consistency().ok
        assert not replica.serial_exists(ISSUER_B, 99)
        assert isinstance(replica.apply(8, issue("late", 50)), Issued)  # carries on writing


def test_readers_keep_their_view_while_the_writer_goes_on(repo: Repository) -> None:
    repo.apply_batch([(i, issue(f"i{i}", i)) for i in range(1, 6)])
    repo.apply_batch([(5 + i, revoke(f"r{i}", i)) for i in (1, 2, 4)])
    entries = repo.iter_revoked(ISSUER_A)
    assert next(entries).serial == 1  # a read transaction is now open
    assert repo.last_applied_index() == 9  # a second reader in the same thread is fine
    assert isinstance(repo.apply(10, revoke("r3", 3)), Revoked)  # the writer is not blocked
    assert [e.serial for e in entries] == [2, 4]  # the reader still sees its snapshot
    assert [e.serial for e in repo.iter_revoked(ISSUER_A)] == [1, 2, 3, 4]


def test_snapshot_taken_while_writing_is_a_consistent_prefix(tmp_path: Path) -> None:
    with Repository(tmp_path / "repo") as repo:
        errors: list[BaseException] = []

        def write() -> None:
            try:
                for i in range(1, 301):
                    repo.apply(i, crash_command(i))
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        writer = threading.Thread(target=write)
        writer.start()
        while repo.last_applied_index() < 50:
            time.sleep(0.001)
        taken = repo.snapshot(tmp_path / "snap")
        writer.join()
        assert not errors and repo.last_applied_index() == 300
    assert 50 <= taken <= 300
    with Repository(tmp_path / "copy") as copy:
        assert copy.restore(tmp_path / "snap") == taken
        assert copy.check_consistency().ok
        with Repository(tmp_path / "reference") as reference:
            reference.apply_batch([(i, crash_command(i)) for i in range(1, taken + 1)])
            assert reference.content_digest() == copy.content_digest()


def test_restore_refuses_a_bad_snapshot_and_keeps_contents(repo: Repository, tmp_path: Path):
    repo.apply(1, issue())
    digest = repo.content_digest()
    with pytest.raises(RepositoryError):
        repo.restore(tmp_path / "missing")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "data.mdb").write_bytes(b"not lmdb" * 1000)
    with pytest.raises(RepositoryError):
        repo.restore(tmp_path / "garbage")
    assert repo.content_digest() == digest


def test_leftover_restore_temp_file_is_removed_at_open(tmp_path: Path) -> None:
    _populated(tmp_path / "repo")
    (tmp_path / "repo" / "data.mdb.restoring").write_bytes(b"half a copy")
    with Repository(tmp_path / "repo") as repo:
        assert repo.check_consistency().ok
    assert not (tmp_path / "repo" / "data.mdb.restoring").exists()


# --------------------------------------------------------------------------- schema versions


def _set_version(path: Path, version: Any, drop_issuers: bool = False) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            meta = env.open_db(b"meta", txn=txn)
            txn.put(b"schema_version", msgpack.packb(version), db=meta)
            if drop_issuers:
                txn.drop(env.open_db(b"issuers", txn=txn), delete=True)
    finally:
        env.close()


def test_version_0_store_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    _populated(path)
    with Repository(path) as repo:
        digest = repo.content_digest(include_audit=False)
    _set_version(path, 0, drop_issuers=True)
    with Repository(path) as repo:
        assert repo.schema_version() == SCHEMA_VERSION
        assert repo.content_digest(include_audit=False) == digest  # counters rebuilt exactly
        assert repo.check_consistency().ok


def test_version_0_without_migration_is_refused(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "repo"
    _populated(path)
    _set_version(path, 0, drop_issuers=True)
    monkeypatch.setattr(schema_module, "MIGRATIONS", {})
    with pytest.raises(RepositoryError, match="no migration from schema version 0 to 1"):
        Repository(path)


@pytest.mark.parametrize(
    ("version", "words"), [(SCHEMA_VERSION + 1, "newer"), ("one", "unreadable")]
)
def test_newer_or_unknown_version_is_refused(tmp_path: Path, version: Any, words: str) -> None:
    path = tmp_path / "repo"
    _populated(path)
    _set_version(path, version)
    with pytest.raises(RepositoryError, match=words):
        Repository(path)
    _set_version(path, SCHEMA_VERSION)
    with Repository(path) as repo:  # the refused open changed nothing
        assert repo.check_consistency().ok


def test_data_without_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v", db=env.open_db(b"certs", txn=txn))
    env.close()
    with pytest.raises(RepositoryError, match="no schema version"):
        Repository(path)


# --------------------------------------------------------------------------- crash


def crash_command(i: int) -> Command:
    """The i-th command (1-based) of the crash log: a deterministic mix of every op."""
    kind = i % 5
    if kind in (0, 1, 2):
        return issue(f"i{i}", i, ISSUER_A if i % 2 else ISSUER_B, b"d")
    if kind == 3:  # revoke the certificate issued just before
        return revoke(f"r{i}", i - 1, ISSUER_A if (i - 1) % 2 else ISSUER_B, b"d")
    return certify(f"p{i}") if i % 2 else record_crl(i)


CRASH_CHILD = """
import sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from storage import Repository
from test_repository import crash_command

repo = Repository(Path(sys.argv[1]))
i = repo.last_applied_index()
while True:
    if (i // 7) % 2:
        batch = [(i + k, crash_command(i + k)) for k in range(1, 6)]
        repo.apply_batch(batch)
        i += 5
    else:
        i += 1
        repo.apply(i, crash_command(i))
    print(i, flush=True)
"""


@pytest.mark.parametrize("kill_after", [40, 97, 173, 256, 311, 402])
def test_kill_9_mid_stream_leaves_a_consistent_prefix(tmp_path: Path, kill_after: int) -> None:
    path = tmp_path / "repo"
    script = tmp_path / "child.py"
    script.write_text(CRASH_CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), str(path), str(Path(__file__).parent)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged = _kill_when_acknowledged(child, kill_after)
    assert child.returncode == -signal.SIGKILL, "the child ended before it was killed"
    with Repository(path) as repo:
        applied = repo.last_applied_index()
        assert applied >= acknowledged  # an apply that returned is durable
        report = repo.check_consistency()
        assert report.ok, report.problems
        crashed = repo.content_digest()
        present = [i for i in range(1, applied + 7) if _effect_present(repo, i)]
    assert present == [i for i in range(1, applied + 1) if crash_command(i).op != "record_crl"]
    with Repository(tmp_path / "reference") as reference:
        reference.apply_batch([(i, crash_command(i)) for i in range(1, applied + 1)])
        assert reference.content_digest() == crashed


def _kill_when_acknowledged(child: subprocess.Popen, kill_after: int) -> int:
    """SIGKILL the child once it has acknowledged `kill_after` applies; return the last seen.

    A thread drains its stdout so the child never blocks on a full pipe and the kill lands while
    it is writing, not while it waits to print.
    """
    progress: queue.Queue[int] = queue.Queue()

    def drain() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            progress.put(int(line))

    threading.Thread(target=drain, daemon=True).start()
    acknowledged = 0
    try:
        while acknowledged < kill_after:
            acknowledged = progress.get(timeout=20)
        # The wake-up above is locked to the child's print; a random pause of a few apply periods
        # lets the kill land anywhere in the loop, including between two LMDB commits.
        time.sleep(random.Random(kill_after).uniform(0, 0.003))
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)
    while not progress.empty():
        acknowledged = max(acknowledged, progress.get_nowait())
    return acknowledged


def _effect_present(repo: Repository, i: int) -> bool:
    """Whether command i left its trace (CRL records are superseded, so they are not checked)."""
    command = crash_command(i)
    if isinstance(command, RecordCrl):
        return False
    assert isinstance(command, IssueX509 | RevokeX509 | CertifyOpenpgp)
    return repo.get_request(command.request_id) is not None


def modes(path: Path) -> dict[str, int]:
    """The permission bits of a directory and of each file in it."""
    found = {".": path.stat().st_mode & 0o777}
    found.update({child.name: child.stat().st_mode & 0o777 for child in path.iterdir()})
    return found


def test_the_repository_is_private_to_its_owner_and_fixed_at_open(tmp_path):
    """Issue 11, item 7: the repository (subscriber names and addresses) was 0755 with 0644
    files. It is created 0700 / 0600, and a repository left world-readable (an old signer, a
    restore, a copy) is made private again when the signer opens it."""
    old = os.umask(0o022)
    try:
        with Repository(tmp_path / "new"):
            pass
        assert set(modes(tmp_path / "new").values()) <= {0o700, 0o600}
        assert modes(tmp_path / "new")["."] == 0o700
        loose = tmp_path / "loose"
        with Repository(loose):
            pass
        os.chmod(loose, 0o755)
        for child in loose.iterdir():
            os.chmod(child, 0o644)
        with Repository(loose) as repository:
            assert modes(loose) == {".": 0o700, **{c.name: 0o600 for c in loose.iterdir()}}
            snapshot_dir = tmp_path / "snap"
            repository.snapshot(snapshot_dir)
            repository.restore(snapshot_dir)
            assert modes(loose) == {".": 0o700, **{c.name: 0o600 for c in loose.iterdir()}}
    finally:
        os.umask(old)
