"""DER, written and read by hand where the CRL and CSR paths need bytes exactly.

`cryptography` builds whole structures; the signer also assembles a CRL from pre-encoded entries
and walks requests and CRLs without decoding them fully, so these few primitives live here, once.
"""

from __future__ import annotations

from datetime import UTC, datetime


def der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes((length,))
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(raw),)) + raw


def der_tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + der_length(len(content)) + content


def der_integer(value: int) -> bytes:
    """A non-negative INTEGER in its minimal two's complement form."""
    return der_tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def der_time(moment: int) -> bytes:
    """UTCTime through 2049, GeneralizedTime from 2050 (RFC 5280 §5.1.2.4), whole seconds."""
    when = datetime.fromtimestamp(moment, UTC)
    if 1950 <= when.year < 2050:
        return der_tlv(0x17, when.strftime("%y%m%d%H%M%SZ").encode())
    return der_generalized_time(moment)


def der_generalized_time(moment: int) -> bytes:
    return der_tlv(0x18, datetime.fromtimestamp(moment, UTC).strftime("%Y%m%d%H%M%SZ").encode())


def der_header(data: bytes | memoryview, pos: int) -> tuple[int, int, int]:
    """(tag, start of content, end) of the element at `pos`; ValueError if it is malformed."""
    if pos + 2 > len(data):
        raise ValueError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    start = pos + 2
    if first & 0x80:
        size = first & 0x7F
        if size == 0 or size > 4 or start + size > len(data):
            raise ValueError("bad DER length")
        length = int.from_bytes(data[start : start + size], "big")
        start += size
    else:
        length = first
    if start + length > len(data):
        raise ValueError("truncated DER")
    return tag, start, start + length


def serial_hex(serial: int) -> str:
    """Upper-case hex with an even number of digits, as serials travel on the wire."""
    digits = f"{serial:X}"
    return digits if len(digits) % 2 == 0 else "0" + digits
