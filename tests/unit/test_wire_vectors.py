"""Frames pinned to bytes: the hex is written here and in docs/protocol.md (§1, Test vectors), so
a change of encoding, CRC or COBS framing fails loudly instead of passing a round trip."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from signer.wire.framing import Frame, FrameDecoder, encode_frame

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

VECTORS: list[tuple[dict[str, Any], str]] = [
    (
        {"v": 1, "id": "r1", "cmd": "health", "args": {}},
        "2084a17601a26964a27231a3636d64a66865616c7468a4617267738023d201ad00",
    ),
    (
        {
            "v": 1,
            "id": "r1",
            "ok": True,
            "result": {"status": "ok", "time": datetime(2026, 12, 4, 12, 0, 0, tzinfo=UTC)},
        },
        "3084a17601a26964a27231a26f6bc3a6726573756c7482a6737461747573a26f6ba474696d65d6ff6b12ab40"
        "1d0ef35500",
    ),
    (
        {"v": 1, "id": None, "ok": False, "error": {"code": "bad_crc", "message": "CRC mismatch"}},
        "3a84a17601a26964c0a26f6bc2a56572726f7282a4636f6465a76261645f637263a76d657373616765ac4352"
        "43206d69736d61746368052eb2bc00",
    ),
]


@pytest.mark.parametrize(("message", "frame"), VECTORS)
def test_encoding_gives_the_written_bytes(message: dict[str, Any], frame: str) -> None:
    assert encode_frame(message).hex() == frame


@pytest.mark.parametrize(("message", "frame"), VECTORS)
def test_the_written_bytes_decode_to_the_message(message: dict[str, Any], frame: str) -> None:
    [event] = FrameDecoder().feed(bytes.fromhex(frame))
    assert isinstance(event, Frame) and event.message == message


def test_the_protocol_document_lists_the_same_vectors() -> None:
    documented = re.findall(r"\| `([0-9a-f]{20,})` \|", DOC.read_text(encoding="utf-8"))
    assert documented == [frame for _, frame in VECTORS]
