"""The log command encoding, pinned byte for byte: a journal written today must decode the same
tomorrow, and every replica must reject a bad entry in the same words (storage/commands.py,
docs/repository.md §4). Pure: no LMDB, no I/O."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from storage import (
    COMMAND_TYPES,
    BeginImport,
    CertifyOpenpgp,
    Command,
    FinishImport,
    ImportedCertificate,
    ImportX509,
    Invalid,
    Issued,
    IssueX509,
    Noop,
    PublishCrl,
    RaiseCrlNumber,
    Reason,
    RecordCrl,
    RevokeX509,
    SetMeta,
    decode,
    encode,
)
from storage.commands import _SPECS, AuditEvent, RecordAudit, RecordTreeHead
from storage.results import from_record, record

ISSUER = bytes(range(20))

PINNED: list[tuple[Command, str]] = [
    (
        IssueX509(
            request_id="req-1",
            request_digest=b"dg",
            issuer=ISSUER,
            serial=2**140 + 5,
            der=b"\x30\x03der",
            profile="server",
            not_before=1_700_000_000,
            not_after=1_731_536_000,
            issued_at=1_700_000_010,
        ),
        "8aa26f70aa69737375655f78353039aa726571756573745f6964a57265712d31ae726571756573745f"
        "646967657374c4026467a6697373756572c414000102030405060708090a0b0c0d0e0f10111213a673"
        "657269616cc4140000100000000000000000000000000000000005a3646572c4053003646572a77072"
        "6f66696c65a6736572766572aa6e6f745f6265666f7265ce6553f100a96e6f745f6166746572ce6735"
        "2480a96973737565645f6174ce6553f10a",
    ),
    (
        RevokeX509(
            request_id="rev-1",
            request_digest=b"dg",
            issuer=ISSUER,
            serial=5,
            reason=1,
            revoked_at=1_710_000_000,
            invalidity_date=None,
            crl_entry=b"\x30\x01",
        ),
        "89a26f70ab7265766f6b655f78353039aa726571756573745f6964a57265762d31ae72657175657374"
        "5f646967657374c4026467a6697373756572c414000102030405060708090a0b0c0d0e0f10111213a6"
        "73657269616cc4140000000000000000000000000000000000000005a6726561736f6e01aa7265766f"
        "6b65645f6174ce65ec8780af696e76616c69646974795f64617465c0a963726c5f656e747279c40230"
        "01",
    ),
    (
        RecordCrl(
            issuer=ISSUER,
            crl_number=7,
            this_update=1_710_000_000,
            next_update=1_710_086_400,
            der=b"crl",
        ),
        "86a26f70aa7265636f72645f63726ca6697373756572c414000102030405060708090a0b0c0d0e0f10"
        "111213aa63726c5f6e756d626572c4140000000000000000000000000000000000000007ab74686973"
        "5f757064617465ce65ec8780ab6e6578745f757064617465ce65edd900a3646572c40363726c",
    ),
    (
        PublishCrl(
            issuer=ISSUER,
            crl_number=8,
            this_update=1_710_000_000,
            next_update=1_710_604_800,
            revocation_seq=3,
            removed=(1, 2**159 - 1),
            entries=4,
            removed_before=None,
            expired_certs_on_crl=1_700_000_000,
            signature_algorithm=b"\x30\x0a",
            signature=b"sig",
            sha256=b"\x11" * 32,
            size=3,
        ),
        "8ea26f70ab7075626c6973685f63726ca6697373756572c414000102030405060708090a0b0c0d0e0f"
        "10111213aa63726c5f6e756d626572c4140000000000000000000000000000000000000008ab746869"
        "735f757064617465ce65ec8780ab6e6578745f757064617465ce65f5c200ae7265766f636174696f6e"
        "5f73657103a772656d6f76656492c4140000000000000000000000000000000000000001c4147fffff"
        "ffffffffffffffffffffffffffffffffffa7656e747269657304ae72656d6f7665645f6265666f7265"
        "c0b4657870697265645f63657274735f6f6e5f63726cce6553f100b37369676e61747572655f616c67"
        "6f726974686dc402300aa97369676e6174757265c403736967a6736861323536c42011111111111111"
        "11111111111111111111111111111111111111111111111111a473697a6503",
    ),
    (
        RaiseCrlNumber(issuer=ISSUER, at_least=0x10000, reason="restored"),
        "84a26f70b072616973655f63726c5f6e756d626572a6697373756572c414000102030405060708090a"
        "0b0c0d0e0f10111213a861745f6c65617374c4140000000000000000000000000000000000010000a6"
        "726561736f6ea8726573746f726564",
    ),
    (
        CertifyOpenpgp(
            request_id="pgp-1",
            request_digest=b"dg",
            fingerprint=b"\xaa" * 20,
            uids=("Alice <a@example.org>",),
            expires=1_800_000_000,
            certified_at=1_700_000_000,
            result=b"\x88\x01",
        ),
        "88a26f70af636572746966795f6f70656e706770aa726571756573745f6964a57067702d31ae726571"
        "756573745f646967657374c4026467ab66696e6765727072696e74c414aaaaaaaaaaaaaaaaaaaaaaaa"
        "aaaaaaaaaaaaaaaaa47569647391b5416c696365203c61406578616d706c652e6f72673ea765787069"
        "726573ce6b49d200ac6365727469666965645f6174ce6553f100a6726573756c74c4028801",
    ),
    (Noop(), "81a26f70a46e6f6f70"),
    (
        SetMeta(name="cluster", expected=None, value=b"\x81\xa1a\x01"),
        "84a26f70a87365745f6d657461a46e616d65a7636c7573746572a86578706563746564c0a576616c75"
        "65c40481a16101",
    ),
    (
        BeginImport(
            import_id="ab12",
            issuer=ISSUER,
            batches=2,
            certificates=3,
            revoked=1,
            listed=1,
            crl_number=0x1234,
            crl_time=1_710_000_000,
            removed_before=None,
            started_at=1_710_000_100,
            source="index.txt",
        ),
        "8ca26f70ac626567696e5f696d706f7274a9696d706f72745f6964a461623132a6697373756572c414"
        "000102030405060708090a0b0c0d0e0f10111213a76261746368657302ac6365727469666963617465"
        "7303a77265766f6b656401a66c697374656401aa63726c5f6e756d626572c414000000000000000000"
        "0000000000000000001234a863726c5f74696d65ce65ec8780ae72656d6f7665645f6265666f7265c0"
        "aa737461727465645f6174ce65ec87e4a6736f75726365a9696e6465782e747874",
    ),
    (
        ImportX509(
            import_id="ab12",
            issuer=ISSUER,
            batch=1,
            certificates=(
                ImportedCertificate(
                    1,
                    None,
                    1_731_536_000,
                    b"/CN=a",
                    b"unknown",
                    "V",
                    None,
                    None,
                    None,
                    None,
                    False,
                    None,
                ),
                ImportedCertificate(
                    2,
                    1_700_000_000,
                    1_731_536_000,
                    b"/CN=b",
                    b"unknown",
                    "R",
                    1_710_000_000,
                    1,
                    None,
                    b"\x30\x01",
                    True,
                    b"\x30\x03der",
                ),
            ),
        ),
        "85a26f70ab696d706f72745f78353039a9696d706f72745f6964a461623132a6697373756572c41400"
        "0102030405060708090a0b0c0d0e0f10111213a5626174636801ac636572746966696361746573929c"
        "c4140000000000000000000000000000000000000001c0ce67352480c4052f434e3d61c407756e6b6e"
        "6f776ea156c0c0c0c0c2c09cc4140000000000000000000000000000000000000002ce6553f100ce67"
        "352480c4052f434e3d62c407756e6b6e6f776ea152ce65ec878001c0c4023001c3c4053003646572",
    ),
    (
        FinishImport(import_id="ab12", issuer=ISSUER),
        "83a26f70ad66696e6973685f696d706f7274a9696d706f72745f6964a461623132a6697373756572c4"
        "14000102030405060708090a0b0c0d0e0f10111213",
    ),
    (
        RecordAudit(
            events=(
                AuditEvent(
                    "refused",
                    1_700_000_000,
                    {
                        "command": "sign_x509",
                        "request_id": "r1",
                        "code": "bad_arguments",
                        "count": 1,
                    },
                ),
            )
        ),
        "82a26f70ac7265636f72645f6175646974a66576656e74739193a772656675736564ce6553f10084a763"
        "6f6d6d616e64a97369676e5f78353039aa726571756573745f6964a27231a4636f6465ad6261645f6172"
        "67756d656e7473a5636f756e7401",
    ),
    (
        RecordTreeHead(
            size=7,
            timestamp=1_700_000_000,
            root=bytes(range(32)),
            algorithm="rsa-pkcs1-sha256",
            signature=b"sig",
        ),
        "86a26f70b07265636f72645f747265655f68656164a473697a6507a974696d657374616d70ce6553f100"
        "a4726f6f74c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1fa9616c"
        "676f726974686db07273612d706b6373312d736861323536a97369676e6174757265c403736967",
    ),
]


@pytest.mark.parametrize(("command", "hex_bytes"), PINNED, ids=lambda v: getattr(v, "op", ""))
def test_each_command_encodes_to_its_pinned_bytes_and_back(command: Command, hex_bytes: str):
    entry = bytes.fromhex(hex_bytes)
    assert encode(command) == entry
    assert decode(entry) == command


def test_every_op_is_pinned_and_its_fields_are_its_rules():
    assert {command.op for command, _ in PINNED} == set(COMMAND_TYPES)
    for op, cls in COMMAND_TYPES.items():
        assert [f.name for f in dataclasses.fields(cls)] == list(_SPECS[op]), op


# publish_crl as schema 2 and before wrote it: with the CRL's DER (b"crl") instead of its size.
PUBLISH_CRL_WITH_DER = (
    "8ea26f70ab7075626c6973685f63726ca6697373756572c414000102030405060708090a0b0c0d0e0f"
    "10111213aa63726c5f6e756d626572c4140000000000000000000000000000000000000008ab746869"
    "735f757064617465ce65ec8780ab6e6578745f757064617465ce65f5c200ae7265766f636174696f6e"
    "5f73657103a772656d6f76656492c4140000000000000000000000000000000000000001c4147fffff"
    "ffffffffffffffffffffffffffffffffffa7656e747269657304ae72656d6f7665645f6265666f7265"
    "c0b4657870697265645f63657274735f6f6e5f63726cce6553f100b37369676e61747572655f616c67"
    "6f726974686dc402300aa97369676e6174757265c403736967a6736861323536c42011111111111111"
    "11111111111111111111111111111111111111111111111111a3646572c40363726c"
)


def test_a_publish_crl_with_its_der_decodes_as_its_size():
    """Journals written before schema 3 replay into the same state on every replica."""
    [published] = [command for command, _ in PINNED if isinstance(command, PublishCrl)]
    assert decode(bytes.fromhex(PUBLISH_CRL_WITH_DER)) == published


def test_a_publish_crl_removes_at_most_max_removed():
    from storage.commands import MAX_REMOVED

    [published] = [command for command, _ in PINNED if isinstance(command, PublishCrl)]
    for count, ok in ((MAX_REMOVED, True), (MAX_REMOVED + 1, False)):
        entry = encode(dataclasses.replace(published, removed=tuple(range(1, count + 1))))
        if ok:
            assert len(decode(entry).removed) == count  # type: ignore[union-attr]
            assert len(entry) < 32 * 1024  # a small log entry, far below the bound
        else:
            with pytest.raises(Invalid, match="at most"):
                decode(entry)


def test_a_map_in_another_field_order_is_the_same_command():
    """Field order is canonical in what encode writes, not required of what decode reads."""
    command, hex_bytes = PINNED[0]
    fields = msgpack.unpackb(bytes.fromhex(hex_bytes), raw=False)
    shuffled = msgpack.packb(dict(reversed(list(fields.items()))), use_bin_type=True)
    assert decode(shuffled) == command


@pytest.mark.parametrize(
    ("entry", "reason", "message"),
    [
        (b"\xc1", Reason.MALFORMED, "the log entry is not one msgpack value"),
        (msgpack.packb([1]), Reason.MALFORMED, "command must be a map"),
        (msgpack.packb({"op": "nope"}), Reason.UNKNOWN_OP, "unknown op 'nope'"),
        (msgpack.packb({"op": "noop", "x": 1}), Reason.MALFORMED, "unknown field(s) for noop: x"),
        (  # cut short
            bytes.fromhex(PINNED[0][1])[:-1],
            Reason.MALFORMED,
            "the log entry is not one msgpack value",
        ),
        (
            encode(dataclasses.replace(PINNED[1][0], reason=7)),  # type: ignore[type-var]
            Reason.BAD_REASON,
            "reason must be None or an RFC 5280 CRLReason code",
        ),
        (
            encode(dataclasses.replace(PINNED[0][0], serial=0)),  # type: ignore[type-var]
            Reason.MALFORMED,
            "serial is out of range",
        ),
        (
            msgpack.packb({**msgpack.unpackb(bytes.fromhex(PINNED[0][1])), "serial": 5}),
            Reason.MALFORMED,
            "serial must be a number as 20 bytes, big-endian",
        ),
        (
            encode(SetMeta(name="applied_index", expected=None, value=b"x")),
            Reason.MALFORMED,
            "name 'applied_index' is the repository's own",
        ),
    ],
)
def test_bad_entries_are_refused_in_fixed_words(entry: bytes, reason: Reason, message: str):
    with pytest.raises(Invalid) as first:
        decode(entry)
    with pytest.raises(Invalid) as again:
        decode(entry)
    assert first.value.reason is reason
    assert message in first.value.message
    assert (again.value.reason, again.value.message) == (reason, first.value.message)


def test_a_recorded_result_is_stored_as_the_earlier_version_stored_it():
    """`requests` values hold the first result; their map and order must not change."""
    issued = Issued("req-1", ISSUER, 2**140 + 5, "server", 1, 2, 3, 4)
    stored = record(issued)
    assert msgpack.packb(stored, use_bin_type=True).hex() == (
        "89a6737461747573a6697373756564aa726571756573745f6964a57265712d31a6697373756572c414"
        "000102030405060708090a0b0c0d0e0f10111213a673657269616cc414000010000000000000000000"
        "0000000000000005a770726f66696c65a6736572766572aa6e6f745f6265666f726501a96e6f745f61"
        "6674657202a96973737565645f617403a5696e64657804"
    )
    assert from_record(stored) == issued


def test_the_fast_check_of_imported_records_accepts_only_what_the_full_one_accepts():
    """Imports decode millions of records through a fast path; anything it takes, the
    detailed rules take the same way (so replicas never depend on which path ran)."""
    import random

    from storage.commands import _imported, _imported_fast

    rng = random.Random(5)
    good = [
        [b"\0" * 19 + b"\x07", None, 10, b"/CN=a", b"unknown", "V", None, None, None, None,
         False, None],
        [b"\0" * 19 + b"\x08", 5, 10, b"", b"", "R", 7, 1, 3, b"\x30\x01", True, b"\x30"],
    ]  # fmt: skip
    odd = [None, True, False, 0, -1, 1, 2**63, 11, 8, 7, b"", b"x", b"\0" * 20, b"\xff" * 20,
           "R", "V", "E", "X", "", [], b"y" * 5000]  # fmt: skip
    taken = 0
    for _ in range(20000):
        item = list(rng.choice(good))
        for _ in range(rng.randint(1, 3)):
            item[rng.randrange(len(item))] = rng.choice(odd)
        fast = _imported_fast(item)
        try:
            slow = _imported("x", item)
        except Invalid:
            assert fast is None, item
            continue
        assert fast in (None, slow), item
        taken += fast is not None
    assert taken > 100  # the sample did exercise the fast path
    assert all(_imported_fast(item) == _imported("x", item) for item in good)
