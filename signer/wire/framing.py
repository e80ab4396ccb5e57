"""Frames on the serial line, as a pure codec: bytes in, events out; message in, bytes out.

A frame is ``COBS(msgpack(message) || CRC32(msgpack(message)))`` followed by one 0x00 byte.
COBS guarantees the encoded body holds no 0x00, so a reader that lost its place (line noise, a
cable pulled mid-frame) finds the next frame at the next 0x00. The decoder never raises on input:
every broken frame becomes one `FrameError` event and decoding carries on.

No I/O here (the h11 way): the serial link feeds received bytes in and writes what
`encode_frame` returns.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import msgpack
from cobs import cobs

from signer.errors import ErrorCode

DELIMITER = b"\x00"
CRC_SIZE = 4
DEFAULT_MAX_FRAME = 256 * 1024


@dataclass(frozen=True, slots=True)
class Frame:
    """A well-formed frame: CRC checked, msgpack decoded."""

    message: Any
    wire_size: int


@dataclass(frozen=True, slots=True)
class FrameError:
    """A broken frame, skipped up to its terminating 0x00."""

    code: ErrorCode
    detail: str
    wire_size: int


FrameEvent = Frame | FrameError


def max_encoded_size(max_payload: int) -> int:
    """Upper bound of a frame's COBS body for a payload bound (one overhead byte per 254)."""
    body = max_payload + CRC_SIZE
    return body + body // 254 + 1


def pack_message(message: Any) -> bytes:
    """msgpack with the wire conventions: bin for bytes, str for text, Timestamp for datetimes."""
    packed: bytes = msgpack.packb(message, use_bin_type=True, datetime=True)
    return packed


def unpack_message(payload: bytes) -> Any:
    """Inverse of `pack_message`; datetimes come back timezone-aware in UTC."""
    return msgpack.unpackb(payload, raw=False, timestamp=3, strict_map_key=False)


def encode_frame(message: Any) -> bytes:
    """The bytes to write for one message, delimiter included."""
    payload = pack_message(message)
    crc = zlib.crc32(payload).to_bytes(CRC_SIZE, "big")
    encoded: bytes = cobs.encode(payload + crc)
    return encoded + DELIMITER


class FrameDecoder:
    """Splits a byte stream into frames. Feed it whatever the line delivered, in any pieces.

    `max_payload` bounds a frame's msgpack payload; a longer frame is discarded as it arrives
    (memory stays bounded by the limit, whatever the peer sends) and reported once.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_FRAME):
        self.max_payload = max_payload
        self._max_encoded = max_encoded_size(max_payload)
        self._buffer = bytearray()
        self._oversize = 0  # bytes of an oversize frame thrown away so far; 0 when none

    def feed(self, data: bytes) -> list[FrameEvent]:
        events: list[FrameEvent] = []
        start = 0
        while start < len(data):
            end = data.find(DELIMITER, start)
            if end < 0:
                self._accumulate(data[start:])
                break
            self._accumulate(data[start:end])
            event = self._finish_frame()
            if event is not None:
                events.append(event)
            start = end + 1
        return events

    @property
    def pending(self) -> int:
        """Bytes of an unfinished frame held (or skipped) so far."""
        return len(self._buffer) + self._oversize

    def _accumulate(self, chunk: bytes) -> None:
        if self._oversize:
            self._oversize += len(chunk)
        elif len(self._buffer) + len(chunk) > self._max_encoded:
            self._oversize = len(self._buffer) + len(chunk)
            self._buffer.clear()
        else:
            self._buffer += chunk

    def _finish_frame(self) -> FrameEvent | None:
        if self._oversize:
            size, self._oversize = self._oversize + 1, 0
            return FrameError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame of {size} bytes exceeds the limit of {self.max_payload} payload bytes",
                size,
            )
        body = bytes(self._buffer)
        self._buffer.clear()
        if not body:
            return None  # a lone 0x00: idle fill or a resynchronisation marker, not a frame
        return decode_body(body, self.max_payload)


def decode_body(body: bytes, max_payload: int = DEFAULT_MAX_FRAME) -> FrameEvent:
    """Decode one frame body (the bytes between two delimiters); the payload is bounded by
    `max_payload` (the encoded bound above only limits what is buffered meanwhile)."""
    size = len(body) + 1
    try:
        raw = cobs.decode(body)
    except cobs.DecodeError as exc:
        return FrameError(ErrorCode.BAD_FRAME, f"COBS decoding failed: {exc}", size)
    if len(raw) <= CRC_SIZE:
        return FrameError(ErrorCode.BAD_FRAME, "frame shorter than its checksum", size)
    if len(raw) - CRC_SIZE > max_payload:
        text = f"payload of {len(raw) - CRC_SIZE} bytes exceeds the limit of {max_payload}"
        return FrameError(ErrorCode.FRAME_TOO_LARGE, text, size)
    payload, crc = raw[:-CRC_SIZE], raw[-CRC_SIZE:]
    if zlib.crc32(payload).to_bytes(CRC_SIZE, "big") != crc:
        return FrameError(ErrorCode.BAD_CRC, "CRC32 mismatch", size)
    try:
        message = unpack_message(payload)
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        return FrameError(ErrorCode.BAD_MSGPACK, f"undecodable msgpack: {type(exc).__name__}", size)
    return Frame(message, size)
