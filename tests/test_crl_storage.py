"""The repository's side of CRLs: `publish_crl` (membership, retention, history) and its reads."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import storage.crl as crl_module
from storage import (
    Command,
    CrlPublished,
    Issued,
    IssueX509,
    PublishCrl,
    Reason,
    Rejected,
    Replayed,
    Repository,
    Result,
    Revoked,
    RevokeX509,
    encode,
)
from storage.layout import crl_expiry_key

ISSUER = b"\x42" * 20
OTHER = b"\x43" * 20
T0 = 1_770_000_000
SERIAL_1, SERIAL_2, SERIAL_3 = ((n).to_bytes(20, "big") for n in (1, 2, 3))


def _block(*rows: tuple[bytes, bytes]) -> bytes:
    """A `crl_entries` value: serials, 4-byte sizes, entries."""
    return msgpack.packb(
        [
            b"".join(s for s, _ in rows),
            b"".join(len(e).to_bytes(4, "big") for _, e in rows),
            b"".join(e for _, e in rows),
        ]
    )


@pytest.fixture
def repo(tmp_path: Path):
    with Repository(tmp_path / "repo") as opened:
        yield opened


class Feed:
    """Applies commands at increasing indices; serial s expires at T0 + s days."""

    def __init__(self, repo: Repository):
        self.repo = repo
        self.index = repo.last_applied_index()

    def apply(self, command: Command | bytes) -> Result:
        self.index += 1
        return self.repo.apply(self.index, command)

    def revoke(self, serial: int, issuer: bytes = ISSUER) -> None:
        not_after = T0 + serial * 86400
        base = {"request_digest": b"d", "issuer": issuer, "serial": serial}
        issued = self.apply(
            IssueX509(
                request_id=f"i-{issuer.hex()[:4]}-{serial}",
                **base,  # type: ignore[arg-type]
                der=b"cert",
                profile="p",
                not_before=T0 - 10,
                not_after=not_after,
                issued_at=T0,
            )
        )
        assert isinstance(issued, Issued)
        revoked = self.apply(
            RevokeX509(
                request_id=f"r-{issuer.hex()[:4]}-{serial}",
                **base,  # type: ignore[arg-type]
                reason=None,
                revoked_at=T0,
                invalidity_date=None,
                crl_entry=b"\x30\x03\x02\x01" + bytes([serial % 256]),
            )
        )
        assert isinstance(revoked, Revoked)


def publish(
    number: int, seq: int, removed: list[int], entries: int, **overrides: Any
) -> PublishCrl:
    der = b"crl-" + str(number).encode()
    command = {
        "issuer": ISSUER,
        "crl_number": number,
        "this_update": T0 + number,
        "next_update": T0 + number + 7 * 86400,
        "revocation_seq": seq,
        "removed": tuple(removed),
        "entries": entries,
        "removed_before": None,
        "expired_certs_on_crl": None,
        "signature_algorithm": b"\x30\x0a",
        "signature": b"sig-" + str(number).encode(),
        "sha256": hashlib.sha256(der).digest(),
        "size": len(der),
    }
    return PublishCrl(**{**command, **overrides})


def members(repo: Repository, issuer: bytes = ISSUER) -> list[int]:
    return [int.from_bytes(serial, "big") for serial, _ in repo.iter_crl_members(issuer)]


def test_publish_adds_every_revocation_then_removes_what_it_names(repo: Repository) -> None:
    feed = Feed(repo)
    for serial in (5, 3, 9, 1):
        feed.revoke(serial)
    feed.revoke(7, issuer=OTHER)
    first = feed.apply(publish(2, seq=4, removed=[], entries=4))
    assert first == CrlPublished(
        issuer=ISSUER,
        crl_number=2,
        this_update=T0 + 2,
        next_update=T0 + 2 + 7 * 86400,
        revocation_seq=4,
        entries=4,
        added=4,
        removed=0,
    )
    assert members(repo) == [1, 3, 5, 9] and members(repo, OTHER) == []
    entries = dict(repo.iter_crl_members(ISSUER))
    assert entries[(3).to_bytes(20, "big")] == b"\x30\x03\x02\x01\x03"
    assert list(repo.iter_crl_expiry(ISSUER)) == [(T0 + s * 86400, s) for s in (1, 3, 5, 9)]

    feed.revoke(2)
    second = feed.apply(publish(3, seq=5, removed=[1, 5], entries=3))
    assert isinstance(second, CrlPublished)
    assert (second.added, second.removed, second.entries) == (1, 2, 3)
    assert members(repo) == [2, 3, 9]
    assert [s for _, s in repo.iter_crl_expiry(ISSUER)] == [2, 3, 9]
    history = repo.crl_history(ISSUER, 3)
    assert history is not None
    assert history["removed"] == [(1, 4), (5, 1)]  # (serial, revocation seq)
    assert history["revocation_seq"] == 5 and history["size"] == len(b"crl-3")
    assert repo.last_crl_history(ISSUER)["crl_number"] == 3  # type: ignore[index]
    assert [h["crl_number"] for h in repo.iter_crl_history(ISSUER)] == [2, 3]
    assert [h["crl_number"] for h in repo.iter_crl_history(ISSUER, after=2)] == [3]
    latest = repo.latest_crl(ISSUER)
    assert latest is not None and latest["crl_number"] == 3
    assert latest["der"] is None  # not kept: rebuilt from the history (signer/server/crl.py)
    assert repo.revocation(ISSUER, 5).seq == 1  # type: ignore[union-attr]
    assert repo.revocation(ISSUER, 4) is None
    report = repo.check_consistency()
    assert report.ok, report.problems
    assert report.checked["crl_expiry"] == 3 and report.checked["crl_history"] == 2


def _with_extra_field(command: PublishCrl) -> bytes:
    fields = msgpack.unpackb(encode(command), raw=False)
    return msgpack.packb({**fields, "extra": 1}, use_bin_type=True)


MISMATCH, MALFORMED = Reason.CRL_MISMATCH, Reason.MALFORMED


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (publish(2, seq=3, removed=[], entries=3), Reason.CRL_NUMBER_NOT_NEWER),
        (publish(4, seq=5, removed=[], entries=4), MISMATCH),  # seq not assigned
        (publish(4, seq=1, removed=[], entries=1), MISMATCH),  # seq goes back
        (publish(4, seq=3, removed=[3], entries=2), MISMATCH),  # not listed yet
        (publish(4, seq=3, removed=[8], entries=2), MISMATCH),  # never revoked
        (publish(4, seq=3, removed=[], entries=2), MISMATCH),  # miscounted
        (publish(4, seq=2, removed=[2, 1], entries=0), MALFORMED),  # not ascending
        (publish(4, seq=2, removed=[1, 1], entries=0), MALFORMED),
        (publish(4, seq=2, removed=[], entries=2, sha256=b"x"), MALFORMED),
        (publish(4, seq=2, removed=[], entries=2, next_update=T0), MALFORMED),
        (_with_extra_field(publish(4, seq=2, removed=[], entries=2)), MALFORMED),
    ],
)
def test_bad_publications_are_rejected_and_write_nothing(
    repo: Repository, command: PublishCrl | bytes, reason: Reason
) -> None:
    feed = Feed(repo)
    for serial in (1, 2, 3):
        feed.revoke(serial)
    assert isinstance(feed.apply(publish(2, seq=2, removed=[], entries=2)), CrlPublished)
    before = repo.content_digest(include_applied_index=False, include_audit=False)
    result = feed.apply(command)
    assert isinstance(result, Rejected) and result.reason is reason, result
    assert repo.content_digest(include_applied_index=False, include_audit=False) == before
    assert repo.last_applied_index() == feed.index


def test_replay_changes_nothing(repo: Repository) -> None:
    feed = Feed(repo)
    feed.revoke(1)
    command = publish(2, seq=1, removed=[], entries=1)
    feed.apply(command)
    digest = repo.content_digest()
    assert repo.apply(feed.index, command) == Replayed()
    assert repo.content_digest() == digest


def test_large_additions_give_the_same_state_by_either_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many new entries are read in key order instead of by sequence number: same result."""
    digests = []
    for threshold in (10_000, 0):
        monkeypatch.setattr(crl_module, "NEW_MEMBERS_BY_SEQ", threshold)
        with Repository(tmp_path / f"repo-{threshold}") as repo:
            feed = Feed(repo)
            for serial in (40, 7, 23, 1, 15, 30):
                feed.revoke(serial)
            feed.revoke(5, issuer=OTHER)
            feed.apply(publish(2, seq=4, removed=[], entries=4))
            feed.revoke(11)
            feed.apply(publish(3, seq=7, removed=[7], entries=6))
            assert members(repo) == [1, 11, 15, 23, 30, 40]
            assert repo.check_consistency().ok
            digests.append(repo.content_digest())
    assert digests[0] == digests[1]


def _tamper(path: Path, db: str, key: bytes, value: bytes | None) -> None:
    env = lmdb.open(str(path), max_dbs=16)
    try:
        with env.begin(write=True) as txn:
            handle = env.open_db(db.encode(), txn=txn)
            if value is None:
                assert txn.delete(key, db=handle)
            else:
                txn.put(key, value, db=handle)
    finally:
        env.close()


@pytest.mark.parametrize(
    ("db", "key", "value", "words"),
    [
        ("crl_expiry", crl_expiry_key(ISSUER, T0 + 2 * 86400, SERIAL_2), None, "missing"),
        ("crl_expiry", crl_expiry_key(ISSUER, T0 + 86400, SERIAL_1), b"\xc0", "dropped"),
        ("crl_entries", ISSUER + SERIAL_2, None, "2 by expiry"),
        ("crl_entries", ISSUER + SERIAL_2, msgpack.packb([SERIAL_3, b"", b""]), "malformed"),
        ("crl_entries", ISSUER + SERIAL_2, _block((SERIAL_2, b"x"), (SERIAL_3, b"y")), "not a"),
        ("crl_entries", ISSUER + SERIAL_3, _block((SERIAL_3, b"y"), (SERIAL_2, b"x")), "order"),
    ],
)
def test_consistency_check_sees_a_damaged_membership(
    tmp_path: Path, db: str, key: bytes, value: bytes | None, words: str
) -> None:
    with Repository(tmp_path / "repo") as repo:
        feed = Feed(repo)
        for serial in (1, 2, 3):
            feed.revoke(serial)
        feed.apply(publish(2, seq=3, removed=[], entries=3))
        feed.apply(publish(3, seq=3, removed=[1], entries=2))
        assert repo.check_consistency().ok
    _tamper(tmp_path / "repo", db, key, value)
    with Repository(tmp_path / "repo") as repo:
        report = repo.check_consistency()
    assert not report.ok
    assert any(words in problem for problem in report.problems), report.problems


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    steps=st.lists(
        st.tuples(
            st.lists(st.integers(1, 300), max_size=12),  # serials revoked before a CRL
            st.lists(st.integers(0, 50), max_size=6),  # which members the CRL drops
        ),
        min_size=1,
        max_size=8,
    ),
    block=st.sampled_from([1, 2, 3, 128]),
)
def test_membership_blocks_follow_any_sequence_of_publications(
    steps: list[tuple[list[int], list[int]]], block: int
) -> None:
    """Small blocks split, lose their first entry, empty out; the members stay right."""
    with (
        tempfile.TemporaryDirectory() as directory,
        pytest.MonkeyPatch.context() as patch,
        Repository(Path(directory)) as repo,
    ):
        patch.setattr(crl_module, "CRL_BLOCK_ENTRIES", block)
        patch.setattr(crl_module, "CRL_BLOCK_LIMIT", 2 * block)
        feed, model, seq, number = Feed(repo), [], 0, 1
        revoked: set[int] = set()
        for serials, picks in steps:
            fresh = [s for s in dict.fromkeys(serials) if s not in revoked]
            for serial in fresh:
                feed.revoke(serial)
            revoked.update(fresh)
            seq += len(fresh)
            dropped = sorted({model[p % len(model)] for p in picks} if model else set())
            model = sorted(set(model) - set(dropped) | set(fresh))
            number += 1
            result = feed.apply(publish(number, seq=seq, removed=dropped, entries=len(model)))
            assert isinstance(result, CrlPublished), result
            assert members(repo) == model
        report = repo.check_consistency()
        assert report.ok, report.problems
        sizes = [len(serials) // 20 for serials, _, _ in repo.iter_crl_blocks(ISSUER)]
        assert sum(sizes) == len(model) and all(0 < size <= 2 * block for size in sizes)
