"""The frame codec on its own: vectors, round trips, and fuzzing with garbage."""

from __future__ import annotations

import zlib
from datetime import UTC, datetime

import msgpack
import pytest
from cobs import cobs
from hypothesis import given, settings
from hypothesis import strategies as st

from signer.errors import ErrorCode
from signer.wire.framing import Frame, FrameDecoder, FrameError, encode_frame, max_encoded_size

messages = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=50)
    | st.binary(max_size=300),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)


def test_known_vector():
    """The layout is exactly COBS(msgpack || CRC32 big-endian) + 0x00."""
    payload = msgpack.packb({"v": 1}, use_bin_type=True)
    expected = cobs.encode(payload + zlib.crc32(payload).to_bytes(4, "big")) + b"\x00"
    assert encode_frame({"v": 1}) == expected
    assert b"\x00" not in expected[:-1]


def test_datetimes_travel_as_utc_timestamps():
    moment = datetime(2026, 11, 27, 12, 30, 15, 250000, tzinfo=UTC)
    [frame] = FrameDecoder().feed(encode_frame({"t": moment}))
    assert isinstance(frame, Frame)
    assert frame.message["t"] == moment
    assert frame.message["t"].tzinfo is not None


@given(st.lists(messages, min_size=1, max_size=8), st.integers(min_value=1, max_value=64))
def test_round_trip_in_any_pieces(batch, piece):
    stream = b"".join(encode_frame(m) for m in batch)
    decoder = FrameDecoder()
    events = []
    for i in range(0, len(stream), piece):
        events += decoder.feed(stream[i : i + piece])
    assert [e.message for e in events] == batch
    assert decoder.pending == 0


@settings(max_examples=300)
@given(st.binary(max_size=2000))
def test_garbage_never_raises_and_valid_frame_after_it_decodes(garbage):
    decoder = FrameDecoder(max_payload=1024)
    events = decoder.feed(garbage)
    assert all(isinstance(e, FrameError | Frame) for e in events)
    # Garbage without a delimiter leaves a partial frame: the delimiter ends it, then a good frame.
    events = decoder.feed(b"\x00" + encode_frame({"ok": True}))
    assert isinstance(events[-1], Frame)
    assert events[-1].message == {"ok": True}


@settings(max_examples=300)
@given(messages, st.data())
def test_mutated_frames_are_reported_not_accepted_silently(message, data):
    frame = bytearray(encode_frame(message))
    index = data.draw(st.integers(min_value=0, max_value=len(frame) - 2))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    frame[index] ^= 1 << bit
    events = FrameDecoder().feed(bytes(frame) + b"\x00")
    # A flipped bit is caught (CRC32 catches every single-bit error), possibly splitting the
    # frame in two at a new 0x00: every event is an error, none is the original message.
    assert events
    assert all(isinstance(e, FrameError) for e in events)


def test_each_error_kind_has_its_code():
    decoder = FrameDecoder(max_payload=64)
    crc_bad = bytearray(encode_frame({"a": 1}))
    crc_bad[-2] ^= 0x01  # last CRC byte (COBS keeps non-zero bytes in place)
    too_short = cobs.encode(b"\x01\x02") + b"\x00"
    bad_cobs = b"\x05\x01\x00"  # code byte promises 4 more bytes, only 1 follows
    payload = b"\xc1"  # never used in msgpack
    bad_msgpack = cobs.encode(payload + zlib.crc32(payload).to_bytes(4, "big")) + b"\x00"
    oversize = encode_frame({"blob": b"x" * 500})
    events = decoder.feed(bytes(crc_bad) + too_short + bad_cobs + bad_msgpack + oversize)
    assert [e.code for e in events] == [
        ErrorCode.BAD_CRC,
        ErrorCode.BAD_FRAME,
        ErrorCode.BAD_FRAME,
        ErrorCode.BAD_MSGPACK,
        ErrorCode.FRAME_TOO_LARGE,
    ]


def test_oversize_frame_memory_stays_bounded():
    decoder = FrameDecoder(max_payload=1024)
    for _ in range(100):
        decoder.feed(b"\x01" * 10_000)  # 1 MB without a delimiter
    assert len(decoder._buffer) <= max_encoded_size(1024)
    [event] = decoder.feed(b"\x00")
    assert event.code is ErrorCode.FRAME_TOO_LARGE
    assert event.wire_size == 1_000_001


@pytest.mark.parametrize("fill", [b"\x00", b"\x00" * 50])
def test_idle_delimiters_are_not_frames(fill):
    assert FrameDecoder().feed(fill) == []
