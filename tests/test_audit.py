"""The audit log (docs/audit.md): records appended by the repository's apply, the tree and its
proofs from the stored nodes, refusals batched, `signer audit verify`, the web side's copy with
its consistency checks, and the signer end to end with the HSM's audit key."""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from audit_helpers import ISSUER, NOW, AuditKey, AuditLog, issue
from crl_helpers import BAUD, csr, make_ceremony_ca, signer_config
from cryptography import x509

from signer.cli import main
from signer.client.audit import AuditAlert, AuditMirror
from signer.client.library import SignerClient
from signer.config import load
from signer.errors import ErrorCode, SignerError
from signer.link.serial_link import LinkSettings
from signer.pki import merkle
from signer.pki.audit import (
    AuditFormatError,
    TreeHead,
    decode_record,
    head_file,
    iter_frames,
    verify_log,
)
from signer.server.audit import RefusalBatch, entries_of
from signer.server.config import SignerConfig
from signer.server.process import SignerServer
from signer.tools.line_emulator import LineEmulator
from signer.wire.protocol import COMMANDS
from storage import (
    AuditEvent,
    CertifyOpenpgp,
    Noop,
    RecordCrl,
    RecordTreeHead,
    Rejected,
    Repository,
    RevokeX509,
    SetMeta,
    encode,
)
from storage.commands import MAX_AUDIT_BYTES

# --------------------------------------------------------------------------- the repository


@pytest.fixture
def repo(tmp_path: Path):
    with Repository(tmp_path / "repo") as repository:
        yield repository


def test_every_applied_entry_leaves_one_small_record(repo: Repository) -> None:
    der = b"\x30" + b"c" * 3000
    commands: list[Any] = [
        issue(1, der),
        issue(1, der),  # the same request again: a duplicate, recorded as such
        RevokeX509("rev-1", b"r" * 32, ISSUER, 1, 1, NOW, None, b"\x30\x03entry"),
        RevokeX509("rev-2", b"r" * 32, ISSUER, 99, 1, NOW, None, b"\x30\x03entry"),
        CertifyOpenpgp("pgp-1", b"p" * 32, b"f" * 20, ("A <a@example.org>",), NOW, NOW, der),
        RecordCrl(ISSUER, 1, NOW, NOW + 9, der),
        SetMeta("cluster", None, b"members"),
        Noop(),  # moves the index only: no record
        b"\xc1",  # not even msgpack: recorded by its digest
    ]
    for index, command in enumerate(commands, start=1):
        repo.apply(index, command)
    records = repo.audit_records(0, 100)
    events = [decode_record(r) for r in records]
    assert [(e["event"], e["outcome"], e["code"]) for e in events] == [
        ("issue_x509", "issued", None),
        ("issue_x509", "duplicate", None),
        ("revoke_x509", "revoked", None),
        ("revoke_x509", "rejected", "unknown_certificate"),
        ("certify_openpgp", "certified", None),
        ("record_crl", "recorded", None),
        ("set_meta", "recorded", None),
        ("invalid", "rejected", "malformed"),
    ]
    assert [e["index"] for e in events] == [1, 2, 3, 4, 5, 6, 7, 9]
    assert events[0]["cert_sha256"] == hashlib.sha256(der).digest()
    assert all(len(r) < 400 and b"cccc" not in r for r in records)  # digests, never bodies
    assert repo.audit_position(ISSUER, 1) == 0


def test_a_replayed_entry_appends_nothing(repo: Repository) -> None:
    repo.apply_batch([(1, issue(1)), (2, issue(2))])
    repo.apply_batch([(1, issue(1)), (2, issue(2)), (3, issue(3))])  # a journal replay
    assert repo.audit_size() == 3


def test_the_stored_nodes_give_the_rfc_tree(repo: Repository) -> None:
    for n in range(1, 70):
        repo.apply(n, issue(n))
    records = repo.audit_records(0, 1000)
    with repo.audit_tree() as (size, perfect):
        assert size == 69
        for n in range(1, size + 1):
            head = merkle.tree_root(records[:n])
            assert merkle.root(perfect, n) == head
            for m in (0, n // 2, n - 1):
                proof = merkle.inclusion_proof(perfect, m, n)
                merkle.verify_inclusion(m, n, merkle.leaf_hash(records[m]), proof, head)
            proof = merkle.consistency_proof(perfect, n // 2, n)
            merkle.verify_consistency(n // 2, n, merkle.tree_root(records[: n // 2]), head, proof)


def test_a_tree_head_is_kept_only_for_the_tree_held(repo: Repository) -> None:
    for n in range(1, 6):
        repo.apply(n, issue(n))
    with repo.audit_tree() as (_size, perfect):
        root = merkle.root(perfect, 3)
    ok = repo.apply(6, RecordTreeHead(3, NOW, root, "ecdsa-sha256", b"sig"))
    assert not isinstance(ok, Rejected)
    for index, bad in enumerate(
        [
            RecordTreeHead(4, NOW, root, "ecdsa-sha256", b"sig"),  # another size
            RecordTreeHead(99, NOW, root, "ecdsa-sha256", b"sig"),  # a tree not held
        ],
        start=7,
    ):
        refused = repo.apply(index, bad)
        assert isinstance(refused, Rejected) and refused.reason.value == "audit_mismatch"
    assert repo.tree_head() == {
        "size": 3,
        "timestamp": NOW,
        "root": root,
        "algorithm": "ecdsa-sha256",
        "signature": b"sig",
    }
    assert decode_record(repo.audit_records(5, 1)[0])["event"] == "tree_head"


@pytest.mark.parametrize(
    "events",
    [
        [["deleted", NOW, {}]],  # not an audit event
        [["refused", NOW, {f"k{i}": i for i in range(17)}]],  # too many fields
        [["refused", NOW, {"secret": b"x" * 65}]],  # bytes over a digest's size
        [["refused", NOW, {"index": 1}]],  # the record's own field
        [["operator", NOW, {"list": [1, 2]}]],  # not a flat value
        [["refused", NOW, {"t": "x" * 1000}]] * 10,  # over MAX_AUDIT_BYTES
    ],
)
def test_audit_commands_are_checked(repo: Repository, events: list[Any]) -> None:
    from storage.layout import pack

    refused = repo.apply(1, pack({"op": "record_audit", "events": events}))
    assert isinstance(refused, Rejected) and refused.reason.value == "malformed"


def test_refusals_are_batched_in_bounded_memory_and_entries() -> None:
    batch = RefusalBatch(limit=8, known=COMMANDS)
    for n in range(10_000):
        command = ["sign_x509", "revoke_x509", "no such command"][n % 3]
        batch.add(NOW + n, command, f"req-{n}" + "x" * 200, ["bad_csr", "busy"][n % 2])
    assert len(batch.records) == 8 and len(batch.counts) <= 6
    events = batch.take()
    assert sum(e.detail["count"] for e in events) == 10_000
    assert {e.detail["command"] for e in events} == {"sign_x509", "revoke_x509", "unknown"}
    commands = entries_of(events)
    assert len(commands) == 1 and all(len(encode(c)) <= MAX_AUDIT_BYTES for c in commands)
    big = [AuditEvent("refused", NOW, {"request_id": "x" * 1000, "count": 1})] * 40
    split = entries_of(big)
    assert len(split) > 1 and sum(len(c.events) for c in split) == 40
    assert all(len(encode(c)) <= MAX_AUDIT_BYTES for c in split)
    assert batch.take() == []


# --------------------------------------------------------------------------- the verifier


@pytest.fixture
def signed(tmp_path: Path):
    """A log of 40 records, a head signed over all of it, the certificate: as files."""
    key = AuditKey()
    log = AuditLog(tmp_path / "signer", key)
    log.grow(40)
    head = log.sign()
    files = {
        "log": log.file(tmp_path / "audit.log", log.records()[: head.size]),
        "head": tmp_path / "head.json",
        "cert": key.write(tmp_path / "audit.crt"),
    }
    files["head"].write_text(head_file(head))
    return log, head, files


def verify(files: dict[str, Path], *extra: str) -> int:
    argv = ["audit", "verify", "--log", str(files["log"]), "--head", str(files["head"])]
    return main([*argv, "--cert", str(files["cert"]), "--quiet", *extra])


def test_verify_accepts_the_signed_log(signed, capsys) -> None:
    log, _head, files = signed
    assert verify(files, "--json") == 0
    outcome = json.loads(capsys.readouterr().out)
    assert outcome["ok"] and outcome["records"] == outcome["head_size"] == 40
    assert outcome["events"] == {"issue_x509": 40}
    log.file(files["log"])  # with the head's own record after it: still the signed 40
    assert verify(files) == 0


def tampered(records: list[bytes], how: str) -> list[bytes]:
    records, at = list(records), min(17, len(records) // 2)
    if how == "changed byte":
        flipped = bytearray(records[at])
        flipped[-3] ^= 0x01
        records[at] = bytes(flipped)
    elif how == "removed record":
        del records[at]
    elif how == "swapped records":
        records[3], records[4] = records[4], records[3]
    return records


@pytest.mark.parametrize("how", ["changed byte", "removed record", "swapped records"])
def test_verify_detects_a_changed_log(signed, how: str, capsys) -> None:
    log, head, files = signed
    log.file(files["log"], tampered(log.records()[: head.size], how))
    assert verify(files, "--json") == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "audit_mismatch"


def test_verify_detects_a_forged_head(signed, tmp_path: Path) -> None:
    _log, head, files = signed
    files["head"].write_text(head_file(TreeHead(**{**head.__dict__, "timestamp": NOW + 1})))
    assert verify(files) == 1  # the signature no longer covers it
    other = AuditKey()  # a key of the same shape, not the audit key of this certificate
    files["head"].write_text(head_file(other.head(head.size, head.root)))
    assert verify(files) == 1
    wrong_eku = AuditKey(eku=x509.ObjectIdentifier("1.3.6.1.5.5.7.3.1"))
    files["cert"] = wrong_eku.write(tmp_path / "server.crt")
    files["head"].write_text(head_file(wrong_eku.head(head.size, head.root)))
    assert verify(files) == 1  # a key for something else never signs tree heads
    files["head"].write_text("{}")
    assert verify(files) == 2


def test_verify_detects_a_history_rewritten_after_a_restore(signed, tmp_path: Path) -> None:
    """The signer restored from a copy of 25 records and went on: its new log and new head
    cannot pass for the one signed before, nor the old log for the new head."""
    log, _head, files = signed
    rebuilt = AuditLog(tmp_path / "rebuilt", log.key)
    rebuilt.grow(25)  # the copy: the same first 25 entries
    rebuilt.serial = 1000
    rebuilt.grow(30)  # other entries from there on
    new_head = rebuilt.sign()
    assert rebuilt.records()[:25] == log.records()[:25]
    rebuilt.file(files["log"], rebuilt.records()[: new_head.size])
    assert verify(files) == 1  # the new log against the head signed before
    files["head"].write_text(head_file(new_head))
    log.file(files["log"])
    assert verify(files) == 1  # the old log against the new head
    rebuilt.file(files["log"], rebuilt.records()[: new_head.size])
    assert verify(files) == 0  # each is consistent on its own: only the web side's copy tells


def test_the_file_format_is_frames() -> None:
    assert list(iter_frames(b"\x00\x00\x00\x02ab\x00\x00\x00\x01c")) == [b"ab", b"c"]
    with pytest.raises(AuditFormatError):
        list(iter_frames(b"\x00\x00\x00\x05ab"))
    assert list(iter_frames(b"\x00\x00\x00\x02ab\x00\x00", final=False)) == [b"ab", 6]


def test_a_million_records_verify_in_one_pass(tmp_path: Path) -> None:
    """Not a timing assertion (bench/audit.py measures): the verifier streams, so a big file
    is read in chunks and checked against its head."""
    key = AuditKey()
    records = [b"\x81\xa1v\x01record %d" % i for i in range(20_000)]
    head = key.head(len(records), merkle.tree_root(records))
    data = b"".join(len(r).to_bytes(4, "big") + r for r in records)
    chunks = [data[i : i + 65_537] for i in range(0, len(data), 65_537)]
    found = verify_log(chunks, head, key.cert, decode=False)
    assert found.records == found.head_size == 20_000


# --------------------------------------------------------------------------- the web side


async def test_the_web_side_follows_the_signed_log(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "signer", AuditKey())
    mirror = AuditMirror(tmp_path / "web", log.key.cert, log.call)
    assert (await mirror.sync()).records == 0  # nothing signed yet: nothing taken
    log.grow(10)
    log.sign()
    log.grow(5)  # not signed yet: waits on the signer's side
    report = await mirror.sync()
    assert (report.records, report.size, report.head_size, report.signer_size) == (10, 10, 10, 16)
    for _ in range(3):
        log.grow(700)
        log.sign()
    report = await mirror.sync()
    assert report.size == report.head_size == log.repo.audit_size() - 1
    assert (tmp_path / "web" / "audit.log").read_bytes() == b"".join(
        len(r).to_bytes(4, "big") + r for r in log.records()[: report.size]
    )
    reopened = AuditMirror(tmp_path / "web", log.key.cert, log.call)
    assert reopened.frontier.size == report.size and (await reopened.sync()).records == 0


async def test_the_web_side_alerts_on_a_history_rewritten_after_a_restore(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "signer", AuditKey())
    log.grow(25)
    log.repo.snapshot(tmp_path / "backup")
    log.grow(15)
    log.sign()
    mirror = AuditMirror(tmp_path / "web", log.key.cert, log.call)
    await mirror.sync()
    log.repo.restore(tmp_path / "backup")  # the signer lost 15 records and a head
    log.serial = 1000
    log.grow(40)
    log.sign()  # a longer log, signed by the right key: but not the one signed before
    with pytest.raises(AuditAlert, match="does not extend"):
        await mirror.sync()
    with pytest.raises(AuditAlert):  # it stays raised until the operator acts
        await mirror.sync()
    short = AuditLog(tmp_path / "short", log.key)
    short.grow(3)
    short.sign()
    cut = AuditMirror(tmp_path / "web", log.key.cert, short.call)
    with pytest.raises(AuditAlert, match="cut"):
        await cut.sync()


async def test_the_web_side_alerts_on_a_forged_head_or_other_records(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "signer", AuditKey())
    log.grow(12)
    log.sign()
    other = AuditMirror(tmp_path / "web1", AuditKey().cert, log.call)  # another audit key
    with pytest.raises(AuditAlert, match="not the audit key"):
        await other.sync()
    log.tamper = lambda records: tampered(records, "changed byte")
    served = AuditMirror(tmp_path / "web2", log.key.cert, log.call)
    with pytest.raises(AuditAlert, match="do not make the signed head"):
        await served.sync()
    assert not (tmp_path / "web2" / "audit.log").exists()  # nothing unverified kept


@pytest.mark.parametrize("how", ["changed byte", "removed record", "swapped records"])
async def test_the_web_side_alerts_on_its_own_file_changed(tmp_path: Path, how: str) -> None:
    log = AuditLog(tmp_path / "signer", AuditKey())
    log.grow(30)
    log.sign()
    await AuditMirror(tmp_path / "web", log.key.cert, log.call).sync()
    path = tmp_path / "web" / "audit.log"
    records = [r for r in iter_frames(path.read_bytes()) if isinstance(r, bytes)]
    log.file(path, tampered(records, how))
    with pytest.raises(AuditAlert):
        mirror = AuditMirror(tmp_path / "web", log.key.cert, log.call)
        await mirror.sync()


async def test_a_sync_survives_a_head_written_before_its_records(tmp_path: Path) -> None:
    """A crash between keeping a head and writing its records: the next sync goes on."""
    log = AuditLog(tmp_path / "signer", AuditKey())
    log.grow(3000)
    log.sign()
    mirror = AuditMirror(tmp_path / "web", log.key.cert, log.call)
    await asyncio.wait_for(mirror.sync(max_rounds=1), 30)
    assert 0 < mirror.frontier.size < 3000
    again = AuditMirror(tmp_path / "web", log.key.cert, log.call)
    assert (await again.sync()).size == 3000


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ceremony_ca(softhsm_token_factory, tmp_path_factory):
    return make_ceremony_ca(softhsm_token_factory(), tmp_path_factory.mktemp("audit-ca"))


def audit_signer_config(ceremony_ca, device: Path, repository: Path, **changes: Any) -> Any:
    path = signer_config(ceremony_ca, device, repository)
    text = yaml.safe_load(path.read_text())
    text["audit"]["refusal_interval_seconds"] = 0.1
    text.update(changes)
    path.write_text(yaml.safe_dump(text))
    return load(path, SignerConfig)


async def test_the_signer_keeps_a_signed_verifiable_audit_log(ceremony_ca, tmp_path: Path) -> None:
    base, _ = ceremony_ca
    certificate = x509.load_pem_x509_certificate((base / "ca" / "audit.crt").read_bytes())
    line = LineEmulator(tmp_path / "line", baud=BAUD)
    line.start()
    settings = LinkSettings(device=str(line.end_b), baudrate=BAUD, reopen_interval=0.1)
    config = audit_signer_config(ceremony_ca, line.end_a, tmp_path / "repo")
    server = SignerServer(config)
    await server.start()
    try:
        async with SignerClient(settings, timeout=20) as client:
            sans = [["dns", "www.example.org"]]
            good, other = [
                await client.call("sign_x509", {"profile": "server", "csr": csr(n), "sans": sans})
                for n in ("www.example.org", "www.example.org")
            ]
            with pytest.raises(SignerError) as refused:
                await client.call("sign_x509", {"profile": "no-such", "csr": csr("x")})
            assert refused.value.code is ErrorCode.UNKNOWN_PROFILE
            revoke = {"issuer": "class3", "serial": other["serial"], "reason": "keyCompromise"}
            await client.call("revoke_x509", revoke)
            async with asyncio.timeout(20):  # the refusal's batch, and the CRL's tree head
                while not _events(server.ca.repository, "refused") or not _crl_after_revoke(
                    server.ca.repository
                ):
                    await asyncio.sleep(0.1)
            head = (await client.call("sign_tree_head"))["head"]
            mirror = AuditMirror(tmp_path / "web", certificate, client.call)
            report = await mirror.sync()
            assert report.size == report.head_size == head["size"]
            proof = await client.call(
                "prove_inclusion", {"issuer": "class3", "serial": good["serial"]}
            )
            with pytest.raises(SignerError) as unknown:
                await client.call("prove_inclusion", {"issuer": "class3", "serial": "7" * 30})
            health = await client.call("health")
    finally:
        await server.stop()
        line.close()
    assert unknown.value.code is ErrorCode.UNKNOWN_CERTIFICATE
    record = decode_record(proof["record"])
    assert record["serial"] == int(good["serial"], 16).to_bytes(20, "big")
    assert record["cert_sha256"] == hashlib.sha256(good["certificate"]).digest()
    root = proof["head"]["root"]
    leaf = merkle.leaf_hash(proof["record"])
    merkle.verify_inclusion(proof["index"], proof["size"], leaf, proof["proof"], root)
    another = merkle.leaf_hash(mirror_records(tmp_path)[proof["index"] + 1])
    with pytest.raises(merkle.ProofError):  # the proof is that record's, no other's
        merkle.verify_inclusion(proof["index"], proof["size"], another, proof["proof"], root)
    events = [decode_record(r) for r in mirror_records(tmp_path)]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "operator" and events[0]["action"] == "start"
    assert kinds.count("issue_x509") == 2 and "revoke_x509" in kinds and "publish_crl" in kinds
    [refusal] = [e for e in events if e["event"] == "refused" and e["command"] == "sign_x509"]
    assert refusal["code"] == "unknown_profile" and refusal["count"] == 1
    assert "tree_head" in kinds
    assert health["sections"]["audit"]["head_size"] == head["size"]
    files = {
        "log": tmp_path / "web" / "audit.log",
        "head": tmp_path / "head.json",
        "cert": base / "ca" / "audit.crt",
    }
    files["head"].write_text(head_file(TreeHead.from_json(json.loads(
        (tmp_path / "web" / "audit-head.json").read_text()))))  # fmt: skip
    assert verify(files) == 0
    assert b"PRIVATE" not in files["log"].read_bytes()


def mirror_records(tmp_path: Path) -> list[bytes]:
    data = (tmp_path / "web" / "audit.log").read_bytes()
    return [r for r in iter_frames(data) if isinstance(r, bytes)]


def _events(repo: Repository, event: str) -> list[dict[str, Any]]:
    records = [decode_record(r) for r in repo.audit_records(0, 10_000)]
    return [r for r in records if r["event"] == event]


def _crl_after_revoke(repo: Repository) -> bool:
    kinds = [decode_record(r)["event"] for r in repo.audit_records(0, 10_000)]
    revoked = kinds.index("revoke_x509") if "revoke_x509" in kinds else len(kinds)
    return "tree_head" in kinds[revoked:]


async def test_a_changed_configuration_is_recorded_at_start(ceremony_ca, tmp_path: Path) -> None:
    line = LineEmulator(tmp_path / "line", baud=BAUD)
    line.start()
    starts = []
    try:
        for profiles in ("cacert", "cacert", "modern"):
            config = audit_signer_config(
                ceremony_ca, line.end_a, tmp_path / "repo", profiles=profiles
            )
            server = SignerServer(config)
            await server.start()
            await server.stop()
            with Repository(tmp_path / "repo") as repo:
                starts.append(_events(repo, "operator"))
    finally:
        line.close()
    assert [len(s) for s in starts] == [1, 1, 2]  # the same configuration is not recorded again
    first, changed = starts[2]
    assert first["config_sha256"] != changed["config_sha256"]
    assert first["profiles_sha256"] != changed["profiles_sha256"]
    assert first["certificates_sha256"] == changed["certificates_sha256"]
    assert first["node"] == "standalone"
