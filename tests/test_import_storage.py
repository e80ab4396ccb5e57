"""Imports of an earlier CA's history in the repository (storage/imports.py): begin, batches in
order, finish; the CRL membership built as batches apply; every refusal deterministic; the
issuer's first CRL after the import continues the earlier CA's numbers and lists what the
import decided."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import itertools
import subprocess
import sys
from pathlib import Path

import lmdb
import msgpack
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from replication.log import LocalLog
from signer.pki.revocation import encode_crl_entry
from signer.server.ca import Issuer
from signer.server.config import CrlConfig
from signer.server.crl import CrlService
from storage import (
    MAX_IMPORT_ENTRY_BYTES,
    AlreadyRevoked,
    BeginImport,
    FinishImport,
    ImportedCertificate,
    ImportProgress,
    ImportX509,
    IssueX509,
    Reason,
    Rejected,
    Repository,
    Revoked,
    RevokeX509,
    encode,
)
from storage.crl import CRL_BLOCK_ENTRIES

ROOT = Path(__file__).resolve().parent.parent
NOW = 1_780_000_000
ISSUER = bytes(range(20))


def record(serial: int, revoked: bool = False, expired: bool = False, listed: bool = True,
           der: bytes | None = None) -> ImportedCertificate:  # fmt: skip
    not_after = NOW - 86400 if expired else NOW + 86400 * 300
    return ImportedCertificate(
        serial=serial,
        not_before=None,
        not_after=not_after,
        subject=b"/CN=user %d" % serial,
        file=b"unknown",
        status="R" if revoked else ("E" if expired else "V"),
        revoked_at=NOW - 3600 if revoked else None,
        reason=1 if revoked and serial % 2 else None,
        invalidity_date=None,
        crl_entry=encode_crl_entry(serial, NOW - 3600, 1 if serial % 2 else None, None)
        if revoked
        else None,
        listed=revoked and listed,
        der=der,
    )


def history(count: int) -> list[ImportedCertificate]:
    """Serials 1..count: every third revoked, every fifth expired (revoked ones then unlisted)."""
    return [
        record(n, revoked=n % 3 == 0, expired=n % 5 == 0, listed=n % 5 != 0)
        for n in range(1, count + 1)
    ]


def begin(records: list[ImportedCertificate], batches: int, import_id: str = "imp-1",
          crl_number: int = 0x40, issuer: bytes = ISSUER) -> BeginImport:  # fmt: skip
    revoked = [r for r in records if r.revoked_at is not None]
    unlisted = [r.not_after for r in revoked if not r.listed]
    return BeginImport(
        import_id=import_id,
        issuer=issuer,
        batches=batches,
        certificates=len(records),
        revoked=len(revoked),
        listed=sum(r.listed for r in revoked),
        crl_number=crl_number,
        crl_time=NOW - 60,
        removed_before=max(unlisted) + 1 if unlisted else None,
        started_at=NOW,
        source="test",
    )


def chunks(records: list[ImportedCertificate], size: int) -> list[tuple[ImportedCertificate, ...]]:
    return [tuple(records[i : i + size]) for i in range(0, len(records), size)]


def import_log(records: list[ImportedCertificate], size: int, import_id: str = "imp-1",
               issuer: bytes = ISSUER) -> list:  # fmt: skip
    parts = chunks(records, size)
    return [
        begin(records, len(parts), import_id, issuer=issuer),
        *(ImportX509(import_id, issuer, n, part) for n, part in enumerate(parts, start=1)),
        FinishImport(import_id, issuer),
    ]


def applied(repo: Repository, commands: list) -> list:
    start = repo.last_applied_index() + 1
    return repo.apply_batch([(start + i, c) for i, c in enumerate(commands)])


@pytest.fixture
def repo(tmp_path: Path):
    with Repository(tmp_path / "repo", 1 << 30) as opened:
        yield opened


def test_an_import_records_the_history_and_the_crl_it_continues(repo: Repository) -> None:
    records = history(1000)
    results = applied(repo, import_log(records, 300))
    assert all(isinstance(r, ImportProgress) and r.fresh for r in results)
    assert results[-1].finished and results[-1].applied_certificates == 1000
    assert repo.check_consistency().ok
    revoked = [r for r in records if r.revoked_at is not None]
    listed = [r for r in revoked if r.listed]
    counts = repo.counts()["issuers"][ISSUER]
    assert counts == {"certificates": 1000, "revoked": len(revoked), "revocation_seq": len(revoked)}
    # the membership of the imported CRL: the listed revocations, their entries as decided
    members = list(repo.iter_crl_members(ISSUER))
    assert [m[0] for m in members] == [r.serial.to_bytes(20, "big") for r in listed]
    assert [m[1] for m in members] == [r.crl_entry for r in listed]
    assert sorted(s for _, s in repo.iter_crl_expiry(ISSUER)) == [r.serial for r in listed]
    blocks = list(repo.iter_crl_blocks(ISSUER))
    assert all(len(b[0]) // 20 == CRL_BLOCK_ENTRIES for b in blocks[:-1])
    last = repo.last_crl_history(ISSUER)
    assert last["crl_number"] == 0x40 and last["imported"] == "imp-1"
    assert last["entries"] == len(listed) and last["revocation_seq"] == len(revoked)
    # imported certificates: no request, their index.txt facts kept
    valid = repo.get_certificate(ISSUER, 1)
    assert valid["request_id"] is None and valid["import_id"] == "imp-1"
    gone = repo.get_certificate(ISSUER, 3)
    assert gone["revocation"].request_id is None and gone["revocation"].reason == 1
    exported = {c.serial: c for c in repo.iter_certificates(ISSUER)}
    assert exported[5].status == "E" and exported[5].subject == b"/CN=user 5"
    state = repo.import_state(ISSUER)
    assert state.finished and state.applied_batches == 4


def test_batches_are_idempotent_and_strictly_in_order(repo: Repository) -> None:
    records = history(90)
    log = import_log(records, 30)
    applied(repo, log[:2])
    digest = repo.content_digest(include_applied_index=False, include_audit=False)
    again = applied(repo, [log[0], log[1]])  # a client that resends after losing the answers
    assert [r.fresh for r in again] == [False, False]
    assert repo.content_digest(include_applied_index=False, include_audit=False) == digest
    refusals = applied(
        repo,
        [
            log[3],  # batch 3 before batch 2
            ImportX509("other", ISSUER, 2, log[2].certificates),  # another import's batch
            ImportX509("imp-1", ISSUER, 2, log[1].certificates),  # serials not above the last
            FinishImport("imp-1", ISSUER),  # not complete
            begin(records, 3, "other"),  # a second import into the issuer
        ],
    )
    assert all(isinstance(r, Rejected) and r.reason is Reason.IMPORT_CONFLICT for r in refusals)
    assert "batch 3 arrived before batch 2" in refusals[0].message
    assert "incomplete" in refusals[3].message
    assert repo.content_digest(include_applied_index=False, include_audit=False) == digest
    done = applied(repo, log[2:])
    assert done[-1].finished
    assert applied(repo, [log[-1]])[0].fresh is False  # finishing twice changes nothing
    assert repo.check_consistency().ok


def test_nothing_else_writes_to_an_issuer_while_its_import_runs(repo: Repository) -> None:
    records = history(30)
    log = import_log(records, 10)
    issue = IssueX509("i1", b"d", ISSUER, 2**127 + 1, b"c", "p", NOW, NOW + 9, NOW)
    revoke = RevokeX509(
        "r1", b"d", ISSUER, 1, None, NOW, None, encode_crl_entry(1, NOW, None, None)
    )
    applied(repo, log[:2])
    refused = applied(repo, [issue, revoke])
    assert [r.reason for r in refused] == [Reason.IMPORT_CONFLICT] * 2
    applied(repo, log[2:])
    issued, revoked, again = applied(
        repo,
        [
            issue,
            revoke,
            RevokeX509(
                "r2", b"d", ISSUER, 3, None, NOW, None, encode_crl_entry(3, NOW, None, None)
            ),
        ],
    )
    assert issued.status == "issued" and isinstance(revoked, Revoked)
    assert isinstance(again, AlreadyRevoked) and again.request_id is None  # revoked by the import
    assert repo.get_request("r1").result.serial == 1
    assert repo.check_consistency().ok


def test_an_import_goes_into_an_issuer_before_its_first_certificate(repo: Repository) -> None:
    issue = IssueX509("i1", b"d", ISSUER, 2**127 + 1, b"c", "p", NOW, NOW + 9, NOW)
    other = bytes(20)
    applied(repo, [issue])
    log = import_log(history(5), 5)
    refused = applied(repo, log[:1])[0]
    assert refused.reason is Reason.IMPORT_CONFLICT and "1 certificate(s)" in refused.message
    # an issuer that published only (empty) CRLs of its own: the import continues above them
    applied(repo, [publish(other, 2)])
    low = begin(history(5), 1, crl_number=2, issuer=other)
    assert "would go back" in applied(repo, [low])[0].message
    assert applied(repo, import_log(history(5), 5, issuer=other))[-1].finished
    assert repo.check_consistency().ok


def publish(issuer: bytes, number: int):
    from storage import PublishCrl

    return PublishCrl(issuer, number, NOW, NOW + 9, 0, (), 0, None, None, b"a", b"s",
                      hashlib.sha256(b"crl").digest(), 3)  # fmt: skip


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"status": "R"}, "a revocation time and CRL entry go with status R"),
        ({"status": "V", "revoked_at": NOW}, "a revocation time and CRL entry go with status R"),
        ({"listed": True}, "listed go with status R only"),
        ({"status": "X"}, "status must be V, R or E"),
        ({"not_before": NOW + 10**8}, "not_after is before not_before"),
        ({"subject": b"x" * 5000}, "subject has a wrong length"),
    ],
)
def test_a_bad_imported_record_is_malformed(change: dict, words: str, repo: Repository) -> None:
    good = record(7)
    bad = good._replace(**change)
    result = applied(repo, [ImportX509("imp-1", ISSUER, 1, (bad,))])[0]
    assert result.reason is Reason.MALFORMED and words in result.message


def test_an_import_entry_over_32_kib_is_refused(repo: Repository) -> None:
    big = [record(n, der=b"\x30" * 2000) for n in range(1, 20)]
    command = ImportX509("imp-1", ISSUER, 1, tuple(big))
    assert len(encode(command)) > MAX_IMPORT_ENTRY_BYTES
    result = applied(repo, [command])[0]
    assert result.reason is Reason.MALFORMED and "over 32768" in result.message


def test_a_version_1_store_opens_as_version_4_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "repo"
    with Repository(path) as repo:
        applied(repo, [IssueX509("i1", b"d", ISSUER, 5, b"c", "p", NOW, NOW + 9, NOW)])
        digest = repo.content_digest(include_audit=False)
    env = lmdb.open(str(path), max_dbs=16)
    with env.begin(write=True) as txn:
        txn.put(b"schema_version", msgpack.packb(1), db=env.open_db(b"meta", txn=txn))
    env.close()
    with Repository(path) as repo:
        assert repo.schema_version() == 4
        assert repo.content_digest(include_audit=False) == digest


READER = """
import sys
from pathlib import Path
from storage import FinishImport, Repository, RepositoryError, encode
issuer = bytes(range(20))
with Repository(Path(sys.argv[1]), readonly=True) as reader:
    serials = [c.serial for c in reader.iter_certificates(issuer)]
    print(serials, reader.import_state(issuer).finished)
    try:
        reader.apply(reader.last_applied_index() + 1, encode(FinishImport("x", issuer)))
    except RepositoryError as exc:
        print("refused:", exc)
"""


def test_a_reader_beside_the_writer_sees_the_import(repo: Repository) -> None:
    """What `signer export` does while the signer runs: another process reads, never writes."""
    applied(repo, import_log(history(20), 7))
    done = subprocess.run([sys.executable, "-c", READER, str(repo.path)], capture_output=True,
                          text=True, cwd=ROOT, check=True)  # fmt: skip
    listing, refusal = done.stdout.splitlines()
    assert listing == f"{list(range(1, 21))} True"
    assert refusal.startswith("refused: applying commands failed")


# --------------------------------------------------------------------------- the first CRL


class FileKeyHsm:
    def __init__(self, key):
        self._key = key

    def key(self, _label):
        return self._key

    async def run(self, fn, *args):
        return fn(*args)


def ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Old CA")])
    start = dt.datetime.fromtimestamp(NOW - 10**8, dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=9000))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


async def test_the_first_crl_after_an_import_continues_it(repo: Repository) -> None:
    key, cert = ca()
    key_id = x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    records = history(600)
    commit_log = LocalLog(repo)
    clock = lambda: dt.datetime.fromtimestamp(NOW, dt.UTC)  # noqa: E731
    service = CrlService([Issuer("old", cert, "old", key_id)], FileKeyHsm(key), repo, commit_log,
                         CrlConfig(min_interval_seconds=0), clock)  # fmt: skip
    try:
        assert (await service.refresh_due()) == {"old": "published 2 (no CRL yet)"}  # an empty one
        for command in import_log(records, 100, issuer=key_id):
            assert isinstance(await commit_log.commit(encode(command)), ImportProgress)
        assert service.due("old") == "first CRL after the import"
        crl = await service.publish("old")
        assert crl.number == 0x41  # the earlier CA's last was 0x40
        parsed = x509.load_der_x509_crl(crl.der)
        listed = {r.serial for r in records if r.listed}
        assert {e.serial_number for e in parsed} == listed
        assert parsed.is_signature_valid(cert.public_key())
        revoke = RevokeX509("r1", b"d", key_id, 1, None, NOW, None,
                            encode_crl_entry(1, NOW, None, None))  # fmt: skip
        assert isinstance(await commit_log.commit(encode(revoke)), Revoked)
        crl = await service.publish("old")
        assert {e.serial_number for e in x509.load_der_x509_crl(crl.der)} == listed | {1}
        assert repo.check_consistency().ok
    finally:
        await asyncio.to_thread(commit_log.close)


def test_batches_stay_under_32_kib_whatever_the_records() -> None:
    """`signer import` cuts batches by a size bound computed from the fields; every entry,
    encoded, stays within the bound the repository enforces."""
    import random

    from signer.tools.history import batch_bounds

    rng = random.Random(3)
    records = []
    for n in range(1, 3000):
        revoked = rng.random() < 0.4
        base = record(n * 7919 + 2**126 * (n % 2), revoked=revoked)
        records.append(
            base._replace(
                subject=b"s" * rng.choice([0, 40, 300, 4096]),
                file=b"f" * rng.choice([0, 7, 1024]),
                not_before=rng.choice([None, NOW - 10**8]),
                invalidity_date=rng.choice([None, NOW - 10**6]) if revoked else None,
                der=rng.choice([None, b"\x30" * rng.randint(1, 12000)]),
            )
        )
    records.sort(key=lambda r: r.serial)
    bounds = batch_bounds(records)
    assert bounds[0] == 0 and bounds[-1] == len(records)
    sizes = [
        len(encode(ImportX509("f" * 64, ISSUER, 2**31, tuple(records[a:b]))))
        for a, b in itertools.pairwise(bounds)
    ]
    assert max(sizes) <= MAX_IMPORT_ENTRY_BYTES
    assert sum(sizes) / len(sizes) > MAX_IMPORT_ENTRY_BYTES / 2  # and they are not tiny
