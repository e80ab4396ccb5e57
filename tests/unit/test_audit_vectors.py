"""The test vectors of docs/audit.md §8: a second verifier reproduces these bytes and hashes."""

from __future__ import annotations

from signer.pki import merkle
from signer.pki.audit import decode_record, frame, tree_head_message
from storage import Issued, IssueX509
from storage.audit import records_for

RECORD = (
    "8ca17601a5696e64657807a56576656e74aa69737375655f78353039a474696d65ce6933c340aa726571756573745f"
    "6964b877656264623a656d61696c63657274733a34323a7369676eae726571756573745f646967657374c420000000"
    "0000000000000000000000000000000000000000000000000000000000a6697373756572c414000102030405060708"
    "090a0b0c0d0e0f10111213a673657269616cc4140000000000000000000000000000000000001234ab636572745f73"
    "6861323536c42095fd8ebcc48d742abb4683f4b22f31753cbe1dc914db40c17cdb63bda2e53f35a770726f66696c65"
    "a6636c69656e74a76f7574636f6d65a6697373756564a4636f6465c0"
)
SECOND = "84a17601a5696e64657808a56576656e74a86f70657261746f72a474696d65ce6935dd40"
ROOT = "4a99c3b04a53dad8d14fe102ea920c630bca1e5f79352afa41d3f04e29664a14"
MESSAGE = (
    "6361636572742d7369676e657220617564697420747265652068656164207631000000000000000002000000006933c340"
    + ROOT
)


def test_the_documented_vectors() -> None:
    c = IssueX509(
        "webdb:emailcerts:42:sign",
        bytes(32),
        bytes(range(20)),
        0x1234,
        b"\x30\x03der",
        "client",
        1765000000,
        1796536000,
        1765000000,
    )
    result = Issued(
        c.request_id, c.issuer, c.serial, c.profile, c.not_before, c.not_after, 1765000000, 7
    )
    [record] = records_for(7, c, result)
    assert record.hex() == RECORD
    assert decode_record(record)["serial"] == (0x1234).to_bytes(20, "big")
    leaf = "a96e124fdd6bc2c61fcfdf009f018af567ba5c0e8093d8a1eac4eefd890e27d7"
    assert merkle.leaf_hash(record).hex() == leaf
    records = [record, bytes.fromhex(SECOND)]
    assert merkle.tree_root(records).hex() == ROOT
    assert frame(records[1]).hex() == "00000024" + SECOND
    assert tree_head_message(2, 1765000000, bytes.fromhex(ROOT)).hex() == MESSAGE
